//! Containment of MCP processes in cgroups (v2), where the agent may create
//! them: every session's processes, however they detach (`setsid`, a
//! daemon's double fork), stay in the session's cgroup, and one write to
//! `cgroup.kill` ends them all.
//!
//! The agent makes a cgroup of its own under the one it runs in
//! (`portico-agent-PID-N`) and one per session inside it (`sN`). Each MCP
//! process moves itself into its session's cgroup between fork and exec,
//! before anything it runs can fork. When a session ends, its cgroup is
//! killed and removed; when the agent dies, its reaper kills the agent's
//! cgroup (every session's at once). Where cgroup v2 is not mounted
//! writable for the agent (a container's read-only `/sys/fs/cgroup`, an
//! unprivileged agent without a delegated subtree), the agent falls back to
//! process groups and says so at start: descendants that leave their group
//! on purpose can then outlive a killed agent.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Agent cgroups made by this process, for unique names when one process
/// runs several agents.
static AGENTS: AtomicU64 = AtomicU64::new(0);

const PREFIX: &str = "portico-agent-";

/// The agent's cgroup, under which each session gets one.
pub struct Cgroups {
    dir: PathBuf,
    sessions: AtomicU64,
}

/// One session's cgroup.
pub struct SessionCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, which the MCP process writes itself into.
    procs: CString,
}

impl Cgroups {
    /// Makes the agent's cgroup, or says why the agent contains its MCP
    /// processes by process group only.
    pub fn create() -> Result<Cgroups, String> {
        let own = own_cgroup_dir()?;
        sweep(&own);
        let n = AGENTS.fetch_add(1, Ordering::Relaxed);
        let dir = own.join(format!("{PREFIX}{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // `cgroup.kill` (Linux 5.14) is what makes the kill one write.
        if !dir.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err("the kernel has no cgroup.kill (Linux 5.14 or later)".into());
        }
        Ok(Cgroups {
            dir,
            sessions: AtomicU64::new(0),
        })
    }

    /// The agent's cgroup's `cgroup.kill`, for the reaper.
    pub fn kill_file(&self) -> Option<CString> {
        CString::new(self.dir.join("cgroup.kill").as_os_str().as_bytes()).ok()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty cgroup for one session.
    pub fn session(&self) -> Result<SessionCgroup, String> {
        let n = self.sessions.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("s{n}"));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| "the cgroup path holds a NUL byte".to_string())?;
        Ok(SessionCgroup { dir, procs })
    }
}

impl Drop for Cgroups {
    /// An agent that stops ends what is left in its cgroup and removes it.
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        remove_tree(&self.dir, Duration::from_secs(1));
    }
}

impl SessionCgroup {
    /// `cgroup.procs` of this cgroup, written by the child before exec.
    pub fn procs_file(&self) -> &CString {
        &self.procs
    }

    /// Kills every process in the session's cgroup and removes it once
    /// they are gone.
    pub async fn end(self) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), "1") {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot kill the session's cgroup");
        }
        for _ in 0..100 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                // Still populated: SIGKILLed processes take a moment to exit.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        tracing::warn!(cgroup = %self.dir.display(), "the session's cgroup is still populated 2 s after its kill");
    }
}

/// Where the cgroup this process runs in is, in a writable cgroup v2 mount.
fn own_cgroup_dir() -> Result<PathBuf, String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 hierarchy")?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let (root, mount) = mountinfo
        .lines()
        .find_map(cgroup2_mount)
        .ok_or("cgroup v2 is not mounted")?;
    // The mount shows the hierarchy from `root` down (a cgroup namespace
    // or a bind mount of a subtree).
    let rel = path
        .strip_prefix(root.trim_end_matches('/'))
        .ok_or("this process's cgroup is outside the mounted cgroup v2 tree")?;
    let dir = PathBuf::from(mount).join(rel.trim_start_matches('/'));
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    Ok(dir)
}

/// `(root, mount point)` of a cgroup2 line of `/proc/self/mountinfo`.
fn cgroup2_mount(line: &str) -> Option<(String, String)> {
    let (left, right) = line.split_once(" - ")?;
    if right.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mut f = left.split_whitespace();
    let root = unescape(f.nth(3)?);
    let mount = unescape(f.next()?);
    Some((root, mount))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the cgroups left by agents of this host that are gone (a
/// SIGKILLed agent's reaper kills their processes but cannot remove them).
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
        remove_tree(&e.path(), Duration::from_millis(200));
    }
}

/// Removes a cgroup and the ones under it, waiting up to `within` for
/// killed processes to leave them.
fn remove_tree(dir: &Path, within: Duration) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path(), within);
            }
        }
    }
    let until = std::time::Instant::now() + within;
    while std::fs::remove_dir(dir).is_err() && dir.exists() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let l = "35 24 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount(l),
            Some(("/".into(), "/sys/fs/cgroup/unified".into()))
        );
        let l = "36 24 0:31 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mount(l), None);
        let l = r"40 24 0:32 /a\040b /mnt/cg\040x rw - cgroup2 none rw";
        assert_eq!(cgroup2_mount(l), Some(("/a b".into(), "/mnt/cg x".into())));
    }
}
