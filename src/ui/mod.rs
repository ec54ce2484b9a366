//! What the user sees: live progress lines for `homelab up`, the `status`
//! table, and event lines for `homelab events`.

mod progress;
mod table;

pub use progress::{follow, FollowOptions, Outcome};
pub use table::{discover_table, event_line, format_bytes, status_table};

/// Format a Unix time in milliseconds as RFC 3339 UTC (second precision).
pub fn format_time(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Format a duration in whole seconds as "1m05s" / "12s".
pub fn format_elapsed(ms: i64) -> String {
    let s = (ms.max(0) / 1000) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_elapsed(5_400), "5s");
        assert_eq!(format_elapsed(65_000), "1m05s");
        assert_eq!(format_elapsed(3_720_000), "1h02m");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(512), "512 B");
    }
}
