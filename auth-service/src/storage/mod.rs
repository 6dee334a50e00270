//! Storage: one `Backend` trait, SQLite and Postgres behind it. Every write
//! takes the next revision from a counter row (whose row lock serialises
//! writers until commit, so revision order is commit order) and appends an
//! event in the same transaction.

use async_trait::async_trait;
use portico_core::{Error, Kind, Result};

#[macro_use]
mod common;
pub mod postgres;
pub mod sqlite;

pub use postgres::PostgresBackend;
pub use sqlite::SqliteBackend;

/// A stored resource: its JSON without server-set metadata, which travels here.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kind: Kind,
    pub name: String,
    pub revision: i64,
    pub value: String,
    pub expires: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Delete,
}

/// One change, as the feed delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub revision: i64,
    pub op: Op,
    pub kind: Kind,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Fails with AlreadyExists if the record exists.
    Create,
    /// Fails with NotFound if it does not.
    Update,
    Upsert,
}

#[derive(Debug, Clone)]
pub enum WriteOp {
    Put {
        kind: Kind,
        name: String,
        value: String,
        expires: Option<i64>,
        mode: PutMode,
    },
    /// `expired_before`: delete only if the record expired before this time
    /// (expiry sweeps); such a delete of a missing or renewed record is skipped.
    Delete {
        kind: Kind,
        name: String,
        expired_before: Option<i64>,
    },
}

/// Session rows read lately, for a backend whose every write goes through
/// this process (SQLite): every call and every watch re-check looks its
/// token up, and at rest that was most of what the database did. Any write
/// to sessions empties it (after committing), and a read that raced a
/// write is not kept (the generation moved), so a revocation here counts
/// at once; an entry is used for at most `TTL` in any case, which bounds a
/// revocation made by some other process that opened the same file.
#[derive(Default)]
pub struct SessionCache {
    inner: std::sync::Mutex<SessionCacheInner>,
}

#[derive(Default)]
struct SessionCacheInner {
    generation: u64,
    rows: std::collections::HashMap<String, (std::time::Instant, Option<SessionRow>)>,
}

impl SessionCache {
    const TTL: std::time::Duration = std::time::Duration::from_secs(5);
    const MAX: usize = 10_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionCacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached row (or its absence) if fresh, else the generation to
    /// hand to `put` after reading the database.
    pub fn get(&self, token_hash: &str) -> Result<Option<SessionRow>, u64> {
        let g = self.lock();
        match g.rows.get(token_hash) {
            Some((at, row)) if at.elapsed() < Self::TTL => Ok(row.clone()),
            _ => Err(g.generation),
        }
    }

    /// Keeps what a read found, unless a write came in between.
    pub fn put(&self, token_hash: &str, row: Option<SessionRow>, generation: u64) {
        let mut g = self.lock();
        if g.generation != generation {
            return;
        }
        if g.rows.len() >= Self::MAX {
            g.rows.clear();
        }
        g.rows
            .insert(token_hash.to_string(), (std::time::Instant::now(), row));
    }

