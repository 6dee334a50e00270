//! One backend conformance suite, run against SQLite and a real Postgres.

use std::sync::Arc;

use portico_auth::storage::{Backend, Op, PostgresBackend, PutMode, SqliteBackend, WriteOp};
use portico_core::{Code, Kind};
use portico_tests::TempDir;
use portico_tests::pg::PgDb;

fn put(kind: Kind, name: &str, value: &str, mode: PutMode) -> WriteOp {
    WriteOp::Put {
        kind,
        name: name.into(),
        value: value.into(),
        expires: None,
        mode,
    }
}

async fn suite(b: Arc<dyn Backend>) {
    let r0 = b.current_revision().await.expect("revision");
    let evs = b
        .apply(&[put(Kind::App, "a", "{\"v\":1}", PutMode::Create)])
        .await
        .expect("create");
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].revision, r0 + 1);
    assert_eq!(evs[0].op, Op::Put);

    let e = b
        .apply(&[put(Kind::App, "a", "{}", PutMode::Create)])
        .await
        .expect_err("duplicate");
    assert_eq!(e.code, Code::AlreadyExists);
    let e = b
        .apply(&[put(Kind::App, "missing", "{}", PutMode::Update)])
        .await
        .expect_err("update of missing");
    assert_eq!(e.code, Code::NotFound);

    // All or nothing: the second op fails, so the first leaves no trace.
    let e = b
        .apply(&[
            put(Kind::App, "b", "{}", PutMode::Create),
            put(Kind::App, "a", "{}", PutMode::Create),
        ])
        .await
        .expect_err("batch fails");
    assert_eq!(e.code, Code::AlreadyExists);
    assert!(b.get(Kind::App, "b").await.expect("get").is_none());
    assert_eq!(
        b.current_revision().await.expect("rev"),
        r0 + 1,
        "a failed write takes no revision"
    );

    let evs = b
        .apply(&[
            put(Kind::App, "a", "{\"v\":2}", PutMode::Update),
            put(Kind::Role, "r", "{}", PutMode::Upsert),
        ])
        .await
        .expect("batch");
    assert_eq!(
        evs.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![r0 + 2, r0 + 3]
    );
    let rec = b.get(Kind::App, "a").await.expect("get").expect("exists");
    assert_eq!(rec.value, "{\"v\":2}");
    assert_eq!(rec.revision, r0 + 2);
    assert_eq!(b.list(Kind::App).await.expect("list").len(), 1);
    let (snap, rev) = b.snapshot(&[Kind::App]).await.expect("snapshot");
    assert_eq!(rev, r0 + 3);
    assert_eq!(snap.len(), 1);

    let evs = b
        .apply(&[WriteOp::Delete {
            kind: Kind::App,
            name: "a".into(),
            expired_before: None,
        }])
        .await
        .expect("delete");
    assert_eq!(evs[0].op, Op::Delete);
    assert_eq!(
        evs[0].value, "{\"v\":2}",
        "a delete event carries the last value"
    );
    let e = b
        .apply(&[WriteOp::Delete {
            kind: Kind::App,
            name: "a".into(),
            expired_before: None,
        }])
        .await
        .expect_err("gone");
    assert_eq!(e.code, Code::NotFound);

    let all = b.events_after(r0, 100).await.expect("events");
    assert_eq!(
        all.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (r0 + 1..=r0 + 4).collect::<Vec<_>>()
    );

    // TTL: expired records are found and deleted once, renewed ones are not.
    let now = portico_core::time::now_ms();
    b.apply(&[WriteOp::Put {
        kind: Kind::AppServer,
        name: "x.h".into(),
        value: "{}".into(),
        expires: Some(now - 1),
        mode: PutMode::Upsert,
    }])
    .await
    .expect("ttl record");
    b.apply(&[WriteOp::Put {
        kind: Kind::AppServer,
        name: "y.h".into(),
        value: "{}".into(),
        expires: Some(now + 60_000),
        mode: PutMode::Upsert,
    }])
    .await
    .expect("live record");
    let expired = b.expired(now).await.expect("expired");
    assert_eq!(expired, vec![(Kind::AppServer, "x.h".to_string())]);
    let del = WriteOp::Delete {
        kind: Kind::AppServer,
        name: "x.h".into(),
        expired_before: Some(now),
    };
    assert_eq!(
        b.apply(std::slice::from_ref(&del))
            .await
            .expect("sweep")
            .len(),
        1
    );
    assert!(
        b.apply(&[del]).await.expect("second sweep").is_empty(),
        "a second sweep is a no-op"
    );
    let renewed = WriteOp::Delete {
        kind: Kind::AppServer,
        name: "y.h".into(),
        expired_before: Some(now),
    };
    assert!(b.apply(&[renewed]).await.expect("not expired").is_empty());

    // Compaction: resuming from behind the horizon is refused clearly.
    let horizon = b.compact(1, 0).await.expect("compact");
    assert!(horizon > r0);
    let e = b.events_after(r0, 10).await.expect_err("too old");
    assert_eq!(e.code, Code::TooOld);
    assert!(e.message.contains("re-sync"), "{}", e.message);
    assert!(b.events_after(horizon, 10).await.is_ok());

    leases(b.as_ref(), now).await;

    // Credentials, sessions and audit.
    b.set_password("u", "hash1").await.expect("password");
    b.set_password("u", "hash2").await.expect("password again");
    assert_eq!(
        b.password("u").await.expect("read").as_deref(),
        Some("hash2")
    );
    let s = portico_auth::storage::SessionRow {
        token_hash: "h".into(),
        principal: "u".into(),
        ptype: "user".into(),
        roles: "[]".into(),
        expires: Some(now - 1),
    };
    b.put_session(&s).await.expect("session");
    assert_eq!(b.session("h").await.expect("read"), Some(s));
    assert_eq!(b.purge_sessions(now).await.expect("purge"), 1);
    assert_eq!(b.session("h").await.expect("read"), None, "purged");
    // Lookups may be kept (SQLite), but every write to sessions shows in
    // the very next lookup: each is read twice first, to be kept if it can.
    let live = |hash: &str, principal: &str, ptype: &str| portico_auth::storage::SessionRow {
        token_hash: hash.into(),
        principal: principal.into(),
        ptype: ptype.into(),
        roles: "[]".into(),
        expires: Some(now + 60_000),
    };
    let twice = async |hash: &str| {
        let a = b.session(hash).await.expect("read");
        assert_eq!(a, b.session(hash).await.expect("read again"));
        a
    };
    assert_eq!(twice("fresh").await, None);
    b.put_session(&live("fresh", "u", "user"))
        .await
        .expect("put");
    assert!(
        twice("fresh").await.is_some(),
        "a new session is seen at once"
    );
    b.delete_session("fresh").await.expect("logout");
    assert_eq!(twice("fresh").await, None, "a logout counts at once");
    // Many at once (a round of watch re-checks): those that exist, whole;
    // a write counts at once here too.
    let many: Vec<String> = (0..1_200).map(|i| format!("m{i}")).collect();
    for h in ["m7", "m700", "m1199"] {
        b.put_session(&live(h, "u", "user")).await.expect("put");
    }
    let mut found = b.sessions(&many).await.expect("sessions");
    found.sort_by(|x, y| x.token_hash.cmp(&y.token_hash));
    assert_eq!(
        found,
        vec![
            live("m1199", "u", "user"),
            live("m7", "u", "user"),
            live("m700", "u", "user")
        ]
    );
    assert!(b.sessions(&[]).await.expect("none").is_empty());
    b.delete_session("m700").await.expect("logout");
    let left: Vec<String> = b
        .sessions(&many)
        .await
        .expect("sessions")
        .into_iter()
        .map(|r| r.token_hash)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&"m700".to_string()), "{left:?}");
    for h in ["m7", "m1199"] {
        b.delete_session(h).await.expect("logout");
    }
    b.put_session(&live("svc", "agent-x", "service"))
        .await
        .expect("put");
    assert!(twice("svc").await.is_some());
    assert!(
        b.extend_session("svc", now + 120_000)
            .await
            .expect("extend")
    );
    assert_eq!(
        twice("svc").await.and_then(|r| r.expires),
        Some(now + 120_000),
        "an extension counts at once"
    );
    assert_eq!(b.revoke_service("agent-x").await.expect("revoke"), 1);
    assert_eq!(twice("svc").await, None, "a revocation counts at once");
    b.put_session(&live("usr", "u", "user")).await.expect("put");
    assert!(twice("usr").await.is_some());
    b.delete_principal("u").await.expect("delete principal");
    assert_eq!(
        twice("usr").await,
        None,
        "a deleted user's sessions go at once"
    );
    assert!(b.password("u").await.expect("read").is_none());
    for (i, kind) in ["user.login", "app.create", "user.login"]
        .iter()
        .enumerate()
    {
        let rec = portico_auth::storage::AuditRecord {
            id: 0,
            time_ms: now + i as i64,
            kind: kind.to_string(),
            actor: "u".into(),
            success: i != 2,
            fields: "{}".into(),
        };
        b.append_audit(std::slice::from_ref(&rec))
            .await
            .expect("audit");
    }
    let logins = b.list_audit(Some("user.login"), 0, 10).await.expect("list");
    assert_eq!(logins.len(), 2);
    assert!(logins[0].id < logins[1].id && logins[0].success && !logins[1].success);
    assert_eq!(
        b.list_audit(Some("app"), 0, 10)
            .await
            .expect("family")
            .len(),
        1
    );
    assert_eq!(
        b.list_audit(None, now + 1, 10).await.expect("since").len(),
        2
    );
    assert_eq!(
        b.list_audit(None, 0, 1).await.expect("limit")[0].kind,
        "user.login",
        "limit keeps the newest"
    );
    // Many records in one call: each kept whole, in order.
    let batch: Vec<_> = ["a.one", "a.two", "a.three"]
        .iter()
        .enumerate()
        .map(|(i, k)| portico_auth::storage::AuditRecord {
            id: 0,
            time_ms: now - 20_000,
            kind: k.to_string(),
            actor: format!("actor{i}"),
            success: i == 1,
            fields: format!("{{\"n\":{i}}}"),
        })
        .collect();
    b.append_audit(&batch).await.expect("batch");
    let got = b.list_audit(Some("a"), 0, 10).await.expect("list");
    assert_eq!(
        got.iter()
            .map(|r| (
                r.kind.as_str(),
                r.actor.as_str(),
                r.success,
                r.fields.as_str()
            ))
            .collect::<Vec<_>>(),
        vec![
            ("a.one", "actor0", false, "{\"n\":0}"),
            ("a.two", "actor1", true, "{\"n\":1}"),
            ("a.three", "actor2", false, "{\"n\":2}"),
        ]
    );
    // Retention: records older than the bound go, in more than one batch,
    // and only those.
    let old: Vec<_> = (0..6_000)
        .map(|i| portico_auth::storage::AuditRecord {
            id: 0,
            time_ms: now - 10_000 + (i % 100),
            kind: "mcp.session.request".into(),
            actor: "u".into(),
            success: true,
            fields: "{}".into(),
        })
        .collect();
    b.append_audit(&old).await.expect("old records");
    assert_eq!(b.purge_audit(now + 1).await.expect("purge"), 6_004);
    let left = b.list_audit(None, 0, 100).await.expect("list");
    assert_eq!(
        left.iter().map(|r| r.time_ms).collect::<Vec<_>>(),
        vec![now + 1, now + 2]
    );
    assert_eq!(b.purge_audit(now + 1).await.expect("again"), 0);
}

