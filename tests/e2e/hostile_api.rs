//! A hostile caller against the auth-service's gRPC API: password guesses
//! sent at once, forged audit events, refusals that must leave a trace with
//! the caller's address, watches that outlive their user's access, and
//! files on disk that others could read.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portico_proto::client::{AuthClient, connect, with_token};
use portico_proto::v1::{self, watch_event};
use portico_tests::{Cluster, ClusterBuilder, TempDir, bin, eventually};

const PW: &str = "user-password-1";

/// A client whose TCP connection comes from `local` (any 127.0.0.0/8
/// address is this host's loopback), so that tests can play a second source.
async fn client_from(c: &Cluster, local: [u8; 4], token: Option<&str>) -> AuthClient {
    let cfg =
        portico_tls::config::cluster_client(None, &c.auth.ca.cert_pem, &[b"h2"]).expect("tls");
    let connector = portico_tls::Connector::tls(cfg)
        .with_server_name(portico_tls::config::role_name(portico_tls::CertRole::Auth))
        .with_addr(c.auth_addr.to_string())
        .with_local_ip(IpAddr::from(local));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.auth_addr))
        .expect("endpoint")
        .connect_with_connector(connector)
        .await
        .expect("connect from a second loopback address");
    with_token(ch, token).expect("client")
}

fn app_request(name: &str) -> v1::CreateRequest {
    let app = portico_core::parse::parse_documents(
        "a",
        &format!("kind: app\nversion: v3\nmetadata: {{name: {name}}}\nspec: {{uri: 'mcp+http://x/mcp'}}\n"),
    )
    .expect("app");
    v1::CreateRequest {
        resources: app
            .iter()
            .map(|r| v1::Resource {
                kind: "app".into(),
                json: r.to_json(),
            })
            .collect(),
        overwrite: false,
    }
}

fn login_req(user: &str, password: &str) -> v1::LoginRequest {
    v1::LoginRequest {
        user: user.into(),
        password: password.into(),
    }
}

#[tokio::test]
async fn parallel_guesses_get_no_more_checks_than_the_limit() {
    let c = ClusterBuilder::new().start().await;
    c.add_user("vic", &["mcp-user"], PW).await;
    let limit = portico_auth::LOGIN_MAX_FAILURES as usize;
    let failed_before = c.auth.metrics.logins_failed.load(Ordering::Relaxed);
    let anon = connect(&c.auth_dial(), None).await.expect("connect");
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut a = anon.clone();
        guesses.spawn(async move {
            a.login(login_req("vic", &format!("wrong-guess-{i}")))
                .await
                .err()
                .map(|e| (e.code(), e.message().to_string()))
        });
    }
    let (mut checked, mut refused) = (0usize, 0usize);
    while let Some(r) = guesses.join_next().await {
        match r.expect("guess task") {
            Some((tonic::Code::Unauthenticated, _)) => checked += 1,
            Some((tonic::Code::ResourceExhausted, m)) => {
                assert!(m.contains("too many"), "{m}");
                refused += 1;
            }
            other => panic!("a wrong password got {other:?}"),
        }
    }
    assert_eq!(checked + refused, 20);
    assert!(
        (1..=limit).contains(&checked),
        "{checked} guesses were checked; at most {limit} may be"
    );
    let verified = c.auth.metrics.logins_failed.load(Ordering::Relaxed) - failed_before;
    assert!(
        verified <= limit as u64,
        "{verified} passwords were verified; at most {limit} may be"
    );

    // Locked from this address, even with the right password.
    let mut same = anon.clone();
    let e = same
        .login(login_req("vic", PW))
        .await
        .expect_err("locked from this source");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().contains("too many failed logins"),
        "{}",
        e.message()
    );

    // The lockout is per source: vic logs in from another address.
    let mut other = client_from(&c, [127, 0, 0, 2], None).await;
    let ok = other
        .login(login_req("vic", PW))
        .await
        .expect("another source is not locked out")
        .into_inner();
    assert_eq!(ok.user, "vic");

    // Every attempt is audited with where it came from.
    let logins = c.audit_events("user.login").await;
    let from = |src: &str, success: bool| {
        logins
            .iter()
            .filter(|(e, f)| e.actor == "vic" && e.success == success && f["source"] == src)
            .count()
    };
    assert_eq!(from("127.0.0.1", false), 21, "{logins:?}");
    assert_eq!(from("127.0.0.2", true), 1, "{logins:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn only_services_write_audit_events_and_under_their_own_name() {
    let c = ClusterBuilder::new().start().await;
    c.add_user("ulysses", &["admin"], PW).await;
    let forged = || v1::EmitEventsRequest {
        events: vec![v1::EmitEventRequest {
            r#type: "test.forged".into(),
            success: true,
            fields_json: r#"{"actor": "admin", "n": 1}"#.into(),
        }],
    };
    // A user, even one whose role allows everything, and the local admin.
    let mut user = c.client(&c.login("ulysses", PW).await).await;
    let mut admin = c.admin().await;
    for (who, api) in [("ulysses", &mut user), ("admin", &mut admin)] {
        let e = api.emit_events(forged()).await.expect_err("not a service");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{who}");
        assert!(e.message().contains("only services"), "{}", e.message());
    }
    assert!(c.audit_events("test.forged").await.is_empty());
    let denied = c.audit_events("api.denied").await;
    for who in ["ulysses", "admin"] {
        assert!(
            denied.iter().any(|(e, f)| e.actor == who
                && f["method"] == "emit_events"
                && f["source"] == "127.0.0.1"),
            "{who}: {denied:?}"
        );
    }

    // A proxy joins and writes: its own name is the actor, whatever it claims.
    let id = c.join_as("proxy", "px-test").await;
    let mut proxy = c.service_client(&id).await;
    proxy.emit_events(forged()).await.expect("a service writes");
    let e = proxy
        .emit_events(v1::EmitEventsRequest {
            events: vec![v1::EmitEventRequest {
                r#type: "test.forged".into(),
                success: true,
                fields_json: "[1, 2]".into(),
            }],
        })
        .await
        .expect_err("fields must be an object");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let stored = c.audit_events("test.forged").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (e, f) = &stored[0];
    assert_eq!(e.actor, "px-test");
    assert_eq!(
        f["actor"], "px-test",
        "the sender's own actor is overridden"
    );
    assert_eq!(f["n"], 1);
    c.shutdown().await;
}

