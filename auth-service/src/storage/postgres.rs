//! The Postgres backend, for production and for several auth-service
//! instances sharing one database. Commits are announced with NOTIFY.

use std::borrow::Cow;
use std::time::Duration;

use portico_core::{Error, Result};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

pub struct PostgresBackend {
    pool: PgPool,
}

const CHANNEL: &str = "portico_events";

/// The embedded schema, shared by the service and the tests.
pub fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![
            Migration::new(
                1,
                Cow::Borrowed("init"),
                MigrationType::Simple,
                include_str!("../../migrations/postgres/0001_init.sql").into_sql_str(),
                false,
            ),
            Migration::new(
                2,
                Cow::Borrowed("cluster_ca"),
                MigrationType::Simple,
                include_str!("../../migrations/postgres/0002_cluster_ca.sql").into_sql_str(),
                false,
            ),
            Migration::new(
                3,
                Cow::Borrowed("one_service_identity"),
                MigrationType::Simple,
                include_str!("../../migrations/postgres/0003_one_service_identity.sql")
                    .into_sql_str(),
                false,
            ),
            Migration::new(
                4,
                Cow::Borrowed("cluster_keys"),
                MigrationType::Simple,
                include_str!("../../migrations/postgres/0004_cluster_keys.sql").into_sql_str(),
                false,
            ),
            Migration::new(
                5,
                Cow::Borrowed("agent_leases"),
                MigrationType::Simple,
                include_str!("../../migrations/postgres/0005_agent_leases.sql").into_sql_str(),
                false,
            ),
        ]),
        ..Migrator::DEFAULT
    }
}

/// Hides the password of a connection string for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl PostgresBackend {
    const SNAPSHOT_ISOLATION: &'static str = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ";

    /// Connects once and migrates.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| {
                Error::unavailable(format!(
                    "cannot connect to postgres at {}: {e}",
                    redact(url)
                ))
            })?;
        migrator().run(&pool).await.map_err(|e| {
            tracing::error!(error = %e, "postgres migration failed");
            Error::internal(format!("migrating the postgres schema failed: {e}"))
        })?;
        Ok(Self { pool })
    }

    /// Connects, retrying with exponential backoff (capped at 10 s) and saying so.
    pub async fn connect_with_retry(url: &str) -> Self {
        let mut delay = Duration::from_millis(250);
        loop {
            match Self::connect(url).await {
                Ok(b) => return b,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "postgres is not reachable, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn write_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        // Writers queue on the counter row's lock in the database.
        None
    }

    /// Other auth-services write the same sessions: every lookup asks the
    /// database.
    fn session_cache(&self) -> Option<&super::SessionCache> {
        None
    }

    /// After every write to sessions, committed or not.
    fn sessions_written(&self) {}

    async fn remote_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(250);
            loop {
                let mut listener = match PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for postgres notifications, retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                        continue;
                    }
                };
                if let Err(e) = listener.listen(CHANNEL).await {
                    tracing::warn!(error = %e, "postgres LISTEN failed, retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                delay = Duration::from_millis(250);
                // A (re)connected listener may have missed notifications: wake the feed.
                let _ = tx.try_send(());
                loop {
                    match listener.recv().await {
                        Ok(_) => {
                            if tx.is_closed() {
                                return;
                            }
                            let _ = tx.try_send(());
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "postgres notification stream broke, reconnecting");
                            break;
                        }
                    }
                }
            }
        });
        Some(rx)
    }
}

impl_backend!(
    PostgresBackend,
    sqlx::Postgres,
    "SELECT pg_notify('portico_events', '')"
);

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
