//! A session's queue of pieces (lines, then perhaps trailers) for one
//! direction of its tunnel stream, read as that stream's body.
//!
//! A bounded FIFO whose storage is reused. tokio's `mpsc` allocates its
//! slots in blocks of 32 as messages pass, so every long-lived session held
//! one block more from its 33rd message on: a step in the proxy's and the
//! agent's memory. This queue keeps one `VecDeque` that grows only with the
//! number of pieces waiting at once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::Notify;

/// What a queue carries: something that becomes one frame of the body.
pub trait IntoFrame: Send + 'static {
    fn into_frame(self) -> Frame<Bytes>;
}

impl IntoFrame for Bytes {
    fn into_frame(self) -> Frame<Bytes> {
        Frame::data(self)
    }
}

struct State<T> {
    queue: VecDeque<T>,
    /// The body's task, waiting for a line or for the last sender to go.
    reader: Option<Waker>,
    senders: usize,
    /// The body was dropped: nothing will read again.
    closed: bool,
}

struct Shared<T> {
    cap: usize,
    state: Mutex<State<T>>,
    /// Signalled when a slot frees up or the body goes away.
    space: Notify,
    /// Signalled when the body goes away. Apart from `space`, so that a
    /// task waiting for the end cannot take a freed slot's wake-up.
    gone: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queue holding at most `cap` pieces; the body ends when every sender is gone.
pub fn channel<T: IntoFrame>(cap: usize) -> (Tx<T>, QueueBody<T>) {
    let shared = Arc::new(Shared {
        cap: cap.max(1),
        state: Mutex::new(State {
            queue: VecDeque::new(),
            reader: None,
            senders: 1,
            closed: false,
        }),
        space: Notify::new(),
        gone: Notify::new(),
    });
    (
        Tx {
            shared: shared.clone(),
        },
        QueueBody { shared },
    )
}

pub struct Tx<T> {
    shared: Arc<Shared<T>>,
}

/// The piece could not be queued: the body is gone.
#[derive(Debug)]
pub struct Closed;

impl<T> Tx<T> {
    /// Queues `piece`, waiting while the queue is full.
    pub async fn send(&self, piece: T) -> Result<(), Closed> {
        loop {
            let space = self.shared.space.notified();
            tokio::pin!(space);
            // Registered before the check, so a slot freed in between wakes us.
            space.as_mut().enable();
            {
                let mut g = self.shared.lock();
                if g.closed {
                    return Err(Closed);
                }
                if g.queue.len() < self.shared.cap {
                    g.queue.push_back(piece);
                    let reader = g.reader.take();
                    drop(g);
                    if let Some(w) = reader {
                        w.wake();
                    }
                    return Ok(());
                }
            }
            space.await;
        }
    }

    /// Resolves once the body is gone (the other side stopped reading).
    pub async fn closed(&self) {
        let gone = self.shared.gone.notified();
        tokio::pin!(gone);
        gone.as_mut().enable();
        if self.shared.lock().closed {
            return;
        }
        gone.await;
    }
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Tx {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        let reader = {
            let mut g = self.shared.lock();
            g.senders -= 1;
            if g.senders == 0 {
                g.reader.take()
            } else {
                None
            }
        };
        if let Some(w) = reader {
            w.wake();
        }
    }
}

pub struct QueueBody<T> {
    shared: Arc<Shared<T>>,
}

impl<T: IntoFrame> Body for QueueBody<T> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let mut g = self.shared.lock();
        if let Some(piece) = g.queue.pop_front() {
            drop(g);
            self.shared.space.notify_one();
            return Poll::Ready(Some(Ok(piece.into_frame())));
        }
        if g.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut g.reader {
            Some(w) => w.clone_from(cx.waker()),
            None => g.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let g = self.shared.lock();
        g.senders == 0 && g.queue.is_empty()
    }
}

impl<T> Drop for QueueBody<T> {
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock();
            g.closed = true;
            g.queue = VecDeque::new();
        }
        self.shared.space.notify_waiters();
        self.shared.gone.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should say where
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn lines_arrive_in_order_and_the_body_ends_with_the_last_sender() {
        let (tx, mut body) = channel::<Bytes>(2);
        let tx2 = tx.clone();
        let writer = tokio::spawn(async move {
            for i in 0..100u32 {
                tx.send(Bytes::from(i.to_string())).await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(f) = body.frame().await {
            got.push(String::from_utf8(f.unwrap().into_data().unwrap().to_vec()).unwrap());
            if got.len() == 100 {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(got, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
        assert!(!body.is_end_stream(), "one sender is still alive");
        drop(tx2);
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_full_queue_waits_and_a_dropped_body_fails_and_wakes_the_senders() {
        let (tx, body) = channel::<Bytes>(1);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let tx2 = tx.clone();
        let blocked = tokio::spawn(async move { tx.send(Bytes::from_static(b"b")).await });
        let closed = tokio::spawn(async move { tx2.closed().await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !blocked.is_finished(),
            "the second line must wait for space"
        );
        assert!(!closed.is_finished(), "the body is still there");
        drop(body);
        assert!(blocked.await.unwrap().is_err());
        closed.await.unwrap();
    }

    #[tokio::test]
    async fn a_task_waiting_for_the_end_does_not_take_a_senders_wake_up() {
        let (tx, mut body) = channel::<Bytes>(1);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let tx2 = tx.clone();
        // The end's waiter first, then a sender that waits for space.
        let watcher = tokio::spawn(async move { tx2.closed().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let sender = tokio::spawn(async move { tx.send(Bytes::from_static(b"b")).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        body.frame().await.unwrap().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), sender)
            .await
            .expect("the freed slot woke the sender")
            .unwrap()
            .unwrap();
        assert!(!watcher.is_finished());
        drop(body);
        watcher.await.unwrap();
    }

    #[tokio::test]
    async fn storage_does_not_grow_with_the_number_of_lines_passed() {
        let (tx, mut body) = channel::<Bytes>(256);
        for _ in 0..1000 {
            tx.send(Bytes::from_static(b"x\n")).await.unwrap();
            body.frame().await.unwrap().unwrap();
        }
        assert!(body.shared.lock().queue.capacity() <= 4);
    }
}
