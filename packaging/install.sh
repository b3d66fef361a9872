#!/bin/sh
# Installs doppler from this folder into a PostgreSQL server, or removes it again.
#   ./install.sh PG_CONFIG               copy lib/ into `pg_config --pkglibdir`, share/ into `--sharedir`
#   ./install.sh --uninstall PG_CONFIG   remove exactly the files doppler's tarball installed there
# PG_CONFIG is the pg_config of the server (its major must be the one this package is built for).
# Run it as the user who owns the server's installation (often root). It writes nothing else but
# its list of installed files, $sharedir/doppler/MANIFEST: installing a newer tarball first removes
# the files of the one before (as a package manager does), and --uninstall removes what it lists.
# Then: add doppler to shared_preload_libraries (for the background worker) and set
# doppler.worker_databases; restart the server; in a database: CREATE EXTENSION doppler;
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mode=install
if [ "${1:-}" = "--uninstall" ]; then mode=uninstall; shift; fi
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 [--uninstall] PG_CONFIG" >&2
    exit 2
fi
pgc=$1
if ! [ -x "$pgc" ] || [ -d "$pgc" ]; then
    echo "$0: $pgc is not an executable pg_config" >&2
    exit 2
fi
want=$(cat "$here/PG_MAJOR")
have=$("$pgc" --version | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')
if [ "$have" != "$want" ]; then
    echo "$0: this package is for PostgreSQL $want; $pgc is $("$pgc" --version)" >&2
    exit 1
fi
if [ "$mode" = install ]; then
    # what the binaries need: x86-64 Linux with glibc 2.34 or later (Debian 12, Ubuntu 22.04, RHEL 9)
    arch=$(uname -m)
    glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc //p')
    if [ "$arch" != x86_64 ]; then
        echo "$0: this package is for x86_64 Linux; this machine is $arch" >&2
        exit 1
    fi
    if [ -z "$glibc" ] || [ "$(printf '%s\n2.34\n' "$glibc" | sort -V | head -n 1)" != 2.34 ]; then
        echo "$0: this package needs glibc 2.34 or later; this machine has ${glibc:-no glibc}" >&2
        exit 1
    fi
fi
libdir=$("$pgc" --pkglibdir)
sharedir=$("$pgc" --sharedir)
manifest=$sharedir/doppler/MANIFEST

# Removes the files a manifest lists (lib/... under $libdir, share/... under $sharedir), then
# doppler's own folders when nothing else is left in them. Only names of doppler's layout are
# removed, whatever a manifest says: lib/doppler.so, lib/doppler/*, share/extension/doppler.control,
# share/extension/doppler--*.sql, share/doppler/* (no "..", no folders).
remove_listed() {
    while IFS= read -r f || [ -n "$f" ]; do
        case "$f" in
            *..*|*/) continue ;;
            lib/doppler.so|lib/doppler/*|share/extension/doppler.control|share/extension/doppler--*.sql|share/doppler/*) ;;
            *) continue ;;
        esac
        case "$f" in
            lib/*) target=$libdir/${f#lib/} ;;
            *) target=$sharedir/${f#share/} ;;
        esac
        if [ -f "$target" ] || [ -L "$target" ]; then rm -f "$target"; fi
    done < "$1"
    rmdir "$libdir/doppler" 2>/dev/null || true
    rmdir "$sharedir/doppler" 2>/dev/null || true
}

# every file of this package, as lib/... and share/... (names without newlines: ours)
list=$(mktemp)
trap 'rm -f "$list" "$list.installed"' EXIT
(cd "$here" && find lib share -type f | LC_ALL=C sort) > "$list"
[ -s "$list" ] || { echo "$0: no files under $here/lib and $here/share" >&2; exit 1; }

if [ "$mode" = install ]; then
    if [ -s "$manifest" ]; then
        old=$(mktemp)
        cp "$manifest" "$old"
        remove_listed "$old"
        rm -f "$old" "$manifest"
    fi
    while IFS= read -r f; do
        case "$f" in lib/*) dest=$libdir/${f#lib/} ;; *) dest=$sharedir/${f#share/} ;; esac
        d=$(dirname "$dest")
        [ -d "$d" ] || install -d -m 0755 "$d"
        if [ -x "$here/$f" ]; then m=0755; else m=0644; fi
        install -m "$m" "$here/$f" "$dest"
    done < "$list"
    { cat "$list"; echo "share/doppler/MANIFEST"; } > "$manifest"
    chmod 0644 "$manifest"
    echo "doppler $(cat "$here/VERSION") installed into $libdir and $sharedir"
    echo "next: add doppler to shared_preload_libraries, set doppler.worker_databases, restart; then CREATE EXTENSION doppler;"
else
    # what was installed (the manifest), and at least this package's own files
    if [ -s "$manifest" ]; then
        cp "$manifest" "$list.installed"
        remove_listed "$list.installed"
        rm -f "$list.installed"
    fi
    remove_listed "$list"
    echo "doppler $(cat "$here/VERSION") removed from $libdir and $sharedir"
fi
