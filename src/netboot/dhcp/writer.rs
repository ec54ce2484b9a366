//! The lease writer: group commit of the packets in flight.
//!
//! The receive loop hands each packet's database work to one writer thread
//! and goes on reading packets. The writer takes everything that queued up
//! while it was busy and commits it in one transaction, so a thousand leases
//! cost one fsync instead of a thousand, and then hands each packet back for
//! its reply: a lease is never answered before it is on disk.
//!
//! When idle the writer commits the first packet at once (no timer, no
//! waiting for company), so a lone client is not delayed. The queue is
//! bounded: when it is full the loop drops the packet and the client asks
//! again. A packet whose writes are refused gets no reply (its savepoint is
//! rolled back, the others in the batch still commit); a failed commit fails
//! the whole batch. Both are logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Result;
use tokio::sync::mpsc;

use super::handler::Effect;
use crate::inventory::MacAddr;
use crate::lifecycle::NodeEvent;
use crate::state::{LeaseWrite, State};

/// Packets whose writes may wait for the writer. At about 8000 packets/s
/// and a few milliseconds per commit, a few hundred are ever in flight.
pub const QUEUE: usize = 4096;
/// Most packets committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// One packet's database work, and what to do when it is durable.
#[derive(Debug)]
pub struct Job<T> {
    /// Lease-table writes: all committed before `token` comes back.
    pub writes: Vec<LeaseWrite>,
    /// Records that go with the packet (a discovered client, a node starting
    /// to boot, an event), written after the leases and before the reply.
    pub records: Vec<Effect>,
    /// Handed back in [`Done`] (the reply waiting to be sent).
    pub token: T,
}

/// A packet's work is done: `stored` tells whether its leases are on disk.
#[derive(Debug)]
pub struct Done<T> {
    pub token: T,
    pub stored: bool,
}

/// The writer thread and the queue into it.
pub struct Writer<T> {
    jobs: Option<mpsc::Sender<Job<T>>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl<T: Send + 'static> Writer<T> {
    /// Start the writer thread; finished packets come out of the receiver, in
    /// the order they were queued.
    pub fn start(state: State) -> Result<(Writer<T>, mpsc::UnboundedReceiver<Done<T>>)> {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let (done, finished) = mpsc::unbounded_channel();
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        let thread = std::thread::Builder::new()
            .name("dhcp-leases".into())
            .spawn(move || write_until_closed(&state, queue, &done, &counter))?;
        Ok((
            Writer {
                jobs: Some(jobs),
                thread: Some(thread),
                commits,
            },
            finished,
        ))
    }
}

impl<T> Writer<T> {
    /// A place in the queue, or `None` when it is full (drop the packet).
    pub fn slot(&self) -> Option<mpsc::Permit<'_, Job<T>>> {
        self.jobs.as_ref()?.try_reserve().ok()
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Close the queue and wait until what is in it is committed.
    pub fn finish(mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: a batch at a time until the queue closes.
fn write_until_closed<T>(
    state: &State,
    mut queue: mpsc::Receiver<Job<T>>,
    done: &mpsc::UnboundedSender<Done<T>>,
    commits: &AtomicU64,
) {
    let mut batch = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let stored = commit(state, &batch);
        commits.fetch_add(1, Ordering::Relaxed);
        for (job, stored) in batch.drain(..).zip(stored) {
            if stored {
                for record in job.records {
                    write_record(state, record);
                }
            }
            // The loop is gone only at shutdown: the reply no longer matters.
            let _ = done.send(Done {
                token: job.token,
                stored,
            });
        }
    }
}

/// Commit a batch; whether each packet's writes are stored.
fn commit<T>(state: &State, batch: &[Job<T>]) -> Vec<bool> {
    let writes: Vec<&[LeaseWrite]> = batch.iter().map(|j| j.writes.as_slice()).collect();
    match state.commit_leases(&writes) {
        Ok(outcomes) => outcomes
            .into_iter()
            .zip(batch)
            .map(|(outcome, job)| match outcome {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(writes = ?job.writes,
                        "storing the leases of a DHCP packet: {e:#}; no reply (the client asks again)");
                    false
                }
            })
            .collect(),
        Err(e) => {
            tracing::error!(
                packets = batch.len(),
                "storing DHCP leases: {e:#}; no reply to these packets (the clients ask again)"
            );
            vec![false; batch.len()]
        }
    }
}

