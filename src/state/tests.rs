use super::*;
use crate::lifecycle::NodeEvent;

fn rec(name: &str, mac: &str, stage: Stage) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        mac: mac.into(),
        ip: "10.0.0.2".into(),
        role: "server".into(),
        stage,
        reinstall: false,
        spec_hash: "h".into(),
        bytes_done: 0,
        bytes_total: 0,
        detail: String::new(),
        stage_since_ms: now_ms(),
        updated_ms: now_ms(),
    }
}

#[test]
fn fresh_database_is_at_latest_schema_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let st = State::open(dir.path()).unwrap();
    assert_eq!(st.schema_version().unwrap(), migrations::latest());
    let mode: String = st
        .conn()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(dir.path().join(DB_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(m & 0o777, 0o600);
}

#[test]
fn migrating_an_old_database_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        migrations::apply_up_to(&mut conn, 1).unwrap();
        conn.execute(
            "INSERT INTO nodes (name, mac, ip, role, stage, stage_since_ms, updated_ms)
             VALUES ('n1', '52:54:00:00:00:01', '10.0.0.2', 'server', 'installed', 1, 1)",
            [],
        )
        .unwrap();
    }
    let st = State::open(dir.path()).unwrap();
    assert_eq!(st.schema_version().unwrap(), migrations::latest());
    assert_eq!(st.node("n1").unwrap().unwrap().stage, Stage::Installed);
    // Version 2 tables exist.
    assert!(st.leases().unwrap().is_empty());
}

#[test]
fn a_database_from_a_newer_homelab_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
    }
    let err = State::open(dir.path()).unwrap_err();
    assert!(
        format!("{err:#}").contains("newer than this homelab"),
        "{err:#}"
    );
}

#[test]
fn stage_changes_are_recorded_as_events() {
    let dir = tempfile::tempdir().unwrap();
    let st = State::open(dir.path()).unwrap();
    let mut rx = st.subscribe();
    st.put_node(
        &rec("n1", "52:54:00:00:00:01", Stage::Pending),
        "node.added",
        "added",
    )
    .unwrap();
    st.transition("n1", NodeEvent::NetbootStarted, "DHCP offer sent")
        .unwrap()
        .unwrap();
    assert!(st
        .transition("ghost", NodeEvent::NetbootStarted, "x")
        .unwrap()
        .is_none());
    // Refused by the lifecycle: nothing written.
    assert!(st
        .transition("n1", NodeEvent::Joined, "x")
        .unwrap()
        .is_none());
    let evs = st.events_after(0, Some("n1"), 100).unwrap();
    assert_eq!(
        evs.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["node.added", "stage.booting"]
    );
    assert_eq!(rx.try_recv().unwrap().kind, "node.added");
    assert_eq!(rx.try_recv().unwrap().kind, "stage.booting");
    assert_eq!(st.node("n1").unwrap().unwrap().stage, Stage::Booting);
    assert_eq!(
        st.node_by_mac("52:54:00:00:00:01").unwrap().unwrap().name,
        "n1"
    );
}

#[test]
fn a_stage_change_applies_only_where_the_lifecycle_goes_from_the_stage_now() {
    let dir = tempfile::tempdir().unwrap();
    let st = State::open(dir.path()).unwrap();
    st.put_node(
        &rec("n1", "52:54:00:00:00:01", Stage::Removing),
        "node.added",
        "added",
    )
    .unwrap();
    // Forgotten first: the removal finishing later must not undo it.
    assert!(st
        .transition("n1", NodeEvent::Forgotten, "given up")
        .unwrap()
        .is_some());
    assert!(st
        .transition("n1", NodeEvent::Left, "done")
        .unwrap()
        .is_none());
    assert!(st
        .transition("ghost", NodeEvent::Forgotten, "x")
        .unwrap()
        .is_none());
    let rec = st.node("n1").unwrap().unwrap();
    assert_eq!(
        (rec.stage, rec.detail.as_str()),
        (Stage::Forgotten, "given up")
    );
    let kinds: Vec<_> = st
        .events_after(0, Some("n1"), 100)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["node.added", "stage.forgotten"]);
}

#[test]
fn events_are_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let st = State::open(dir.path()).unwrap();
    st.append_event(None, "x", "y", serde_json::Value::Null)
        .unwrap();
    let conn = st.conn();
    assert!(conn.execute("DELETE FROM events", []).is_err());
    assert!(conn.execute("UPDATE events SET message = 'z'", []).is_err());
}

