//! The README's first command as a newcomer meets it: `portico start` with
//! no config, then the next steps it prints, then a clean SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use portico_tests::cluster::{run, text};
use portico_tests::mcp_http::McpHttp;
use portico_tests::util::example;
use portico_tests::{TempDir, bin, eventually};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn quick_start_as_a_newcomer() {
    for port in [3080, 3024, 3025] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "the quick start needs port {port} free"
        );
    }
    let dir = TempDir::new("portico-quickstart");
    let home = dir.path().join("home");
    let mut child = tokio::process::Command::new(bin("portico"))
        .arg("start")
        .current_dir(dir.path())
        .env_remove("PORTICO_DATA_DIR")
        .env_remove("PORTICO_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("portico start");
    eventually(Duration::from_secs(30), "proxy healthy", || async {
        (portico_tests::web::probe("127.0.0.1:3080", "/readyz").await? == 200).then_some(())
    })
    .await;
    assert!(dir.path().join("portico-data/admin-identity.yaml").exists());

    let pctl = |args: Vec<String>, stdin: Option<&'static str>| {
        let mut cmd = tokio::process::Command::new(bin("pctl"));
        cmd.args(args)
            .current_dir(dir.path())
            .env_remove("PORTICO_DATA_DIR")
            .env("PORTICO_HOME", dir.path().join("admin-home"));
        run(cmd, stdin)
    };
    let o = pctl(
        vec![
            "users".into(),
            "add".into(),
            "alice".into(),
            "--roles=admin".into(),
        ],
        None,
    )
    .await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out} {err}");
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("password line")
        .to_string();
    // The proxy's certificate is self-signed: without a terminal to ask
    // on, psh refuses and shows the fingerprint to check.
    let web_cert = dir.path().join("portico-data/web-cert.pem");
    let der = portico_tls::pki::first_cert(&std::fs::read_to_string(&web_cert).expect("web cert"))
        .expect("pem");
    let fingerprint = portico_tls::pki::fingerprint(&der);
    let psh_login = |extra: Vec<String>| {
        let mut login = tokio::process::Command::new(bin("psh"));
        login
            .args([
                "login",
                "--proxy=127.0.0.1:3080",
                "--user=alice",
                "--password-stdin",
            ])
            .args(extra)
            .env("PORTICO_HOME", &home);
        run(
            login,
            Some(Box::leak(format!("{password}\n").into_boxed_str())),
        )
    };
    let o = psh_login(vec![]).await;
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(text(&o).1.contains(&fingerprint), "{:?}", text(&o));
    // A wrong fingerprint is refused; the right one, or the file, works.
    let o = psh_login(vec![format!("--fingerprint=SHA256:{}", "00".repeat(32))]).await;
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    let o = psh_login(vec![format!("--fingerprint={fingerprint}")]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let o = psh_login(vec![format!("--ca-file={}", web_cert.display())]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let seed = example("mcp_server.yaml");
    let o = pctl(vec!["create".into(), seed.display().to_string()], None).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let listed = eventually(
        Duration::from_secs(20),
        "psh mcp ls shows the seed",
        || async {
            let mut cmd = tokio::process::Command::new(bin("psh"));
            cmd.args(["mcp", "ls"]).env("PORTICO_HOME", &home);
            let out = text(&run(cmd, None).await).0;
            out.contains("everything").then_some(out)
        },
    )
    .await;
    assert!(
        listed.contains("The Everything MCP server") && listed.contains("env=dev"),
        "{listed}"
    );
    // The seed runs `docker` as host user `docker`; whatever this machine lacks is said plainly.
    let profile: serde_json::Value =
        yaml_serde::from_str(&std::fs::read_to_string(home.join("profile.yaml")).expect("profile"))
            .expect("yaml");
    portico_tests::web::register_file("127.0.0.1:3080".parse().expect("addr"), web_cert.clone());
    let mut s = McpHttp::new(
        "127.0.0.1:3080".parse().expect("addr"),
        "everything",
        profile["token"].as_str().expect("token"),
    );
    if let Err(e) = s.initialize().await {
        let body = String::from_utf8_lossy(&e.body).to_string();
        assert!(body.contains("docker"), "{body}");
    }
    // The proxy hands its audit events to the auth-service in its process;
    // they are stored under the proxy's own name, whatever happened.
    let audited = eventually(Duration::from_secs(10), "the session audited", || async {
        let args = ["events", "ls", "--format", "json"]
            .map(String::from)
            .to_vec();
        let o = pctl(args, None).await;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v.as_array()?
            .iter()
            .find(|e| {
                e["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("mcp.session"))
            })
            .cloned()
    })
    .await;
    assert_eq!(audited["actor"], "local-proxy", "{audited}");
    assert_eq!(audited["fields"]["actor"], "local-proxy", "{audited}");
    assert_eq!(audited["fields"]["user"], "alice", "{audited}");

    let pid = child.id().expect("pid");
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("status");
    assert!(status.success(), "{status}");
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        let _ = so.read_to_string(&mut out).await;
    }
    assert!(
        out.contains("pctl users add") && out.contains("psh login --proxy=127.0.0.1:3080"),
        "{out}"
    );
}

/// `portico check` refuses settings the grammar alone lets through, with
/// the same message a start would give.
#[tokio::test]
async fn portico_check_validates_durations_and_retention() {
    let dir = TempDir::new("portico-check");
    let check = async |body: &str| {
        let file = dir.path().join("portico.yaml");
        std::fs::write(&file, format!("version: v1\nauth_service:\n{body}")).expect("config");
        let mut cmd = tokio::process::Command::new(bin("portico"));
        cmd.arg("check").arg("--config").arg(&file);
        let o = run(cmd, None).await;
        (o.status.code(), text(&o))
    };
    let (code, (out, _)) =
        check("  event_retention: 5000\n  event_retention_age: 2h\n  audit_retention_age: 30d\n")
            .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("auth_service:  enabled"), "{out}");
    for (body, says) in [
        ("  event_retention_age: 10s\n", "event_retention_age"),
        ("  event_retention: 0\n", "event_retention"),
        ("  audit_retention_age: 30m\n", "audit_retention_age"),
        ("  session_ttl: soon\n", "session_ttl"),
        ("  identity_ttl: 1s\n", "identity_ttl"),
    ] {
        let (code, (_, err)) = check(body).await;
        assert_eq!(code, Some(1), "{body}: {err}");
        assert!(err.contains(says), "{body}: {err}");
    }
}
