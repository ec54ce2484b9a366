//! Growing the partition table of a freshly written image to the disk it
//! was written to: an image made for 2 GiB lands on a 1 TB disk with its
//! backup GPT in the middle and its root partition 2 GiB long.
//!
//! [`grow`] is pure. It edits the image's first sectors in memory (protective
//! MBR, primary GPT header and entries: the agent writes that head last) and
//! returns the backup GPT to write at the end of the disk. The last
//! partition (the root, in images made for this) is extended to the end of
//! the usable space, aligned to 1 MiB; the filesystem inside is grown by
//! cloud-init on first boot. An MBR-only image gets its last partition
//! extended the same way.

use anyhow::{bail, ensure, Result};

const SECTOR: u64 = 512;
const ALIGN: u64 = 2048; // 1 MiB in sectors

/// Bytes to write at an offset of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// What [`grow`] did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    pub table: &'static str,
    pub partition: usize,
    pub old_end_sector: u64,
    pub new_end_sector: u64,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Grow the table in `head` (the first sectors of the disk, at least the
/// primary GPT) for a disk of `disk_bytes`. Returns what it did and the
/// writes beyond the head; `Ok(None)` when there is no partition table or
/// nothing to grow.
pub fn grow(head: &mut [u8], disk_bytes: u64) -> Result<Option<(Grown, Vec<DiskWrite>)>> {
    if head.len() >= 1024 && &head[512..520] == b"EFI PART" {
        return grow_gpt(head, disk_bytes).map(Some);
    }
    if head.len() >= 512 && head[510..512] == [0x55, 0xaa] {
        return Ok(grow_mbr(head, disk_bytes));
    }
    Ok(None)
}

fn grow_gpt(head: &mut [u8], disk_bytes: u64) -> Result<(Grown, Vec<DiskWrite>)> {
    let disk_sectors = disk_bytes / SECTOR;
    let h = 512usize;
    let hdr_size = u32_at(head, h + 12) as usize;
    ensure!(
        (92..=512).contains(&hdr_size),
        "GPT header size {hdr_size} is invalid"
    );
    let entries_lba = u64_at(head, h + 72);
    let count = u32_at(head, h + 80) as usize;
    let entry_size = u32_at(head, h + 84) as usize;
    ensure!(
        entry_size >= 128 && count > 0 && count <= 1024,
        "GPT entry table is invalid"
    );
    let table_bytes = count * entry_size;
    let table_at = (entries_lba * SECTOR) as usize;
    ensure!(
        head.len() >= table_at + table_bytes,
        "the GPT entries lie beyond the first {} bytes of the image",
        head.len()
    );
    let table_sectors = (table_bytes as u64).div_ceil(SECTOR);
    let alt = disk_sectors - 1;
    let backup_entries = alt - table_sectors;
    let last_usable = backup_entries - 1;
    let old_alt = u64_at(head, h + 32);
    if disk_sectors <= old_alt {
        bail!(
            "the image ({} sectors) is larger than the disk ({disk_sectors} sectors)",
            old_alt + 1
        );
    }

    // The partition that ends last is the one to grow.
    let mut last: Option<(usize, u64)> = None;
    for i in 0..count {
        let e = &head[table_at + i * entry_size..][..entry_size];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let end = u64_at(e, 40);
        if last.is_none_or(|(_, best)| end > best) {
            last = Some((i, end));
        }
    }
    let Some((index, old_end)) = last else {
        bail!("the GPT has no partitions");
    };
    let aligned = ((last_usable + 1) / ALIGN) * ALIGN - 1;
    let new_end = if aligned > old_end {
        aligned
    } else {
        last_usable.max(old_end)
    };
    put_u64(head, table_at + index * entry_size + 40, new_end);

    let entries_crc = crc32fast::hash(&head[table_at..table_at + table_bytes]);
    put_u64(head, h + 32, alt);
    put_u64(head, h + 48, last_usable);
    put_u32(head, h + 88, entries_crc);
    seal(&mut head[h..h + hdr_size]);

    // The protective MBR covers the whole disk (capped at 2 TiB's worth).
    if head[446 + 4] == 0xee {
        put_u32(
            head,
            446 + 12,
            (disk_sectors - 1).min(u32::MAX as u64) as u32,
        );
    }

    let mut backup = head[h..h + 512].to_vec();
    put_u64(&mut backup, 24, alt);
    put_u64(&mut backup, 32, 1);
    put_u64(&mut backup, 72, backup_entries);
    seal(&mut backup[..hdr_size]);
    let writes = vec![
        DiskWrite {
            offset: backup_entries * SECTOR,
            bytes: head[table_at..table_at + table_bytes].to_vec(),
        },
        DiskWrite {
            offset: alt * SECTOR,
            bytes: backup,
        },
    ];
    Ok((
        Grown {
            table: "GPT",
            partition: index + 1,
            old_end_sector: old_end,
            new_end_sector: new_end,
        },
        writes,
    ))
}

/// Recompute a GPT header's CRC32 (computed with the field zeroed).
fn seal(header: &mut [u8]) {
    put_u32(header, 16, 0);
    let crc = crc32fast::hash(header);
    put_u32(header, 16, crc);
}

fn grow_mbr(head: &mut [u8], disk_bytes: u64) -> Option<(Grown, Vec<DiskWrite>)> {
    let disk_sectors = (disk_bytes / SECTOR).min(u32::MAX as u64);
    let mut last: Option<(usize, u64, u64)> = None;
    for i in 0..4 {
        let e = 446 + i * 16;
        let (kind, start, len) = (
            head[e + 4],
            u32_at(head, e + 8) as u64,
            u32_at(head, e + 12) as u64,
        );
        // Extended partitions (5, 0xf, 0x85) are left alone: growing them
        // would need their logical partitions rewritten too.
        if kind == 0 || len == 0 || matches!(kind, 0x05 | 0x0f | 0x85 | 0xee) {
            continue;
        }
        if last.is_none_or(|(_, s, l)| start + len > s + l) {
            last = Some((i, start, len));
        }
    }
    let (i, start, len) = last?;
    let new_end = (disk_sectors / ALIGN) * ALIGN;
    if new_end <= start + len {
        return None;
    }
    put_u32(head, 446 + i * 16 + 12, (new_end - start) as u32);
    Some((
        Grown {
            table: "MBR",
            partition: i + 1,
            old_end_sector: start + len - 1,
            new_end_sector: new_end - 1,
        },
        Vec::new(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sfdisk(args: &[&str], input: &str) -> Option<String> {
        let mut child = Command::new("sfdisk")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        use std::io::Write;
        child.stdin.take()?.write_all(input.as_bytes()).ok()?;
        let out = child.wait_with_output().ok()?;
        assert!(
            out.status.success(),
            "sfdisk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An image with a real GPT made by sfdisk, written to a bigger "disk",
    /// grown, and checked by sfdisk itself.
    #[test]
    fn a_gpt_image_grows_to_the_disk_and_sfdisk_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let Some(_) = sfdisk(
            &["-q", image.to_str().unwrap()],
            "label: gpt\n,1MiB,21686148-6449-6E6F-744E-656564454649\n,8MiB,U\n,,4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n",
        ) else {
            assert!(!crate::agent::tests_require_tools(), "sfdisk is missing");
            return;
        };
        let bytes = std::fs::read(&image).unwrap();
        let disk = dir.path().join("disk");
        let disk_bytes: u64 = 200 << 20;
        let mut head = bytes[..1 << 20].to_vec();
        let (grown, writes) = grow(&mut head, disk_bytes).unwrap().unwrap();
        assert_eq!(grown.partition, 3);
        let mut disk_data = bytes.clone();
        disk_data.resize(disk_bytes as usize, 0);
        disk_data[..head.len()].copy_from_slice(&head);
        for w in writes {
            disk_data[w.offset as usize..][..w.bytes.len()].copy_from_slice(&w.bytes);
        }
        std::fs::write(&disk, &disk_data).unwrap();
        // sfdisk --verify finds no problem, and partition 3 now ends 1 MiB-aligned near the end.
        let verify = Command::new("sfdisk")
            .args(["--verify", disk.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&verify.stdout).to_string()
            + &String::from_utf8_lossy(&verify.stderr);
        assert!(
            verify.status.success() && text.contains("No errors detected"),
            "{text}"
        );
        let dump = sfdisk(&["-J", disk.to_str().unwrap()], "").unwrap();
        let json: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let parts = json["partitiontable"]["partitions"].as_array().unwrap();
        let p3 = &parts[2];
        let end = p3["start"].as_u64().unwrap() + p3["size"].as_u64().unwrap();
        assert_eq!(end, (disk_bytes / 512 - 33) / 2048 * 2048, "{dump}");
        assert_eq!(
            json["partitiontable"]["lastlba"].as_u64().unwrap(),
            disk_bytes / 512 - 34
        );
        // The untouched partitions keep their places.
        assert_eq!(parts[1]["size"].as_u64().unwrap(), 8 * 2048);
    }

    #[test]
    fn an_mbr_image_grows_its_last_partition() {
        let mut head = vec![0u8; 4096];
        head[510] = 0x55;
        head[511] = 0xaa;
        let e = 446;
        head[e + 4] = 0x83;
        put_u32(&mut head, e + 8, 2048);
        put_u32(&mut head, e + 12, 10_000);
        let (g, writes) = grow(&mut head, 100 << 20).unwrap().unwrap();
        assert!(writes.is_empty());
        assert_eq!(g.table, "MBR");
        assert_eq!(u32_at(&head, e + 12) as u64, (100 << 20) / 512 - 2048);
    }

    #[test]
    fn no_table_or_a_too_small_disk() {
        let mut blank = vec![0u8; 4096];
        assert_eq!(grow(&mut blank, 1 << 30).unwrap(), None);
        let mut gpt = vec![0u8; 1 << 20];
        gpt[512..520].copy_from_slice(b"EFI PART");
        put_u32(&mut gpt, 512 + 12, 92);
        put_u64(&mut gpt, 512 + 32, (64 << 20) / 512 - 1);
        put_u64(&mut gpt, 512 + 72, 2);
        put_u32(&mut gpt, 512 + 80, 128);
        put_u32(&mut gpt, 512 + 84, 128);
        let err = grow(&mut gpt, 32 << 20).unwrap_err().to_string();
        assert!(err.contains("larger than the disk"), "{err}");
    }
}
