//! `portico-bench scale`: what a deployment costs at rest and how fast it
//! reacts as agents and apps grow. For SQLite and Postgres, with 1, 10 and
//! 100 agents (in-process; each serves its own shard of the apps by a
//! `shard` label) and 1,000 then 10,000 apps it prints: change events per
//! second and CPU at rest, database growth per hour, create → visible at the
//! proxy (p50/p99) and connectable, the whole `psh mcp ls`, and the time a
//! new agent matching every app takes to serve them all. Then one run with
//! agents as separate processes, where one is killed with SIGKILL to time
//! how long until the proxy stops routing to it. `churn` measures the
//! database under steady writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use portico_proto::client::AuthClient;
use portico_proto::v1;

use crate::cluster::{Cluster, ClusterBuilder, Storage, run as run_cmd, selector_agent_config};
use crate::mcp_http::McpHttp;
use crate::util::{bin, me, ms, pct, test_mcp_server};

const PASSWORD: &str = "scale-password-1";

/// CPU time (user + system) of a process so far, from /proc (`"self"`
/// for this one).
pub fn cpu_of(pid: &str) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15; `rest` starts at field 3.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn app_resource(name: &str, shard: usize) -> v1::Resource {
    app_resource_described(name, shard, "")
}

fn app_resource_described(name: &str, shard: usize, description: &str) -> v1::Resource {
    let yaml = format!(
        "kind: app\nversion: v3\nmetadata:\n  name: {name}\n  description: \"{description}\"\n  labels: {{env: dev, shard: \"{shard}\"}}\nspec:\n  mcp:\n    command: {}\n    run_as_host_user: {}\n",
        test_mcp_server().display(),
        me()
    );
    let r = portico_core::parse::parse_documents("scale.yaml", &yaml)
        .expect("app")
        .remove(0);
    v1::Resource {
        kind: "app".into(),
        json: r.to_json(),
    }
}

/// Creates apps `{prefix}{i}` for i in `range`, shard i % shards, 500 per call.
async fn create_apps(
    admin: &mut AuthClient,
    prefix: &str,
    range: std::ops::Range<usize>,
    shards: usize,
) {
    let all: Vec<v1::Resource> = range
        .map(|i| app_resource(&format!("{prefix}{i}"), i % shards))
        .collect();
    for chunk in all.chunks(500) {
        admin
            .create(v1::CreateRequest {
                resources: chunk.to_vec(),
                overwrite: false,
            })
            .await
            .expect("create apps");
    }
}

/// How many apps the proxy routes to at least one agent (or to `host`).
fn served_at_proxy(c: &Cluster, host: Option<&str>) -> usize {
    let cache = &c.proxy.as_ref().expect("proxy").state.cache;
    cache
        .apps_with_servers()
        .iter()
        .filter(|(_, s)| match host {
            None => !s.is_empty(),
            Some(h) => s.iter().any(|x| x == h),
        })
        .count()
}