    /// After any write to sessions has committed.
    pub fn invalidate(&self) {
        let mut g = self.lock();
        g.generation += 1;
        g.rows.clear();
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub token_hash: String,
    pub principal: String,
    /// user, service or admin
    pub ptype: String,
    /// JSON list of role names, used for service identities.
    pub roles: String,
    pub expires: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub id: i64,
    pub time_ms: i64,
    pub kind: String,
    pub actor: String,
    pub success: bool,
    pub fields: String,
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Applies every op in one transaction; all or nothing.
    async fn apply(&self, ops: &[WriteOp]) -> Result<Vec<Event>>;
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Record>>;
    async fn list(&self, kind: Kind) -> Result<Vec<Record>>;
    /// The current records of these kinds and the revision they are consistent at.
    async fn snapshot(&self, kinds: &[Kind]) -> Result<(Vec<Record>, i64)>;
    /// Events after `after`, oldest first; `TooOld` if compaction removed some.
    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>>;
    async fn current_revision(&self) -> Result<i64>;
    /// Records whose TTL passed before `now_ms`.
    async fn expired(&self, now_ms: i64) -> Result<Vec<(Kind, String)>>;
    /// Drops events older than the newest `keep` and those written before
    /// `written_before_ms`; returns the new horizon.
    async fn compact(&self, keep: i64, written_before_ms: i64) -> Result<i64>;

    /// Renews an agent's lease in place: no revision, no event. False when
    /// the lease was missing or had expired (the agent then re-announces
    /// what it serves; a missing lease is not created here).
    async fn renew_lease(&self, host: &str, now_ms: i64, expires: i64) -> Result<bool>;
    /// In one transaction: creates or renews the agent's lease, writes the
    /// `app_server` records in `put` (name, value) whose value changed, and
    /// withdraws those in `withdraw` that it holds. Returns whether the
    /// lease was live before, and the events written. A name held by
    /// another agent is refused (`AlreadyExists`).
    async fn announce(
        &self,
        host: &str,
        now_ms: i64,
        expires: i64,
        put: &[(String, String)],
        withdraw: &[String],
    ) -> Result<(bool, Vec<Event>)>;
    /// The `app_server` records (name, value) an agent holds.
    async fn held(&self, host: &str) -> Result<Vec<(String, String)>>;
    /// Agents whose lease ended before `now_ms`.
    async fn expired_leases(&self, now_ms: i64) -> Result<Vec<String>>;
    /// Ends an agent's lease and withdraws all its records in one
    /// transaction; with `expired_before`, only if the lease is still
    /// expired then (a renewal since wins).
    async fn end_lease(&self, host: &str, expired_before: Option<i64>) -> Result<Vec<Event>>;
    /// Moves every lease that ends before `until` to `until`; returns how many.
    async fn extend_leases(&self, until: i64) -> Result<u64>;

    async fn set_password(&self, user: &str, hash: &str) -> Result<()>;
    async fn password(&self, user: &str) -> Result<Option<String>>;
    async fn delete_principal(&self, user: &str) -> Result<()>;
    async fn put_session(&self, s: &SessionRow) -> Result<()>;
    async fn session(&self, token_hash: &str) -> Result<Option<SessionRow>>;
    /// The sessions of these token hashes that exist, in one query (a few
    /// for thousands): what one round of watch re-checks reads.
    async fn sessions(&self, token_hashes: &[String]) -> Result<Vec<SessionRow>>;
    async fn purge_sessions(&self, now_ms: i64) -> Result<u64>;
    /// Deletes the expired identities of one service principal.
    async fn purge_expired_service(&self, principal: &str, now_ms: i64) -> Result<()>;
    async fn delete_session(&self, token_hash: &str) -> Result<()>;
    /// Moves the expiry of a live session (a renewed service identity);
    /// false when it is gone or already expired.
    async fn extend_session(&self, token_hash: &str, expires: i64) -> Result<bool>;
    /// The stored cluster CA (certificate and key, PEM), if there is one.
    async fn cluster_ca(&self) -> Result<Option<(String, String)>>;
    /// Stores the cluster CA (certificate and key, PEM) unless one exists,
    /// and returns the one stored: concurrent first starts agree on one.
    async fn init_cluster_ca(&self, cert_pem: &str, key_pem: &str) -> Result<(String, String)>;
    /// Stores a named cluster key (PEM) unless one exists, and returns the
    /// one stored: concurrent first uses agree on one.
    async fn init_cluster_key(&self, name: &str, key_pem: &str) -> Result<String>;
    /// Every service identity (proxies and agents).
    async fn service_sessions(&self) -> Result<Vec<SessionRow>>;
    /// Revokes every identity of one service principal; returns how many.
    async fn revoke_service(&self, principal: &str) -> Result<u64>;

    /// Appends audit records in one transaction.
    async fn append_audit(&self, events: &[AuditRecord]) -> Result<()>;
    /// Deletes audit records written before `before_ms`, a bounded batch per
    /// transaction so writers are never held long; returns how many.
    async fn purge_audit(&self, before_ms: i64) -> Result<u64>;
    async fn list_audit(
        &self,
        kind: Option<&str>,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>>;

    /// Audit records with ids below `before_id`, newest first: one page of
    /// the history (`until_ms` 0: no upper time bound).
    async fn audit_page(
        &self,
        kind: Option<&str>,
        since_ms: i64,
        until_ms: i64,
        before_id: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>>;

    /// Wakes the change feed when another instance commits (Postgres LISTEN).
    async fn subscribe_remote_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>>;
}

/// Turns a sqlx error into a domain error; causes are logged, not shown.
pub(crate) fn db_error(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            Error::already_exists("the resource already exists")
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => {
            tracing::warn!(error = %e, "database unavailable");
            Error::unavailable("the database is unavailable; try again shortly")
        }
        _ => {
            tracing::error!(error = %e, "database error");
            Error::internal("an internal database error occurred")
        }
    }
}

pub(crate) fn kind_from_db(s: &str) -> Result<Kind> {
    Kind::parse(s).ok_or_else(|| {
        tracing::error!(kind = s, "unknown kind in storage");
        Error::internal("an internal database error occurred")
    })
}

pub(crate) fn op_code(op: Op) -> i64 {
    match op {
        Op::Put => 0,
        Op::Delete => 1,
    }
}

pub(crate) fn op_from_code(c: i64) -> Op {
    if c == 1 { Op::Delete } else { Op::Put }
}
