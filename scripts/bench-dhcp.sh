#!/usr/bin/env bash
# DHCP benchmark: perfdhcp (Debian package kea-admin) against homelab in
# authoritative mode, ISC Kea (kea-dhcp4, memfile lease file) and dnsmasq
# with the same pool, at each offered rate, printed side by side: completed
# DORA exchanges per second, drops, the worst delay perfdhcp saw, and the
# daemon's resident memory (VmRSS) idle and under load.
#
#   sudo scripts/bench-dhcp.sh
#
# Settings (environment):
#   RATES="1000 4000 8000"   offered DORA exchanges per second, one run each
#   SERVERS="homelab kea dnsmasq"   which servers to run, in this order
#   DURATION=10         seconds per run
#   CLIENTS=1000        distinct client MACs perfdhcp cycles through (-R)
#   POOL=10.231.1.0-10.231.16.255   the dynamic pool both servers hand out
#                       (inside 10.231.0.0/16; more addresses than CLIENTS)
#   HOMELAB_BIN=target/x86_64-unknown-linux-gnu/release/homelab   (built with cargo if missing)
#   KEEP=1              keep the work dir (logs, state, inventory) afterwards
#
# Everything happens in two network namespaces created here and removed on
# every exit: hl-bench-<pid>-s holds the server (hb-s, 10.231.0.1/16) and
# hl-bench-<pid>-c holds perfdhcp (hb-c, 10.231.0.2/16), joined by a veth
# pair. perfdhcp acts as a relay agent (giaddr 10.231.0.2), its usual mode, so
# every server answers through it. Each run starts its server afresh (empty
# lease database). dnsmasq runs with --no-ping (homelab does not ping offered
# addresses either) and a lease limit above the pool size. Kea runs with its
# memfile backend (a CSV lease file appended to, its default), lease-file
# cleanup off, logging warnings only; its config is written here.
#
# Durability differs: homelab commits every lease to SQLite with
# synchronous = FULL (fsync) before the ACK leaves, the leases of the packets
# in flight in one commit; Kea's memfile appends each lease to its CSV file
# before answering; dnsmasq rewrites its lease file.
#
# What to expect: dnsmasq's cost per exchange grows with the leases it holds
# (it rewrites its lease file on every change); measured here it completes
# about 1000/s with CLIENTS=500 and far fewer with CLIENTS=1000. homelab
# writes one lease row per new lease (one commit for all the packets in
# flight), and none for a client asking again within a quarter of its lease
# time (lease caching, like Kea's cache-threshold). The machine's other load
# shows in every column.
set -euo pipefail

RATES=${RATES:-"1000 4000 8000"}
SERVERS=${SERVERS:-"homelab kea dnsmasq"}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-1000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${HOMELAB_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/release/homelab}

die() { echo "bench-dhcp: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, port 67); run it with sudo"
needs="ip perfdhcp"
case " $SERVERS " in *" kea "*) needs="$needs kea-dhcp4" ;; esac
case " $SERVERS " in *" dnsmasq "*) needs="$needs dnsmasq" ;; esac
for p in $needs; do
    command -v "$p" >/dev/null || die "\`$p\` is not installed (apt-get install iproute2 kea-admin kea-dhcp4-server dnsmasq-base)"
done
if [ ! -x "$BIN" ]; then
    echo "building $BIN ..." >&2
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
fi

NS_S="hl-bench-$$-s"
NS_C="hl-bench-$$-c"
WORK=$(mktemp -d /tmp/hl-bench-dhcp.XXXXXX)
SERVER_PID=""
SAMPLER_PID=""