async fn wait_served(c: &Cluster, host: Option<&str>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while served_at_proxy(c, host) < n {
        assert!(Instant::now() < deadline, "{n} apps never became visible");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn db_size(c: &Cluster) -> u64 {
    match &c.pg {
        None => dir_size(&c.data_dir().join("db")),
        Some(pg) => {
            use sqlx::Connection;
            let Ok(mut conn) = sqlx::postgres::PgConnection::connect(&pg.url).await else {
                return 0;
            };
            let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                .fetch_one(&mut conn)
                .await
                .unwrap_or(0);
            let _ = conn.close().await;
            size as u64
        }
    }
}

struct Rest {
    events_per_s: f64,
    cpu_pct: f64,
    growth_mib_per_h: f64,
    /// Transactions per second in the cluster's Postgres database (each
    /// statement outside a transaction is one); none on SQLite.
    db_tx_per_s: Option<f64>,
    /// What the change events at rest were, when there were any.
    events_seen: String,
}

impl Rest {
    fn tx_text(&self) -> String {
        let mut t = self
            .db_tx_per_s
            .map(|t| format!(", {t:.1} db transactions/s"))
            .unwrap_or_default();
        if !self.events_seen.is_empty() {
            t.push_str(&format!(" (events at rest: {})", self.events_seen));
        }
        t
    }
}

/// Transactions committed or rolled back so far in the cluster's Postgres
/// database, as its statistics say.
async fn db_transactions(c: &Cluster) -> Option<i64> {
    use sqlx::Connection;
    let pg = c.pg.as_ref()?;
    let mut conn = sqlx::postgres::PgConnection::connect(&pg.url).await.ok()?;
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .ok();
    let _ = conn.close().await;
    n
}

/// How long the cluster is left alone before "at rest" is measured.
const SETTLE: Duration = Duration::from_secs(10);

/// Watches the cluster do nothing for `secs`: events, CPU of `pids`, database size.
async fn at_rest(c: &Cluster, pids: &[String], secs: u64) -> Rest {
    // Let registration traffic and its checkpoints settle first: 3 s was
    // not enough after 9,000 creates (the window's first seconds read
    // 1.6-4% where a 60 s window read 1.1%).
    tokio::time::sleep(SETTLE).await;
    let cpu = |pids: &[String]| pids.iter().map(|p| cpu_of(p)).sum::<Duration>();
    let (r0, c0, d0, x0, t0) = (
        c.auth.backend.current_revision().await.expect("revision"),
        cpu(pids),
        db_size(c).await,
        db_transactions(c).await,
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (r1, c1, d1, x1) = (
        c.auth.backend.current_revision().await.expect("revision"),
        cpu(pids),
        db_size(c).await,
        db_transactions(c).await,
    );
    let el = t0.elapsed().as_secs_f64();
    let events_seen = if r1 > r0 {
        events_between(c, r0, r1).await
    } else {
        String::new()
    };
    Rest {
        events_seen,
        events_per_s: (r1 - r0) as f64 / el,
        cpu_pct: (c1 - c0).as_secs_f64() / el * 100.0,
        growth_mib_per_h: (d1 as f64 - d0 as f64) / el * 3600.0 / (1024.0 * 1024.0),
        db_tx_per_s: x0.zip(x1).map(|(a, b)| (b - a) as f64 / el),
    }
}

/// Creates one app at a time and times until the proxy routes it: p50, p99
/// in ms over `n`; then opens an MCP session on a few of them.
async fn create_to_visible(
    c: &Cluster,
    admin: &mut AuthClient,
    token: &str,
    shards: usize,
    n: usize,
) -> (f64, f64, f64) {
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("fresh{i}");
        admin
            .create(v1::CreateRequest {
                resources: vec![app_resource(&name, i % shards)],
                overwrite: false,
            })
            .await
            .expect("create");
        let returned = Instant::now();
        // Poll tightly: a backing-off wait would blur the figure.
        while state.cache.servers(&name).is_empty() {
            assert!(
                returned.elapsed() < Duration::from_secs(30),
                "{name} never visible"
            );
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        lat.push(ms(returned.elapsed()));
    }
    let mut connect = Vec::new();
    for i in 0..5.min(n) {
        let t = Instant::now();
        let mut s = McpHttp::new(c.proxy_addr(), &format!("fresh{i}"), token);
        s.initialize().await.expect("connectable");
        connect.push(ms(t.elapsed()));
        s.delete().await;
    }
    for i in 0..n {
        let _ = admin
            .delete(v1::DeleteRequest {
                kind: "app".into(),
                name: format!("fresh{i}"),
            })
            .await;
    }
    (
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut connect, 0.5),
    )
}

/// The whole `psh mcp ls` (process start to exit), p50 of 5 runs, in ms.
async fn psh_ls(home: &Path) -> f64 {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut cmd = tokio::process::Command::new(bin("psh"));
        cmd.args(["mcp", "ls"]).env("PORTICO_HOME", home);
        let o = run_cmd(cmd, None).await;
        assert!(
            o.status.success(),
            "psh mcp ls: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        times.push(ms(t.elapsed()));
    }
    pct(&mut times, 0.5)
}

/// `GET /v1/apps` (what `psh mcp ls` asks) over one kept connection, body
/// read: p50 of 5, in ms, and the body's size.
async fn apps_answer(c: &Cluster, token: &str) -> (f64, usize) {
    use http_body_util::BodyExt;
    let addr = c.proxy_addr();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(crate::web::connector(addr));
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..6 {
        let req = http::Request::get(format!("{}/v1/apps", crate::web::base(addr)))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Empty::new())
            .expect("request");
        let t = Instant::now();
        let r = client.request(req).await.expect("GET /v1/apps");
        let body = r.into_body().collect().await.expect("body").to_bytes();
        times.push(ms(t.elapsed()));
        size = body.len();
    }
    // The first paid for the connection.
    times.remove(0);
    (pct(&mut times, 0.5), size)
}

async fn psh_login(c: &Cluster) -> PathBuf {
    let home = c.data_dir().join("psh-home");
    let mut login = tokio::process::Command::new(bin("psh"));
    login
        .args([
            "login",
            &format!("--proxy={}", c.proxy_addr()),
            "--user=scale",
            "--password-stdin",
        ])
        .arg("--ca-file")
        .arg(crate::web::cert_file(c.proxy_addr()).expect("web certificate"))
        .env("PORTICO_HOME", &home);
    let o = run_cmd(login, Some(&format!("{PASSWORD}\n"))).await;
    assert!(
        o.status.success(),
        "psh login: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    home
}

/// One storage and agent count, at 1,000 and then 10,000 apps.
async fn in_process(storage: Storage, agents: usize, rest_secs: u64, sizes: &[usize]) {
    let mut b = ClusterBuilder::new().storage(storage).proxy();
    let shards: Vec<String> = (0..agents).map(|i| i.to_string()).collect();
    for (i, s) in shards.iter().enumerate() {
        b = b.selector_agent(&format!("agent{i}"), &[("shard", s.as_str())]);
    }
    let mut c = b.start().await;
    c.add_user("scale", &["admin"], PASSWORD).await;
    let token = c.login("scale", PASSWORD).await;
    let home = psh_login(&c).await;
    let mut admin = c.admin().await;
    let me = std::process::id().to_string();
    let mut have = 0;
    for &apps in sizes {
        let t = Instant::now();
        create_apps(&mut admin, "app", have..apps, agents).await;
        let created = t.elapsed();
        wait_served(&c, None, apps).await;
        let visible = t.elapsed();
        have = apps;
        let rest = at_rest(&c, std::slice::from_ref(&me), rest_secs).await;
        let (p50, p99, connect) = create_to_visible(&c, &mut admin, &token, agents, 100).await;
        let ls = psh_ls(&home).await;
        let (answer, size) = apps_answer(&c, &token).await;
        let kib = size / 1024;
        println!(
            "{storage:?} | {agents:>3} agents | {apps:>6} apps | at rest: {:.2} events/s, CPU {:.2}% of a core, db {:+.2} MiB/h{} | create→visible p50 {p50:.2} ms p99 {p99:.2} ms, connect p50 {connect:.1} ms | psh mcp ls {ls:.1} ms (GET /v1/apps alone {answer:.1} ms, {kib} KiB) | {apps} created in {:.2} s, all visible after {:.2} s",
            rest.events_per_s,
            rest.cpu_pct,
            rest.growth_mib_per_h,
            rest.tx_text(),
            created.as_secs_f64(),
            visible.as_secs_f64(),
        );
    }
    if agents == 1 {
        // A new agent that matches every app.
        let t = Instant::now();
        c.start_agent("newcomer", selector_agent_config(&[("*", "*")]))
            .await;
        wait_served(&c, Some("newcomer"), have).await;
        println!(
            "{storage:?} | a new agent matching all {have} apps serves them all (visible at the proxy) {:.2} s after it starts",
            t.elapsed().as_secs_f64()
        );
    }
    c.shutdown().await;
}

/// Agents as separate `portico start` processes: CPU at rest of every
/// process, and a SIGKILL.
async fn processes(storage: Storage, agents: usize, apps: usize, rest_secs: u64) {
    let c = ClusterBuilder::new().storage(storage).proxy().start().await;
    let mut kids = Vec::new();
    for i in 0..agents {
        let child = crate::util::agent_process(
            &c.data_dir().join(format!("process-{i}")),
            &c.auth_addr.to_string(),
            &c.tunnel_addr().to_string(),
            &c.join_token("app").await,
            &format!("proc{i}"),
            &format!("{{shard: \"{i}\"}}"),
        );
        kids.push(child);
    }
    let mut admin = c.admin().await;
    create_apps(&mut admin, "app", 0..apps, agents).await;
    wait_served(&c, None, apps).await;
    let mut pids = vec![std::process::id().to_string()];
    pids.extend(kids.iter().filter_map(|k| k.id()).map(|p| p.to_string()));
    let rest = at_rest(&c, &pids, rest_secs).await;
    println!(
        "{storage:?} | {agents:>3} agents as processes | {apps:>6} apps | at rest: {:.2} events/s, CPU {:.2}% of a core (auth-service + proxy + {agents} agent processes), db {:+.2} MiB/h{}",
        rest.events_per_s,
        rest.cpu_pct,
        rest.growth_mib_per_h,
        rest.tx_text()
    );
    // SIGKILL one agent: its tunnel drops, then its lease ends.
    let victim = "proc0";
    let held = served_at_proxy(&c, Some(victim));
    let tunnels = c.proxy.as_ref().expect("proxy").state.tunnels.clone();
    kids[0].start_kill().expect("SIGKILL");
    let _ = kids[0].wait().await;
    let t = Instant::now();
    let mut tunnel_gone = None;
    loop {
        if tunnel_gone.is_none() && !tunnels.is_connected(victim) {
            tunnel_gone = Some(t.elapsed());
        }
        if served_at_proxy(&c, Some(victim)) == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the killed agent's apps never went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let withdrawn = t.elapsed();
    println!(
        "{storage:?} | SIGKILL of one agent process serving {held} apps: the proxy stops routing to it after {:.2} s (its tunnel closed); its {held} records withdrawn after {:.2} s (lease 15 s)",
        tunnel_gone.unwrap_or(withdrawn).as_secs_f64(),
        withdrawn.as_secs_f64()
    );
    drop(kids);
    c.shutdown().await;
}

/// `scale [REST_SECONDS] [--quick [--pg]] [--agents N]`: `--quick` runs 1
/// and 10 agents with 1,000 apps on SQLite only (on Postgres only with
/// `--pg`); `--agents N` runs only the in-process rows with N agents.
pub async fn run(args: &[String]) {
    let mut rest_secs = 20;
    let mut only: Option<usize> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--agents" {
            only = Some(
                it.next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--agents takes a number of agents, at least 1"),
            );
        } else if let Ok(n) = a.parse::<u64>() {
            rest_secs = n;
        }
    }
    let quick = args.iter().any(|a| a == "--quick");
    println!(
        "scale: at rest measured over {rest_secs} s; each agent serves its own shard of the apps; CPU is the whole bench process (auth-service, proxy and in-process agents) unless said otherwise"
    );
    let storages: &[Storage] = if quick && args.iter().any(|a| a == "--pg") {
        &[Storage::Postgres]
    } else if quick {
        &[Storage::Sqlite]
    } else {
        &[Storage::Sqlite, Storage::Postgres]
    };
    let only_counts = only.map(|n| vec![n]);
    let counts: &[usize] = match &only_counts {
        Some(c) => c,
        None if quick => &[1, 10],
        None => &[1, 10, 100],
    };
    let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
    for &s in storages {
        for &n in counts {
            in_process(s, n, rest_secs, sizes).await;
        }
    }
    if only.is_some() {
        return;
    }
    let apps = *sizes.last().unwrap_or(&1_000);
    for &s in storages {
        processes(s, 10, apps, rest_secs).await;
    }
}

/// The change events with revisions in (from, to]: how many of each kind
/// and operation, over how many names.
async fn events_between(c: &Cluster, from: i64, to: i64) -> String {
    let evs = c
        .auth
        .backend
        .events_after(from, (to - from).clamp(1, 100_000))
        .await
        .unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, (usize, std::collections::HashSet<String>)> =
        Default::default();
    for e in evs.iter().filter(|e| e.revision <= to) {
        let entry = by.entry(format!("{:?} {:?}", e.kind, e.op)).or_default();
        entry.0 += 1;
        entry.1.insert(e.name.clone());
    }
    by.iter()
        .map(|(k, (n, names))| format!("{k} ×{n} over {} names", names.len()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows in the cluster's change log and in its audit log.
async fn log_rows(c: &Cluster) -> (i64, i64) {
    (
        count(c, "SELECT COUNT(*) FROM events").await,
        count(c, "SELECT COUNT(*) FROM audit").await,
    )
}

async fn count(c: &Cluster, q: &'static str) -> i64 {
    use sqlx::Connection;
    match &c.pg {
        Some(pg) => {
            let Ok(mut conn) = sqlx::postgres::PgConnection::connect(&pg.url).await else {
                return -1;
            };
            let n: i64 = sqlx::query_scalar(q)
                .fetch_one(&mut conn)
                .await
                .unwrap_or(-1);
            let _ = conn.close().await;
            n
        }
        None => {
            let url = format!(
                "sqlite://{}?mode=ro",
                c.data_dir().join("db/portico.db").display()
            );
            let Ok(mut conn) = sqlx::sqlite::SqliteConnection::connect(&url).await else {
                return -1;
            };
            let n: i64 = sqlx::query_scalar(q)
                .fetch_one(&mut conn)
                .await
                .unwrap_or(-1);
            let _ = conn.close().await;
            n
        }
    }
}

/// `churn [MINUTES]`: steady writes against 1,000 apps served by one agent,
/// on SQLite and on Postgres, with the change log kept to 20,000 events:
/// every second 100 apps are updated (each update also changes the agent's
/// `app_server` record), so the change log passes its bound within a few
/// minutes. Prints, every minute, the database's size, the events kept and
/// the audit records, then the growth per hour over the last half of the
/// run, when compaction is in its steady state.
pub async fn churn(minutes: u64) {
    const APPS: usize = 1_000;
    const PER_SECOND: usize = 100;
    const KEEP: i64 = 20_000;
    println!(
        "churn: {minutes} min per storage; {APPS} apps, one agent serving all, {PER_SECOND} app updates a second; event_retention {KEEP} (compaction runs every minute)"
    );
    for storage in [Storage::Sqlite, Storage::Postgres] {
        let c = ClusterBuilder::new()
            .storage(storage)
            .event_retention(KEEP)
            .proxy()
            .selector_agent("agent0", &[("*", "*")])
            .start()
            .await;
        let mut admin = c.admin().await;
        create_apps(&mut admin, "app", 0..APPS, 1).await;
        wait_served(&c, None, APPS).await;
        let start = Instant::now();
        let mut samples: Vec<(f64, u64, i64)> = Vec::new();
        let mut n: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut next_print = 0;
        while start.elapsed() < Duration::from_secs(minutes * 60) {
            tick.tick().await;
            let batch: Vec<v1::Resource> = (0..PER_SECOND)
                .map(|_| {
                    n += 1;
                    let i = (n as usize) % APPS;
                    // A new description: a real change, so a new revision.
                    app_resource_described(&format!("app{i}"), 0, &format!("update {n}"))
                })
                .collect();
            admin
                .create(v1::CreateRequest {
                    resources: batch,
                    overwrite: true,
                })
                .await
                .expect("update apps");
            let secs = start.elapsed().as_secs();
            if secs >= next_print {
                next_print = secs + 60;
                let size = db_size(&c).await;
                let rev = c.auth.backend.current_revision().await.unwrap_or(0);
                let (events, audit) = log_rows(&c).await;
                samples.push((start.elapsed().as_secs_f64(), size, audit));
                println!(
                    "{storage:?} | minute {:>2} | {n} updates | database {:.1} MiB | events kept {events} (revision {rev}) | audit records {audit}",
                    secs / 60,
                    size as f64 / (1024.0 * 1024.0),
                );
            }
        }
        let size = db_size(&c).await;
        let (_, audit) = log_rows(&c).await;
        samples.push((start.elapsed().as_secs_f64(), size, audit));
        let half = samples.len() / 2;
        if let (Some(a), Some(b)) = (samples.get(half), samples.last())
            && b.0 > a.0
        {
            let hours = (b.0 - a.0) / 3600.0;
            println!(
                "{storage:?} | second half (from minute {:.0}): database {:+.1} MiB/h, audit log {:+.0} records/h (kept for audit_retention_age)",
                a.0 / 60.0,
                (b.1 as f64 - a.1 as f64) / (1024.0 * 1024.0) / hours,
                (b.2 - a.2) as f64 / hours
            );
        }
        c.shutdown().await;
    }
}
