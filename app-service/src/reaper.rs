//! The agent's reaper: a small process forked when the agent starts, whose
//! one job is to kill the process groups of the agent's MCP servers when the
//! agent dies without doing so itself (SIGKILL, the OOM killer, a crash).
//!
//! The parent-death signal set on every MCP process reaches only that
//! process; what it started (`npx` → `node`, `uvx` → `python`, `sh` → a
//! command) would live on under init. Every MCP process leads a process
//! group of its own, which its children join unless they leave it on
//! purpose (`setsid`, as a daemon does). The agent tells the reaper each
//! group it starts and each it has ended, over a pipe; when the pipe's
//! write end closes (the agent is gone, however it went), the reaper
//! SIGKILLs every group still on its list and exits. Where the agent
//! contains its MCP processes in a cgroup (`cgroup.rs`), the reaper first
//! writes `cgroup.kill` there, which also ends descendants that left their
//! group.
//!
//! The reaper is forked from a threaded process, so between `fork` and
//! `_exit` it calls only async-signal-safe functions (`read`, `kill`,
//! `open`, `write`, `close`, `dup2`, `prctl`, `signal`) and touches only
//! memory allocated before the fork. It keeps no descriptor but the pipe.
#![allow(unsafe_code)] // fork, pipe2, read, kill, waitpid: the reaper is raw syscalls by nature.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Mutex;

/// Groups the reaper can hold at once: more than an agent's session cap
/// can reach in practice (beyond it, new groups are not covered).
const CAPACITY: usize = 1 << 16;

/// The name the reaper shows in `ps` and `/proc/PID/comm`.
pub const NAME: &str = "portico-reaper";

/// The agent's end of the reaper.
pub struct Reaper {
    inner: Option<(Mutex<std::fs::File>, libc::pid_t)>,
}

impl Reaper {
    /// Forks the reaper, which also writes `kill_file` (a `cgroup.kill`),
    /// if given, when the agent dies. When the fork fails, the agent runs
    /// on without one (its MCP processes still die with it; their children
    /// may not), and says so.
    pub fn start(kill_file: Option<std::ffi::CString>) -> Reaper {
        match fork_reaper(kill_file) {
            Ok(inner) => Reaper { inner: Some(inner) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the reaper: the children of MCP processes may outlive an agent that is killed");
                Reaper { inner: None }
            }
        }
    }

    /// Asks the reaper to kill group `pgid` if the agent dies.
    pub fn watch(&self, pgid: u32) {
        self.send(pgid as i32);
    }

    /// The agent has ended group `pgid` itself.
    pub fn forget(&self, pgid: u32) {
        self.send(-(pgid as i32));
    }

    fn send(&self, v: i32) {
        if v == 0 || v == i32::MIN {
            return;
        }
        let Some((pipe, _)) = &self.inner else {
            return;
        };
        // Four bytes are below PIPE_BUF: each write is whole, and the
        // reaper drains the pipe at once.
        let mut pipe = pipe.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = pipe.write_all(&v.to_ne_bytes()) {
            tracing::warn!(error = %e, "the reaper is gone: the children of MCP processes may outlive an agent that is killed");
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some((pipe, pid)) = self.inner.take() {
            // Closing the pipe ends the reaper (after it kills any group the
            // agent has not ended); then it is reaped, not left a zombie.
            drop(pipe);
            let mut status = 0;
            // SAFETY: pid is our own child; status is a valid out pointer.
            unsafe {
                while libc::waitpid(pid, &mut status, 0) < 0
                    && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
                {
                }
            }
        }
    }
}

fn fork_reaper(
    kill_file: Option<std::ffi::CString>,
) -> std::io::Result<(Mutex<std::fs::File>, libc::pid_t)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors. Both are close-on-exec,
    // so no MCP process inherits the write end and keeps the reaper alive.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (read_end, write_end) = (fds[0], fds[1]);
    // The reaper's list, allocated before the fork: the child may not allocate.
    let mut table: Vec<libc::pid_t> = Vec::with_capacity(CAPACITY);
    let table_ptr = table.as_mut_ptr();
    let name = c"portico-reaper";
    let kill_ptr = kill_file.as_ref().map_or(std::ptr::null(), |k| k.as_ptr());
    // SAFETY: see the module comment; the child runs `reaper_main` only,
    // which never returns.
    match unsafe { libc::fork() } {
        -1 => {
            let e = std::io::Error::last_os_error();
            // SAFETY: both descriptors are ours and open.
            unsafe {
                libc::close(read_end);
                libc::close(write_end);
            }
            Err(e)
        }
        0 => unsafe { reaper_main(read_end, table_ptr, name.as_ptr(), kill_ptr) },
        pid => {
            // SAFETY: read_end is ours and open; write_end is handed to a
            // File that owns it from here on.
            unsafe { libc::close(read_end) };
            let pipe = unsafe { std::fs::File::from_raw_fd(write_end) };
            tracing::debug!(pid, "reaper started");
            Ok((Mutex::new(pipe), pid))
        }
    }
}

/// The reaper's whole life. Only async-signal-safe calls, no allocation.
///
/// SAFETY: to be called only in the child of `fork`, with `table` valid for
/// `CAPACITY` entries, `name` a NUL-terminated string and `kill_file` null
/// or one.
unsafe fn reaper_main(
    read_end: libc::c_int,
    table: *mut libc::pid_t,
    name: *const libc::c_char,
    kill_file: *const libc::c_char,
) -> ! {
    unsafe {
        // Only the agent's end ends the reaper: not a Ctrl-C to the
        // terminal's process group, nor a hang-up.
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, name as libc::c_ulong, 0, 0, 0);
        // Keep only the pipe, as descriptor 0: the agent's sockets and
        // files must close when the agent dies, not linger in the reaper.
        if read_end != 0 && libc::dup2(read_end, 0) < 0 {
            libc::_exit(1);
        }
        if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
            for fd in 1..65536 {
                libc::close(fd);
            }
        }
        let mut len = 0usize;
        let mut buf = [0u8; 4096];
        let mut word = [0u8; 4];
        let mut have = 0usize;
        loop {
            let n = libc::read(0, buf.as_mut_ptr().cast(), buf.len());
            if n == 0 {
                break;
            }
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break;
            }
            for &b in &buf[..n as usize] {
                word[have] = b;
                have += 1;
                if have < 4 {
                    continue;
                }
                have = 0;
                let v = i32::from_ne_bytes(word);
                if v > 0 {
                    if len < CAPACITY {
                        *table.add(len) = v;
                        len += 1;
                    }
                } else if let Some(i) = (0..len).find(|&i| *table.add(i) == -v) {
                    len -= 1;
                    *table.add(i) = *table.add(len);
                }
            }
        }
        // The cgroup first: it holds every session's processes, wherever
        // they went; then the groups, which is all there is without one.
        if !kill_file.is_null() {
            let fd = libc::open(kill_file, libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"1".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        for i in 0..len {
            libc::kill(-*table.add(i), libc::SIGKILL);
        }
        libc::_exit(0);
    }
}
