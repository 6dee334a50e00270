//! Audit events from the proxy go to the auth-service in the background,
//! through a bounded queue, so the request path never waits on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use portico_proto::client::AuthClient;
use portico_proto::v1::{EmitEventRequest, EmitEventsRequest};
use tokio::sync::mpsc;

const QUEUE: usize = 10_000;
const BATCH: usize = 500;
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<EmitEventRequest>,
    pub dropped: Arc<AtomicU64>,
}

impl Auditor {
    pub fn start(api: AuthClient) -> Self {
        let (tx, mut rx) = mpsc::channel::<EmitEventRequest>(QUEUE);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            // Everything queued goes in one call: one round trip and one transaction.
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                // Under load, let a few milliseconds of events gather into one transaction.
                tokio::time::sleep(GATHER).await;
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                let req = EmitEventsRequest {
                    events: std::mem::take(&mut batch),
                };
                let mut api = api.clone();
                let mut delay = std::time::Duration::from_millis(100);
                // Retry a few times while the auth-service is away, then give up on these.
                for _ in 0..5 {
                    match api.emit_events(req.clone()).await {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                        Err(s) => {
                            tracing::warn!(events = req.events.len(), error = %s.message(), "audit events refused");
                            break;
                        }
                    }
                }
            }
        });
        Auditor {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn emit(&self, kind: &str, success: bool, fields: serde_json::Value) {
        let ev = EmitEventRequest {
            r#type: kind.to_string(),
            success,
            fields_json: fields.to_string(),
        };
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event = kind, "audit queue full; event dropped");
        }
    }
}
