//! `homelab discover --adopt`: machines seen PXE-booting become nodes without
//! copying MAC addresses by hand. One [nodes.NAME] table per name is added to
//! the inventory's text with toml_edit, so every comment and the layout stay
//! as they were; the result must validate before anyone writes it.

use std::net::Ipv4Addr;
use std::path::Path;

use toml_edit::{value, DocumentMut, Item, Table};

use super::{parse::label_problem, parse_str, Inventory, MacAddr, Role};

/// A node added by [`adopt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub name: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub role: Role,
}

/// Add one node per name to `text` (the inventory `inv` was read from), taking
/// `machines` in order (oldest seen first) and the next free addresses.
/// `role`: every new node's role; None gives the first one `server` when the
/// inventory has no server yet, and `agent` to the rest. Returns the new text,
/// already validated, and what was added; on any problem nothing is returned
/// but the reason and the fix.
pub fn adopt(
    text: &str,
    path: &Path,
    inv: &Inventory,
    machines: &[MacAddr],
    names: &[String],
    role: Option<Role>,
) -> Result<(String, Vec<Adopted>), String> {
    if names.is_empty() {
        return Err("name at least one node: homelab discover --adopt NAME...".into());
    }
    for (i, name) in names.iter().enumerate() {
        if let Some(problem) = label_problem(name) {
            return Err(format!(
                "`{name}` cannot be a node name: it {problem}; use lower-case letters, digits and '-' \
                 (at most 63 characters), e.g. node1"
            ));
        }
        if inv.nodes.contains_key(name) {
            return Err(format!(
                "`{name}` is a node in {} already; choose another name",
                path.display()
            ));
        }
        if names[..i].contains(name) {
            return Err(format!(
                "`{name}` is named twice; give each machine its own name"
            ));
        }
    }
    if machines.len() < names.len() {
        return Err(format!(
            "{} name{} given but {} unknown machine{} seen: `homelab discover` lists them; \
             power on the missing ones set to network boot while `homelab up` runs, or give fewer names",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            machines.len(),
            if machines.len() == 1 { " was" } else { "s were" },
        ));
    }
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    // Comments after the last table ("add nodes below") stay above the new tables.
    let trailing = doc.trailing().as_str().unwrap_or_default().to_string();
    doc.set_trailing("");
    let nodes = doc
        .entry("nodes")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .ok_or_else(|| format!("`nodes` in {} is not a table", path.display()))?;
    let mut taken: Vec<Ipv4Addr> = inv.nodes.values().map(|n| n.ip).collect();
    let mut has_server = inv.servers().next().is_some();
    let mut added = Vec::new();
    for (name, mac) in names.iter().zip(machines) {
        let ip = next_free_ip(inv, &taken).ok_or_else(|| {
            "no free address left after the highest node address inside the controller's subnet; \
             set `subnet` in [controller] or write the nodes by hand"
                .to_string()
        })?;
        taken.push(ip);
        let role = role.unwrap_or(if has_server {
            Role::Agent
        } else {
            Role::Server
        });
        has_server |= role == Role::Server;
        let mut t = Table::new();
        if added.is_empty() && !trailing.trim().is_empty() {
            t.decor_mut()
                .set_prefix(format!("{}\n\n", trailing.trim_end()));
        }
        t.insert("mac", value(mac.to_string()));
        t.insert("ip", value(ip.to_string()));
        t.insert("role", value(role.to_string()));
        nodes.insert(name, Item::Table(t));
        added.push(Adopted {
            name: name.clone(),
            mac: *mac,
            ip,
            role,
        });
    }
    let out = doc.to_string();
    if let Err(d) = parse_str(&out, path) {
        return Err(format!(
            "the inventory would not be valid with these nodes, so nothing was written:\n{d}"
        ));
    }
    Ok((out, added))
}

