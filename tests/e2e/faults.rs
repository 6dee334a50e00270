//! Abrupt faults of the auth-service: `kill -9` of a real `portico start`
//! process in the middle of a stream of writes, on SQLite and on Postgres.
//! Every write whose call returned success is there after the restart,
//! none is half applied (each call writes two apps, in one transaction),
//! and a watcher that resumes from the last revision it saw gets every
//! change exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use portico_core::identity::{ADMIN_IDENTITY_FILE, IdentityFile};
use portico_proto::client::{AuthClient, Dial, connect};
use portico_proto::v1;
use portico_tests::pg::PgDb;
use portico_tests::util::test_app_yaml;
use portico_tests::{TempDir, bin, eventually};

/// An auth-service alone, as its own `portico start` process.
struct AuthProcess {
    child: tokio::process::Child,
    config: PathBuf,
    data: PathBuf,
}

impl AuthProcess {
    async fn start(config: &Path, data: &Path) -> AuthProcess {
        // It writes the admin identity (with its address) before it
        // listens; a fresh file says this start is the one answering.
        let _ = std::fs::remove_file(data.join(ADMIN_IDENTITY_FILE));
        let child = tokio::process::Command::new(bin("portico"))
            .arg("start")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env_remove("PORTICO_DATA_DIR")
            .env_remove("PORTICO_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("portico start");
        let p = AuthProcess {
            child,
            config: config.to_path_buf(),
            data: data.to_path_buf(),
        };
        let _ = p.client().await;
        p
    }

    /// A client as the local admin, once the service answers.
    async fn client(&self) -> AuthClient {
        let file = self.data.join(ADMIN_IDENTITY_FILE);
        eventually(Duration::from_secs(60), "the auth-service answers", || {
            let file = file.clone();
            async move {
                let id: IdentityFile =
                    yaml_serde::from_str(&std::fs::read_to_string(&file).ok()?).ok()?;
                let dial = Dial::cluster(&id.auth_server, id.ca.as_deref()?, None).ok()?;
                let mut c = connect(&dial, Some(&id.token)).await.ok()?;
                c.who_am_i(v1::WhoAmIRequest {}).await.ok()?;
                Some(c)
            }
        })
        .await
    }

    /// SIGKILL, and wait until it is gone.
    async fn kill(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }

    async fn restart(&mut self) {
        *self = AuthProcess::start(&self.config, &self.data).await;
    }
}

fn app_json(name: &str) -> v1::Resource {
    let r = portico_core::parse::parse_documents("t.yaml", &test_app_yaml(name, "dev"))
        .expect("app")
        .remove(0);
    v1::Resource {
        kind: "app".into(),
        json: r.to_json(),
    }
}

/// Writes pairs of apps (`w{i}-a`, `w{i}-b`, one call each) until a call
/// fails; returns the pairs whose calls succeeded.
async fn write_until_failure(
    mut api: AuthClient,
    progress: Arc<AtomicUsize>,
) -> Vec<u32> {
    let mut acked = Vec::new();
    for i in 0.. {
        let req = v1::CreateRequest {
            resources: vec![app_json(&format!("w{i}-a")), app_json(&format!("w{i}-b"))],
            overwrite: false,
        };
        match tokio::time::timeout(Duration::from_secs(10), api.create(req)).await {
            Ok(Ok(_)) => {
                acked.push(i);
                progress.store(acked.len(), Ordering::Relaxed);
            }
            Ok(Err(_)) => break,
            Err(_) => panic!("a write hung for 10 s while the auth-service was down"),
        }
    }
    acked
}

/// Watch events of apps from `from` (0: snapshot first) until the stream
/// breaks or `until` is seen; (revision, type, name) each.
async fn watch_apps(
    mut api: AuthClient,
    from: i64,
    until: Option<&str>,
) -> Vec<(i64, i32, String)> {
    let mut stream = api
        .watch(v1::WatchRequest {
            kinds: vec!["app".into()],
            from_revision: from,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Ok(Ok(Some(ev))) => {
                let done = until == Some(ev.name.as_str());
                seen.push((ev.revision, ev.r#type, ev.name));
                if done {
                    return seen;
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => return seen,
            Err(_) => panic!("the watch stalled for 30 s"),
        }
    }
}

async fn killed_during_writes(storage_yaml: &str) {
    let dir = TempDir::new("portico-auth-kill");
    let config = dir.path().join("portico.yaml");
    std::fs::write(
        &config,
        format!("version: v1\nauth_service:\n  listen_addr: 127.0.0.1:0\n{storage_yaml}"),
    )
    .expect("config");
    let data = dir.path().join("data");
    let mut auth = AuthProcess::start(&config, &data).await;

    let watcher = tokio::spawn(watch_apps(auth.client().await, 0, None));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_until_failure(auth.client().await, progress.clone()));
    // Let writes flow, then kill the service in the middle of them.
    eventually(Duration::from_secs(30), "writes flowing", || {
        let n = progress.load(Ordering::Relaxed);
        async move { (n >= 20).then_some(()) }
    })
    .await;
    auth.kill().await;
    let acked = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer notices the outage")
        .expect("writer");
    let before = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the watch ends with the service")
        .expect("watcher");
    assert!(acked.len() >= 5, "writes were flowing: {}", acked.len());

    auth.restart().await;
    let mut api = auth.client().await;
    // A write after the restart marks where the resumed watch must reach.
    api.create(v1::CreateRequest {
        resources: vec![app_json("after-restart")],
        overwrite: false,
    })
    .await
    .expect("writes work again");
    let stored: BTreeSet<String> = api
        .list(v1::ListRequest {
            kind: "app".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .items
        .iter()
        .map(|r| {
            let res = portico_core::Resource::from_json(portico_core::Kind::App, &r.json)
                .expect("every stored app is whole");
            res.name().to_string()
        })
        .collect();
    for i in &acked {
        for half in ["a", "b"] {
            assert!(
                stored.contains(&format!("w{i}-{half}")),
                "acknowledged write w{i}-{half} was lost ({} acknowledged)",
                acked.len()
            );
        }
    }
    // One transaction per call: both apps of a pair, or neither.
    for name in &stored {
        if let Some(pair) = name.strip_suffix("-a") {
            assert!(stored.contains(&format!("{pair}-b")), "{pair} half applied");
        }
        if let Some(pair) = name.strip_suffix("-b") {
            assert!(stored.contains(&format!("{pair}-a")), "{pair} half applied");
        }
    }

    // The watcher resumes after the last revision it saw: together, every
    // change once, in order, and exactly what is stored.
    let last = before.iter().map(|e| e.0).max().unwrap_or(0);
    let after = tokio::time::timeout(
        Duration::from_secs(60),
        watch_apps(api.clone(), last, Some("after-restart")),
    )
    .await
    .expect("the resumed watch catches up");
    let changes: Vec<&(i64, i32, String)> = before
        .iter()
        .chain(after.iter())
        .filter(|e| e.1 == v1::watch_event::Type::Put as i32)
        .collect();
    let revisions: Vec<i64> = changes.iter().map(|e| e.0).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "every change once and in order"
    );
    let watched: BTreeSet<String> = changes.iter().map(|e| e.2.clone()).collect();
    assert_eq!(
        watched.len(),
        changes.len(),
        "no change delivered twice"
    );
    assert_eq!(watched, stored, "the watch saw exactly what is stored");
    eprintln!(
        "{} pairs acknowledged before the kill, {} apps stored after the restart",
        acked.len(),
        stored.len()
    );
    auth.kill().await;
}

#[tokio::test]
async fn auth_killed_during_writes_on_sqlite_loses_nothing_acknowledged() {
    killed_during_writes("").await;
}

#[tokio::test]
async fn auth_killed_during_writes_on_postgres_loses_nothing_acknowledged() {
    let db = PgDb::create().await;
    killed_during_writes(&format!(
        "  storage:\n    type: postgres\n    conn_string: '{}'\n",
        db.url
    ))
    .await;
}
