#!/usr/bin/env bash
# The whole test suite: unit, integration, and the lab tests that boot real
# PXE firmware under QEMU in network namespaces (these need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
if [ "$(id -u)" -eq 0 ]; then
  # As root every lab test must run: a missing prerequisite fails instead of skipping.
  export HOMELAB_REQUIRE_LAB=1
else
  echo "not root: the lab tests (namespaces, QEMU) will be skipped" >&2
fi
# Lab boot assets are cached outside the repo; a miss only costs time.
export HOMELAB_CACHE="${HOMELAB_CACHE:-$HOME/.cache/homelab}"
# The fuzz targets build with the stable toolchain (their bodies run in the
# tests, tests/fuzz_corpus.rs). In the main target dir, so the dependencies
# are shared with the tests; RUSTC_BOOTSTRAP=1 as for `cargo fuzz` (see the
# justfile).
RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=target cargo build --locked --manifest-path fuzz/Cargo.toml --bins
cargo test --locked -- --test-threads="${HOMELAB_TEST_THREADS:-2}"
