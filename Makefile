# Shortcuts for the README's commands (each script sets up what is missing first).
.PHONY: demo test bench package

demo:
	scripts/demo

test:
	scripts/test

bench:
	scripts/bench

# the .deb (PostgreSQL 15) and the tarball (PostgreSQL 18) into target/packages (README: Install)
package:
	scripts/package
