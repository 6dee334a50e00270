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
use portico_tests::util::portico_start;
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
        let child = portico_start(config, data, Stdio::null());
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
    portico_tests::util::app_resource(name, "dev")
}

/// Writes pairs of apps (`w{i}-a`, `w{i}-b`, one call each) until a call
/// fails; returns the pairs whose calls succeeded.
async fn write_until_failure(mut api: AuthClient, progress: Arc<AtomicUsize>) -> Vec<u32> {
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
            ..Default::default()
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
    let stored = portico_tests::util::app_names(&mut api).await;
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
    assert_eq!(watched.len(), changes.len(), "no change delivered twice");
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

/// What one call under load saw.
struct Outcome {
    took: Duration,
    at: tokio::time::Instant,
    result: Result<(), (tonic::Code, String)>,
    wrote: Option<String>,
}

/// Creates an app then lists apps, over and over, until `stop`.
async fn load(
    mut api: AuthClient,
    n: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let name = format!("l{n}-{i}");
        let t = tokio::time::Instant::now();
        let r = api
            .create(v1::CreateRequest {
                resources: vec![app_json(&name)],
                overwrite: false,
            })
            .await;
        out.push(Outcome {
            took: t.elapsed(),
            at: t,
            wrote: r.is_ok().then(|| name.clone()),
            result: r
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_string())),
        });
        let t = tokio::time::Instant::now();
        let r = api
            .list(v1::ListRequest {
                kind: "app".into(),
                labels: Default::default(),
            })
            .await;
        out.push(Outcome {
            took: t.elapsed(),
            at: t,
            wrote: None,
            result: r
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_string())),
        });
        if out.last().is_some_and(|o| o.result.is_err()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

/// Postgres itself crashes and comes back (`pg_ctl stop -m immediate`, then
/// start) while an auth-service process serves writes and reads: every call
/// during the outage fails within the pool's 5 s bound with `Unavailable`
/// and a message that says the database is away; once Postgres is back,
/// calls succeed again without restarting Portico, every acknowledged
/// write is there, and the watch carries on.
#[tokio::test]
async fn a_postgres_restart_under_load_fails_calls_clearly_and_recovers() {
    let pg = portico_tests::pg::PrivatePg::start().await;
    let dir = TempDir::new("portico-pg-restart");
    let config = dir.path().join("portico.yaml");
    std::fs::write(
        &config,
        format!(
            "version: v1\nauth_service:\n  listen_addr: 127.0.0.1:0\n  storage:\n    type: postgres\n    conn_string: '{}'\n",
            pg.url()
        ),
    )
    .expect("config");
    let data = dir.path().join("data");
    let mut auth = AuthProcess::start(&config, &data).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loads = Vec::new();
    for n in 0..6 {
        loads.push(tokio::spawn(load(auth.client().await, n, stop.clone())));
    }
    let mut watch = auth
        .client()
        .await
        .watch(v1::WatchRequest {
            kinds: vec!["app".into()],
            from_revision: 0,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // Some load first; then the crash, an outage, and the restart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let down = tokio::time::Instant::now();
    pg.down().await;
    // Longer than the pool's 5 s bound: a call made as it went down must
    // fail (with 4 s a fast restart let every waiting call through).
    tokio::time::sleep(Duration::from_secs(7)).await;
    pg.up().await;
    let up = tokio::time::Instant::now();
    let mut api = auth.client().await;
    let recovered = eventually(Duration::from_secs(30), "a write succeeds again", || {
        let mut api = api.clone();
        async move {
            api.create(v1::CreateRequest {
                resources: vec![app_json("after-restart")],
                overwrite: true,
            })
            .await
            .ok()
            .map(|_| up.elapsed())
        }
    })
    .await;
    // Load on the recovered database for a moment, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for l in loads {
        outcomes.extend(l.await.expect("load"));
    }
    assert!(
        auth.child.try_wait().expect("status").is_none(),
        "the auth-service kept running"
    );
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let after = outcomes
        .iter()
        .filter(|o| o.at > up + recovered && o.result.is_ok())
        .count();
    println!(
        "{} calls, {} failed during the outage, slowest {slowest:?}; writes succeed again {recovered:?} after Postgres is back; {after} calls succeeded after that",
        outcomes.len(),
        failed.len()
    );
    assert!(
        slowest <= Duration::from_secs(8),
        "a call hung for {slowest:?} (the pool gives up after 5 s)"
    );
    assert!(!failed.is_empty(), "the outage was seen");
    for o in &failed {
        let (code, msg) = o.result.as_ref().expect_err("failed");
        assert!(
            o.at + o.took >= down,
            "a call failed before the outage: {code:?} {msg}"
        );
        assert_eq!(*code, tonic::Code::Unavailable, "{msg}");
        assert!(
            msg.contains("database") || msg.contains("postgres"),
            "the message says what is away: {msg}"
        );
    }
    assert!(after > 0, "calls succeed after the restart");
    // Every acknowledged write is there.
    let stored = portico_tests::util::app_names(&mut api).await;
    let lost: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| o.wrote.as_ref())
        .filter(|n| !stored.contains(*n))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // The watch carried on past the outage (it delivers the write made after
    // it), or ended with a clear error for its client to resume from.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, watch.message()).await {
            Ok(Ok(Some(ev))) if ev.name == "after-restart" => break,
            Ok(Ok(Some(_))) => {}
            Ok(Err(s)) => {
                assert!(
                    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::OutOfRange),
                    "{s:?}"
                );
                break;
            }
            other => panic!("the watch neither carried on nor ended clearly: {other:?}"),
        }
    }
    auth.kill().await;
}

