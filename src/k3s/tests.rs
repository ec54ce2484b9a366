use std::os::unix::fs::PermissionsExt;

use super::*;

/// An inventory through the real parser: servers s1..s3 (when `servers` is 3), agents a1, a2.
fn inventory(servers: usize) -> Inventory {
    inventory_with(servers, "")
}

/// [`inventory`] with `extra` appended to the file.
fn inventory_with(servers: usize, extra: &str) -> Inventory {
    let mut text = String::from(
        "[controller]\ninterface = \"eth0\"\naddress = \"10.0.0.1\"\n\n\
         [cluster]\nname = \"lab\"\ndomain = \"home.arpa\"\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [os]\nimage = \"https://example.org/debian.raw\"\nsha256 = \"",
    );
    text.push_str("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
    text.push_str("\"\n");
    let nodes = (1..=servers)
        .map(|i| (format!("s{i}"), "server", 10 + i))
        .chain([
            ("a1".to_string(), "agent", 21),
            ("a2".to_string(), "agent", 22),
        ]);
    for (name, role, host) in nodes {
        text.push_str(&format!(
            "\n[nodes.{name}]\nmac = \"52:54:00:00:00:{host:02x}\"\nip = \"10.0.0.{host}\"\nrole = \"{role}\"\n"
        ));
    }
    text.push_str(extra);
    crate::inventory::parse_str(&text, Path::new("inventory.toml"))
        .unwrap_or_else(|d| panic!("{d}"))
        .inventory
}

#[test]
fn the_first_server_bootstraps_then_servers_then_agents_join_it() {
    let inv = inventory(3);
    let m = members(&inv, None).unwrap();
    let order: Vec<&str> = m.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(order, ["s1", "s2", "s3", "a1", "a2"]);
    assert_eq!(m[0].join, Join::Init);
    let s1: Ipv4Addr = "10.0.0.11".parse().unwrap();
    assert_eq!(m[1].join, Join::Server { server: s1 });
    assert_eq!(m[4].join, Join::Agent { server: s1 });
}

#[test]
fn the_recorded_bootstrap_server_keeps_its_place() {
    let inv = inventory(3);
    let m = members(&inv, Some("s2")).unwrap();
    assert_eq!(
        m[0],
        Member {
            node: "s2".into(),
            join: Join::Init
        }
    );
    let s2: Ipv4Addr = "10.0.0.12".parse().unwrap();
    assert!(m[1..].iter().all(|m| m.join != Join::Init));
    assert_eq!(m[1].join, Join::Server { server: s2 });
    // A recorded server that is gone from the inventory: the first by name.
    assert_eq!(members(&inv, Some("gone")).unwrap()[0].node, "s1");
}

#[test]
fn a_cluster_without_a_server_is_refused() {
    // The inventory's validation already refuses this; the plan does too.
    let mut inv = inventory(1);
    inv.nodes.retain(|_, n| n.role != Role::Server);
    let e = members(&inv, None).unwrap_err();
    assert!(e.contains("role = \"server\""), "{e}");
}

#[test]
fn configs_carry_the_token_and_only_the_first_server_inits() {
    let inv = inventory(3);
    let t = Templates::new(None).unwrap();
    let m = members(&inv, None).unwrap();
    let cfg: Vec<String> = m
        .iter()
        .map(|m| render_config(&t, &inv, m, "tok123").unwrap())
        .collect();
    for c in &cfg {
        let yaml: serde_json::Value = serde_yaml_like(c);
        assert_eq!(yaml["token"], "tok123", "{c}");
    }
    assert!(cfg[0].contains("\ncluster-init: true") && !cfg[0].contains("\nserver:"));
    assert!(
        cfg[1].contains("server: \"https://10.0.0.11:6443\"") && !cfg[1].contains("cluster-init")
    );
    assert!(cfg[1].contains("- \"s2.home.arpa\""), "{}", cfg[1]);
    assert!(cfg[3].contains("node-ip: \"10.0.0.21\"") && !cfg[3].contains("tls-san"));
    assert!(cfg[3].contains("homelab.role=agent"));
}

#[test]
fn labels_and_taints_from_the_inventory_reach_the_config() {
    let inv = inventory_with(
        1,
        "\n[nodes.a3]\nmac = \"52:54:00:00:00:30\"\nip = \"10.0.0.30\"\nrole = \"agent\"\n\
         labels = { disk = \"ssd\", \"topology.kubernetes.io/zone\" = \"rack1\" }\n\
         taints = [\"dedicated=gpu:NoSchedule\", \"example.com/maint:NoExecute\"]\n",
    );
    let t = Templates::new(None).unwrap();
    let m = members(&inv, None).unwrap();
    let a3 = m.iter().find(|m| m.node == "a3").unwrap();
    let cfg = render_config(&t, &inv, a3, "tok").unwrap();
    let lists = |key: &str| -> Vec<String> {
        cfg.split(&format!("\n{key}:\n"))
            .nth(1)
            .unwrap_or("")
            .lines()
            .take_while(|l| l.starts_with("  - "))
            .map(|l| l[4..].trim_matches('"').to_string())
            .collect()
    };
    assert_eq!(
        lists("node-label"),
        [
            "homelab.role=agent",
            "disk=ssd",
            "topology.kubernetes.io/zone=rack1"
        ],
        "{cfg}"
    );
    assert_eq!(
        lists("node-taint"),
        ["dedicated=gpu:NoSchedule", "example.com/maint:NoExecute"],
        "{cfg}"
    );
    // A node without taints gets no node-taint key at all.
    let a1 = render_config(&t, &inv, &m[1], "tok").unwrap();
    assert!(!a1.contains("node-taint"), "{a1}");
}

/// The few `key: value` lines the assertions read (no YAML parser in the tree).
fn serde_yaml_like(text: &str) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' '))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v.trim_matches('"').to_string()),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