cleanup() {
    set +e
    [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    ip netns del "$NS_C" 2>/dev/null
    ip netns del "$NS_S" 2>/dev/null
    if [ "${KEEP:-}" = 1 ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS_S"
ip netns add "$NS_C"
ip -n "$NS_S" link add hb-s type veth peer name hb-c netns "$NS_C"
ip -n "$NS_S" addr add 10.231.0.1/16 dev hb-s
ip -n "$NS_C" addr add 10.231.0.2/16 dev hb-c
for dev in hb-s lo; do ip -n "$NS_S" link set "$dev" up; done
for dev in hb-c lo; do ip -n "$NS_C" link set "$dev" up; done

POOL=${POOL:-10.231.1.0-10.231.16.255}
POOL_FIRST=${POOL%-*}
POOL_LAST=${POOL#*-}

cat > "$WORK/inventory.toml" <<EOF
[controller]
interface = "hb-s"
address = "10.231.0.1"
dhcp = "authoritative"
subnet = "10.231.0.0/16"
pool = "$POOL_FIRST-$POOL_LAST"
lease_time = 3600
http_port = 8080
tftp = false

[cluster]
k3s_version = "v1.31.4+k3s1"

[os]
image = "https://example.invalid/bench.raw"
sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"   # any real digest: the benchmark installs nothing

[nodes.bench1]
mac = "02:00:00:00:00:01"
ip = "10.231.0.11"
role = "server"
EOF

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# Wait until something in the server namespace listens on UDP 67.
wait_listening() {
    for _ in $(seq 100); do
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        ip netns exec "$NS_S" ss -Huln 'sport = :67' | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

start_homelab() {
    local dir="$WORK/$1"
    mkdir -p "$dir"
    ip netns exec "$NS_S" "$BIN" serve -i "$WORK/inventory.toml" --state-dir "$dir/state" \
        >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
}

start_dnsmasq() {
    local dir="$WORK/$1"
    mkdir -p "$dir"
    ip netns exec "$NS_S" dnsmasq --no-daemon --conf-file=/dev/null --port=0 --interface=hb-s \
        --user=root --pid-file= --no-ping --dhcp-authoritative --dhcp-lease-max=200000 \
        --dhcp-range="$POOL_FIRST,$POOL_LAST,255.255.0.0,1h" --dhcp-leasefile="$dir/leases" \
        --quiet-dhcp --log-facility="$dir/dnsmasq.log" >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
}

start_kea() {
    local dir="$WORK/$1"
    mkdir -p "$dir"
    cat > "$dir/kea-dhcp4.conf" <<EOF
{ "Dhcp4": {
    "interfaces-config": { "interfaces": [ "hb-s" ] },
    "lease-database": { "type": "memfile", "persist": true, "name": "$dir/leases.csv", "lfc-interval": 0 },
    "valid-lifetime": 3600,
    "authoritative": true,
    "subnet4": [ { "id": 1, "subnet": "10.231.0.0/16",
                   "pools": [ { "pool": "$POOL_FIRST - $POOL_LAST" } ] } ],
    "loggers": [ { "name": "kea-dhcp4", "severity": "WARN",
                   "output_options": [ { "output": "$dir/kea.log" } ] } ]
} }
EOF
    KEA_PIDFILE_DIR="$dir" KEA_LOCKFILE_DIR="$dir" \
        ip netns exec "$NS_S" kea-dhcp4 -c "$dir/kea-dhcp4.conf" >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# One run: prints "completed/s drops% max_delay_ms rss_idle_kb rss_peak_kb".
run() {
    local server=$1 rate=$2 tag="$1-$2"
    "start_$server" "$tag"
    wait_listening || { cat "$WORK/$tag/server.log" >&2; die "$server did not start"; }
    sleep 1
    local idle peak
    idle=$(rss_kb "$SERVER_PID")
    (while kill -0 "$SERVER_PID" 2>/dev/null; do rss_kb "$SERVER_PID"; sleep 0.2; done) >"$WORK/$tag/rss" &
    SAMPLER_PID=$!
    # perfdhcp writes its lease/log files to the current directory.
    (cd "$WORK/$tag" && ip netns exec "$NS_C" perfdhcp -4 -l hb-c -r "$rate" -p "$DURATION" -R "$CLIENTS" \
        >perfdhcp.out 2>&1) || true
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
    peak=$(sort -n "$WORK/$tag/rss" | tail -1)
    stop_server
    awk -v idle="$idle" -v peak="${peak:-0}" '
        /^Rate:/ { rate = $2 }
        /^sent packets:/ { sent[++s] = $3 }
        /^received packets:/ { recv[++r] = $3 }
        /^max delay:/ { if ($3 + 0 > maxd) maxd = $3 + 0 }
        END {
            if (sent[1] > 0) drops = 100 * (sent[1] - recv[2]) / sent[1]; else drops = 100
            printf "%.1f %.2f %.1f %d %d\n", rate, drops, maxd, idle, peak
        }' "$WORK/$tag/perfdhcp.out"
}

mb() { awk -v kb="$1" 'BEGIN { printf "%.1f MB", kb / 1024 }'; }

echo "perfdhcp: ${DURATION}s per run, $CLIENTS clients, pool $POOL_FIRST-$POOL_LAST; homelab: $BIN"
printf '%-9s %10s %13s %14s %10s %10s %10s\n' server "offered/s" "completed/s" "not completed" "max delay" "RSS idle" "RSS load"
for rate in $RATES; do
    for server in $SERVERS; do
        read -r done drops maxd idle peak < <(run "$server" "$rate")
        printf '%-9s %10s %13s %13s%% %7s ms %10s %10s\n' "$server" "$rate" "$done" "$drops" "$maxd" "$(mb "$idle")" "$(mb "$peak")"
    done
done
echo "(completed/s: perfdhcp's 4-way exchange rate; not completed: DISCOVERs sent without an ACK back;"
echo " max delay: the slowest DISCOVER-OFFER or REQUEST-ACK perfdhcp saw)"
