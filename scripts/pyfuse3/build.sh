#!/usr/bin/env bash
# pyfuse3 with the kernel's caches: pyfuse3 3.5.0's source (pinned by its sha256) with
# scripts/pyfuse3/*.patch applied in name order, built into a wheel once (cached outside the checkout)
# and installed into the virtualenv $1.  The patch lets Operations.opendir return a FileInfo
# whose keep_cache and cache_readdir reach the kernel (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR),
# or answer ENOSYS (the kernel's "no opendir" mode: every directory cached, no opendir or
# releasedir sent again), readdir then being handed the directory's inode: a directory
# listed once is listed again from the page cache, with no request to the daemon.
# cache-symlinks.patch lets Operations.enable_symlink_cache ask for FUSE_CAP_CACHE_SYMLINKS
# (a symlink's target read once, then kept by the kernel).  read-queued.patch makes the
# FUSE device non-blocking and reads a request already queued without waiting for trio's
# next poll of it.  README, "Libraries, and why".
# Small, and written to be offered upstream.
set -euo pipefail
venv=$1
here=$(cd "$(dirname "$0")" && pwd)
version=3.5.0
url=https://files.pythonhosted.org/packages/b9/a9/ce2c0513e9611ee2ffeeb482a33d23a210326801d48866df30a989562d43/pyfuse3-$version.tar.gz
sha=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
cache=${VSSTORE_BUILD_CACHE:-/var/cache/vsstore-build}
patch_sha=$(cat "$here"/*.patch | sha256sum | cut -c1-12)
local_version=$version+vsstore.$patch_sha  # a new patch is a new version
wheels=$cache/pyfuse3-$patch_sha

if "$venv/bin/python" -c "import sys, importlib.metadata as m; sys.exit(m.version('pyfuse3') != '$local_version')" 2>/dev/null; then
    exit 0  # installed already, from this patch
fi
mkdir -p "$wheels"
if ! ls "$wheels"/pyfuse3-*.whl >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    sdist=$cache/pyfuse3-$version.tar.gz
    if [ ! -f "$sdist" ] || ! echo "$sha  $sdist" | sha256sum -c --status; then
        curl -fsSL --retry 3 -o "$sdist.part" "$url"
        echo "$sha  $sdist.part" | sha256sum -c --status || {
            echo "scripts/pyfuse3/build.sh: $url does not have the expected sha256" >&2; exit 1; }
        mv "$sdist.part" "$sdist"
    fi
    tar xzf "$sdist" -C "$work"
    src=$work/pyfuse3-$version
    for p in "$here"/*.patch; do
        patch -s -d "$src" -p1 < "$p"
    done
    rm -f "$src/src/pyfuse3/__init__.c"  # generated from the patched .pyx by Cython
    SETUPTOOLS_SCM_PRETEND_VERSION=$local_version \
        "$venv/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$wheels" "$src" >&2
fi
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$wheels"/pyfuse3-*.whl
