//! One command's channel: stdin written while output is read, output cut
//! into lines for the caller and kept up to a cap, the exit status, and the
//! remote PID (so a command that overstays its timeout can be killed).

use russh::client;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};

use super::output::{ExecResult, LineSplitter, Retained, Stream};
use super::SshError;

/// Lines longer than this are passed on in pieces (see [`LineSplitter`]).
const MAX_LINE: usize = 16 * 1024;

/// Reads the channel to its end while writing stdin; the writer is dropped
/// as soon as the command is done (a command that exits without reading
/// its input must not leave us waiting for window space).
pub(crate) async fn pump(
    reader: &mut ChannelReadHalf,
    writer: &ChannelWriteHalf<client::Msg>,
    stdin: Option<Vec<u8>>,
    collector: &mut Collector,
    on_line: &mut impl FnMut(Stream, &str),
) {
    let write = async {
        if let Some(bytes) = stdin {
            if writer.data_bytes(bytes).await.is_err() {
                return;
            }
        }
        let _ = writer.eof().await;
    };
    let read = async {
        while let Some(msg) = reader.wait().await {
            if !collector.take(msg, on_line) {
                break;
            }
        }
        collector.flush(on_line);
    };
    tokio::pin!(write, read);
    tokio::select! {
        () = &mut read => {}
        () = &mut write => read.await,
    }
}

/// The first stderr line of every command: the remote shell's PID, which is
/// also its process group (sshd starts each session with setsid), so a
/// timed-out command can be killed with everything it started.
const PID_MARKER: &str = "homelab-pid ";

pub(crate) fn with_pid_marker(cmd: &str) -> String {
    format!("printf '{PID_MARKER}%s\\n' \"$$\" >&2; {cmd}")
}

/// The state of one command's channel as its messages arrive.
pub(crate) struct Collector {
    lines: [LineSplitter; 2],
    kept: [Retained; 2],
    status: Option<u32>,
    refused: bool,
    /// Stderr held back until the PID marker line is complete.
    preamble: Option<Vec<u8>>,
    /// The remote shell's PID, once its marker line has arrived.
    pub(crate) pid: Option<u32>,
}

impl Collector {
    pub(crate) fn new(max_output: usize) -> Collector {
        Collector {
            lines: [LineSplitter::new(MAX_LINE), LineSplitter::new(MAX_LINE)],
            kept: [Retained::new(max_output), Retained::new(max_output)],
            status: None,
            refused: false,
            preamble: Some(Vec::new()),
            pid: None,
        }
    }

    /// Takes one message; false once the channel is closed.
    fn take(&mut self, msg: ChannelMsg, on_line: &mut impl FnMut(Stream, &str)) -> bool {
        match msg {
            ChannelMsg::Data { data } => self.output(Stream::Stdout, &data, on_line),
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                if let Some(rest) = self.after_marker(&data) {
                    self.output(Stream::Stderr, &rest, on_line);
                }
            }
            ChannelMsg::ExitStatus { exit_status } => self.status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                self.status.get_or_insert(128 + signal_number(&signal_name));
            }
            ChannelMsg::Failure => self.refused = true,
            ChannelMsg::Eof => self.flush(on_line),
            ChannelMsg::Close => {
                self.flush(on_line);
                return false;
            }
            _ => {}
        }
        true
    }

    fn output(&mut self, stream: Stream, data: &[u8], on_line: &mut impl FnMut(Stream, &str)) {
        let i = stream as usize;
        self.kept[i].push(data);
        self.lines[i].push(data, |line| on_line(stream, line));
    }

    /// Takes the PID marker off the front of stderr: None while its line is
    /// incomplete, then the stderr bytes that follow it. A first line that
    /// is not the marker is passed on untouched.
    fn after_marker(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let Some(pre) = self.preamble.as_mut() else {
            return Some(data.to_vec());
        };
        pre.extend_from_slice(data);
        let newline = pre.iter().position(|&b| b == b'\n');
        if newline.is_none() && pre.len() < 64 {
            return None;
        }
        let pre = self.preamble.take().unwrap_or_default();
        let first = &pre[..newline.unwrap_or(0)];
        let pid = std::str::from_utf8(first)
            .ok()
            .and_then(|l| l.strip_prefix(PID_MARKER))
            .and_then(|p| p.trim().parse().ok());
        match (pid, newline) {
            (Some(pid), Some(n)) => {
                self.pid = Some(pid);
                Some(pre[n + 1..].to_vec())
            }
            _ => Some(pre),
        }
    }

    /// Passes on the last line of each stream when it lacks a newline.
    fn flush(&mut self, on_line: &mut impl FnMut(Stream, &str)) {
        if let Some(pre) = self.preamble.take() {
            self.output(Stream::Stderr, &pre, on_line);
        }
        self.lines[0].finish(|line| on_line(Stream::Stdout, line));
        self.lines[1].finish(|line| on_line(Stream::Stderr, line));
    }

    pub(crate) fn finish(self, node: &str, label: &str) -> Result<ExecResult, SshError> {
        let Collector {
            kept: [out, err],
            status,
            refused,
            ..
        } = self;
        let Some(status) = status else {
            let why = if refused {
                format!("sshd refused to run `{label}`")
            } else {
                label.to_string()
            };
            return Err(SshError::NoExitStatus {
                node: node.to_string(),
                command: why,
            });
        };
        let (stdout, out_cut) = out.finish();
        let (stderr, err_cut) = err.finish();
        Ok(ExecResult {
            status,
            stdout,
            stderr,
            truncated: out_cut || err_cut,
        })
    }
}

