//! Who is asking: sessions (a cookie naming a server-side session), their CSRF tokens, passwords
//! (argon2id) and the limit on wrong passwords.
//!
//! Sessions live in the memory of the node that serves the pages: a visitor stays on one node, and
//! a restart logs everyone out, which is the safe failure. Every visitor gets a session on the first
//! page, so forms before login (activation, login) carry a CSRF token too; logging in replaces the
//! session with a new one (no fixation).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;

/// The session cookie's name.
pub const COOKIE: &str = "coyote_session";
/// A session unused for this long is forgotten.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; past it, the least recently used are forgotten.
const SESSIONS_MAX: usize = 20_000;
/// Wrong passwords allowed per address and per account in [`FAILURE_WINDOW`]; the next is refused
/// with 429 before the password is even checked.
pub const FAILURES_MAX: usize = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses and accounts whose failures are remembered, at most.
const FAILURE_KEYS_MAX: usize = 100_000;
/// Shortest password accepted.
pub const PASSWORD_MIN: usize = 10;
/// Longest password accepted (argon2 takes any length; this bounds the work a request can cause).
pub const PASSWORD_MAX: usize = 256;

#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub csrf: String,
    /// The logged-in user, or none for a visitor.
    pub user: Option<String>,
    /// The signup this visitor made, while it waits for an admin.
    pub signup: Option<String>,
    last_seen: Instant,
}

/// The sessions of this node's CRM.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    /// The session named by `id`, if it is alive; refreshes its last use.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().expect("sessions lock");
        let session = map.get_mut(id)?;
        if session.last_seen.elapsed() > SESSION_IDLE {
            map.remove(id);
            return None;
        }
        session.last_seen = Instant::now();
        Some(session.clone())
    }

    /// A new session, for `user` (or a visitor).
    pub fn create(&self, user: Option<String>) -> Session {
        let session = Session {
            id: random_token(),
            csrf: random_token(),
            user,
            signup: None,
            last_seen: Instant::now(),
        };
        let mut map = self.map.lock().expect("sessions lock");
        if map.len() >= SESSIONS_MAX {
            map.retain(|_, s| s.last_seen.elapsed() <= SESSION_IDLE);
            if map.len() >= SESSIONS_MAX {
                let oldest = map.values().min_by_key(|s| s.last_seen).map(|s| s.id.clone());
                if let Some(id) = oldest {
                    map.remove(&id);
                }
            }
        }
        map.insert(session.id.clone(), session.clone());
        session
    }

    /// Remembers that this visitor signed up as `name`.
    pub fn set_signup(&self, id: &str, name: &str) {
        if let Some(s) = self.map.lock().expect("sessions lock").get_mut(id) {
            s.signup = Some(name.to_string());
        }
    }

    pub fn remove(&self, id: &str) {
        self.map.lock().expect("sessions lock").remove(id);
    }
}

/// Wrong passwords, per address and per account.
#[derive(Default)]
pub struct Limiter {
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Limiter {
    /// Whether any of `keys` had [`FAILURES_MAX`] failures in the last [`FAILURE_WINDOW`].
    pub fn blocked(&self, keys: &[&str]) -> bool {
        let mut map = self.failures.lock().expect("limiter lock");
        keys.iter().any(|k| match map.get_mut(*k) {
            Some(times) => {
                while times.front().is_some_and(|t| t.elapsed() > FAILURE_WINDOW) {
                    times.pop_front();
                }
                times.len() >= FAILURES_MAX
            }
            None => false,
        })
    }

    pub fn failed(&self, keys: &[&str]) {
        let mut map = self.failures.lock().expect("limiter lock");
        if map.len() >= FAILURE_KEYS_MAX {
            map.retain(|_, times| times.back().is_some_and(|t| t.elapsed() <= FAILURE_WINDOW));
        }
        for key in keys {
            let times = map.entry(key.to_string()).or_default();
            times.push_back(Instant::now());
            while times.len() > FAILURES_MAX {
                times.pop_front();
            }
        }
    }
}

/// The argon2id hash of `password`, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_against_its_hash_only() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("wrong horse battery", &hash));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn the_sixth_failure_in_a_window_blocks() {
        let limiter = Limiter::default();
        for _ in 0..FAILURES_MAX {
            assert!(!limiter.blocked(&["ip:1", "user:a"]));
            limiter.failed(&["ip:1", "user:a"]);
        }
        assert!(limiter.blocked(&["ip:1"]));
        assert!(limiter.blocked(&["ip:2", "user:a"]));
        assert!(!limiter.blocked(&["ip:2", "user:b"]));
    }
}