#[test]
fn units_run_server_or_agent() {
    let t = Templates::new(None).unwrap();
    let server = render_unit(&t, &Join::Init).unwrap();
    assert!(
        server.contains("ExecStart=/usr/local/bin/k3s server") && server.contains("Type=notify")
    );
    let agent = render_unit(
        &t,
        &Join::Agent {
            server: "10.0.0.11".parse().unwrap(),
        },
    )
    .unwrap();
    assert!(agent.contains("ExecStart=/usr/local/bin/k3s agent") && agent.contains("Type=exec"));
    assert_eq!(unit_name(&Join::Init), "k3s.service");
}

#[test]
fn release_files_and_their_checksums() {
    let u = release_urls("v1.31.4+k3s1");
    assert_eq!(
        u.binary,
        "https://github.com/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/k3s"
    );
    assert!(u.checksums.ends_with("/sha256sum-amd64.txt"));
    let sum = "b".repeat(64);
    let sums = format!(
        "{sum}  k3s\n{}  k3s-airgap-images-amd64.tar.zst\n",
        "c".repeat(64)
    );
    assert_eq!(checksum_of(&sums, "k3s").unwrap(), sum);
    assert!(checksum_of(&sums, "k3s-arm64")
        .unwrap_err()
        .contains("`k3s-arm64`"));
    assert!(checksum_of("xyz  k3s\n", "k3s").is_err());
}

#[test]
fn the_token_is_made_once_and_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    let a = token(dir.path()).unwrap();
    assert_eq!(a.len(), 64);
    assert_eq!(token(dir.path()).unwrap(), a);
    let path = crate::state::secret_path(dir.path(), TOKEN_SECRET).unwrap();
    assert_eq!(
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// A mirror holding one release: the files and the checksum list naming them.
fn mirror_with(dir: &Path, binary: &[u8], listed_binary_sha: Option<String>) {
    let images = b"images".as_slice();
    std::fs::write(dir.join("k3s"), binary).unwrap();
    std::fs::write(dir.join("k3s-airgap-images-amd64.tar.zst"), images).unwrap();
    let sha = |b: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b))
    };
    let sums = format!(
        "{}  k3s\n{}  k3s-airgap-images-amd64.tar.zst\n",
        listed_binary_sha.unwrap_or_else(|| sha(binary)),
        sha(images)
    );
    std::fs::write(dir.join("sha256sum-amd64.txt"), sums).unwrap();
}

fn store(state_dir: &Path, mirror: &Path) -> crate::artifacts::Store {
    let st = crate::state::State::open(state_dir).unwrap();
    crate::artifacts::Store::new(&st, Some(mirror.to_path_buf()), None).unwrap()
}

