//! The control plane through its real entry points: `pctl` against a running
//! auth-service, RBAC on every call, users and login, join tokens, audit.

use portico_proto::v1;
use portico_tests::cluster::text;
use portico_tests::util::example;
use portico_tests::{ClusterBuilder, Storage};

#[tokio::test]
async fn seed_lifecycle_with_pctl() {
    let c = ClusterBuilder::new().start().await;
    let seed = example("mcp_server.yaml");
    let seed = seed.to_str().expect("utf-8 path");
    let o = c.pctl(&["create", seed]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).0.contains("app \"everything\" created"),
        "{:?}",
        text(&o)
    );

    let o = c.pctl(&["get", "apps"]).await;
    let out = text(&o).0;
    assert!(
        out.contains("everything")
            && out.contains("The Everything MCP server")
            && out.contains("env=dev"),
        "{out}"
    );

    let o = c.pctl(&["create", seed]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("use pctl create -f"), "{:?}", text(&o));

    let o = c.pctl(&["create", "-f", seed]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("updated"));

    let o = c.pctl(&["get", "app/everything", "--format", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&text(&o).0).expect("json output");
    assert_eq!(v[0]["spec"]["mcp"]["run_as_host_user"], "docker");
    assert!(v[0]["metadata"]["revision"].as_i64().unwrap_or(0) > 0);

    let o = c
        .pctl(&["get", "apps", "everything", "--format", "yaml"])
        .await;
    assert!(text(&o).0.contains("command: docker"), "{:?}", text(&o));

    // --identity works from anywhere, without --data-dir.
    let mut cmd = tokio::process::Command::new(portico_tests::bin("pctl"));
    cmd.arg("--identity")
        .arg(c.admin_identity())
        .args(["get", "roles"])
        .env_remove("PORTICO_DATA_DIR")
        .env("PORTICO_HOME", c.data_dir().join("nohome"));
    let o = portico_tests::cluster::run(cmd, None).await;
    assert!(
        o.status.success() && text(&o).0.contains("mcp-user"),
        "{:?}",
        text(&o)
    );

    let o = c.pctl(&["rm", "app/everything"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let o = c.pctl(&["get", "app/everything"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("not found"));
    let o = c.pctl(&["rm", "app/everything"]).await;
    assert_eq!(o.status.code(), Some(1));
    c.shutdown().await;
}

async fn app_count(c: &portico_tests::Cluster) -> usize {
    c.admin()
        .await
        .list(v1::ListRequest {
            kind: "app".into(),
            labels: Default::default(),
        })
        .await
        .expect("list")
        .into_inner()
        .items
        .len()
}

#[tokio::test]
async fn bad_input_is_refused_whole_and_clearly() {
    let c = ClusterBuilder::new().start().await;
    let dir = c.data_dir();
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write file");
        p.to_string_lossy().into_owned()
    };
    let cases: Vec<(String, &str)> = vec![
        (
            write("invalid.yaml", "kind: app\nmetadata: [unclosed\n"),
            "invalid.yaml:",
        ),
        (
            write(
                "half.yaml",
                "kind: app\nversion: v3\nmetadata: {name: good}\nspec: {uri: 'mcp+http://x/mcp'}\n---\nkind: app\nversion: v3\nmetadata:\n  name: bad\n  colour: red\nspec: {}\n",
            ),
            "half.yaml:10:",
        ),
        (
            write(
                "kind.yaml",
                "kind: gizmo\nversion: v1\nmetadata: {name: x}\n",
            ),
            "unknown kind \"gizmo\"",
        ),
        (
            write(
                "long.yaml",
                &format!(
                    "kind: app\nversion: v3\nmetadata: {{name: {}}}\nspec: {{uri: 'mcp+http://x'}}\n",
                    "a".repeat(300)
                ),
            ),
            "300 characters",
        ),
        (
            write(
                "nouser.yaml",
                "kind: app\nversion: v3\nmetadata: {name: x}\nspec:\n  mcp: {command: ls}\n",
            ),
            "run_as_host_user",
        ),
        (
            write(
                "type.yaml",
                "kind: app\nversion: v3\nmetadata: {name: x}\nspec:\n  mcp: {command: ls, args: 7, run_as_host_user: root}\n",
            ),
            "args",
        ),
    ];
    for (file, want) in &cases {
        let o = c.pctl(&["create", file]).await;
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{file}: {out} {err}");
        assert!(err.contains(want), "{file}: want {want:?} in {err:?}");
        assert!(
            !err.contains("panicked") && !err.contains("Error {"),
            "{err}"
        );
    }
    let big = dir.join("big.yaml");
    std::fs::write(&big, "#".repeat(10 * 1024 * 1024)).expect("big file");
    let o = c.pctl(&["create", big.to_str().expect("path")]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("at most"), "{:?}", text(&o));
    assert_eq!(app_count(&c).await, 0, "nothing may be half-written");

    // A file whose second document collides with an existing app changes nothing.
    c.create_yaml(
        "kind: app\nversion: v3\nmetadata: {name: taken}\nspec: {uri: 'mcp+http://x/mcp'}\n",
        false,
    )
    .await
    .expect("create");
    let f = write(
        "collide.yaml",
        "kind: app\nversion: v3\nmetadata: {name: fresh}\nspec: {uri: 'mcp+http://x/mcp'}\n---\nkind: app\nversion: v3\nmetadata: {name: taken}\nspec: {uri: 'mcp+http://y/mcp'}\n",
    );
    let o = c.pctl(&["create", &f]).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(app_count(&c).await, 1, "the fresh app must not be created");

    let o = c.pctl(&["get", "gizmos"]).await;
    assert_eq!(o.status.code(), Some(2), "usage errors exit 2");
    let o = c.pctl(&["frobnicate"]).await;
    assert_eq!(o.status.code(), Some(2));
    c.shutdown().await;
}

const DEV_ROLE: &str = "kind: role\nversion: v8\nmetadata: {name: mcp-developer}\nspec:\n  allow:\n    rules:\n    - resources: [app]\n      verbs: [list, create, read, update, delete]\n    app_labels:\n      env: [dev, test]\n    mcp:\n      tools: ['*']\n  deny:\n    mcp:\n      tools: ['delete_*']\n";

#[tokio::test]
async fn rbac_on_every_call() {
    let c = ClusterBuilder::new()
        .storage(Storage::Postgres)
        .start()
        .await;
    let example = std::fs::read_to_string(example("app-admin-role.yaml")).expect("example role");
    c.create_yaml(&example, false)
        .await
        .expect("app-admin role");
    c.create_yaml(DEV_ROLE, false).await.expect("dev role");
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: no-update}\nspec:\n  deny:\n    rules:\n    - resources: [app]\n      verbs: [update]\n", false).await.expect("deny role");
    c.add_user("ann", &["app-admin"], "ann-password-1").await;
    c.add_user("joe", &["mcp-user"], "joe-password-1").await;
    c.add_user("dan", &["app-admin", "no-update"], "dan-password-1")
        .await;
    let app = portico_core::parse::parse_documents(
        "a",
        "kind: app\nversion: v3\nmetadata: {name: a1}\nspec: {uri: 'mcp+http://x/mcp'}\n",
    )
    .expect("app");
    let req = |overwrite| v1::CreateRequest {
        resources: app
            .iter()
            .map(|r| v1::Resource {
                kind: "app".into(),
                json: r.to_json(),
            })
            .collect(),
        overwrite,
    };

    let mut ann = c.client(&c.login("ann", "ann-password-1").await).await;
    ann.create(req(false))
        .await
        .expect("app-admin creates apps");
    ann.create(req(true)).await.expect("app-admin updates apps");
    let e = ann
        .list(v1::ListRequest {
            kind: "role".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("no role access");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("list on role"), "{}", e.message());

    let mut joe = c.client(&c.login("joe", "joe-password-1").await).await;
    let e = joe
        .list(v1::ListRequest {
            kind: "app".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("mcp-user has no rules");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    let mut dan = c.client(&c.login("dan", "dan-password-1").await).await;
    let e = dan
        .create(req(true))
        .await
        .expect_err("deny wins: -f on an existing app needs update");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("no-update"), "{}", e.message());
    dan.delete(v1::DeleteRequest {
        kind: "app".into(),
        name: "a1".into(),
    })
    .await
    .expect("dan may delete");

    // Role changes apply to the next request.
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: app-admin}\nspec:\n  allow:\n    rules:\n    - resources: [app]\n      verbs: [list]\n", true).await.expect("narrow role");
    let e = ann.create(req(false)).await.expect_err("narrowed");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    ann.list(v1::ListRequest {
        kind: "app".into(),
        labels: Default::default(),
    })
    .await
    .expect("list still allowed");

    // A deleted user's token stops working at once.
    c.admin()
        .await
        .delete(v1::DeleteRequest {
            kind: "user".into(),
            name: "ann".into(),
        })
        .await
        .expect("delete ann");
    let e = ann
        .list(v1::ListRequest {
            kind: "app".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("deleted user");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // Forged or missing tokens.
    let mut forged = c.client(&"f".repeat(64)).await;
    let e = forged
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect_err("forged");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut anon = portico_proto::client::connect(&c.auth_dial(), None)
        .await
        .expect("connect");
    let e = anon
        .list(v1::ListRequest {
            kind: "app".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("anonymous");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    c.shutdown().await;
}

#[tokio::test]
async fn users_login_expiry_and_rate_limit() {
    let c = ClusterBuilder::new().session_ttl("2s").start().await;
    let o = c.pctl(&["users", "add", "alice", "--roles=mcp-user"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out} {err}");
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("a generated password line")
        .to_string();
    assert!(password.len() >= 20);
    let o = c.pctl(&["users", "add", "bob", "--roles=nope"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("role \"nope\" does not exist"));
    let o = c
        .pctl_with(
            &[
                "users",
                "add",
                "carol",
                "--roles=mcp-user",
                "--password-stdin",
            ],
            &[],
            Some("carol-secret-9\n"),
        )
        .await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(!text(&o).0.contains("password:"));

    let token = c.login("alice", &password).await;
    let mut alice = c.client(&token).await;
    let who = alice
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!(who.name, "alice");
    assert_eq!(who.roles, vec!["mcp-user".to_string()]);

    // Sessions expire.
    portico_tests::eventually(std::time::Duration::from_secs(10), "session expiry", || {
        let mut a = alice.clone();
        async move {
            a.who_am_i(v1::WhoAmIRequest {})
                .await
                .err()
                .filter(|e| e.code() == tonic::Code::Unauthenticated)
        }
    })
    .await;

    // Failed logins are audited and rate limited.
    let mut anon = portico_proto::client::connect(&c.auth_dial(), None)
        .await
        .expect("connect");
    for _ in 0..5 {
        let e = anon
            .login(v1::LoginRequest {
                user: "carol".into(),
                password: "wrong-password".into(),
            })
            .await
            .expect_err("bad password");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    let e = anon
        .login(v1::LoginRequest {
            user: "carol".into(),
            password: "carol-secret-9".into(),
        })
        .await
        .expect_err("locked");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("too many failed logins"));
    let o = c
        .pctl(&["events", "ls", "--type", "user.login", "--format", "json"])
        .await;
    let v: serde_json::Value = serde_json::from_str(&text(&o).0).expect("json");
    let events = v.as_array().expect("array");
    assert!(
        events
            .iter()
            .any(|e| e["success"] == true && e["actor"] == "alice")
    );
    assert!(
        events
            .iter()
            .filter(|e| e["success"] == false && e["actor"] == "carol")
            .count()
            >= 5
    );
    let all = serde_json::to_string(&v).expect("text");
    assert!(
        !all.contains("carol-secret-9") && !all.contains("wrong-password"),
        "no passwords in the audit log"
    );

    let o = c.pctl(&["users", "ls"]).await;
    assert!(text(&o).0.contains("alice") && text(&o).0.contains("mcp-user"));
    let o = c.pctl(&["users", "rm", "alice"]).await;
    assert!(o.status.success());
    c.shutdown().await;
}

#[tokio::test]
async fn join_tokens_are_single_use_and_expire() {
    let c = ClusterBuilder::new().start().await;
    let o = c.pctl(&["tokens", "add", "--type=app", "--ttl=1h"]).await;
    let out = text(&o).0;
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("token line")
        .to_string();
    let o = c.pctl(&["tokens", "ls"]).await;
    assert!(text(&o).0.contains("app"), "{:?}", text(&o));
    assert!(!text(&o).0.contains(&token), "secrets are never listed");
    let mut anon = portico_proto::client::connect(&c.auth_dial(), None)
        .await
        .expect("connect");
    let key = portico_tls::pki::new_key().expect("key");
    let csr = portico_tls::pki::signing_request(&key).expect("csr");
    let join = |t: &str, role: &str| v1::JoinRequest {
        token: t.into(),
        host_id: "agent-x".into(),
        role: role.into(),
        csr_pem: csr.clone(),
    };
    let e = anon
        .join(join(&token, "proxy"))
        .await
        .expect_err("wrong role");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let ok = anon
        .join(join(&token, "app"))
        .await
        .expect("join")
        .into_inner();
    assert_eq!(ok.host_id, "agent-x");
    let e = anon.join(join(&token, "app")).await.expect_err("used");
    assert!(e.message().contains("already used"), "{}", e.message());
    let joined = portico_tests::cluster::JoinedService {
        resp: ok.clone(),
        key_pem: key.serialize_pem(),
    };
    let svc = c
        .service_client(&joined)
        .await
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect("identity works")
        .into_inner();
    assert_eq!(svc.principal_type, "service");

    let o = c.pctl(&["tokens", "add", "--type=app", "--ttl=1s"]).await;
    let short = text(&o)
        .0
        .lines()
        .find_map(|l| l.strip_prefix("token: ").map(String::from))
        .expect("token");
    // Time passing is the condition here: a join attempt would use the token up.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let e = anon.join(join(&short, "app")).await.expect_err("expired");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let o = c.pctl(&["tokens", "add", "--type=bogus"]).await;
    assert_eq!(o.status.code(), Some(1));
    let o = c.pctl(&["events", "ls", "--type", "token"]).await;
    assert!(text(&o).0.contains("token.join"), "{:?}", text(&o));
    c.shutdown().await;
}
