use std::sync::Mutex;

use super::*;

fn step(seq: u32, status: StepStatus) -> StepRecord {
    StepRecord {
        seq,
        name: format!("s{seq}"),
        status,
        undo: serde_json::Value::Null,
        output: serde_json::Value::Null,
        error: String::new(),
    }
}

fn log(statuses: &[StepStatus]) -> Vec<StepRecord> {
    statuses
        .iter()
        .enumerate()
        .map(|(i, s)| step(i as u32, *s))
        .collect()
}

use StepStatus::{Done, Failed, Pending, Started, Undone};

#[test]
fn forward_until_done_a_started_step_runs_again() {
    assert_eq!(next(&log(&[Pending, Pending])), Next::Run(0));
    assert_eq!(next(&log(&[Done, Pending])), Next::Run(1));
    // Killed after writing `started`: it may have acted; run it again.
    assert_eq!(next(&log(&[Done, Started, Pending])), Next::Run(1));
    assert_eq!(next(&log(&[Done, Done])), Next::Finished);
    assert_eq!(next(&[]), Next::Finished);
}

#[test]
fn a_failure_undoes_what_acted_last_first() {
    assert_eq!(next(&log(&[Done, Done, Failed, Pending])), Next::Undo(1));
    assert_eq!(next(&log(&[Done, Undone, Failed, Pending])), Next::Undo(0));
    assert_eq!(
        next(&log(&[Undone, Undone, Failed, Pending])),
        Next::Unwound
    );
    // Killed while undoing: a step still marked done is undone (again).
    assert_eq!(next(&log(&[Done, Started, Failed])), Next::Undo(1));
    assert_eq!(next(&log(&[Failed])), Next::Unwound);
}

/// A saga over a toy system: each step sets a value; undo puts back the old one.
struct Toy {
    values: Mutex<Vec<i32>>,
    fail_at: Option<u32>,
    /// Stop the runner (as a SIGKILL would) right after this step started.
    crash_after_start: Option<u32>,
    ran: Mutex<Vec<String>>,
}

impl Steps for Toy {
    fn undo_info<'a>(&'a self, _: &'a SagaRecord, seq: u32) -> StepFuture<'a, serde_json::Value> {
        Box::pin(async move {
            Ok(serde_json::json!({ "old": self.values.lock().unwrap()[seq as usize] }))
        })
    }
    fn run<'a>(&'a self, _: &'a SagaRecord, seq: u32) -> StepFuture<'a, serde_json::Value> {
        Box::pin(async move {
            self.ran.lock().unwrap().push(format!("run {seq}"));
            if self.crash_after_start == Some(seq) {
                // Acted, then the controller died before writing `done`.
                self.values.lock().unwrap()[seq as usize] = 100 + seq as i32;
                std::future::pending::<()>().await;
            }
            if self.fail_at == Some(seq) {
                anyhow::bail!("step {seq} broke");
            }
            self.values.lock().unwrap()[seq as usize] = 100 + seq as i32;
            Ok(serde_json::json!({ "set": 100 + seq }))
        })
    }
    fn undo<'a>(
        &'a self,
        _: &'a SagaRecord,
        seq: u32,
        undo: &'a serde_json::Value,
    ) -> StepFuture<'a, ()> {
        Box::pin(async move {
            self.ran.lock().unwrap().push(format!("undo {seq}"));
            self.values.lock().unwrap()[seq as usize] = undo["old"].as_i64().unwrap() as i32;
            Ok(())
        })
    }
}

fn toy(fail_at: Option<u32>, crash_after_start: Option<u32>) -> Toy {
    Toy {
        values: Mutex::new(vec![1, 2, 3]),
        fail_at,
        crash_after_start,
        ran: Mutex::default(),
    }
}

#[tokio::test]
async fn a_saga_runs_every_step_once_and_logs_each() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    let id = state.begin_saga("toy", "t", &["a", "b", "c"]).unwrap();
    let steps = toy(None, None);
    let end = run(&state, id, &steps).await.unwrap();
    assert_eq!(end.status, SagaStatus::Done);
    assert_eq!(*steps.values.lock().unwrap(), [100, 101, 102]);
    assert_eq!(*steps.ran.lock().unwrap(), ["run 0", "run 1", "run 2"]);
    assert!(end.steps.iter().all(|s| s.status == StepStatus::Done));
    assert_eq!(end.steps[0].undo, serde_json::json!({ "old": 1 }));
    assert!(state.unfinished_sagas().unwrap().is_empty());
    let kinds: Vec<String> = state
        .last_events(100, None)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| k.starts_with("saga."))
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("saga.begun"));
    assert_eq!(kinds.last().map(String::as_str), Some("saga.done"));
    assert_eq!(
        kinds.iter().filter(|k| *k == "saga.step-started").count(),
        3
    );
}

#[tokio::test]
async fn a_failed_step_unwinds_the_steps_before_it_in_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    let id = state.begin_saga("toy", "t", &["a", "b", "c"]).unwrap();
    let steps = toy(Some(2), None);
    let end = run(&state, id, &steps).await.unwrap();
    assert_eq!(end.status, SagaStatus::Unwound);
    assert!(end.detail.contains("c: step 2 broke"), "{}", end.detail);
    assert_eq!(
        *steps.ran.lock().unwrap(),
        ["run 0", "run 1", "run 2", "undo 1", "undo 0"]
    );
    assert_eq!(
        *steps.values.lock().unwrap(),
        [1, 2, 3],
        "as before the saga"
    );
}

