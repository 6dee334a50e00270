//! `portico-bench soak [MINUTES] [SESSIONS] [PERIOD_SECONDS] [--h1]`: an
//! auth-service, a proxy and an agent, each its own `portico start`
//! process, hold SESSIONS (1,000) concurrent MCP sessions with light
//! traffic (each session calls a tool every PERIOD_SECONDS, 10) for
//! MINUTES (30), each session on its own connection, HTTP/2 unless
//! `--h1`. Every minute it prints the resident
//! memory of each process; at the end, the growth of each after the first
//! five minutes (goal: within 5%).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::chaos::{Proc, Role, admin, app_and_user, join_token, until};
use crate::mcp_http::McpHttp;
use crate::util::{TempDir, me, unique_test_server};

fn rss_of(pid: u32) -> u64 {
    crate::util::rss_kib(&pid.to_string())
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
}

/// One session: initialize, then a tool call every `period` until `stop`.
async fn session(
    addr: SocketAddr,
    token: String,
    n: usize,
    period: Duration,
    h1: bool,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut m = McpHttp::new(addr, "soak", &token);
    if h1 {
        m = m.http1(addr);
    }
    if m.initialize().await.is_err() {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Spread the calls over the period.
    let period_ms = period.as_millis().max(1) as u64;
    tokio::time::sleep(Duration::from_millis((n as u64 * 10) % period_ms)).await;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let text = format!("s{n}-{seq}");
        let r = m
            .try_post(
                &json!({"jsonrpc": "2.0", "id": seq, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"message": text}}}),
                Duration::from_secs(30),
            )
            .await;
        tally.calls.fetch_add(1, Ordering::Relaxed);
        let ok = r.is_ok_and(|r| {
            r.messages()
                .iter()
                .any(|v| v["id"] == json!(seq) && v["result"]["content"][0]["text"] == json!(text))
        });
        if !ok {
            tally.failed.fetch_add(1, Ordering::Relaxed);
        }
        let next = Instant::now() + period;
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            tokio::time::sleep(Duration::from_millis(100).min(period)).await;
        }
    }
    m.delete().await;
}

fn write(path: &Path, text: String) {
    std::fs::write(path, text).expect("config");
}

pub async fn run(minutes: u64, sessions: usize, period: Duration, h1: bool) {
    let dir = TempDir::new("portico-soak");
    let d = dir.path();
    let auth_port = crate::util::fixed_port();
    let auth_addr = format!("127.0.0.1:{auth_port}");
    write(
        &d.join("auth.yaml"),
        format!("version: v1\nauth_service:\n  listen_addr: {auth_addr}\n"),
    );
    let mut auth = Proc::new("auth", Role::Auth, d.join("auth.yaml"), d.join("auth"));
    auth.spawn();
    let mut api = until(Duration::from_secs(60), || admin(&auth.data))
        .await
        .expect("the auth-service answers");
    let mut token = async |role: &str| join_token(&mut api, role).await;
    let (web, tunnel) = (crate::util::fixed_port(), crate::util::fixed_port());
    let proxy_addr = SocketAddr::from(([127, 0, 0, 1], web));
    write(
        &d.join("proxy.yaml"),
        format!(
            "version: v1\nproxy_service:\n  web_listen_addr: 127.0.0.1:{web}\n  tunnel_listen_addr: 127.0.0.1:{tunnel}\n  auth_servers: ['{auth_addr}']\n  join_token: '{}'\n  host_id: proxy\n  max_sessions_per_user: 1000\n  max_connections_per_address: 0\n",
            token("proxy").await
        ),
    );
    let mut proxy = Proc::new("proxy", Role::Proxy, d.join("proxy.yaml"), d.join("proxy"));
    proxy.spawn();
    let cert = d.join("proxy").join("web-cert.pem");
    until(Duration::from_secs(60), || {
        let cert = cert.clone();
        async move { cert.exists().then_some(()) }
    })
    .await
    .expect("the proxy's certificate");
    crate::web::register_file(proxy_addr, cert);
    write(
        &d.join("agent.yaml"),
        format!(
            "version: v1\napp_service:\n  auth_servers: ['{auth_addr}']\n  proxy_servers: ['127.0.0.1:{tunnel}']\n  join_token: '{}'\n  host_id: agent\n  max_sessions: {}\n  resources:\n  - labels: {{env: dev}}\n  mcp:\n    allowed_host_users: ['{}']\n",
            token("app").await,
            sessions + 16,
            me()
        ),
    );
    let mut agent = Proc::new("agent", Role::Agent, d.join("agent.yaml"), d.join("agent"));
    agent.spawn();
    let (server, _) = unique_test_server(d);
    let user_token = app_and_user(&mut api, "soak", &server).await;
    until(Duration::from_secs(60), || {
        let t = user_token.clone();
        async move {
            let mut m = McpHttp::new(proxy_addr, "soak", &t);
            let ok = m.initialize().await.is_ok();
            m.delete().await;
            ok.then_some(())
        }
    })
    .await
    .expect("the app is served");

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in 0..sessions {
        tasks.push(tokio::spawn(session(
            proxy_addr,
            user_token.clone(),
            n,
            period,
            h1,
            tally.clone(),
            stop.clone(),
        )));
        // Open them over a few seconds rather than all at once.
        if n % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "soak: {sessions} sessions for {minutes} min, each calling a tool every {:.1} s; resident memory (MiB) of each process every minute",
        period.as_secs_f64()
    );
    let pids = [
        ("auth-service", auth.pid()),
        ("proxy", proxy.pid()),
        ("agent", agent.pid()),
    ];
    let started = Instant::now();
    let mut samples: Vec<[u64; 3]> = Vec::new();
    for minute in 1..=minutes {
        let at = started + Duration::from_secs(minute * 60);
        tokio::time::sleep_until(at.into()).await;
        let s = [rss_of(pids[0].1), rss_of(pids[1].1), rss_of(pids[2].1)];
        let peak = crate::chaos::proxy_metric(proxy_addr, "portico_proxy_audit_queue_peak").await;
        println!(
            "  min {minute:>2}: auth-service {:.1}, proxy {:.1}, agent {:.1}; calls so far {}, failed {}; most audit events queued at once {}",
            s[0] as f64 / 1024.0,
            s[1] as f64 / 1024.0,
            s[2] as f64 / 1024.0,
            tally.calls.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
            peak.map_or("?".into(), |p| p.to_string()),
        );
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    if samples.len() > 5 {
        for (i, (name, _)) in pids.iter().enumerate() {
            let base = samples[4][i] as f64;
            let peak = samples[5..].iter().map(|s| s[i]).max().unwrap_or(0) as f64;
            let last = samples.last().map(|s| s[i]).unwrap_or(0) as f64;
            println!(
                "{name}: {:.1} MiB at minute 5, peak after it {:.1} MiB ({:+.1}%), at the end {:.1} MiB ({:+.1}%)",
                base / 1024.0,
                peak / 1024.0,
                (peak / base - 1.0) * 100.0,
                last / 1024.0,
                (last / base - 1.0) * 100.0
            );
        }
    }
    println!(
        "calls {}, failed {}",
        tally.calls.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed)
    );
    for p in [&mut agent, &mut proxy, &mut auth] {
        p.kill().await;
    }
}