/// A proxy alone, as its own `portico start` process on fixed ports, so
/// that it comes back where its clients and agents look for it.
struct ProxyProcess {
    child: tokio::process::Child,
    config: PathBuf,
    data: PathBuf,
    web: std::net::SocketAddr,
}

impl ProxyProcess {
    async fn start(config: &Path, data: &Path, web: std::net::SocketAddr) -> ProxyProcess {
        let child = portico_start(config, data, Stdio::null());
        let addr = web.to_string();
        eventually(Duration::from_secs(60), "the proxy is ready", || {
            let addr = addr.clone();
            async move { (portico_tests::web::probe(&addr, "/readyz").await == Some(200)).then_some(()) }
        })
        .await;
        ProxyProcess {
            child,
            config: config.to_path_buf(),
            data: data.to_path_buf(),
            web,
        }
    }

    async fn kill(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }

    async fn restart(&mut self) {
        *self = ProxyProcess::start(&self.config, &self.data, self.web).await;
    }
}

/// Two loopback ports for the proxy process to bind, now and after its
/// restarts (outside the ephemeral range; a clash with something else on
/// the machine makes its start fail, and the caller tries again).
fn two_ports() -> (u16, u16) {
    (
        portico_tests::util::fixed_port(),
        portico_tests::util::fixed_port(),
    )
}

async fn line_answer(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    id: i64,
) -> serde_json::Value {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("an answer within 60 s")
            .expect("read")
            .expect("psh mcp connect is still running");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        if v["id"] == id {
            return v;
        }
    }
}

