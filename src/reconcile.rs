//! One driver for every controller loop, in the spirit of kube-rs's
//! controller runtime: a [`Part`] says which keys are due (a pure function
//! of a [`Snapshot`] of the state, unit-tested) and how to reconcile one
//! key; the driver owns everything else:
//! - the in-flight set: a key runs at most once at a time, and is released
//!   when its reconcile ends, whether it returned, failed or panicked;
//! - one `JoinSet` for every reconcile, tied to the daemon's one shutdown
//!   signal: on shutdown nothing new starts, running reconciles get a
//!   bounded grace to finish, and the rest are aborted (each reconcile
//!   compares before it writes, so an aborted one is simply redone);
//! - backoff: a key that failed or panicked is not due again until its
//!   backoff (doubling, capped) has passed; a success clears it;
//! - the outcome event: a failure or a panic is written to the audit trail
//!   under the part's name and the key.
//!
//! It wakes on every change recorded in the state (and at least every
//! `poll`), so a node that phoned home is probed at once.
//!
//! Keys are strings: node names today, `app:NAME` or `rollout:ID` for the
//! parts that come next.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::context::Shared;
use crate::inventory::Inventory;
use crate::state::NodeRecord;

/// What a part's `due` sees: the inventory in force and the state, read at
/// one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub inventory: Arc<Inventory>,
    pub nodes: Vec<NodeRecord>,
    /// The server the cluster was bootstrapped through, as recorded.
    pub bootstrap: Option<String>,
    /// Cluster work not at its end (running, unwinding or halted).
    pub sagas: Vec<crate::saga::SagaRecord>,
}

impl Snapshot {
    pub fn take(shared: &Shared) -> Result<Snapshot> {
        Ok(Snapshot {
            inventory: shared.inventory(),
            nodes: shared.state.nodes()?,
            bootstrap: shared.state.bootstrap_server()?,
            sagas: shared.state.unfinished_sagas()?,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.iter().find(|r| r.name == name)
    }
}

/// How one reconcile ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (its result is in the state); due again whenever `due` says so.
    Done,
    /// Failed: written to the audit trail, and the key backs off.
    Failed(String),
}

pub type Reconcile = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

/// One controller loop.
pub trait Part: Send + Sync + 'static {
    /// Its name in events and logs ("reach", "k3s").
    fn name(&self) -> &'static str;
    /// Pure: the keys due now. `in_flight` are this part's keys running
    /// now (the driver never starts one twice; a part uses them for rules
    /// such as "one server at a time").
    fn due(&self, snapshot: &Snapshot, in_flight: &BTreeSet<String>) -> Vec<String>;
    /// Reconcile `key` (with a fresh look at the state: the snapshot `due`
    /// saw may be old by now).
    fn reconcile(self: Arc<Self>, shared: Arc<Shared>, key: String) -> Reconcile;
}

