//! The change feed: snapshot then every event exactly once and in order,
//! across two auth-service instances on one Postgres with concurrent
//! writers; resuming, compaction, TTL expiry; Postgres going away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portico_auth::{AuthConfig, AuthServer, StorageConfig};
use portico_proto::client::{AuthClient, connect};
use portico_proto::v1::{self, watch_event};
use portico_tests::pg::PgDb;
use portico_tests::{ClusterBuilder, Storage, eventually};
use tokio::net::TcpListener;

fn app_req(name: &str) -> v1::CreateRequest {
    create_app(&format!("{{name: {name}}}"), false)
}

/// A create (or, with `overwrite`, a put) of one app whose metadata is `meta`.
fn create_app(meta: &str, overwrite: bool) -> v1::CreateRequest {
    let app = portico_core::parse::parse_documents(
        "w",
        &format!("kind: app\nversion: v3\nmetadata: {meta}\nspec: {{uri: 'mcp+http://x/mcp'}}\n"),
    )
    .expect("app");
    v1::CreateRequest {
        resources: vec![v1::Resource {
            kind: "app".into(),
            json: app[0].to_json(),
        }],
        overwrite,
    }
}

/// Collects (type, revision) of every event a watch delivers.
fn collect(mut api: AuthClient, from: i64) -> Arc<Mutex<Vec<(i32, i64)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        let mut stream = api
            .watch(v1::WatchRequest {
                kinds: vec![],
                from_revision: from,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        while let Ok(Some(ev)) = stream.message().await {
            s.lock().expect("lock").push((ev.r#type, ev.revision));
        }
    });
    seen
}

fn after_snapshot(events: &[(i32, i64)]) -> Option<(i64, Vec<i64>)> {
    let i = events
        .iter()
        .position(|(t, _)| *t == watch_event::Type::SnapshotEnd as i32)?;
    Some((
        events[i].1,
        events[i + 1..].iter().map(|(_, r)| *r).collect(),
    ))
}

#[tokio::test]
async fn ordered_exactly_once_across_two_instances() {
    let c = ClusterBuilder::new()
        .storage(Storage::Postgres)
        .start()
        .await;
    // A second auth-service instance on the same database.
    let second = AuthServer::open(&c.auth_cfg, &c.data_dir())
        .await
        .expect("second instance");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr_b = l.local_addr().expect("addr").to_string();
    let s2 = second.clone();
    tokio::spawn(async move { portico_auth::serve(s2, l, std::future::pending()).await });
    let admin_token = c.admin_token();
    let a = c.admin().await;
    let b = eventually(Duration::from_secs(10), "second instance answers", || {
        let addr = addr_b.clone();
        let t = admin_token.clone();
        let dial =
            portico_proto::client::Dial::cluster(&addr, &c.auth.ca.cert_pem, None).expect("dial");
        async move { connect(&dial, Some(&t)).await.ok() }
    })
    .await;
    let seen_a = collect(a.clone(), 0);
    let seen_b = collect(b.clone(), 0);
    eventually(Duration::from_secs(10), "both snapshots", || {
        let (x, y) = (seen_a.clone(), seen_b.clone());
        async move {
            (after_snapshot(&x.lock().expect("lock")).is_some()
                && after_snapshot(&y.lock().expect("lock")).is_some())
            .then_some(())
        }
    })
    .await;

    let mut writers = Vec::new();
    for w in 0..6 {
        let mut api = if w % 2 == 0 { a.clone() } else { b.clone() };
        writers.push(tokio::spawn(async move {
            for j in 0..40 {
                let name = format!("w{w}-{j}");
                api.create(app_req(&name)).await.expect("create");
                if j % 3 == 0 {
                    api.delete(v1::DeleteRequest {
                        kind: "app".into(),
                        name,
                    })
                    .await
                    .expect("delete");
                }
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let last = c.auth.backend.current_revision().await.expect("revision");
    for (name, seen) in [("instance a", &seen_a), ("instance b", &seen_b)] {
        eventually(
            Duration::from_secs(20),
            &format!("{name} sees revision {last}"),
            || {
                let s = seen.clone();
                async move {
                    s.lock()
                        .expect("lock")
                        .last()
                        .filter(|(_, r)| *r >= last)
                        .map(|_| ())
                }
            },
        )
        .await;
        let events = seen.lock().expect("lock").clone();
        let (snap, revs) = after_snapshot(&events).expect("snapshot");
        let want: Vec<i64> = (snap + 1..=last).collect();
        assert_eq!(revs, want, "{name}: every revision once, in order");
        assert_eq!(revs.len(), 240 + 14 * 6, "{name}: creates plus deletes");
    }
    second.shutdown();
    c.shutdown().await;
}

#[tokio::test]
async fn resume_compaction_and_expiry() {
    let c = ClusterBuilder::new().start().await;
    let mut admin = c.admin().await;
    admin.create(app_req("one")).await.expect("create");
    let r1 = c.auth.backend.current_revision().await.expect("rev");
    admin.create(app_req("two")).await.expect("create");
    admin.create(app_req("three")).await.expect("create");
    let seen = collect(admin.clone(), r1);
    eventually(Duration::from_secs(10), "resumed events", || {
        let s = seen.clone();
        async move { (s.lock().expect("lock").len() == 2).then_some(()) }
    })
    .await;
    assert_eq!(
        seen.lock()
            .expect("lock")
            .iter()
            .map(|(_, r)| *r)
            .collect::<Vec<_>>(),
        vec![r1 + 1, r1 + 2]
    );

    c.auth.backend.compact(1, 0).await.expect("compact");
    let mut stream = admin
        .watch(v1::WatchRequest {
            kinds: vec!["app".into()],
            from_revision: r1,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let e = stream.message().await.expect_err("too old");
    assert_eq!(e.code(), tonic::Code::OutOfRange);
    assert!(e.message().contains("re-sync"), "{}", e.message());

    // A lease with a short TTL that is not renewed ends in a delete event.
    let id = c.join_as("app", "h1").await;
    let mut agent = c.service_client(&id).await;
    let events: Arc<Mutex<HashMap<String, Vec<i32>>>> = Arc::default();
    let ev2 = events.clone();
    let mut w = admin.clone();
    tokio::spawn(async move {
        let mut s = w
            .watch(v1::WatchRequest {
                kinds: vec!["app_server".into()],
                from_revision: 0,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        while let Ok(Some(ev)) = s.message().await {
            ev2.lock()
                .expect("lock")
                .entry(ev.name.clone())
                .or_default()
                .push(ev.r#type);
        }
    });
    agent
        .heartbeat(v1::HeartbeatRequest {
            ttl_ms: 1000,
            serve: vec![v1::ServedApp {
                app: "one".into(),
                static_app_json: String::new(),
            }],
            ..Default::default()
        })
        .await
        .expect("heartbeat");
    eventually(
        Duration::from_secs(10),
        "put then delete of the app server",
        || {
            let e = events.clone();
            async move {
                let types = e
                    .lock()
                    .expect("lock")
                    .get("one.h1")
                    .cloned()
                    .unwrap_or_default();
                (types
                    == vec![
                        watch_event::Type::Put as i32,
                        watch_event::Type::Delete as i32,
                    ])
                .then_some(())
            }
        },
    )
    .await;
    c.shutdown().await;
}

/// A TCP relay to Postgres that the test can cut and restore.
struct Relay {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    fn reserve() -> std::net::SocketAddr {
        ([127, 0, 0, 1], portico_tests::util::fixed_port()).into()
    }

    async fn start(addr: std::net::SocketAddr) -> Relay {
        let listener = eventually(Duration::from_secs(10), "relay port", || async move {
            TcpListener::bind(addr).await.ok()
        })
        .await;
        let upstream = portico_tests::pg::admin_url();
        let host = upstream
            .split('@')
            .nth(1)
            .unwrap_or("127.0.0.1:5432")
            .split('/')
            .next()
            .unwrap_or("127.0.0.1:5432")
            .to_string();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let host = host.clone();
                conns.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&host).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Relay { task: Some(task) }
    }

    /// Closes the listener and every relayed connection.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[tokio::test]
async fn postgres_down_at_start_and_mid_request() {
    let db = PgDb::create().await;
    let addr = Relay::reserve();
    let cfg = AuthConfig {
        storage: StorageConfig::Postgres {
            conn_string: db.url_via(&addr.to_string()),
        },
        ..AuthConfig::default()
    };
    let dir = portico_tests::TempDir::new("portico-pgdown");
    let d = dir.path().to_path_buf();
    let c2 = cfg.clone();
    let opening = tokio::spawn(async move { AuthServer::open(&c2, &d).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !opening.is_finished(),
        "the auth-service must keep retrying while postgres is down"
    );
    let mut relay = Relay::start(addr).await;
    let server = tokio::time::timeout(Duration::from_secs(30), opening)
        .await
        .expect("opens once postgres is back")
        .expect("task")
        .expect("open");

    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let auth_addr = l.local_addr().expect("addr").to_string();
    server
        .ensure_admin_identity(dir.path(), &auth_addr)
        .await
        .expect("identity");
    let token = {
        let text =
            std::fs::read_to_string(dir.path().join("admin-identity.yaml")).expect("identity");
        yaml_serde::from_str::<portico_core::identity::IdentityFile>(&text)
            .expect("parses")
            .token
    };
    let s = server.clone();
    tokio::spawn(async move { portico_auth::serve(s, l, std::future::pending()).await });
    let dial =
        portico_proto::client::Dial::cluster(&auth_addr, &server.ca.cert_pem, None).expect("dial");
    let mut api = connect(&dial, Some(&token)).await.expect("connect");
    api.create(app_req("before"))
        .await
        .expect("works with postgres up");

    relay.cut();
    let e = api
        .create(app_req("during"))
        .await
        .expect_err("postgres is gone");
    assert!(
        matches!(e.code(), tonic::Code::Unavailable),
        "{:?}: {}",
        e.code(),
        e.message()
    );
    assert!(e.message().contains("database"), "{}", e.message());

    let _relay = Relay::start(addr).await;
    eventually(Duration::from_secs(30), "requests succeed again", || {
        let mut a = api.clone();
        async move { a.create(app_req("after")).await.ok() }
    })
    .await;
    let names: Vec<String> = api
        .list(v1::ListRequest {
            kind: "app".into(),
            labels: Default::default(),
        })
        .await
        .expect("list")
        .into_inner()
        .items
        .into_iter()
        .map(|i| {
            serde_json::from_str::<serde_json::Value>(&i.json).expect("json")["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(names, vec!["after".to_string(), "before".to_string()]);
    server.shutdown();
}

fn labeled_app(name: &str, env: &str) -> v1::CreateRequest {
    create_app(&format!("{{name: {name}, labels: {{env: {env}}}}}"), true)
}

fn selector(key: &str, value: &str) -> v1::AppSelector {
    v1::AppSelector {
        labels: [(key.to_string(), value.to_string())].into_iter().collect(),
    }
}

/// Reads events until one names `last` (or the snapshot ends, when
/// `last` is empty): (type, name) of each. After the snapshot (which is
/// in name order) revisions must rise.
async fn read_until(
    s: &mut tonic::Streaming<v1::WatchEvent>,
    last: &str,
) -> Vec<(watch_event::Type, String)> {
    let mut seen = Vec::new();
    let mut rev = 0;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap_or_else(|_| panic!("no event naming {last:?} within 10 s; saw {seen:?}"))
            .expect("stream")
            .expect("an event");
        let t = watch_event::Type::try_from(ev.r#type).expect("type");
        if t == watch_event::Type::SnapshotEnd {
            assert!(last.is_empty(), "the snapshot ended early; saw {seen:?}");
            return seen;
        }
        if !last.is_empty() {
            assert!(
                ev.revision > rev,
                "revisions go up: {} after {rev}",
                ev.revision
            );
            rev = ev.revision;
        }
        let done = ev.name == last;
        seen.push((t, ev.name));
        if done {
            return seen;
        }
    }
}

/// A watch that names app selectors (as an agent's does) hears of the
/// apps they match and, once more, of an app it heard of that stops
/// matching or is deleted; of nothing else. A watch selecting `*: *`
/// hears of every change.
#[tokio::test]
async fn app_selectors_narrow_a_watch_to_the_apps_it_concerns() {
    use watch_event::Type::{Delete, Put};
    let c = ClusterBuilder::new().start().await;
    let mut admin = c.admin().await;
    admin
        .create(labeled_app("p1", "prod"))
        .await
        .expect("create");
    admin
        .create(labeled_app("d1", "dev"))
        .await
        .expect("create");
    let mut narrow = admin
        .watch(v1::WatchRequest {
            kinds: vec!["app".into()],
            from_revision: 0,
            app_selectors: vec![selector("env", "prod"), selector("env", "^qa-[0-9]+$")],
        })
        .await
        .expect("watch")
        .into_inner();
    let mut all = admin
        .watch(v1::WatchRequest {
            kinds: vec!["app".into()],
            from_revision: 0,
            app_selectors: vec![selector("*", "*")],
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(read_until(&mut narrow, "").await, vec![(Put, "p1".into())]);
    assert_eq!(
        read_until(&mut all, "").await.len(),
        2,
        "the key * with * selects every app"
    );

    let steps: &[(&str, Option<&str>)] = &[
        ("d2", Some("dev")),     // never matches: not sent
        ("p2", Some("prod")),    // sent
        ("p1", Some("dev")),     // stops matching: sent once more
        ("p1", Some("staging")), // let go already: not sent
        ("d1", None),            // deleted, never sent: not sent
        ("p1", None),            // deleted after it was let go: not sent
        ("d2", Some("qa-7")),    // starts matching (the regular expression): sent
        ("d2", Some("qa-8")),    // still matching: sent
        ("p2", None),            // deleted while matching: sent
        ("z9", Some("prod")),    // the end marker
    ];
    for (name, env) in steps {
        match env {
            Some(env) => {
                admin.create(labeled_app(name, env)).await.expect("put");
            }
            None => {
                admin
                    .delete(v1::DeleteRequest {
                        kind: "app".into(),
                        name: name.to_string(),
                    })
                    .await
                    .expect("delete");
            }
        }
    }
    let want: Vec<(watch_event::Type, String)> = vec![
        (Put, "p2".into()),
        (Put, "p1".into()),
        (Put, "d2".into()),
        (Put, "d2".into()),
        (Delete, "p2".into()),
        (Put, "z9".into()),
    ];
    assert_eq!(read_until(&mut narrow, "z9").await, want);
    assert_eq!(
        read_until(&mut all, "z9").await.len(),
        steps.len(),
        "a watch that selects everything hears of every change"
    );
}

/// Selectors a watch cannot honour, or that would cost too much, are refused.
#[tokio::test]
async fn app_selectors_that_cannot_be_honoured_are_refused() {
    let c = ClusterBuilder::new().start().await;
    let mut admin = c.admin().await;
    admin
        .create(labeled_app("p1", "prod"))
        .await
        .expect("create");
    let rev = c.auth.backend.current_revision().await.expect("rev");
    let cases: Vec<(&str, v1::WatchRequest)> = vec![
        (
            "snapshot",
            v1::WatchRequest {
                kinds: vec!["app".into()],
                from_revision: rev,
                app_selectors: vec![selector("env", "prod")],
            },
        ),
        (
            "app_selectors[0]",
            v1::WatchRequest {
                kinds: vec!["app".into()],
                from_revision: 0,
                app_selectors: vec![selector("env", "^(unclosed$")],
            },
        ),
        (
            "at most 64",
            v1::WatchRequest {
                kinds: vec!["app".into()],
                from_revision: 0,
                app_selectors: (0..65).map(|i| selector("env", &format!("e{i}"))).collect(),
            },
        ),
        (
            "bytes",
            v1::WatchRequest {
                kinds: vec!["app".into()],
                from_revision: 0,
                app_selectors: vec![selector("env", &"x".repeat(20_000))],
            },
        ),
    ];
    for (says, req) in cases {
        let e = admin.watch(req).await.expect_err(says);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{says}: {e:?}");
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
}

/// An agent's own watch is narrowed by its selectors: an app it does not
/// serve is left out of what the auth-service sends it.
#[tokio::test]
async fn an_agent_is_sent_only_the_apps_it_serves() {
    let c = ClusterBuilder::new()
        .selector_agent("h-prod", &[("env", "prod")])
        .start()
        .await;
    let mut admin = c.admin().await;
    let held = |n: usize| {
        let c = &c;
        async move {
            eventually(
                Duration::from_secs(10),
                &format!("{n} apps served"),
                || async {
                    let held = c.auth.backend.held("h-prod").await.ok()?;
                    (held.len() == n).then_some(())
                },
            )
            .await
        }
    };
    admin
        .create(labeled_app("p1", "prod"))
        .await
        .expect("create");
    held(1).await;
    let before = c.auth.hub.skipped_apps();
    // The dev app's event is left out; the prod app after it, which the
    // same watch delivers in order, shows that the dev one went by.
    admin
        .create(labeled_app("d1", "dev"))
        .await
        .expect("create");
    admin
        .create(labeled_app("p2", "prod"))
        .await
        .expect("create");
    held(2).await;
    assert_eq!(
        c.auth.hub.skipped_apps() - before,
        1,
        "the agent's watch left out the one app it does not serve"
    );
}
