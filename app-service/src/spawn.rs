//! Starting MCP server processes: never through a shell, as the configured
//! host user (within the agent's `allowed_host_users`), with a minimal
//! explicit environment (secrets only where a grant covers the app), under
//! resource limits, in their own process group so that signals reach every
//! process they start.
#![allow(unsafe_code)] // getpwnam_r, get/setrlimit, get/setpriority, initgroups/setgid/setuid after fork, kill(2).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::process::Stdio;

use portico_core::{LabelSelector, McpSpec};
use tokio::process::{Child, Command};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// RLIMIT_NOFILE of MCP processes unless `app_service.mcp.max_open_files` says otherwise.
pub const DEFAULT_OPEN_FILES: u64 = 1024;

/// The agent's rules for the processes it starts (`app_service.mcp`),
/// compiled once when the agent starts.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Host accounts apps may run as; `None`: any existing account except
    /// uid 0 and the agent's own (unless `allow_agent_account`).
    pub allowed_host_users: Option<Vec<String>>,
    /// With no list, the agent's own account is allowed too.
    pub allow_agent_account: bool,
    /// `{{secret NAME}}` grants: a secret resolves only for apps whose labels
    /// match the selector of a grant with its name.
    pub secrets: Vec<(String, LabelSelector)>,
    /// RLIMIT_NOFILE (soft and hard) of every process.
    pub max_open_files: u64,
    /// RLIMIT_AS (soft and hard) of every process, when set.
    pub max_memory_bytes: Option<u64>,
    /// Added to the agent's own niceness for every process (capped at 19),
    /// so that the MCP servers it runs wait behind Portico for a CPU, not
    /// the other way round; 0 leaves them at the agent's.
    pub nice: u8,
}

/// `app_service.mcp.nice` unless the config says otherwise.
pub const DEFAULT_NICE: u8 = 10;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_host_users: None,
            allow_agent_account: false,
            secrets: Vec::new(),
            max_open_files: default_open_files(),
            max_memory_bytes: None,
            nice: DEFAULT_NICE,
        }
    }
}

impl Policy {
    /// Whether apps may run as `user`.
    fn check_user(&self, user: &HostUser) -> Result<(), SpawnError> {
        match &self.allowed_host_users {
            None if self.allow_agent_account && user.uid == current_uid() => Ok(()),
            None if user.uid == 0 => Err(SpawnError::UserNotAllowed {
                user: user.name.clone(),
                why: "app_service.mcp.allowed_host_users is not set on this agent, and by default it allows any existing account except root and the agent's own; run the app as another account, or list this one in allowed_host_users".into(),
            }),
            // The agent's own account can read its identity and secrets.
            None if user.uid == current_uid() => Err(SpawnError::UserNotAllowed {
                user: user.name.clone(),
                why: "it is the agent's own account, which can read the agent's identity and secrets; app_service.mcp.allowed_host_users is not set, and by default it allows any existing account except root and the agent's own; run the app as another account, or list this one in allowed_host_users".into(),
            }),
            None => Ok(()),
            Some(list) if list.contains(&user.name) => Ok(()),
            Some(_) => Err(SpawnError::UserNotAllowed {
                user: user.name.clone(),
                why: "the account is not listed in app_service.mcp.allowed_host_users on this agent".into(),
            }),
        }
    }

    /// Whether an app with these labels may resolve `{{secret NAME}}`.
    fn granted(&self, secret: &str, labels: &BTreeMap<String, String>) -> bool {
        self.secrets
            .iter()
            .any(|(name, selector)| name == secret && selector.matches(labels))
    }
}

/// A resource limit the agent sets on its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// RLIMIT_NOFILE.
    OpenFiles,
    /// RLIMIT_AS.
    Memory,
}

/// The agent's own hard limit, when it can be read (`u64::MAX` for unlimited).
pub fn own_hard_limit(limit: Limit) -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid, writable rlimit for getrlimit to fill.
    let rc = unsafe {
        match limit {
            Limit::OpenFiles => libc::getrlimit(libc::RLIMIT_NOFILE, &mut r),
            Limit::Memory => libc::getrlimit(libc::RLIMIT_AS, &mut r),
        }
    };
    if rc != 0 {
        return None;
    }
    Some(if r.rlim_max == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        r.rlim_max
    })
}

