//! `portico-bench`: the figures the issues ask for, each with a baseline
//! measured in the same run. Timings are printed, never asserted.
//!
//! cargo run --release -p portico-tests --bin portico-bench -- [all|store|registration|proxy|proxy-tls|proxy-plain [--sessions 1,8,16] [--calls N] [--rounds R] [--only FORM,...]|ls|memory|chaos [MINUTES]|scale [REST_SECONDS] [--quick [--pg]] [--agents N]|churn [MINUTES]|soak [MINUTES] [SESSIONS] [PERIOD_SECONDS] [--h1]]

use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_proto::v1;
use portico_tests::direct::Direct;
use portico_tests::mcp_http::McpHttp;
use portico_tests::util::{ms, pct, test_app_yaml, test_mcp_server};
use portico_tests::{ClusterBuilder, Storage, eventually};
use serde_json::json;

fn rss_kib() -> u64 {
    portico_tests::util::rss_kib("self")
}

fn app_req(name: &str) -> v1::CreateRequest {
    let app = portico_core::parse::parse_documents("b", &format!("kind: app\nversion: v3\nmetadata: {{name: {name}}}\nspec: {{uri: 'mcp+http://x/mcp'}}\n")).expect("app");
    v1::CreateRequest {
        resources: vec![v1::Resource {
            kind: "app".into(),
            json: app[0].to_json(),
        }],
        overwrite: false,
    }
}

