#!/usr/bin/env bash
# The system packages homelab's lab and tests use (Debian/Ubuntu, apt).
#
# Each need is what actually runs (a command, or a file such as OVMF's
# firmware) and the package that provides it. As root, what is missing is
# installed; afterwards every need is checked again, because apt can take one
# away while installing another (a backported qemu-utils is removed by
# Debian's qemu-system-x86), and what apt took is installed again. It fails
# naming the exact piece still missing. Not as root, it names what is missing
# and the command that installs it.
#
#   bash scripts/deps.sh          # install what is missing, then verify
#   bash scripts/deps.sh --check  # verify only; exit 1 naming what is missing
set -euo pipefail

# command-or-/path   package   (why)
needs=(
  "qemu-system-x86_64 qemu-system-x86"   # virtual machines with real PXE firmware
  "qemu-img qemu-utils"                  # lab disks, qcow2 images
  "/usr/share/seabios/bios-256k.bin seabios" # BIOS firmware
  "/usr/lib/ipxe/qemu/efi-virtio.rom ipxe-qemu" # the NIC's iPXE ROM
  "/usr/share/OVMF/OVMF_CODE_4M.fd ovmf" # UEFI firmware
  "/usr/share/OVMF/OVMF_VARS_4M.fd ovmf"
  "/usr/lib/ipxe/undionly.kpxe ipxe"     # the iPXE binaries the controller serves
  "/usr/lib/ipxe/ipxe.efi ipxe"
  "busybox busybox-static"               # the test boot initramfs
  "cpio cpio"
  "zstd zstd"
  "xz xz-utils"
  "gzip gzip"
  "dpkg-deb dpkg"
  "ip iproute2"                          # network namespaces, bridges, taps
  "sfdisk fdisk"                         # the installer's partition-table tests check its work
  "dhclient isc-dhcp-client"             # a real DHCP client against authoritative mode
  "tftp tftp-hpa"                        # a real TFTP client
  "dnsmasq dnsmasq-base"                 # the peer the benchmarks compare against, the "home router"
  "nginx nginx-light"
  "perfdhcp kea-admin"                   # the DHCP benchmark
  "kea-dhcp4 kea-dhcp4-server"           # the DHCP server the benchmark compares against
  "mmdebstrap mmdebstrap"                # the lab's OS image (scripts/lab-image.sh)
  "mke2fs e2fsprogs"
  "debugfs e2fsprogs"
  "mkfs.vfat dosfstools"                 # its EFI system partition, written without mounting
  "mcopy mtools"
  "/usr/lib/grub/i386-pc/boot.img grub-pc-bin"         # its BIOS boot loader (grub-mkimage)
  "/usr/lib/grub/x86_64-efi/modinfo.sh grub-efi-amd64-bin" # its UEFI boot loader
  "grub-mkimage grub-common"
  "sshd openssh-server"                  # a real sshd for the SSH client's tests
  "ssh openssh-client"
  "ssh-keygen openssh-client"
  "python3 python3"                      # runs the stand-in k3s
  "curl curl"
  "/etc/ssl/certs/ca-certificates.crt ca-certificates"
)

have() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ;;
  esac
}

# The needs not met now, as "what package" lines.
unmet() {
  local n
  for n in "${needs[@]}"; do
    set -- $n
    have "$1" || echo "$1 $2"
  done
}

packages_of() { awk '{print $2}' | sort -u | tr '\n' ' '; }

# apt's install line for these packages. QEMU's parts must be one release:
# a qemu-utils from elsewhere (a backport) Breaks Debian's qemu-system-common,
# so apt would remove it; ask for the qemu-utils of qemu-system-x86's release.
install_line() {
  local want=("$@") extra=() qver
  if printf '%s\n' "${want[@]}" | grep -qx 'qemu-system-x86\|qemu-utils'; then
    qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    if [ -n "$qver" ] && [ "$qver" != "(none)" ]; then
      want=($(printf '%s\n' "${want[@]}" | grep -vx 'qemu-system-x86\|qemu-utils'))
      extra=(--allow-downgrades "qemu-system-x86=$qver" "qemu-utils=$qver")
    fi
  fi
  echo "${want[@]}" "${extra[@]}"
}

check_only=0
[ "${1:-}" = "--check" ] && check_only=1

missing=$(unmet)
if [ -z "$missing" ]; then
  exit 0
fi
if [ "$check_only" -eq 1 ] || [ "$(id -u)" -ne 0 ]; then
  echo "missing: $(echo "$missing" | awk '{print $1}' | tr '\n' ' ')" >&2
  echo "install them with: sudo apt-get install -y --no-install-recommends $(echo "$missing" | packages_of)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Two rounds: the second puts back whatever the first one's apt took away.
for round in 1 2; do
  pkgs=$(echo "$missing" | packages_of)
  echo "installing: $pkgs" >&2
  # shellcheck disable=SC2046
  apt-get install -y -qq --no-install-recommends $(install_line $pkgs) >/dev/null
  missing=$(unmet)
  [ -z "$missing" ] && exit 0
  echo "after round $round still missing: $(echo "$missing" | awk '{print $1}' | tr '\n' ' ')" >&2
done
echo "error: apt installed the packages but these are still missing:" >&2
echo "$missing" | while read -r what pkg; do echo "  $what (package $pkg)" >&2; done
exit 1