/// The driver's timing.
#[derive(Debug, Clone, Copy)]
pub struct DriverOptions {
    /// Look at the state at least this often, changes or not.
    pub poll: Duration,
    /// How long running reconciles get to finish after shutdown.
    pub grace: Duration,
    /// The first backoff after a failure; it doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            poll: Duration::from_secs(2),
            grace: Duration::from_secs(3),
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Pure: the backoff after the `failures`-th failure in a row.
pub fn backoff_after(opts: &DriverOptions, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    opts.backoff.saturating_mul(factor).min(opts.max_backoff)
}

struct Running {
    part: usize,
    key: String,
}

/// Runs `parts` until `shutdown`, then drains (see the module doc).
pub async fn run(
    shared: Arc<Shared>,
    parts: Vec<Arc<dyn Part>>,
    opts: DriverOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, Running> = HashMap::new();
    let mut in_flight: Vec<BTreeSet<String>> = vec![BTreeSet::new(); parts.len()];
    let mut backoff: HashMap<(usize, String), (Instant, u32)> = HashMap::new();
    let mut changes = shared.state.subscribe();
    loop {
        if *shutdown.borrow() {
            break;
        }
        match Snapshot::take(&shared) {
            Ok(snapshot) => {
                let now = Instant::now();
                for (i, part) in parts.iter().enumerate() {
                    for key in part.due(&snapshot, &in_flight[i]) {
                        let waiting = backoff
                            .get(&(i, key.clone()))
                            .is_some_and(|(until, _)| *until > now);
                        if waiting || !in_flight[i].insert(key.clone()) {
                            continue;
                        }
                        let task = tasks.spawn(part.clone().reconcile(shared.clone(), key.clone()));
                        running.insert(task.id(), Running { part: i, key });
                    }
                }
            }
            Err(e) => tracing::warn!("reading the state for the controller loops: {e:#}"),
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(joined) = tasks.join_next_with_id() => {
                let (id, outcome) = match joined {
                    Ok((id, outcome)) => (id, outcome),
                    Err(e) => {
                        let id = e.id();
                        let why = if e.is_panic() {
                            format!("panicked: {}", panic_message(e.into_panic()))
                        } else {
                            "was cancelled".to_string()
                        };
                        (id, Outcome::Failed(why))
                    }
                };
                if let Some(done) = running.remove(&id) {
                    in_flight[done.part].remove(&done.key);
                    settle(&shared, &opts, &*parts[done.part], done, outcome, &mut backoff);
                }
            }
            changed = changes.recv() => {
                if matches!(changed, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    tokio::time::sleep(opts.poll).await;
                }
                // Whatever changed, look again; coalesce a burst of changes.
                while changes.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(opts.poll) => {}
        }
    }
    drain(&mut tasks, opts.grace).await;
    Ok(())
}

/// Records a reconcile's outcome and its key's backoff.
fn settle(
    shared: &Shared,
    opts: &DriverOptions,
    part: &dyn Part,
    done: Running,
    outcome: Outcome,
    backoff: &mut HashMap<(usize, String), (Instant, u32)>,
) {
    let slot = (done.part, done.key);
    match outcome {
        Outcome::Done => {
            backoff.remove(&slot);
        }
        Outcome::Failed(why) => {
            let failures = backoff.get(&slot).map_or(0, |(_, n)| *n) + 1;
            let wait = backoff_after(opts, failures);
            backoff.insert(slot.clone(), (Instant::now() + wait, failures));
            let name = part.name();
            tracing::warn!(part = name, key = %slot.1, "{why}; again in {wait:?}");
            let node = shared
                .inventory()
                .nodes
                .contains_key(&slot.1)
                .then_some(slot.1.as_str());
            let _ = shared.state.append_event(
                node,
                &format!("reconcile.{name}"),
                &format!(
                    "{name} for {}: {why}; tried again in {} s",
                    slot.1,
                    wait.as_secs()
                ),
                serde_json::json!({ "key": slot.1, "failures": failures }),
            );
        }
    }
}

/// Waits up to `grace` for running reconciles, then aborts the rest.
async fn drain(tasks: &mut JoinSet<Outcome>, grace: Duration) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all).await.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use crate::state::State;

    /// A part whose keys are always due; what reconciling does is given.
    struct Scripted {
        keys: Vec<String>,
        runs: Arc<Mutex<Vec<(String, Instant)>>>,
        running: Arc<AtomicUsize>,
        most_at_once: Arc<AtomicUsize>,
        finished: Arc<AtomicUsize>,
        behave: fn(&str) -> Behaviour,
    }

    #[derive(Clone, Copy)]
    enum Behaviour {
        Panic,
        Fail,
        Sleep(Duration),
        Forever,
    }

