//! Templates (iPXE scripts now; cloud-init, k3s and GitOps manifests as those
//! steps land) compiled into the binary, each overridable by a file of the same
//! relative name in a directory given with `--templates`.
//!
//! Undefined variables are errors: a typo in a template fails loudly instead
//! of rendering an empty string into a boot script. Nothing is HTML-escaped:
//! none of these outputs is HTML.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};

/// `builtin!("dir/name.j2")`: the template's relative name and its text, read
/// from the crate root at compile time.
macro_rules! builtin {
    ($name:literal) => {
        ($name, include_str!(concat!("../", $name)))
    };
}

/// Every built-in template. Adding a template is one line.
const BUILTIN: &[(&str, &str)] = &[
    builtin!("pxe/profile.ipxe.j2"),
    builtin!("pxe/installer.ipxe.j2"),
    builtin!("pxe/local-disk.ipxe.j2"),
    builtin!("pxe/unknown.ipxe.j2"),
    builtin!("pxe/wait.ipxe.j2"),
    builtin!("cloud-init/meta-data.j2"),
    builtin!("cloud-init/user-data.j2"),
    builtin!("cloud-init/network-config.j2"),
    builtin!("cloud-init/sshd-homelab.conf.j2"),
    builtin!("lab/inventory.toml.j2"),
    builtin!("k3s/config.yaml.j2"),
    builtin!("k3s/k3s.service.j2"),
    builtin!("k3s/uninstall.sh.j2"),
];

/// The template set in force.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// Built-in templates, with files under `override_dir` winning by name.
    ///
    /// Every template is compiled here, so a broken override stops start-up
    /// with its name instead of failing the first machine that boots.
    pub fn new(override_dir: Option<PathBuf>) -> Result<Templates> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.keep_trailing_newline(true);
        env.set_syntax(syntax.build().context("template syntax")?);
        for (name, text) in BUILTIN {
            let source = match override_dir.as_deref().map(|d| d.join(name)) {
                Some(path) if path.exists() => read_override(&path)?,
                _ => (*text).to_string(),
            };
            env.add_template_owned(name.to_string(), source)
                .with_context(|| format!("template {name} does not compile"))?;
        }
        if let Some(dir) = &override_dir {
            for stray in unused_overrides(dir) {
                tracing::warn!(
                    "template override {} matches no template and is ignored (known: {})",
                    stray.display(),
                    Templates::names().collect::<Vec<_>>().join(", ")
                );
            }
        }
        Ok(Templates { env })
    }

    /// Render template `name` with `context` (build it with [`minijinja::context!`]).
    pub fn render(&self, name: &str, context: impl Into<Value>) -> Result<String> {
        let template = self
            .env
            .get_template(name)
            .with_context(|| format!("no template named {name}"))?;
        template
            .render(context)
            .with_context(|| format!("rendering template {name}"))
    }

    /// The names of every template (built-in or overridden).
    pub fn names() -> impl Iterator<Item = &'static str> {
        BUILTIN.iter().map(|(n, _)| *n)
    }
}

fn read_override(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading template override {}", path.display()))
}

/// `*.j2` files under `dir` that override nothing (a misspelt name would
/// otherwise be ignored without a word).
fn unused_overrides(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "j2") {
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                if !Templates::names().any(|n| Path::new(n) == rel) {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    #[test]
    fn every_builtin_compiles_and_starts_as_an_ipxe_script() {
        let t = Templates::new(None).unwrap();
        assert_eq!(Templates::names().count(), BUILTIN.len());
        for (name, text) in BUILTIN {
            assert!(
                !name.starts_with("pxe/") || text.starts_with("#!ipxe\n"),
                "{name}"
            );
        }
        let out = t
            .render(
                "pxe/unknown.ipxe.j2",
                context! { mac => "52:54:00:00:00:01" },
            )
            .unwrap();
        assert!(
            out.starts_with("#!ipxe\n") && out.ends_with("exit 1\n"),
            "{out}"
        );
    }

    #[test]
    fn undefined_variables_are_errors() {
        let t = Templates::new(None).unwrap();
        let err = t.render("pxe/unknown.ipxe.j2", context! {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("pxe/unknown.ipxe.j2"),
            "{err:#}"
        );
        // Also inside tests and loops, not only in output.
        let err = t
            .render(
                "pxe/profile.ipxe.j2",
                context! { name => "n", mac => "m", kernel_url => "k", initrds => Vec::<Value>::new() },
            )
            .unwrap_err();
        assert!(format!("{err:#}").contains("undefined"), "{err:#}");
        assert!(t.render("pxe/nope.j2", context! {}).is_err());
    }

    #[test]
    fn nothing_is_html_escaped() {
        let t = Templates::new(None).unwrap();
        let out = t
            .render(
                "pxe/profile.ipxe.j2",
                context! {
                    name => "n1", mac => "m", kernel_url => "http://c/k?a=1&b=<2>",
                    initrds => Vec::<Value>::new(), cmdline => "x='y' & z",
                },
            )
            .unwrap();
        assert!(
            out.contains("kernel http://c/k?a=1&b=<2> x='y' & z ||"),
            "{out}"
        );
    }

    #[test]
    fn a_file_in_the_override_dir_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pxe")).unwrap();
        std::fs::write(
            dir.path().join("pxe/unknown.ipxe.j2"),
            "#!ipxe\necho custom {{ mac }}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("pxe/unknwon.ipxe.j2"), "typo").unwrap();
        std::fs::write(dir.path().join("README"), "not a template").unwrap();
        let t = Templates::new(Some(dir.path().to_path_buf())).unwrap();
        let out = t
            .render("pxe/unknown.ipxe.j2", context! { mac => "m" })
            .unwrap();
        assert_eq!(out, "#!ipxe\necho custom m\n");
        // Others stay built-in.
        assert!(t
            .render(
                "pxe/local-disk.ipxe.j2",
                context! { name => "n1", mac => "m" }
            )
            .unwrap()
            .contains("sanboot"));
        assert_eq!(
            unused_overrides(dir.path()),
            [dir.path().join("pxe/unknwon.ipxe.j2")]
        );
    }

    #[test]
    fn a_broken_override_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pxe")).unwrap();
        std::fs::write(dir.path().join("pxe/profile.ipxe.j2"), "{% if %}").unwrap();
        let err = Templates::new(Some(dir.path().to_path_buf())).unwrap_err();
        assert!(
            format!("{err:#}").contains("pxe/profile.ipxe.j2"),
            "{err:#}"
        );
    }
}