#[tokio::test]
async fn refusals_are_audited_with_their_source() {
    let c = ClusterBuilder::new().start().await;
    c.add_user("joe", &["mcp-user"], PW).await;
    let token = c.login("joe", PW).await;
    let mut joe = client_from(&c, [127, 0, 0, 2], Some(token.as_str())).await;
    let e = joe
        .create(app_request("not-yours"))
        .await
        .expect_err("mcp-user may not create apps");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    let mut forged = c.client(&"f".repeat(64)).await;
    let e = forged
        .list(v1::ListRequest {
            kind: "app".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("forged token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let denied = c.audit_events("api.denied").await;
    let create = denied
        .iter()
        .find(|(e, f)| e.actor == "joe" && f["method"] == "create")
        .unwrap_or_else(|| panic!("no api.denied event for joe's create: {denied:?}"));
    assert!(!create.0.success);
    assert_eq!(create.1["source"], "127.0.0.2", "the TCP peer's address");
    assert_eq!(create.1["kind"], "app");
    assert_eq!(create.1["verb"], "create");
    assert_eq!(create.1["name"], "not-yours");
    assert_eq!(create.1["caller"], "joe");
    assert_eq!(create.1["code"], "permission_denied");
    assert!(
        create.1["error"]
            .as_str()
            .is_some_and(|m| m.contains("create on app")),
        "{:?}",
        create.1
    );
    let anon = denied
        .iter()
        .find(|(_, f)| f["method"] == "list" && f["code"] == "unauthenticated")
        .unwrap_or_else(|| panic!("no api.denied event for the forged token: {denied:?}"));
    assert_eq!(anon.1["source"], "127.0.0.1");
    assert!(anon.1["caller"].is_null());
    c.shutdown().await;
}

/// What a watch stream delivered and how it ended.
#[derive(Default)]
struct Watched {
    snapshot_done: bool,
    puts: Vec<String>,
    /// `Some(Ok(()))`: ended cleanly; `Some(Err(..))`: ended with this status.
    end: Option<Result<(), (tonic::Code, String)>>,
}

fn watch_apps(mut api: AuthClient) -> Arc<Mutex<Watched>> {
    let w = Arc::new(Mutex::new(Watched::default()));
    let out = w.clone();
    tokio::spawn(async move {
        let mut stream = match api
            .watch(v1::WatchRequest {
                kinds: vec!["app".into()],
                from_revision: 0,
                ..Default::default()
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) => {
                out.lock().expect("lock").end = Some(Err((e.code(), e.message().to_string())));
                return;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    let mut o = out.lock().expect("lock");
                    if ev.r#type == watch_event::Type::SnapshotEnd as i32 {
                        o.snapshot_done = true;
                    } else if ev.r#type == watch_event::Type::Put as i32 {
                        o.puts.push(ev.name);
                    }
                }
                Ok(None) => {
                    out.lock().expect("lock").end = Some(Ok(()));
                    return;
                }
                Err(e) => {
                    out.lock().expect("lock").end = Some(Err((e.code(), e.message().to_string())));
                    return;
                }
            }
        }
    });
    w
}

async fn snapshot_done(w: &Arc<Mutex<Watched>>, who: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("{who}'s snapshot"),
        || {
            let w = w.clone();
            async move {
                let w = w.lock().expect("lock");
                assert!(w.end.is_none(), "{who}'s watch ended early: {:?}", w.end);
                w.snapshot_done.then_some(())
            }
        },
    )
    .await;
}

