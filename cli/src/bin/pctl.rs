//! `pctl`: the administrator's command line for Portico resources, users,
//! join tokens and the audit log.

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use portico_cli::output::{Format, emit, labels_text, structured, table};
use portico_cli::{CliResult, Fail, Target, connect_api, finish};
use portico_core::parse::{MAX_FILE_BYTES, parse_documents};
use portico_core::time::{format_rfc3339, now_ms, parse_duration};
use portico_core::{Kind, Resource};
use portico_proto::v1;

#[derive(Parser)]
#[command(
    name = "pctl",
    version,
    about = "Administer a Portico cluster: MCP servers (apps), roles, users, join tokens and the audit log.",
    after_help = "On the auth host, pctl uses the admin identity in the data directory (--data-dir or PORTICO_DATA_DIR).\nElsewhere, log in first with psh login; pctl then goes through the proxy with your own permissions."
)]
struct Cli {
    /// Identity file to use (overrides everything else).
    #[arg(long, global = true, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Data directory of the local auth-service, whose admin identity to use.
    #[arg(long, global = true, env = "PORTICO_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Auth-service address (host:port); defaults to the identity's.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    auth_server: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create resources from a YAML file (several documents separated by ---); all or nothing.
    Create {
        /// Overwrite resources that already exist (needs the update permission).
        #[arg(short = 'f', long = "force")]
        force: bool,
        /// The file, or - for standard input.
        file: String,
    },
    /// Show resources: apps, roles, users, tokens, app_servers; KIND/NAME or KIND NAME for one.
    Get {
        what: String,
        name: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Remove a resource: app/NAME, role/NAME, user/NAME or token/NAME.
    Rm { what: String },
    /// Manage users.
    Users {
        #[command(subcommand)]
        cmd: UsersCmd,
    },
    /// Manage join tokens for agents and proxies.
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// The cluster's certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Live service identities (proxies and agents): list, revoke.
    Identities {
        #[command(subcommand)]
        cmd: IdentitiesCmd,
    },
    /// Query the audit log.
    Events {
        #[command(subcommand)]
        cmd: EventsCmd,
    },
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Add a user; prints a generated password once unless --password-stdin is given.
    Add {
        name: String,
        /// Comma-separated role names, e.g. --roles=mcp-user,app-admin.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Read the password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Remove a user; their logins end at once.
    Rm { name: String },
    /// Lock a user: they cannot log in, their tokens stop working and their
    /// MCP sessions end within a second.
    Lock { name: String },
    /// Unlock a locked user.
    Unlock { name: String },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a single-use join token.
    Add {
        /// What the token joins as: app, proxy or app,proxy.
        #[arg(long = "type", value_delimiter = ',', required = true)]
        kind: Vec<String>,
        /// How long the token is valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// List unused join tokens (their names, never their secrets).
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Revoke a join token by name.
    Rm { name: String },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Print the cluster CA's certificate (PEM); its key never leaves the auth-service.
    Export,
}

#[derive(Subcommand)]
enum IdentitiesCmd {
    /// List live service identities: host id, role, expiry, last seen.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Revoke a service identity by host id: its tunnels and API streams
    /// close within a second, and it must join again with a new token.
    Rm { host_id: String },
}

#[derive(Subcommand)]
enum EventsCmd {
    /// List audit events, oldest first.
    Ls(EventsLs),
}

#[derive(Args)]
struct EventsLs {
    /// Only this type (e.g. user.login) or family (e.g. app, mcp.session).
    #[arg(long = "type")]
    kind: Option<String>,
    /// Only events newer than this, e.g. 15m, 1h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Only events by or about this user.
    #[arg(long)]
    user: Option<String>,
    /// Only events about this app.
    #[arg(long)]
    app: Option<String>,
    #[arg(long, default_value_t = 1000)]
    limit: i64,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => finish(Err(Fail::new(format!("cannot start: {e}")))),
    };
    finish(rt.block_on(run(cli)))
}

async fn run(cli: Cli) -> CliResult {
    let target = Target {
        identity: cli.identity,
        data_dir: cli.data_dir,
        auth_server: cli.auth_server,
    };
    match cli.cmd {
        Cmd::Create { force, file } => create(&target, &file, force).await,
        Cmd::Get { what, name, format } => get(&target, &what, name, format).await,
        Cmd::Rm { what } => {
            let (kind, name) = split_kind_name(&what)?;
            let Some(name) = name else {
                return Err(Fail::usage(format!(
                    "say which {kind} to remove: pctl rm {kind}/NAME"
                )));
            };
            remove(&target, kind, &name).await
        }
        Cmd::Users { cmd } => match cmd {
            UsersCmd::Add {
                name,
                roles,
                password_stdin,
            } => add_user(&target, name, roles, password_stdin).await,
            UsersCmd::Ls { format } => get(&target, "users", None, format).await,
            UsersCmd::Rm { name } => remove(&target, Kind::User, &name).await,
            UsersCmd::Lock { name } => set_locked(&target, &name, true).await,
            UsersCmd::Unlock { name } => set_locked(&target, &name, false).await,
        },
        Cmd::Tokens { cmd } => match cmd {
            TokensCmd::Add { kind, ttl, format } => add_token(&target, kind, &ttl, format).await,
            TokensCmd::Ls { format } => get(&target, "tokens", None, format).await,
            TokensCmd::Rm { name } => remove(&target, Kind::Token, &name).await,
        },
        Cmd::Ca { cmd: CaCmd::Export } => {
            let mut api = connect_api(&target).await?;
            let ca = api
                .get_cluster_ca(v1::GetClusterCaRequest {})
                .await?
                .into_inner();
            print!("{}", ca.cert_pem);
            // The pin goes to standard error, so that standard output is the PEM file.
            if let Ok(der) = portico_tls::pki::first_cert(&ca.cert_pem) {
                eprintln!("ca_pin: {}", portico_tls::pki::ca_pin(&der));
            }
            Ok(())
        }
        Cmd::Identities { cmd } => match cmd {
            IdentitiesCmd::Ls { format } => identities(&target, format).await,
            IdentitiesCmd::Rm { host_id } => revoke_identity(&target, &host_id).await,
        },
        Cmd::Events {
            cmd: EventsCmd::Ls(a),
        } => events(&target, a).await,
    }
}

fn split_kind_name(what: &str) -> CliResult<(Kind, Option<String>)> {
    let (k, n) = match what.split_once('/') {
        Some((k, n)) => (k, Some(n.to_string())),
        None => (what, None),
    };
    let kind = Kind::parse(k)
        .filter(|k| *k != Kind::Event)
        .ok_or_else(|| {
            Fail::usage(format!(
                "unknown kind {k:?}; use apps, roles, users, tokens or app_servers"
            ))
        })?;
    Ok((kind, n.filter(|n| !n.is_empty())))
}

async fn create(t: &Target, file: &str, overwrite: bool) -> CliResult {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(MAX_FILE_BYTES as u64 + 1)
            .read_to_string(&mut s)
            .map_err(|e| Fail::new(format!("cannot read standard input: {e}")))?;
        s
    } else {
        let meta =
            std::fs::metadata(file).map_err(|e| Fail::new(format!("cannot read {file}: {e}")))?;
        if meta.len() > MAX_FILE_BYTES as u64 {
            return Err(Fail::new(format!(
                "{file} is {} bytes; resource files may be at most {MAX_FILE_BYTES} bytes",
                meta.len()
            )));
        }
        std::fs::read_to_string(file).map_err(|e| Fail::new(format!("cannot read {file}: {e}")))?
    };
    let resources = parse_documents(file, &text).map_err(|e| Fail::new(e.message))?;
    let mut api = connect_api(t).await?;
    let req = v1::CreateRequest {
        resources: resources
            .iter()
            .map(|r| v1::Resource {
                kind: r.kind().as_str().into(),
                json: r.to_json(),
            })
            .collect(),
        overwrite,
    };
    let resp = api.create(req).await?.into_inner();
    for r in resp.results {
        println!(
            "{} {:?} {}",
            r.kind,
            r.name,
            if r.created { "created" } else { "updated" }
        );
    }
    Ok(())
}

fn parse_items(kind: Kind, items: &[v1::Resource]) -> Vec<Resource> {
    items
        .iter()
        .filter_map(|i| Resource::from_json(kind, &i.json).ok())
        .collect()
}

async fn get(t: &Target, what: &str, name: Option<String>, format: Format) -> CliResult {
    let (kind, n1) = split_kind_name(what)?;
    let name = n1.or(name);
    let mut api = connect_api(t).await?;
    let items = match &name {
        Some(n) => vec![
            api.get(v1::GetRequest {
                kind: kind.as_str().into(),
                name: n.clone(),
            })
            .await?
            .into_inner(),
        ],
        None => {
            api.list(v1::ListRequest {
                kind: kind.as_str().into(),
                labels: Default::default(),
            })
            .await?
            .into_inner()
            .items
        }
    };
    let resources = parse_items(kind, &items);
    if format != Format::Text {
        let values: Vec<serde_json::Value> = resources.iter().map(|r| r.to_value()).collect();
        emit(&structured(&values, format));
        return Ok(());
    }
    let (header, rows) = rows_of(kind, &resources);
    emit(&table(&header, &rows));
    Ok(())
}

/// The text table of `pctl get` for one kind: its columns and one row per resource.
fn rows_of(kind: Kind, resources: &[Resource]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    match kind {
        Kind::App => (
            vec!["Name", "Description", "Type", "Labels"],
            resources
                .iter()
                .filter_map(|r| match r {
                    Resource::App(a) => Some(vec![
                        a.metadata.name.clone(),
                        a.metadata.description.clone(),
                        a.spec.type_label().into(),
                        labels_text(
                            a.metadata
                                .labels
                                .iter()
                                .map(|(k, v)| (k.as_str(), v.as_str())),
                        ),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::Role => (
            vec!["Name", "Description"],
            resources
                .iter()
                .map(|r| vec![r.name().into(), r.metadata().description.clone()])
                .collect(),
        ),
        Kind::User => (
            vec!["Name", "Roles"],
            resources
                .iter()
                .filter_map(|r| match r {
                    Resource::User(u) => {
                        Some(vec![u.metadata.name.clone(), u.spec.roles.join(",")])
                    }
                    _ => None,
                })
                .collect(),
        ),
        Kind::Token => (
            vec!["Name", "Type", "Expires"],
            resources
                .iter()
                .filter_map(|r| match r {
                    Resource::Token(tk) => Some(vec![
                        tk.metadata.name.clone(),
                        tk.spec
                            .roles
                            .iter()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        tk.metadata.expires.clone().unwrap_or_default(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::AppServer | Kind::Event => (
            vec!["App", "Host", "Expires"],
            resources
                .iter()
                .filter_map(|r| match r {
                    Resource::AppServer(s) => Some(vec![
                        s.spec.app.clone(),
                        s.spec.host_id.clone(),
                        s.metadata.expires.clone().unwrap_or_default(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
    }
}

async fn set_locked(t: &Target, name: &str, locked: bool) -> CliResult {
    let mut api = connect_api(t).await?;
    let r = api
        .get(v1::GetRequest {
            kind: "user".into(),
            name: name.into(),
        })
        .await?
        .into_inner();
    let mut v: serde_json::Value = serde_json::from_str(&r.json)
        .map_err(|e| Fail::new(format!("the server sent an unreadable user: {e}")))?;
    v["spec"]["locked"] = serde_json::Value::Bool(locked);
    api.create(v1::CreateRequest {
        resources: vec![v1::Resource {
            kind: "user".into(),
            json: v.to_string(),
        }],
        overwrite: true,
    })
    .await?;
    if locked {
        println!("user {name} locked: they cannot log in, and their sessions end");
    } else {
        println!("user {name} unlocked");
    }
    Ok(())
}

async fn remove(t: &Target, kind: Kind, name: &str) -> CliResult {
    let mut api = connect_api(t).await?;
    api.delete(v1::DeleteRequest {
        kind: kind.as_str().into(),
        name: name.into(),
    })
    .await?;
    println!("{kind} {name:?} removed");
    Ok(())
}

async fn add_user(t: &Target, name: String, roles: Vec<String>, password_stdin: bool) -> CliResult {
    let password = if password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut s)
            .map_err(|e| Fail::new(format!("cannot read the password from standard input: {e}")))?;
        let p = s.trim_end_matches(['\r', '\n']).to_string();
        if p.is_empty() {
            return Err(Fail::new("standard input held no password"));
        }
        p
    } else {
        String::new()
    };
    let mut api = connect_api(t).await?;
    let resp = api
        .add_user(v1::AddUserRequest {
            name: name.clone(),
            roles: roles.clone(),
            password,
        })
        .await?
        .into_inner();
    println!("user {name:?} created with roles {}", roles.join(","));
    if !resp.password.is_empty() {
        println!("password: {}", resp.password);
        println!("this password is shown once; give it to {name} to log in with psh login");
    }
    Ok(())
}

async fn add_token(t: &Target, kinds: Vec<String>, ttl: &str, format: Format) -> CliResult {
    let ttl_ms = parse_duration(ttl).filter(|d| *d > 0).ok_or_else(|| {
        Fail::usage(format!(
            "--ttl {ttl:?} is not a duration like 30m, 1h or 7d"
        ))
    })?;
    let mut api = connect_api(t).await?;
    let resp = api
        .create_token(v1::CreateTokenRequest {
            roles: kinds.clone(),
            ttl_ms,
        })
        .await?
        .into_inner();
    if format != Format::Text {
        let v = serde_json::json!({"token": resp.token, "name": resp.name, "type": kinds, "expires": format_rfc3339(resp.expires_ms)});
        emit(&structured(&[v], format));
        return Ok(());
    }
    println!("token: {}", resp.token);
    println!(
        "type: {}  expires: {}  name: {}",
        kinds.join(","),
        format_rfc3339(resp.expires_ms),
        resp.name
    );
    println!("it can be used once; put it in the agent's join_token or join_token_file");
    Ok(())
}

async fn identities(t: &Target, format: Format) -> CliResult {
    let mut api = connect_api(t).await?;
    let list = api
        .list_identities(v1::ListIdentitiesRequest {})
        .await?
        .into_inner()
        .identities;
    let when = |ms: i64, none: &str| {
        if ms == 0 {
            none.to_string()
        } else {
            format_rfc3339(ms)
        }
    };
    if format != Format::Text {
        let values: Vec<serde_json::Value> = list
            .iter()
            .map(|i| {
                serde_json::json!({
                    "host_id": i.host_id, "roles": i.roles,
                    "expires": (i.expires_ms != 0).then(|| format_rfc3339(i.expires_ms)),
                    "last_seen": (i.last_seen_ms != 0).then(|| format_rfc3339(i.last_seen_ms)),
                })
            })
            .collect();
        emit(&structured(&values, format));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.host_id.clone(),
                i.roles.join(","),
                when(i.expires_ms, "never"),
                when(i.last_seen_ms, "-"),
            ]
        })
        .collect();
    emit(&table(&["Host ID", "Role", "Expires", "Last seen"], &rows));
    Ok(())
}

async fn revoke_identity(t: &Target, host_id: &str) -> CliResult {
    let mut api = connect_api(t).await?;
    let r = api
        .revoke_identity(v1::RevokeIdentityRequest {
            host_id: host_id.to_string(),
        })
        .await?
        .into_inner();
    println!(
        "revoked {} identit{} of {host_id}; it must join again with a new token",
        r.revoked,
        if r.revoked == 1 { "y" } else { "ies" }
    );
    Ok(())
}

async fn events(t: &Target, a: EventsLs) -> CliResult {
    let since_ms = match &a.since {
        Some(s) => {
            let d = parse_duration(s).ok_or_else(|| {
                Fail::usage(format!(
                    "--since {s:?} is not a duration like 15m, 1h or 7d"
                ))
            })?;
            now_ms() - d
        }
        None => 0,
    };
    let mut api = connect_api(t).await?;
    let resp = api
        .list_events(v1::ListEventsRequest {
            r#type: a.kind.unwrap_or_default(),
            since_ms,
            limit: a.limit,
            user: a.user.unwrap_or_default(),
            app: a.app.unwrap_or_default(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let values: Vec<serde_json::Value> = resp
        .events
        .iter()
        .map(|e| {
            serde_json::json!({
                "id": e.id,
                "time": format_rfc3339(e.time_ms),
                "type": e.r#type,
                "actor": e.actor,
                "success": e.success,
                "fields": serde_json::from_str::<serde_json::Value>(&e.fields_json).unwrap_or_default(),
            })
        })
        .collect();
    if a.format != Format::Text {
        emit(&structured(&values, a.format));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = values
        .iter()
        .map(|v| {
            let fields = v["fields"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| match v {
                            serde_json::Value::String(s) => format!("{k}={s}"),
                            other => format!("{k}={other}"),
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            vec![
                v["time"].as_str().unwrap_or_default().to_string(),
                v["type"].as_str().unwrap_or_default().to_string(),
                v["actor"].as_str().unwrap_or_default().to_string(),
                if v["success"].as_bool() == Some(true) {
                    "ok".into()
                } else {
                    "failed".into()
                },
                fields,
            ]
        })
        .collect();
    emit(&table(
        &["Time", "Type", "Actor", "Result", "Details"],
        &rows,
    ));
    Ok(())
}
