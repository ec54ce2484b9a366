# Daily recipes. `just --list` shows them.

# The virtual lab: QEMU machines install Debian from homelab in a network namespace (root).
lab *args:
    bash scripts/lab.sh {{args}}

# Remove the lab.
lab-down:
    target/x86_64-unknown-linux-gnu/release/homelab lab down

# The whole test suite (lab tests need root).
test:
    bash scripts/test.sh

# Fast checks while editing.
check:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    cargo test --lib

# Install the system packages the lab and tests need.
deps:
    bash scripts/deps.sh

# Benchmarks: plan on 1000 nodes, DHCP vs dnsmasq, PXE boot vs dnsmasq+nginx,
# OS image streaming vs nginx, lab wall time.
bench:
    cargo bench --bench plan
    bash scripts/bench-dhcp.sh
    bash scripts/bench-pxe.sh
    bash scripts/bench-stream.sh
    bash scripts/bench-lab.sh

# The release binary: static-pie (see .cargo/config.toml), at
# target/x86_64-unknown-linux-gnu/release/homelab.
release:
    cargo build --release

# Fuzz one target (dhcp_handler, tftp_request, agent_report, phone_home,
# http_path, inventory; see fuzz/src/lib.rs) for `runs` executions, from the
# committed seeds. New inputs go to fuzz/target/corpus/, crashes to
# fuzz/artifacts/. Needs `cargo install cargo-fuzz`; RUSTC_BOOTSTRAP lets the
# stable toolchain take its flags.
fuzz target="dhcp_handler" runs="10000000":
    mkdir -p fuzz/target/corpus/{{target}}
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {{target}} --sanitizer none target/corpus/{{target}} corpus/{{target}} -- -runs={{runs}}
