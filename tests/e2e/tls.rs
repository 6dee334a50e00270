//! Transport security as an attacker meets it: plaintext on every listener,
//! certificates from another CA, expired ones, each role's certificate on
//! the other roles' APIs, a fake proxy at an agent's tunnel address, and
//! renewal with sessions open.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portico_proto::client::{Dial, connect};
use portico_proto::v1;
use portico_tests::cluster::JoinedService;
use portico_tests::mcp_http::McpHttp;
use portico_tests::util::test_app_yaml;
use portico_tests::{Cluster, ClusterBuilder, eventually};
use portico_tls::{Ca, CertRole, CertStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PW: &str = "user-password-1";

/// Sends a plaintext HTTP request and returns what comes back (at most 2 s).
async fn plaintext(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn plaintext_is_refused_on_every_listener() {
    let c = ClusterBuilder::new().proxy().start().await;
    let r = plaintext(c.auth_addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "auth: {r}");
    assert!(r.contains("TLS only"), "auth: {r}");
    let r = plaintext(c.tunnel_addr(), "PORTICO-TUNNEL/1 token\n").await;
    assert!(r.contains("TLS only"), "tunnel: {r}");
    assert!(!r.contains("OK"), "tunnel: {r}");
    // An API client (POST) is refused; a browser asking for a page is sent to https.
    let r = plaintext(
        c.proxy_addr(),
        "POST /mcp/tm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "web POST: {r}");
    assert!(r.contains("HTTPS only"), "web POST: {r}");
    let host = c.proxy_addr().to_string();
    let r = plaintext(
        c.proxy_addr(),
        &format!("GET /v1/apps HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 308"), "web GET: {r}");
    assert!(
        r.to_ascii_lowercase()
            .contains(&format!("location: https://{host}/v1/apps")),
        "web GET: {r}"
    );
    c.shutdown().await;
}

/// The cluster CA, able to sign (read from the backend, as only the
/// auth-service could).
async fn cluster_ca(c: &Cluster) -> Ca {
    let (cert, key) = c
        .auth
        .backend
        .cluster_ca()
        .await
        .expect("read")
        .expect("stored");
    Ca::from_pem(&cert, &key).expect("ca")
}

fn foreign_ca() -> Ca {
    let now = SystemTime::now();
    let (cert, key) =
        Ca::generate("impostor CA", now, now + Duration::from_secs(3600)).expect("ca");
    Ca::from_pem(&cert, &key).expect("ca")
}

/// Tries a TLS connection to `addr` as a service presenting `cert`.
async fn tunnel_with(
    c: &Cluster,
    addr: std::net::SocketAddr,
    cert: (String, String),
) -> Result<String, String> {
    let store = CertStore::new(&cert.0, &cert.1).map_err(|e| e.to_string())?;
    let cfg = portico_tls::config::cluster_client(
        Some(store),
        &c.auth.ca.cert_pem,
        &[portico_tls::ALPN_TUNNEL],
    )
    .map_err(|e| e.to_string())?;
    let io = portico_tls::Connector::tls(cfg)
        .with_server_name(portico_tls::config::role_name(CertRole::Proxy))
        .connect(&addr.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let mut s = io.into_tokio();
    s.write_all(b"PORTICO-TUNNEL/1 not-a-token\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).to_string())
}

#[tokio::test]
async fn foreign_expired_and_wrong_role_certificates_are_refused() {
    let c = ClusterBuilder::new().proxy().start().await;
    let ca = cluster_ca(&c).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    // The right kind of certificate from another CA: the TLS handshake fails.
    let forged = foreign_ca()
        .issue(CertRole::App, "a1", now - hour, now + hour)
        .expect("forged");
    let r = tunnel_with(&c, c.tunnel_addr(), forged.clone()).await;
    assert!(
        r.as_ref().map(|s| s.is_empty()).unwrap_or(true),
        "a foreign certificate got an answer: {r:?}"
    );

    // Our CA, but expired.
    let expired = ca
        .issue(CertRole::App, "a1", now - 2 * hour, now - hour)
        .expect("expired");
    let r = tunnel_with(&c, c.tunnel_addr(), expired).await;
    assert!(
        r.as_ref().map(|s| s.is_empty()).unwrap_or(true),
        "an expired certificate got an answer: {r:?}"
    );

    // Our CA, valid, but a proxy's: not let into the tunnel.
    let proxy_cert = ca
        .issue(CertRole::Proxy, "px", now - hour, now + hour)
        .expect("proxy cert");
    let r = tunnel_with(&c, c.tunnel_addr(), proxy_cert).await;
    assert!(
        r.as_ref().map(|s| !s.contains("OK")).unwrap_or(true),
        "a proxy certificate opened a tunnel: {r:?}"
    );

    // The auth API: a foreign client certificate fails the handshake.
    let store = CertStore::new(&forged.0, &forged.1).expect("store");
    let dial =
        Dial::cluster(&c.auth_addr.to_string(), &c.auth.ca.cert_pem, Some(store)).expect("dial");
    let r = connect(&dial, None).await;
    if let Ok(mut api) = r {
        api.get_cluster_ca(v1::GetClusterCaRequest {})
            .await
            .expect_err("a foreign certificate is not served");
    }

    // A client that does not trust the auth-service's CA does not connect.
    let other = foreign_ca();
    let dial = Dial::cluster(&c.auth_addr.to_string(), &other.cert_pem, None).expect("dial");
    assert!(
        connect(&dial, None).await.is_err(),
        "an unknown CA was trusted"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn each_role_only_with_its_own_certificate_and_apis() {
    let c = ClusterBuilder::new().start().await;
    let agent = c.join_as("app", "ag-1").await;
    let proxy = c.join_as("proxy", "px-1").await;

    // An agent, with its own certificate: no user or admin APIs.
    let mut a = c.service_client(&agent).await;
    let e = a
        .add_user(v1::AddUserRequest {
            name: "eve".into(),
            roles: vec!["admin".into()],
            password: PW.into(),
        })
        .await
        .expect_err("agents do not add users");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let app = portico_core::parse::parse_documents("a.yaml", &test_app_yaml("x", "dev"))
        .expect("yaml")
        .remove(0);
    let e = a
        .create(v1::CreateRequest {
            resources: vec![v1::Resource {
                kind: "app".into(),
                json: app.to_json(),
            }],
            overwrite: false,
        })
        .await
        .expect_err("agents do not create apps");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = a
        .list_identities(v1::ListIdentitiesRequest {})
        .await
        .expect_err("agents do not list identities");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // It announces app servers only under its own host id.
    a.heartbeat(v1::HeartbeatRequest {
        ttl_ms: 5_000,
        serve: vec![v1::ServedApp {
            app: "tm".into(),
            static_app_json: String::new(),
        }],
        ..Default::default()
    })
    .await
    .expect("its own heartbeat");
    let listed = c
        .admin()
        .await
        .list(v1::ListRequest {
            kind: "app_server".into(),
            labels: Default::default(),
        })
        .await
        .expect("list")
        .into_inner();
    assert!(
        !listed.items.is_empty() && listed.items.iter().all(|r| r.json.contains("ag-1")),
        "{:?}",
        listed.items
    );

    // A proxy, with its own certificate, cannot register app servers.
    let mut p = c.service_client(&proxy).await;
    let e = p
        .heartbeat(v1::HeartbeatRequest {
            ttl_ms: 5_000,
            serve: vec![v1::ServedApp {
                app: "tm".into(),
                static_app_json: String::new(),
            }],
            ..Default::default()
        })
        .await
        .expect_err("proxies do not announce app servers");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A proxy checks agents' identities in one call: a live agent's token
    // names its host; a proxy's own, or a made-up one, is refused.
    let checked = p
        .check_agents(v1::CheckAgentsRequest {
            tokens: vec![
                agent.resp.identity_token.clone(),
                proxy.resp.identity_token.clone(),
                "not-a-token".into(),
            ],
        })
        .await
        .expect("check agents")
        .into_inner()
        .agents;
    assert_eq!(checked[0].host_id, "ag-1", "{checked:?}");
    assert!(checked[0].refused.is_empty());
    assert!(
        checked[1].host_id.is_empty() && checked[1].refused.contains("not an app-service agent")
    );
    assert!(checked[2].host_id.is_empty() && !checked[2].refused.is_empty());
    // Agents (and users) may not ask.
    let e = a
        .check_agents(v1::CheckAgentsRequest {
            tokens: vec![agent.resp.identity_token.clone()],
        })
        .await
        .expect_err("agents do not check agents");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // A token with another service's certificate, or with none: refused.
    let swapped = JoinedService {
        resp: v1::JoinResponse {
            identity_token: agent.resp.identity_token.clone(),
            ..proxy.resp.clone()
        },
        key_pem: proxy.key_pem.clone(),
    };
    // (WhoAmI is the one call a proxy makes with an agent's token, to check
    // the identity an agent presented in its tunnel handshake.)
    let mut mixed = c.service_client(&swapped).await;
    let e = mixed
        .list(v1::ListRequest {
            kind: "app".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("an agent's token over a proxy's certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut bare = c.client(&agent.resp.identity_token).await;
    let e = bare
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect_err("a service token without its certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("mutual TLS"), "{}", e.message());
    c.shutdown().await;
}

#[tokio::test]
async fn a_fake_proxy_receives_no_identity() {
    let c = ClusterBuilder::new().start().await;
    // A listener that records whatever an agent sends it.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // And one that speaks TLS with a certificate from another CA.
    let impostor = foreign_ca();
    let now = SystemTime::now();
    let (cert, key) = impostor
        .issue(
            CertRole::Proxy,
            "fake",
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .expect("cert");
    let store = CertStore::new(&format!("{cert}{}", impostor.cert_pem), &key).expect("store");
    let tls_cfg = portico_tls::config::cluster_server(
        store,
        &impostor.cert_pem,
        portico_tls::ClientAuth::Optional,
        &[portico_tls::ALPN_TUNNEL],
    )
    .expect("server config");
    let tls = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let received = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let seen_plain = received.clone();
    let plain_addr = plain.local_addr().expect("addr");
    let plain_dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tls_dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dialled = plain_dials.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = plain.accept().await {
            dialled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let seen = seen_plain.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    seen.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let seen_tls = received.clone();
    let tls_addr = tls.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handshakes = accepted.clone();
    let dialled = tls_dials.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = tls.accept().await {
            dialled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let cfg = tls_cfg.clone();
            let seen = seen_tls.clone();
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                if let Ok(mut conn) =
                    portico_tls::net::accept(s, cfg, portico_tls::Plaintext::Refuse("x")).await
                {
                    handshakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut buf = [0u8; 4096];
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        seen.lock().expect("lock").extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
    });
    let mut c = c;
    let cfg = portico_agent::AgentConfig {
        proxy_servers: vec![plain_addr.to_string(), tls_addr.to_string()],
        resources: vec![],
        ..Default::default()
    };
    c.start_agent("victim", cfg).await;
    // Let it dial both a few times.
    eventually(
        Duration::from_secs(30),
        "the agent dialled both twice",
        || {
            let (p, t) = (plain_dials.clone(), tls_dials.clone());
            async move {
                (p.load(std::sync::atomic::Ordering::SeqCst) >= 2
                    && t.load(std::sync::atomic::Ordering::SeqCst) >= 2)
                    .then_some(())
            }
        },
    )
    .await;
    let token = {
        let text = std::fs::read_to_string(c.data_dir().join("agent-victim/agent-identity.yaml"))
            .expect("identity");
        let id: portico_core::identity::IdentityFile = yaml_serde::from_str(&text).expect("yaml");
        id.token
    };
    let got = received.lock().expect("lock").clone();
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains(&token),
        "the agent's token reached a fake proxy"
    );
    assert!(
        !text.contains("PORTICO-TUNNEL"),
        "a handshake reached a fake proxy"
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the agent completed TLS with a proxy of another CA"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn renewal_keeps_sessions_open() {
    let c = ClusterBuilder::new()
        .identity_ttl("6s")
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    c.wait_servers("tm", &["a1"]).await;
    c.add_user("rita", &["mcp-user"], PW).await;
    let token = c.login("rita", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &token);
    s.initialize().await.expect("session");
    let first = s.call("echo", json!({"message": "before"})).await;
    assert_eq!(first["result"]["content"][0]["text"], "before", "{first}");
    let sid = s.session.clone().expect("session id");
    // Three lifetimes: every identity is renewed at least twice.
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while tokio::time::Instant::now() < until {
        let r = s
            .call("echo", json!({"message": format!("call {n}")}))
            .await;
        assert_eq!(
            r["result"]["content"][0]["text"],
            format!("call {n}"),
            "call {n}: {r}"
        );
        assert_eq!(s.session.as_deref(), Some(sid.as_str()));
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let proxy = c.proxy.as_ref().expect("proxy").state.clone();
    assert!(proxy.tunnels.is_connected("a1"));
    // Both services renewed, and their identities still live.
    eventually(Duration::from_secs(5), "renewals audited", || async {
        let events = c
            .admin()
            .await
            .list_events(v1::ListEventsRequest {
                r#type: "identity.renew".into(),
                since_ms: 0,
                limit: 0,
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .events;
        let agent = events.iter().filter(|e| e.actor == "a1").count();
        let prx = events.iter().filter(|e| e.actor != "a1").count();
        (agent >= 2 && prx >= 2).then_some(())
    })
    .await;
    // The admin identity was rewritten and still works.
    c.admin()
        .await
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect("admin identity renewed");
    c.shutdown().await;
}

#[tokio::test]
async fn joins_racing_for_one_host_id_have_one_winner() {
    let c = ClusterBuilder::new().start().await;
    let join = |token: String, host: String| {
        let dial = c.auth_dial();
        async move {
            let key = portico_tls::pki::new_key().expect("key");
            connect(&dial, None)
                .await
                .expect("connect")
                .join(v1::JoinRequest {
                    token,
                    host_id: host,
                    role: "app".into(),
                    csr_pem: portico_tls::pki::signing_request(&key).expect("csr"),
                })
                .await
        }
    };
    for round in 0..5 {
        let host = format!("race-{round}");
        let (t1, t2) = (c.join_token("app").await, c.join_token("app").await);
        let (a, b) = tokio::join!(
            join(t1.clone(), host.clone()),
            join(t2.clone(), host.clone())
        );
        assert_eq!(
            [a.is_ok(), b.is_ok()].iter().filter(|w| **w).count(),
            1,
            "round {round}: {a:?} {b:?}"
        );
        let (lost, spare) = if a.is_err() { (a, t1) } else { (b, t2) };
        let e = lost.expect_err("one loses");
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
        // The loser's token was not used up: it joins under another host id.
        join(spare, format!("{host}-b"))
            .await
            .expect("the losing token is still good");
    }
    c.shutdown().await;
}

/// The SHA-256 fingerprint of the certificate the server at `addr` presents.
async fn presented(addr: std::net::SocketAddr) -> String {
    let cfg = portico_tls::config::client_for(&portico_tls::Trust::Insecure, &[b"http/1.1"])
        .expect("config");
    let io = portico_tls::Connector::tls(cfg)
        .connect(&addr.to_string())
        .await
        .expect("connect");
    let chain = io.peer_certificates().expect("certificates");
    portico_tls::pki::fingerprint(&chain[0])
}

#[tokio::test]
async fn operator_certificates_are_served_and_reloaded() {
    let c = ClusterBuilder::new().start().await;
    let dir = c.data_dir().join("operator-certs");
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    let write = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let (cert, key) =
            portico_tls::pki::self_signed_web(&names, Duration::from_secs(3600)).expect("cert");
        // Key first, then certificate: a reload never pairs a new
        // certificate with an old key for long.
        std::fs::write(&key_file, &key).expect("key");
        std::fs::write(&cert_file, &cert).expect("cert");
        portico_tls::pki::fingerprint(&portico_tls::pki::first_cert(&cert).expect("der"))
    };
    let first = write(&["localhost", "127.0.0.1"]);
    let cfg = portico_proxy::ProxyConfig {
        auth_servers: vec![c.auth_addr.to_string()],
        join_token: Some(c.join_token("proxy").await),
        https_keypairs: vec![portico_proxy::KeyPairFiles {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }],
        ..Default::default()
    };
    let listeners = portico_tests::cluster::loopback_listeners().await;
    let p = portico_proxy::start(
        &cfg,
        portico_proxy::Credentials::join(c.data_dir().join("op-proxy")),
        listeners,
    )
    .await
    .expect("proxy");
    assert_eq!(p.web_fingerprint.as_deref(), Some(first.as_str()));
    assert!(
        p.web_cert_file.is_none(),
        "no self-signed certificate was made"
    );
    assert_eq!(presented(p.web_addr).await, first);
    // The operator replaces the files: new connections get the new one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = write(&["localhost", "127.0.0.1"]);
    assert_ne!(first, second);
    let addr = p.web_addr;
    eventually(
        Duration::from_secs(10),
        "the new certificate served",
        || {
            let want = second.clone();
            async move { (presented(addr).await == want).then_some(()) }
        },
    )
    .await;
    // A broken replacement keeps the one in use.
    std::fs::write(&cert_file, "not a certificate").expect("break");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(presented(p.web_addr).await, second);
    p.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn psh_asks_once_on_a_terminal_and_remembers() {
    let c = ClusterBuilder::new().proxy().start().await;
    c.add_user("tina", &["mcp-user"], PW).await;
    let home = c.data_dir().join("home-tina");
    let addr = c.proxy_addr();
    let fingerprint = presented(addr).await;
    // `script` gives psh a terminal, as a person at a shell has.
    let line = format!(
        "{} login --proxy={addr} --user=tina",
        portico_tests::bin("psh").display()
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("PORTICO_HOME", &home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("script runs");
    let mut stdin = child.stdin.take().expect("stdin");
    // Answer each prompt once it is on the terminal.
    let screen = Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = {
        let screen = screen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                screen
                    .lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let shows = |what: &'static str| {
        let screen = screen.clone();
        eventually(Duration::from_secs(30), what, move || {
            let screen = screen.clone();
            async move { screen.lock().expect("lock").contains(what).then_some(()) }
        })
    };
    shows("Trust this proxy from now on?").await;
    stdin.write_all(b"y\n").await.expect("answer");
    shows("password for tina").await;
    stdin
        .write_all(format!("{PW}\n").as_bytes())
        .await
        .expect("password");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("psh finished")
        .expect("output");
    let _ = reader.await;
    let shown = screen.lock().expect("lock").clone();
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&fingerprint),
        "the fingerprint was shown: {shown}"
    );
    assert!(shown.contains("logged in as tina"), "{shown}");
    // Remembered: later commands trust the same certificate, and only it.
    let profile = std::fs::read_to_string(home.join("profile.yaml")).expect("profile");
    assert!(profile.contains("fingerprint:"), "{profile}");
    let mut cmd = tokio::process::Command::new(portico_tests::bin("psh"));
    cmd.args(["status"]).env("PORTICO_HOME", &home);
    let o = portico_tests::cluster::run(cmd, None).await;
    assert!(o.status.success(), "{:?}", portico_tests::cluster::text(&o));
    c.shutdown().await;
}

/// Over TLS the proxy's HTTP/2 asks clients to keep no HPACK dynamic table
/// for what they send (SETTINGS_HEADER_TABLE_SIZE 0): h2 would keep slices
/// of each connection's first header buffer for the connection's life. A
/// real HTTP/2 client then makes many requests on one connection, all
/// answered.
#[tokio::test]
async fn http2_clients_are_asked_for_no_header_table() {
    let c = ClusterBuilder::new().proxy().start().await;
    let mut s = portico_tests::web::stream_alpn(c.proxy_addr(), &[b"h2"]).await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    // The server's first frame is its SETTINGS.
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("settings in time")
        .expect("settings");
    assert_eq!(head[3], 4, "a SETTINGS frame first: {head:?}");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("settings payload");
    let table: Vec<u32> = payload
        .chunks(6)
        .filter(|e| e.len() == 6 && u16::from_be_bytes([e[0], e[1]]) == 1)
        .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
        .collect();
    assert_eq!(table, vec![0], "SETTINGS_HEADER_TABLE_SIZE in {payload:?}");
    drop(s);

    let io = hyper_util::rt::TokioIo::new(
        portico_tests::web::stream_alpn(c.proxy_addr(), &[b"h2"]).await,
    );
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for i in 0..200 {
        let req = http::Request::get(format!("https://{}/healthz", c.proxy_addr()))
            .header("authorization", format!("Bearer {:064x}", 0))
            .header("x-request", i.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("answered");
        assert_eq!(resp.status(), 200, "request {i}");
    }
    c.shutdown().await;
}