/// 1024, or the agent's own hard limit when that is lower: limits are only ever lowered.
pub fn default_open_files() -> u64 {
    own_hard_limit(Limit::OpenFiles)
        .map(|h| h.min(DEFAULT_OPEN_FILES))
        .unwrap_or(DEFAULT_OPEN_FILES)
}

/// Checks that the agent can give its processes `value`: processes only
/// ever get limits at or below the agent's own hard limit.
pub fn check_limit(limit: Limit, value: u64) -> Result<(), String> {
    match own_hard_limit(limit) {
        Some(hard) if value > hard => Err(format!(
            "{value} is above the agent's own hard limit ({hard}); raise the agent's limit or configure a lower value"
        )),
        _ => Ok(()),
    }
}

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
    #[error("the agent does not run MCP servers as {user:?}: {why}")]
    UserNotAllowed { user: String, why: String },
    #[error(
        "secret {0:?} is not granted to this app: no app_service.mcp.secrets grant for {0:?} on the agent matches the app's labels"
    )]
    SecretNotGranted(String),
    #[error("secret {0:?} is not set on the agent (set PORTICO_SECRET_{0})")]
    MissingSecret(String),
    #[error("cannot start {cmd:?}: {err}")]
    Other { cmd: String, err: std::io::Error },
}

impl SpawnError {
    /// The agent's rules refused the session (as opposed to a failure to start it).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            SpawnError::UserNotAllowed { .. } | SpawnError::SecretNotGranted(_)
        )
    }
}

