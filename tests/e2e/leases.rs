//! Liveness per agent: one lease per agent, renewed in place, and
//! `app_server` records written only when they change. A renewal writes no
//! event; an agent can neither take nor withdraw another agent's records; an
//! ended lease (killed agent, revoked identity) withdraws every record of
//! its agent in one transaction; an auth-service restart re-writes nothing.

use std::time::Duration;

use portico_auth::storage::{Event, Op};
use portico_core::Kind;
use portico_proto::client::AuthClient;
use portico_proto::v1;
use portico_tests::mcp_http::McpHttp;
use portico_tests::util::app_resource;
use portico_tests::{ClusterBuilder, eventually};

fn serve(apps: &[&str], ttl_ms: i64) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        ttl_ms,
        serve: apps
            .iter()
            .map(|a| v1::ServedApp {
                app: a.to_string(),
                static_app_json: String::new(),
            })
            .collect(),
        ..Default::default()
    }
}

fn renew(ttl_ms: i64) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        ttl_ms,
        ..Default::default()
    }
}

async fn served(agent: &mut AuthClient) -> Vec<String> {
    agent
        .heartbeat(v1::HeartbeatRequest {
            ttl_ms: 60_000,
            list_served: true,
            ..Default::default()
        })
        .await
        .expect("list served")
        .into_inner()
        .served
}

/// The `app_server` events after `rev`.
async fn server_events(c: &portico_tests::Cluster, rev: i64) -> Vec<Event> {
    c.auth
        .backend
        .events_after(rev, 1_000_000)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == Kind::AppServer)
        .collect()
}

/// Waits until `host` holds `n` `app_server` records, and returns them.
async fn wait_held(
    c: &portico_tests::Cluster,
    host: &str,
    n: usize,
    within: Duration,
) -> Vec<(String, String)> {
    eventually(within, &format!("{n} apps served by {host}"), || async {
        let held = c.auth.backend.held(host).await.ok()?;
        (held.len() == n).then_some(held)
    })
    .await
}

/// Creates `n` apps named `{prefix}{i}` in calls of 500 (one transaction each).
async fn create_apps(api: &mut AuthClient, prefix: &str, n: usize) {
    let all: Vec<v1::Resource> = (0..n)
        .map(|i| app_resource(&format!("{prefix}{i}"), "dev"))
        .collect();
    for chunk in all.chunks(500) {
        api.create(v1::CreateRequest {
            resources: chunk.to_vec(),
            overwrite: false,
        })
        .await
        .expect("create apps");
    }
}

