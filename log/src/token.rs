//! Join tokens: the one string an admin copies to a new server.
//!
//! A token carries what the new server needs to find and trust the cluster before it has any
//! certificate: a member's address, the SHA-256 pin of the cluster CA, the token id and its secret.
//! It is `cyt1_` followed by base64url (no padding) of a small JSON object, so it survives copy and
//! paste through terminals and chat windows. The log only ever stores the secret's SHA-256.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub const TOKEN_PREFIX: &str = "cyt1_";
/// Tokens longer than this are refused before decoding.
pub const TOKEN_MAX_CHARS: usize = 2048;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    /// A member's Raft/gRPC address.
    #[serde(rename = "a")]
    pub addr: String,
    /// Hex SHA-256 of the cluster CA certificate (DER).
    #[serde(rename = "p")]
    pub ca_pin: String,
    #[serde(rename = "i")]
    pub id: String,
    #[serde(rename = "s")]
    pub secret: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("this is not a coyote join token (a token starts with {TOKEN_PREFIX})")]
    Prefix,
    #[error("the join token is damaged (was it copied whole?): {0}")]
    Damaged(String),
}

impl JoinToken {
    /// A new token with a random id and a 256-bit random secret.
    pub fn generate(addr: String, ca_pin: String) -> Self {
        let mut rng = rand::thread_rng();
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        JoinToken { addr, ca_pin, id: hex::encode(id), secret: URL_SAFE_NO_PAD.encode(secret) }
    }

    pub fn secret_sha256(&self) -> String {
        coyote_state_machine::sha256_hex(self.secret.as_bytes())
    }

    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a token serializes to JSON");
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        if text.len() > TOKEN_MAX_CHARS {
            return Err(TokenError::Damaged(format!("longer than {TOKEN_MAX_CHARS} characters")));
        }
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|e| TokenError::Damaged(e.to_string()))?;
        let token: JoinToken =
            serde_json::from_slice(&json).map_err(|e| TokenError::Damaged(e.to_string()))?;
        let pin_ok = token.ca_pin.len() == 64 && token.ca_pin.bytes().all(|b| b.is_ascii_hexdigit());
        if !pin_ok {
            return Err(TokenError::Damaged("the CA pin is not a SHA-256 in hex".into()));
        }
        if token.id.is_empty() || token.secret.is_empty() || token.addr.is_empty() {
            return Err(TokenError::Damaged("a field is empty".into()));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let t = JoinToken::generate("127.0.0.1:7001".into(), "a".repeat(64));
        assert_eq!(JoinToken::parse(&t.encode()).unwrap(), t);
        assert_eq!(JoinToken::parse(&format!("  {}\n", t.encode())).unwrap(), t);
        assert_eq!(JoinToken::parse("hello"), Err(TokenError::Prefix));
        assert!(matches!(JoinToken::parse("cyt1_!!!"), Err(TokenError::Damaged(_))));
        assert!(matches!(JoinToken::parse("cyt1_e30"), Err(TokenError::Damaged(_)))); // "{}"
        let mut cut = t.encode();
        cut.truncate(cut.len() - 5);
        assert!(JoinToken::parse(&cut).is_err());
        let bad_pin = JoinToken { ca_pin: "zz".into(), ..t };
        assert!(matches!(JoinToken::parse(&bad_pin.encode()), Err(TokenError::Damaged(_))));
    }
}
