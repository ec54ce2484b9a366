#!/usr/bin/env bash
# Build (once) and print the OS image homelab's installer writes onto the empty
# disks of the lab's virtual machines: Debian 12 (bookworm) with the cloud
# kernel, cloud-init (NoCloud), systemd-networkd and openssh-server, as a raw
# GPT disk image compressed with zstd.
#
# Output on stdout, one `key=value` per line:
#   image=<absolute path of the compressed image>
#   sha256=<sha256 of that compressed file>
#   format=raw.zst
#   size=<bytes of the uncompressed raw image>
#
# Disk layout (GPT, 512-byte sectors):
#   1  BIOS boot   1 MiB   GRUB i386-pc core.img (the MBR holds GRUB's boot.img)
#   2  EFI System  64 MiB  FAT32 with EFI/BOOT/BOOTX64.EFI (GRUB x86_64-efi)
#   3  Linux root  rest    ext4, label `root`; always the LAST partition, so the
#                          installer can grow it to the end of the node's disk
#                          and cloud-init's resize_rootfs grows ext4 on first boot
# Both GRUBs carry an embedded config that finds the filesystem labelled `root`
# and reads its /boot/grub/grub.cfg, so one image boots under BIOS and UEFI.
#
# The image carries no SSH host keys, no machine-id and no hostname: the
# installer writes /etc/ssh/ssh_host_ed25519_key{,.pub} and a NoCloud seed in
# /var/lib/cloud/seed/nocloud/{meta-data,user-data,network-config} into the
# root filesystem; cloud-init keeps that host key (see 90-homelab.cfg below).
#
# Built without loop devices or mounts (partition scanning is not available
# everywhere): mmdebstrap into a directory, `mke2fs -d` and `mkfs.vfat`/mtools
# into partition images, GRUB images from grub-mkimage whose BIOS sector
# pointers are patched here instead of by grub-install, all copied into a plain
# file partitioned by sfdisk. Needs root and the packages in scripts/deps.sh.
#
# Packages come from the bookworm apt sources this machine already uses (its
# mirror or proxy); HOMELAB_LAB_IMAGE_SOURCES=<file> (a sources.list, one-line
# or deb822 format) overrides that, e.g. on a host that is not Debian 12.
#
# Cached outside the repo in ${HOMELAB_CACHE:-$HOME/.cache/homelab}/lab-image,
# keyed by this script's own hash, so a change to the recipe rebuilds; builds of
# other keys are removed after a successful build. Idempotent and safe to run
# concurrently (flock). A cache miss costs a few minutes, never correctness.
set -euo pipefail

SUITE=bookworm
# The cloud kernel: virtio drivers and a small initramfs, right for the lab's
# QEMU machines (real hardware wants linux-image-amd64 instead).
PACKAGES=(
  linux-image-cloud-amd64 initramfs-tools udev kmod
  systemd-sysv dbus systemd-resolved systemd-timesyncd # networkd is part of systemd; hostnamectl needs dbus
  openssh-server cloud-init cloud-guest-utils           # cloud-guest-utils: growpart
  e2fsprogs fdisk iproute2 netbase ca-certificates sudo procps
)
ESP_MIB=64         # big enough for FAT32 (a 32 MiB FAT32 has too few clusters)
HEADROOM_MIB=300   # free space in the image's ext4 on top of what the files use
ZSTD_LEVEL=10      # measured: -3 is 11% bigger, -19 is 11% smaller but ~20x slower to build

# GPT partition type GUIDs.
TYPE_BIOS_BOOT=21686148-6449-6E6F-744E-656564454649
TYPE_ESP=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
TYPE_ROOT_X86_64=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709

# GRUB modules built into the images: enough to find the root filesystem, read
# grub.cfg, talk on the serial port and boot Linux, with no module directory.
GRUB_MODULES_COMMON=(part_gpt ext2 search search_label configfile normal echo test
  linux serial terminal reboot halt ls cat)
GRUB_MODULES_PC=(biosdisk)
GRUB_MODULES_EFI=(fat all_video efi_gop)

cache_root="${HOMELAB_CACHE:-$HOME/.cache/homelab}/lab-image"
mkdir -p "$cache_root"
self_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
out="$cache_root/$SUITE-$self_hash"

log() { echo "lab-image: $*" >&2; }
die() { echo "lab-image: error: $*" >&2; exit 1; }

print_result() {
  cat "$out/result"
}

if [ -f "$out/done" ]; then
  print_result
  exit 0
fi

exec 9>"$cache_root/.lock"
if ! flock -n 9; then
  # A cold build takes a few minutes; a second caller waits for it.
  log "waiting for another lab-image build to finish"
  flock -w 1800 9 || die "timed out waiting for another lab-image build"
