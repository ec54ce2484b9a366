#!/usr/bin/env bash
# A k3s release mirror holding the stand-in (tests/k3s-standin/k3s) instead of
# the real binary, for the lab and its tests: real k3s cannot be fetched where
# they run. Laid out like an official release (k3s, air-gap images,
# sha256sum-amd64.txt) so the controller takes the same path as with a real
# one. Prints `mirror=DIR`. Cached under $HOMELAB_CACHE, rebuilt when the
# stand-in changes.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${HOMELAB_CACHE:-$HOME/.cache/homelab}"
key=$(cat tests/k3s-standin/k3s "$0" | sha256sum | cut -c1-12)
dir="$cache/k3s-standin/$key"
if [ ! -f "$dir/sha256sum-amd64.txt" ]; then
  tmp=$(mktemp -d "$cache/.k3s-standin.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  install -m 0755 tests/k3s-standin/k3s "$tmp/k3s"
  # An empty image archive: the stand-in runs no containers.
  tar -cf - -T /dev/null | zstd -q -o "$tmp/k3s-airgap-images-amd64.tar.zst"
  (cd "$tmp" && sha256sum k3s k3s-airgap-images-amd64.tar.zst >sha256sum-amd64.txt)
  mkdir -p "$(dirname "$dir")"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
fi
echo "mirror=$dir"
