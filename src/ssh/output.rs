//! A remote command's output: cut into lines as it arrives (the caller turns
//! each into a node event, so progress shows while a long install runs) and
//! retained only up to a cap (a chatty command must not grow the controller
//! without bound).

/// Which of the command's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What a finished command left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit status; a command killed by a signal gets 128 + its number,
    /// as a shell reports it, so callers have one number to check.
    pub status: u32,
    /// The end of stdout (lossy UTF-8), at most the session's output cap.
    pub stdout: String,
    /// The end of stderr (lossy UTF-8), at most the session's output cap.
    pub stderr: String,
    /// Whether the beginning of either stream was dropped to stay under the
    /// cap, so a caller parsing stdout knows it does not have all of it.
    pub truncated: bool,
}

impl ExecResult {
    /// Exit status 0: the one check most steps need.
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// The last `n` lines of stderr: what an error message should quote.
    pub fn stderr_tail(&self, n: usize) -> String {
        last_lines(&self.stderr, n)
    }
}

/// The last `n` non-empty lines of `text`, joined with newlines.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Cuts a byte stream into lines across chunk boundaries: SSH delivers
/// data in packets that split lines (and UTF-8 sequences) anywhere.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    pending: Vec<u8>,
    max_line: usize,
}

impl LineSplitter {
    /// `max_line` bounds one unterminated line (a progress bar redrawn with
    /// `\r` forever, a binary blob): past it the text is passed on as a line.
    pub(crate) fn new(max_line: usize) -> LineSplitter {
        LineSplitter {
            pending: Vec::new(),
            max_line: max_line.max(1),
        }
    }

    /// Feeds a chunk; `emit` gets every line it completes, without `\n`/`\r\n`.
    pub(crate) fn push(&mut self, chunk: &[u8], mut emit: impl FnMut(&str)) {
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            let (text, ended) = match piece.split_last() {
                Some((b'\n', text)) => (text, true),
                _ => (piece, false),
            };
            self.pending.extend_from_slice(text);
            while self.pending.len() > self.max_line {
                let tail = self.pending.split_off(self.max_line);
                self.flush_line(&mut emit);
                self.pending = tail;
            }
            if ended {
                self.flush_line(&mut emit);
            }
        }
    }

    /// Emits what is left (a last line without a newline).
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(&str)) {
        if !self.pending.is_empty() {
            self.flush_line(&mut emit);
        }
    }

    fn flush_line(&mut self, emit: &mut impl FnMut(&str)) {
        let mut line = &self.pending[..];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        emit(&String::from_utf8_lossy(line));
        self.pending.clear();
    }
}

/// Keeps the last `cap` bytes of a stream: the end of a failing command's
/// stderr is where the reason is.
#[derive(Debug)]
pub(crate) struct Retained {
    buf: Vec<u8>,
    cap: usize,
    dropped: bool,
}

impl Retained {
    pub(crate) fn new(cap: usize) -> Retained {
        Retained {
            buf: Vec::new(),
            cap,
            dropped: false,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        // Drain in batches (at twice the cap) so a stream of small chunks
        // does not move the buffer on every packet.
        if self.buf.len() > self.cap.saturating_mul(2).max(4096) {
            self.trim();
        }
    }

    /// The retained text and whether anything was dropped.
    pub(crate) fn finish(mut self) -> (String, bool) {
        self.trim();
        let text = String::from_utf8_lossy(&self.buf);
        // A cut may land inside a UTF-8 sequence: drop the replacement
        // character that leaves at the start rather than show garbage.
        let text = if self.dropped {
            text.trim_start_matches('\u{fffd}').to_string()
        } else {
            text.into_owned()
        };
        (text, self.dropped)
    }

    fn trim(&mut self) {
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
            self.dropped = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max_line: usize) -> Vec<String> {
        let mut s = LineSplitter::new(max_line);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l.to_string()));
        }
        s.finish(|l| out.push(l.to_string()));
        out
    }

    #[test]
    fn lines_split_across_chunks_are_joined() {
        assert_eq!(
            split(&[b"al", b"pha\nbe", b"ta\r", b"\ngam", b"ma"], 1024),
            ["alpha", "beta", "gamma"]
        );
    }

    #[test]
    fn empty_lines_are_kept_and_no_trailing_empty_line_is_invented() {
        assert_eq!(split(&[b"a\n\nb\n"], 1024), ["a", "", "b"]);
        assert_eq!(split(&[b""], 1024), Vec::<String>::new());
    }

    #[test]
    fn utf8_split_across_chunks_survives() {
        let text = "héllo wörld\n".as_bytes();
        let (a, b) = text.split_at(2); // inside the 'é'
        assert_eq!(split(&[a, b], 1024), ["héllo wörld"]);
    }

    #[test]
    fn an_endless_line_is_cut_at_the_limit() {
        assert_eq!(
            split(&[b"abcdefg", b"hij\nk"], 4),
            ["abcd", "efgh", "ij", "k"]
        );
    }

    #[test]
    fn retained_keeps_the_end_within_the_cap() {
        let mut r = Retained::new(10);
        for i in 0..2000 {
            r.push(format!("{i}\n").as_bytes());
        }
        let (text, dropped) = r.finish();
        assert!(dropped);
        assert!(text.len() <= 10, "{text:?}");
        assert!(text.ends_with("1999\n"));

        let mut small = Retained::new(10);
        small.push(b"ok\n");
        assert_eq!(small.finish(), ("ok\n".to_string(), false));
    }

    #[test]
    fn stderr_tail_skips_blank_lines() {
        let r = ExecResult {
            status: 1,
            stdout: String::new(),
            stderr: "one\ntwo\n\nthree\n\n".into(),
            truncated: false,
        };
        assert_eq!(r.stderr_tail(2), "two\nthree");
        assert!(!r.success());
    }
}