/// The next address for a new node: after the highest node address (or the
/// controller's), inside the subnet, and not the controller, the gateway, a
/// taken one or in the dynamic pool.
pub fn next_free_ip(inv: &Inventory, taken: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let c = &inv.controller;
    let start = taken
        .iter()
        .copied()
        .chain(inv.nodes.values().map(|n| n.ip))
        .max()
        .unwrap_or(c.address)
        .max(c.address);
    (1..1024u32)
        .filter_map(|i| u32::from(start).checked_add(i).map(Ipv4Addr::from))
        .find(|ip| {
            !taken.contains(ip)
                && *ip != c.address
                && Some(*ip) != c.gateway
                && c.subnet
                    .map(|s| s.contains(ip) && *ip != s.broadcast())
                    .unwrap_or(true)
                && !c.pool.is_some_and(|p| p.contains(*ip))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# my lab\n[controller]\n# the lab switch\ninterface = \"eth0\"\naddress = \"10.0.0.1\"\n\
        subnet = \"10.0.0.0/24\"\ndhcp = \"authoritative\"\ngateway = \"10.0.0.2\"\npool = \"10.0.0.13-10.0.0.20\"\n\n\
        [cluster]\nk3s_version = \"v1.31.4+k3s1\"\n\n[os]\nimage = \"https://example.org/os.raw\"\n\
        sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n\n\
        # the first machine\n[nodes.s1]\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.11\" # by the door\nrole = \"server\"\n\n\
        # more below\n";

    fn inv() -> Inventory {
        parse_str(TEXT, Path::new("inventory.toml"))
            .unwrap_or_else(|d| panic!("{d}"))
            .inventory
    }

    fn macs(n: u8) -> Vec<MacAddr> {
        (0..n).map(|i| MacAddr([0x52, 0x54, 0, 0, 1, i])).collect()
    }

    #[test]
    fn adopting_keeps_comments_and_picks_free_addresses() {
        let names = vec!["a1".to_string(), "a2".to_string()];
        let (out, added) = adopt(
            TEXT,
            Path::new("inventory.toml"),
            &inv(),
            &macs(3),
            &names,
            None,
        )
        .unwrap();
        for comment in [
            "# my lab",
            "# the lab switch",
            "# the first machine",
            "# by the door",
            "# more below",
        ] {
            assert!(out.contains(comment), "{comment} lost:\n{out}");
        }
        assert!(
            out.starts_with(TEXT),
            "new tables go after the last comment:\n{out}"
        );
        // .12 is free; .13-.20 is the pool; .21 next.
        let ips: Vec<String> = added.iter().map(|a| a.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.12", "10.0.0.21"]);
        assert!(
            added.iter().all(|a| a.role == Role::Agent),
            "s1 is the server"
        );
        assert_eq!(added[0].mac, macs(1)[0]);
        let again = parse_str(&out, Path::new("inventory.toml"))
            .unwrap()
            .inventory;
        assert_eq!(again.nodes["a2"].mac, macs(2)[1]);
        assert!(
            out.contains(
                "[nodes.a1]\nmac = \"52:54:00:00:01:00\"\nip = \"10.0.0.12\"\nrole = \"agent\"\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn the_first_node_of_an_empty_inventory_is_a_server() {
        let text = TEXT.split("# the first machine").next().unwrap();
        let inv = parse_str(text, Path::new("i.toml")).unwrap().inventory;
        let names = vec!["n1".to_string(), "n2".to_string()];
        let (out, added) = adopt(text, Path::new("i.toml"), &inv, &macs(2), &names, None).unwrap();
        assert_eq!((added[0].role, added[1].role), (Role::Server, Role::Agent));
        // After the controller (.1), skipping the gateway (.2).
        assert_eq!(added[0].ip.to_string(), "10.0.0.3");
        assert!(
            out.contains("[nodes.n1]") && !out.contains("[nodes]\n"),
            "{out}"
        );
        let (_, forced) = adopt(
            text,
            Path::new("i.toml"),
            &inv,
            &macs(1),
            &names[..1],
            Some(Role::Server),
        )
        .unwrap();
        assert_eq!(forced[0].role, Role::Server);
    }

    #[test]
    fn problems_refuse_everything() {
        let p = Path::new("inventory.toml");
        let e = adopt(TEXT, p, &inv(), &macs(3), &["s1".into()], None).unwrap_err();
        assert!(e.contains("already"), "{e}");
        let e = adopt(TEXT, p, &inv(), &macs(1), &["a".into(), "b".into()], None).unwrap_err();
        assert!(
            e.contains("2 names given but 1 unknown machine was seen"),
            "{e}"
        );
        let e = adopt(TEXT, p, &inv(), &macs(2), &["Bad_Name".into()], None).unwrap_err();
        assert!(e.contains("cannot be a node name"), "{e}");
        let e = adopt(TEXT, p, &inv(), &macs(2), &["x".into(), "x".into()], None).unwrap_err();
        assert!(e.contains("named twice"), "{e}");
        // Only agents would leave the cluster without a server: the result must validate.
        let text = TEXT.split("# the first machine").next().unwrap();
        let empty = parse_str(text, p).unwrap().inventory;
        let e = adopt(text, p, &empty, &macs(1), &["a".into()], Some(Role::Agent)).unwrap_err();
        assert!(
            e.contains("would not be valid") && e.contains("server"),
            "{e}"
        );
    }
}
