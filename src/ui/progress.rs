//! `homelab up`'s live view: one line per node (stage, time in stage, bytes
//! and speed where there are bytes) drawn with indicatif on a terminal, or
//! plain timestamped lines when stdout is not a terminal.
//!
//! The view reads only the state database (polling), so it works the same
//! whether the daemon runs in this process or elsewhere.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::inventory::Inventory;
use crate::plan::goal_reached;
use crate::state::{now_ms, NodeRecord, State};

use super::{event_line, format_bytes, format_elapsed};

#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// Draw live bars (stdout is a terminal) or print plain lines.
    pub live: bool,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// Only show events after this id.
    pub after_event: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every node reached its goal.
    Converged,
    /// Every node finished; these failed (name, cause).
    Failed(Vec<(String, String)>),
    TimedOut,
    Interrupted,
}

const POLL: Duration = Duration::from_millis(250);

/// Follow progress until every node of `inventory` is done, the timeout
/// passes, or `stop` resolves (Ctrl-C).
pub async fn follow(
    state: &State,
    inventory: &Inventory,
    opts: FollowOptions,
    stop: impl Future<Output = ()>,
) -> Result<Outcome> {
    tokio::pin!(stop);
    let started = Instant::now();
    // Nodes taken out of the inventory while in the cluster are followed
    // until they have left it.
    let leaving: Vec<String> = state
        .nodes()?
        .into_iter()
        .filter(|r| !inventory.nodes.contains_key(&r.name) && r.stage.may_run_k3s())
        .map(|r| r.name)
        .collect();
    let mut view = View::new(inventory.nodes.keys().chain(&leaving), opts.live);
    let mut last_event = opts.after_event;
    loop {
        let records: HashMap<String, NodeRecord> = state
            .nodes()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let events = state.events_after(last_event, None, 1000)?;
        if let Some(e) = events.last() {
            last_event = e.id;
        }
        view.update(&records, &events);
        if let Some(outcome) = finished(inventory, &leaving, &records) {
            view.finish();
            return Ok(outcome);
        }
        if opts.timeout.is_some_and(|t| started.elapsed() >= t) {
            view.finish();
            return Ok(Outcome::TimedOut);
        }
        tokio::select! {
            _ = &mut stop => { view.finish(); return Ok(Outcome::Interrupted); }
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Pure: whether every node is done, and how. `leaving` are nodes out of
/// the inventory that were in the cluster: done once they have left it.
fn finished(
    inventory: &Inventory,
    leaving: &[String],
    records: &HashMap<String, NodeRecord>,
) -> Option<Outcome> {
    let mut failed = Vec::new();
    for node in inventory.nodes.values() {
        let rec = records.get(&node.name)?;
        if rec.stage.is_failure() {
            failed.push((node.name.clone(), rec.detail.clone()));
        } else if !goal_reached(node, rec) {
            return None;
        }
    }
    for name in leaving.iter().filter(|n| !inventory.nodes.contains_key(*n)) {
        let Some(rec) = records.get(name) else {
            continue;
        };
        if rec.stage.is_failure() {
            failed.push((name.clone(), rec.detail.clone()));
        } else if !rec.stage.is_gone() {
            return None;
        }
    }
    Some(if failed.is_empty() {
        Outcome::Converged
    } else {
        Outcome::Failed(failed)
    })
}

struct View {
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    rates: Rates,
}

/// Last (time, bytes, rate) seen per node, for the transfer rate.
#[derive(Default)]
struct Rates(HashMap<String, (Instant, u64, f64)>);

impl Rates {
    /// Bytes per second over the last second or more, once there is a rate.
    fn speed(&mut self, rec: &NodeRecord) -> Option<f64> {
        let now = Instant::now();
        let entry = self
            .0
            .entry(rec.name.clone())
            .or_insert((now, rec.bytes_done, 0.0));
        let dt = now.duration_since(entry.0).as_secs_f64();
        if rec.bytes_done < entry.1 {
            *entry = (now, rec.bytes_done, 0.0);
        } else if dt >= 1.0 {
            entry.2 = (rec.bytes_done - entry.1) as f64 / dt;
            entry.0 = now;
            entry.1 = rec.bytes_done;
        }
        (rec.bytes_total > 0 && entry.2 > 0.0).then_some(entry.2)
    }
}

impl View {
    fn new<'a>(names: impl Iterator<Item = &'a String> + Clone, live: bool) -> View {
        let width = names.clone().map(String::len).max().unwrap_or(4);
        let bars = live.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(8));
            crate::logging::attach_progress(&multi);
            let style = ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {msg}")
                .expect("valid template")
                .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✔");
            let bars = names
                .map(|name| {
                    let bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
                    bar.set_prefix(format!("{name:<width$}"));
                    bar.enable_steady_tick(Duration::from_millis(120));
                    (name.clone(), bar)
                })
                .collect();
            (multi, bars)
        });
        View {
            bars,
            rates: Rates::default(),
        }
    }

    fn update(&mut self, records: &HashMap<String, NodeRecord>, events: &[crate::state::Event]) {
        match &self.bars {
            None => {
                for e in events {
                    println!("{}", event_line(e));
                }
            }
            Some((_, bars)) => {
                for (name, bar) in bars {
                    let Some(rec) = records.get(name) else {
                        continue;
                    };
                    let speed = self.rates.speed(rec);
                    bar.set_message(node_line(rec, speed));
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.values() {
                bar.finish();
            }
        }
    }
}

/// The text of one node's live line.
fn node_line(rec: &NodeRecord, speed: Option<f64>) -> String {
    let mut s = format!(
        "{:<10} {:>6}",
        rec.stage.as_str(),
        format_elapsed(now_ms() - rec.stage_since_ms)
    );
    if rec.bytes_total > 0 {
        let pct = rec.bytes_done as f64 * 100.0 / rec.bytes_total as f64;
        s.push_str(&format!(
            "  {:>3.0}% {} / {}",
            pct,
            format_bytes(rec.bytes_done),
            format_bytes(rec.bytes_total)
        ));
        if let Some(bps) = speed {
            s.push_str(&format!("  {}/s", format_bytes(bps as u64)));
        }
    }
    if !rec.detail.is_empty() {
        s.push_str("  ");
        s.push_str(&rec.detail);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Stage;

    fn inventory() -> Inventory {
        crate::testing::inventory("")
    }

    fn records(stages: &[(&str, Stage, &str)]) -> HashMap<String, NodeRecord> {
        stages
            .iter()
            .map(|(name, stage, detail)| {
                (
                    name.to_string(),
                    NodeRecord {
                        name: name.to_string(),
                        mac: String::new(),
                        ip: String::new(),
                        role: "agent".into(),
                        stage: *stage,
                        reinstall: false,
                        spec_hash: String::new(),
                        bytes_done: 0,
                        bytes_total: 0,
                        detail: detail.to_string(),
                        stage_since_ms: 0,
                        updated_ms: 0,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn up_waits_for_nodes_leaving_the_cluster_and_reports_their_failure() {
        let inv = inventory();
        let leaving = vec!["a1".to_string()];
        let running = ("s1", Stage::Running, "");
        let at = |a1: Stage, detail: &str| {
            finished(&inv, &leaving, &records(&[running, ("a1", a1, detail)]))
        };
        assert_eq!(at(Stage::Removing, ""), None);
        assert_eq!(at(Stage::Released, ""), Some(Outcome::Converged));
        assert_eq!(
            at(Stage::RemoveFailed, "no route"),
            Some(Outcome::Failed(vec![("a1".into(), "no route".into())]))
        );
        // A node of the inventory still on its way holds up the end too.
        let joining = records(&[("s1", Stage::Joining, ""), ("a1", Stage::Released, "")]);
        assert_eq!(finished(&inv, &leaving, &joining), None);
    }
}
