//! Progress of a long fetch as events, so `homelab up` and `homelab events`
//! show a multi-gigabyte image coming in instead of minutes of silence.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::State;
use crate::ui::format_bytes;

/// At most one progress event this often per fetch.
const EVERY: Duration = Duration::from_secs(5);

/// A progress callback for [`super::Store::fetch`] that records an
/// `artifact.progress` event every few seconds while bytes arrive.
pub fn events(state: State, name: &str) -> impl Fn(u64, Option<u64>) + Send + Sync {
    let name = name.to_string();
    let started = Instant::now();
    let last = Mutex::new(started);
    move |done, total| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < EVERY || total.is_some_and(|t| done >= t) {
            return;
        }
        *last = Instant::now();
        let message = message(&name, done, total, started.elapsed());
        let _ = state.append_event(
            None,
            "artifact.progress",
            &message,
            serde_json::json!({ "name": name, "done": done, "total": total }),
        );
    }
}

/// Pure: "fetching os-image: 412.0 MiB of 2.0 GiB (20 %), 12.3 MiB/s".
pub fn message(name: &str, done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let of = match total {
        Some(t) if t > 0 => format!(" of {} ({} %)", format_bytes(t), done * 100 / t),
        _ => String::new(),
    };
    format!(
        "fetching {name}: {}{of}, {}/s",
        format_bytes(done),
        format_bytes(rate as u64)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_how_much_of_what_and_how_fast() {
        let m = message(
            "os-image",
            400 << 20,
            Some(2 << 30),
            Duration::from_secs(40),
        );
        assert!(
            m.starts_with("fetching os-image: 400.0 MiB of 2.0 GiB (19 %), 10.0 MiB/s"),
            "{m}"
        );
        let m = message("k3s-binary", 1 << 20, None, Duration::from_secs(1));
        assert_eq!(m, "fetching k3s-binary: 1.0 MiB, 1.0 MiB/s");
    }
}