async fn ended(w: &Arc<Mutex<Watched>>, who: &str) -> Result<(), (tonic::Code, String)> {
    eventually(
        Duration::from_secs(3),
        &format!("{who}'s watch to end"),
        || {
            let w = w.clone();
            async move { w.lock().expect("lock").end.clone() }
        },
    )
    .await
}

const WATCHER: &str = "kind: role\nversion: v8\nmetadata: {name: NAME}\nspec:\n  allow:\n    rules:\n    - resources: [app]\n      verbs: [list, read]\n";

#[tokio::test]
async fn watches_end_when_their_user_loses_access() {
    let c = ClusterBuilder::new().start().await;
    for role in ["watcher-a", "watcher-b"] {
        c.create_yaml(&WATCHER.replace("NAME", role), false)
            .await
            .expect("role");
    }
    c.add_user("wendy", &["watcher-a"], PW).await;
    c.add_user("rita", &["watcher-b"], PW).await;
    let wendy = watch_apps(c.client(&c.login("wendy", PW).await).await);
    let rita = watch_apps(c.client(&c.login("rita", PW).await).await);
    let admin = watch_apps(c.admin().await);
    for (who, w) in [("wendy", &wendy), ("rita", &rita), ("admin", &admin)] {
        snapshot_done(w, who).await;
    }

    // Deleting the user ends her watch.
    let t = Instant::now();
    c.admin()
        .await
        .delete(v1::DeleteRequest {
            kind: "user".into(),
            name: "wendy".into(),
        })
        .await
        .expect("delete wendy");
    let (code, msg) = ended(&wendy, "wendy")
        .await
        .expect_err("ends with an error");
    assert_eq!(code, tonic::Code::Unauthenticated, "{msg}");
    assert!(msg.contains("watch ended"), "{msg}");
    eprintln!("wendy's watch ended {:?} after her deletion", t.elapsed());

    // Narrowing the role to `list` alone ends the other watch.
    let narrowed = "kind: role\nversion: v8\nmetadata: {name: watcher-b}\nspec:\n  allow:\n    rules:\n    - resources: [app]\n      verbs: [list]\n";
    c.create_yaml(narrowed, true)
        .await
        .expect("narrow the role");
    let (code, msg) = ended(&rita, "rita").await.expect_err("ends with an error");
    assert_eq!(code, tonic::Code::PermissionDenied, "{msg}");
    assert!(msg.contains("read on app"), "{msg}");

    // Both endings are audited; the admin's watch goes on.
    let denied = c.audit_events("api.denied").await;
    for who in ["wendy", "rita"] {
        assert!(
            denied.iter().any(|(e, f)| e.actor == who
                && f["method"] == "watch"
                && f["source"] == "127.0.0.1"),
            "{who}: {denied:?}"
        );
    }
    c.create_yaml(
        "kind: app\nversion: v3\nmetadata: {name: after}\nspec: {uri: 'mcp+http://x/mcp'}\n",
        false,
    )
    .await
    .expect("app");
    eventually(
        Duration::from_secs(10),
        "the admin sees the new app",
        || {
            let w = admin.clone();
            async move {
                let w = w.lock().expect("lock");
                assert!(w.end.is_none(), "the admin's watch ended: {:?}", w.end);
                w.puts.iter().any(|n| n == "after").then_some(())
            }
        },
    )
    .await;
    c.shutdown().await;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn state_on_disk_is_owner_only() {
    // The harness's auth-service: SQLite in a directory it creates.
    let c = ClusterBuilder::new().start().await;
    let db = c.data_dir().join("db");
    assert_eq!(mode(&db), 0o700, "the SQLite directory");
    assert_eq!(mode(&db.join("portico.db")), 0o600, "the database");
    for f in ["portico.db-wal", "portico.db-shm"] {
        let p = db.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
    assert_eq!(mode(&c.admin_identity()), 0o600, "the admin identity");
    c.shutdown().await;

    // `portico start` creates its data directory (and missing parents) 0700.
    let base = TempDir::new("portico-modes");
    let data = base.path().join("state").join("data");
    let config = base.path().join("portico.yaml");
    std::fs::write(
        &config,
        "version: v1\nauth_service:\n  listen_addr: 127.0.0.1:0\n",
    )
    .expect("config");
    let mut child = tokio::process::Command::new(bin("portico"))
        .arg("start")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .env_remove("PORTICO_DATA_DIR")
        .env_remove("PORTICO_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("portico start");
    let identity = data.join(portico_core::identity::ADMIN_IDENTITY_FILE);
    eventually(
        Duration::from_secs(30),
        "the admin identity written",
        || {
            let p = identity.clone();
            async move { p.exists().then_some(()) }
        },
    )
    .await;
    assert_eq!(mode(&data), 0o700, "the data directory");
    assert_eq!(mode(&base.path().join("state")), 0o700, "its new parent");
    assert_eq!(mode(&data.join("portico.db")), 0o600, "the database");
    assert_eq!(mode(&identity), 0o600, "the admin identity");
    let _ = child.start_kill();
    let _ = child.wait().await;
}