/// Resolves `{{secret NAME}}` references from the agent's `PORTICO_SECRET_NAME`
/// variables, for apps (by `labels`) that a grant in `policy` covers.
fn resolve_env(
    env: &BTreeMap<String, String>,
    policy: &Policy,
    labels: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, SpawnError> {
    let mut out = Vec::with_capacity(env.len());
    for (k, v) in env {
        let t = v.trim();
        let value = if let Some(inner) = t.strip_prefix("{{").and_then(|s| s.strip_suffix("}}")) {
            match inner.trim().strip_prefix("secret ") {
                Some(name) => {
                    let name = name.trim();
                    // The grant first: an app that is not covered learns nothing
                    // about whether the secret exists.
                    if !policy.granted(name, labels) {
                        return Err(SpawnError::SecretNotGranted(name.to_string()));
                    }
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

/// Resolves an app's `spec.headers` for one session: `{{secret NAME}}` as
/// for `spec.mcp.env` (only where a grant covers the app), `{{user.name}}`
/// as the calling user.
pub fn resolve_headers(
    headers: &BTreeMap<String, String>,
    policy: &Policy,
    labels: &BTreeMap<String, String>,
    user: &str,
) -> Result<Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>, SpawnError> {
    let mut out = Vec::with_capacity(headers.len());
    for (name, template) in headers {
        let parts =
            portico_core::resource::header_parts(template).map_err(|e| SpawnError::Other {
                cmd: format!("spec.headers.{name}"),
                err: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
        let mut value = String::new();
        for part in parts {
            match part {
                portico_core::resource::HeaderPart::Text(t) => value.push_str(&t),
                portico_core::resource::HeaderPart::UserName => value.push_str(user),
                portico_core::resource::HeaderPart::Secret(s) => {
                    if !policy.granted(&s, labels) {
                        return Err(SpawnError::SecretNotGranted(s));
                    }
                    let v = std::env::var(format!("PORTICO_SECRET_{s}"))
                        .map_err(|_| SpawnError::MissingSecret(s.clone()))?;
                    value.push_str(&v);
                }
            }
        }
        let bad = |what: &str| SpawnError::Other {
            cmd: format!("spec.headers.{name}"),
            err: std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string()),
        };
        let n = hyper::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad("not a valid header name"))?;
        // The value may hold a secret: the error does not show it.
        let v = hyper::header::HeaderValue::from_str(&value)
            .map_err(|_| bad("the resolved value cannot be sent as a header"))?;
        out.push((n, v));
    }
    Ok(out)
}

/// What happens between fork and exec, prepared before the fork.
struct InChild {
    /// Groups, uid and gid to switch to.
    switch_to: Option<(Vec<libc::gid_t>, u32, u32)>,
    /// The working directory, entered with the target user's rights.
    cdir: CString,
    open_files: libc::rlim_t,
    memory: Option<libc::rlim_t>,
    /// The niceness to take, never below the agent's own (no privilege
    /// needed); `None`: the agent's.
    nice: Option<libc::c_int>,
    /// The session's `cgroup.procs`, which the child moves itself into.
    cgroup: Option<CString>,
}

impl InChild {
    fn prepare(
        spec: &McpSpec,
        user: &HostUser,
        switch: bool,
        policy: &Policy,
    ) -> Result<InChild, SpawnError> {
        let dir = spec
            .working_dir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| user.home.clone());
        let dir = if dir.is_dir() {
            dir
        } else {
            PathBuf::from("/")
        };
        // Entered in the child after the user switch, with the user's rights.
        let cdir = {
            use std::os::unix::ffi::OsStrExt;
            CString::new(dir.as_os_str().as_bytes()).map_err(|_| SpawnError::Other {
                cmd: spec.command.clone(),
                err: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the working directory holds a NUL byte",
                ),
            })?
        };
        // Groups are looked up here, before the fork: reading the group
        // database after fork in a threaded process can deadlock.
        let switch_to = if switch {
            let groups = group_list(user).map_err(|err| SpawnError::Other {
                cmd: spec.command.clone(),
                err,
            })?;
            Some((groups, user.uid, user.gid))
        } else {
            None
        };
        Ok(InChild {
            switch_to,
            cdir,
            open_files: policy.max_open_files as libc::rlim_t,
            memory: policy.max_memory_bytes.map(|m| m as libc::rlim_t),
            nice: (policy.nice > 0).then(|| (own_nice() + libc::c_int::from(policy.nice)).min(19)),
            cgroup: None,
        })
    }

    fn install(self, cmd: &mut Command) {
        let InChild {
            switch_to,
            cdir,
            open_files,
            memory,
            nice,
            cgroup,
        } = self;
        // The agent, whose death must take the process with it.
        let agent_pid = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (open, write, close, setgroups,
        // setgid, setuid, chdir, setrlimit, setpriority, prctl, getppid) on memory
        // allocated before the fork. The process enters its cgroup first,
        // with the agent's rights, before it can start anything; then users
        // are switched and the directory is entered with the user's rights;
        // the limits come last and only ever lower the agent's own (checked
        // at start), which needs no privilege.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &cgroup {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let moved = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if !moved {
                        return Err(err);
                    }
                }
                if let Some((groups, uid, gid)) = &switch_to
                    && (libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::chdir(cdir.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let files = libc::rlimit {
                    rlim_cur: open_files,
                    rlim_max: open_files,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &files) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(m) = memory {
                    let mem = libc::rlimit {
                        rlim_cur: m,
                        rlim_max: m,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &mem) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Only ever raised from the agent's own, which needs no
                // privilege: a failure fails the spawn.
                if let Some(n) = nice
                    && libc::setpriority(libc::PRIO_PROCESS, 0, n) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Killed with the agent, even by SIGKILL. Set after the user
                // switch, which clears it; an agent that died before this
                // line is caught by the parent check.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != agent_pid {
                    return Err(std::io::Error::other("the agent is gone"));
                }
                Ok(())
            });
        }
    }
}

/// The niceness of the calling thread, which a process it forks inherits
/// (Linux keeps one per thread).
pub fn own_nice() -> libc::c_int {
    // SAFETY: getpriority only reads. -1 is a valid niceness as well as
    // the error return, so errno is cleared first and read after; for the
    // calling thread (`who` 0) it does not fail on Linux.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

/// Spawns `command` + `args` exactly as given, with piped stdio, if `policy`
/// allows it for an app with these `labels`; in the cgroup whose
/// `cgroup.procs` is `cgroup`, if given.
pub fn spawn(
    spec: &McpSpec,
    policy: &Policy,
    labels: &BTreeMap<String, String>,
    cgroup: Option<&std::ffi::CStr>,
) -> Result<Child, SpawnError> {
    let user = lookup_user(&spec.run_as_host_user)
        .ok_or_else(|| SpawnError::NoSuchUser(spec.run_as_host_user.clone()))?;
    policy.check_user(&user)?;
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
        .envs(resolve_env(&spec.env, policy, labels)?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut in_child = InChild::prepare(spec, &user, switch, policy)?;
    in_child.cgroup = cgroup.map(std::ffi::CStr::to_owned);
    in_child.install(&mut cmd);
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

/// The supplementary groups of `user` (with its primary group), from the
/// group database.
fn group_list(user: &HostUser) -> std::io::Result<Vec<libc::gid_t>> {
    let cname = CString::new(user.name.clone()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "user name holds NUL")
    })?;
    let mut n: libc::c_int = 32;
    for _ in 0..8 {
        let mut groups = vec![0 as libc::gid_t; n.max(1) as usize];
        let mut got = n;
        // SAFETY: groups has room for `got` entries; cname is NUL-terminated.
        let rc = unsafe {
            libc::getgrouplist(
                cname.as_ptr(),
                user.gid as _,
                groups.as_mut_ptr() as _,
                &mut got,
            )
        };
        if rc >= 0 {
            groups.truncate(got.max(0) as usize);
            return Ok(groups);
        }
        // Too small: `got` holds the size needed.
        n = got.max(n.saturating_mul(2));
    }
    Err(std::io::Error::other("cannot read the user's groups"))
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
    fn the_agents_own_account_needs_saying_so() {
        let me = current_user_name()
            .and_then(|n| lookup_user(&n))
            .expect("the agent's own account");
        let default = Policy::default();
        assert!(matches!(
            default.check_user(&me),
            Err(SpawnError::UserNotAllowed { .. })
        ));
        let own = Policy {
            allow_agent_account: true,
            ..Policy::default()
        };
        assert!(own.check_user(&me).is_ok());
        let listed = Policy {
            allowed_host_users: Some(vec![me.name.clone()]),
            ..Policy::default()
        };
        assert!(listed.check_user(&me).is_ok());
        let root = lookup_user("root").expect("root");
        if me.uid != 0 {
            assert!(own.check_user(&root).is_err(), "root stays out");
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn grant(name: &str, pairs: &[(&str, &str)]) -> (String, LabelSelector) {
        (
            name.to_string(),
            LabelSelector::from_single(&labels(pairs)).expect("selector"),
        )
    }

    #[test]
    fn secrets_resolve_only_where_granted() {
        let env = labels(&[("A", "plain"), ("B", "{{secret PORTICO_TEST_NOPE}}")]);
        let policy = Policy {
            secrets: vec![grant("PORTICO_TEST_NOPE", &[("env", "prod")])],
            ..Policy::default()
        };
        let prod = labels(&[("env", "prod")]);
        let dev = labels(&[("env", "dev")]);
        assert!(
            matches!(resolve_env(&env, &policy, &prod), Err(SpawnError::MissingSecret(n)) if n == "PORTICO_TEST_NOPE"),
            "granted, but not set on the agent"
        );
        assert!(
            matches!(resolve_env(&env, &policy, &dev), Err(SpawnError::SecretNotGranted(n)) if n == "PORTICO_TEST_NOPE"),
            "no grant covers env=dev"
        );
        assert!(
            matches!(
                resolve_env(&env, &Policy::default(), &prod),
                Err(SpawnError::SecretNotGranted(_))
            ),
            "no grants at all: fail closed"
        );
        let plain = labels(&[("A", "plain")]);
        let resolved = resolve_env(&plain, &Policy::default(), &dev).expect("no secrets");
        assert_eq!(resolved, vec![("A".to_string(), "plain".to_string())]);
    }

    #[test]
    fn users_within_the_bound() {
        let root = lookup_user("root").expect("root exists");
        let other = HostUser {
            name: "someone".into(),
            uid: 4242,
            gid: 4242,
            home: PathBuf::from("/"),
        };
        let default = Policy::default();
        let e = default
            .check_user(&root)
            .expect_err("root is refused by default");
        assert!(
            e.to_string()
                .contains("does not run MCP servers as \"root\""),
            "{e}"
        );
        assert!(e.is_refusal());
        assert!(default.check_user(&other).is_ok());
        let listed = Policy {
            allowed_host_users: Some(vec!["root".into()]),
            ..Policy::default()
        };
        assert!(listed.check_user(&root).is_ok());
        assert!(listed.check_user(&other).is_err());
    }

    #[test]
    fn limits_are_only_lowered() {
        assert!(default_open_files() <= DEFAULT_OPEN_FILES);
        if let Some(hard) = own_hard_limit(Limit::OpenFiles)
            && hard < u64::MAX
        {
            assert!(check_limit(Limit::OpenFiles, hard + 1).is_err());
            assert!(check_limit(Limit::OpenFiles, hard).is_ok());
        }
    }
}
