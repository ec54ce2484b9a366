#!/usr/bin/env bash
# Build (once) and print the boot assets the lab tests PXE-boot: a Debian kernel
# from the linux-image package and a tiny busybox initramfs that brings up the
# NIC with udhcpc, phones home over HTTP and powers off.
#
# Output on stdout, one `key=value` per line:
#   kernel=<path to vmlinuz>
#   initrd=<path to initrd.gz>
#   version=<kernel release>
#   deb=<path to the linux-image .deb it came from (kept in the cache)>
#
# Cached outside the repo in ${HOMELAB_CACHE:-$HOME/.cache/homelab}/lab-assets,
# keyed by the kernel package and this script's own hash, so a change to the
# init script rebuilds. Idempotent and safe to run concurrently (flock). A cache
# miss costs a download of the kernel package (~70 MB), never correctness.
#
# Optional: HOMELAB_KERNEL_DEB=/path/to/linux-image-*.deb uses that package
# instead of asking apt (air-gapped machines).
#
# The initramfs's /init reads from the kernel command line:
#   homelab.phone=<url>   phone-home URL; the guest GETs <url>?mac=<mac>&ip=<ip>
# and prints on the console (ttyS0 when console=ttyS0 is given):
#   HOMELAB-INIT start                when /init starts (the initramfs booted)
#   HOMELAB-DHCP ok ip=<ip> mac=<mac> when udhcpc got a lease
#   HOMELAB-PHONE-HOME ok mac=<mac>   after the phone-home request succeeded
#   HOMELAB-PHONE-HOME failed ...     when anything failed; then it powers off
set -euo pipefail

# NIC drivers put in the initramfs (with their dependencies, resolved from the
# modules' own `depends=`): virtio-net-pci and e1000 are what the lab's VMs use.
MODULES=(virtio_pci virtio_net e1000)

cache_root="${HOMELAB_CACHE:-$HOME/.cache/homelab}/lab-assets"
mkdir -p "$cache_root"
self_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"

log() { echo "lab-assets: $*" >&2; }
die() { echo "lab-assets: error: $*" >&2; exit 1; }

# Which kernel package: a given .deb, else what linux-image-amd64 depends on.
if [ -n "${HOMELAB_KERNEL_DEB:-}" ]; then
  [ -f "$HOMELAB_KERNEL_DEB" ] || die "HOMELAB_KERNEL_DEB=$HOMELAB_KERNEL_DEB does not exist"
  pkg="$(basename "$HOMELAB_KERNEL_DEB" .deb)"
else
  pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')" || true
  if [ -z "$pkg" ]; then
    # apt has no package lists (offline box): reuse the newest complete build.
    newest="$(ls -1dt "$cache_root"/*/initrd.gz 2>/dev/null | head -n1 || true)"
    if [ -n "$newest" ]; then
      dir="$(dirname "$newest")"
      echo "kernel=$(ls "$dir"/vmlinuz-* | head -n1)"
      echo "initrd=$dir/initrd.gz"
      echo "version=$(cat "$dir/version")"
      echo "deb=$(cat "$dir/deb")"
      exit 0
    fi
    die "cannot resolve linux-image-amd64 (run apt-get update, or set HOMELAB_KERNEL_DEB)"
  fi
fi

out="$cache_root/$pkg-$self_hash"

print_result() {
  echo "kernel=$(ls "$out"/vmlinuz-* | head -n1)"
  echo "initrd=$out/initrd.gz"
  echo "version=$(cat "$out/version")"
  echo "deb=$(cat "$out/deb")"
}

if [ -f "$out/done" ]; then
  print_result
  exit 0
fi

exec 9>"$cache_root/.lock"
flock -w 900 9 || die "timed out waiting for another lab-assets build"
if [ -f "$out/done" ]; then # built by whoever held the lock
  print_result
  exit 0
fi

command -v busybox >/dev/null || die "busybox missing (apt-get install busybox-static)"
bb="$(command -v busybox)"
if ldd "$bb" >/dev/null 2>&1; then
  die "$bb is dynamically linked; the initramfs needs busybox-static"
fi
command -v cpio >/dev/null || die "cpio missing (apt-get install cpio)"

work="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [ -n "${HOMELAB_KERNEL_DEB:-}" ]; then
  deb="$(realpath "$HOMELAB_KERNEL_DEB")"
else
  # The package itself is kept: the installer tests build homelab's
  # installer environment from it, as the controller does.
  debs="$cache_root/debs"
  mkdir -p "$debs"
  deb="$(ls "$debs/$pkg"_*.deb 2>/dev/null | head -n1 || true)"
  if [ -z "$deb" ]; then
    log "downloading $pkg (cache miss)"
    (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) ||
      die "apt-get download $pkg failed"
    mv "$work"/linux-image-*.deb "$debs/"
    deb="$(ls "$debs/$pkg"_*.deb | head -n1)"
  fi
  for old in "$debs"/linux-image-*.deb; do
    [ "$old" = "$deb" ] || rm -f "$old"
  done
