use std::collections::BTreeMap;
use std::path::PathBuf;

use proptest::prelude::*;

use super::*;
use crate::inventory::{Cluster, Controller, DhcpMode, Disk, MacAddr, Os, Power};

fn node(name: &str, i: u8, role: Role) -> Node {
    Node {
        name: name.into(),
        mac: MacAddr([0x52, 0x54, 0, 0, 0, i]),
        ip: format!("10.0.0.{}", 10 + i).parse().unwrap(),
        role,
        disk: Disk::Auto,
        power: Power::default(),
        boot: None,
        reinstall: false,
        labels: Default::default(),
        taints: Vec::new(),
    }
}

fn inventory(nodes: Vec<Node>) -> Inventory {
    Inventory {
        path: PathBuf::from("inventory.toml"),
        controller: Controller {
            interface: "eth0".into(),
            address: "10.0.0.1".parse().unwrap(),
            dhcp: DhcpMode::Proxy,
            http_port: 8080,
            tftp: true,
            subnet: None,
            gateway: None,
            dns: vec![],
            pool: None,
            lease_time: 3600,
            ipxe_dir: "/usr/lib/ipxe".into(),
            mirror: None,
        },
        cluster: Cluster {
            name: "lab".into(),
            domain: "home.arpa".into(),
            k3s_version: "v1.31.4+k3s1".into(),
        },
        os: Os {
            image: "debian.raw".into(),
            checksum: Default::default(),
            installer_kernel: None,
        },
        nodes: nodes
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn record_of(n: &Node, stage: Stage) -> NodeRecord {
    NodeRecord {
        name: n.name.clone(),
        mac: n.mac.to_string(),
        ip: n.ip.to_string(),
        role: n.role.to_string(),
        stage,
        reinstall: false,
        spec_hash: spec_hash(n),
        bytes_done: 0,
        bytes_total: 0,
        detail: String::new(),
        stage_since_ms: 0,
        updated_ms: 0,
    }
}

/// Short names for the kind of each action, for compact table rows.
fn kinds(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| {
            let k = match a {
                Action::Provision { .. } => "provision",
                Action::Reinstall { .. } => "reinstall",
                Action::Update { .. } => "update",
                Action::Resume { .. } => "resume",
                Action::Refuse { .. } => "refuse",
                Action::Remove {
                    leave_cluster: true,
                    ..
                } => "remove+leave",
                Action::Remove { .. } => "remove",
                Action::Nothing { .. } => "nothing",
            };
            format!("{}:{k}", a.node())
        })
        .collect()
}

#[test]
fn table_of_cases() {
    let s1 = node("s1", 1, Role::Server);
    let a1 = node("a1", 2, Role::Agent);
    let a2 = node("a2", 3, Role::Agent);
    let s2 = node("s2", 4, Role::Server);
    let moved = Node {
        ip: "10.0.0.99".parse().unwrap(),
        ..a1.clone()
    };
    let as_server = Node {
        role: Role::Server,
        ..a1.clone()
    };
    let as_server_reinstall = Node {
        role: Role::Server,
        reinstall: true,
        ..a1.clone()
    };
    let reinstall = Node {
        reinstall: true,
        ..a1.clone()
    };
    let wol = Node {
        power: Power { wol: true },
        ..a2.clone()
    };

    struct Case {
        name: &'static str,
        nodes: Vec<Node>,
        observed: Vec<NodeRecord>,
        want: Vec<&'static str>,
    }
    let cases = vec![
        Case {
            name: "empty",
            nodes: vec![],
            observed: vec![],
            want: vec![],
        },
        Case {
            name: "fresh lab: servers first, then agents, each by name",
            nodes: vec![a2.clone(), a1.clone(), s2.clone(), s1.clone()],
            observed: vec![],
            want: vec![
                "s1:provision",
                "s2:provision",
                "a1:provision",
                "a2:provision",
            ],
        },
        Case {
            name: "re-run with nothing changed",
            nodes: vec![s1.clone(), a1.clone()],
            observed: vec![
                record_of(&s1, Stage::Ready),
                record_of(&a1, Stage::Installed),
            ],
            want: vec!["a1:nothing", "s1:nothing"],
        },
        Case {
            name: "one node added",
            nodes: vec![s1.clone(), a1.clone()],
            observed: vec![record_of(&s1, Stage::Ready)],
            want: vec!["a1:provision", "s1:nothing"],
        },
        Case {
            name: "one node removed: removals come last",
            nodes: vec![s1.clone()],
            observed: vec![record_of(&a1, Stage::Ready), record_of(&s1, Stage::Ready)],
            want: vec!["s1:nothing", "a1:remove"],
        },
        Case {
            name: "already removed nodes are not removed again",
            nodes: vec![s1.clone()],
            observed: vec![record_of(&a1, Stage::Removed), record_of(&s1, Stage::Ready)],
            want: vec!["s1:nothing"],
        },
        Case {
            name: "a removed node that comes back is provisioned again",
            nodes: vec![a1.clone()],
            observed: vec![record_of(&a1, Stage::Removed)],
            want: vec!["a1:provision"],
        },
        Case {
            name: "nodes in the cluster leave it when removed; others only leave the controller",
            nodes: vec![],
            observed: vec![
                record_of(&s1, Stage::Running),
                record_of(&a1, Stage::ClusterFailed),
                record_of(&a2, Stage::Ready),
                record_of(&s2, Stage::RemoveFailed),
            ],
            want: vec![
                "a1:remove+leave",
                "a2:remove",
                "s1:remove+leave",
                "s2:remove+leave",
            ],
        },
        Case {
            name: "released and forgotten nodes are not removed again",
            nodes: vec![],
            observed: vec![
                record_of(&a1, Stage::Released),
                record_of(&a2, Stage::Forgotten),
            ],
            want: vec![],
        },
        Case {
            name: "a released node that comes back keeps its OS, even in another role",
            nodes: vec![as_server.clone()],
            observed: vec![record_of(&a1, Stage::Released)],
            want: vec!["a1:resume"],
        },
        Case {
            name: "a forgotten node that comes back keeps its OS and is configured again",
            nodes: vec![a2.clone()],
            observed: vec![record_of(&a2, Stage::Forgotten)],
            want: vec!["a2:resume"],
        },
        Case {
            name: "a node put back while it was leaving the cluster resumes",
            nodes: vec![a1.clone(), a2.clone()],
            observed: vec![
                record_of(&a1, Stage::Removing),
                record_of(&a2, Stage::RemoveFailed),
            ],
            want: vec!["a1:resume", "a2:resume"],
        },
        Case {
            name: "ip edited",
            nodes: vec![moved.clone()],
            observed: vec![record_of(&a1, Stage::Ready)],
            want: vec!["a1:update"],
        },
        Case {
            name: "role change of an installed node is refused",
            nodes: vec![as_server.clone()],
            observed: vec![record_of(&a1, Stage::Ready)],
            want: vec!["a1:refuse"],
        },
        Case {
            name: "role change with reinstall is a reinstall",
            nodes: vec![as_server_reinstall.clone()],
            observed: vec![record_of(&a1, Stage::Ready)],
            want: vec!["a1:reinstall"],
        },
        Case {
            name: "role change before install is an update",
            nodes: vec![as_server.clone()],
            observed: vec![record_of(&a1, Stage::Pending)],
            want: vec!["a1:update"],
        },
        Case {
            name: "reinstall requested on an installed node",
            nodes: vec![reinstall.clone()],
            observed: vec![record_of(&a1, Stage::Installed)],
            want: vec!["a1:reinstall"],
        },
        Case {
            name: "reinstall is consumed once: the applied stanza does not reinstall again",
            nodes: vec![reinstall.clone()],
            observed: vec![record_of(&reinstall, Stage::Ready)],
            want: vec!["a1:nothing"],
        },
        Case {
            name: "reinstall on a node not yet installed is a plain resume",
            nodes: vec![reinstall.clone()],
            observed: vec![record_of(&reinstall, Stage::Installing)],
            want: vec!["a1:resume"],
        },
        Case {
            name: "interrupted and failed nodes resume",
            nodes: vec![s1.clone(), a1.clone()],
            observed: vec![
                record_of(&s1, Stage::Installing),
                record_of(&a1, Stage::Failed),
            ],
            want: vec!["a1:resume", "s1:resume"],
        },
        Case {
            name: "power settings changed",
            nodes: vec![wol.clone()],
            observed: vec![record_of(&a2, Stage::Pending)],
            want: vec!["a2:update"],
        },
    ];
    for c in cases {
        let got = kinds(&plan(&inventory(c.nodes), &c.observed));
        assert_eq!(got, c.want, "case: {}", c.name);
    }
}

#[test]
fn converged_only_when_every_node_is_at_its_goal_and_nothing_changes() {
    let s1 = node("s1", 1, Role::Server);
    let a1 = node("a1", 2, Role::Agent);
    let inv = inventory(vec![s1.clone(), a1.clone()]);
    let at = |stages: &[(&Node, Stage)]| -> Vec<NodeRecord> {
        stages.iter().map(|(n, s)| record_of(n, *s)).collect()
    };
    let check = |observed: Vec<NodeRecord>| converged(&inv, &plan(&inv, &observed), &observed);

    assert!(check(at(&[(&s1, Stage::Running), (&a1, Stage::Running)])));
    // Still on the way, or failed: `up` has work (or a failure to show).
    for stage in [
        Stage::Ready,
        Stage::Installed,
        Stage::Failed,
        Stage::Joining,
        Stage::Unreachable,
    ] {
        assert!(
            !check(at(&[(&s1, Stage::Running), (&a1, stage)])),
            "{stage}"
        );
    }
    // Never seen by the controller.
    assert!(!check(at(&[(&s1, Stage::Running)])));
    // A reinstall asked for with `homelab reinstall`.
    let mut asked = at(&[(&s1, Stage::Running), (&a1, Stage::Running)]);
    asked[1].reinstall = true;
    assert!(!check(asked));
    // An edited stanza is a change.
    let mut edited = at(&[(&s1, Stage::Running), (&a1, Stage::Running)]);
    edited[1].spec_hash = "0".into();
    assert!(!check(edited));
    // A node out of the inventory: done once it is gone.
    let old = node("old", 3, Role::Agent);
    for (stage, done) in [
        (Stage::Released, true),
        (Stage::Forgotten, true),
        (Stage::Removing, false),
        (Stage::RemoveFailed, false),
    ] {
        let observed = at(&[(&s1, Stage::Running), (&a1, Stage::Running), (&old, stage)]);
        assert_eq!(check(observed), done, "{stage}");
    }
    // A boot-profile node is done once booted.
    let mut b = node("b", 4, Role::Agent);
    b.boot = Some(crate::inventory::BootProfile {
        kernel: "k".into(),
        initrd: vec![],
        cmdline: String::new(),
    });
    let inv = inventory(vec![b.clone()]);
    let observed = vec![record_of(&b, Stage::Booted)];
    assert!(converged(&inv, &plan(&inv, &observed), &observed));
}

#[test]
fn wake_on_lan_only_for_nodes_that_must_boot() {
    let n = Node {
        power: Power { wol: true },
        ..node("a1", 2, Role::Agent)
    };
    let p = plan(&inventory(vec![n.clone()]), &[]);
    assert!(p.actions[0].wants_wake());
    let p = plan(&inventory(vec![n.clone()]), &[record_of(&n, Stage::Ready)]);
    assert!(!p.actions[0].wants_wake());
}

#[test]
fn readable_diff_and_json() {
    let s1 = node("s1", 1, Role::Server);
    let a1 = node("a1", 2, Role::Agent);
    let p = plan(
        &inventory(vec![s1.clone()]),
        &[record_of(&a1, Stage::Ready)],
    );
    let text = p.to_string();
    assert!(
        text.contains("+ s1  provision server (52:54:00:00:00:01, 10.0.0.11)"),
        "{text}"
    );
    assert!(text.contains("- a1  remove from the controller"), "{text}");
    assert!(text.contains("1 to provision"), "{text}");
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["actions"][0]["action"], "provision");
    assert_eq!(json["actions"][1]["action"], "remove");
    assert_eq!(json["actions"][1]["leave_cluster"], false);
}

