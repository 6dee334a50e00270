//! Per-user throttling of failed logins.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// After `max_failures` failures within `window`, the user is locked for `lockout`.
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    lockout: Duration,
    state: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    failures: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration, lockout: Duration) -> Self {
        Self {
            max_failures,
            window,
            lockout,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(wait)` while the user is locked out.
    pub fn check(&self, user: &str) -> Option<Duration> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let until = state.get(user)?.locked_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    pub fn failure(&self, user: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.len() > 100_000 {
            let now = Instant::now();
            let window = self.window;
            state.retain(|_, e| {
                now.duration_since(e.first) < window || e.locked_until.is_some_and(|u| u > now)
            });
        }
        let now = Instant::now();
        let e = state.entry(user.to_string()).or_insert(Entry {
            failures: 0,
            first: now,
            locked_until: None,
        });
        if now.duration_since(e.first) > self.window {
            *e = Entry {
                failures: 0,
                first: now,
                locked_until: None,
            };
        }
        e.failures += 1;
        if e.failures >= self.max_failures {
            e.locked_until = Some(now + self.lockout);
            e.failures = 0;
            e.first = now;
        }
    }

    pub fn success(&self, user: &str) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_failures() {
        let l = LoginLimiter::new(3, Duration::from_secs(60), Duration::from_secs(30));
        l.failure("a");
        l.failure("a");
        assert!(l.check("a").is_none());
        l.failure("a");
        assert!(l.check("a").is_some());
        assert!(l.check("b").is_none());
    }
}
