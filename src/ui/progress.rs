//! `homelab up`'s live view: one line per target it follows (a node: stage,
//! time in stage, bytes and speed where there are bytes; cluster work: its
//! step), drawn with indicatif on a terminal, or plain timestamped lines
//! when stdout is not a terminal. Each target knows when it is done
//! ([`progress`]); `up` ends when every one is.
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
use crate::saga::{SagaRecord, SagaStatus};
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
    /// Every target reached its goal.
    Converged,
    /// Every target finished; these failed (name, cause).
    Failed(Vec<(String, String)>),
    TimedOut,
    Interrupted,
}

/// Something `homelab up` follows to its end.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A node of the inventory: done at its goal stage.
    Node(String),
    /// A node out of the inventory that was in the cluster: done once gone.
    Leaving(String),
    /// Cluster work: done when the saga is.
    Saga(i64),
}

/// Where one target stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Going,
    Done,
    Failed(String),
}

/// Pure: where `target` stands, from the state read at one moment.
pub fn progress(
    target: &Target,
    inventory: &Inventory,
    records: &HashMap<String, NodeRecord>,
    sagas: &HashMap<i64, SagaRecord>,
) -> Progress {
    match target {
        Target::Node(name) => {
            let (Some(node), Some(rec)) = (inventory.nodes.get(name), records.get(name)) else {
                return Progress::Going;
            };
            if rec.stage.is_failure() {
                Progress::Failed(rec.detail.clone())
            } else if goal_reached(node, rec) {
                Progress::Done
            } else {
                Progress::Going
            }
        }
        Target::Leaving(name) => match records.get(name) {
            None => Progress::Done,
            Some(rec) if rec.stage.is_failure() => Progress::Failed(rec.detail.clone()),
            Some(rec) if rec.stage.is_gone() => Progress::Done,
            Some(_) => Progress::Going,
        },
        Target::Saga(id) => match sagas.get(id).map(|s| (s.status, s)) {
            None => Progress::Going,
            Some((SagaStatus::Done, _)) => Progress::Done,
            Some((SagaStatus::Unwound | SagaStatus::Halted, s)) => {
                Progress::Failed(s.detail.clone())
            }
            Some((SagaStatus::Running | SagaStatus::Unwinding, _)) => Progress::Going,
        },
    }
}