#[tokio::test]
async fn leases_belong_to_their_agent_and_renew_without_events() {
    let c = ClusterBuilder::new().start().await;
    // Host ids with dots: "p" served by "q.r" and "p.q" served by "r"
    // would both be the record "p.q.r".
    let mut a = c.service_client(&c.join_as("app", "q.r").await).await;
    let mut b = c.service_client(&c.join_as("app", "r").await).await;
    let r = a
        .heartbeat(serve(&["p"], 60_000))
        .await
        .expect("a serves p")
        .into_inner();
    assert!(!r.lease_was_live, "a new lease");
    let e = b
        .heartbeat(serve(&["p.q"], 60_000))
        .await
        .expect_err("a record name another agent holds");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("another agent"), "{}", e.message());

    // Renewals, and announcing what is already there, write nothing.
    let rev = c.auth.backend.current_revision().await.expect("revision");
    for _ in 0..3 {
        let r = a
            .heartbeat(renew(60_000))
            .await
            .expect("renew")
            .into_inner();
        assert!(r.lease_was_live);
    }
    a.heartbeat(serve(&["p"], 60_000)).await.expect("again");
    assert_eq!(
        c.auth.backend.current_revision().await.expect("revision"),
        rev,
        "a renewal is no change"
    );

    // B cannot withdraw A's record; its withdrawal names its own.
    b.heartbeat(v1::HeartbeatRequest {
        ttl_ms: 60_000,
        withdraw: vec!["p".into()],
        ..Default::default()
    })
    .await
    .expect("b withdraws p");
    assert_eq!(served(&mut a).await, vec!["p".to_string()]);
    assert!(served(&mut b).await.is_empty());
    assert!(server_events(&c, rev).await.is_empty());

    // A lease that is not renewed ends with every record of its agent, in
    // one transaction; the other agent's records stay.
    b.heartbeat(serve(&["x"], 60_000))
        .await
        .expect("b serves x");
    let many: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    a.heartbeat(serve(&names, 1_000))
        .await
        .expect("a serves 50 more, briefly");
    let rev = c.auth.backend.current_revision().await.expect("revision");
    let gone = eventually(Duration::from_secs(10), "a's lease ends", || async {
        let evs = server_events(&c, rev).await;
        (evs.len() == 51).then_some(evs)
    })
    .await;
    assert!(
        gone.iter()
            .all(|e| e.op == Op::Delete && e.name.ends_with(".q.r"))
    );
    assert!(
        gone.windows(2).all(|w| w[1].revision == w[0].revision + 1),
        "withdrawn in one transaction"
    );
    assert!(served(&mut a).await.is_empty());
    assert_eq!(served(&mut b).await, vec!["x".to_string()]);
    // (The listing call made A's lease again; it holds nothing.)

    // Revoking an agent withdraws its apps at once.
    c.admin()
        .await
        .revoke_identity(v1::RevokeIdentityRequest {
            host_id: "r".into(),
        })
        .await
        .expect("revoke");
    assert!(
        c.auth
            .backend
            .get(Kind::AppServer, "x.r")
            .await
            .expect("get")
            .is_none(),
        "withdrawn when revoked"
    );

    // Records belong to their agents: even the admin cannot delete one
    // (its agent would not announce it again while its lease lives).
    let e = c
        .admin()
        .await
        .delete(v1::DeleteRequest {
            kind: "app_server".into(),
            name: "p.q.r".into(),
        })
        .await
        .expect_err("app_server records are not deleted through the API");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("pctl identities rm"),
        "{}",
        e.message()
    );

    // Batches are bounded, and a name appears once per call.
    let too_many: Vec<String> = (0..2001).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let e = a
        .heartbeat(serve(&names, 60_000))
        .await
        .expect_err("too many");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = a
        .heartbeat(serve(&["d", "d"], 60_000))
        .await
        .expect_err("twice");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_killed_agent_process_loses_every_record_when_its_lease_ends() {
    let c = ClusterBuilder::new().proxy().start().await;
    let mut agent =
        crate::agents::wildcard_agent_process(&c, "doomed", &c.tunnel_addr().to_string()).await;
    let mut admin = c.admin().await;
    create_apps(&mut admin, "k", 200).await;
    wait_held(&c, "doomed", 200, Duration::from_secs(30)).await;
    c.wait_servers("k7", &["doomed"]).await;
    let rev = c.auth.backend.current_revision().await.expect("revision");
    agent.start_kill().expect("SIGKILL");
    let _ = agent.wait().await;
    let killed = std::time::Instant::now();
    // The lease lasts 15 s; the sweep runs every 0.5 s.
    let gone = eventually(Duration::from_secs(30), "the lease ends", || async {
        let evs = server_events(&c, rev).await;
        (evs.len() == 200).then_some(evs)
    })
    .await;
    println!("records withdrawn {:?} after the kill", killed.elapsed());
    assert!(gone.iter().all(|e| e.op == Op::Delete));
    assert!(
        gone.windows(2).all(|w| w[1].revision == w[0].revision + 1),
        "withdrawn in one transaction"
    );
    c.wait_servers("k7", &[]).await;
    // The proxy no longer routes there, and says so.
    c.add_user("lease-user", &["admin"], "lease-password-1")
        .await;
    let token = c.login("lease-user", "lease-password-1").await;
    let mut s = McpHttp::new(c.proxy_addr(), "k7", &token);
    let e = s.initialize().await.expect_err("nothing serves k7");
    assert!(
        String::from_utf8_lossy(&e.body).contains("no agent is serving"),
        "{e:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn an_auth_restart_with_ten_thousand_apps_rewrites_none() {
    let mut c = ClusterBuilder::new().wildcard_agent("big").start().await;
    let mut admin = c.admin().await;
    let started = std::time::Instant::now();
    create_apps(&mut admin, "s", 10_000).await;
    println!("10,000 apps created in {:?}", started.elapsed());
    let started = std::time::Instant::now();
    wait_held(&c, "big", 10_000, Duration::from_secs(60)).await;
    println!("... and all served {:?} later", started.elapsed());
    let rev = c.auth.backend.current_revision().await.expect("revision");
    c.stop_auth().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.start_auth_again().await;
    // The agent is back in step: a new app is served...
    let mut admin = c.admin().await;
    admin
        .create(v1::CreateRequest {
            resources: vec![app_resource("after", "dev")],
            overwrite: false,
        })
        .await
        .expect("create after the restart");
    eventually(Duration::from_secs(30), "the new app served", || async {
        c.auth
            .backend
            .get(Kind::AppServer, "after.big")
            .await
            .ok()
            .flatten()
    })
    .await;
    // ... and through a renewal period, nothing else was written.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let evs = server_events(&c, rev).await;
    assert_eq!(
        evs.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        vec!["after.big"],
        "only the new app's record was written"
    );
    assert_eq!(
        c.auth.backend.held("big").await.expect("held").len(),
        10_001
    );
    c.shutdown().await;
}

/// A registration that stalls in the database holds back neither the
/// agent's renewals nor its lease. On Postgres, a transaction of the test's
/// own takes (and does not commit) the very record the agent is about to
/// write, so the agent's registration waits inside its transaction, past
/// its call's timeout and its retries. For longer than a lease the agent's
/// lease must stay ahead of the clock, renewed, and none of its records may
/// be withdrawn; once the row is let go, the app is served.
#[tokio::test]
async fn a_stalled_registration_does_not_hold_back_the_lease() {
    use portico_core::time::now_ms;
    use sqlx::{Connection, Row};

    let c = ClusterBuilder::new()
        .storage(portico_tests::Storage::Postgres)
        .wildcard_agent("steady")
        .start()
        .await;
    let mut admin = c.admin().await;
    create_apps(&mut admin, "p", 5).await;
    wait_held(&c, "steady", 5, Duration::from_secs(30)).await;
    let url = c.pg.as_ref().expect("postgres").url.clone();
    let monitor = sqlx::PgPool::connect(&url).await.expect("connect");
    let mut blocker = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut stall = blocker.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO resources (kind, name, revision, value) VALUES ('app_server', $1, 0, '{}')",
    )
    .bind(portico_core::resource::app_server_name(
        "stalled0", "steady",
    ))
    .execute(&mut *stall)
    .await
    .expect("take the record's row");
    let rev = c.auth.backend.current_revision().await.expect("revision");
    create_apps(&mut admin, "stalled", 1).await;
    // The agent's registration is inside its transaction, waiting on the row.
    eventually(
        Duration::from_secs(20),
        "the registration waits",
        || async {
            let waiting: i64 = sqlx::query(
                "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'INSERT INTO resources%'",
            )
            .fetch_one(&monitor)
            .await
            .ok()?
            .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    let lease = async || -> i64 {
        sqlx::query("SELECT expires FROM leases WHERE host_id = 'steady'")
            .fetch_one(&monitor)
            .await
            .expect("the lease")
            .get(0)
    };
    let first = lease().await;
    let held_from = std::time::Instant::now();
    // Longer than the 15 s lease, and than two of the agent's call timeouts.
    while held_from.elapsed() < Duration::from_secs(22) {
        let expires = lease().await;
        let now = now_ms();
        assert!(
            expires > now,
            "the lease ran out {} ms ago while a registration was stalled",
            now - expires
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let last = lease().await;
    assert!(
        last >= first + 15_000,
        "renewals went on: the lease moved {} ms",
        last - first
    );
    let withdrawn: Vec<Event> = server_events(&c, rev)
        .await
        .into_iter()
        .filter(|e| e.op == Op::Delete)
        .collect();
    assert!(withdrawn.is_empty(), "records withdrawn: {withdrawn:?}");
    stall.rollback().await.expect("let the row go");
    monitor.close().await;
    let held = wait_held(&c, "steady", 6, Duration::from_secs(30)).await;
    assert!(
        held.iter()
            .any(|(name, _)| name == &portico_core::resource::app_server_name("stalled0", "steady")),
        "{held:?}"
    );
    c.shutdown().await;
}
