//! Throttling of password guesses, per (user, source address).
//!
//! An attempt takes its slot *before* the password is checked, under one
//! mutex, so N guesses sent at once cannot get more checks than the limit:
//! once failures plus attempts in flight reach `max_failures`, further
//! attempts are refused until some finish. Reaching `max_failures` failures
//! within `window` locks the pair for `lockout`. The key includes the
//! source address, so a stranger guessing from elsewhere locks only their
//! own address out, not the user everywhere.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept before idle ones are swept.
const SWEEP_ABOVE: usize = 100_000;

type Key = (String, String);

pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    lockout: Duration,
    state: Mutex<HashMap<Key, Entry>>,
}

struct Entry {
    failures: u32,
    in_flight: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry {
            failures: 0,
            in_flight: 0,
            first: now,
            locked_until: None,
        }
    }
}

/// Why an attempt may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many failures: locked for this long still.
    Locked(Duration),
    /// Failures plus the attempts being checked already reach the limit.
    Busy,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration, lockout: Duration) -> Self {
        Self {
            max_failures: max_failures.max(1),
            window,
            lockout,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves one password check for `user` from `source`, or says why not.
    /// The returned attempt must be resolved with `fail` or `succeed`;
    /// dropped unresolved (an error before the check, a cancelled call) it
    /// gives its slot back without counting.
    pub fn begin(&self, user: &str, source: &str) -> Result<Attempt<'_>, Refused> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.len() > SWEEP_ABOVE {
            let window = self.window;
            state.retain(|_, e| {
                e.in_flight > 0
                    || e.locked_until.is_some_and(|u| u > now)
                    || now.duration_since(e.first) < window
            });
        }
        let key = (user.to_string(), source.to_string());
        let e = state.entry(key.clone()).or_insert_with(|| Entry::new(now));
        if let Some(until) = e.locked_until {
            if until > now {
                return Err(Refused::Locked(until - now));
            }
            // The lockout is over: start afresh.
            e.locked_until = None;
            e.failures = 0;
            e.first = now;
        }
        if now.duration_since(e.first) > self.window {
            e.failures = 0;
            e.first = now;
        }
        if e.failures.saturating_add(e.in_flight) >= self.max_failures {
            return Err(Refused::Busy);
        }
        e.in_flight += 1;
        Ok(Attempt {
            limiter: self,
            key,
            done: false,
        })
    }

    /// `Some(wait)` while `user` from `source` is locked out.
    pub fn locked(&self, user: &str, source: &str) -> Option<Duration> {
        let state = self.lock();
        let until = state
            .get(&(user.to_string(), source.to_string()))?
            .locked_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    fn finish(&self, key: &Key, outcome: Outcome) {
        let now = Instant::now();
        let mut state = self.lock();
        if !state.contains_key(key) {
            // Swept meanwhile; a failure still counts.
            if outcome == Outcome::Failed {
                let mut e = Entry::new(now);
                e.failures = 1;
                if e.failures >= self.max_failures {
                    e.locked_until = Some(now + self.lockout);
                }
                state.insert(key.clone(), e);
            }
            return;
        }
        let Some(e) = state.get_mut(key) else {
            return;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Failed => {
                if now.duration_since(e.first) > self.window {
                    e.failures = 0;
                    e.first = now;
                }
                e.failures = e.failures.saturating_add(1);
                if e.failures >= self.max_failures && e.locked_until.is_none() {
                    e.locked_until = Some(now + self.lockout);
                }
            }
            Outcome::Succeeded => {
                e.failures = 0;
                e.locked_until = None;
                e.first = now;
            }
            Outcome::Released => {}
        }
        if e.in_flight == 0 && e.failures == 0 && e.locked_until.is_none() {
            state.remove(key);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Failed,
    Succeeded,
    Released,
}

/// One reserved password check.
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    key: Key,
    done: bool,
}

impl Attempt<'_> {
    /// The password was wrong (or the user unknown): counts towards the lockout.
    pub fn fail(mut self) {
        self.done = true;
        self.limiter.finish(&self.key, Outcome::Failed);
    }

    /// The password was right: the count for this user and source starts over.
    pub fn succeed(mut self) {
        self.done = true;
        self.limiter.finish(&self.key, Outcome::Succeeded);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(&self.key, Outcome::Released);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> LoginLimiter {
        LoginLimiter::new(3, Duration::from_secs(60), Duration::from_secs(30))
    }

    #[test]
    fn locks_after_failures() {
        let l = limiter();
        for _ in 0..3 {
            l.begin("a", "10.0.0.1").expect("allowed").fail();
        }
        assert!(l.locked("a", "10.0.0.1").is_some());
        assert!(matches!(l.begin("a", "10.0.0.1"), Err(Refused::Locked(_))));
        // Another source, or another user, is not locked.
        assert!(l.locked("a", "10.0.0.2").is_none());
        assert!(l.locked("b", "10.0.0.1").is_none());
        l.begin("a", "10.0.0.2").expect("other source").succeed();
    }

    #[test]
    fn parallel_attempts_reserve_slots_first() {
        let l = limiter();
        let a1 = l.begin("a", "s").expect("1");
        let a2 = l.begin("a", "s").expect("2");
        let a3 = l.begin("a", "s").expect("3");
        assert_eq!(l.begin("a", "s").err(), Some(Refused::Busy));
        a1.fail();
        a2.fail();
        assert_eq!(l.begin("a", "s").err(), Some(Refused::Busy));
        a3.fail();
        assert!(matches!(l.begin("a", "s"), Err(Refused::Locked(_))));
    }

    #[test]
    fn success_resets_and_release_does_not_count() {
        let l = limiter();
        l.begin("a", "s").expect("1").fail();
        l.begin("a", "s").expect("2").fail();
        drop(l.begin("a", "s").expect("released"));
        l.begin("a", "s").expect("3").succeed();
        for _ in 0..2 {
            l.begin("a", "s").expect("counts from zero again").fail();
        }
        assert!(l.locked("a", "s").is_none());
        assert_eq!(l.lock().len(), 1);
    }
}
