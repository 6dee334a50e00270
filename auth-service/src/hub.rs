//! The change feed: one tailer per auth instance reads committed events in
//! revision order and fans them out; each watch stream sends a snapshot,
//! then every later event exactly once, filling gaps from storage.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use portico_core::labels::{LabelSelector, any_matches};
use portico_core::{Code, Error, Kind};
use portico_proto::v1::{WatchEvent, watch_event};
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::storage::{Backend, Event, Op};

const FANOUT_CAPACITY: usize = 4096;
const PAGE: i64 = 1000;
/// How often the tailer looks even without a wake-up (a lost NOTIFY, say).
const SAFETY_POLL: Duration = Duration::from_millis(1000);

pub struct Hub {
    backend: Arc<dyn Backend>,
    tx: broadcast::Sender<Arc<Event>>,
    poke: Notify,
    last: AtomicI64,
    stop: watch::Receiver<bool>,
    /// App events left out of watches narrowed by `app_selectors`
    /// (`portico_auth_watch_app_events_skipped_total`).
    skipped_apps: AtomicU64,
}

impl Hub {
    /// Starts the tailer; it stops when `stop` turns true.
    pub async fn start(
        backend: Arc<dyn Backend>,
        stop: watch::Receiver<bool>,
    ) -> portico_core::Result<Arc<Hub>> {
        let last = backend.current_revision().await?;
        let (tx, _) = broadcast::channel(FANOUT_CAPACITY);
        let hub = Arc::new(Hub {
            backend,
            tx,
            poke: Notify::new(),
            last: AtomicI64::new(last),
            stop,
            skipped_apps: AtomicU64::new(0),
        });
        let remote = hub.backend.subscribe_remote_changes().await;
        tokio::spawn(tail(hub.clone(), remote));
        Ok(hub)
    }

    /// Wakes the tailer after a local commit.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    pub fn last_revision(&self) -> i64 {
        self.last.load(Ordering::Acquire)
    }

    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// App events narrowed watches left out, since start.
    pub fn skipped_apps(&self) -> u64 {
        self.skipped_apps.load(Ordering::Relaxed)
    }

    /// Opens a watch; events (or one final error) arrive on the returned
    /// channel. With `apps`, app events are narrowed to the apps they
    /// select (see `AppFilter`); that needs a snapshot (`from` 0).
    pub fn watch(
        self: &Arc<Self>,
        kinds: Vec<Kind>,
        from: i64,
        apps: Option<Vec<LabelSelector>>,
    ) -> mpsc::Receiver<Result<WatchEvent, Error>> {
        let (out, rx) = mpsc::channel(1024);
        let sub = self.tx.subscribe();
        let hub = self.clone();
        tokio::spawn(async move {
            let mut w = Watcher {
                hub,
                kinds,
                out,
                next: from + 1,
                apps: apps.map(|selectors| AppFilter {
                    selectors,
                    sent: HashSet::new(),
                }),
            };
            if let Err(e) = w.run(sub, from).await {
                let _ = w.out.send(Err(e)).await;
            }
        });
        rx
    }
}