/// Signal numbers as Linux has them, for the shell's 128+N convention.
fn signal_number(sig: &Sig) -> u32 {
    match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => 127,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_and_status_are_collected() {
        let mut c = Collector::new(1024);
        let mut seen = Vec::new();
        let mut on_line = |s: Stream, l: &str| seen.push((s, l.to_string()));
        let msgs = [
            ChannelMsg::Data {
                data: b"one\ntw"[..].into(),
            },
            ChannelMsg::ExtendedData {
                data: b"oops\n"[..].into(),
                ext: 1,
            },
            ChannelMsg::Data {
                data: b"o\nlast"[..].into(),
            },
            ChannelMsg::ExitStatus { exit_status: 3 },
            ChannelMsg::Eof,
        ];
        for m in msgs {
            assert!(c.take(m, &mut on_line));
        }
        assert!(!c.take(ChannelMsg::Close, &mut on_line));
        let r = c.finish("node1", "cmd").unwrap();
        assert_eq!((r.status, r.stdout.as_str()), (3, "one\ntwo\nlast"));
        assert_eq!(r.stderr, "oops\n");
        assert_eq!(
            seen,
            [
                (Stream::Stdout, "one".to_string()),
                (Stream::Stderr, "oops".to_string()),
                (Stream::Stdout, "two".to_string()),
                (Stream::Stdout, "last".to_string()),
            ]
        );
    }

    #[test]
    fn a_killed_command_reports_128_plus_the_signal() {
        let mut c = Collector::new(64);
        c.take(
            ChannelMsg::ExitSignal {
                signal_name: Sig::KILL,
                core_dumped: false,
                error_message: String::new(),
                lang_tag: String::new(),
            },
            &mut |_, _| {},
        );
        assert_eq!(c.finish("n", "c").unwrap().status, 137);
    }

    #[test]
    fn the_pid_marker_is_taken_off_stderr_even_when_split() {
        let mut c = Collector::new(1024);
        let mut seen = Vec::new();
        let mut on_line = |s: Stream, l: &str| seen.push((s, l.to_string()));
        for chunk in [&b"homelab-p"[..], b"id 4242\nwarn", b"ing\n"] {
            c.take(
                ChannelMsg::ExtendedData {
                    data: chunk.into(),
                    ext: 1,
                },
                &mut on_line,
            );
        }
        c.take(ChannelMsg::ExitStatus { exit_status: 0 }, &mut on_line);
        assert_eq!(c.pid, Some(4242));
        assert_eq!(seen, [(Stream::Stderr, "warning".to_string())]);
        assert_eq!(c.finish("n", "c").unwrap().stderr, "warning\n");
        assert!(with_pid_marker("uname").ends_with(">&2; uname"));
    }

    #[test]
    fn stderr_without_a_marker_is_passed_on_whole() {
        let mut c = Collector::new(1024);
        let mut seen = Vec::new();
        let mut on_line = |_: Stream, l: &str| seen.push(l.to_string());
        c.take(
            ChannelMsg::ExtendedData {
                data: b"no newline here"[..].into(),
                ext: 1,
            },
            &mut on_line,
        );
        c.take(ChannelMsg::Close, &mut on_line);
        assert_eq!(c.pid, None);
        assert_eq!(seen, ["no newline here"]);
    }

    #[test]
    fn no_status_is_an_error() {
        let c = Collector::new(64);
        let e = c.finish("node1", "uname").unwrap_err();
        assert!(matches!(e, SshError::NoExitStatus { .. }), "{e}");
    }
}
