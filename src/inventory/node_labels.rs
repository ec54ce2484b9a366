//! Kubernetes node labels and taints as the inventory writes them, checked
//! the way the kubelet would check them: a bad one would otherwise stop k3s
//! from starting on the node, far from the line that caused it.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The label homelab sets itself on every node.
pub const ROLE_LABEL: &str = "homelab.role";

/// A taint's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl fmt::Display for TaintEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        })
    }
}

/// A node taint, written "key=value:Effect" or "key:Effect".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: TaintEffect,
}

impl fmt::Display for Taint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect)
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect)
        }
    }
}

impl FromStr for Taint {
    type Err = String;
    fn from_str(s: &str) -> Result<Taint, String> {
        let (kv, effect) = s.rsplit_once(':').ok_or_else(|| {
            format!("`{s}` has no effect; write \"key=value:NoSchedule\" (or PreferNoSchedule, NoExecute)")
        })?;
        let effect = match effect {
            "NoSchedule" => TaintEffect::NoSchedule,
            "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
            "NoExecute" => TaintEffect::NoExecute,
            other => {
                return Err(format!(
                    "`{other}` is not a taint effect; use NoSchedule, PreferNoSchedule or NoExecute"
                ))
            }
        };
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        key_problem(key).map_or(Ok(()), |p| Err(format!("taint key `{key}` {p}")))?;
        value_problem(value).map_or(Ok(()), |p| Err(format!("taint value `{value}` {p}")))?;
        Ok(Taint {
            key: key.to_string(),
            value: value.to_string(),
            effect,
        })
    }
}

/// Why `key` is not a label (or taint) key: `[prefix/]name`, the prefix a
/// DNS subdomain, the name 1 to 63 characters.
pub fn key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 {
            return Some(
                "has a prefix (before '/') that is empty or longer than 253 characters".into(),
            );
        }
        let ok = p.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
        if !ok {
            return Some(format!(
                "has a prefix `{p}` that is not a lower-case DNS name such as \"example.com\""
            ));
        }
    }
    if name.is_empty() {
        return Some("has an empty name".into());
    }
    name_problem(name).map(|p| format!("has a name that {p}"))
}

/// Why `value` is not a label value (empty is allowed).
pub fn value_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    name_problem(value).map(String::from)
}

fn name_problem(s: &str) -> Option<&'static str> {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    if s.len() > 63 {
        Some("is longer than 63 characters")
    } else if !s
        .bytes()
        .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("contains characters other than letters, digits, '-', '_' and '.'")
    } else if !s.bytes().next().is_some_and(alnum) || !s.bytes().last().is_some_and(alnum) {
        Some("does not start and end with a letter or digit")
    } else {
        None
    }
}

/// Why a node may not set label `key` on itself, if it may not: the
/// kubelet refuses to start with labels in the kubernetes.io and k8s.io
/// namespaces other than the few it owns, and homelab owns its role label.
pub fn reserved_problem(key: &str) -> Option<String> {
    if key == ROLE_LABEL {
        return Some(format!(
            "`{ROLE_LABEL}` is set by homelab from the node's role"
        ));
    }
    let prefix = key.split_once('/').map(|(p, _)| p)?;
    let kube = |d: &str| prefix == d || prefix.ends_with(&format!(".{d}"));
    if !(kube("kubernetes.io") || kube("k8s.io")) {
        return None;
    }
    let allowed_prefix = ["kubelet.kubernetes.io", "node.kubernetes.io"]
        .iter()
        .any(|d| prefix == *d || prefix.ends_with(&format!(".{d}")));
    let allowed_key = [
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "node.kubernetes.io/instance-type",
    ]
    .contains(&key);
    (!(allowed_prefix || allowed_key)).then(|| {
        format!(
            "the kubelet refuses to set `{key}` on its own node (only node.kubernetes.io/, \
             kubelet.kubernetes.io/ and topology.kubernetes.io/region|zone are allowed there)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_parse_and_print_back() {
        let t: Taint = "dedicated=gpu:NoSchedule".parse().unwrap();
        assert_eq!(t.key, "dedicated");
        assert_eq!(t.value, "gpu");
        assert_eq!(t.effect, TaintEffect::NoSchedule);
        assert_eq!(t.to_string(), "dedicated=gpu:NoSchedule");
        let t: Taint = "example.com/maintenance:NoExecute".parse().unwrap();
        assert_eq!(t.to_string(), "example.com/maintenance:NoExecute");
        for (bad, says) in [
            ("dedicated=gpu", "no effect"),
            ("dedicated=gpu:NoSchedul", "not a taint effect"),
            ("=gpu:NoSchedule", "empty name"),
            ("a b=c:NoSchedule", "characters other than"),
            ("k=-x:NoSchedule", "start and end"),
            ("Example.com/k:NoSchedule", "prefix"),
        ] {
            let e = bad.parse::<Taint>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        assert_eq!(key_problem("disk"), None);
        assert_eq!(key_problem("example.com/disk-type"), None);
        assert_eq!(key_problem("topology.kubernetes.io/zone"), None);
        assert!(key_problem(&"a".repeat(64)).is_some());
        assert!(key_problem("/x").is_some());
        assert!(key_problem("a/").is_some());
        assert!(key_problem("a..b/x").is_some());
        assert_eq!(value_problem(""), None);
        assert_eq!(value_problem("ssd_1.a-b"), None);
        assert!(value_problem("ssd!").is_some());
        assert!(value_problem("-ssd").is_some());
    }

    #[test]
    fn reserved_label_namespaces() {
        assert_eq!(reserved_problem("disk"), None);
        assert_eq!(reserved_problem("topology.kubernetes.io/zone"), None);
        assert_eq!(reserved_problem("node.kubernetes.io/instance-type"), None);
        assert_eq!(reserved_problem("x.node.kubernetes.io/y"), None);
        assert!(reserved_problem("node-role.kubernetes.io/worker").is_some());
        assert!(reserved_problem("k8s.io/x").is_some());
        assert!(reserved_problem("homelab.role").is_some());
    }
}
