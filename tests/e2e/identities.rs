//! Service identities: listed with `pctl identities ls`, bound to their host
//! id while they live, and revoked with `pctl identities rm`, which closes
//! the agent's tunnels and keeps it out.

use std::time::Duration;

use portico_proto::client::connect;
use portico_proto::v1;
use portico_tests::cluster::text;
use portico_tests::mcp_http::McpHttp;
use portico_tests::util::test_app_yaml;
use portico_tests::{ClusterBuilder, eventually};
use serde_json::{Value, json};

fn join(token: &str, host_id: &str) -> v1::JoinRequest {
    v1::JoinRequest {
        token: token.into(),
        host_id: host_id.into(),
        role: "app".into(),
        csr_pem: portico_tls::pki::signing_request(&portico_tls::pki::new_key().expect("key"))
            .expect("csr"),
    }
}

#[tokio::test]
async fn identities_are_listed_bound_to_their_host_and_revocable() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["a1"]).await;

    // Listed, with the role it joined as and when it was last seen.
    eventually(Duration::from_secs(10), "a1 listed and seen", || async {
        let o = c.pctl(&["identities", "ls", "--format", "json"]).await;
        let v: Value = serde_json::from_str(&text(&o).0).ok()?;
        v.as_array()?
            .iter()
            .any(|i| i["host_id"] == "a1" && i["roles"][0] == "app" && i["last_seen"].is_string())
            .then_some(())
    })
    .await;
    let o = c.pctl(&["identities", "ls"]).await;
    assert!(text(&o).0.contains("Last seen"), "{:?}", text(&o));

    // A join token cannot take over a live host id, and is not used up trying.
    let token = c.join_token("app").await;
    let mut anon = connect(&c.auth_dial(), None).await.expect("connect");
    let e = anon
        .join(join(&token, "a1"))
        .await
        .expect_err("a1 is taken");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(
        e.message().contains("pctl identities rm a1"),
        "{}",
        e.message()
    );

    // A session with a1, which runs in the proxy's process: opened by
    // calling the agent directly, not over the tunnel's HTTP/2.
    let proxy = c.proxy.as_ref().expect("proxy").state.clone();
    c.add_user("ivy", &["admin"], "ivy-password-1").await;
    let ivy = c.login("ivy", "ivy-password-1").await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &ivy);
    s.initialize().await.expect("session");
    let r = s.call("echo", json!({"message": "before"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "before", "{r}");
    let in_process = || {
        proxy
            .metrics
            .sessions_in_process
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(in_process(), 1, "opened in-process");
    let sid = s.session.clone().expect("sid");

    // Revoked: its tunnel closes, it cannot come back, and it is no longer
    // listed; the session opened in-process ends with the tunnel.
    assert!(proxy.tunnels.is_connected("a1"));
    let o = c.pctl(&["identities", "rm", "a1"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    eventually(Duration::from_secs(3), "a1's tunnel closed", || {
        let p = proxy.clone();
        async move { (!p.tunnels.is_connected("a1")).then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(3), "its session ended", || {
        let p = proxy.clone();
        let sid = sid.clone();
        async move { p.sessions.get(&sid).is_none().then_some(()) }
    })
    .await;
    let r = s
        .post(&json!({"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": "after"}}}))
        .await;
    assert_eq!(r.status, http::StatusCode::NOT_FOUND, "{r:?}");
    // The agent keeps dialling; none of its attempts gets through.
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < Duration::from_millis(1500) {
        assert!(
            !proxy.tunnels.is_connected("a1"),
            "a revoked agent reconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let o = c.pctl(&["identities", "ls", "--format", "json"]).await;
    assert!(!text(&o).0.contains("\"a1\""), "{:?}", text(&o));
    let o = c.pctl(&["identities", "rm", "a1"]).await;
    assert!(!o.status.success(), "revoking twice: {:?}", text(&o));

    // The host id is free again: the same, unused token joins under it.
    anon.join(join(&token, "a1"))
        .await
        .expect("a1 joins again after revocation");
    let o = c
        .pctl(&[
            "events",
            "ls",
            "--type",
            "identity.revoke",
            "--format",
            "json",
        ])
        .await;
    assert!(text(&o).0.contains("\"a1\""), "{:?}", text(&o));
    c.shutdown().await;
}

/// What `openssl x509 -text` says of a PEM certificate.
fn x509_text(pem: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(pem.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("openssl ran");
    assert!(out.status.success(), "not a certificate: {pem}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_cluster_ca_is_made_once_kept_and_exported() {
    let mut c = ClusterBuilder::new().start().await;
    let o = c.pctl(&["ca", "export"]).await;
    let pem = text(&o).0;
    assert!(
        o.status.success() && pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{pem}"
    );
    assert!(!pem.contains("PRIVATE KEY"), "the key is never sent");
    let t = x509_text(&pem);
    assert!(
        t.contains("CA:TRUE") && t.contains("Portico cluster CA") && t.contains("prime256v1"),
        "{t}"
    );
    // The same CA after a restart.
    c.stop_auth().await;
    c.start_auth_again().await;
    let o = c.pctl(&["ca", "export"]).await;
    assert_eq!(text(&o).0, pem, "the CA survives a restart");
    c.shutdown().await;

    // Several instances starting together on one Postgres agree on one CA.
    let db = portico_tests::pg::PgDb::create().await;
    let dir = portico_tests::TempDir::new("portico-ca");
    let cfg = portico_auth::AuthConfig {
        storage: portico_auth::StorageConfig::Postgres {
            conn_string: db.url.clone(),
        },
        ..Default::default()
    };
    let (a, b) = tokio::join!(
        portico_auth::AuthServer::open(&cfg, dir.path()),
        portico_auth::AuthServer::open(&cfg, dir.path())
    );
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(a.ca.cert_pem, b.ca.cert_pem, "one CA for the cluster");
    a.shutdown();
    b.shutdown();
}
