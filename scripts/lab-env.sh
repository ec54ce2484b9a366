# Sourced by scripts/lab.sh and scripts/bench-lab.sh (from the repository's
# top): checks root, installs packages, builds homelab (release) and the lab's
# inputs, cached under $HOMELAB_CACHE. Sets `bin` (the homelab binary), `deb`
# (the installer's kernel package), `image` (the lab's OS image) and
# `k3s_args`: the k3s stand-in's release mirror (tests/k3s-standin), since real
# k3s cannot be downloaded everywhere; HOMELAB_K3S=release leaves it out so the
# controller fetches the real release (needs internet).
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
k3s_args=()
if [ "${HOMELAB_K3S:-standin}" != release ]; then
  k3s_args=(--k3s-mirror "$(bash scripts/k3s-standin.sh | sed -n 's/^mirror=//p')")
fi