async fn tail(hub: Arc<Hub>, mut remote: Option<mpsc::Receiver<()>>) {
    let mut stop = hub.stop.clone();
    loop {
        let mut last = hub.last.load(Ordering::Acquire);
        loop {
            match hub.backend.events_after(last, PAGE).await {
                Ok(evs) if evs.is_empty() => break,
                Ok(evs) => {
                    for e in evs {
                        last = e.revision;
                        hub.last.store(last, Ordering::Release);
                        let _ = hub.tx.send(Arc::new(e));
                    }
                }
                Err(e) if e.code == Code::TooOld => {
                    // Compaction overtook the tailer; watchers resync themselves.
                    if let Ok(cur) = hub.backend.current_revision().await {
                        hub.last.store(cur, Ordering::Release);
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "change feed cannot read events");
                    break;
                }
            }
        }
        let remote_wake = async {
            match remote.as_mut() {
                Some(r) => r.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hub.poke.notified() => {}
            alive = remote_wake => if !alive { remote = None; },
            _ = tokio::time::sleep(SAFETY_POLL) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

struct Watcher {
    hub: Arc<Hub>,
    kinds: Vec<Kind>,
    out: mpsc::Sender<Result<WatchEvent, Error>>,
    /// The revision this watcher must deliver next.
    next: i64,
    apps: Option<AppFilter>,
}

/// Narrows app events to those a watcher's selectors concern: an app they
/// match, and once more an app this stream sent that stops matching or is
/// deleted, so that the watcher lets it go. What the watcher did not hear
/// of it never held, so leaving the rest out changes nothing it decides.
/// It starts from a snapshot, so it knows every app the stream sent.
struct AppFilter {
    selectors: Vec<LabelSelector>,
    /// Apps sent as matching and not since let go.
    sent: HashSet<String>,
}

#[derive(serde::Deserialize, Default)]
struct Labeled {
    #[serde(default)]
    metadata: Labels,
}

#[derive(serde::Deserialize, Default)]
struct Labels {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl AppFilter {
    /// Whether to send this event; `json` is the app as stored.
    fn admit(&mut self, op: Op, name: &str, json: &str) -> bool {
        let matches = op == Op::Put && {
            // An app that cannot be read is sent: the watcher reports it.
            serde_json::from_str::<Labeled>(json)
                .map(|l| any_matches(&self.selectors, &l.metadata.labels))
                .unwrap_or(true)
        };
        if matches {
            if !self.sent.contains(name) {
                self.sent.insert(name.to_string());
            }
            true
        } else {
            self.sent.remove(name)
        }
    }
}

impl Watcher {
    async fn run(
        &mut self,
        mut sub: broadcast::Receiver<Arc<Event>>,
        from: i64,
    ) -> Result<(), Error> {
        if from <= 0 {
            let (records, rev) = self.hub.backend.snapshot(&self.kinds).await?;
            for r in records {
                if r.kind == Kind::App && !self.admit(Op::Put, &r.name, &r.value) {
                    continue;
                }
                self.send(WatchEvent {
                    r#type: watch_event::Type::Put as i32,
                    revision: r.revision,
                    kind: r.kind.as_str().into(),
                    name: r.name,
                    json: crate::resources::stamp(&r.value, r.revision, r.expires),
                })
                .await?;
            }
            self.send(WatchEvent {
                r#type: watch_event::Type::SnapshotEnd as i32,
                revision: rev,
                ..Default::default()
            })
            .await?;
            self.next = rev + 1;
        } else {
            self.catch_up(i64::MAX).await?;
        }
        let mut stop = self.hub.stop.clone();
        loop {
            tokio::select! {
                ev = sub.recv() => match ev {
                    Ok(e) => {
                        if e.revision < self.next {
                            continue;
                        }
                        if e.revision > self.next {
                            self.catch_up(e.revision).await?;
                        }
                        if e.revision == self.next {
                            self.deliver(&e).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up(i64::MAX).await?,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = self.out.closed() => return Ok(()),
                _ = stop.changed() => return Err(Error::unavailable("the auth service is shutting down")),
            }
        }
    }

    /// Reads from storage every event from `next` up to (not including) `until`.
    async fn catch_up(&mut self, until: i64) -> Result<(), Error> {
        while self.next < until {
            let evs = self.hub.backend.events_after(self.next - 1, PAGE).await?;
            if evs.is_empty() {
                return Ok(());
            }
            for e in evs {
                if e.revision >= until {
                    return Ok(());
                }
                self.deliver(&e).await?;
            }
        }
        Ok(())
    }

    async fn deliver(&mut self, e: &Event) -> Result<(), Error> {
        self.next = e.revision + 1;
        if !self.kinds.is_empty() && !self.kinds.contains(&e.kind) {
            return Ok(());
        }
        if e.kind == Kind::App && !self.admit(e.op, &e.name, &e.value) {
            return Ok(());
        }
        let (t, json) = match e.op {
            Op::Put => (
                watch_event::Type::Put,
                crate::resources::stamp(&e.value, e.revision, None),
            ),
            Op::Delete => (watch_event::Type::Delete, e.value.clone()),
        };
        self.send(WatchEvent {
            r#type: t as i32,
            revision: e.revision,
            kind: e.kind.as_str().into(),
            name: e.name.clone(),
            json,
        })
        .await
    }

    /// Whether an app event goes to this watcher (always, unless it is
    /// narrowed); what is left out is counted.
    fn admit(&mut self, op: Op, name: &str, json: &str) -> bool {
        let Some(f) = self.apps.as_mut() else {
            return true;
        };
        let sent = f.admit(op, name, json);
        if !sent {
            self.hub.skipped_apps.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    async fn send(&self, ev: WatchEvent) -> Result<(), Error> {
        self.out
            .send(Ok(ev))
            .await
            .map_err(|_| Error::unavailable("watcher went away"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prod_only() -> AppFilter {
        let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        AppFilter {
            selectors: vec![LabelSelector::from_single(&labels).expect("selector")],
            sent: HashSet::new(),
        }
    }

    const DEV: &str = r#"{"kind":"app","metadata":{"name":"x","labels":{"env":"dev"}}}"#;
    const PROD: &str = r#"{"kind":"app","metadata":{"name":"x","labels":{"env":"prod"}}}"#;

    #[test]
    fn an_app_that_cannot_be_read_is_sent_and_let_go_like_any_other() {
        let mut f = prod_only();
        // The watcher reports what it cannot read; it is not hidden.
        assert!(f.admit(Op::Put, "x", "{not json"));
        // Readable now, and not matching: sent once more, then no more.
        assert!(f.admit(Op::Put, "x", DEV));
        assert!(!f.admit(Op::Put, "x", DEV));
        assert!(!f.admit(Op::Delete, "x", DEV));
    }

    #[test]
    fn an_app_is_let_go_once_whether_it_stops_matching_or_goes() {
        let mut f = prod_only();
        assert!(!f.admit(Op::Put, "x", DEV));
        assert!(f.admit(Op::Put, "x", PROD));
        assert!(
            f.admit(Op::Put, "x", PROD),
            "every change to a matching app is sent"
        );
        assert!(f.admit(Op::Delete, "x", PROD));
        assert!(!f.admit(Op::Delete, "x", PROD));
        assert!(f.sent.is_empty());
    }
}
