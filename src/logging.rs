//! Logs: readable on a terminal, JSON lines for machines, RUST_LOG-style
//! filtering. Logs go to stderr; while progress bars are drawn, each log line
//! is printed above them instead of through them.

use std::io::Write;
use std::sync::OnceLock;

use clap::ValueEnum;
use indicatif::MultiProgress;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Route log lines above these progress bars from now on.
pub fn attach_progress(bars: &MultiProgress) {
    let _ = BARS.set(bars.clone());
}

/// Install the global subscriber. `default_level` applies when RUST_LOG is unset.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(StderrAboveBars);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

#[derive(Clone, Copy)]
struct StderrAboveBars;

/// Buffers one formatted event and writes it in one piece, above the bars if any.
struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let out = std::mem::take(&mut self.0);
        let write = || {
            let _ = std::io::stderr().lock().write_all(&out);
        };
        match BARS.get() {
            Some(bars) => bars.suspend(write),
            None => write(),
        }
    }
}

impl<'a> MakeWriter<'a> for StderrAboveBars {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter(Vec::with_capacity(256))
    }
}