/// Write a record that goes with a packet; failures are logged, the reply still goes.
fn write_record(state: &State, record: Effect) {
    match record {
        Effect::Discovered {
            mac,
            arch,
            vendor_class,
        } => discovered(state, mac, arch, &vendor_class),
        Effect::Booting { node } => booting(state, &node),
        Effect::Event {
            node,
            kind,
            message,
            data,
        } => {
            if let Err(e) = state.append_event(node.as_deref(), kind, &message, data) {
                tracing::warn!("recording event {kind}: {e:#}");
            }
        }
        other => tracing::error!("not a record, ignored: {other:?}"),
    }
}

/// Record an unknown network-boot client; an event only the first time ever.
fn discovered(state: &State, mac: MacAddr, arch: Option<u16>, vendor_class: &str) {
    match state.record_discovered(&mac.to_string(), arch, vendor_class) {
        Ok(true) => {
            let arch_label = arch
                .map(|a| crate::netboot::boot::ClientArch::from_code(a).label())
                .unwrap_or_else(|| "unknown architecture".into());
            let message = format!(
                "unknown machine {mac} ({arch_label}) tried to network-boot; \
                 `homelab discover` shows a [nodes] stanza for it"
            );
            let data = serde_json::json!({ "mac": mac.to_string(), "arch": arch, "vendor_class": vendor_class });
            if let Err(e) = state.append_event(None, "dhcp.unknown-client", &message, data) {
                tracing::warn!("recording discovered client {mac}: {e:#}");
            }
            tracing::info!("{message}");
        }
        Ok(false) => {}
        Err(e) => tracing::warn!("recording discovered client {mac}: {e:#}"),
    }
}

