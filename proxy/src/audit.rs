//! Audit events from the proxy go to the auth-service in the background,
//! through a bounded queue, so the request path never waits on them: over
//! gRPC, or handed over directly to an auth-service in the same process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use portico_proto::client::{AuthClient, LocalAudit};
use portico_proto::v1::{EmitEventRequest, EmitEventsRequest};
use tokio::sync::{mpsc, watch};

const QUEUE: usize = 10_000;
/// Events per call: the auth-service takes 1,000, one is kept for `audit.lost`.
const BATCH: usize = 999;
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<EmitEventRequest>,
    /// Events that could not be queued or stored: the metric
    /// `portico_proxy_audit_dropped_total`, and an `audit.lost` event.
    pub dropped: Arc<AtomicU64>,
    /// The most events that waited in the queue at once
    /// (`portico_proxy_audit_queue_peak`).
    pub peak: Arc<AtomicU64>,
    /// Events queued so far, and (from the sending task) those since
    /// stored or counted as lost: `flush` waits for the second to reach
    /// the first.
    accepted: Arc<AtomicU64>,
    settled: watch::Receiver<u64>,
}

/// How long a session waits for room in a full queue before the event counts as lost.
const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the proxy's audit events are stored.
pub enum Sink {
    /// `EmitEvents` on the auth-service.
    Remote(AuthClient),
    /// An auth-service in this process (the all-in-one), and the proxy's
    /// own name there.
    Local(Arc<dyn LocalAudit>, String),
}

impl Sink {
    async fn emit(&self, events: &[EmitEventRequest]) -> Result<(), tonic::Status> {
        match self {
            Sink::Remote(api) => {
                let req = EmitEventsRequest {
                    events: events.to_vec(),
                };
                api.clone().emit_events(req).await.map(|_| ())
            }
            Sink::Local(l, actor) => l.emit(actor, events).await,
        }
    }
}

