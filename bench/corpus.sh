#!/usr/bin/env bash
# Build (once) and cache a corpus of real Debian guest trees for benchmarks and
# integration runs.  The cache lives outside the repository; nothing here is committed.
#   bench/corpus.sh [CACHE_DIR [NAME...]]   (default: /var/cache/vsstore-bench; every entry)
set -euo pipefail
cache=${1:-${VSSTORE_BENCH_CACHE:-/var/cache/vsstore-bench}}
only=" ${*:2} "  # names given: build only those (another run may be building the rest)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$cache/debian"
build() {  # name suite variant extra-packages
    local name=$1 suite=$2 variant=$3 include=$4 dest="$cache/debian/$1"
    [ -e "$dest/.complete" ] && return 0
    [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
    rm -rf "$dest.partial"
    echo "corpus: debootstrap $suite ($variant${include:+, +$include}) -> $dest" >&2
    debootstrap --variant="$variant" ${include:+--include="$include"} \
        "$suite" "$dest.partial" "$mirror" >"$cache/debian/$name.log" 2>&1
    touch "$dest.partial/.complete"
    rm -rf "$dest" && mv "$dest.partial" "$dest"
}
command -v debootstrap >/dev/null || { echo "corpus: debootstrap is missing (apt-get install debootstrap)" >&2; exit 3; }
build bookworm-minbase bookworm minbase ""
build bookworm-services bookworm minbase "openssh-server,nginx-light,cron,rsyslog,python3"
build trixie-minbase trixie minbase ""
# A guest that boots systemd (tests/t7_boot.py): minbase + systemd as init, cron and dbus
# (about 40 MB more downloads than minbase, 1-2 minutes; 230 MB on disk).
build bookworm-systemd bookworm minbase "systemd-sysv,cron,dbus"
echo "$cache/debian"