async fn store(storage: Storage) {
    let c = ClusterBuilder::new().storage(storage).start().await;
    let admin = c.admin().await;
    // Creates per second: one writer, then eight.
    let n = 500;
    let t = Instant::now();
    let mut a = admin.clone();
    for i in 0..n {
        a.create(app_req(&format!("s{i}"))).await.expect("create");
    }
    let one = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..8 {
        let mut a = admin.clone();
        set.spawn(async move {
            for i in 0..(n / 8) {
                a.create(app_req(&format!("c{w}-{i}")))
                    .await
                    .expect("create");
            }
        });
    }
    while set.join_next().await.is_some() {}
    let eight = (n / 8 * 8) as f64 / t.elapsed().as_secs_f64();
    println!("{storage:?}: creates/s one writer {one:.0}, eight writers {eight:.0}");

    // Commit-to-delivery for 100 watchers.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(i64, Instant)>();
    for _ in 0..100 {
        let mut a = admin.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut s = a
                .watch(v1::WatchRequest {
                    kinds: vec!["app".into()],
                    from_revision: 0,
                    ..Default::default()
                })
                .await
                .expect("watch")
                .into_inner();
            let mut live = false;
            while let Ok(Some(ev)) = s.message().await {
                if ev.r#type == v1::watch_event::Type::SnapshotEnd as i32 {
                    live = true;
                    let _ = tx.send((-1, Instant::now()));
                } else if live {
                    let _ = tx.send((ev.revision, Instant::now()));
                }
            }
        });
    }
    let mut ready = 0;
    while ready < 100 {
        if let Some((-1, _)) = rx.recv().await {
            ready += 1;
        }
    }
    let writes = 100;
    let mut rpc = Vec::new();
    let mut sent = std::collections::HashMap::new();
    let mut a = admin.clone();
    for i in 0..writes {
        let t0 = Instant::now();
        a.create(app_req(&format!("w{i}"))).await.expect("create");
        rpc.push(ms(t0.elapsed()));
        let rev = c.auth.backend.current_revision().await.expect("rev");
        sent.insert(rev, t0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut delivery = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivery.len() < writes * 100 && Instant::now() < deadline {
        if let Ok(Some((rev, at))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
            && let Some(t0) = sent.get(&rev)
        {
            delivery.push(ms(at.duration_since(*t0)));
        }
    }
    let (r50, r99) = (pct(&mut rpc, 0.5), pct(&mut rpc, 0.99));
    let (d50, d99) = (pct(&mut delivery, 0.5), pct(&mut delivery, 0.99));
    println!(
        "{storage:?}: write start to delivery at 100 watchers p50 {d50:.2} ms p99 {d99:.2} ms ({} deliveries); baseline create RPC p50 {r50:.2} ms p99 {r99:.2} ms; ratio p50 {:.2}",
        delivery.len(),
        d50 / r50
    );
    c.shutdown().await;
}

async fn registration(storage: Storage) {
    let c = ClusterBuilder::new()
        .storage(storage)
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    let mut admin = c.admin().await;
    let mut lat = Vec::new();
    let mut rpc = Vec::new();
    for i in 0..200 {
        let name = format!("r{i}");
        let yaml = test_app_yaml(&name, "dev");
        let res = portico_core::parse::parse_documents("r", &yaml).expect("app");
        let t0 = Instant::now();
        admin
            .create(v1::CreateRequest {
                resources: vec![v1::Resource {
                    kind: "app".into(),
                    json: res[0].to_json(),
                }],
                overwrite: false,
            })
            .await
            .expect("create");
        let returned = Instant::now();
        rpc.push(ms(returned - t0));
        // Poll tightly: a backing-off wait would blur the figure.
        while state.cache.servers(&name).is_empty() {
            assert!(
                returned.elapsed() < Duration::from_secs(10),
                "{name} never registered"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(ms(returned.elapsed()));
    }
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    println!(
        "{storage:?}: pctl-create-returned to app_server visible at the proxy, 200 creates: p50 {p50:.2} ms p99 {p99:.2} ms (goal p99 < 250 ms); baseline create RPC p50 {:.2} ms",
        pct(&mut rpc, 0.5)
    );
    c.shutdown().await;
}

/// A way of calling through the proxy: its name for `--only`, the app
/// ("tm": agent in the proxy's process; "tp": an agent process), HTTP/1.1,
/// SSE answers only, and the client: `Lean` drives one HTTP/1.1
/// connection in the session's own task, as the direct client drives its
/// pipes; `Pooled` is the tests' client (hyper-util's pooled client, whose
/// connections run in tasks of their own, and a copy of every answer's
/// headers), which costs the bench process more per call. `Floor` is the
/// lean client against `floor_server`, not Portico: what the transport
/// alone costs on this machine.
type Form = (&'static str, &'static str, bool, bool, Client);

#[derive(Clone, Copy, PartialEq)]
enum Client {
    Lean,
    Pooled,
    Floor,
}

const FORMS: [Form; 8] = [
    ("tm-h2-json", "tm", false, false, Client::Pooled),
    ("tm-h2-sse", "tm", false, true, Client::Pooled),
    ("tm-h1-json", "tm", true, false, Client::Lean),
    ("tm-h1-json-pooled", "tm", true, false, Client::Pooled),
    ("tm-h1-sse", "tm", true, true, Client::Lean),
    ("tp-h2-sse", "tp", false, true, Client::Pooled),
    ("tp-h1-json", "tp", true, false, Client::Lean),
    ("floor-h1", "", true, false, Client::Floor),
];

/// `proxy-tls`/`proxy-plain` options: `--sessions 1,8,16`, `--calls N`
/// (per session), `--rounds R`, `--only FORM,...`.
struct ProxyOpts {
    sessions: Vec<usize>,
    calls: Option<usize>,
    rounds: usize,
    only: Option<String>,
}

impl ProxyOpts {
    fn parse(args: &[String]) -> Self {
        let mut o = ProxyOpts {
            sessions: vec![1, 8, 16],
            calls: None,
            rounds: 1,
            only: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |what: &str| {
                it.next()
                    .unwrap_or_else(|| panic!("{a} takes {what}"))
                    .clone()
            };
            match a.as_str() {
                "--sessions" => {
                    o.sessions = value("a list of session counts, as 8,16")
                        .split(',')
                        .map(|n| n.parse().expect("--sessions: numbers, as 8,16"))
                        .collect()
                }
                "--calls" => o.calls = Some(value("calls per session").parse().expect("--calls N")),
                "--rounds" => o.rounds = value("a number of rounds").parse().expect("--rounds R"),
                "--only" => {
                    let f = value("forms, as tm-h1-json,floor-h1");
                    for one in f.split(',') {
                        assert!(
                            FORMS.iter().any(|x| x.0 == one),
                            "--only takes forms among: {}",
                            FORMS.map(|x| x.0).join(", ")
                        );
                    }
                    o.only = Some(f);
                }
                other => panic!("unknown option {other}"),
            }
        }
        o.rounds = o.rounds.max(1);
        o
    }
}

/// What one measured run of calls gave.
struct Run {
    latencies: Vec<f64>,
    rate: f64,
    /// Busy CPU time of the whole machine per call, in µs.
    cpu_us: f64,
    /// CPU time of this process (bench clients, and Portico when proxied)
    /// per call, in µs; the rest is the MCP servers and the kernel's work
    /// outside this process.
    own_us: f64,
}

#[derive(Default)]
struct Phase {
    latencies: Vec<f64>,
    rates: Vec<f64>,
    cpu: Vec<f64>,
    own: Vec<f64>,
}

impl Phase {
    fn add(&mut self, r: Run) {
        self.latencies.extend(r.latencies);
        self.rates.push(r.rate);
        self.cpu.push(r.cpu_us);
        self.own.push(r.own_us);
    }
    fn latency(&self) -> (f64, f64) {
        let mut l = self.latencies.clone();
        (pct(&mut l, 0.5), pct(&mut l, 0.99))
    }
    fn rate(&self) -> f64 {
        pct(&mut self.rates.clone(), 0.5)
    }
    fn cpu_us(&self) -> f64 {
        pct(&mut self.cpu.clone(), 0.5)
    }
    fn own_us(&self) -> f64 {
        pct(&mut self.own.clone(), 0.5)
    }
}

/// Busy jiffies of the whole machine (every CPU, user + system + irq).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    f.iter().take(8).sum::<u64>() - f.get(3).copied().unwrap_or(0) - f.get(4).copied().unwrap_or(0)
}

/// Runs `calls` calls (the closure returns every latency and the rate) and
/// adds the machine's busy CPU per call.
async fn measure<F, Fut>(calls: usize, run: F) -> Run
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (Vec<f64>, f64)>,
{
    let own = || portico_tests::scale::cpu_of("self");
    let (before, own_before) = (machine_busy_ticks(), own());
    let (latencies, rate) = run().await;
    let ticks = machine_busy_ticks() - before;
    let own_us = (own() - own_before).as_secs_f64() * 1e6 / calls.max(1) as f64;
    Run {
        latencies,
        rate,
        // USER_HZ is 100 on Linux.
        cpu_us: ticks as f64 * 10_000.0 / calls.max(1) as f64,
        own_us,
    }
}

/// `direct_calls` on a runtime of its own, with a worker per core as a
/// client program would have: this process's runtime has the workers of
/// a Portico process that runs an agent (`portico_agent::worker_threads`).
async fn direct_calls_apart(sessions: usize, calls: usize) -> (Vec<f64>, f64) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = tx.send(rt.block_on(direct_calls(sessions, calls)));
    });
    rx.await.expect("the direct run")
}

