//! The embedded SQLite backend: one file under the data directory, WAL mode.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use portico_core::{Error, Result};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub struct SqliteBackend {
    pool: SqlitePool,
    /// One process owns the file: queue writers here rather than in
    /// SQLite's busy handler, which sleeps between retries.
    writer: tokio::sync::Mutex<()>,
}

/// The embedded schema, shared by the service and the tests.
pub fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![Migration::new(
            1,
            Cow::Borrowed("init"),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0001_init.sql").into_sql_str(),
            false,
        )]),
        ..Migrator::DEFAULT
    }
}

impl SqliteBackend {
    const SNAPSHOT_ISOLATION: &'static str = "SELECT 1";

    /// Opens (creating if needed) `portico.db` in `dir` and migrates it.
    pub async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::unavailable(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })?;
        let file = dir.join("portico.db");
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", file.display()))
            .map_err(|e| Error::bad_request(format!("bad sqlite path {}: {e}", file.display())))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| Error::unavailable(format!("cannot open {}: {e}", file.display())))?;
        migrator().run(&pool).await.map_err(|e| {
            tracing::error!(error = %e, "sqlite migration failed");
            Error::internal(format!("migrating {} failed: {e}", file.display()))
        })?;
        Ok(Self {
            pool,
            writer: tokio::sync::Mutex::new(()),
        })
    }

    async fn write_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.writer.lock().await)
    }

    async fn remote_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        // One process owns the file; every write is local and wakes the feed itself.
        None
    }
}

impl_backend!(SqliteBackend, sqlx::Sqlite, "SELECT 1");
