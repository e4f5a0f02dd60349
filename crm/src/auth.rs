//! Who is asking: sessions (a signed cookie), their CSRF tokens, passwords (argon2id) and the limit
//! on wrong passwords.
//!
//! A session is not stored anywhere: its cookie says who the visitor is (a user, or a visitor who
//! may have signed up) and until when, under a MAC with a key that every node of the cluster
//! derives from the cluster CA's key. So the pages of any node take a session any other node made,
//! and a visitor whose DNS answer moves to another node stays logged in. The MAC also covers a
//! digest of the user's password hash: a password change ends every session of that user, on every
//! node. Every visitor gets a session on the first page, so forms before login (activation, login,
//! signup) carry a CSRF token too, which is a MAC of the session's random id; logging in replaces
//! the session with a new one (no fixation). Logging out clears the cookie; a copy of it stays
//! valid until it expires (a password change ends it at once).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "coyote_session";
/// A session lives this long after its last renewal; it is renewed on a page seen in its second
/// half, so a session unused for this long ends.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
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
/// Longest cookie value read (a user name and a signup name, hex, and the rest).
const COOKIE_MAX: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Random, and never shown: the CSRF token is derived from it.
    pub id: String,
    pub csrf: String,
    /// The logged-in user, or none for a visitor.
    pub user: Option<String>,
    /// The signup this visitor made, while it waits for an admin.
    pub signup: Option<String>,
    /// When the session ends unless renewed (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

/// Makes and checks the signed session cookies of a cluster.
pub struct Sessions {
    key: [u8; 32],
}

type HmacSha256 = Hmac<Sha256>;

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn optional_hex(value: &Option<String>) -> String {
    value.as_deref().map(|v| hex::encode(v.as_bytes())).unwrap_or_else(|| "-".into())
}

fn from_optional_hex(text: &str) -> Option<Option<String>> {
    if text == "-" {
        return Some(None);
    }
    String::from_utf8(hex::decode(text).ok()?).ok().map(Some)
}

impl Sessions {
    /// Sessions signed with a key derived from `secret` (the cluster CA's private key, so that every
    /// node derives the same one).
    pub fn from_secret(secret: &[u8]) -> Sessions {
        let mut hasher = Sha256::new();
        hasher.update(b"coyote crm sessions v1\0");
        hasher.update(secret);
        Sessions { key: hasher.finalize().into() }
    }