/// Agents' leases: renewals write no event, records are written only when
/// they change, a name is never taken from another agent, and an ended
/// lease withdraws everything its agent held in one transaction.
async fn leases(b: &dyn Backend, now: i64) {
    let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
    // No lease yet: a renewal says so and creates nothing.
    assert!(!b.renew_lease("h1", now, now + 10_000).await.expect("renew"));
    let (live, evs) = b
        .announce(
            "h1",
            now,
            now + 10_000,
            &[pair("p.h1", "{\"v\":1}"), pair("q.h1", "{\"v\":1}")],
            &[],
        )
        .await
        .expect("announce");
    assert!(!live, "the lease is new");
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[1].revision, evs[0].revision + 1);
    let rev = b.current_revision().await.expect("rev");
    assert!(b.renew_lease("h1", now, now + 10_000).await.expect("renew"));
    let (live, evs) = b
        .announce(
            "h1",
            now,
            now + 10_000,
            &[pair("p.h1", "{\"v\":1}")],
            &["nothing.h1".into()],
        )
        .await
        .expect("announce again");
    assert!(
        live && evs.is_empty(),
        "unchanged records are not written: {evs:?}"
    );
    assert_eq!(
        b.current_revision().await.expect("rev"),
        rev,
        "renewals take no revision"
    );
    let (_, evs) = b
        .announce("h1", now, now + 10_000, &[pair("p.h1", "{\"v\":2}")], &[])
        .await
        .expect("changed");
    assert_eq!((evs.len(), evs[0].op), (1, Op::Put));
    // Another agent can neither take nor withdraw h1's names.
    let e = b
        .announce("h2", now, now + 10_000, &[pair("p.h1", "{}")], &[])
        .await
        .expect_err("a name another agent holds");
    assert_eq!(e.code, Code::AlreadyExists);
    let (_, evs) = b
        .announce(
            "h2",
            now,
            now + 10_000,
            &[pair("r.h2", "{}")],
            &["p.h1".into()],
        )
        .await
        .expect("h2's own");
    assert_eq!(
        evs.len(),
        1,
        "withdrawing what another agent holds does nothing: {evs:?}"
    );
    assert_eq!(b.held("h1").await.expect("held").len(), 2);
    // An expired lease ends with all its records in one transaction; a
    // renewed one does not.
    assert_eq!(
        b.expired_leases(now + 20_000).await.expect("expired").len(),
        2
    );
    assert!(
        b.end_lease("h1", Some(now))
            .await
            .expect("not expired yet")
            .is_empty()
    );
    let evs = b.end_lease("h1", Some(now + 20_000)).await.expect("end");
    assert_eq!(evs.len(), 2);
    assert!(
        evs.iter()
            .all(|e| e.op == Op::Delete && e.kind == Kind::AppServer)
    );
    assert_eq!(evs[1].revision, evs[0].revision + 1);
    assert!(b.held("h1").await.expect("held").is_empty());
    assert!(b.get(Kind::AppServer, "r.h2").await.expect("get").is_some());
    assert!(!b.renew_lease("h1", now, now + 10_000).await.expect("gone"));
    // An expired lease that was not swept yet is renewed, but reported lapsed.
    assert!(
        !b.renew_lease("h2", now + 20_000, now + 30_000)
            .await
            .expect("lapsed")
    );
    assert!(
        b.renew_lease("h2", now + 20_000, now + 30_000)
            .await
            .expect("live")
    );
    assert_eq!(b.extend_leases(now + 40_000).await.expect("extend"), 1);
    let evs = b.end_lease("h2", None).await.expect("release");
    assert_eq!(evs.len(), 1);
    assert!(b.expired_leases(i64::MAX).await.expect("none").is_empty());
}

#[tokio::test]
async fn sqlite_backend_conforms() {
    let dir = TempDir::new("portico-sqlite");
    suite(Arc::new(
        SqliteBackend::open(dir.path()).await.expect("open"),
    ))
    .await;
}

#[tokio::test]
async fn postgres_backend_conforms() {
    let db = PgDb::create().await;
    suite(Arc::new(
        PostgresBackend::connect(&db.url).await.expect("connect"),
    ))
    .await;
}
