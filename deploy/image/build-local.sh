#!/bin/sh
# Builds kubefim's runtime image on a machine without a registry: the `runtime` stage of
# deploy/Dockerfile, with its `rootfs` stage replaced by a directory that
# deploy/image/rootfs.sh (the script that stage runs) assembles from a binary built here.
# Same layout, same labels and entry point as the registry build; nothing is pulled (the
# other stages are skipped, the runtime stage is FROM scratch).
#
#   deploy/image/build-local.sh [--binary PATH] [--tag NAME] [--revision REV]
#
# --binary    the kubefim binary (default: target/release/kubefim)
# --tag       the image name (default: kubefim:0.1.0, stored as localhost/kubefim:0.1.0,
#             which is what the DaemonSet's `image: kubefim:0.1.0` resolves to)
# --revision  org.opencontainers.image.revision (default: git rev-parse HEAD, or unknown)
#
# PODMAN overrides the podman command (e.g. PODMAN="podman --root /other/storage").
# Prints the image id on stdout.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
binary=$repo/target/release/kubefim
tag=kubefim:0.1.0
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)

while [ "$#" -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --revision) revision=$2; shift 2 ;;
        *) echo "usage: $0 [--binary PATH] [--tag NAME] [--revision REV]" >&2; exit 2 ;;
    esac
done

version=$("$binary" --version | awk '{print $2}')
context=$(mktemp -d "${TMPDIR:-/tmp}/kubefim-image.XXXXXX")
trap 'rm -rf "$context"' EXIT INT TERM

# The Dockerfile copies /rootfs/ out of the `rootfs` stage; here that stage is the
# directory $context/stage, so the tree goes to $context/stage/rootfs.
sh "$here/rootfs.sh" "$binary" "$context/stage/rootfs"
# The main context is an empty directory: only the skipped build stage reads it.
mkdir "$context/empty"
${PODMAN:-podman} build --quiet \
    --file "$repo/deploy/Dockerfile" \
    --target runtime \
    --skip-unused-stages=true \
    --build-context "rootfs=$context/stage" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --tag "$tag" \
    "$context/empty" >/dev/null
${PODMAN:-podman} image inspect --format '{{.Id}}' "$tag"