#[test]
fn cluster_changes_read_as_what_will_happen() {
    let s1 = node("s1", 1, Role::Server);
    let a1 = node("a1", 2, Role::Agent);
    let a2 = node("a2", 3, Role::Agent);
    let a2_server = Node {
        role: Role::Server,
        ..a2.clone()
    };
    let s1_agent = Node {
        role: Role::Agent,
        ..s1.clone()
    };
    let p = plan(
        &inventory(vec![s1_agent, a2_server]),
        &[
            record_of(&s1, Stage::Running),
            record_of(&a1, Stage::Running),
            record_of(&a2, Stage::Released),
        ],
    );
    let text = p.to_string();
    assert!(
        text.contains("x s1  refused: changing the role of installed node from server to agent needs a reinstall")
            && text.contains("help: set `reinstall = true` in [nodes.s1] to wipe and reinstall it as agent, or change the role back"),
        "{text}"
    );
    assert!(
        text.contains("> a2  back in the inventory: keep its installed OS, check SSH and join k3s"),
        "{text}"
    );
    assert!(
        text.contains(
            "- a1  remove: cordon, drain and delete from the cluster, uninstall k3s (the OS stays)"
        ),
        "{text}"
    );
}

fn arb_stage() -> impl Strategy<Value = Stage> {
    proptest::sample::select(Stage::ALL.to_vec())
}

