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
    let horizon = b.compact(1).await.expect("compact");
    assert!(horizon > r0);
    let e = b.events_after(r0, 10).await.expect_err("too old");
    assert_eq!(e.code, Code::TooOld);
    assert!(e.message.contains("re-sync"), "{}", e.message);
    assert!(b.events_after(horizon, 10).await.is_ok());

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
    b.delete_principal("u").await.expect("delete principal");
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
