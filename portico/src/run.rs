//! Starting the enabled services in one process, wiring in-process ones to
//! each other, and shutting down gracefully on SIGTERM or Ctrl-C.

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpSocket};

use crate::config::Config;

async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    reserve(addr, what).await?.listen()
}

/// A bound port that does not accept connections yet: the service listens
/// only once it can answer, so whoever connects is served.
struct Reserved {
    socket: TcpSocket,
    addr: std::net::SocketAddr,
    what: String,
}

impl Reserved {
    fn listen(self) -> Result<TcpListener> {
        self.socket
            .listen(1024)
            .with_context(|| format!("cannot listen on {} for the {}", self.addr, self.what))
    }
}

async fn reserve(addr: &str, what: &str) -> Result<Reserved> {
    let target = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr} for the {what}"))?
        .next()
        .with_context(|| format!("{addr} names no address for the {what}"))?;
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .with_context(|| format!("cannot open a socket for the {what}"))?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(target)
        .with_context(|| format!("cannot listen on {addr} for the {what}"))?;
    let addr = socket.local_addr()?;
    Ok(Reserved {
        socket,
        addr,
        what: what.to_string(),
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Where a service started in this process can be reached by the others.
fn reachable(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// The auth-service, once it can answer: its server, task and address.
struct AuthRunning {
    server: std::sync::Arc<portico_auth::AuthServer>,
    task: tokio::task::JoinHandle<()>,
    addr: String,
}

/// Opens storage and writes the admin identity before listening, so that
/// whoever connects can be answered.
async fn start_auth(
    a: &portico_auth::AuthConfig,
    data_dir: &std::path::Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<AuthRunning> {
    let reserved = reserve(&a.listen_addr, "auth-service").await?;
    let local = reserved.addr;
    let server = portico_auth::AuthServer::open(a, data_dir)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let addr = reachable(local);
    server
        .ensure_admin_identity(data_dir, &addr)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    // Ready: storage is open and the admin identity written.
    let listener = reserved.listen()?;
    let s = server.clone();
    let task = tokio::spawn(async move {
        let r = portico_auth::serve(s, listener, async move {
            let _ = stop.wait_for(|v| *v).await;
        })
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "auth-service stopped");
        }
    });
    tracing::info!(addr = %local, "auth-service listening");
    Ok(AuthRunning { server, task, addr })
}

/// A service identity issued by the in-process auth-service when the
/// service has no join token of its own.
async fn local_identity(
    auth: Option<&AuthRunning>,
    joins: bool,
    host: String,
    role: portico_core::SystemRole,
) -> Result<Option<std::sync::Arc<portico_proto::join::Credentials>>> {
    match auth {
        Some(a) if !joins => {
            let issued = a
                .server
                .issue_service_identity(&host, role)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            let creds = portico_proto::join::Credentials::issued(&host, role, issued, &a.addr)
                .map_err(|e| anyhow::anyhow!(e.message))?;
            Ok(Some(std::sync::Arc::new(creds)))
        }
        _ => Ok(None),
    }
}

async fn start_proxy(
    p: &portico_proxy::ProxyConfig,
    auth: Option<&AuthRunning>,
    data_dir: &std::path::Path,
) -> Result<(portico_proxy::Proxy, String)> {
    let mut p = p.clone();
    if p.auth_servers.is_empty() {
        match auth {
            Some(a) => p.auth_servers = vec![a.addr.clone()],
            None => {
                bail!("proxy_service.auth_servers: required when the auth-service runs elsewhere")
            }
        }
    }
    let joins = p.join_token.is_some() || p.join_token_file.is_some();
    let host = p.host_id.clone().unwrap_or_else(|| "local-proxy".into());
    let issued = local_identity(auth, joins, host, portico_core::SystemRole::Proxy).await?;
    // A proxy whose identity this process's auth-service issued hands its
    // audit events to it directly.
    let local_audit = match (auth, &issued) {
        (Some(a), Some(_)) => {
            Some(a.server.local_auditor() as std::sync::Arc<dyn portico_proto::client::LocalAudit>)
        }
        _ => None,
    };
    let creds = portico_proxy::Credentials {
        issued,
        data_dir: data_dir.to_path_buf(),
        local_audit,
    };
    let listeners = portico_proxy::Listeners {
        web: bind(&p.web_listen_addr, "proxy web listener").await?,
        tunnel: bind(&p.tunnel_listen_addr, "proxy tunnel listener").await?,
    };
    let started = portico_proxy::start(&p, creds, listeners)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    tracing::info!(web = %started.web_addr, tunnel = %started.tunnel_addr, "proxy listening");
    let tunnel = reachable(started.tunnel_addr);
    Ok((started, tunnel))
}

async fn start_agent(
    a: &portico_agent::AgentConfig,
    auth: Option<&AuthRunning>,
    tunnel: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<portico_agent::Agent> {
    let mut a = a.clone();
    if a.auth_servers.is_empty() {
        match auth {
            Some(x) => a.auth_servers = vec![x.addr.clone()],
            None => {
                bail!("app_service.auth_servers: required when the auth-service runs elsewhere")
            }
        }
    }
    if a.proxy_servers.is_empty() {
        match tunnel {
            Some(x) => a.proxy_servers = vec![x.to_string()],
            None => bail!("app_service.proxy_servers: required when the proxy runs elsewhere"),
        }
    }
    let joins = a.join_token.is_some() || a.join_token_file.is_some();
    let host = a.host_id.clone().unwrap_or_else(|| "local-agent".into());
    let creds = match local_identity(auth, joins, host, portico_core::SystemRole::App).await? {
        Some(c) => portico_agent::Credentials::Issued(c),
        None => portico_agent::Credentials::Join {
            data_dir: data_dir.to_path_buf(),
        },
    };
    portico_agent::start(&a, creds)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))
}

fn print_next_steps(data_dir: &std::path::Path, p: &portico_proxy::Proxy, tunnel: Option<&str>) {
    let web = reachable(p.web_addr);
    let scheme = if p.web_fingerprint.is_some() {
        "https"
    } else {
        "http"
    };
    let trust = match &p.web_cert_file {
        Some(f) => format!(" --ca-file={}", f.display()),
        None => String::new(),
    };
    println!(
        "Portico is running: auth-service, proxy and one agent, with SQLite in {}",
        data_dir.display()
    );
    println!(
        "  proxy (MCP, psh, web): {scheme}://{web}    tunnel: {}",
        tunnel.unwrap_or("-")
    );
    println!();
    println!("Next, in another terminal in this directory:");
    println!("  pctl users add alice --roles=admin          # prints alice's password once");
    println!("  psh login --proxy={web} --user=alice{trust}");
    println!(
        "  pctl create examples/mcp_server.yaml        # register an MCP server (see examples/)"
    );
    println!("  psh mcp ls                                  # see what you can reach");
    println!(
        "  psh mcp config everything                   # client config that runs psh mcp connect"
    );
    println!("Stop with Ctrl-C.");
}

/// Creates the data directory owner-only: it holds the database, identities and tokens.
fn make_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))
}