proptest! {
    /// Whatever the inventory and the memory, the plan mentions every inventory node
    /// exactly once, never provisions a node that has an OS without a request, and
    /// applying its own result gives a plan with nothing to change.
    #[test]
    fn plan_properties(
        in_inv in proptest::collection::vec(any::<bool>(), 8),
        remembered in proptest::collection::vec(proptest::option::of(arb_stage()), 8),
        roles in proptest::collection::vec(any::<bool>(), 8),
    ) {
        let nodes: Vec<Node> = (0..8)
            .filter(|i| in_inv[*i])
            .map(|i| node(&format!("n{i}"), i as u8, if roles[i] { Role::Server } else { Role::Agent }))
            .collect();
        let observed: Vec<NodeRecord> = (0..8)
            .filter_map(|i| remembered[i].map(|st| record_of(&node(&format!("n{i}"), i as u8, Role::Agent), st)))
            .collect();
        let inv = inventory(nodes.clone());
        let p = plan(&inv, &observed);
        for n in &nodes {
            prop_assert_eq!(p.actions.iter().filter(|a| a.node() == n.name).count(), 1);
        }
        for a in &p.actions {
            if let Action::Provision { node, .. } = a {
                let rec = observed.iter().find(|r| &r.name == node);
                prop_assert!(rec.map(|r| r.stage == Stage::Removed).unwrap_or(true));
            }
            let is_reinstall = matches!(a, Action::Reinstall { .. });
            prop_assert!(!is_reinstall, "no reinstall without a request");
        }
        // Servers are provisioned before any agent.
        let first_agent = p.actions.iter().position(|a| matches!(a, Action::Provision { role: Role::Agent, .. }));
        let last_server = p.actions.iter().rposition(|a| matches!(a, Action::Provision { role: Role::Server, .. }));
        if let (Some(fa), Some(ls)) = (first_agent, last_server) { prop_assert!(ls < fa); }
        // Deterministic.
        prop_assert_eq!(&p, &plan(&inv, &observed));
    }
}