#[tokio::test]
async fn a_release_comes_from_the_mirror_checked_against_its_own_list_then_from_the_cache() {
    let (state, mirror) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    mirror_with(mirror.path(), b"#!/bin/sh\necho k3s\n", None);
    let r = release::prepare(&store(state.path(), mirror.path()), "v1.31.4+k3s1")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&r.binary.path).unwrap(),
        b"#!/bin/sh\necho k3s\n"
    );
    assert!(r
        .binary
        .path
        .starts_with(&state.path().display().to_string()));
    assert_eq!(std::fs::read(&r.images.path).unwrap(), b"images");
    // The binary and images are cached: only the checksum list is read again.
    std::fs::remove_file(mirror.path().join("k3s")).unwrap();
    std::fs::remove_file(mirror.path().join("k3s-airgap-images-amd64.tar.zst")).unwrap();
    let again = release::prepare(&store(state.path(), mirror.path()), "v1.31.4+k3s1")
        .await
        .unwrap();
    assert_eq!(again.binary.sha256, r.binary.sha256);
}

#[tokio::test]
async fn a_binary_that_does_not_match_the_list_is_refused() {
    let (state, mirror) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    mirror_with(mirror.path(), b"tampered", Some("d".repeat(64)));
    // Offline: the mirror's file is skipped as wrong and the download cannot happen.
    let s = store(state.path(), mirror.path())
        .with_timeouts(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_millis(200),
        )
        .unwrap();
    let e = format!(
        "{:#}",
        release::prepare(&s, "v1.31.4+k3s1").await.unwrap_err()
    );
    assert!(e.contains("k3s v1.31.4+k3s1 binary"), "{e}");
    let cached = std::fs::read_dir(state.path().join("artifacts"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(cached, 0, "nothing unverified is kept");
}

#[tokio::test]
async fn a_list_without_the_binary_says_which_file_is_missing() {
    let (state, mirror) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    mirror_with(mirror.path(), b"k3s", None);
    std::fs::write(mirror.path().join("sha256sum-amd64.txt"), "abc  other\n").unwrap();
    let e = format!(
        "{:#}",
        release::prepare(&store(state.path(), mirror.path()), "v1.31.4+k3s1")
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("sha256sum-amd64.txt") && e.contains("`k3s`"),
        "{e}"
    );
}

#[test]
fn the_bootstrap_is_remembered_else_a_running_server_else_none() {
    let inv = inventory(3);
    assert_eq!(
        choose_bootstrap(&inv, Some("s2"), &[]).as_deref(),
        Some("s2")
    );
    // The recorded one left the inventory (or became an agent): a server that
    // already runs k3s takes over; agents never do.
    assert_eq!(
        choose_bootstrap(&inv, Some("gone"), &["a1", "s3", "s2"]).as_deref(),
        Some("s2")
    );
    assert_eq!(choose_bootstrap(&inv, Some("a1"), &["a1"]), None);
    // No cluster yet: members() picks the first server by name.
    assert_eq!(choose_bootstrap(&inv, None, &[]), None);
    assert_eq!(members(&inv, None).unwrap()[0].node, "s1");
}

#[test]
fn applied_labels_are_read_back_without_the_token() {
    // What APPLIED_COMMAND prints for a config rendered here.
    let inv = inventory_with(
        1,
        "\n[nodes.a3]\nmac = \"52:54:00:00:00:30\"\nip = \"10.0.0.30\"\nrole = \"agent\"\n\
         labels = { disk = \"ssd\" }\ntaints = [\"dedicated=gpu:NoSchedule\"]\n",
    );
    let t = Templates::new(None).unwrap();
    let m = members(&inv, None).unwrap();
    let a3 = m.iter().find(|m| m.node == "a3").unwrap();
    let cfg = render_config(&t, &inv, a3, "secret-token").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, &cfg).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(APPLIED_COMMAND.replace(CONFIG_PATH, &file.to_string_lossy()))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("secret-token"), "{text}");
    assert_eq!(
        parse_applied(&text),
        Applied {
            labels: vec!["homelab.role=agent".into(), "disk=ssd".into()],
            taints: vec!["dedicated=gpu:NoSchedule".into()],
        }
    );
}