#[test]
fn an_address_is_never_leased_twice() {
    let dir = tempfile::tempdir().unwrap();
    let st = State::open(dir.path()).unwrap();
    let l = |mac: &str| Lease {
        mac: mac.into(),
        ip: "10.0.0.50".into(),
        expires_ms: 1,
        is_static: false,
    };
    st.put_lease(&l("52:54:00:00:00:01")).unwrap();
    assert!(st.put_lease(&l("52:54:00:00:00:02")).is_err());
    // Re-leasing to the same client moves it.
    st.put_lease(&Lease {
        ip: "10.0.0.51".into(),
        ..l("52:54:00:00:00:01")
    })
    .unwrap();
    assert_eq!(st.leases().unwrap().len(), 1);
    st.quarantine_ip("10.0.0.51", i64::MAX).unwrap();
    assert!(st.lease_by_mac("52:54:00:00:00:01").unwrap().is_none());
    assert_eq!(st.quarantined_ips(0).unwrap(), ["10.0.0.51"]);
}

#[test]
fn discovered_clients_count_sightings() {
    let dir = tempfile::tempdir().unwrap();
    let st = State::open(dir.path()).unwrap();
    assert!(st
        .record_discovered("52:54:00:00:00:09", Some(7), "PXEClient:Arch:00007")
        .unwrap());
    assert!(!st.record_discovered("52:54:00:00:00:09", None, "").unwrap());
    let d = st.discovered().unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].seen_count, 2);
    assert_eq!(d[0].arch, Some(7));
    assert_eq!(d[0].vendor_class, "PXEClient:Arch:00007");
}

#[test]
fn second_daemon_lock_is_refused_with_the_holder_pid() {
    let dir = tempfile::tempdir().unwrap();
    let _held = DaemonLock::acquire(dir.path()).unwrap();
    // flock locks belong to the open file description, so a second open in the
    // same process conflicts just as another process would.
    let err = DaemonLock::acquire(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    assert!(msg.contains("already running"), "{msg}");
    drop(_held);
    DaemonLock::acquire(dir.path()).unwrap();
}

#[test]
fn secrets_are_0600_and_refused_when_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = write_secret(dir.path(), "k3s-token", b"s3cret").unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        read_secret(dir.path(), "k3s-token").unwrap().unwrap(),
        b"s3cret"
    );
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(read_secret(dir.path(), "k3s-token").is_err());
    assert!(read_secret(dir.path(), "missing").unwrap().is_none());
    assert!(write_secret(dir.path(), "../x", b"").is_err());
}

#[test]
fn install_attempts_are_numbered_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let st = State::open(dir.path()).unwrap();
    for (name, mac) in [("a", "52:54:00:00:00:01"), ("b", "52:54:00:00:00:02")] {
        st.put_node(&rec(name, mac, Stage::Pending), "test", "")
            .unwrap();
    }
    let start = |node: &str| {
        let token = st.new_install_token(node).unwrap();
        let InstallStart::Started(attempt, session) = st.start_install(node, &token).unwrap()
        else {
            panic!("{node}'s install did not start");
        };
        assert_eq!(
            st.install_session(node, &session).unwrap(),
            Some(attempt.clone())
        );
        attempt.number
    };
    // A token minted but never used is no attempt.
    st.new_install_token("a").unwrap();
    assert_eq!(start("a"), 1);
    assert_eq!(start("b"), 1, "b's first attempt, whatever a did");
    assert_eq!(start("a"), 2);
    let events = st.last_events(1, Some("a")).unwrap();
    assert!(
        events[0].message.ends_with("(attempt 2)"),
        "{}",
        events[0].message
    );
}

#[test]
fn concurrent_transitions_from_one_stage_have_one_winner() {
    // The daemon finishing a removal and `homelab forget` at once: exactly
    // one of them moves the node, whatever the interleaving.
    let dir = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let name = format!("n{round}");
        let st = State::open(dir.path()).unwrap();
        st.put_node(
            &rec(
                &name,
                &format!("52:54:00:00:01:{round:02x}"),
                Stage::Removing,
            ),
            "t",
            "",
        )
        .unwrap();
        let threads: Vec<_> = [
            NodeEvent::Left,
            NodeEvent::Forgotten,
            NodeEvent::LeaveFailed,
        ]
        .into_iter()
        .map(|event| {
            let st = State::open(dir.path()).unwrap();
            let name = name.clone();
            std::thread::spawn(move || st.transition(&name, event, "race").unwrap().is_some())
        })
        .collect();
        let won: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let final_stage = st.node(&name).unwrap().unwrap().stage;
        // Forgotten may follow a failed removal; nothing else follows anything.
        let winners = won.iter().filter(|w| **w).count();
        assert!(
            winners == 1 || (winners == 2 && won[1] && won[2]),
            "{won:?}"
        );
        assert!(
            matches!(
                final_stage,
                Stage::Released | Stage::Forgotten | Stage::RemoveFailed
            ),
            "{final_stage}"
        );
        let moves = st
            .events_after(0, Some(&name), 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind.starts_with("stage."))
            .count();
        assert_eq!(moves, winners, "one event per move");
    }
}