fi
dpkg-deb -x "$deb" "$work/deb"
vmlinuz="$(ls "$work"/deb/boot/vmlinuz-* | head -n1)"
[ -f "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
version="${vmlinuz##*/vmlinuz-}"
moddir="$work/deb/lib/modules/$version"
[ -d "$moddir" ] || die "no lib/modules/$version in $deb"

# --- initramfs tree ---------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,lib/modules,usr/share/udhcpc}
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
# The kernel opens /dev/console before running /init. Without the node (not
# root, no CAP_MKNOD) /init still works: it redirects to the devtmpfs console.
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true

# Modules: resolve dependencies from each .ko's modinfo `depends=` (no kmod
# needed), load order = dependencies first.
declare -A seen=()
order=()
find_ko() {
  local name="$1" f
  f="$(find "$moddir" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) -print -quit)"
  if [ -z "$f" ]; then
    f="$(find "$moddir" \( -name "$name.ko.*" -o -name "${name//_/-}.ko.*" \) -print -quit)"
  fi
  echo "$f"
}
add_module() {
  local name="$1" ko deps dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  if grep -qE "/${name}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
    return 0 # built into the kernel
  fi
  ko="$(find_ko "$name")"
  [ -n "$ko" ] || die "module $name not found in $pkg"
  case "$ko" in
    *.ko) ;;
    *.ko.xz) xz -dc "$ko" >"$work/$name.ko" && ko="$work/$name.ko" ;;
    *.ko.zst) zstd -qdc "$ko" >"$work/$name.ko" && ko="$work/$name.ko" ;;
    *.ko.gz) gzip -dc "$ko" >"$work/$name.ko" && ko="$work/$name.ko" ;;
    *) die "unknown module compression: $ko" ;;
  esac
  # modinfo's `depends=` string, read without kmod or binutils.
  deps="$(grep -a -o 'depends=[a-z0-9_,-]*' "$ko" | head -n1 | cut -d= -f2)" || true
  for dep in ${deps//,/ }; do
    add_module "$dep"
  done
  cp "$ko" "$root/lib/modules/$name.ko"
  order+=("$name")
}
for m in "${MODULES[@]}"; do
  add_module "$m"
done
printf '%s\n' "${order[@]}" >"$root/etc/modules"

cat >"$root/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configure the interface from the lease.
case "$1" in
  deconfig) ifconfig "$interface" 0.0.0.0 ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}"
    if [ -n "$router" ]; then
      for r in $router; do route add default gw "$r" dev "$interface" 2>/dev/null; break; done
    fi
    echo "$ip" >/run/ip
    ;;
esac
exit 0
EOF
chmod 755 "$root/usr/share/udhcpc/default.script"

cat >"$root/init" <<'EOF'
#!/bin/sh
# homelab lab initramfs: network up, phone home, power off. Every wait is bounded.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "HOMELAB-INIT start"
fail() {
  echo "HOMELAB-PHONE-HOME failed: $*"
  sync
  poweroff -f
  sleep 5
  exit 1
}
for m in $(cat /etc/modules); do
  insmod "/lib/modules/$m.ko" || echo "homelab-init: insmod $m failed"
done
ip link set lo up
phone=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    homelab.phone=*) phone="${arg#homelab.phone=}" ;;
  esac
done
iface=""
i=0
while [ -z "$iface" ] && [ $i -lt 100 ]; do
  for d in /sys/class/net/*; do
    n="${d##*/}"
    [ "$n" = lo ] && continue
    [ -e "$d/device" ] || continue
    iface="$n"
    break
  done
  [ -n "$iface" ] || sleep 0.1
  i=$((i + 1))
done
[ -n "$iface" ] || fail "no network interface appeared"
mac="$(cat "/sys/class/net/$iface/address")"
ip link set "$iface" up
udhcpc -i "$iface" -f -q -n -t 10 -T 2 -A 1 -s /usr/share/udhcpc/default.script \
  || fail "no DHCP lease on $iface mac=$mac"
addr="$(cat /run/ip 2>/dev/null)"
echo "HOMELAB-DHCP ok ip=$addr mac=$mac"
if [ -z "$phone" ]; then
  fail "no homelab.phone= on the kernel command line mac=$mac"
fi
ok=""
i=0
while [ -z "$ok" ] && [ $i -lt 10 ]; do
  # Bounded with timeout(1): Debian 12's busybox-static wget segfaults on -T.
  if timeout 10 wget -q -O /tmp/reply "$phone?mac=$mac&ip=$addr"; then ok=1; else sleep 1; fi
  i=$((i + 1))
done
[ -n "$ok" ] || fail "GET $phone failed mac=$mac"
echo "HOMELAB-PHONE-HOME ok mac=$mac ip=$addr reply=$(head -c 64 /tmp/reply)"
sync
poweroff -f
EOF
chmod 755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z |
  cpio --null -o -H newc --quiet --owner=0:0) | gzip -9n >"$work/initrd.gz"

stage="$work/out"
mkdir -p "$stage"
cp "$vmlinuz" "$stage/"
cp "$work/initrd.gz" "$stage/initrd.gz"
echo "$version" >"$stage/version"
echo "$deb" >"$stage/deb"
printf '%s\n' "${order[@]}" >"$stage/modules"
touch "$stage/done"
rm -rf "$out"
mv "$stage" "$out"
# Builds of the same kernel by older versions of this script are obsolete.
for old in "$cache_root/$pkg"-*; do
  [ "$old" = "$out" ] || rm -rf "$old"
done
log "built $out (kernel $version, modules: ${order[*]})"
print_result
