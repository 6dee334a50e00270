//! The embedded SQLite backend: one file under the data directory, WAL mode.
//! The directory is created owner-only (0700) and the database with its
//! `-wal` and `-shm` files are owner-only (0600): they hold password hashes
//! and session token hashes.

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
    /// Session lookups, kept while nothing writes sessions (see
    /// `SessionCache`).
    sessions: super::SessionCache,
}

/// The embedded schema, shared by the service and the tests.
pub fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![
            Migration::new(
                1,
                Cow::Borrowed("init"),
                MigrationType::Simple,
                include_str!("../../migrations/sqlite/0001_init.sql").into_sql_str(),
                false,
            ),
            Migration::new(
                2,
                Cow::Borrowed("cluster_ca"),
                MigrationType::Simple,
                include_str!("../../migrations/sqlite/0002_cluster_ca.sql").into_sql_str(),
                false,
            ),
            Migration::new(
                3,
                Cow::Borrowed("one_service_identity"),
                MigrationType::Simple,
                include_str!("../../migrations/sqlite/0003_one_service_identity.sql")
                    .into_sql_str(),
                false,
            ),
            Migration::new(
                4,
                Cow::Borrowed("cluster_keys"),
                MigrationType::Simple,
                include_str!("../../migrations/sqlite/0004_cluster_keys.sql").into_sql_str(),
                false,
            ),
            Migration::new(
                5,
                Cow::Borrowed("agent_leases"),
                MigrationType::Simple,
                include_str!("../../migrations/sqlite/0005_agent_leases.sql").into_sql_str(),
                false,
            ),
        ]),
        ..Migrator::DEFAULT
    }
}

impl SqliteBackend {
    const SNAPSHOT_ISOLATION: &'static str = "SELECT 1";

    /// Opens (creating if needed) `portico.db` in `dir` and migrates it.
    pub async fn open(dir: &Path) -> Result<Self> {
        create_private_dir(dir).map_err(|e| {
            Error::unavailable(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })?;
        let file = dir.join("portico.db");
        // Created here, empty and 0600, before SQLite opens it (SQLite takes
        // an empty file for a new database and gives its -wal and -shm files
        // the database's mode).
        create_private_file(&file)
            .map_err(|e| Error::unavailable(format!("cannot create {}: {e}", file.display())))?;
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
        // Databases made by earlier versions, with the umask's mode.
        restrict_files(&file).map_err(|e| {
            Error::unavailable(format!(
                "cannot make {} readable by its owner only: {e}",
                file.display()
            ))
        })?;
        Ok(Self {
            pool,
            writer: tokio::sync::Mutex::new(()),
            sessions: super::SessionCache::default(),
        })
    }

    async fn write_guard(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.writer.lock().await)
    }

    fn session_cache(&self) -> Option<&super::SessionCache> {
        Some(&self.sessions)
    }

    /// After every write to sessions, committed or not.
    fn sessions_written(&self) {
        self.sessions.invalidate();
    }

    async fn remote_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        // One process owns the file; every write is local and wakes the feed itself.
        None
    }
}

/// Creates `dir` and any missing parents with mode 0700; an existing
/// directory keeps its mode, with a warning when others may read it.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data directory is open to other users; chmod 700 it"
        );
    }
    Ok(())
}

/// Creates `file` empty with mode 0600 unless it exists; never follows a
/// symlink planted there.
fn create_private_file(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets 0600 on the database and its `-wal` and `-shm` files where present.
fn restrict_files(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = vec![file.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = file.as_os_str().to_os_string();
        name.push(suffix);
        paths.push(name.into());
    }
    for p in paths {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.file_type().is_file() && meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

impl_backend!(SqliteBackend, sqlx::Sqlite, "SELECT 1");

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn directory_and_files_are_owner_only() {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let base = std::env::temp_dir().join(format!("portico-sqlite-{}-{n}", std::process::id()));
        let dir = base.join("nested").join("data");
        let db = SqliteBackend::open(&dir).await.expect("opens");
        drop(db);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&base.join("nested")), 0o700);
        assert_eq!(mode(&dir.join("portico.db")), 0o600);
        for f in ["portico.db-wal", "portico.db-shm"] {
            let p = dir.join(f);
            if p.exists() {
                assert_eq!(mode(&p), 0o600, "{f}");
            }
        }
        // A database left with a wide mode is narrowed at the next open.
        std::fs::set_permissions(
            dir.join("portico.db"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let db = SqliteBackend::open(&dir).await.expect("opens again");
        drop(db);
        assert_eq!(mode(&dir.join("portico.db")), 0o600);
        let _ = std::fs::remove_dir_all(&base);
    }
}
