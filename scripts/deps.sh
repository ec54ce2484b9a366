#!/usr/bin/env bash
# Install the system packages homelab's lab and tests use (Debian/Ubuntu, apt).
# As root it installs what is missing; otherwise it names what is missing and
# the command that installs it.
set -euo pipefail

packages=(
  qemu-system-x86 qemu-utils ipxe-qemu ovmf   # virtual machines with real PXE firmware (SeaBIOS and UEFI)
  ipxe                             # the iPXE binaries the controller serves
  busybox-static cpio zstd xz-utils # the test boot initramfs
  iproute2                         # network namespaces, bridges, taps
  fdisk                            # sfdisk: the installer's partition-table tests check its work
  isc-dhcp-client                  # a real DHCP client against authoritative mode
  tftp-hpa                         # a real TFTP client
  dnsmasq-base nginx-light         # the peer the benchmarks compare against, the "home router" DHCP
  kea-admin                        # perfdhcp, for the DHCP benchmark
  mmdebstrap e2fsprogs fdisk       # the lab's OS image (scripts/lab-image.sh), built without loop devices
  dosfstools mtools                # its EFI system partition, written without mounting
  grub-pc-bin grub-efi-amd64-bin   # its BIOS and UEFI boot loaders, made with grub-mkimage
  openssh-server openssh-client    # a real sshd (and ssh-keygen) for the SSH client's tests
  python3                          # runs the stand-in k3s on this machine (tests/k3s_standin.rs)
  curl ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