/// `calls` echo calls on each of `sessions` MCP server processes over stdio,
/// no Portico: every latency, and calls per second.
async fn direct_calls(sessions: usize, calls: usize) -> (Vec<f64>, f64) {
    let mut servers = Vec::new();
    for _ in 0..sessions {
        servers.push(Direct::start(&test_mcp_server(), &[]).await);
    }
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut d in servers {
        set.spawn(async move {
            let mut v = Vec::with_capacity(calls);
            for i in 0..calls {
                let t = Instant::now();
                d.rpc(
                    "tools/call",
                    json!({"name": "echo", "arguments": {"message": format!("m{i}")}}),
                )
                .await;
                v.push(ms(t.elapsed()));
            }
            d.kill();
            v
        });
    }
    gather(set, t).await
}

/// Every latency the sessions' tasks measured, and the calls per second
/// since `t`.
async fn gather(mut set: tokio::task::JoinSet<Vec<f64>>, t: Instant) -> (Vec<f64>, f64) {
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("task"));
    }
    let rate = all.len() as f64 / t.elapsed().as_secs_f64();
    (all, rate)
}

async fn proxy_overhead(tls: bool, opts: &ProxyOpts) {
    let mode = if tls {
        "web TLS on"
    } else {
        "web TLS off (plain_http)"
    };
    println!("-- proxy, {mode}");
    let b = ClusterBuilder::new();
    let b = if tls { b } else { b.plain_http() };
    // "tm" is served by an agent in the proxy's process (as in the
    // all-in-one), "tp" by an agent process, over the HTTP/2 tunnel.
    let c = b
        .proxy()
        .selector_agent("a1", &[("env", "dev")])
        .start()
        .await;
    c.add_user("bench", &["admin"], "bench-password-1").await;
    let token = c.login("bench", "bench-password-1").await;
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.create_yaml(&test_app_yaml("tp", "proc"), false)
        .await
        .expect("app");
    let _agent_process = portico_tests::util::agent_process(
        &c.data_dir().join("process-a2"),
        &c.auth_addr.to_string(),
        &c.tunnel_addr().to_string(),
        &c.join_token("app").await,
        "a2",
        r#"{"env": "proc"}"#,
    );
    c.wait_servers("tm", &["a1"]).await;
    c.wait_servers("tp", &["a2"]).await;
    c.wait_tunnel("a2").await;
    let addr = c.proxy_addr();
    let floor = floor_server().await;

    // Session start: spawn to first response.
    let (mut direct_start, mut proxied_start) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        let d = Direct::start(&test_mcp_server(), &[]).await;
        direct_start.push(ms(t.elapsed()));
        drop(d);
        let t = Instant::now();
        let mut s = McpHttp::new(addr, "tm", &token);
        s.initialize().await.expect("init");
        proxied_start.push(ms(t.elapsed()));
        s.delete().await;
    }
    println!(
        "session start (spawn to initialize answered), 20 runs: direct stdio p50 {:.2} ms, through proxy+tunnel+agent p50 {:.2} ms",
        pct(&mut direct_start, 0.5),
        pct(&mut proxied_start, 0.5)
    );

    for &sessions in &opts.sessions {
        let calls = opts
            .calls
            .unwrap_or(if sessions == 1 { 2000 } else { 1000 });
        // Side by side: the agent in-process or a process; the client on
        // HTTP/2 or HTTP/1.1; answers as plain JSON where the proxy can, or
        // always SSE (a client that accepts only SSE).
        let forms: Vec<Form> = FORMS
            .iter()
            .copied()
            .filter(|f| {
                opts.only
                    .as_ref()
                    .is_none_or(|o| o.split(',').any(|x| x == f.0))
            })
            .collect();
        // Each round measures direct stdio, then every form; a figure is
        // the median over the rounds, so a slow moment of the machine
        // moves one round, not the comparison.
        let mut direct = Phase::default();
        let mut proxied: Vec<Phase> = forms.iter().map(|_| Phase::default()).collect();
        for _ in 0..opts.rounds {
            direct.add(
                measure(calls * sessions, || async move {
                    direct_calls_apart(sessions, calls).await
                })
                .await,
            );
            for (f, phase) in forms.iter().zip(proxied.iter_mut()) {
                if f.4 == Client::Floor {
                    phase.add(
                        measure(calls * sessions, || floor_calls(floor, sessions, calls)).await,
                    );
                    continue;
                }
                let token = token.clone();
                let audit = c.proxy.as_ref().expect("proxy").state.clone();
                phase.add(
                    measure(calls * sessions, || async move {
                        proxied_calls(addr, f.1, &token, sessions, calls, *f, &audit).await
                    })
                    .await,
                );
            }
        }
        let (d50, d99) = direct.latency();
        let direct_rate = direct.rate();
        let direct_cpu = direct.cpu_us();
        println!(
            "tools/call echo, {sessions} session(s), {calls} calls each, median of {} round(s): direct stdio p50 {d50:.3} ms p99 {d99:.3} ms {direct_rate:.0} calls/s, {direct_cpu:.0} µs of machine CPU per call ({:.0} in the bench's clients)",
            opts.rounds,
            direct.own_us(),
        );
        for (f, phase) in forms.iter().zip(proxied.iter()) {
            let (p50, p99) = phase.latency();
            let rate = phase.rate();
            let form = if f.4 == Client::Floor {
                "not Portico: a bare HTTP/1.1 relay (floor), no TLS".to_string()
            } else {
                format!(
                    "{}, client {}{}, {} answers",
                    if f.1 == "tm" {
                        "agent in-process"
                    } else {
                        "agent process   "
                    },
                    if f.2 { "HTTP/1.1" } else { "HTTP/2  " },
                    if f.4 == Client::Pooled { " pooled" } else { "" },
                    if f.3 { "SSE " } else { "JSON" },
                )
            };
            println!(
                "  proxied, {form}: p50 {p50:.3} ms p99 {p99:.3} ms {rate:.0} calls/s, {:.0} µs CPU per call ({:.0} in clients and Portico); added p50 {:.3} ms; throughput kept {:.0}% [{}]",
                phase.cpu_us(),
                phase.own_us(),
                p50 - d50,
                100.0 * rate / direct_rate,
                f.0,
            );
        }
    }
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    println!(
        "web connections accepted during the run ({mode}): {} (keep-alive reuse: one per client, not one per call); most audit events queued at once: {}",
        state
            .metrics
            .web_connections
            .load(std::sync::atomic::Ordering::Relaxed),
        state.audit.peak.load(std::sync::atomic::Ordering::Relaxed)
    );
    c.shutdown().await;
}

