#!/bin/sh
# Assembles the root file system of kubefim's runtime image into DEST: the binary at
# /usr/local/bin/kubefim, every shared library ldd resolves for it, at the path ldd names,
# and the dynamic loader at the binary's interpreter path. Nothing else: no shell, no /tmp
# (the DaemonSet mounts an emptyDir for temporary files), no /etc (a root container needs no
# passwd entry, and the API client uses the service account's CA).
#
# The one source of truth for the image's layout: the Dockerfile's `rootfs` stage runs it on
# the binary it builds, and build-local.sh runs it on a binary built on this machine.
#
#   deploy/image/rootfs.sh BINARY DEST
#
# Libraries are copied as regular files (symlinks followed), into real directories: the
# image does not need the host's merged-/usr symlinks, the loader's default search path
# (/lib/x86_64-linux-gnu on Debian) finds them where ldd found them. As root, the result is
# checked by running `kubefim --version` chrooted into DEST.
set -eu

usage() {
    echo "usage: $0 BINARY DEST" >&2
    exit 2
}

[ "$#" -eq 2 ] || usage
binary=$1
dest=$2

[ -f "$binary" ] && [ -x "$binary" ] || { echo "rootfs: $binary is not an executable file" >&2; exit 2; }
if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
    echo "rootfs: $dest exists and is not empty" >&2
    exit 2
fi
command -v ldd >/dev/null || { echo "rootfs: ldd not found (Debian: libc-bin)" >&2; exit 2; }

# ldd prints one of:
#   linux-vdso.so.1 (0x...)                         the vDSO: provided by the kernel
#   libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
#   /lib64/ld-linux-x86-64.so.2 (0x...)             the interpreter (PT_INTERP), as named
#   libfoo.so => not found                          an error
#   statically linked / not a dynamic executable    nothing to copy
deps=$(ldd "$binary" 2>&1) || case "$deps" in
    *"not a dynamic executable"* | *"statically linked"*) deps="" ;;
    *) echo "rootfs: ldd $binary failed: $deps" >&2; exit 1 ;;
esac
case "$deps" in
    *"not found"*) echo "rootfs: unresolved libraries:" >&2; echo "$deps" | grep 'not found' >&2; exit 1 ;;
esac
files=$(echo "$deps" | awk '
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }
')

install -d -m 0755 "$dest" "$dest/usr" "$dest/usr/local" "$dest/usr/local/bin"
install -m 0755 "$binary" "$dest/usr/local/bin/kubefim"
for file in $files; do
    dir=$(dirname "$file")
    mkdir -p "$dest$dir"
    # Follow symlinks (libc.so.6 and the loader are links on most distributions) and keep
    # the mode; a file listed twice is copied once.
    [ -e "$dest$file" ] || cp -L --preserve=mode "$file" "$dest$file"
done
# Directories as root creates them, whatever the caller's umask.
find "$dest" -type d -exec chmod 0755 {} +

if [ "$(id -u)" -eq 0 ] && command -v chroot >/dev/null; then
    if ! version=$(chroot "$dest" /usr/local/bin/kubefim --version 2>&1); then
        echo "rootfs: the assembled root file system cannot run kubefim: $version" >&2
        exit 1
    fi
    echo "rootfs: $version runs in $dest" >&2
fi
(cd "$dest" && find . -type f | sed 's|^\.||' | sort) >&2