/// A known node got its boot program: pending -> booting (the lifecycle
/// leaves a node at any other stage where it is).
fn booting(state: &State, name: &str) {
    if let Err(e) = state.transition(
        name,
        NodeEvent::NetbootStarted,
        "network-booting: DHCP gave it a boot program",
    ) {
        tracing::warn!("moving {name} to booting: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Lease;

    fn bind(mac: &str, ip: &str) -> LeaseWrite {
        LeaseWrite::Bind(Lease {
            mac: mac.into(),
            ip: ip.into(),
            expires_ms: i64::MAX,
            is_static: false,
        })
    }

    fn mac(i: usize) -> String {
        format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256)
    }

    fn job(token: usize, writes: Vec<LeaseWrite>) -> Job<usize> {
        Job {
            writes,
            records: Vec::new(),
            token,
        }
    }

    /// Queue `jobs` before the writer runs (as if they arrived during a
    /// commit), run it until the queue closes, and return what came out.
    fn run_queued(state: &State, jobs: Vec<Job<usize>>) -> (Vec<Done<usize>>, u64) {
        let (tx, rx) = mpsc::channel(QUEUE);
        for j in jobs {
            tx.try_send(j).unwrap();
        }
        drop(tx);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let commits = AtomicU64::new(0);
        write_until_closed(state, rx, &done_tx, &commits);
        let mut out = Vec::new();
        while let Ok(d) = done_rx.try_recv() {
            out.push(d);
        }
        (out, commits.into_inner())
    }

    #[test]
    fn packets_in_flight_share_one_commit_and_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let jobs = (0..500)
            .map(|i| {
                job(
                    i,
                    vec![bind(&mac(i), &format!("10.1.{}.{}", i / 200, i % 200))],
                )
            })
            .collect();
        let (done, commits) = run_queued(&state, jobs);
        assert_eq!(commits, 1, "500 queued packets, one transaction");
        assert_eq!(
            done.iter().map(|d| d.token).collect::<Vec<_>>(),
            (0..500).collect::<Vec<_>>()
        );
        assert!(done.iter().all(|d| d.stored));
        assert_eq!(state.leases().unwrap().len(), 500);
    }

    #[test]
    fn a_full_batch_is_split() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let n = MAX_BATCH + 10;
        let jobs = (0..n)
            .map(|i| {
                job(
                    i,
                    vec![bind(&mac(i), &format!("10.2.{}.{}", i / 200, i % 200))],
                )
            })
            .collect();
        let (done, commits) = run_queued(&state, jobs);
        assert_eq!(commits, 2);
        assert_eq!(done.len(), n);
        assert_eq!(state.leases().unwrap().len(), n);
    }

    #[test]
    fn writes_apply_in_queue_order() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let a = mac(1);
        let b = mac(2);
        let jobs = vec![
            job(0, vec![bind(&a, "10.0.0.10")]),
            // The client moves: its older lease goes.
            job(1, vec![bind(&a, "10.0.0.11")]),
            // Another client takes the freed address, then the first one's:
            // whoever held it is dropped.
            job(2, vec![bind(&b, "10.0.0.10")]),
            job(3, vec![bind(&b, "10.0.0.11")]),
            job(
                4,
                vec![
                    bind(&a, "10.0.0.12"),
                    LeaseWrite::Release { mac: a.clone() },
                ],
            ),
        ];
        let (done, commits) = run_queued(&state, jobs);
        assert_eq!(commits, 1);
        assert!(done.iter().all(|d| d.stored));
        let leases = state.leases().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(
            (leases[0].mac.as_str(), leases[0].ip.as_str()),
            (b.as_str(), "10.0.0.11")
        );
    }

    #[test]
    fn a_refused_packet_gets_no_reply_and_the_others_still_commit() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON leases WHEN NEW.ip = '10.0.0.13'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
            )
            .unwrap();
        let jobs = vec![
            job(0, vec![bind(&mac(0), "10.0.0.12")]),
            // Both writes of this packet go: the first was fine, the second refused.
            job(
                1,
                vec![bind(&mac(1), "10.0.0.20"), bind(&mac(1), "10.0.0.13")],
            ),
            job(2, vec![bind(&mac(2), "10.0.0.14")]),
        ];
        let (done, commits) = run_queued(&state, jobs);
        assert_eq!(commits, 1);
        assert_eq!(
            done.iter().map(|d| (d.token, d.stored)).collect::<Vec<_>>(),
            [(0, true), (1, false), (2, true)]
        );
        let ips: Vec<String> = state.leases().unwrap().into_iter().map(|l| l.ip).collect();
        assert_eq!(ips, ["10.0.0.12", "10.0.0.14"]);
    }

    #[test]
    fn a_failed_commit_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        // A deferred foreign key is checked only at COMMIT: the commit fails.
        state
            .execute_batch(
                "CREATE TABLE owner (ip TEXT PRIMARY KEY);
                 CREATE TABLE fail_commit (ip TEXT REFERENCES owner(ip) DEFERRABLE INITIALLY DEFERRED);
                 CREATE TRIGGER fail AFTER INSERT ON leases WHEN NEW.ip = '10.0.0.99'
                 BEGIN INSERT INTO fail_commit VALUES (NEW.ip); END",
            )
            .unwrap();
        let jobs = vec![
            job(0, vec![bind(&mac(0), "10.0.0.98")]),
            job(1, vec![bind(&mac(1), "10.0.0.99")]),
        ];
        let (done, commits) = run_queued(&state, jobs);
        assert_eq!(commits, 1);
        assert!(done.iter().all(|d| !d.stored));
        assert!(state.leases().unwrap().is_empty());
    }

    #[test]
    fn records_are_written_only_with_their_leases() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let stranger = MacAddr([0x52, 0x54, 0, 0, 0, 0x77]);
        let jobs = vec![Job {
            writes: Vec::new(),
            records: vec![Effect::Discovered {
                mac: stranger,
                arch: Some(7),
                vendor_class: "PXEClient:Arch:00007".into(),
            }],
            token: 0,
        }];
        let (done, _) = run_queued(&state, jobs);
        assert!(done[0].stored);
        assert_eq!(state.discovered().unwrap().len(), 1);
        assert_eq!(
            state.last_events(10, None).unwrap()[0].kind,
            "dhcp.unknown-client"
        );
    }

    #[tokio::test]
    async fn a_lone_packet_is_committed_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let (writer, mut done) = Writer::<usize>::start(state.clone()).unwrap();
        for i in 0..3 {
            writer
                .slot()
                .unwrap()
                .send(job(i, vec![bind(&mac(i), &format!("10.0.0.{}", 10 + i))]));
            let d = tokio::time::timeout(std::time::Duration::from_secs(10), done.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((d.token, d.stored), (i, true));
            assert!(
                state.lease_by_mac(&mac(i)).unwrap().is_some(),
                "on disk before the reply"
            );
        }
        assert_eq!(writer.commits(), 3);
        writer.finish();
    }
}