impl Auditor {
    pub fn start(sink: Sink) -> Self {
        let (tx, mut rx) = mpsc::channel::<EmitEventRequest>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost_counter = dropped.clone();
        let (done, settled) = watch::channel(0u64);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            // Lost events not yet reported in an `audit.lost` event.
            let mut reported = 0u64;
            // Everything queued goes in one call: one round trip and one transaction.
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                // Let a few milliseconds of events gather into one
                // transaction, unless a full batch is already waiting: a
                // queue that outgrows what one batch per wait can store
                // would fill up (and then hold the sessions back) under a
                // load the database could take.
                if batch.len() < BATCH {
                    tokio::time::sleep(GATHER).await;
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(ev) => batch.push(ev),
                            Err(_) => break,
                        }
                    }
                }
                let taken = batch.len() as u64;
                let lost = lost_counter.load(Ordering::Relaxed);
                if lost > reported {
                    batch.push(EmitEventRequest {
                        r#type: "audit.lost".into(),
                        success: false,
                        fields_json: serde_json::json!({"count": lost - reported, "total": lost})
                            .to_string(),
                    });
                }
                let n = batch.len() as u64;
                let mut delay = std::time::Duration::from_millis(100);
                let mut stored = false;
                // Retry while the auth-service is away, then count these as lost.
                for _ in 0..8 {
                    match sink.emit(&batch).await {
                        Ok(_) => {
                            stored = true;
                            break;
                        }
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(std::time::Duration::from_secs(5));
                        }
                        Err(s) => {
                            tracing::error!(events = n, error = %s.message(), "audit events refused");
                            break;
                        }
                    }
                }
                if stored {
                    reported = lost;
                } else {
                    // The `audit.lost` event itself is not counted; it is made again next time.
                    let real = n - u64::from(lost > reported);
                    lost_counter.fetch_add(real, Ordering::Relaxed);
                    tracing::error!(events = real, "audit events lost after retries");
                }
                done.send_modify(|n| *n += taken);
                batch.clear();
            }
        });
        Auditor {
            tx,
            dropped,
            peak: Arc::default(),
            accepted: Arc::default(),
            settled,
        }
    }

    /// Waits, at most `within`, until every event queued before the call
    /// has been stored (or counted as lost); says whether that happened.
    /// A proxy that stops calls it last, so that what it audited while
    /// stopping does not go with the process.
    pub async fn flush(&self, within: std::time::Duration) -> bool {
        let target = self.accepted.load(Ordering::Acquire);
        let mut settled = self.settled.clone();
        matches!(
            tokio::time::timeout(within, settled.wait_for(|n| *n >= target)).await,
            Ok(Ok(_))
        )
    }

    /// Events waiting in the queue now (`portico_proxy_audit_queued`).
    pub fn queued(&self) -> u64 {
        (self.tx.max_capacity() - self.tx.capacity()) as u64
    }

    /// Queues an event, waiting for room when the queue is full: the session
    /// that produces events faster than they are stored slows down.
    pub async fn record(&self, kind: &str, success: bool, fields: serde_json::Value) {
        self.record_json(kind, success, fields.to_string()).await
    }

    /// As `record`, with the fields already written as one JSON object
    /// (the hot path writes them from a struct, with no map built).
    pub async fn record_json(&self, kind: &str, success: bool, fields_json: String) {
        let ev = EmitEventRequest {
            r#type: kind.to_string(),
            success,
            fields_json,
        };
        // Room in the queue is the common case: no timer for it.
        let sent = match self.tx.try_send(ev) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(ev)) => {
                matches!(
                    tokio::time::timeout(QUEUE_WAIT, self.tx.send(ev)).await,
                    Ok(Ok(()))
                )
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        if sent {
            self.accepted.fetch_add(1, Ordering::Release);
            self.peak.fetch_max(self.queued(), Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(event = kind, "audit queue full; event lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the size of every batch it is handed.
    #[derive(Default)]
    struct Batches(std::sync::Mutex<Vec<usize>>);

    impl LocalAudit for Batches {
        fn emit<'a>(
            &'a self,
            _actor: &'a str,
            events: &'a [EmitEventRequest],
        ) -> portico_proto::client::EmitFuture<'a> {
            self.0.lock().expect("lock").push(events.len());
            Box::pin(async { Ok(()) })
        }
    }

    /// A backlog goes in full batches one after another: the gathering
    /// wait is only for a batch that is not full. (Time is the runtime's
    /// own, paused: it moves only when every task waits.)
    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_stored_without_waiting_between_full_batches() {
        let batches = Arc::new(Batches::default());
        let audit = Auditor::start(Sink::Local(batches.clone(), "proxy-1".into()));
        let n = 2 * BATCH + 2;
        for i in 0..n {
            audit.record("t", true, serde_json::json!({ "n": i })).await;
        }
        let t = tokio::time::Instant::now();
        assert!(audit.flush(std::time::Duration::from_secs(60)).await);
        assert_eq!(*batches.0.lock().expect("lock"), vec![BATCH, BATCH, 2]);
        // One wait, for the last batch; a wait per batch would be three.
        assert_eq!(t.elapsed(), GATHER);
    }

    #[tokio::test]
    async fn the_queue_reports_what_waits_and_the_most_that_did() {
        // An auth-service that accepts connections and never answers: the
        // first batch stays in flight, and what comes after it waits.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dial =
            portico_proto::client::Dial::plain(&silent.local_addr().expect("addr").to_string());
        let api = portico_proto::client::connect_lazy(&dial, None).expect("client");
        let audit = Auditor::start(Sink::Remote(api));
        audit.record("t", true, serde_json::json!({"n": 0})).await;
        // The auditor takes it (after gathering for GATHER) and sends it.
        let taken = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while audit.queued() > 0 {
            assert!(
                tokio::time::Instant::now() < taken,
                "the first event was never taken"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(GATHER * 3).await;
        for n in 1..=7 {
            audit.record("t", true, serde_json::json!({ "n": n })).await;
        }
        assert_eq!(audit.queued(), 7);
        assert_eq!(audit.peak.load(Ordering::Relaxed), 7);
        assert_eq!(audit.dropped.load(Ordering::Relaxed), 0);
        // Nothing is stored by a server that never answers: a flush says
        // so when its time is up, and does not wait longer.
        let t = tokio::time::Instant::now();
        assert!(!audit.flush(std::time::Duration::from_millis(100)).await);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