#[test]
fn label_commands_set_what_the_inventory_says_and_take_off_what_it_dropped() {
    let inv = inventory_with(
        1,
        "\n[nodes.a3]\nmac = \"52:54:00:00:00:30\"\nip = \"10.0.0.30\"\nrole = \"agent\"\n\
         labels = { disk = \"nvme\" }\ntaints = [\"dedicated=gpu:NoExecute\"]\n",
    );
    let node = &inv.nodes["a3"];
    let previous = Applied {
        labels: vec![
            "homelab.role=agent".into(),
            "disk=ssd".into(),
            "zone=a".into(),
        ],
        taints: vec!["dedicated=gpu:NoSchedule".into(), "x:NoExecute".into()],
    };
    assert_eq!(
        label_commands(node, &previous),
        [
            "label node a3 zone-",
            "label node a3 --overwrite homelab.role=agent disk=nvme",
            "taint node a3 dedicated:NoSchedule-",
            "taint node a3 x:NoExecute-",
            "taint node a3 --overwrite dedicated=gpu:NoExecute",
        ]
    );
    // A first join: only the current labels.
    let a1 = &inv.nodes["a1"];
    assert_eq!(
        label_commands(a1, &Applied::default()),
        ["label node a1 --overwrite homelab.role=agent"]
    );
}

#[test]
fn the_uninstall_script_is_valid_shell_and_removes_what_the_step_put_there() {
    let t = Templates::new(None).unwrap();
    let script = render_uninstall(&t).unwrap();
    let check = std::process::Command::new("sh")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for path in [
        BINARY_PATH,
        DATA_DIR,
        "/etc/rancher/k3s",
        "k3s-agent.service",
    ] {
        assert!(script.contains(path), "the script leaves {path}");
    }
}

