//! A writer for the "newc" cpio format, the one the Linux kernel unpacks as
//! an initramfs. Pure: entries go into any `Write`.

use std::io::{self, Write};

/// Writes newc entries; [`Cpio::finish`] adds the trailer.
pub struct Cpio<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

const MAGIC: &str = "070701";

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// A directory (mode 0755).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, 0o040755, &[])
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, 0o100000 | (perm & 0o7777), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, 0o120777, target.as_bytes())
    }

    /// A character device node (the kernel needs `/dev/console` before /init runs).
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(path, 0o020000 | (perm & 0o7777), 0, (major, minor))?;
        Ok(())
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(path, mode, data.len(), (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    fn header(&mut self, path: &str, mode: u32, size: usize, rdev: (u32, u32)) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio path {path:?}"),
            ));
        }
        let size = u32::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut head = String::with_capacity(110);
        head.push_str(MAGIC);
        for f in fields {
            head.push_str(&format!("{f:08x}"));
        }
        self.put(head.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// Pad to the next multiple of four bytes.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// Write the trailer and hand back the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_readable_by_cpio() {
        let mut c = Cpio::new(Vec::new());
        c.dir("etc").unwrap();
        c.file("/etc/hello", 0o644, b"hello\n").unwrap();
        c.symlink("init", "bin/agent").unwrap();
        c.char_device("dev/console", 0o600, 5, 1).unwrap();
        let bytes = c.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The header of the file: mode 100644, size 6.
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("etc/hello\0"));
        assert!(text.contains("TRAILER!!!\0"));

        // The real cpio tool lists what we wrote, when it is installed.
        if let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(&bytes).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            let listed = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                listed.lines().collect::<Vec<_>>(),
                ["etc", "etc/hello", "init", "dev/console"]
            );
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut c = Cpio::new(Vec::new());
        assert!(c.file("/", 0o644, b"").is_err());
        assert!(c.file("a\0b", 0o644, b"").is_err());
    }
}
