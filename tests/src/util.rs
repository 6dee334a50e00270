//! Small test utilities: temporary directories, locating binaries, and
//! waiting with retrying assertions instead of sleeps.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let n: u64 = rand::rng().random();
        let p = std::env::temp_dir().join(format!("{prefix}-{n:016x}"));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A binary of this workspace (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-xxxx -> target/debug
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run cargo build --workspace --bins first",
        p.display()
    );
    p
}

/// `portico start --config CONFIG --data-dir DATA` as its own process
/// (killed when dropped), its standard error going to `log`.
pub fn portico_start(
    config: &Path,
    data: &Path,
    log: std::process::Stdio,
) -> tokio::process::Child {
    tokio::process::Command::new(bin("portico"))
        .arg("start")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env_remove("PORTICO_DATA_DIR")
        .env_remove("PORTICO_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("portico start")
}

/// Retries `f` until it returns `Some` or `timeout` passes; panics with `what` then.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// The stdio MCP server written for these tests.
pub fn test_mcp_server() -> PathBuf {
    bin("portico-test-mcp")
}

/// A file of the repository's `examples/` folder (the seed's files, kept unchanged).
pub fn example(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    assert!(p.exists(), "{} is missing from examples/", p.display());
    p
}

/// The user the tests run as, for `run_as_host_user`.
pub fn me() -> String {
    portico_agent::spawn::current_user_name().expect("the current user has a name")
}

/// An app running the repository's test MCP server.
pub fn test_app_yaml(name: &str, env: &str) -> String {
    app_yaml_with_command(name, env, &test_mcp_server())
}

/// The app `test_app_yaml` describes, as the API takes it.
pub fn app_resource(name: &str, env: &str) -> portico_proto::v1::Resource {
    let r = portico_core::parse::parse_documents("t.yaml", &test_app_yaml(name, env))
        .expect("app")
        .remove(0);
    portico_proto::v1::Resource {
        kind: "app".into(),
        json: r.to_json(),
    }
}

pub fn app_yaml_with_command(name: &str, env: &str, command: &Path) -> String {
    format!(
        "kind: app\nversion: v3\nmetadata:\n  name: {name}\n  description: test server {name}\n  labels: {{env: {env}}}\nspec:\n  mcp:\n    command: {}\n    run_as_host_user: {}\n",
        command.display(),
        me()
    )
}

/// A copy of the test MCP server under a unique short name, so that a test
/// can count its own processes while other tests run beside it.
pub fn unique_test_server(dir: &Path) -> (PathBuf, String) {
    let n: u32 = rand::rng().random();
    let name = format!("ptm{n:08x}");
    let p = dir.join(&name);
    std::fs::copy(test_mcp_server(), &p).expect("copy the test server");
    (p, name)
}

/// Child processes of this process with the given command name (as /proc shows it).
pub fn children_named(comm: &str) -> Vec<(u32, char)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let (Some(state), Some(ppid)) = (rest.first(), rest.get(1)) else {
            continue;
        };
        if ppid.parse::<u32>().ok() == Some(me) && comm.starts_with(name) {
            out.push((pid, state.chars().next().unwrap_or('?')));
        }
    }
    out
}

/// A real agent process (`portico start`, its config and data in `dir`)
/// serving the apps whose labels match `labels` (a YAML flow map such as
/// `{"*": "*"}`), joining with `token` and dialling the proxy at `tunnel`.
pub fn agent_process(
    dir: &Path,
    auth: &str,
    tunnel: &str,
    token: &str,
    host_id: &str,
    labels: &str,
) -> tokio::process::Child {
    std::fs::create_dir_all(dir).expect("agent dir");
    let config = dir.join("portico.yaml");
    std::fs::write(
        &config,
        format!(
            "version: v1\ndata_dir: {}\napp_service:\n  auth_servers: [\"{auth}\"]\n  proxy_servers: [\"{tunnel}\"]\n  join_token: \"{token}\"\n  host_id: {host_id}\n  resources:\n  - labels: {labels}\n  mcp:\n    allowed_host_users: [{}]\n",
            dir.join("data").display(),
            me(),
        ),
    )
    .expect("agent config");
    tokio::process::Command::new(bin("portico"))
        .args(["start", "--config"])
        .arg(&config)
        .env_remove("PORTICO_DATA_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("agent process")
}

/// The names of every stored app; each must parse whole.
pub async fn app_names(
    api: &mut portico_proto::client::AuthClient,
) -> std::collections::BTreeSet<String> {
    api.list(portico_proto::v1::ListRequest {
        kind: "app".into(),
        ..Default::default()
    })
    .await
    .expect("list apps")
    .into_inner()
    .items
    .iter()
    .map(|r| {
        portico_core::Resource::from_json(portico_core::Kind::App, &r.json)
            .expect("every stored app is whole")
            .name()
            .to_string()
    })
    .collect()
}

/// The `p` quantile (0..=1) of `v`, which it sorts; NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resident memory of a process (`self` for this one), KiB.
pub fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A loopback port for a process that binds it itself (and binds it again
/// when restarted). It is taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), from which every outgoing connection
/// gets its port, and never twice in this process; one that something holds
/// now is skipped. (Binding port 0 and releasing it races every connection
/// opened meanwhile, which may be given that very port.)
pub fn fixed_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = if ephemeral_low > 12_000 {
        (10_000, ephemeral_low)
    } else {
        // An unusual range that starts low: take the ports above it instead.
        (61_000, 65_535)
    };
    let span = high - low;
    // Processes running at once (a runner beside the tests) start apart.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}