#[tokio::test]
async fn proxy_killed_under_psh_mcp_connect_which_carries_on() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut c = portico_tests::ClusterBuilder::new().start().await;
    let dir = TempDir::new("portico-proxy-kill");
    let data = dir.path().join("proxy-data");
    let config = dir.path().join("proxy.yaml");
    let token = c.join_token("proxy").await;
    // The ports are the proxy's across restarts; a clash at the first start
    // (another test took one) is retried with others.
    let mut proxy = None;
    let mut tunnel_port = 0;
    for _ in 0..5 {
        let (web, tunnel) = two_ports();
        std::fs::write(
            &config,
            format!(
                "version: v1\nproxy_service:\n  web_listen_addr: 127.0.0.1:{web}\n  tunnel_listen_addr: 127.0.0.1:{tunnel}\n  auth_servers: ['{}']\n  join_token: '{token}'\n  host_id: proxy-k\n",
                c.auth_addr
            ),
        )
        .expect("config");
        let attempt = tokio::time::timeout(
            Duration::from_secs(60),
            ProxyProcess::start(&config, &data, ([127, 0, 0, 1], web).into()),
        )
        .await;
        if let Ok(p) = attempt {
            proxy = Some(p);
            tunnel_port = tunnel;
            break;
        }
    }
    let mut proxy = proxy.expect("the proxy process starts");
    let (server, comm) = portico_tests::util::unique_test_server(dir.path());
    c.start_agent(
        "a1",
        portico_agent::AgentConfig {
            enabled: true,
            proxy_servers: vec![format!("127.0.0.1:{tunnel_port}")],
            resources: vec![portico_agent::ResourceSelector {
                labels: std::collections::BTreeMap::from([("*".into(), "*".into())]),
            }],
            mcp: Some(portico_agent::AgentMcpConfig {
                allowed_host_users: Some(vec![portico_tests::util::me()]),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    c.create_yaml(
        &portico_tests::util::app_yaml_with_command("tm", "dev", &server),
        false,
    )
    .await
    .expect("app");
    c.add_user("kim", &["mcp-user"], "kim-password-1").await;
    let home = dir.path().join("home");
    let mut login = tokio::process::Command::new(bin("psh"));
    login
        .args([
            "login",
            &format!("--proxy={}", proxy.web),
            "--user=kim",
            "--password-stdin",
        ])
        .arg("--ca-file")
        .arg(data.join("web-cert.pem"))
        .env("PORTICO_HOME", &home);
    let o = portico_tests::cluster::run(login, Some("kim-password-1\n")).await;
    assert!(o.status.success(), "{:?}", portico_tests::cluster::text(&o));
    // Served once the proxy has the agent's tunnel and record.
    eventually(Duration::from_secs(20), "psh mcp ls lists the app", || {
        let home = home.clone();
        async move {
            let mut ls = tokio::process::Command::new(bin("psh"));
            ls.args(["mcp", "ls"]).env("PORTICO_HOME", &home);
            let o = portico_tests::cluster::run(ls, None).await;
            portico_tests::cluster::text(&o)
                .0
                .contains("tm")
                .then_some(())
        }
    })
    .await;
    let mut bridge = tokio::process::Command::new(bin("psh"))
        .args(["mcp", "connect", "tm"])
        .env("PORTICO_HOME", &home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psh mcp connect");
    let mut input = bridge.stdin.take().expect("stdin");
    let mut lines = tokio::io::BufReader::new(bridge.stdout.take().expect("stdout")).lines();
    let mut send = async |v: serde_json::Value| {
        input
            .write_all(format!("{v}\n").as_bytes())
            .await
            .expect("write");
    };
    send(serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
    .await;
    let init = line_answer(&mut lines, 1).await;
    assert!(init["result"]["serverInfo"].is_object(), "{init}");
    send(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
    send(
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "before"}}}),
    )
    .await;
    let r = line_answer(&mut lines, 2).await;
    assert_eq!(r["result"]["content"][0]["text"], "before", "{r}");
    assert_eq!(portico_tests::util::children_named(&comm).len(), 1);

    // kill -9: no goodbye to anyone.
    proxy.kill().await;
    proxy.restart().await;
    // The same bridge carries on: it opens a new session, replaying the
    // client's initialize, and the call is answered.
    send(
        serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "after"}}}),
    )
    .await;
    let r = line_answer(&mut lines, 3).await;
    assert_eq!(r["result"]["content"][0]["text"], "after", "{r}");
    // The orphaned session's process is gone; the new one lives.
    eventually(Duration::from_secs(30), "the orphaned process ends", || {
        let comm = comm.clone();
        async move {
            let live: Vec<_> = portico_tests::util::children_named(&comm)
                .into_iter()
                .filter(|(_, state)| *state != 'Z')
                .collect();
            (live.len() == 1).then_some(())
        }
    })
    .await;
    let _ = bridge.start_kill();
    proxy.kill().await;
    c.shutdown().await;
}
