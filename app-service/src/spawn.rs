//! Starting MCP server processes: never through a shell, as the configured
//! host user, with a minimal explicit environment, in their own process group
//! so that signals reach every process they start.
#![allow(unsafe_code)] // getpwnam_r, initgroups/setgid/setuid after fork, kill(2).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::process::Stdio;

use portico_core::McpSpec;
use tokio::process::{Child, Command};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A host account resolved from the password database.
#[derive(Debug, Clone, PartialEq)]
pub struct HostUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

pub fn lookup_user(name: &str) -> Option<HostUser> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf outlives the read of pwd's fields.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: pw_dir points into buf, NUL-terminated by getpwnam_r.
    let home = unsafe { CStr::from_ptr(pwd.pw_dir) }
        .to_string_lossy()
        .into_owned();
    Some(HostUser {
        name: name.to_string(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: PathBuf::from(home),
    })
}

pub fn current_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends a signal to a whole process group.
pub fn signal_group(pgid: u32, sig: i32) {
    if pgid == 0 {
        return;
    }
    // SAFETY: kill has no memory effects; a stale group yields ESRCH, which is harmless.
    unsafe {
        libc::kill(-(pgid as i32), sig);
    }
}

pub const SIGINT: i32 = libc::SIGINT;
pub const SIGKILL: i32 = libc::SIGKILL;

/// Why a process could not be started, in words for the person at the client.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("host user {0:?} does not exist on the agent")]
    NoSuchUser(String),
    #[error(
        "the agent runs as uid {uid} and cannot switch to host user {user:?}: run the agent as root, or set run_as_host_user to the agent's own user"
    )]
    CannotSwitch { uid: u32, user: String },
    #[error("command {0:?} was not found on the agent")]
    NotFound(String),
    #[error("command {0:?} is not executable (check its permissions and format)")]
    NotExecutable(String),
    #[error("secret {0:?} is not set on the agent (set PORTICO_SECRET_{0})")]
    MissingSecret(String),
    #[error("cannot start {cmd:?}: {err}")]
    Other { cmd: String, err: std::io::Error },
}

/// Resolves `{{secret NAME}}` references from the agent's `PORTICO_SECRET_NAME` variables.
fn resolve_env(env: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, SpawnError> {
    let mut out = Vec::with_capacity(env.len());
    for (k, v) in env {
        let t = v.trim();
        let value = if let Some(inner) = t.strip_prefix("{{").and_then(|s| s.strip_suffix("}}")) {
            match inner.trim().strip_prefix("secret ") {
                Some(name) => {
                    let name = name.trim();
                    std::env::var(format!("PORTICO_SECRET_{name}"))
                        .map_err(|_| SpawnError::MissingSecret(name.to_string()))?
                }
                None => v.clone(),
            }
        } else {
            v.clone()
        };
        out.push((k.clone(), value));
    }
    Ok(out)
}

/// Spawns `command` + `args` exactly as given, with piped stdio.
pub fn spawn(spec: &McpSpec) -> Result<Child, SpawnError> {
    let user = lookup_user(&spec.run_as_host_user)
        .ok_or_else(|| SpawnError::NoSuchUser(spec.run_as_host_user.clone()))?;
    let me = current_uid();
    let switch = user.uid != me;
    if switch && me != 0 {
        return Err(SpawnError::CannotSwitch {
            uid: me,
            user: user.name.clone(),
        });
    }
    let mut cmd = Command::new(&spec.command);
    cmd.args(&spec.args)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()),
        )
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env(
            "LANG",
            std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".into()),
        )
        .envs(resolve_env(&spec.env)?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let dir = spec
        .working_dir
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| user.home.clone());
    if dir.is_dir() {
        cmd.current_dir(dir);
    } else {
        cmd.current_dir("/");
    }
    if switch {
        let cname = CString::new(user.name.clone())
            .map_err(|_| SpawnError::NoSuchUser(user.name.clone()))?;
        let (uid, gid) = (user.uid, user.gid);
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::initgroups(cname.as_ptr(), gid as _) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => SpawnError::NotFound(spec.command.clone()),
        std::io::ErrorKind::PermissionDenied => SpawnError::NotExecutable(spec.command.clone()),
        _ if err.raw_os_error() == Some(libc::ENOEXEC) => {
            SpawnError::NotExecutable(spec.command.clone())
        }
        _ => SpawnError::Other {
            cmd: spec.command.clone(),
            err,
        },
    })
}

/// The name of the user the agent runs as.
pub fn current_user_name() -> Option<String> {
    let uid = current_uid();
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as in lookup_user.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: pw_name points into buf, NUL-terminated.
    Some(
        unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists() {
        let u = lookup_user("root").expect("root is in every password database");
        assert_eq!(u.uid, 0);
        assert!(lookup_user("no-such-user-portico").is_none());
    }

    #[test]
    fn secrets_resolve() {
        let env: BTreeMap<String, String> = [
            ("A".to_string(), "plain".to_string()),
            ("B".to_string(), "{{secret PORTICO_TEST_NOPE}}".to_string()),
        ]
        .into_iter()
        .collect();
        assert!(
            matches!(resolve_env(&env), Err(SpawnError::MissingSecret(n)) if n == "PORTICO_TEST_NOPE")
        );
    }
}
