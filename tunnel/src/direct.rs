//! A session of an agent in the proxy's own process, without a task in
//! between. Opened through `Route::Local`, a stdio session still has its
//! two queues (the request body and the response body), but the messages
//! take shorter ways: the proxy writes each request line to the server's
//! standard input itself (`Input`, which the agent puts in its response's
//! extensions), and the agent's session task hands each line the server
//! writes to the proxy's handler of server messages (`Output`, which the
//! proxy puts in its request's extensions). The queues then carry only
//! the ends: the proxy drops its sender when the session ends, and the
//! agent sends its trailers naming why the server's side ended.
//!
//! Extensions do not cross a real tunnel (HTTP/2 does not carry them), so
//! an agent in another process never sees an `Output`, and the proxy
//! never gets an `Input` from one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// A server's standard input, shared by the agent's session task and the
/// proxy's handlers. Every write is one whole line: a writer that gives up
/// waiting (a timeout, a client gone) leaves it to finish in a task of its
/// own, so that no line is ever cut short and the next one run into it.
#[derive(Clone)]
pub struct Input {
    writer: Arc<Mutex<Option<Writer>>>,
    /// Signalled when a write fails: the server closed its input (or died).
    failed: Arc<tokio::sync::Notify>,
    /// The write left to a task of its own, if one was (writes go one at
    /// a time, so there is at most one): closing the input stops it.
    left: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
    max: usize,
}

impl Input {
    /// `max`: the longest line taken, newline included.
    pub fn new(writer: impl AsyncWrite + Send + 'static, max: usize) -> Input {
        Input {
            writer: Arc::new(Mutex::new(Some(Box::pin(writer)))),
            failed: Arc::new(tokio::sync::Notify::new()),
            left: Arc::default(),
            max,
        }
    }

    /// Writes `line` (ending in a newline) whole. Lines are written in the
    /// order their writers came; an error means the input is closed.
    pub async fn write(&self, line: Bytes) -> io::Result<()> {
        if line.len() > self.max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a client message exceeded {} bytes", self.max),
            ));
        }
        let mut writer = self.writer.clone().lock_owned().await;
        let failed = self.failed.clone();
        let mut write = Box::pin(async move {
            let Some(w) = writer.as_mut() else {
                return Err(closed());
            };
            let r = match w.write_all(&line).await {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            };
            if r.is_err() {
                // The input is of no more use: closed, and whoever reads
                // `failed` (the agent's session task) told.
                writer.take();
                failed.notify_one();
            }
            r
        });
        // Most lines fit in the pipe at once: written here, with no task.
        match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let task = tokio::spawn(write);
                *self.left() = Some(task.abort_handle());
                task.await.unwrap_or_else(|_| Err(closed()))
            }
        }
    }

    fn left(&self) -> std::sync::MutexGuard<'_, Option<tokio::task::AbortHandle>> {
        self.left.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops a write left to its own task (a server that does not read
    /// would hold the input with it for ever).
    fn stop_left(&self) {
        if let Some(task) = self.left().take() {
            task.abort();
        }
    }

    /// Returns once a write has failed (the server closed its input).
    pub async fn failed(&self) {
        self.failed.notified().await
    }

    /// Closes the input: the server reads the end of its input. A line
    /// still being written that the server does not take is cut short,
    /// since nothing will follow it.
    pub async fn close(&self) {
        self.stop_left();
        self.writer.lock().await.take();
    }

    /// Closes the input now unless a write holds it (a write in progress
    /// ends when the process does).
    pub fn try_close(&self) {
        self.stop_left();
        if let Ok(mut w) = self.writer.try_lock() {
            w.take();
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the MCP server's input is closed",
    )
}

/// The proxy's handler of what the server sends: each line (without its
/// newline), in order. An error ends the session; it says why.
pub trait Output: Send + Sync {
    fn line(&self, line: Bytes) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// An `Output` in a request's extensions.
#[derive(Clone)]
pub struct OutputRef(pub Arc<dyn Output>);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn lines_stay_whole_when_their_writers_give_up() {
        // A pipe that holds 64 bytes: the second line cannot go in at once.
        let (w, mut r) = tokio::io::duplex(64);
        let input = Input::new(w, 1024);
        let a = Bytes::from(format!("{}\n", "a".repeat(40)));
        let b = Bytes::from(format!("{}\n", "b".repeat(100)));
        input.write(a.clone()).await.expect("first line");
        // The second writer gives up while its line is half written.
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(50), input.write(b.clone()))
                .await;
        assert!(gave_up.is_err(), "the pipe was full");
        let c = Bytes::from_static(b"c\n");
        let third = {
            let input = input.clone();
            tokio::spawn(async move { input.write(c).await })
        };
        let mut got = vec![0u8; a.len() + b.len() + 2];
        r.read_exact(&mut got).await.expect("read");
        third.await.expect("task").expect("third line");
        let want = [a.as_ref(), b.as_ref(), b"c\n"].concat();
        assert_eq!(got, want, "whole lines, in order");
    }

    #[tokio::test]
    async fn closing_stops_a_write_the_server_does_not_take() {
        let (w, mut r) = tokio::io::duplex(64);
        let input = Input::new(w, 1024);
        let long = Bytes::from(format!("{}\n", "x".repeat(200)));
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(50), input.write(long)).await;
        assert!(gave_up.is_err(), "the pipe was full");
        // Nothing reads: closing must not wait for the write.
        tokio::time::timeout(std::time::Duration::from_secs(5), input.close())
            .await
            .expect("closed at once");
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.expect("read to the end");
        assert_eq!(all.len(), 64, "what went in before the end");
    }

    #[tokio::test]
    async fn a_failed_write_is_told() {
        let (w, r) = tokio::io::duplex(64);
        let input = Input::new(w, 1024);
        drop(r);
        let e = input
            .write(Bytes::from_static(b"x\n"))
            .await
            .expect_err("no reader");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        tokio::time::timeout(std::time::Duration::from_secs(5), input.failed())
            .await
            .expect("told");
        let e = input
            .write(Bytes::from_static(b"y\n"))
            .await
            .expect_err("closed");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn a_closed_input_refuses_lines_and_long_lines_are_refused() {
        let (w, mut r) = tokio::io::duplex(1024);
        let input = Input::new(w, 8);
        assert!(
            input
                .write(Bytes::from_static(b"123456789\n"))
                .await
                .is_err()
        );
        input
            .write(Bytes::from_static(b"ok\n"))
            .await
            .expect("fits");
        input.close().await;
        let e = input
            .write(Bytes::from_static(b"no\n"))
            .await
            .expect_err("closed");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.expect("read to the end");
        assert_eq!(all, b"ok\n");
    }
}
