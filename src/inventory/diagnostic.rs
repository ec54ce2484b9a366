//! Diagnostics: what is wrong with an inventory file, where, and how to fix it.
//!
//! A diagnostic carries its position as a 1-based line and column (counted in
//! characters, not bytes) plus the source line it points into, so it can be
//! printed rustc-style without the file at hand.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The inventory cannot be used.
    Error,
    /// The inventory works, but probably not as the user meant.
    Warning,
}

/// The source line a diagnostic points into, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snippet {
    /// The whole line, without its line ending.
    pub text: String,
    /// How many characters to underline, starting at the diagnostic's column (at least 1).
    pub width: usize,
}

/// One finding about an inventory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file, as the user named it.
    pub file: PathBuf,
    /// 1-based line; 0 when the finding is about the whole file (missing file, missing table).
    pub line: usize,
    /// 1-based column in characters; 0 when `line` is 0.
    pub column: usize,
    /// Dotted key the finding is about, e.g. "nodes.node1.mac" (may be empty for syntax errors
    /// outside any key).
    pub key: String,
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
    /// The offending source line; None for whole-file findings.
    pub snippet: Option<Snippet>,
}

/// Convert a byte offset into `src` to a 1-based (line, column), the column counted in
/// characters. Offsets past the end clamp to the end; offsets inside a multi-byte character
/// count as that character.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(src, offset);
    let before = &src[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(src: &str, offset: usize) -> usize {
    let mut i = offset.min(src.len());
    while !src.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The line of `src` containing byte `offset`, as (start, end) byte offsets without the line
/// ending.
fn line_bounds(src: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(src, offset);
    let start = src[..offset].rfind('\n').map_or(0, |i| i + 1);
    let mut end = src[offset..].find('\n').map_or(src.len(), |i| offset + i);
    if end > start && src.as_bytes()[end - 1] == b'\r' {
        end -= 1;
    }
    (start, end)
}

impl Diagnostic {
    /// A finding at a byte span of `src`.
    pub fn at(
        severity: Severity,
        file: &Path,
        src: &str,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = line_col(src, span.start);
        let (ls, le) = line_bounds(src, span.start);
        let start = floor_char_boundary(src, span.start).max(ls);
        let end = floor_char_boundary(src, span.end).clamp(start, le.max(start));
        let width = src[start..end].chars().count().max(1);
        Diagnostic {
            severity,
            file: file.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
            help: Some(help.into()),
            snippet: Some(Snippet {
                text: src[ls..le].to_string(),
                width,
            }),
        }
    }

    /// A finding about the whole file (no position).
    pub fn whole_file(
        severity: Severity,
        file: &Path,
        key: impl Into<String>,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity,
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            key: key.into(),
            message: message.into(),
            help: Some(help.into()),
            snippet: None,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{label}: {}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)?;
        let gutter = match &self.snippet {
            Some(snippet) if self.line > 0 => {
                let num = self.line.to_string();
                let pad = " ".repeat(num.len());
                // Keep tabs so the carets line up with the text above them.
                let indent: String = snippet
                    .text
                    .chars()
                    .take(self.column.saturating_sub(1))
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                write!(
                    f,
                    "\n{pad} |\n{num} | {}\n{pad} | {indent}{}",
                    snippet.text,
                    "^".repeat(snippet.width)
                )?;
                pad
            }
            _ => " ".to_string(),
        };
        if let Some(help) = &self.help {
            write!(f, "\n{gutter} = help: {help}")?;
        }
        Ok(())
    }
}

/// Every finding about a file. Returned as the error of a failed load; it also carries the
/// warnings found along the way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| !d.is_error())
    }
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_not_bytes() {
        let src = "a = 1\nné = \"é€\" # x\n\nlast";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 4), (1, 5));
        // Start of line 2.
        assert_eq!(line_col(src, 6), (2, 1));
        // The '=' after "né " : bytes n(1) é(2) space(1) -> offset 6+4 = 10, column 4.
        assert_eq!(&src[10..11], "=");
        assert_eq!(line_col(src, 10), (2, 4));
        // The '#' after "né = \"é€\" ": 10 characters before it.
        let hash = src.find('#').unwrap();
        assert_eq!(line_col(src, hash), (2, 11));
        // Inside a multi-byte character: counts as that character.
        let euro = src.find('€').unwrap();
        assert_eq!(line_col(src, euro + 1), line_col(src, euro));
        // Empty line and last line; past the end clamps.
        assert_eq!(line_col(src, src.find("\n\n").unwrap() + 1), (3, 1));
        assert_eq!(line_col(src, src.len()), (4, 5));
        assert_eq!(line_col(src, src.len() + 10), (4, 5));
        assert_eq!(line_col("", 0), (1, 1));
    }

    proptest::proptest! {
        #[test]
        fn line_col_matches_a_naive_count(s in "\\PC{0,30}(\n\\PC{0,30}){0,4}", frac in 0.0f64..=1.0) {
            let offset = floor_char_boundary(&s, (s.len() as f64 * frac) as usize);
            let before = &s[..offset];
            let line = before.split('\n').count();
            let column = before.split('\n').next_back().unwrap().chars().count() + 1;
            proptest::prop_assert_eq!(line_col(&s, offset), (line, column));
        }
    }

    #[test]
    fn renders_like_rustc() {
        let src = "[nodes.node1]\nmac = \"52:54:00:zz:00:01\"\n";
        let start = src.find('"').unwrap();
        let d = Diagnostic::at(
            Severity::Error,
            Path::new("inventory.toml"),
            src,
            start..start + 19,
            "nodes.node1.mac",
            "`52:54:00:zz:00:01` is not a MAC address",
            "write six hex pairs such as \"52:54:00:12:34:56\"",
        );
        assert_eq!(
            d.to_string(),
            "error: inventory.toml:2:7: nodes.node1.mac: `52:54:00:zz:00:01` is not a MAC address\n  |\n2 | mac = \"52:54:00:zz:00:01\"\n  |       ^^^^^^^^^^^^^^^^^^^\n  = help: write six hex pairs such as \"52:54:00:12:34:56\""
        );
    }

    #[test]
    fn two_digit_lines_widen_the_gutter_and_warnings_say_so() {
        let src = format!("{}role = \"server\"\r\n", "\n".repeat(11));
        let start = src.find('"').unwrap();
        let d = Diagnostic::at(
            Severity::Warning,
            Path::new("x.toml"),
            &src,
            start..start + 8,
            "k",
            "m",
            "h",
        );
        assert_eq!(d.line, 12);
        assert_eq!(d.to_string(), "warning: x.toml:12:8: k: m\n   |\n12 | role = \"server\"\n   |        ^^^^^^^^\n   = help: h");
    }

    #[test]
    fn spans_are_cut_at_the_end_of_the_line_and_never_empty() {
        let src = "a = \"\"\"x\ny\"\"\"\nb = \"";
        let d = Diagnostic::at(Severity::Error, Path::new("f"), src, 4..13, "a", "m", "h");
        // Only `"""x`, the part on the first line, is underlined.
        assert_eq!(d.snippet.as_ref().unwrap().width, 4);
        let d = Diagnostic::at(
            Severity::Error,
            Path::new("f"),
            src,
            src.len()..src.len(),
            "b",
            "m",
            "h",
        );
        assert_eq!((d.line, d.column), (3, 6));
        assert_eq!(d.snippet.unwrap().width, 1);
    }

    #[test]
    fn whole_file_findings_have_no_position() {
        let d = Diagnostic::whole_file(
            Severity::Error,
            Path::new("inv.toml"),
            "os",
            "missing [os] table",
            "add it",
        );
        assert_eq!(
            d.to_string(),
            "error: inv.toml: os: missing [os] table\n  = help: add it"
        );
        let all = Diagnostics(vec![d.clone(), d]);
        assert_eq!(all.to_string().matches("error:").count(), 2);
        assert!(all.has_errors());
    }
}