/// `calls` echo calls on each of `sessions` sessions through the proxy:
/// every latency, and calls per second.
async fn proxied_calls(
    addr: std::net::SocketAddr,
    app: &str,
    token: &str,
    sessions: usize,
    calls: usize,
    form: Form,
    proxy: &portico_proxy::ProxyState,
) -> (Vec<f64>, f64) {
    let (_, _, h1, sse_only, client) = form;
    let mut proxied = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    let mut clients = Vec::new();
    for _ in 0..sessions {
        let mut s = McpHttp::new(addr, app, token);
        s = if h1 { s.http1(addr) } else { s.http2(addr) };
        if sse_only {
            s = s.sse_only();
        }
        s.initialize().await.expect("init");
        let lean = match client {
            Client::Lean => Some(LeanClient::connect(addr, &s, sse_only).await),
            Client::Pooled => None,
            Client::Floor => unreachable!("the floor is measured by floor_calls, not Portico"),
        };
        clients.push((s, lean));
    }
    let t = Instant::now();
    for (mut s, lean) in clients {
        set.spawn(async move {
            let mut v = Vec::with_capacity(calls);
            match lean {
                Some(mut lean) => {
                    for i in 0..calls {
                        let t = Instant::now();
                        lean.call("echo", json!({"message": format!("m{i}")})).await;
                        v.push(ms(t.elapsed()));
                    }
                }
                None => {
                    for i in 0..calls {
                        let t = Instant::now();
                        s.call("echo", json!({"message": format!("m{i}")})).await;
                        v.push(ms(t.elapsed()));
                    }
                }
            }
            s.delete().await;
            v
        });
    }
    while let Some(r) = set.join_next().await {
        proxied.extend(r.expect("task"));
    }
    // The run is over when its audit records are stored: what is still
    // queued would otherwise be stored on the next phase's time.
    assert!(
        proxy.audit.flush(Duration::from_secs(60)).await,
        "the audit records were not stored within 60 s"
    );
    let rate = proxied.len() as f64 / t.elapsed().as_secs_f64();
    (proxied, rate)
}

