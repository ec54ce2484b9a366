//! The agent's side of the conversation with the controller: fetching the
//! plan, the image (resuming with range requests when the connection or the
//! controller goes away), and sending reports and log lines.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::install::protocol::{ImageRef, InstallPlan, Report};

/// How long the agent keeps retrying while the controller is unreachable.
pub const PATIENCE: Duration = Duration::from_secs(600);
/// Progress reports at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A client of the controller for one install attempt.
#[derive(Clone)]
pub struct Controller {
    client: reqwest::Client,
    session: String,
    report_url: String,
}

fn client() -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The agent speaks plain HTTP to the controller on the provisioning
    // network, and the installer has no CA store: trust no roots at all
    // (any https URL fails), instead of failing to find the system's.
    reqwest::Client::builder()
        .tls_certs_only(Vec::new())
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")
}

/// Retry `attempt` on transient failures (connection errors, 5xx) with
/// backoff until it succeeds, fails for good, or [`PATIENCE`] runs out.
async fn patiently<T, F, Fut>(what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    let deadline = Instant::now() + PATIENCE;
    let mut wait = Duration::from_millis(500);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Fatal(e)) => return Err(e.context(what.to_string())),
            Err(Attempt::Retry(e)) => {
                if Instant::now() + wait > deadline {
                    return Err(e.context(format!("{what}: gave up after {PATIENCE:?}")));
                }
                eprintln!("homelab installer: {what}: {e:#}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

enum Attempt {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

fn classify(status: StatusCode, body: String) -> Attempt {
    let e = anyhow::anyhow!("the controller answered {status}: {}", body.trim());
    if status.is_server_error() {
        Attempt::Retry(e)
    } else {
        Attempt::Fatal(e)
    }
}

impl Controller {
    /// GET the plan (consuming the URL's one-time token).
    pub async fn fetch_plan(url: &str) -> Result<(Controller, InstallPlan)> {
        let client = client()?;
        let plan: InstallPlan = patiently("fetching the install plan", || async {
            let resp = client
                .get(url)
                .send()
                .await
                .map_err(|e| Attempt::Retry(e.into()))?;
            if !resp.status().is_success() {
                let status = resp.status();
                return Err(classify(status, resp.text().await.unwrap_or_default()));
            }
            resp.json::<InstallPlan>()
                .await
                .map_err(|e| Attempt::Fatal(anyhow::Error::from(e).context("reading the plan")))
        })
        .await?;
        Ok((
            Controller {
                client,
                session: plan.session.clone(),
                report_url: plan.report_url.clone(),
            },
            plan,
        ))
    }

    async fn post(&self, report: &Report) -> Result<(), Attempt> {
        let resp = self
            .client
            .post(&self.report_url)
            .bearer_auth(&self.session)
            .json(report)
            .send()
            .await
            .map_err(|e| Attempt::Retry(e.into()))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            let status = resp.status();
            Err(classify(status, resp.text().await.unwrap_or_default()))
        }
    }

    /// Send a report that must arrive (the outcome), retrying patiently.
    pub async fn report_reliably(&self, report: &Report) -> Result<()> {
        patiently("reporting to the controller", || self.post(report)).await
    }

    /// Send a report, retrying briefly; a lost one is only logged.
    pub fn report(&self, rt: &Handle, report: Report) {
        let this = self.clone();
        let sent = rt.block_on(async move {
            for _ in 0..5 {
                match this.post(&report).await {
                    Ok(()) => return Ok(()),
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Retry(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            bail!("the controller is unreachable")
        });
        if let Err(e) = sent {
            eprintln!("homelab installer: a report was lost: {e:#}");
        }
    }

    /// The image's bytes as a blocking reader. A download task on `rt`
    /// feeds it, resuming from the last byte received after any failure.
    pub fn image_reader(&self, rt: &Handle, image: &ImageRef) -> ChannelReader {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let image = image.clone();
        rt.spawn(async move {
            if let Err(e) = this.download(&image, &tx).await {
                let _ = tx.send(Err(io::Error::other(format!("{e:#}")))).await;
            }
        });
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }

    async fn download(&self, image: &ImageRef, tx: &mpsc::Sender<io::Result<Bytes>>) -> Result<()> {
        let mut offset = 0u64;
        let mut last_progress = Instant::now();
        let mut wait = Duration::from_millis(500);
        while offset < image.size {
            let mut req = self.client.get(&image.url).bearer_auth(&self.session);
            if offset > 0 {
                req = req.header(RANGE, format!("bytes={offset}-"));
            }
            let failure: anyhow::Error = match req.send().await {
                Ok(resp) if resp.status().is_client_error() => {
                    let status = resp.status();
                    bail!(
                        "the controller refused the image: {status}: {}",
                        resp.text().await.unwrap_or_default().trim()
                    );
                }
                Ok(resp) if resp.status().is_success() => {
                    let mut skip = 0u64;
                    if offset > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
                        skip = offset; // the range was ignored: drop what we have
                    } else if offset > 0 {
                        let range = resp
                            .headers()
                            .get(CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if !range.starts_with(&format!("bytes {offset}-")) {
                            bail!("the controller resumed at the wrong place ({range}, wanted byte {offset})");
                        }
                    }
                    let mut stream = resp.bytes_stream();
                    let mut err = None;
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(mut b) => {
                                if skip > 0 {
                                    let n = skip.min(b.len() as u64) as usize;
                                    skip -= n as u64;
                                    b = b.slice(n..);
                                }
                                if b.is_empty() {
                                    continue;
                                }
                                offset += b.len() as u64;
                                last_progress = Instant::now();
                                wait = Duration::from_millis(500);
                                if tx.send(Ok(b)).await.is_err() {
                                    return Ok(()); // the writer stopped
                                }
                            }
                            Err(e) => {
                                err = Some(e.into());
                                break;
                            }
                        }
                    }
                    match err {
                        Some(e) => e,
                        None if offset < image.size => {
                            anyhow::anyhow!("the image ended early at byte {offset}")
                        }
                        None => break,
                    }
                }
                Ok(resp) => anyhow::anyhow!("the controller answered {}", resp.status()),
                Err(e) => e.into(),
            };
            if last_progress.elapsed() > PATIENCE {
                return Err(failure.context(format!("no image data for {PATIENCE:?}")));
            }
            eprintln!("homelab installer: image download interrupted at byte {offset}: {failure:#}; resuming in {wait:?}");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
        if offset > image.size {
            bail!(
                "the controller sent {offset} bytes, more than the planned {}",
                image.size
            );
        }
        Ok(())
    }

    /// Throttled progress reports.
    /// `received` counts the image bytes that arrived (see [`super::image::Hashing`]).
    pub fn progress_reporter(&self, rt: &Handle, total: u64, received: Arc<AtomicU64>) -> Progress {
        Progress {
            controller: self.clone(),
            rt: rt.clone(),
            total,
            last: Instant::now() - PROGRESS_EVERY,
            received,
        }
    }

    /// Log lines go to the console at once and to the controller in batches.
    pub fn log_sink(&self, rt: Handle) -> LogSink {
        LogSink {
            controller: self.clone(),
            rt,
            pending: Mutex::new(Vec::new()),
        }
    }
}

/// Reads what the download task sends.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

pub struct Progress {
    controller: Controller,
    rt: Handle,
    total: u64,
    last: Instant,
    received: Arc<AtomicU64>,
}

impl Progress {
    /// `written`: decompressed bytes on disk so far.
    pub fn update(&mut self, written: u64) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let report = Report::Progress {
            received: self.received.load(Ordering::Relaxed),
            total: self.total,
            written,
        };
        let c = self.controller.clone();
        self.rt.spawn(async move {
            let _ = c.post(&report).await;
        });
    }

    pub fn finish(&mut self, written: u64) {
        self.last = Instant::now() - PROGRESS_EVERY;
        self.update(written);
    }
}

pub struct LogSink {
    controller: Controller,
    rt: Handle,
    pending: Mutex<Vec<String>>,
}

impl LogSink {
    pub fn line(&self, line: impl Into<String>) {
        let line = line.into();
        eprintln!("homelab installer: {line}");
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    pub fn flush(&self) {
        let lines = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if !lines.is_empty() {
            self.controller.report(&self.rt, Report::Log { lines });
        }
    }
}
