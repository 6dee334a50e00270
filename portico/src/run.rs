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

pub async fn run(cfg: Config, quick_start: bool) -> Result<()> {
    if cfg.auth.is_none() && cfg.proxy.is_none() && cfg.agent.is_none() {
        bail!(
            "the config enables no service: set enabled: true in auth_service, proxy_service or app_service"
        );
    }
    // Owner-only: it holds the database, identities and tokens.
    let made = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.data_dir)
    };
    made.with_context(|| {
        format!(
            "cannot create the data directory {}",
            cfg.data_dir.display()
        )
    })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut auth_addr: Option<String> = None;
    let mut auth_server = None;
    let mut auth_task = None;
    if let Some(a) = &cfg.auth {
        let reserved = reserve(&a.listen_addr, "auth-service").await?;
        let local = reserved.addr;
        let server = portico_auth::AuthServer::open(a, &cfg.data_dir)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let reach = if local.ip().is_unspecified() {
            format!("127.0.0.1:{}", local.port())
        } else {
            local.to_string()
        };
        server
            .ensure_admin_identity(&cfg.data_dir, &reach)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        // Ready: storage is open and the admin identity written.
        let listener = reserved.listen()?;
        let mut rx = stop_rx.clone();
        let s = server.clone();
        auth_task = Some(tokio::spawn(async move {
            let r = portico_auth::serve(s, listener, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "auth-service stopped");
            }
        }));
        tracing::info!(addr = %local, "auth-service listening");
        auth_addr = Some(reach);
        auth_server = Some(server);
    }

    let mut proxy = None;
    let mut tunnel_addr: Option<String> = None;
    if let Some(p) = &cfg.proxy {
        let mut p = p.clone();
        if p.auth_servers.is_empty() {
            match &auth_addr {
                Some(a) => p.auth_servers = vec![a.clone()],
                None => bail!(
                    "proxy_service.auth_servers: required when the auth-service runs elsewhere"
                ),
            }
        }
        let creds = match (&auth_server, &p.join_token, &p.join_token_file) {
            (Some(server), None, None) => {
                let host = p.host_id.clone().unwrap_or_else(|| "local-proxy".into());
                let token = server
                    .issue_service_identity(&host, portico_core::SystemRole::Proxy)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                portico_proxy::Credentials::Identity {
                    host_id: host,
                    token,
                }
            }
            _ => portico_proxy::Credentials::Join {
                data_dir: cfg.data_dir.clone(),
            },
        };
        let listeners = portico_proxy::Listeners {
            web: bind(&p.web_listen_addr, "proxy web listener").await?,
            tunnel: bind(&p.tunnel_listen_addr, "proxy tunnel listener").await?,
        };
        let started = portico_proxy::start(&p, creds, listeners)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let t = started.tunnel_addr;
        tunnel_addr = Some(if t.ip().is_unspecified() {
            format!("127.0.0.1:{}", t.port())
        } else {
            t.to_string()
        });
        tracing::info!(web = %started.web_addr, tunnel = %started.tunnel_addr, "proxy listening");
        proxy = Some(started);
    }

    let mut agent = None;
    if let Some(a) = &cfg.agent {
        let mut a = a.clone();
        if a.auth_servers.is_empty() {
            match &auth_addr {
                Some(x) => a.auth_servers = vec![x.clone()],
                None => {
                    bail!("app_service.auth_servers: required when the auth-service runs elsewhere")
                }
            }
        }
        if a.proxy_servers.is_empty() {
            match &tunnel_addr {
                Some(x) => a.proxy_servers = vec![x.clone()],
                None => bail!("app_service.proxy_servers: required when the proxy runs elsewhere"),
            }
        }
        let creds = match (&auth_server, &a.join_token, &a.join_token_file) {
            (Some(server), None, None) => {
                let host = a.host_id.clone().unwrap_or_else(|| "local-agent".into());
                let token = server
                    .issue_service_identity(&host, portico_core::SystemRole::App)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                portico_agent::Credentials::Identity {
                    host_id: host,
                    token,
                }
            }
            _ => portico_agent::Credentials::Join {
                data_dir: cfg.data_dir.clone(),
            },
        };
        agent = Some(
            portico_agent::start(&a, creds)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?,
        );
    }

    if quick_start && let Some(p) = &proxy {
        let web = p.web_addr;
        println!(
            "Portico is running: auth-service, proxy and one agent, with SQLite in {}",
            cfg.data_dir.display()
        );
        println!(
            "  proxy (MCP, psh, web): http://{web}    tunnel: {}",
            tunnel_addr.as_deref().unwrap_or("-")
        );
        println!();
        println!("Next, in another terminal in this directory:");
        println!("  pctl users add alice --roles=admin          # prints alice's password once");
        println!("  psh login --proxy={web} --user=alice");
        println!(
            "  pctl create examples/mcp_server.yaml        # register an MCP server (see examples/)"
        );
        println!("  psh mcp ls                                  # see what you can reach");
        println!(
            "  psh mcp config everything                   # client config that runs psh mcp connect"
        );
        println!("Stop with Ctrl-C.");
    }

    shutdown_signal().await;
    tracing::info!("shutting down");
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
    if let Some(t) = auth_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), t).await;
    }
    if let Some(s) = auth_server {
        s.shutdown();
    }
    Ok(())
}
