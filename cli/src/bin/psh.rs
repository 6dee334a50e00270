//! `psh`: the user's command line. Log in once through the proxy, list the
//! MCP servers your roles reach, and connect MCP clients to them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use portico_cli::http::{base_url, client, get_body};
use portico_cli::output::{Format, emit, labels_text, structured, table};
use portico_cli::profile::{self, Profile};
use portico_cli::{CliResult, Fail, finish};
use portico_core::client_config::{self, McpClient};
use portico_core::time::format_rfc3339;
use portico_proto::client::connect;
use portico_proto::v1;
use portico_tls::Trust;

#[derive(Parser)]
#[command(
    name = "psh",
    version,
    about = "Reach the MCP servers your Portico roles allow, through one proxy.",
    after_help = "Start with: psh login --proxy=HOST:PORT --user=NAME\nYour login is kept in $PORTICO_HOME/profile.yaml (default ~/.portico), readable only by you."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Log in to a proxy; asks for your password.
    ///
    /// The proxy is verified against the system's root certificates, or
    /// --ca-file. A proxy with a certificate nothing vouches for (the
    /// self-signed one `portico start` makes) shows its fingerprint and, on a
    /// terminal, asks once whether to trust it; the answer is kept in the
    /// profile. Without a terminal, pass --fingerprint or --ca-file.
    Login {
        /// The proxy's address, host:port (or an https:// URL).
        #[arg(long)]
        proxy: String,
        #[arg(long)]
        user: String,
        /// Read the password from standard input (for scripts).
        #[arg(long)]
        password_stdin: bool,
        /// Trust the proxy's certificate if these CA certificates (PEM) vouch for it.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<std::path::PathBuf>,
        /// Trust exactly the proxy certificate with this SHA-256 fingerprint
        /// (SHA256:AB:CD:..., as portico start prints it).
        #[arg(long, value_name = "SHA256:...")]
        fingerprint: Option<String>,
        /// Do not verify the proxy at all: anyone between you and it can read
        /// your password and every tool call.
        #[arg(long, conflicts_with_all = ["ca_file", "fingerprint"])]
        insecure: bool,
    },
    /// End your login session at the proxy and forget the saved login.
    Logout,
    /// Show who you are logged in as.
    Status {
        /// Also print the bearer token (for MCP clients that take a header).
        #[arg(long)]
        token: bool,
    },
    /// MCP servers.
    Mcp {
        #[command(subcommand)]
        cmd: McpCmd,
    },
    /// Local endpoints that carry your login, for clients that cannot.
    Proxy {
        #[command(subcommand)]
        cmd: ProxyCmd,
    },
}

