#!/usr/bin/env bash
# The virtual lab: QEMU machines with empty disks PXE-boot from homelab in a
# network namespace, install Debian, come up reachable over SSH and join a k3s
# cluster, exactly as real machines would. Installs its packages, builds homelab and the lab's
# OS image (cached outside the repo), then runs `homelab lab up`.
#
#   sudo bash scripts/lab.sh                      # 2 VMs, one BIOS, one UEFI
#   sudo bash scripts/lab.sh --nodes 3 --firmware uefi
#   sudo target/x86_64-unknown-linux-gnu/release/homelab lab down
#
# Options are passed to `homelab lab up`; the lab stays until `lab down`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "the lab needs root (network namespaces, tap devices): run it with sudo" >&2
  exit 1
fi
bash scripts/deps.sh
cargo build --release --locked --bin homelab
bin=$PWD/target/x86_64-unknown-linux-gnu/release/homelab

export HOMELAB_CACHE="${HOMELAB_CACHE:-$HOME/.cache/homelab}"
deb=$(bash scripts/lab-assets.sh | sed -n 's/^deb=//p')
image=$(bash scripts/lab-image.sh | sed -n 's/^image=//p')
# k3s: the stand-in release (tests/k3s-standin), since real k3s cannot be
# downloaded everywhere; HOMELAB_K3S=release uses the real one (internet).
k3s=()
if [ "${HOMELAB_K3S:-standin}" != release ]; then
  k3s=(--k3s-mirror "$(bash scripts/k3s-standin.sh | sed -n 's/^mirror=//p')")
fi

exec "$bin" lab up --image "$image" --installer-kernel "$deb" "${k3s[@]}" "$@"
