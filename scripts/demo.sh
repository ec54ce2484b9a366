#!/usr/bin/env bash
# The virtual lab demo: two QEMU machines with empty disks (one BIOS, one
# UEFI) on a private bridge in a network namespace PXE-boot from `homelab up`.
# Each boots its boot profile (a Debian kernel and a small initramfs that
# phones home); `homelab up` draws one live line per node and exits when both
# have booted. Everything it creates is removed on exit.
#
# Needs root (namespaces, taps) and installs its packages itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "the lab needs root (network namespaces, tap devices): run it with sudo" >&2
  exit 1
fi
bash scripts/deps.sh
cargo build --release --locked --bin homelab
bin=$PWD/target/x86_64-unknown-linux-gnu/release/homelab

eval "$(bash scripts/lab-assets.sh | sed 's/^/asset_/')"
ns=hl-demo-$$
work=$(mktemp -d /tmp/homelab-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# A private network that exists only inside the namespace.
ctrl=10.213.0.1
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add "$ctrl/24" dev br0
ip -n "$ns" link set br0 up

macs=(52:54:00:de:00:01 52:54:00:de:00:02)
firmware=(bios uefi)
cat > "$work/inventory.toml" <<INV
[controller]
interface = "br0"
address = "$ctrl"
dhcp = "authoritative"
subnet = "10.213.0.0/24"
gateway = "$ctrl"
pool = "10.213.0.100-10.213.0.150"

[cluster]
name = "demo"
k3s_version = "v1.31.4+k3s1"
INV
for i in 0 1; do
  cat >> "$work/inventory.toml" <<INV

[nodes.node$((i + 1))]
mac = "${macs[$i]}"
ip = "10.213.0.$((11 + i))"
role = "$([ "$i" -eq 0 ] && echo server || echo agent)"
boot = { kernel = "$asset_kernel", initrd = ["$asset_initrd"], cmdline = "console=ttyS0 quiet homelab.phone=http://$ctrl:8080/phone-home/${macs[$i]}" }
INV
done

echo "inventory: $work/inventory.toml"
"$bin" plan -i "$work/inventory.toml" --state-dir "$work/state" >/dev/null

# The machines: empty disks, network boot first. Their consoles go to files.
for i in 0 1; do
  tap=tap$i
  ip -n "$ns" tuntap add dev "$tap" mode tap
  ip -n "$ns" link set "$tap" master br0 up
  qemu-img create -q -f qcow2 "$work/disk$i.qcow2" 8G
  fw=()
  if [ "${firmware[$i]}" = uefi ]; then
    cp /usr/share/OVMF/OVMF_VARS_4M.fd "$work/vars$i.fd"
    fw=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        -drive "if=pflash,format=raw,unit=1,file=$work/vars$i.fd")
  fi
  ip netns exec "$ns" qemu-system-x86_64 -accel tcg -m 512 -display none -no-reboot \
    "${fw[@]}" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" \
    -device "virtio-net-pci,netdev=n0,mac=${macs[$i]},bootindex=1" \
    -drive "file=$work/disk$i.qcow2,if=virtio,format=qcow2" \
    -serial "file:$work/console$i.log" >"$work/qemu$i.log" 2>&1 &
  pids+=($!)
  echo "node$((i + 1)): ${firmware[$i]} machine ${macs[$i]}, console in $work/console$i.log"
done

ip netns exec "$ns" "$bin" up -i "$work/inventory.toml" --state-dir "$work/state" --timeout 300
"$bin" status -i "$work/inventory.toml" --state-dir "$work/state"
