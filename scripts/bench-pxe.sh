#!/usr/bin/env bash
# PXE power-on to booted initramfs, homelab vs dnsmasq+nginx, and daemon memory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo bench --bench pxe