type LeanBody = http_body_util::Full<bytes::Bytes>;
type LeanConn = hyper::client::conn::http1::Connection<
    hyper_util::rt::TokioIo<Box<dyn portico_tls::net::TokioStream>>,
    LeanBody,
>;

/// An MCP client on one HTTP/1.1 connection (hyper's `client::conn`),
/// driven by the task that calls: what the direct client does with its
/// pipes (a request written, its answer read and parsed, one timeout per
/// call), over HTTP. It sends what `McpHttp` sends.
struct LeanClient {
    send: hyper::client::conn::http1::SendRequest<LeanBody>,
    conn: std::pin::Pin<Box<LeanConn>>,
    headers: http::HeaderMap,
    path: http::Uri,
    next_id: i64,
}

impl LeanClient {
    /// A connection of its own to the proxy, for the session `s` opened.
    async fn connect(addr: std::net::SocketAddr, s: &McpHttp, sse_only: bool) -> LeanClient {
        let session = s.session.as_deref().expect("a session");
        LeanClient::open(addr, &s.url, &s.token, session, sse_only).await
    }

    /// A connection to `addr`, whose requests go to the path of `url`.
    async fn open(
        addr: std::net::SocketAddr,
        url: &str,
        token: &str,
        session: &str,
        sse_only: bool,
    ) -> LeanClient {
        use http::HeaderValue;
        let io = hyper_util::rt::TokioIo::new(portico_tests::web::stream(addr).await);
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        let mut headers = http::HeaderMap::new();
        let value = |v: &str| HeaderValue::from_str(v).expect("header value");
        headers.insert(http::header::HOST, value(&addr.to_string()));
        headers.insert(
            http::header::AUTHORIZATION,
            value(&format!("Bearer {token}")),
        );
        headers.insert("mcp-session-id", value(session));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_static(if sse_only {
                "text/event-stream"
            } else {
                "application/json, text/event-stream"
            }),
        );
        let path = url
            .parse::<http::Uri>()
            .expect("url")
            .path()
            .parse()
            .expect("path");
        LeanClient {
            send,
            conn: Box::pin(conn),
            headers,
            path,
            next_id: 1000,
        }
    }

    /// Calls a tool and returns its response message.
    async fn call(&mut self, tool: &str, args: serde_json::Value) -> serde_json::Value {
        use http_body_util::BodyExt;
        self.next_id += 1;
        let id = self.next_id;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}});
        let mut req = http::Request::new(LeanBody::new(bytes::Bytes::from(body.to_string())));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.path.clone();
        *req.headers_mut() = self.headers.clone();
        let send = &mut self.send;
        let exchange = async move {
            send.ready().await.expect("connection ready");
            let resp = send.send_request(req).await.expect("answer");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            (parts, body)
        };
        let within = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::select! {
                biased;
                r = exchange => r,
                c = self.conn.as_mut() => panic!("the connection to the proxy ended: {c:?}"),
            }
        });
        let (parts, body) = within.await.expect("answer in 30 s");
        assert_eq!(parts.status, http::StatusCode::OK, "{:?}", body);
        portico_tests::mcp_http::Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
        .response(id)
    }
}