    /// Sessions with a random key: valid on this node only, until it restarts.
    pub fn random() -> Sessions {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        Sessions { key }
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// The MAC of a session; `password_hash` is its user's (empty for a visitor).
    fn sign(&self, s: &Session, password_hash: &str) -> String {
        let password = hex::encode(Sha256::digest(password_hash.as_bytes()));
        self.mac(&[
            b"session",
            s.id.as_bytes(),
            &s.expires_at_ms.to_be_bytes(),
            s.user.as_deref().unwrap_or("").as_bytes(),
            &[u8::from(s.user.is_some())],
            s.signup.as_deref().unwrap_or("").as_bytes(),
            &[u8::from(s.signup.is_some())],
            password.as_bytes(),
        ])
    }

    fn csrf_of(&self, id: &str) -> String {
        self.mac(&[b"csrf", id.as_bytes()])
    }

    /// A new session for `user` (or a visitor), from `now_ms`.
    pub fn create(&self, user: Option<String>, now_ms: u64) -> Session {
        let id = random_token();
        Session {
            csrf: self.csrf_of(&id),
            id,
            user,
            signup: None,
            expires_at_ms: now_ms.saturating_add(SESSION_LIFETIME.as_millis() as u64),
        }
    }

    /// `session` renewed from `now_ms`.
    pub fn renewed(&self, session: &Session, now_ms: u64) -> Session {
        Session {
            expires_at_ms: now_ms.saturating_add(SESSION_LIFETIME.as_millis() as u64),
            ..session.clone()
        }
    }

    /// Whether `session` is in the second half of its life (a page should renew it).
    pub fn ageing(&self, session: &Session, now_ms: u64) -> bool {
        session.expires_at_ms.saturating_sub(now_ms) < SESSION_LIFETIME.as_millis() as u64 / 2
    }

    /// The cookie value of `session`; `password_hash` is its user's (empty for a visitor).
    pub fn cookie_value(&self, session: &Session, password_hash: &str) -> String {
        format!(
            "{}.{}.{}.{}.{}",
            session.id,
            session.expires_at_ms,
            optional_hex(&session.user),
            optional_hex(&session.signup),
            self.sign(session, password_hash)
        )
    }

    /// The session a cookie value names, if it is this cluster's, unexpired at `now_ms`, and (for a
    /// user) signed over the password hash `password_of` gives now.
    pub fn check(
        &self,
        value: &str,
        now_ms: u64,
        password_of: impl Fn(&str) -> Option<String>,
    ) -> Option<Session> {
        if value.len() > COOKIE_MAX {
            return None;
        }
        let mut fields = value.split('.');
        let id = fields.next()?;
        let expires_at_ms: u64 = fields.next()?.parse().ok()?;
        let user = from_optional_hex(fields.next()?)?;
        let signup = from_optional_hex(fields.next()?)?;
        let mac = fields.next()?;
        if fields.next().is_some() || id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let password_hash = match &user {
            Some(name) => password_of(name)?,
            None => String::new(),
        };
        let session = Session { id: id.to_string(), csrf: self.csrf_of(id), user, signup, expires_at_ms };
        if !same(mac, &self.sign(&session, &password_hash)) || expires_at_ms <= now_ms {
            return None;
        }
        Some(session)
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
    fn a_session_is_taken_by_any_node_of_the_cluster_until_it_expires_or_the_password_changes() {
        let (a, b, other) =
            (Sessions::from_secret(b"ca key"), Sessions::from_secret(b"ca key"), Sessions::from_secret(b"x"));
        let hash = |_: &str| Some("hash 1".to_string());
        let session = a.create(Some("alice".into()), 1000);
        let cookie = a.cookie_value(&session, "hash 1");
        assert_eq!(b.check(&cookie, 2000, hash), Some(session.clone()), "another node of the cluster");
        assert_eq!(b.check(&cookie, 2000, hash).unwrap().csrf, session.csrf);
        assert_eq!(other.check(&cookie, 2000, hash), None, "another cluster");
        assert_eq!(b.check(&cookie, session.expires_at_ms, hash), None, "expired");
        assert_eq!(b.check(&cookie, 2000, |_| Some("hash 2".into())), None, "the password changed");
        assert_eq!(b.check(&cookie, 2000, |_| None), None, "the user is gone");
        // Any change to the cookie breaks it: another user, a later expiry, a signup added.
        let forged = cookie.replace(&hex::encode("alice"), &hex::encode("admin"));
        assert_eq!(b.check(&forged, 2000, hash), None);
        let later =
            cookie.replace(&session.expires_at_ms.to_string(), &(session.expires_at_ms * 2).to_string());
        assert_eq!(b.check(&later, 2000, hash), None);
        for garbage in ["", "a.b.c.d.e", &format!("{cookie}.x"), &"9".repeat(5000), "\u{0}.1.-.-.00"] {
            assert_eq!(b.check(garbage, 2000, hash), None, "{garbage:?}");
        }
        // A visitor's session, and one that signed up.
        let mut visitor = a.create(None, 1000);
        visitor.signup = Some("bob".into());
        let cookie = a.cookie_value(&visitor, "");
        assert_eq!(b.check(&cookie, 2000, |_| None), Some(visitor.clone()));
        assert!(!a.ageing(&visitor, 1000) && a.ageing(&visitor, visitor.expires_at_ms - 1));
        assert!(a.renewed(&visitor, 5000).expires_at_ms > visitor.expires_at_ms);
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
