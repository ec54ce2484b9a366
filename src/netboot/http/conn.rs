//! Connection limits for the HTTP server: at most so many connections at once,
//! a connection that has not sent its first request head soon after it
//! opened is closed (slowloris), and so is one that makes no progress either
//! way for a while.
//!
//! axum's `serve` sets no timeouts of its own, so a client that opens a
//! connection and sends nothing (or stops reading a 100 MB initrd halfway)
//! would hold a task, a socket and an open file forever.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How long a connection may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    /// From accept to the end of the first request head.
    pub header: Duration,
    /// With no progress either way.
    pub idle: Duration,
}

/// A TCP listener that holds back accepting past `max` open connections and
/// wraps each connection in an [`IdleTimeout`].
pub(super) struct Limited {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    timeouts: Timeouts,
}

impl Limited {
    pub(super) fn new(inner: TcpListener, max: usize, timeouts: Timeouts) -> Limited {
        Limited {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            timeouts,
        }
    }
}

impl Listener for Limited {
    type Io = IdleTimeout<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // TcpListener's own accept logs and retries errors (e.g. EMFILE).
        let (io, addr) = Listener::accept(&mut self.inner).await;
        let _ = io.set_nodelay(true);
        (IdleTimeout::new(io, self.timeouts, permit), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The client's address, for `ConnectInfo`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, Limited>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Limited>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// An IO stream that fails with `TimedOut` once neither a read nor a write
/// made progress for `idle`, or when the first request head has not been
/// read by its deadline; it returns its connection permit when dropped.
pub(super) struct IdleTimeout<T> {
    io: T,
    idle: Duration,
    last_progress: Instant,
    /// Until the first request head has been read: when it must have been.
    head_due: Option<Instant>,
    /// How much of the blank line that ends a head ("\r\n\r\n") was read last.
    head_end: usize,
    /// Armed for `last_progress + idle` at the latest; moved forward lazily
    /// (only when it fires) so that progress costs no timer update.
    timer: Pin<Box<Sleep>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<T> IdleTimeout<T> {
    pub(super) fn new(io: T, timeouts: Timeouts, permit: OwnedSemaphorePermit) -> IdleTimeout<T> {
        IdleTimeout::with_permit(io, timeouts, Some(permit))
    }

    fn with_permit(
        io: T,
        timeouts: Timeouts,
        permit: Option<OwnedSemaphorePermit>,
    ) -> IdleTimeout<T> {
        let now = Instant::now();
        let head_due = now + timeouts.header;
        IdleTimeout {
            io,
            idle: timeouts.idle,
            last_progress: now,
            head_due: Some(head_due),
            head_end: 0,
            timer: Box::pin(tokio::time::sleep_until(head_due.min(now + timeouts.idle))),
            _permit: permit,
        }
    }

    /// When the connection times out if nothing happens.
    fn due(&self) -> Instant {
        let idle = self.last_progress + self.idle;
        self.head_due.map_or(idle, |h| h.min(idle))
    }

    /// Follow the bytes read until the first head is complete.
    fn saw(&mut self, read: &[u8]) {
        if self.head_due.is_none() {
            return;
        }
        let (ends, count) = head_end(self.head_end, read);
        self.head_end = count;
        if ends {
            self.head_due = None;
        }
    }

    /// After the inner IO returned Pending: fail if the connection has been
    /// idle too long, otherwise make sure the timer will wake this task.
    fn check<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let due = self.due();
            if Instant::now() >= due {
                let why = match self.head_due {
                    Some(_) => "no request head in time".to_string(),
                    None => format!("no progress for {:?}", self.idle),
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
            self.timer.as_mut().reset(due);
        }
    }

    fn progress<R>(
        &mut self,
        polled: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.last_progress = Instant::now();
                Poll::Ready(r)
            }
            Poll::Pending => self.check(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.saw(&buf.filled()[before..]);
        }
        this.progress(polled, cx)
    }
}

/// Scan `read` for the blank line that ends a request head, `matched` bytes
/// of "\r\n\r\n" having ended the previous read. Returns whether it ended,
/// and how many bytes of it end `read` otherwise.
fn head_end(mut matched: usize, read: &[u8]) -> (bool, usize) {
    const END: &[u8] = b"\r\n\r\n";
    for &b in read {
        matched = if b == END[matched] {
            matched + 1
        } else if b == b'\r' {
            1
        } else {
            0
        };
        if matched == END.len() {
            return (true, 0);
        }
    }
    (false, matched)
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.progress(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const IDLE: Duration = Duration::from_millis(300);
    /// Long enough not to matter, for the idle tests.
    const NO_HEAD_LIMIT: Timeouts = Timeouts {
        header: Duration::from_secs(60),
        idle: IDLE,
    };

    #[test]
    fn a_head_ends_at_a_blank_line_even_split_across_reads() {
        assert_eq!(head_end(0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), (true, 0));
        assert_eq!(head_end(0, b"GET / HTTP/1.1\r\nHost: x\r"), (false, 1));
        assert_eq!(head_end(1, b"\n\r"), (false, 3));
        assert_eq!(head_end(3, b"\n"), (true, 0));
        assert_eq!(head_end(2, b"x\r\n"), (false, 2));
        assert_eq!(head_end(3, b"\r\n\r\n"), (true, 0));
        assert_eq!(head_end(0, b""), (false, 0));
    }

    #[tokio::test]
    async fn a_connection_without_a_head_is_closed_even_while_it_trickles() {
        let (a, mut b) = tokio::io::duplex(64);
        let head = Duration::from_millis(400);
        let mut a = IdleTimeout::with_permit(
            a,
            Timeouts {
                header: head,
                idle: Duration::from_secs(60),
            },
            None,
        );
        let start = Instant::now();
        // A byte every 100 ms is progress, but no head: closed at 400 ms.
        let trickle = tokio::spawn(async move {
            for _ in 0..20 {
                if b.write_all(b"G").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            b
        });
        let mut buf = [0u8; 8];
        let err = loop {
            match a.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = start.elapsed();
        assert!(waited >= head && waited < head * 3, "{waited:?}");
        drop(a);
        let _ = trickle.await;
    }

    #[tokio::test]
    async fn after_the_head_only_the_idle_timeout_counts() {
        let (a, mut b) = tokio::io::duplex(256);
        let head = Duration::from_millis(200);
        let mut a = IdleTimeout::with_permit(
            a,
            Timeouts {
                header: head,
                idle: Duration::from_millis(600),
            },
            None,
        );
        b.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = a.read(&mut buf).await.unwrap();
        assert_eq!(n, 18);
        let start = Instant::now();
        let err = a.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            start.elapsed() >= Duration::from_millis(600),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn idle_connections_time_out_and_busy_ones_do_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = IdleTimeout::with_permit(a, NO_HEAD_LIMIT, None);
        // Traffic every 150 ms keeps it open well past 300 ms.
        for _ in 0..6 {
            tokio::time::sleep(IDLE / 2).await;
            b.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            a.read_exact(&mut one).await.unwrap();
        }
        // Then silence: the read fails after 300 ms, not before.
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let err = a.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = start.elapsed();
        assert!(waited >= IDLE && waited < IDLE * 3, "{waited:?}");
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_times_out_the_writer() {
        let (a, _b) = tokio::io::duplex(16);
        let mut a = IdleTimeout::with_permit(a, NO_HEAD_LIMIT, None);
        let err = a.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