/// The floor of any HTTP front on this machine, for comparison: a hyper
/// HTTP/1.1 server in this process, plain TCP, that starts an MCP server
/// per connection and relays each POST's body to it over stdio, answering
/// with the line the server writes back as `application/json`, from the
/// connection's own task. No parsing, no checks, no audit, no session, no
/// task between the connection and the pipes: what the client's HTTP, the
/// loopback TCP and one relay cost, and no more.
async fn floor_server() -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let server = Arc::new(tokio::sync::Mutex::new(
                    Direct::start(&test_mcp_server(), &[]).await,
                ));
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let server = server.clone();
                        async move {
                            // Bounded as Portico bounds a body (its default, 4 MiB).
                            let body = http_body_util::Limited::new(req.into_body(), 4 << 20);
                            let Ok(body) = body.collect().await else {
                                let mut r = http::Response::new(LeanBody::default());
                                *r.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
                                return Ok::<_, hyper::Error>(r);
                            };
                            let body = body.to_bytes();
                            let answer = server.lock().await.exchange(&body).await;
                            let mut r = http::Response::new(LeanBody::new(answer));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, hyper::Error>(r)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// `calls` echo calls on each of `sessions` connections to `floor_server`,
/// with the client the proxied runs use; each connection's server is
/// started, and called once, before the clock starts.
async fn floor_calls(addr: std::net::SocketAddr, sessions: usize, calls: usize) -> (Vec<f64>, f64) {
    let url = format!("http://{addr}/mcp/floor");
    let mut clients = Vec::new();
    for _ in 0..sessions {
        let mut c = LeanClient::open(addr, &url, "floor-token", "floor-session", false).await;
        c.call("echo", json!({"message": "warm-up"})).await;
        clients.push(c);
    }
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut c in clients {
        set.spawn(async move {
            let mut v = Vec::with_capacity(calls);
            for i in 0..calls {
                let t = Instant::now();
                c.call("echo", json!({"message": format!("m{i}")})).await;
                v.push(ms(t.elapsed()));
            }
            v
        });
    }
    gather(set, t).await
}

async fn ls_scale() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    c.add_user("bench", &["admin"], "bench-password-1").await;
    let home = c.data_dir().join("home");
    let psh = portico_tests::bin("psh");
    let mut login = tokio::process::Command::new(&psh);
    login
        .args([
            "login",
            &format!("--proxy={}", c.proxy_addr()),
            "--user=bench",
            "--password-stdin",
        ])
        .arg("--ca-file")
        .arg(portico_tests::web::cert_file(c.proxy_addr()).expect("web certificate"))
        .env("PORTICO_HOME", &home);
    let _ = portico_tests::cluster::run(login, Some("bench-password-1\n")).await;
    let mut admin = c.admin().await;
    let measure = async |label: &str, total: usize| {
        let state = c.proxy.as_ref().expect("proxy").state.clone();
        eventually(Duration::from_secs(120), "all registered", || {
            let s = state.clone();
            async move {
                (s.cache
                    .apps()
                    .iter()
                    .filter(|a| !s.cache.servers(&a.metadata.name).is_empty())
                    .count()
                    >= total)
                    .then_some(())
            }
        })
        .await;
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let mut cmd = tokio::process::Command::new(&psh);
            cmd.args(["mcp", "ls"]).env("PORTICO_HOME", &home);
            let o = portico_tests::cluster::run(cmd, None).await;
            assert!(o.status.success());
            times.push(ms(t.elapsed()));
        }
        let p50 = pct(&mut times, 0.5);
        println!("psh mcp ls with {label}: p50 {p50:.1} ms over 5 runs");
        p50
    };
    for i in 0..10 {
        let yaml = test_app_yaml(&format!("l{i}"), "dev");
        c.create_yaml(&yaml, false).await.expect("app");
    }
    let base = measure("10 apps", 10).await;
    let yaml_app = |i: usize| test_app_yaml(&format!("l{i}"), "dev");
    let mut batch = Vec::new();
    for i in 10..10_000 {
        let r = portico_core::parse::parse_documents("l", &yaml_app(i)).expect("app");
        batch.push(v1::Resource {
            kind: "app".into(),
            json: r[0].to_json(),
        });
        if batch.len() == 500 {
            admin
                .create(v1::CreateRequest {
                    resources: std::mem::take(&mut batch),
                    overwrite: false,
                })
                .await
                .expect("batch");
        }
    }
    if !batch.is_empty() {
        admin
            .create(v1::CreateRequest {
                resources: batch,
                overwrite: false,
            })
            .await
            .expect("batch");
    }
    let big = measure("10,000 apps", 10_000).await;
    println!("psh mcp ls 10,000 vs 10 apps: ratio {:.2}", big / base);
    c.shutdown().await;
}