#[tokio::test]
async fn a_saga_killed_mid_step_resumes_from_its_log_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let state = State::open(dir.path()).unwrap();
        let id = state.begin_saga("toy", "t", &["a", "b", "c"]).unwrap();
        let steps = toy(None, Some(1));
        // The controller dies while step 1 runs.
        let crashed = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            run(&state, id, &steps),
        )
        .await;
        assert!(crashed.is_err());
        id
    };
    // A new controller on the same state dir.
    let state = State::open(dir.path()).unwrap();
    let open = state.unfinished_sagas().unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(
        open[0].steps.iter().map(|s| s.status).collect::<Vec<_>>(),
        [Done, Started, Pending]
    );
    let steps = toy(None, None);
    let end = run(&state, id, &steps).await.unwrap();
    assert_eq!(end.status, SagaStatus::Done);
    // Step 0 is not run again; step 1, which may have acted, is.
    assert_eq!(*steps.ran.lock().unwrap(), ["run 1", "run 2"]);
}

#[test]
fn the_cluster_domain_keeps_the_seeded_repository_and_the_apps() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    assert_eq!(state.repo_seed("homelab/platform").unwrap(), None);
    let seed = crate::state::RepoSeed {
        commit: "c0ffee".into(),
        files: vec![
            ("a.yaml".into(), "b1".into()),
            ("b/c.yaml".into(), "b2".into()),
        ],
    };
    state.put_repo_seed("homelab/platform", &seed).unwrap();
    let again = crate::state::RepoSeed {
        commit: "d00d".into(),
        files: vec![("a.yaml".into(), "b3".into())],
    };
    state.put_repo_seed("homelab/platform", &again).unwrap();
    assert_eq!(state.repo_seed("homelab/platform").unwrap(), Some(again));

    let app = |name: &str, health: &str| crate::state::AppRecord {
        name: name.into(),
        desired_revision: "d00d".into(),
        sync: "Synced".into(),
        health: health.into(),
        message: String::new(),
        updated_ms: 1,
    };
    state.put_app(&app("grafana", "Progressing")).unwrap();
    state.put_app(&app("grafana", "Healthy")).unwrap();
    state.put_app(&app("loki", "Degraded")).unwrap();
    let apps = state.apps().unwrap();
    assert_eq!(apps, [app("grafana", "Healthy"), app("loki", "Degraded")]);
    assert!(state.delete_app("loki").unwrap());
    assert_eq!(state.apps().unwrap().len(), 1);
}

#[tokio::test]
async fn the_driver_resumes_a_saga_left_unfinished_by_a_restart() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    let id = state.begin_saga("toy", "t", &["a", "b", "c"]).unwrap();
    state
        .step_started(id, 0, &serde_json::json!({ "old": 1 }))
        .unwrap();
    state.step_done(id, 0, &serde_json::Value::Null).unwrap();
    state
        .step_started(id, 1, &serde_json::json!({ "old": 2 }))
        .unwrap();
    // A saga of a kind this controller does not run is left alone.
    let other = state.begin_saga("other", "x", &["a"]).unwrap();

    let shared = crate::context::Shared::new(state.clone(), crate::testing::inventory(""));
    let toy = Arc::new(toy(None, None));
    let parts: Vec<Arc<dyn crate::reconcile::Part>> =
        vec![Arc::new(Sagas::new().with("toy", toy.clone()))];
    let (stop, rx) = tokio::sync::watch::channel(false);
    let opts = crate::reconcile::DriverOptions {
        poll: std::time::Duration::from_millis(10),
        ..Default::default()
    };
    let driver = tokio::spawn(crate::reconcile::run(shared, parts, opts, rx));
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while state.saga(id).unwrap().status != SagaStatus::Done {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the saga was not resumed");
    stop.send(true).unwrap();
    driver.await.unwrap().unwrap();
    assert_eq!(*toy.ran.lock().unwrap(), ["run 1", "run 2"]);
    assert_eq!(state.saga(other).unwrap().status, SagaStatus::Running);
}

#[tokio::test]
async fn an_undo_that_fails_halts_the_saga_for_the_user() {
    struct Stuck;
    impl Steps for Stuck {
        fn undo_info<'a>(&'a self, _: &'a SagaRecord, _: u32) -> StepFuture<'a, serde_json::Value> {
            Box::pin(async { Ok(serde_json::Value::Null) })
        }
        fn run<'a>(&'a self, _: &'a SagaRecord, seq: u32) -> StepFuture<'a, serde_json::Value> {
            Box::pin(async move {
                if seq == 1 {
                    anyhow::bail!("gate failed");
                }
                Ok(serde_json::Value::Null)
            })
        }
        fn undo<'a>(
            &'a self,
            _: &'a SagaRecord,
            _: u32,
            _: &'a serde_json::Value,
        ) -> StepFuture<'a, ()> {
            Box::pin(async { anyhow::bail!("the old binary is gone") })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path()).unwrap();
    let id = state
        .begin_saga("stuck", "t", &["upgrade", "gate"])
        .unwrap();
    let e = run(&state, id, &Stuck).await.unwrap_err();
    assert!(e.to_string().contains("undoing upgrade"), "{e}");
    let saga = state.saga(id).unwrap();
    assert_eq!(saga.status, SagaStatus::Halted);
    assert!(
        saga.progress_line().contains("the old binary is gone"),
        "{}",
        saga.progress_line()
    );
    // Halted: reported, and not driven again.
    let snapshot = crate::reconcile::Snapshot {
        inventory: std::sync::Arc::new(crate::testing::inventory("")),
        nodes: vec![],
        bootstrap: None,
        sagas: state.unfinished_sagas().unwrap(),
    };
    assert_eq!(snapshot.sagas.len(), 1);
    let part = Sagas::new().with("stuck", std::sync::Arc::new(Stuck));
    use crate::reconcile::Part;
    assert!(part.due(&snapshot, &Default::default()).is_empty());
}
