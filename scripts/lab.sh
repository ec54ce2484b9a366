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

source scripts/lab-env.sh

exec "$bin" lab up --image "$image" --installer-kernel "$deb" "${k3s_args[@]}" "$@"