async fn memory() {
    let base = rss_kib();
    // Each of the 1,000 sessions below keeps a connection of its own.
    let c = ClusterBuilder::new()
        .max_connections_per_address(2048)
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    // Sessions are capped per user, so spread them over several.
    let mut tokens = Vec::new();
    for u in 0..5 {
        let name = format!("bench{u}");
        c.add_user(&name, &["admin"], "bench-password-1").await;
        tokens.push(c.login(&name, "bench-password-1").await);
    }
    let started = rss_kib();
    let mut admin = c.admin().await;
    let mut batch = Vec::new();
    for i in 0..1000 {
        let r = portico_core::parse::parse_documents("m", &test_app_yaml(&format!("m{i}"), "dev"))
            .expect("app");
        batch.push(v1::Resource {
            kind: "app".into(),
            json: r[0].to_json(),
        });
    }
    admin
        .create(v1::CreateRequest {
            resources: batch,
            overwrite: false,
        })
        .await
        .expect("batch");
    let a = Arc::new(c);
    let agent_state = a.agent("a1").state.clone();
    eventually(Duration::from_secs(60), "1000 registered", || {
        let s = agent_state.clone();
        async move { (s.registry.len() >= 1000).then_some(()) }
    })
    .await;
    let with_apps = rss_kib();
    let mut sessions = Vec::new();
    for i in 0..100 {
        let mut s = McpHttp::new(a.proxy_addr(), "m1", &tokens[i % tokens.len()]);
        s.initialize().await.expect("init");
        sessions.push(s);
    }
    let with_100 = rss_kib();
    for i in 100..1000 {
        let mut s = McpHttp::new(a.proxy_addr(), "m1", &tokens[i % tokens.len()]);
        s.initialize().await.expect("init");
        sessions.push(s);
    }
    let with_1000 = rss_kib();
    println!(
        "memory (RSS of the process running auth+proxy+agent; MCP processes are separate): baseline {base} KiB, cluster started {started} KiB, +1000 apps registered {with_apps} KiB (+{} KiB), +100 live sessions {with_100} KiB (+{} KiB, {:.1} KiB/session), 1000 idle sessions {with_1000} KiB ({:.1} KiB/session)",
        with_apps.saturating_sub(started),
        with_100.saturating_sub(with_apps),
        with_100.saturating_sub(with_apps) as f64 / 100.0,
        (with_1000.saturating_sub(with_apps)) as f64 / 1000.0
    );
    for s in &sessions {
        s.delete().await;
    }
}

