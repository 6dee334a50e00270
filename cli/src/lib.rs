//! Shared pieces of `pctl` and `psh`: profiles and identities, connecting to
//! the API, and printing for people.

pub mod connect;
pub mod http;
pub mod local;
pub mod output;
pub mod profile;

use std::path::PathBuf;

use portico_core::identity::{ADMIN_IDENTITY_FILE, IdentityFile};
use portico_proto::client::{AuthClient, Dial, connect};

/// A failure that ends the command: message for people, and an exit code.
#[derive(Debug)]
pub struct Fail {
    pub message: String,
    pub code: i32,
}

impl Fail {
    pub fn new(message: impl Into<String>) -> Self {
        Fail {
            message: message.into(),
            code: 1,
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Fail {
            message: message.into(),
            code: 2,
        }
    }
}

impl From<tonic::Status> for Fail {
    fn from(s: tonic::Status) -> Self {
        let e = portico_proto::convert::from_status(&s);
        let msg = if s.code() == tonic::Code::Unavailable
            || s.code() == tonic::Code::Unknown && s.message().contains("transport")
        {
            format!("the server is unavailable: {}", e.message)
        } else {
            e.message
        };
        Fail::new(msg)
    }
}

impl From<String> for Fail {
    fn from(s: String) -> Self {
        Fail::new(s)
    }
}

pub type CliResult<T = ()> = Result<T, Fail>;

/// Runs a command body and exits with its code, printing errors as `error: ...`.
pub fn finish(r: CliResult) -> ! {
    match r {
        Ok(()) => std::process::exit(0),
        Err(f) => {
            eprintln!("error: {}", f.message);
            std::process::exit(f.code)
        }
    }
}

/// How a CLI finds who it is and where to go.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub identity: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub auth_server: Option<String>,
}

/// Connects with, in order: `--identity`, `--data-dir` (or `PORTICO_DATA_DIR`),
/// the `psh login` profile (through the proxy), `./portico-data`.
pub async fn connect_api(t: &Target) -> CliResult<AuthClient> {
    let read_identity = |p: &PathBuf| -> CliResult<IdentityFile> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Fail::new(format!("cannot read identity {}: {e}", p.display())))?;
        yaml_serde::from_str(&text)
            .map_err(|e| Fail::new(format!("{} is not an identity file: {e}", p.display())))
    };
    let from_identity = |id: IdentityFile| async move {
        let addr = t.auth_server.clone().unwrap_or(id.auth_server);
        let ca = id.ca.as_deref().ok_or_else(|| {
            Fail::new("the identity holds no cluster CA (it predates TLS); restart portico start to write a new one")
        })?;
        let dial = Dial::cluster(&addr, ca, None).map_err(Fail::new)?;
        connect(&dial, Some(&id.token)).await.map_err(Fail::new)
    };
    if let Some(p) = &t.identity {
        return from_identity(read_identity(p)?).await;
    }
    if let Some(dir) = &t.data_dir {
        let p = dir.join(ADMIN_IDENTITY_FILE);
        if !p.exists() {
            return Err(Fail::new(format!(
                "no admin identity in {}: is this the auth host's data directory, and has portico start run there?",
                dir.display()
            )));
        }
        return from_identity(read_identity(&p)?).await;
    }
    if let Some(profile) = profile::Profile::load()? {
        profile.check_fresh()?;
        let mut dial = profile.dial()?;
        if let Some(addr) = &t.auth_server {
            dial = Dial::trusting(addr, &profile.trust()).map_err(Fail::new)?;
        }
        return connect(&dial, Some(&profile.token))
            .await
            .map_err(Fail::new);
    }
    let local = PathBuf::from("portico-data").join(ADMIN_IDENTITY_FILE);
    if local.exists() {
        return from_identity(read_identity(&local)?).await;
    }
    Err(Fail::new(
        "not logged in: run psh login --proxy=HOST:PORT --user=NAME, or on the auth host pass --data-dir DIR",
    ))
}
