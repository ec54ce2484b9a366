//! Templates (iPXE scripts now; cloud-init, k3s and GitOps manifests as those
//! steps land) compiled into the binary, each overridable by a file of the same
//! relative name in a directory given with `--templates`.
//!
//! Undefined variables are errors: a typo in a template fails loudly instead
//! of rendering an empty string into a boot script.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use minijinja::{Environment, UndefinedBehavior};

/// Every built-in template: (relative name, text). Adding a template is one line.
const BUILTIN: &[(&str, &str)] = &[
    (
        "pxe/profile.ipxe.j2",
        include_str!("../pxe/profile.ipxe.j2"),
    ),
    (
        "pxe/installer.ipxe.j2",
        include_str!("../pxe/installer.ipxe.j2"),
    ),
    (
        "pxe/local-disk.ipxe.j2",
        include_str!("../pxe/local-disk.ipxe.j2"),
    ),
    (
        "pxe/unknown.ipxe.j2",
        include_str!("../pxe/unknown.ipxe.j2"),
    ),
];

/// The template set in force.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// Built-in templates, with files under `override_dir` winning by name.
    pub fn new(override_dir: Option<PathBuf>) -> Result<Templates> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
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
        Ok(Templates { env })
    }

    /// Render template `name` with `context`.
    pub fn render(&self, name: &str, context: impl Into<minijinja::Value>) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    #[test]
    fn every_builtin_compiles() {
        let t = Templates::new(None).unwrap();
        assert_eq!(Templates::names().count(), BUILTIN.len());
        let out = t
            .render(
                "pxe/unknown.ipxe.j2",
                context! { mac => "52:54:00:00:00:01" },
            )
            .unwrap();
        assert!(out.starts_with("#!ipxe"));
    }

    #[test]
    fn undefined_variables_are_errors() {
        let t = Templates::new(None).unwrap();
        assert!(t.render("pxe/unknown.ipxe.j2", context! {}).is_err());
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
        let t = Templates::new(Some(dir.path().to_path_buf())).unwrap();
        let out = t
            .render("pxe/unknown.ipxe.j2", context! { mac => "m" })
            .unwrap();
        assert_eq!(out, "#!ipxe\necho custom m\n");
        // Others stay built-in.
        assert!(t
            .render("pxe/local-disk.ipxe.j2", context! { name => "n1" })
            .unwrap()
            .contains("sanboot"));
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