fi
if [ -f "$out/done" ]; then # built by whoever held the lock
  print_result
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap chroot, image ownership)"
for tool in mmdebstrap mke2fs mkfs.vfat mmd mcopy sfdisk grub-mkimage zstd; do
  command -v "$tool" >/dev/null ||
    die "$tool missing (run scripts/deps.sh as root: mmdebstrap e2fsprogs dosfstools mtools fdisk grub-pc-bin grub-efi-amd64-bin zstd)"
done
[ -f /usr/lib/grub/i386-pc/boot.img ] || die "GRUB BIOS images missing (apt-get install grub-pc-bin)"
[ -d /usr/lib/grub/x86_64-efi ] || die "GRUB EFI modules missing (apt-get install grub-efi-amd64-bin)"

# Anything left in .build.* is from a killed build; we hold the lock.
rm -rf "$cache_root"/.build.*
work="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# --- apt sources and options: the host's own ---------------------------------
# One "deb URI SUITE main" line per bookworm repository that apt on this host
# knows (apt-cache policy covers sources.list and deb822 files alike), so the
# build uses the same mirror or caching proxy as the host.
sources="$work/sources.list"
if [ -n "${HOMELAB_LAB_IMAGE_SOURCES:-}" ]; then
  [ -f "$HOMELAB_LAB_IMAGE_SOURCES" ] || die "HOMELAB_LAB_IMAGE_SOURCES=$HOMELAB_LAB_IMAGE_SOURCES does not exist"
  cp "$HOMELAB_LAB_IMAGE_SOURCES" "$sources"
else
  apt-cache policy 2>/dev/null | awk -v suite="$SUITE" '
    $1 ~ /^[0-9]+$/ && $2 ~ /:\/\// && $NF == "Packages" { uri = $2; split($3, sc, "/"); next }
    $1 == "release" && uri != "" {
      if ($0 ~ /o=Debian/ && (sc[1] == suite || index(sc[1], suite "-") == 1) && sc[2] == "main")
        print "deb " uri " " sc[1] " main"
      uri = ""
    }' | sort -u >"$sources"
  grep -q " $SUITE main\$" "$sources" ||
    die "apt on this host has no Debian $SUITE main source (run apt-get update, or set HOMELAB_LAB_IMAGE_SOURCES=<sources.list>)"
fi
log "apt sources: $(grep -v '^#' "$sources" | tr '\n' ';')"

# Carry over host apt settings that make the mirror reachable at all (proxy,
# a snapshot mirror's expired Release files). They are removed from the image.
# (The build tree is under root's home, which apt's sandbox user cannot read.)
aptopts=('--aptopt=APT::Sandbox::User "root";')
for opt in Acquire::http::Proxy Acquire::https::Proxy Acquire::Check-Valid-Until Acquire::Check-Date; do
  val="$(apt-config dump 2>/dev/null | awk -v k="$opt" 'tolower($1) == tolower(k) { print $2 }' | tr -d '";')"
  if [ -n "$val" ]; then
    aptopts+=("--aptopt=$opt \"$val\";")
  fi
done

# --- files added to the root filesystem ---------------------------------------
overlay="$work/overlay"
mkdir -p "$overlay"/etc/{cloud/cloud.cfg.d,ssh/sshd_config.d,default} "$overlay/boot/grub"

cat >"$overlay/etc/cloud/cloud.cfg.d/90-homelab.cfg" <<'EOF'
# homelab lab image: the installer writes a NoCloud seed into
# /var/lib/cloud/seed/nocloud and the SSH host key into /etc/ssh.
datasource_list: [ NoCloud, None ]
system_info:
  network:
    renderers: [ 'networkd' ]
# Keep the host key the installer wrote (the controller pins it): cloud-init
# deletes all host keys on first boot by default. Generate an ed25519 key only
# when none is there, so sshd still starts on a node booted without a seed.
ssh_deletekeys: false
ssh_genkeytypes: [ ed25519 ]
# The controller logs in as root with its key (sshd: prohibit-password); by
# default cloud-init prefixes root's keys with a "log in as debian" command.
disable_root: false
# C.UTF-8, already in /etc/default/locale: no locale-gen or update-locale at
# boot (seconds each under emulation, pointless on a server).
locale: C.UTF-8
# GRUB is not installed as a package here; its debconf answers are moot.
grub_dpkg:
  enabled: false
