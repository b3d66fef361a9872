#!/bin/sh
# Installs doppler from this folder into a PostgreSQL server, or removes it again.
#   ./install.sh PG_CONFIG               copy lib/ into `pg_config --pkglibdir`, share/ into `--sharedir`
#   ./install.sh --uninstall PG_CONFIG   remove exactly the files this package installs
# PG_CONFIG is the pg_config of the server (its major must be the one this package is built for).
# Run it as the user who owns the server's installation (often root). It writes nothing else.
# Then, in postgresql.conf: shared_preload_libraries = 'doppler' (for the background worker;
# restart the server), and in a database: CREATE EXTENSION doppler;
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mode=install
if [ "${1:-}" = "--uninstall" ]; then mode=uninstall; shift; fi
pgc=${1:-}
if [ -z "$pgc" ] || [ $# -ne 1 ]; then
    echo "usage: $0 [--uninstall] PG_CONFIG" >&2
    exit 2
fi
if ! [ -x "$pgc" ]; then
    echo "$0: $pgc is not an executable pg_config" >&2
    exit 2
fi
want=$(cat "$here/PG_MAJOR")
have=$("$pgc" --version | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')
if [ "$have" != "$want" ]; then
    echo "$0: this package is for PostgreSQL $want; $pgc is $("$pgc" --version)" >&2
    exit 1
fi
libdir=$("$pgc" --pkglibdir)
sharedir=$("$pgc" --sharedir)

# every file of the package, relative to lib/ or share/
files() { (cd "$here/$1" && find . -type f | sed 's|^\./||' | sort); }

if [ "$mode" = install ]; then
    for part in lib share; do
        if [ $part = lib ]; then dest=$libdir; else dest=$sharedir; fi
        files $part | while read -r f; do
            d=$(dirname "$dest/$f")
            [ -d "$d" ] || install -d -m 0755 "$d"
            install -m "$( [ -x "$here/$part/$f" ] && echo 0755 || echo 0644 )" "$here/$part/$f" "$dest/$f"
        done
    done
    echo "doppler $(cat "$here/VERSION") installed into $libdir and $sharedir"
    echo "next: shared_preload_libraries = 'doppler' in postgresql.conf (restart), then CREATE EXTENSION doppler;"
else
    for part in lib share; do
        if [ $part = lib ]; then dest=$libdir; else dest=$sharedir; fi
        files $part | while read -r f; do rm -f "$dest/$f"; done
    done
    # doppler's own folders, when nothing else is left in them
    rmdir "$libdir/doppler" "$sharedir/doppler" 2>/dev/null || true
    echo "doppler $(cat "$here/VERSION") removed from $libdir and $sharedir"
fi
