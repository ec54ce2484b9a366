//! The inventory: `inventory.toml` read into a typed, validated [`Inventory`].
//!
//! Nothing runs on an invalid file, so loading reports every problem at once, each with
//! file:line:column, the dotted key and how to fix it. The TOML is walked by hand through
//! toml's spanned tree (not serde) precisely so that one bad value does not hide the rest.

pub mod adopt;
mod diagnostic;
pub mod init;
mod model;
mod node_labels;
mod parse;
mod validate;

use std::path::{Path, PathBuf};

pub use diagnostic::{line_col, Diagnostic, Diagnostics, Severity, Snippet};
pub use model::*;
pub use parse::digest_problem;

/// The commented example; it documents every key. `homelab init` writes it
/// filled in for the machine it runs on, without the sample nodes (see `init`).
pub const EXAMPLE: &str = include_str!("../../inventory.example.toml");

/// A valid inventory and the warnings found while reading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub inventory: Inventory,
    pub warnings: Vec<Diagnostic>,
}

/// Read and validate the inventory at `path`.
///
/// On failure the [`Diagnostics`] hold every error (and any warnings), in file order.
pub fn load(path: &Path) -> Result<Loaded, Diagnostics> {
    match std::fs::read_to_string(path) {
        Ok(src) => parse_str(&src, path),
        Err(e) => {
            let (message, help) = match e.kind() {
                std::io::ErrorKind::NotFound => (
                    "no such file".to_string(),
                    "create one with `homelab init`, or name another file with -i/--inventory PATH"
                        .to_string(),
                ),
                std::io::ErrorKind::InvalidData => (
                    "the file is not UTF-8 text".to_string(),
                    "save the inventory as UTF-8 text".to_string(),
                ),
                _ => (
                    format!("cannot read the file: {e}"),
                    "check the path and its permissions".to_string(),
                ),
            };
            Err(Diagnostic::whole_file(Severity::Error, path, "", message, help).into())
        }
    }
}

/// Validate inventory text. `path` names the file in messages, and relative paths in the
/// file (boot profiles, a local OS image, ipxe_dir) are resolved against its folder and
/// stored absolute.
pub fn parse_str(src: &str, path: &Path) -> Result<Loaded, Diagnostics> {
    let mut ctx = parse::Ctx::new(src, path, base_dir(path));
    let (root, syntax) = toml::de::DeTable::parse_recoverable(src);
    let inventory = if syntax.is_empty() {
        let draft = parse::document(&mut ctx, &root);
        validate::check(&mut ctx, &draft);
        validate::assemble(&ctx, draft, path)
    } else {
        // The tree is a best-effort recovery; judging its meaning would add noise.
        parse::syntax_errors(&mut ctx, &syntax);
        None
    };
    let mut diags = ctx.diags;
    diags.sort_by_key(|d| (d.line, d.column));
    match inventory {
        Some(inventory) if !diags.iter().any(Diagnostic::is_error) => Ok(Loaded {
            inventory,
            warnings: diags,
        }),
        _ => {
            if !diags.iter().any(Diagnostic::is_error) {
                // Defensive: assembly failed without saying why.
                diags.push(Diagnostic::whole_file(
                    Severity::Error,
                    path,
                    "",
                    "the inventory is incomplete",
                    "please report this: a value was rejected without an error message",
                ));
            }
            Err(Diagnostics(diags))
        }
    }
}

/// The absolute folder of the inventory file.
fn base_dir(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}