# The node resolves its own name (sudo, kubelet) without DNS.
manage_etc_hosts: true
# Only the modules homelab's seed uses: each one costs seconds of Python under
# emulation, and the stock lists run some twenty (apt, ntp, locale, puppet...).
cloud_init_modules: [ seed_random, growpart, resizefs, set_hostname, update_hostname,
  update_etc_hosts, users_groups, ssh ]
cloud_config_modules: [ runcmd ]
cloud_final_modules: [ scripts_per_once, scripts_user, phone_home, final_message ]
EOF
echo LANG=C.UTF-8 >"$overlay/etc/default/locale"

cat >"$overlay/etc/ssh/sshd_config.d/90-homelab.conf" <<'EOF'
# homelab: keys only. Included before the main sshd_config, so these win.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
EOF

cat >"$overlay/etc/fstab" <<'EOF'
# The ESP is only read by the firmware; it is not mounted.
LABEL=root  /  ext4  defaults,errors=remount-ro  0  1
EOF

echo localhost >"$overlay/etc/hostname"
cat >"$overlay/etc/hosts" <<'EOF'
127.0.0.1 localhost
::1       localhost ip6-localhost ip6-loopback
ff02::1   ip6-allnodes
ff02::2   ip6-allrouters
EOF

# Both GRUBs read this; `$grub_platform` (pc or efi) tells the two apart on
# the console. /vmlinuz and /initrd.img are the symlinks Debian's kernel and
# initramfs packages keep at the root of the filesystem.
cat >"$overlay/boot/grub/grub.cfg" <<'EOF'
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set default=0
echo "homelab-lab-image: GRUB on $grub_platform, root=$root"
menuentry "homelab lab image (Debian 12)" {
  echo "homelab-lab-image: loading Linux"
  linux /vmlinuz root=LABEL=root ro console=tty0 console=ttyS0,115200
  initrd /initrd.img
}
EOF

# The config embedded in both GRUB images.
cat >"$work/early.cfg" <<'EOF'
search --no-floppy --label root --set=root
set prefix=($root)/boot/grub
configfile ($root)/boot/grub/grub.cfg
EOF

# --- root filesystem ----------------------------------------------------------
# Units disabled in the image: homelab upgrades nodes itself, one at a time, so
# apt's timers must not update or hold the dpkg lock behind its back; e2scrub
# only works on LVM, which the image does not use, and costs boot time.
rootfs="$work/rootfs"
log "mmdebstrap $SUITE into $rootfs (cache miss; downloads ~200 MB)"
include="$(IFS=,; echo "${PACKAGES[*]}")"
# The hooks' "$1" (the root directory) is expanded by mmdebstrap's shell.
# shellcheck disable=SC2016
mmdebstrap --variant=apt --components=main --format=directory \
  --include="$include" \
  "${aptopts[@]}" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook="cp -a '$overlay'/. \"\$1\"/" \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service systemd-resolved.service' \
  --customize-hook='chroot "$1" systemctl disable apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_* "$1/etc/apt/apt.conf.d/99mmdebstrap"' \
  --customize-hook='rm -f "$1/var/lib/dbus/machine-id" "$1/var/lib/systemd/random-seed"' \
  --customize-hook=': >"$1/etc/machine-id"' \
  --customize-hook="chroot \"\$1\" dpkg-query -W >'$work/packages.txt'" \
  "$SUITE" "$rootfs" - <"$sources" >&2 ||
  die "mmdebstrap failed (see above)"

# mmdebstrap may put the host's resolv.conf/hostname back during cleanup; the
# image wants its own.
ln -sf ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
echo localhost >"$rootfs/etc/hostname"
for link in vmlinuz initrd.img; do
  [ -e "$rootfs/$link" ] || die "/$link missing in the root filesystem (kernel or initramfs not installed?)"
done
[ ! -e "$rootfs"/etc/ssh/ssh_host_ed25519_key ] || die "SSH host keys left in the image"

# --- partition images -----------------------------------------------------------
MiB=$((1024 * 1024))
used_mib=$(($(du -s -B1M --apparent-size "$rootfs" | cut -f1) * 11 / 10)) # + ext4 metadata
root_mib=$(((used_mib + HEADROOM_MIB + 63) / 64 * 64))
log "root filesystem: ${used_mib} MiB of files, ${root_mib} MiB ext4"
truncate -s $((root_mib * MiB)) "$work/root.img"
mke2fs -q -F -t ext4 -L root -d "$rootfs" "$work/root.img" >&2 || die "mke2fs failed"

grub-mkimage -O x86_64-efi -p /boot/grub -c "$work/early.cfg" -o "$work/BOOTX64.EFI" \
  "${GRUB_MODULES_COMMON[@]}" "${GRUB_MODULES_EFI[@]}" || die "grub-mkimage x86_64-efi failed"