/// The allocator the `portico` binary uses, so that Portico in this
/// process allocates as it does in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    // Portico runs in this process with an agent, as the all-in-one does:
    // the proxy forms get the workers `portico start` gives such a process.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(what.as_str(), "proxy" | "proxy-tls" | "proxy-plain") {
        builder.worker_threads(portico_agent::worker_threads(true).expect("worker threads"));
    }
    builder
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(what));
}

async fn run(what: String) {
    let all = what == "all";
    if all || what == "store" {
        store(Storage::Sqlite).await;
        store(Storage::Postgres).await;
    }
    if all || what == "registration" {
        registration(Storage::Sqlite).await;
        registration(Storage::Postgres).await;
    }
    if all || what == "proxy" {
        // Side by side, alternating, so that both see the same machine.
        let opts = ProxyOpts::parse(&[]);
        for _ in 0..2 {
            proxy_overhead(true, &opts).await;
            proxy_overhead(false, &opts).await;
        }
    }
    if what == "proxy-tls" || what == "proxy-plain" {
        let rest: Vec<String> = std::env::args().skip(2).collect();
        proxy_overhead(what == "proxy-tls", &ProxyOpts::parse(&rest)).await;
    }
    if all || what == "ls" {
        ls_scale().await;
    }
    if all || what == "memory" {
        memory().await;
    }
    // Not part of "all": these run for many minutes.
    if what == "soak" {
        // Numbers in order; `--h1` anywhere: clients speak HTTP/1.1.
        let h1 = std::env::args().any(|a| a == "--h1");
        let nums: Vec<String> = std::env::args()
            .skip(2)
            .filter(|a| !a.starts_with("--"))
            .collect();
        let minutes = nums
            .first()
            .and_then(|m| m.parse::<u64>().ok())
            .unwrap_or(30);
        let sessions = nums
            .get(1)
            .and_then(|m| m.parse::<usize>().ok())
            .unwrap_or(1000);
        let period = nums
            .get(2)
            .and_then(|m| m.parse::<f64>().ok())
            .filter(|p| *p >= 0.1)
            .unwrap_or(10.0);
        portico_tests::soak::run(minutes, sessions, Duration::from_secs_f64(period), h1).await;
    }
    if what == "churn" {
        let minutes = std::env::args()
            .nth(2)
            .and_then(|m| m.parse::<u64>().ok())
            .unwrap_or(10);
        portico_tests::scale::churn(minutes).await;
    }
    if what == "scale" {
        let rest: Vec<String> = std::env::args().skip(2).collect();
        portico_tests::scale::run(&rest).await;
    }
    // Not part of "all": it runs for minutes and kills processes.
    if what == "chaos" {
        let minutes = std::env::args()
            .nth(2)
            .and_then(|m| m.parse::<f64>().ok())
            .unwrap_or(10.0);
        portico_tests::chaos::run(minutes).await;
    }
}