/// Runs the start command with `systemctl` and `chmod` replaced by fakes that
/// log their arguments; `active` is what `is-active` answers. Returns the
/// calls and whether the command said it restarted k3s.
fn run_start_command(changed: bool, active: bool) -> (Vec<String>, bool) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    for tool in ["systemctl", "chmod"] {
        let fake = dir.path().join(tool);
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> {}\n\
                 [ \"$1\" = is-active ] && exit {}\nexit 0\n",
                calls.display(),
                if active { 0 } else { 3 }
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(start_command("k3s-agent.service", changed))
        .env(
            "PATH",
            format!(
                "{}:{}",
                dir.path().display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    (
        calls.lines().map(String::from).collect(),
        String::from_utf8_lossy(&out.stdout).contains(RESTARTED),
    )
}

#[test]
fn k3s_is_restarted_only_when_its_files_changed_or_it_is_not_running() {
    let restart = "systemctl restart k3s-agent.service".to_string();
    for (changed, active, restarts) in [
        (true, true, true),
        (true, false, true),
        (false, true, false),
        (false, false, true),
    ] {
        let (calls, said) = run_start_command(changed, active);
        assert_eq!(
            calls.contains(&restart),
            restarts,
            "changed {changed}, active {active}: {calls:?}"
        );
        assert_eq!(said, restarts, "changed {changed}, active {active}");
        assert_eq!(calls[0], format!("chmod 600 {CONFIG_PATH}"), "{calls:?}");
        assert!(calls.contains(&"systemctl enable k3s-agent.service".to_string()));
    }
}

mod schedule {
    //! The cluster step's scheduling rules, as pure functions of a snapshot:
    //! exactly the gate rolling upgrades will build on.
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::inventory;
    use crate::k3s::step::{due_members, due_removals};
    use crate::reconcile::Snapshot;
    use crate::state::Stage;
    use crate::testing::record as rec;

    /// Three servers s1..s3, agents a1, a2, at the stages given.
    fn snapshot(stages: &[(&str, Stage)], bootstrap: Option<&str>) -> Snapshot {
        let nodes = stages
            .iter()
            .map(|(n, s)| {
                rec(
                    n,
                    if n.starts_with('s') {
                        "server"
                    } else {
                        "agent"
                    },
                    *s,
                )
            })
            .collect();
        Snapshot {
            inventory: Arc::new(inventory(3)),
            nodes,
            bootstrap: bootstrap.map(String::from),
            sagas: Vec::new(),
        }
    }

    fn due(snap: &Snapshot, in_flight: &[&str]) -> Vec<String> {
        let in_flight: BTreeSet<String> = in_flight.iter().map(|s| s.to_string()).collect();
        due_members(snap, &in_flight)
            .into_iter()
            .map(|m| m.node)
            .collect()
    }

    use Stage::{ClusterFailed, Joining, Ready, Removing, Running, Unreachable};

    #[test]
    fn the_bootstrap_server_goes_first_and_alone() {
        let all_ready = [
            ("s1", Ready),
            ("s2", Ready),
            ("s3", Ready),
            ("a1", Ready),
            ("a2", Ready),
        ];
        assert_eq!(due(&snapshot(&all_ready, None), &[]), ["s1"]);
        // In flight: nothing else is due meanwhile.
        assert!(due(&snapshot(&all_ready, None), &["s1"]).is_empty());
        // A recorded bootstrap keeps its place.
        assert_eq!(due(&snapshot(&all_ready, Some("s2")), &[]), ["s2"]);
    }

    #[test]
    fn servers_join_one_at_a_time_and_agents_together_once_the_bootstrap_runs() {
        let snap = snapshot(
            &[
                ("s1", Running),
                ("s2", Ready),
                ("s3", Ready),
                ("a1", Ready),
                ("a2", Ready),
            ],
            Some("s1"),
        );
        assert_eq!(due(&snap, &[]), ["s2", "a1", "a2"]);
        // s2 joining: s3 waits for it; agents do not.
        let snap = snapshot(
            &[
                ("s1", Running),
                ("s2", Joining),
                ("s3", Ready),
                ("a1", Ready),
                ("a2", Running),
            ],
            Some("s1"),
        );
        assert_eq!(due(&snap, &["s2"]), ["a1"]);
        // s2 settled (running, or failed with its cause): s3's turn.
        for settled in [Running, ClusterFailed, Unreachable] {
            let snap = snapshot(
                &[("s1", Running), ("s2", settled), ("s3", Ready)],
                Some("s1"),
            );
            assert_eq!(due(&snap, &[]), ["s3"], "s2 {settled}");
        }
        // An earlier server still in flight holds the next one, whatever
        // stage it shows.
        let snap = snapshot(
            &[("s1", Running), ("s2", Running), ("s3", Ready)],
            Some("s1"),
        );
        assert!(due(&snap, &["s2"]).is_empty());
    }

    #[test]
    fn nothing_joins_a_cluster_whose_bootstrap_is_not_running() {
        let snap = snapshot(
            &[("s1", ClusterFailed), ("s2", Ready), ("a1", Ready)],
            Some("s1"),
        );
        assert!(due(&snap, &[]).is_empty());
    }

    #[test]
    fn removals_take_agents_together_and_servers_one_at_a_time() {
        // Nodes out of the inventory (inventory(3) has s1..s3, a1, a2).
        let leaving = |stages: &[(&str, Stage)], in_flight: &[&str]| {
            let mut snap = snapshot(&[("s1", Running)], Some("s1"));
            snap.nodes.extend(stages.iter().map(|(n, s)| {
                rec(
                    n,
                    if n.starts_with("old-s") {
                        "server"
                    } else {
                        "agent"
                    },
                    *s,
                )
            }));
            let in_flight: BTreeSet<String> = in_flight.iter().map(|s| s.to_string()).collect();
            due_removals(&snap, &in_flight)
        };
        let all = [
            ("old-s1", Removing),
            ("old-s2", Removing),
            ("old-a1", Removing),
            ("old-a2", Removing),
        ];
        assert_eq!(leaving(&all, &[]), ["old-s1", "old-a1", "old-a2"]);
        assert_eq!(leaving(&all, &["old-s1"]), ["old-a1", "old-a2"]);
        assert_eq!(leaving(&all, &["old-a1"]), ["old-s1", "old-a2"]);
        // A node being removed but back in the inventory is the plan's now.
        let mut snap = snapshot(&[("s1", Running), ("a1", Removing)], Some("s1"));
        snap.nodes.push(rec("x", "agent", Running));
        assert!(due_removals(&snap, &BTreeSet::new()).is_empty());
    }
}
