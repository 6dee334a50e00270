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