pub async fn run(cfg: Config, quick_start: bool) -> Result<()> {
    if cfg.auth.is_none() && cfg.proxy.is_none() && cfg.agent.is_none() {
        bail!(
            "the config enables no service: set enabled: true in auth_service, proxy_service or app_service"
        );
    }
    make_data_dir(&cfg.data_dir)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let auth = match &cfg.auth {
        Some(a) => Some(start_auth(a, &cfg.data_dir, stop_rx.clone()).await?),
        None => None,
    };
    let (proxy, tunnel) = match &cfg.proxy {
        Some(p) => {
            let (p, t) = start_proxy(p, auth.as_ref(), &cfg.data_dir).await?;
            (Some(p), Some(t))
        }
        None => (None, None),
    };
    let agent = match &cfg.agent {
        Some(a) => Some(start_agent(a, auth.as_ref(), tunnel.as_deref(), &cfg.data_dir).await?),
        None => None,
    };
    if let Some(p) = &proxy {
        match (&p.web_fingerprint, &p.web_cert_file) {
            (Some(fp), Some(file)) => println!(
                "proxy web certificate (self-signed, {}): {fp}",
                file.display()
            ),
            (Some(fp), None) => println!("proxy web certificate: {fp}"),
            _ => println!("proxy web listener: plain HTTP (proxy_service.plain_http)"),
        }
    }
    if quick_start && let Some(p) = &proxy {
        print_next_steps(&cfg.data_dir, p, tunnel.as_deref());
    }

    shutdown_signal().await;
    tracing::info!("shutting down");
    // Agents stop taking sessions, the proxy ends its own, then the agents'
    // processes are reaped, and the auth-service goes last.
    if let Some(a) = &agent {
        a.shutdown();
    }
    if let Some(p) = proxy {
        p.shutdown().await;
    }
    if let Some(a) = &agent
        && !a
            .drain(a.state.grace + std::time::Duration::from_secs(2))
            .await
    {
        tracing::warn!("some MCP processes were still running at exit");
    }
    let _ = stop_tx.send(true);
    if let Some(a) = auth {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), a.task).await;
        a.server.shutdown();
    }
    Ok(())
}