#[derive(Subcommand)]
enum ProxyCmd {
    /// Serve an MCP server as Streamable HTTP on loopback, without a token:
    /// for clients that can neither send an Authorization header nor run
    /// psh mcp connect. Prints the URL; answers only this machine's
    /// requests for it, and stops when your login expires.
    Mcp {
        name: String,
        /// The local port (default: any free one; the URL is printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum McpCmd {
    /// List the MCP servers you can reach, optionally filtered by LABEL=VALUE.
    Ls {
        labels: Vec<String>,
        /// Only servers whose name, description or labels contain this text.
        #[arg(long)]
        search: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Also show how many agents serve each and its endpoint.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Print (or merge into a file) the client configuration that launches psh mcp connect.
    Config {
        name: Option<String>,
        /// Every server you can reach.
        #[arg(long)]
        all: bool,
        /// claude, cursor, vscode, or a path to a JSON config file to update.
        #[arg(long)]
        client_config: Option<String>,
    },
    /// Bridge stdio to an MCP server through the proxy (what MCP clients launch).
    Connect { name: String },
}

fn main() {
    let cli = Cli::parse();
    // The bridges run for hours and carry traffic both ways: two worker
    // threads. Every other command is one request and its answer, done
    // fastest on the calling thread.
    let long_running = matches!(
        cli.cmd,
        Cmd::Proxy { .. }
            | Cmd::Mcp {
                cmd: McpCmd::Connect { .. }
            }
    );
    let mut builder = if long_running {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => finish(Err(Fail::new(format!("cannot start: {e}")))),
    };
    finish(rt.block_on(run(cli)))
}

fn need_profile() -> CliResult<Profile> {
    let p = Profile::load()?
        .ok_or_else(|| Fail::new("not logged in: run psh login --proxy=HOST:PORT --user=NAME"))?;
    p.check_fresh()?;
    Ok(p)
}

async fn run(cli: Cli) -> CliResult {
    match cli.cmd {
        Cmd::Login {
            proxy,
            user,
            password_stdin,
            ca_file,
            fingerprint,
            insecure,
        } => {
            let trust = choose_trust(&proxy, ca_file, fingerprint, insecure).await?;
            login(proxy, user, password_stdin, trust).await
        }
        Cmd::Logout => {
            // The token stops working at the proxy too; if the proxy cannot
            // be reached, the login is still forgotten here.
            if let Ok(Some(p)) = Profile::load()
                && let Ok(dial) = p.dial()
            {
                match connect(&dial, Some(&p.token)).await {
                    Ok(mut api) => {
                        if let Err(e) = api.logout(v1::LogoutRequest {}).await
                            && e.code() != tonic::Code::Unauthenticated
                        {
                            eprintln!(
                                "warning: the proxy did not end the session ({}); it ends when it expires",
                                e.message()
                            );
                        }
                    }
                    Err(e) => eprintln!(
                        "warning: cannot reach the proxy ({e}); the session ends when it expires"
                    ),
                }
            }
            if Profile::remove()? {
                println!("logged out");
            } else {
                println!("not logged in");
            }
            Ok(())
        }
        Cmd::Status { token } => status(token).await,
        Cmd::Mcp { cmd } => match cmd {
            McpCmd::Ls {
                labels,
                search,
                format,
                verbose,
            } => ls(labels, search, format, verbose).await,
            McpCmd::Config {
                name,
                all,
                client_config,
            } => config(name, all, client_config).await,
            McpCmd::Connect { name } => portico_cli::connect::run(need_profile()?, name).await,
        },
        Cmd::Proxy {
            cmd: ProxyCmd::Mcp { name, port },
        } => portico_cli::local::run(need_profile()?, name, port).await,
    }
}

/// The trust named on the command line, or the system's roots, or, for a
/// certificate nothing vouches for, its fingerprint once a person at a
/// terminal accepts it.
async fn choose_trust(
    proxy: &str,
    ca_file: Option<std::path::PathBuf>,
    fingerprint: Option<String>,
    insecure: bool,
) -> CliResult<Trust> {
    if let Some(f) = ca_file {
        let pem = std::fs::read_to_string(&f)
            .map_err(|e| Fail::new(format!("cannot read {}: {e}", f.display())))?;
        return Ok(Trust::Roots(pem));
    }
    if let Some(fp) = fingerprint {
        let fp = portico_tls::pki::normalize_fingerprint(&fp).ok_or_else(|| {
            Fail::usage("--fingerprint: expected SHA256: and 64 hex digits (colons optional)")
        })?;
        return Ok(Trust::Fingerprint(fp));
    }
    if insecure {
        eprintln!(
            "warning: --insecure: the proxy is not verified; anyone on the path can read your password, your token and every tool call"
        );
        return Ok(Trust::Insecure);
    }
    if proxy.trim().starts_with("http://") {
        eprintln!("warning: http:// sends your password and every tool call unencrypted");
        return Ok(Trust::System);
    }
    // Does the system vouch for it? If not, what does it present?
    let addr = proxy
        .trim()
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let system = portico_tls::config::client_for(&Trust::System, &[b"h2"]);
    if let Ok(cfg) = system
        && portico_tls::Connector::tls(cfg)
            .connect(&addr)
            .await
            .is_ok()
    {
        return Ok(Trust::System);
    }
    let probe = portico_tls::config::client_for(&Trust::Insecure, &[b"h2"]).map_err(Fail::new)?;
    let io = portico_tls::Connector::tls(probe)
        .connect(&addr)
        .await
        .map_err(|e| Fail::new(format!("cannot reach {addr}: {e}")))?;
    let chain = io.peer_certificates().unwrap_or_default();
    let leaf = chain
        .first()
        .ok_or_else(|| Fail::new(format!("{addr} presented no certificate")))?;
    let fp = portico_tls::pki::fingerprint(leaf);
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        eprintln!(
            "The proxy at {addr} presented a certificate that no authority you trust vouches for."
        );
        eprintln!("Its fingerprint is {fp}");
        eprintln!("Compare it with the one portico start printed on the proxy's host.");
        let answer = rpassword::prompt_password("Trust this proxy from now on? [y/N] ")
            .map_err(|e| Fail::new(format!("cannot read the answer: {e}")))?;
        if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            let hex = portico_tls::pki::normalize_fingerprint(&fp)
                .ok_or_else(|| Fail::new("internal error: a fingerprint did not parse"))?;
            return Ok(Trust::Fingerprint(hex));
        }
        return Err(Fail::new("not logged in: the proxy was not trusted"));
    }
    Err(Fail::new(format!(
        "the proxy at {addr} presented a certificate that no authority you trust vouches for (fingerprint {fp}); check it with the proxy's operator (portico start prints it) and pass --fingerprint {fp}, or --ca-file FILE with the certificate (web-cert.pem in the proxy's data directory); --insecure gives up verification"
    )))
}