truncate -s $((ESP_MIB * MiB)) "$work/esp.img"
mkfs.vfat -F 32 -n ESP "$work/esp.img" >/dev/null || die "mkfs.vfat failed"
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.img" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

grub-mkimage -O i386-pc -p /boot/grub -c "$work/early.cfg" -o "$work/core.img" \
  "${GRUB_MODULES_COMMON[@]}" "${GRUB_MODULES_PC[@]}" || die "grub-mkimage i386-pc failed"

# --- disk image -----------------------------------------------------------------
# Sectors: 1 MiB alignment; the backup GPT needs 33 sectors at the end.
bios_start=2048 bios_sectors=2048
esp_start=$((bios_start + bios_sectors)) esp_sectors=$((ESP_MIB * 2048))
root_start=$((esp_start + esp_sectors)) root_sectors=$((root_mib * 2048))
total_sectors=$((root_start + root_sectors + 2048))
disk="$work/disk.raw"
truncate -s $((total_sectors * 512)) "$disk"
sfdisk --quiet --no-reread --no-tell-kernel "$disk" >&2 <<EOF || die "sfdisk failed"
label: gpt
unit: sectors
1 : start=$bios_start, size=$bios_sectors, type=$TYPE_BIOS_BOOT, name="bios-boot"
2 : start=$esp_start, size=$esp_sectors, type=$TYPE_ESP, name="esp"
3 : start=$root_start, size=$root_sectors, type=$TYPE_ROOT_X86_64, name="root"
EOF

put() { # put <file> <start sector>
  dd if="$1" of="$disk" bs=512 seek="$2" conv=notrunc,sparse status=none
}
put "$work/esp.img" "$esp_start"
put "$work/root.img" "$root_start"

# BIOS boot, what grub-install would do (grub 2.06 util/setup.c):
# core.img's first sector is diskboot.img; its blocklist (u64 start sector,
# u16 sector count, u16 load segment) at byte 0x1f4 names the rest of core.img.
# boot.img's u64 at 0x5c is the sector of core.img; the two bytes at 0x66 are a
# jump that trusts the BIOS's drive number only for floppies, replaced by NOPs
# as for any hard disk. Only boot.img's first 440 bytes go into the MBR, which
# keeps sfdisk's disk signature and protective partition entry.
core_size=$(stat -c %s "$work/core.img")
core_sectors=$(((core_size + 511) / 512))
[ "$core_sectors" -le "$bios_sectors" ] || die "core.img ($core_size bytes) does not fit in the BIOS boot partition"
le() { # le <value> <bytes>: little-endian bytes as printf escapes
  local v=$1 i out=""
  for ((i = 0; i < $2; i++)); do out+="$(printf '\\x%02x' $((v & 0xff)))"; v=$((v >> 8)); done
  printf '%s' "$out"
}
poke() { # poke <file> <offset> <printf escapes>
  printf '%b' "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
poke "$work/core.img" $((0x1f4)) "$(le $((bios_start + 1)) 8)$(le $((core_sectors - 1)) 2)$(le $((0x820)) 2)"
cp /usr/lib/grub/i386-pc/boot.img "$work/boot.img"
poke "$work/boot.img" $((0x5c)) "$(le "$bios_start" 8)"
poke "$work/boot.img" $((0x66)) '\x90\x90'
put "$work/core.img" "$bios_start"
dd if="$work/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
sfdisk --verify "$disk" >/dev/null 2>&1 || die "the finished disk image has an invalid partition table"

# --- compress and publish -------------------------------------------------------
raw_size=$(stat -c %s "$disk")
log "compressing $((raw_size / MiB)) MiB (zstd -$ZSTD_LEVEL)"
stage="$work/out"
mkdir -p "$stage"
zstd -q -T0 "-$ZSTD_LEVEL" "$disk" -o "$stage/disk.raw.zst" || die "zstd failed"
mv "$work/packages.txt" "$stage/packages.txt"
sha="$(sha256sum "$stage/disk.raw.zst" | cut -d' ' -f1)"
{
  echo "image=$out/disk.raw.zst"
  echo "sha256=$sha"
  echo "format=raw.zst"
  echo "size=$raw_size"
} >"$stage/result"
touch "$stage/done"
rm -rf "$out"
mv "$stage" "$out"
# Images built by other versions of this recipe are obsolete.
for old in "$cache_root"/*; do
  [ "$old" = "$out" ] || rm -rf "$old"
done
log "built $out in $((SECONDS - started)) s ($(stat -c %s "$out/disk.raw.zst") bytes compressed)"
print_result
