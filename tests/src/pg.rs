//! A fresh Postgres database per test, dropped afterwards.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The server to create test databases on: `DATABASE_URL`, else the local one.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct PgDb {
    pub url: String,
    name: String,
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{db}")
}

impl PgDb {
    pub async fn create() -> PgDb {
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("postgres is not reachable at {admin}: {e}; start it or set DATABASE_URL")
        });
        let n: u64 = rand::Rng::random(&mut rand::rng());
        let name = format!("portico_test_{n:016x}");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        PgDb {
            url: with_db(&admin, &name),
            name,
        }
    }

    /// The same database reached through another host:port (a relay, say).
    pub fn url_via(&self, addr: &str) -> String {
        let admin = admin_url();
        let after = admin.split_once("://").map(|x| x.1).unwrap_or(&admin);
        let (creds, rest) = match after.split_once('@') {
            Some((c, r)) => (format!("{c}@"), r),
            None => (String::new(), after),
        };
        let _ = rest;
        format!("postgres://{creds}{addr}/{}", self.name)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = admin_url();
        let name = self.name.clone();
        // Dropping needs a runtime of its own: the test's may be gone.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut c) = PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut c)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A PostgreSQL server of the test's own, which it may stop and start: the
/// installed server binaries (`/usr/lib/postgresql/N/bin`) on a fresh data
/// directory, run as the `postgres` system account (the server refuses
/// root), listening on loopback only.
pub struct PrivatePg {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    pub port: u16,
}

impl PrivatePg {
    async fn run_as_postgres(args: &[&std::ffi::OsStr]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).args(args);
        cmd.stdin(std::process::Stdio::null());
        cmd.output().await.expect("runuser runs")
    }

    /// initdb and start, on a free port.
    pub async fn start() -> PrivatePg {
        let versions = std::fs::read_dir("/usr/lib/postgresql").expect(
            "PostgreSQL server binaries in /usr/lib/postgresql (scripts/test.sh installs them)",
        );
        let mut found: Vec<std::path::PathBuf> = versions
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("pg_ctl").exists())
            .collect();
        found.sort();
        let bin = found.pop().expect("pg_ctl in /usr/lib/postgresql/*/bin");
        let n: u64 = rand::Rng::random(&mut rand::rng());
        let dir = std::env::temp_dir().join(format!("portico-pg-{n:016x}"));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let o = std::process::Command::new("chown")
            .arg("postgres:")
            .arg(&dir)
            .output()
            .expect("chown");
        assert!(o.status.success(), "chown: {o:?}");
        let data = dir.join("data");
        let o = Self::run_as_postgres(&[
            bin.join("initdb").as_os_str(),
            "-D".as_ref(),
            data.as_os_str(),
            "-A".as_ref(),
            "trust".as_ref(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "--no-sync".as_ref(),
        ])
        .await;
        assert!(
            o.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let port = crate::util::fixed_port();
        let pg = PrivatePg { bin, dir, port };
        pg.up().await;
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl -D <data> ARGS` as the postgres account; it must succeed.
    async fn pg_ctl(&self, args: &[&std::ffi::OsStr]) {
        let (ctl, data) = (self.bin.join("pg_ctl"), self.dir.join("data"));
        let mut all: Vec<&std::ffi::OsStr> = vec![ctl.as_os_str(), "-D".as_ref(), data.as_os_str()];
        all.extend_from_slice(args);
        let o = Self::run_as_postgres(&all).await;
        assert!(
            o.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn up(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.pg_ctl(&[
            "-o".as_ref(),
            opts.as_ref(),
            "-l".as_ref(),
            log.as_os_str(),
            "-w".as_ref(),
            "start".as_ref(),
        ])
        .await;
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub async fn down(&self) {
        self.pg_ctl(&[
            "-m".as_ref(),
            "immediate".as_ref(),
            "-w".as_ref(),
            "stop".as_ref(),
        ])
        .await;
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdin(std::process::Stdio::null())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