async fn login(proxy: String, user: String, password_stdin: bool, trust: Trust) -> CliResult {
    let password = if password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut s)
            .map_err(|e| Fail::new(format!("cannot read the password: {e}")))?;
        s.trim_end_matches(['\r', '\n']).to_string()
    } else {
        rpassword::prompt_password(format!("password for {user}: "))
            .map_err(|e| Fail::new(format!("cannot read the password: {e}")))?
    };
    let dial = portico_proto::client::Dial::trusting(&proxy, &trust).map_err(Fail::new)?;
    let mut api = connect(&dial, None).await.map_err(Fail::new)?;
    let resp = api
        .login(v1::LoginRequest {
            user: user.clone(),
            password,
        })
        .await?
        .into_inner();
    let p = Profile {
        proxy: proxy.clone(),
        user: resp.user.clone(),
        token: resp.token,
        expires_ms: resp.expires_ms,
        roles: resp.roles.clone(),
        ca: match &trust {
            Trust::Roots(pem) => Some(pem.clone()),
            _ => None,
        },
        fingerprint: match &trust {
            Trust::Fingerprint(fp) => Some(fp.clone()),
            _ => None,
        },
        insecure: trust == Trust::Insecure,
    };
    p.save()?;
    println!("logged in as {} at {proxy}", resp.user);
    println!(
        "roles: {}",
        if resp.roles.is_empty() {
            "(none)".into()
        } else {
            resp.roles.join(", ")
        }
    );
    println!("valid until {}", format_rfc3339(resp.expires_ms));
    Ok(())
}

async fn status(show_token: bool) -> CliResult {
    let p = need_profile()?;
    let mut api = connect(&p.dial()?, Some(&p.token))
        .await
        .map_err(Fail::new)?;
    let who = api.who_am_i(v1::WhoAmIRequest {}).await?.into_inner();
    println!("proxy:   {}", p.proxy);
    println!("user:    {}", who.name);
    println!("roles:   {}", who.roles.join(", "));
    println!("expires: {}", format_rfc3339(who.expires_ms));
    println!("profile: {}", profile::path().display());
    if show_token {
        println!("token:   {}", p.token);
    }
    Ok(())
}

/// A string of the listing, borrowed from the proxy's answer unless it
/// held escapes: ten thousand rows parse without a copy of each field.
#[derive(serde::Deserialize, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(serde::Deserialize)]
struct AppRow<'a> {
    #[serde(borrow)]
    name: Text<'a>,
    #[serde(borrow, default)]
    description: Option<Text<'a>>,
    #[serde(borrow, rename = "type")]
    kind: Text<'a>,
    #[serde(borrow, default)]
    labels: BTreeMap<Text<'a>, Text<'a>>,
    #[serde(borrow, default)]
    allowed_tools: Vec<Text<'a>>,
    #[serde(borrow, default)]
    denied_tools: Vec<Text<'a>>,
    #[serde(borrow, default)]
    agents: Vec<Text<'a>>,
}

impl AppRow<'_> {
    fn description(&self) -> &str {
        self.description.as_deref().unwrap_or("")
    }

    fn labels(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        self.labels.iter().map(|(k, v)| (&**k, &**v))
    }
}

/// The proxy's answer to `GET /v1/apps`, to parse with `parse_apps`.
async fn fetch_apps(p: &Profile) -> CliResult<(String, bytes::Bytes)> {
    let url = format!("{}/v1/apps", base_url(&p.proxy));
    let body = get_body(&client(p.connector()?), &url, &p.token).await?;
    Ok((url, body))
}

fn parse_apps<'a>((url, body): &'a (String, bytes::Bytes)) -> CliResult<Vec<AppRow<'a>>> {
    serde_json::from_slice(body).map_err(|e| {
        Fail::new(format!(
            "{url} answered with JSON Portico does not expect: {e}"
        ))
    })
}

