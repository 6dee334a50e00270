//! Open watches are re-checked together: every `EVERY`, one round reads
//! the sessions of every watcher in one query (a few for thousands), then
//! decides each watcher as `authenticate` would and ends, through its
//! channel, the watches of callers who lost access. A watch stream only
//! waits for its verdict. Storage trouble decides nothing: the next round
//! asks again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use portico_core::{Code, Kind, Verb};
use tokio::sync::{oneshot, watch};
use tonic::Status;

use crate::AuthServer;
use crate::identity::{authenticate, hash_token, principal_of};

/// How often open watches are re-checked.
pub const EVERY: Duration = Duration::from_millis(500);

/// Why a watch must end.
pub struct Revoked {
    pub status: Status,
    pub kind: Option<Kind>,
    pub verb: Option<Verb>,
}

struct Waiter {
    token: Option<String>,
    kinds: Vec<Kind>,
    verdict: oneshot::Sender<Revoked>,
}

#[derive(Default)]
pub struct Rechecks {
    waiting: Mutex<HashMap<u64, Waiter>>,
    next: AtomicU64,
}

/// A watch under re-check; it leaves the rounds when dropped.
pub struct Registration {
    server: Arc<AuthServer>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.server.rechecks.lock().remove(&self.id);
    }
}

impl Rechecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-checks a watch opened with `token` over `kinds` in every round
    /// from the next; its verdict comes once, if it loses access.
    pub fn register(
        server: &Arc<AuthServer>,
        token: Option<String>,
        kinds: Vec<Kind>,
    ) -> (Registration, oneshot::Receiver<Revoked>) {
        let (verdict, rx) = oneshot::channel();
        let id = server.rechecks.next.fetch_add(1, Ordering::Relaxed);
        server.rechecks.lock().insert(
            id,
            Waiter {
                token,
                kinds,
                verdict,
            },
        );
        (
            Registration {
                server: server.clone(),
                id,
            },
            rx,
        )
    }
}

/// Runs a round every `EVERY` until `stop` turns true.
pub async fn run(server: Arc<AuthServer>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => round(&server).await,
            _ = stop.changed() => return,
        }
    }
}

/// One round: every registered watch, decided.
pub async fn round(server: &AuthServer) {
    let batch: Vec<(u64, Option<String>, Vec<Kind>)> = server
        .rechecks
        .lock()
        .iter()
        .map(|(id, w)| (*id, w.token.clone(), w.kinds.clone()))
        .collect();
    if batch.is_empty() {
        return;
    }
    let mut hashes: Vec<String> = batch
        .iter()
        .filter_map(|(_, t, _)| t.as_deref().map(hash_token))
        .collect();
    hashes.sort();
    hashes.dedup();
    let rows = match server.backend.sessions(&hashes).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(error = %e, watchers = batch.len(), "cannot re-check watchers now");
            return;
        }
    };
    let by_hash: HashMap<&str, &crate::storage::SessionRow> =
        rows.iter().map(|r| (r.token_hash.as_str(), r)).collect();
    for (id, token, kinds) in batch {
        let verdict = match token {
            None => match authenticate(server.backend.as_ref(), None).await {
                Err(e) => Some(Revoked {
                    status: Status::unauthenticated(format!("the watch ended: {}", e.message)),
                    kind: None,
                    verb: None,
                }),
                Ok(_) => None,
            },
            Some(t) => {
                let row = by_hash.get(hash_token(&t).as_str()).map(|r| (*r).clone());
                decide(server, row, &kinds).await
            }
        };
        if let Some(r) = verdict
            && let Some(w) = server.rechecks.lock().remove(&id)
        {
            let _ = w.verdict.send(r);
        }
    }
}

/// `Some` when the login is gone (user deleted, session revoked or
/// expired) or its roles no longer allow `list` and `read` on every
/// watched kind; `None` also when storage cannot answer now.
async fn decide(
    server: &AuthServer,
    row: Option<crate::storage::SessionRow>,
    kinds: &[Kind],
) -> Option<Revoked> {
    let p = match principal_of(server.backend.as_ref(), row).await {
        Ok(p) => p,
        Err(e) if e.code == Code::Unauthenticated => {
            return Some(Revoked {
                status: Status::unauthenticated(format!("the watch ended: {}", e.message)),
                kind: None,
                verb: None,
            });
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot re-check a watcher now");
            return None;
        }
    };
    for kind in kinds {
        for verb in [Verb::List, Verb::Read] {
            if let Err(e) = p.checker.check(*kind, verb) {
                return Some(Revoked {
                    status: Status::permission_denied(format!(
                        "the watch ended: your roles changed: {}",
                        e.message
                    )),
                    kind: Some(*kind),
                    verb: Some(verb),
                });
            }
        }
    }
    None
}
