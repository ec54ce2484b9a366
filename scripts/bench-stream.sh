#!/usr/bin/env bash
# OS image streaming throughput, homelab's image endpoint vs nginx, and daemon memory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo bench --bench stream