async fn ls(
    labels: Vec<String>,
    search: Option<String>,
    format: Format,
    verbose: bool,
) -> CliResult {
    let mut want = Vec::new();
    for l in &labels {
        let Some((k, v)) = l.split_once('=') else {
            return Err(Fail::usage(format!("{l:?} is not LABEL=VALUE")));
        };
        want.push((k.to_string(), v.to_string()));
    }
    let p = need_profile()?;
    let answer = fetch_apps(&p).await?;
    let apps: Vec<AppRow> = parse_apps(&answer)?
        .into_iter()
        .filter(|a| {
            portico_core::labels::listing_matches(
                &a.name,
                a.description(),
                a.labels(),
                &want,
                search.as_deref(),
            )
        })
        .collect();
    let base = base_url(&p.proxy);
    if format != Format::Text {
        let values: Vec<serde_json::Value> = apps
            .iter()
            .map(|a| {
                let mut v = serde_json::json!({
                    "name": a.name,
                    "description": a.description(),
                    "type": a.kind,
                    "labels": a.labels,
                    "allowed_tools": a.allowed_tools,
                    "denied_tools": a.denied_tools,
                });
                if verbose {
                    v["agents"] = serde_json::json!(a.agents);
                    v["endpoint"] = serde_json::json!(format!("{base}/mcp/{}", &*a.name));
                }
                v
            })
            .collect();
        if format == Format::Json {
            emit(&(serde_json::to_string_pretty(&values).unwrap_or_default() + "\n"));
        } else {
            emit(&structured(&values, format));
        }
        return Ok(());
    }
    let mut header = vec!["Name", "Description", "Type", "Allowed Tools", "Labels"];
    if verbose {
        header.extend(["Agents", "Endpoint"]);
    }
    let rows: Vec<Vec<std::borrow::Cow<str>>> = apps
        .iter()
        .map(|a| {
            let tools = portico_core::rbac::summary(&a.allowed_tools, &a.denied_tools);
            let labels = labels_text(a.labels());
            let mut r: Vec<std::borrow::Cow<str>> = vec![
                (*a.name).into(),
                a.description().into(),
                (*a.kind).into(),
                tools.into(),
                labels.into(),
            ];
            if verbose {
                let agents: Vec<&str> = a.agents.iter().map(|x| &**x).collect();
                r.push(agents.join(", ").into());
                r.push(format!("{base}/mcp/{}", &*a.name).into());
            }
            r
        })
        .collect();
    emit(&table(&header, &rows));
    // The process ends now: freeing ten thousand rows one by one first
    // would only make it end later.
    std::mem::forget(rows);
    std::mem::forget(apps);
    std::mem::forget(answer);
    Ok(())
}

async fn config(name: Option<String>, all: bool, client_config: Option<String>) -> CliResult {
    let p = need_profile()?;
    let answer = fetch_apps(&p).await?;
    let apps = parse_apps(&answer)?;
    let names: Vec<String> = match (&name, all) {
        (Some(_), true) => return Err(Fail::usage("give a NAME or --all, not both")),
        (Some(n), false) => {
            if !apps.iter().any(|a| *a.name == **n) {
                return Err(Fail::new(format!(
                    "no MCP server {n:?} that you can reach; see psh mcp ls"
                )));
            }
            vec![n.clone()]
        }
        (None, true) => apps.iter().map(|a| a.name.to_string()).collect(),
        (None, false) => {
            return Err(Fail::usage(
                "say which server: psh mcp config NAME, or --all",
            ));
        }
    };
    let psh = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "psh".into());
    let (client, file) = match client_config.as_deref() {
        None => (McpClient::Claude, None),
        Some(c) => match McpClient::parse(c) {
            Some(known) => (known, None),
            None => (McpClient::Claude, Some(PathBuf::from(c))),
        },
    };
    let key = client.servers_key();
    let servers = client_config::servers(&psh, &names, client);
    let Some(path) = file else {
        let doc = client_config::document(&psh, &names, client);
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(());
    };
    let mut doc: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => serde_json::from_str(&t)
            .map_err(|e| Fail::new(format!("{} is not JSON ({e}); not changed", path.display())))?,
        Ok(_) => serde_json::json!({}),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(Fail::new(format!("cannot read {}: {e}", path.display()))),
    };
    let Some(obj) = doc.as_object_mut() else {
        return Err(Fail::new(format!(
            "{} does not hold a JSON object; not changed",
            path.display()
        )));
    };
    let entry = obj.entry(key).or_insert_with(|| serde_json::json!({}));
    let Some(map) = entry.as_object_mut() else {
        return Err(Fail::new(format!(
            "{key} in {} is not an object; not changed",
            path.display()
        )));
    };
    for (k, v) in servers {
        map.insert(k, v);
    }
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n";
    let tmp = path.with_extension("portico-tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Fail::new(format!("cannot write {}: {e}", path.display())))?;
    println!("added {} server(s) to {}", names.len(), path.display());
    Ok(())
}
