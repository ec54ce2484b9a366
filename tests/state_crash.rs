//! A writer killed with SIGKILL mid-transaction leaves a database that opens
//! clean, with every transaction either fully there or not at all.

use std::process::{Command, Stdio};
use std::time::Duration;

use homelab::state::{now_ms, Lease, NodeRecord, Stage, State};

const CHILD_ENV: &str = "HOMELAB_CRASH_WRITER_DIR";

/// Not a test: the body of the child process that the test below kills.
#[test]
#[ignore = "helper process for killed_writer_leaves_a_clean_database"]
fn crash_writer_child_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let st = State::open(std::path::Path::new(&dir)).unwrap();
    println!("ready");
    for i in 0u64.. {
        let name = format!("n{}", i % 500);
        let rec = NodeRecord {
            name: name.clone(),
            mac: format!("52:54:00:00:{:02x}:{:02x}", (i / 256) % 256, i % 256),
            ip: format!("10.0.{}.{}", (i / 250) % 250, i % 250),
            role: "agent".into(),
            stage: Stage::Pending,
            reinstall: false,
            spec_hash: i.to_string(),
            bytes_done: 0,
            bytes_total: 0,
            detail: String::new(),
            stage_since_ms: now_ms(),
            updated_ms: now_ms(),
        };
        st.put_node(&rec, "node.written", &format!("write {i}"))
            .unwrap();
        st.force_stage(&name, Stage::Booting, "booting").unwrap();
        st.set_progress(&name, i, i + 1, "bytes").unwrap();
        let _ = st.delete_lease(&rec.mac);
        st.put_lease(&Lease {
            mac: rec.mac,
            ip: format!("10.1.{}.{}", (i / 250) % 250, i % 250),
            expires_ms: 0,
            is_static: false,
        })
        .unwrap_or(());
    }
}

#[test]
fn killed_writer_leaves_a_clean_database() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut total_writes = 0;
    for round in 0..8u64 {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "crash_writer_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill at a different moment each round.
        std::thread::sleep(Duration::from_millis(300 + round * 97));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();

        let st = State::open(dir.path()).expect("database opens after SIGKILL");
        let check: String = {
            let conn = rusqlite::Connection::open(dir.path().join("homelab.db")).unwrap();
            conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(check, "ok", "round {round}");
        // put_node writes the row and its event in one transaction: every row
        // has its event (rows are rewritten, so events >= distinct rows).
        let conn = rusqlite::Connection::open(dir.path().join("homelab.db")).unwrap();
        let orphans: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM nodes n WHERE NOT EXISTS
                   (SELECT 1 FROM events e WHERE e.node = n.name AND e.kind = 'node.written' AND e.message = 'write ' || n.spec_hash)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            orphans, 0,
            "a node row without the event of the same transaction (round {round})"
        );
        let dup_ips: i64 = conn
            .query_row(
                "SELECT COUNT(*) - COUNT(DISTINCT ip) FROM leases",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(dup_ips, 0);
        total_writes = st.last_event_id().unwrap();
    }
    assert!(
        total_writes > 100,
        "the writer made progress before being killed ({total_writes} events)"
    );
}
