//! `homelab plan` on a generated 1000-node inventory. Goal: under 100 ms.
//!
//! Prints: parse + validate + plan in-process (median of many runs), and the
//! whole `homelab plan` command through the built binary (process start,
//! reading the file and the state database, printing), median of 15 runs.
//! Run with `cargo bench --bench plan`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn inventory_text(nodes: usize) -> String {
    let mut s = String::from(
        "[controller]\ninterface = \"eth0\"\naddress = \"10.0.0.1\"\ndhcp = \"authoritative\"\n\
         subnet = \"10.0.0.0/16\"\ngateway = \"10.0.0.1\"\ndns = [\"10.0.0.1\"]\npool = \"10.0.200.1-10.0.220.254\"\n\n\
         [cluster]\nname = \"bench\"\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [os]\nimage = \"https://example.invalid/debian.raw.xz\"\nsha256 = \"",
    );
    s.push_str(&"ab".repeat(32));
    s.push_str("\"\n\n");
    for i in 0..nodes {
        let role = if i < 3 { "server" } else { "agent" };
        let _ = write!(
            s,
            "[nodes.n{i:04}]\nmac = \"52:54:00:{:02x}:{:02x}:{:02x}\"\nip = \"10.0.{}.{}\"\nrole = \"{role}\"\n\n",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff,
            1 + i / 250,
            1 + i % 250,
        );
    }
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let nodes = 1000;
    let text = inventory_text(nodes);
    let dir = tempfile::tempdir().expect("tempdir");
    let inv_path = dir.path().join("inventory.toml");
    std::fs::write(&inv_path, &text).expect("write inventory");

    // In-process: parse + validate + plan against an empty memory.
    let mut times = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let loaded = homelab::inventory::parse_str(&text, &inv_path).expect("valid inventory");
        let p = homelab::plan::plan(&loaded.inventory, &[]);
        assert_eq!(p.actions.len(), nodes);
        times.push(t.elapsed());
    }
    let in_process = median(times);

    // The command, end to end.
    let exe = Path::new(env!("CARGO_BIN_EXE_homelab"));
    let state = dir.path().join("state");
    let mut times = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let out = Command::new(exe)
            .arg("plan")
            .arg("-i")
            .arg(&inv_path)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .expect("run homelab plan");
        times.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let command = median(times);

    let goal = Duration::from_millis(100);
    let verdict = |d: Duration| if d < goal { "meets" } else { "MISSES" };
    println!(
        "homelab plan, {nodes}-node inventory ({} KiB):",
        text.len() / 1024
    );
    println!(
        "  parse + validate + plan (in-process, median of 30): {:>8.2} ms  ({} the 100 ms goal)",
        in_process.as_secs_f64() * 1e3,
        verdict(in_process)
    );
    println!(
        "  `homelab plan` command  (process, median of 15):    {:>8.2} ms  ({} the 100 ms goal)",
        command.as_secs_f64() * 1e3,
        verdict(command)
    );
}
