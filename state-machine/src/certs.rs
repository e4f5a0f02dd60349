//! Certificates for the services' domains, ordered once for the whole cluster from an ACME CA.
//!
//! The log holds everything an order needs to survive its node: the cluster's ACME account, each
//! order's URL and the key its certificate is for (both sealed under a key derived from the cluster
//! CA's, so the log never holds them in the clear), the HTTP-01 challenge answers (so whichever node
//! the CA reaches answers), each certificate, and the failures with the moment the next attempt is
//! allowed.
//!
//! Exactly one node works on a name's order at a time: the one whose [`crate::Event::CertOrderClaimed`]
//! holds. A claim lasts [`CLAIM_LEASE_MS`] after its holder's last event about the order; past that,
//! another node may claim it, and it resumes the same order by its URL instead of ordering again.
//! Only names in a service's spec can be claimed, and only when the name has no certificate or its
//! certificate is due for renewal ([`CertRecord::renew_at_ms`]), and no failure holds it back
//! ([`backoff_ms`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// How long a claim on an order holds after its holder's last event about it.
pub const CLAIM_LEASE_MS: u64 = 30_000;

/// How long after its `n`-th failure in a row (from 1) a name may be ordered again: 1 minute, 10
/// minutes, 100 minutes, then a day.
pub fn backoff_ms(failures: u32) -> u64 {
    match failures {
        0 => 0,
        1 => 60_000,
        2 => 600_000,
        3 => 6_000_000,
        _ => 86_400_000,
    }
}

/// The cluster's account at an ACME CA.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AcmeAccount {
    /// The CA's directory URL.
    pub directory: String,
    /// The account's URL at the CA.
    pub account_url: String,
    /// The account's credentials (its key), sealed under the cluster's key.
    pub credentials_sealed: Vec<u8>,
    pub created_at_ms: u64,
}

/// A certificate the CA issued.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate and its chain, PEM.
    pub chain_pem: String,
    /// The certificate's private key (PKCS#8 DER), sealed under the cluster's key.
    pub key_sealed: Vec<u8>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// The issuer's name, as people read it.
    pub issuer: String,
    pub issued_at_ms: u64,
}

/// An order under way, and who works on it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OrderClaim {
    pub node: NodeId,
    pub claimed_at_ms: u64,
    /// The holder's last event about the order: the claim holds [`CLAIM_LEASE_MS`] past it.
    pub renewed_at_ms: u64,
    /// The order at the CA, once placed: a node that takes the claim over resumes it.
    pub order_url: Option<String>,
    /// The key the certificate will be for, sealed; chosen when the order was placed.
    pub key_sealed: Option<Vec<u8>>,
    /// Challenges: token → key authorization.
    pub challenges: BTreeMap<String, String>,
}

/// Everything the log knows about one name's certificate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct CertRecord {
    pub current: Option<IssuedCert>,
    pub order: Option<OrderClaim>,
    /// Failures in a row since the last certificate.
    pub failures: u32,
    pub last_error: Option<String>,
    /// No claim before this moment (after a failure).
    pub retry_at_ms: u64,
}

impl CertRecord {
    /// When the current certificate is due for renewal: two thirds into its lifetime.
    pub fn renew_at_ms(&self) -> Option<u64> {
        self.current.as_ref().map(|c| {
            let life = c.not_after_ms.saturating_sub(c.not_before_ms);
            c.not_before_ms + life / 3 * 2
        })
    }

    /// Whether the name needs a new certificate at `now_ms`.
    pub fn due(&self, now_ms: u64) -> bool {
        self.renew_at_ms().is_none_or(|at| now_ms >= at)
    }

    /// The node whose claim holds at `now_ms`, if any.
    pub fn claimed_by(&self, now_ms: u64) -> Option<NodeId> {
        self.order.as_ref().filter(|o| now_ms < o.renewed_at_ms + CLAIM_LEASE_MS).map(|o| o.node)
    }

    /// One word for people: `valid`, `renewing`, `ordering`, `waiting` (to retry after a failure),
    /// `expired` or `pending` (nothing yet).
    pub fn state_name(&self, now_ms: u64) -> &'static str {
        let valid = self.current.as_ref().is_some_and(|c| now_ms < c.not_after_ms);
        match (valid, self.order.is_some(), now_ms < self.retry_at_ms) {
            (true, true, _) => "renewing",
            (true, false, _) => "valid",
            (false, true, _) => "ordering",
            (false, false, true) => "waiting",
            (false, false, false) if self.current.is_some() => "expired",
            (false, false, false) => "pending",
        }
    }
}

/// Whether `token` can be an ACME challenge token (base64url, as RFC 8555 says).
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