/// The name of a target on its line and in a failure.
fn label(target: &Target, sagas: &HashMap<i64, SagaRecord>) -> String {
    match target {
        Target::Node(n) | Target::Leaving(n) => n.clone(),
        Target::Saga(id) => match sagas.get(id) {
            Some(s) => format!("{} {} (#{id})", s.kind, s.target),
            None => format!("saga #{id}"),
        },
    }
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
    // until they have left it; cluster work under way until it ends.
    let mut targets: Vec<Target> = inventory.nodes.keys().cloned().map(Target::Node).collect();
    targets.extend(
        state
            .nodes()?
            .into_iter()
            .filter(|r| !inventory.nodes.contains_key(&r.name) && r.stage.may_run_k3s())
            .map(|r| Target::Leaving(r.name)),
    );
    let mut view = View::new(opts.live);
    let mut last_event = opts.after_event;
    loop {
        let records: HashMap<String, NodeRecord> = state
            .nodes()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        // Sagas under way now, and the ones followed so far as they stand.
        let mut sagas: HashMap<i64, SagaRecord> = HashMap::new();
        for saga in state.unfinished_sagas()? {
            if !targets.contains(&Target::Saga(saga.id)) {
                targets.push(Target::Saga(saga.id));
            }
            sagas.insert(saga.id, saga);
        }
        for t in &targets {
            if let Target::Saga(id) = t {
                if !sagas.contains_key(id) {
                    sagas.insert(*id, state.saga(*id)?);
                }
            }
        }
        let events = state.events_after(last_event, None, 1000)?;
        if let Some(e) = events.last() {
            last_event = e.id;
        }
        view.update(&targets, &records, &sagas, &events);
        if let Some(outcome) = finished(&targets, inventory, &records, &sagas) {
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

/// Pure: whether every target is done, and how.
fn finished(
    targets: &[Target],
    inventory: &Inventory,
    records: &HashMap<String, NodeRecord>,
    sagas: &HashMap<i64, SagaRecord>,
) -> Option<Outcome> {
    let mut failed = Vec::new();
    for t in targets {
        match progress(t, inventory, records, sagas) {
            Progress::Going => return None,
            Progress::Done => {}
            Progress::Failed(cause) => failed.push((label(t, sagas), cause)),
        }
    }
    Some(if failed.is_empty() {
        Outcome::Converged
    } else {
        Outcome::Failed(failed)
    })
}

struct View {
    live: Option<Live>,
    rates: Rates,
}

/// The bars of a terminal, one per target, added as targets appear.
struct Live {
    multi: MultiProgress,
    style: ProgressStyle,
    bars: HashMap<Target, ProgressBar>,
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
    fn new(live: bool) -> View {
        let live = live.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(8));
            crate::logging::attach_progress(&multi);
            let style = ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {msg}")
                .expect("valid template")
                .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✔");
            Live {
                multi,
                style,
                bars: HashMap::new(),
            }
        });
        View {
            live,
            rates: Rates::default(),
        }
    }

    fn update(
        &mut self,
        targets: &[Target],
        records: &HashMap<String, NodeRecord>,
        sagas: &HashMap<i64, SagaRecord>,
        events: &[crate::state::Event],
    ) {
        let Some(live) = &mut self.live else {
            for e in events {
                println!("{}", event_line(e));
            }
            return;
        };
        let width = targets
            .iter()
            .map(|t| label(t, sagas).len())
            .max()
            .unwrap_or(4);
        for t in targets {
            let bar = live.bars.entry(t.clone()).or_insert_with(|| {
                let bar = live
                    .multi
                    .add(ProgressBar::new_spinner().with_style(live.style.clone()));
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            });
            bar.set_prefix(format!("{:<width$}", label(t, sagas)));
            let line = match t {
                Target::Node(name) | Target::Leaving(name) => match records.get(name) {
                    Some(rec) => node_line(rec, self.rates.speed(rec)),
                    None => continue,
                },
                Target::Saga(id) => match sagas.get(id) {
                    Some(saga) => saga.progress_line(),
                    None => continue,
                },
            };
            bar.set_message(line);
        }
    }

    fn finish(&mut self) {
        if let Some(live) = &self.live {
            for bar in live.bars.values() {
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
                        detail: detail.to_string(),
                        ..crate::testing::record(name, "agent", *stage)
                    },
                )
            })
            .collect()
    }

    fn targets(leaving: &[&str]) -> Vec<Target> {
        let mut t = vec![Target::Node("s1".into())];
        t.extend(leaving.iter().map(|n| Target::Leaving(n.to_string())));
        t
    }

    #[test]
    fn up_waits_for_nodes_leaving_the_cluster_and_reports_their_failure() {
        let inv = inventory();
        let leaving = targets(&["a1"]);
        let running = ("s1", Stage::Running, "");
        let none = HashMap::new();
        let at = |a1: Stage, detail: &str| {
            finished(
                &leaving,
                &inv,
                &records(&[running, ("a1", a1, detail)]),
                &none,
            )
        };
        assert_eq!(at(Stage::Removing, ""), None);
        assert_eq!(at(Stage::Released, ""), Some(Outcome::Converged));
        assert_eq!(
            at(Stage::RemoveFailed, "no route"),
            Some(Outcome::Failed(vec![("a1".into(), "no route".into())]))
        );
        // A node of the inventory still on its way holds up the end too.
        let joining = records(&[("s1", Stage::Joining, ""), ("a1", Stage::Released, "")]);
        assert_eq!(finished(&leaving, &inv, &joining, &none), None);
    }

    #[test]
    fn cluster_work_is_followed_to_its_end_and_its_failure_named() {
        use crate::saga::SagaStatus;
        let inv = inventory();
        let nodes = records(&[("s1", Stage::Running, "")]);
        let mut t = targets(&[]);
        t.push(Target::Saga(7));
        let saga = |status, detail: &str| {
            HashMap::from([(
                7,
                SagaRecord {
                    id: 7,
                    kind: "gitops-seed".into(),
                    target: "homelab/platform".into(),
                    status,
                    detail: detail.into(),
                    steps: vec![],
                },
            )])
        };
        assert_eq!(
            finished(&t, &inv, &nodes, &saga(SagaStatus::Running, "")),
            None
        );
        assert_eq!(
            finished(&t, &inv, &nodes, &saga(SagaStatus::Unwinding, "")),
            None
        );
        assert_eq!(
            finished(&t, &inv, &nodes, &saga(SagaStatus::Done, "")),
            Some(Outcome::Converged)
        );
        assert_eq!(
            finished(
                &t,
                &inv,
                &nodes,
                &saga(SagaStatus::Unwound, "push: refused")
            ),
            Some(Outcome::Failed(vec![(
                "gitops-seed homelab/platform (#7)".into(),
                "push: refused".into()
            )]))
        );
        // Not read yet: still going.
        assert_eq!(finished(&t, &inv, &nodes, &HashMap::new()), None);
    }
}