#[test]
fn the_cluster_part_resumes_unfinished_work_and_reports_halted_work() {
    use crate::saga::{SagaRecord, SagaStatus, StepRecord, StepStatus};
    let saga = |id, status, steps: &[StepStatus], detail: &str| SagaRecord {
        id,
        kind: "k3s-rollout".into(),
        target: "v1.32.1+k3s1".into(),
        status,
        detail: detail.into(),
        steps: steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepRecord {
                seq: i as u32,
                name: ["snapshot", "cordon node1", "upgrade node1"][i].into(),
                status: *s,
                undo: serde_json::Value::Null,
                output: serde_json::Value::Null,
                error: String::new(),
            })
            .collect(),
    };
    use StepStatus::{Done, Failed, Pending, Started};
    let sagas = [
        saga(1, SagaStatus::Running, &[Done, Started, Pending], ""),
        saga(2, SagaStatus::Unwinding, &[Done, Done, Failed], ""),
        saga(
            3,
            SagaStatus::Halted,
            &[Done, Failed],
            "undoing snapshot: gone",
        ),
        saga(4, SagaStatus::Done, &[Done], ""),
    ];
    let mut p = Plan {
        cluster: plan_cluster(&sagas),
        ..Default::default()
    };
    let text = p.to_string();
    assert!(
        text.contains("> k3s-rollout v1.32.1+k3s1 (#1)  resume at cordon node1"),
        "{text}"
    );
    assert!(text.contains("(#2)  resume at undo cordon node1"), "{text}");
    assert!(
        text.contains("x k3s-rollout v1.32.1+k3s1 (#3)  halted: undoing snapshot: gone"),
        "{text}"
    );
    assert!(!text.contains("#4"), "{text}");
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["cluster"][0]["action"], "resume");
    // Work under way: `up` is not done.
    let inv = inventory(vec![]);
    assert!(!converged(&inv, &p, &[]));
    p.cluster.clear();
    assert!(converged(&inv, &p, &[]));
}