    impl Part for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn due(&self, _: &Snapshot, in_flight: &BTreeSet<String>) -> Vec<String> {
            // Returns keys in flight too: the driver must not start them twice.
            let _ = in_flight;
            self.keys.clone()
        }
        fn reconcile(self: Arc<Self>, _: Arc<Shared>, key: String) -> Reconcile {
            Box::pin(async move {
                self.runs
                    .lock()
                    .unwrap()
                    .push((key.clone(), Instant::now()));
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_at_once.fetch_max(now, Ordering::SeqCst);
                let outcome = match (self.behave)(&key) {
                    Behaviour::Panic => panic!("boom in {key}"),
                    Behaviour::Fail => Outcome::Failed("it broke".into()),
                    Behaviour::Sleep(d) => {
                        tokio::time::sleep(d).await;
                        Outcome::Done
                    }
                    Behaviour::Forever => std::future::pending().await,
                };
                self.running.fetch_sub(1, Ordering::SeqCst);
                self.finished.fetch_add(1, Ordering::SeqCst);
                outcome
            })
        }
    }

    fn scripted(keys: &[&str], behave: fn(&str) -> Behaviour) -> Arc<Scripted> {
        Arc::new(Scripted {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            runs: Arc::default(),
            running: Arc::default(),
            most_at_once: Arc::default(),
            finished: Arc::default(),
            behave,
        })
    }

    fn shared() -> (tempfile::TempDir, Arc<Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        (dir, Shared::new(state, crate::testing::inventory("")))
    }

    fn fast() -> DriverOptions {
        DriverOptions {
            poll: Duration::from_millis(10),
            grace: Duration::from_millis(300),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        }
    }

    /// When `key`'s reconciles started.
    fn starts(part: &Scripted, key: &str) -> Vec<Instant> {
        part.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, at)| *at)
            .collect()
    }

    fn runs_of(part: &Scripted, key: &str) -> usize {
        starts(part, key).len()
    }

    /// The gaps between `key`'s starts are at least the doubling backoff
    /// (lower bounds only: a loaded machine is slower, never faster).
    fn assert_backs_off(part: &Scripted, key: &str, opts: &DriverOptions) {
        let at = starts(part, key);
        for (n, pair) in at.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let want = backoff_after(opts, n as u32 + 1);
            assert!(
                gap >= want,
                "{key}: run {} came {gap:?} after the one before, within its backoff {want:?}",
                n + 2
            );
        }
    }

    #[tokio::test]
    async fn a_panicking_reconcile_releases_its_key_is_recorded_and_backs_off() {
        let (_dir, shared) = shared();
        let part = scripted(&["bad", "good"], |k| {
            if k == "bad" {
                Behaviour::Panic
            } else {
                Behaviour::Sleep(Duration::from_millis(1))
            }
        });
        let (stop, rx) = watch::channel(false);
        let driver = tokio::spawn(run(shared.clone(), vec![part.clone()], fast(), rx));
        tokio::time::sleep(Duration::from_millis(600)).await;
        stop.send(true).unwrap();
        driver.await.unwrap().unwrap();
        // Released after each panic, so it ran again; backed off, so not
        // as often as the healthy key, which is due on every look.
        let (bad, good) = (runs_of(&part, "bad"), runs_of(&part, "good"));
        assert!(bad >= 2, "the panicked key was never released: {bad} runs");
        assert!(bad < good, "no backoff: bad {bad}, good {good}");
        assert_backs_off(&part, "bad", &fast());
        let events = shared.state.last_events(100, None).unwrap();
        let panics: Vec<_> = events
            .iter()
            .filter(|e| e.kind == "reconcile.scripted")
            .collect();
        assert!(!panics.is_empty());
        assert!(
            panics[0].message.contains("bad: panicked: boom in bad"),
            "{}",
            panics[0].message
        );
    }

    #[tokio::test]
    async fn a_key_never_runs_twice_at_once() {
        let (_dir, shared) = shared();
        // `due` keeps returning the key while it runs; the part asserts.
        let part = scripted(&["slow"], |_| Behaviour::Sleep(Duration::from_millis(100)));
        let (stop, rx) = watch::channel(false);
        let driver = tokio::spawn(run(shared, vec![part.clone()], fast(), rx));
        tokio::time::sleep(Duration::from_millis(450)).await;
        stop.send(true).unwrap();
        driver.await.unwrap().unwrap();
        let n = runs_of(&part, "slow");
        assert!(n >= 2, "{n} runs: it was not started again after it ended");
        assert_eq!(
            part.most_at_once.load(Ordering::SeqCst),
            1,
            "a key ran twice at once"
        );
        assert_eq!(part.running.load(Ordering::SeqCst), 0, "drained");
    }

    #[tokio::test]
    async fn shutdown_lets_running_reconciles_finish_and_aborts_what_outlives_the_grace() {
        let (_dir, shared) = shared();
        let part = scripted(&["short", "endless"], |k| {
            if k == "short" {
                Behaviour::Sleep(Duration::from_millis(150))
            } else {
                Behaviour::Forever
            }
        });
        let (stop, rx) = watch::channel(false);
        let driver = tokio::spawn(run(shared, vec![part.clone()], fast(), rx));
        // Both started...
        tokio::time::timeout(Duration::from_secs(5), async {
            while part.runs.lock().unwrap().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let started = Instant::now();
        stop.send(true).unwrap();
        driver.await.unwrap().unwrap();
        let took = started.elapsed();
        // ...the short one finished during the grace, the endless one was
        // aborted at its end, and the driver returned then.
        assert_eq!(part.finished.load(Ordering::SeqCst), 1);
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(
            runs_of(&part, "short"),
            1,
            "nothing new starts after shutdown"
        );
    }

    #[tokio::test]
    async fn failures_back_off_doubling_and_are_recorded() {
        let (_dir, shared) = shared();
        let part = scripted(&["flaky"], |_| Behaviour::Fail);
        let (stop, rx) = watch::channel(false);
        let opts = DriverOptions {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            ..fast()
        };
        let driver = tokio::spawn(run(shared.clone(), vec![part.clone()], opts, rx));
        tokio::time::sleep(Duration::from_millis(650)).await;
        stop.send(true).unwrap();
        driver.await.unwrap().unwrap();
        // At 0, 100, 300 ms (then 700): at most three runs, not sixty.
        let runs = runs_of(&part, "flaky");
        assert!((2..=3).contains(&runs), "{runs} runs");
        assert_backs_off(&part, "flaky", &opts);
        let recorded = shared
            .state
            .last_events(100, None)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "reconcile.scripted")
            .count();
        assert_eq!(recorded, runs, "every failure is in the audit trail");
    }

    #[test]
    fn backoff_doubles_from_the_first_and_is_capped() {
        let opts = DriverOptions::default();
        let secs: Vec<u64> = (1..=8).map(|n| backoff_after(&opts, n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff_after(&opts, 1000).as_secs(), 300);
    }
}
