# Shortcuts for the README's commands (each script sets up what is missing first).
.PHONY: demo test bench

demo:
	scripts/demo

test:
	scripts/test

bench:
	scripts/bench
