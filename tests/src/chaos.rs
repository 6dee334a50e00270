//! `portico-bench chaos [MINUTES]`: a multi-process cluster (two
//! auth-services on one Postgres, two proxies, two agents, each a real
//! `portico start`) under steady MCP traffic and admin writes, while a
//! random component is killed (`SIGKILL`) and restarted every few seconds.
//! It prints what happened to every call and write, the orphans left, and
//! the longest recovery from each kind of kill. A runner, not a test: it
//! reports figures and never asserts on timings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portico_core::identity::{ADMIN_IDENTITY_FILE, IdentityFile};
use portico_proto::client::{AuthClient, Dial, connect};
use portico_proto::v1;
use rand::Rng;
use serde_json::json;

use crate::mcp_http::McpHttp;
use crate::pg::PgDb;
use crate::util::{
    TempDir, app_yaml_with_command, children_named, me, portico_start, unique_test_server,
};

/// A call with no answer in this long counts as hung.
const HUNG: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Role {
    Auth,
    Proxy,
    Agent,
}

/// One `portico start` process: its config, data directory and log
/// (`<data>.log`).
pub(crate) struct Proc {
    name: String,
    role: Role,
    config: PathBuf,
    pub(crate) data: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Proc {
    pub(crate) fn new(name: &str, role: Role, config: PathBuf, data: PathBuf) -> Proc {
        Proc {
            name: name.to_string(),
            role,
            config,
            data,
            child: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }

    pub(crate) fn spawn(&mut self) {
        let _ = std::fs::create_dir_all(&self.data);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        self.child = Some(portico_start(&self.config, &self.data, log));
    }

    pub(crate) async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

pub(crate) async fn admin(data: &Path) -> Option<AuthClient> {
    let id: IdentityFile =
        yaml_serde::from_str(&std::fs::read_to_string(data.join(ADMIN_IDENTITY_FILE)).ok()?)
            .ok()?;
    let dial = Dial::cluster(&id.auth_server, id.ca.as_deref()?, None).ok()?;
    let mut c = tokio::time::timeout(Duration::from_secs(5), connect(&dial, Some(&id.token)))
        .await
        .ok()?
        .ok()?;
    tokio::time::timeout(Duration::from_secs(5), c.who_am_i(v1::WhoAmIRequest {}))
        .await
        .ok()?
        .ok()?;
    Some(c)
}

/// A join token for `role` (`proxy` or `app`), valid for 10 minutes.
pub(crate) async fn join_token(api: &mut AuthClient, role: &str) -> String {
    api.create_token(v1::CreateTokenRequest {
        roles: vec![role.into()],
        ttl_ms: 600_000,
    })
    .await
    .expect("token")
    .into_inner()
    .token
}

/// Registers the app `name` running `server`, and a user `name` with the
/// admin role; returns the user's token.
pub(crate) async fn app_and_user(api: &mut AuthClient, name: &str, server: &Path) -> String {
    let app =
        portico_core::parse::parse_documents("a", &app_yaml_with_command(name, "dev", server))
            .expect("app");
    api.create(v1::CreateRequest {
        resources: vec![v1::Resource {
            kind: "app".into(),
            json: app[0].to_json(),
        }],
        overwrite: false,
    })
    .await
    .expect("app");
    let password = format!("{name}-password-1");
    api.add_user(v1::AddUserRequest {
        name: name.into(),
        roles: vec!["admin".into()],
        password: password.clone(),
    })
    .await
    .expect("user");
    api.login(v1::LoginRequest {
        user: name.into(),
        password,
    })
    .await
    .expect("login")
    .into_inner()
    .token
}

pub(crate) async fn until<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[derive(Default)]
struct Tally {
    attempted: AtomicU64,
    succeeded: AtomicU64,
    failed_clearly: AtomicU64,
    hung: AtomicU64,
    wrong_answers: AtomicU64,
    writes_acked: AtomicU64,
}

/// One client: sessions on the proxies in turn, echo calls whose answers
/// must be its own; a failed call ends the session and starts another.
async fn client(
    n: usize,
    proxies: Vec<SocketAddr>,
    token: String,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut seq = 0u64;
    let mut turn = n;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let addr = proxies[turn % proxies.len()];
        let mut m = McpHttp::new(addr, "chaos", &token);
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "chaos", "version": "1"}}});
        tally.attempted.fetch_add(1, Ordering::Relaxed);
        match m.try_post(&init, HUNG).await {
            Ok(r) if r.status == 200 => {
                m.session = r
                    .headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                tally.succeeded.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                tally.failed_clearly.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) if e == "HUNG" => {
                tally.hung.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(_) => {
                tally.failed_clearly.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let _ = m
            .try_post(
                &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                HUNG,
            )
            .await;
        // A few dozen calls per session, then a fresh one.
        for _ in 0..40 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            seq += 1;
            let text = format!("c{n}-{seq}");
            let call = json!({"jsonrpc": "2.0", "id": seq, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"message": text}}});
            tally.attempted.fetch_add(1, Ordering::Relaxed);
            match m.try_post(&call, HUNG).await {
                Ok(r) if r.status == 200 => {
                    let msgs = r.messages();
                    let answer = msgs.iter().find(|v| v["id"] == json!(seq));
                    match answer {
                        Some(a) if a["result"]["content"][0]["text"] == json!(text) => {
                            tally.succeeded.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(a) if a["error"]["message"].is_string() => {
                            tally.failed_clearly.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Some(_) => {
                            tally.wrong_answers.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // The stream ended without the answer: an error
                        // the client sees, not a hang.
                        None => {
                            tally.failed_clearly.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                Ok(_) => {
                    tally.failed_clearly.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if e == "HUNG" => {
                    tally.hung.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    tally.failed_clearly.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        // A well-behaved client ends its session (the proxy may already
        // have ended it; then this is refused, which is fine).
        m.send_delete_quietly().await;
    }
}

/// Creates apps one by one through whichever auth-service answers; returns
/// the names whose creation was acknowledged.
async fn writer(auths: Vec<PathBuf>, tally: Arc<Tally>, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut acked = Vec::new();
    let mut i = 0u64;
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let Some(mut api) = admin(&auths[turn % auths.len()]).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let name = format!("cw-{i}");
            let app = portico_core::parse::parse_documents(
                "w",
                &format!("kind: app\nversion: v3\nmetadata: {{name: {name}, labels: {{kind: write}}}}\nspec: {{uri: 'mcp+http://127.0.0.1:9/mcp'}}\n"),
            )
            .expect("app");
            let req = v1::CreateRequest {
                resources: vec![v1::Resource {
                    kind: "app".into(),
                    json: app[0].to_json(),
                }],
                overwrite: false,
            };
            match tokio::time::timeout(HUNG, api.create(req)).await {
                Ok(Ok(_)) => {
                    acked.push(name);
                    tally.writes_acked.fetch_add(1, Ordering::Relaxed);
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    acked
}

/// Every proxy opens a session and answers a call; else which did not, and why.
async fn serving(proxies: &[SocketAddr], token: &str) -> Result<(), String> {
    for addr in proxies {
        let mut m = McpHttp::new(*addr, "chaos", token);
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "probe", "version": "1"}}});
        let r = m
            .try_post(&init, Duration::from_secs(5))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        if r.status != 200 {
            return Err(format!(
                "{addr}: HTTP {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        m.session = r
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"message": "probe"}}});
        let answer = m.try_post(&call, Duration::from_secs(5)).await;
        m.send_delete_quietly().await;
        match answer {
            Ok(r)
                if r.messages()
                    .iter()
                    .any(|v| v["result"]["content"][0]["text"] == "probe") => {}
            Ok(r) => {
                return Err(format!(
                    "{addr}: call answered {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            Err(e) => return Err(format!("{addr}: call: {e}")),
        }
    }
    Ok(())
}

/// How many agents a proxy has tunnels from (its `/metrics`).
async fn agents_connected(addr: SocketAddr) -> Option<u64> {
    proxy_metric(addr, "portico_proxy_agents_connected").await
}

/// One of a proxy's `/metrics`, read over loopback.
pub(crate) async fn proxy_metric(addr: SocketAddr, name: &str) -> Option<u64> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(crate::web::connector(addr));
    let uri: http::Uri = format!("{}/metrics", crate::web::base(addr)).parse().ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The killed component is back in its place: an auth-service answers its
/// admin, an agent has its tunnels to both proxies again; and both
/// proxies serve a new session.
async fn recovered(p: &Proc, proxies: &[SocketAddr], token: &str) -> bool {
    match p.role {
        Role::Auth => {
            if admin(&p.data).await.is_none() {
                return false;
            }
        }
        Role::Agent => {
            for addr in proxies {
                if agents_connected(*addr).await != Some(2) {
                    return false;
                }
            }
        }
        Role::Proxy => {}
    }
    all_serving(proxies, token).await
}

async fn all_serving(proxies: &[SocketAddr], token: &str) -> bool {
    serving(proxies, token).await.is_ok()
}

pub async fn run(minutes: f64) {
    let db = PgDb::create().await;
    let dir = TempDir::new("portico-chaos");
    let mut procs: Vec<Proc> = Vec::new();
    let mut auth_addrs = Vec::new();
    for i in 1..=2 {
        let port = crate::util::fixed_port();
        auth_addrs.push(format!("127.0.0.1:{port}"));
        let config = dir.path().join(format!("auth{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "version: v1\nauth_service:\n  listen_addr: 127.0.0.1:{port}\n  storage:\n    type: postgres\n    conn_string: '{}'\n",
                db.url
            ),
        )
        .expect("config");
        procs.push(Proc {
            name: format!("auth{i}"),
            role: Role::Auth,
            config,
            data: dir.path().join(format!("auth{i}")),
            child: None,
        });
    }
    for p in procs.iter_mut() {
        p.spawn();
    }
    let auth_dirs: Vec<PathBuf> = procs.iter().map(|p| p.data.clone()).collect();
    let mut api = until(Duration::from_secs(60), || admin(&auth_dirs[0]))
        .await
        .expect("auth1 answers");
    until(Duration::from_secs(60), || admin(&auth_dirs[1]))
        .await
        .expect("auth2 answers");
    let mut token = async |role: &str| join_token(&mut api, role).await;
    let mut proxies = Vec::new();
    let mut tunnels = Vec::new();
    for i in 1..=2 {
        let (web, tunnel) = (crate::util::fixed_port(), crate::util::fixed_port());
        proxies.push(SocketAddr::from(([127, 0, 0, 1], web)));
        tunnels.push(format!("127.0.0.1:{tunnel}"));
        let config = dir.path().join(format!("proxy{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "version: v1\nproxy_service:\n  web_listen_addr: 127.0.0.1:{web}\n  tunnel_listen_addr: 127.0.0.1:{tunnel}\n  auth_servers: ['{}']\n  join_token: '{}'\n  host_id: proxy{i}\n",
                auth_addrs[i - 1],
                token("proxy").await
            ),
        )
        .expect("config");
        let mut p = Proc {
            name: format!("proxy{i}"),
            role: Role::Proxy,
            config,
            data: dir.path().join(format!("proxy{i}")),
            child: None,
        };
        p.spawn();
        procs.push(p);
    }
    for (i, addr) in proxies.iter().enumerate() {
        let cert = dir
            .path()
            .join(format!("proxy{}", i + 1))
            .join("web-cert.pem");
        until(Duration::from_secs(60), || {
            let cert = cert.clone();
            async move { cert.exists().then_some(()) }
        })
        .await
        .expect("the proxy's certificate");
        crate::web::register_file(*addr, cert);
    }
    let (server, comm) = unique_test_server(dir.path());
    for i in 1..=2 {
        let config = dir.path().join(format!("agent{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "version: v1\napp_service:\n  auth_servers: ['{}']\n  proxy_servers: ['{}', '{}']\n  join_token: '{}'\n  host_id: agent{i}\n  shutdown_grace: 1s\n  resources:\n  - labels: {{env: dev}}\n  mcp:\n    allowed_host_users: ['{}']\n",
                auth_addrs[i - 1],
                tunnels[0],
                tunnels[1],
                token("app").await,
                me()
            ),
        )
        .expect("config");
        let mut p = Proc {
            name: format!("agent{i}"),
            role: Role::Agent,
            config,
            data: dir.path().join(format!("agent{i}")),
            child: None,
        };
        p.spawn();
        procs.push(p);
    }
    let user_token = app_and_user(&mut api, "chaos", &server).await;
    if until(Duration::from_secs(60), || {
        let proxies = proxies.clone();
        let t = user_token.clone();
        async move { all_serving(&proxies, &t).await.then_some(()) }
    })
    .await
    .is_none()
    {
        panic!("the cluster did not come up within 60 s");
    }

    println!(
        "chaos: {minutes} min; 2 auth-services on Postgres, 2 proxies, 2 agents (each its own process); 8 clients; a kill -9 and restart every ~5 s"
    );
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for n in 0..8 {
        clients.push(tokio::spawn(client(
            n,
            proxies.clone(),
            user_token.clone(),
            tally.clone(),
            stop.clone(),
        )));
    }
    let writes = tokio::spawn(writer(auth_dirs.clone(), tally.clone(), stop.clone()));

    let end = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut recoveries: BTreeMap<Role, Vec<f64>> = BTreeMap::new();
    let mut unrecovered = 0;
    while Instant::now() < end {
        let wait = rand::rng().random_range(3_000..7_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let victim = rand::rng().random_range(0..procs.len());
        let role = procs[victim].role;
        let killed = Instant::now();
        procs[victim].kill().await;
        procs[victim].spawn();
        let back = until(Duration::from_secs(120), || {
            let proxies = proxies.clone();
            let t = user_token.clone();
            let p = &procs[victim];
            async move { recovered(p, &proxies, &t).await.then_some(()) }
        })
        .await;
        match back {
            Some(()) => recoveries
                .entry(role)
                .or_default()
                .push(killed.elapsed().as_secs_f64()),
            None => {
                unrecovered += 1;
                let why = serving(&proxies, &user_token)
                    .await
                    .err()
                    .unwrap_or_default();
                println!(
                    "  {} did not recover within 120 s ({why}); its log ends:",
                    procs[victim].name
                );
                let log = std::fs::read_to_string(procs[victim].data.with_extension("log"))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                for l in &lines[lines.len().saturating_sub(12)..] {
                    println!("    {l}");
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let acked = writes.await.unwrap_or_default();
    // What is stored, through whichever auth-service answers.
    let stored = {
        let mut api = until(Duration::from_secs(60), || admin(&auth_dirs[0]))
            .await
            .expect("an auth-service answers");
        crate::util::app_names(&mut api).await
    };
    let lost = acked.iter().filter(|n| !stored.contains(*n)).count();
    for p in procs.iter_mut() {
        p.kill().await;
    }
    // Killed agents take their MCP processes with them.
    let orphans = until(Duration::from_secs(10), || {
        let comm = comm.clone();
        async move {
            let live = children_named(&comm)
                .into_iter()
                .filter(|(_, s)| *s != 'Z')
                .count();
            (live == 0).then_some(0)
        }
    })
    .await
    .unwrap_or_else(|| {
        children_named(&comm)
            .into_iter()
            .filter(|(_, s)| *s != 'Z')
            .count()
    });
    let t = &tally;
    println!(
        "calls attempted {}, succeeded {}, failed with a clear error {}, hung {} (no answer in {} s)",
        t.attempted.load(Ordering::Relaxed),
        t.succeeded.load(Ordering::Relaxed),
        t.failed_clearly.load(Ordering::Relaxed),
        t.hung.load(Ordering::Relaxed),
        HUNG.as_secs()
    );
    println!(
        "admin writes acknowledged {}, lost {lost}",
        t.writes_acked.load(Ordering::Relaxed)
    );
    println!("orphan MCP processes after the run: {orphans}");
    println!(
        "answers that were not the caller's own (a session served to the wrong client): {}",
        t.wrong_answers.load(Ordering::Relaxed)
    );
    for (role, times) in &recoveries {
        let longest = times.iter().cloned().fold(0.0, f64::max);
        println!(
            "kills of {:?}: {}, longest recovery {longest:.2} s (kill until it serves again and both proxies open new sessions)",
            role,
            times.len()
        );
    }
    if unrecovered > 0 {
        println!("kills not recovered from within 120 s: {unrecovered}");
    }
}
