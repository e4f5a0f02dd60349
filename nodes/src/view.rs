//! How records look to users: the JSON objects of the API, and times in human lines.

use coyote_log::store::EventRecord;
use coyote_state_machine::{Outcome, Service, Token, TokenStatus};
use serde_json::{json, Value};

pub fn event_json(r: &EventRecord) -> Value {
    let env = &r.envelope;
    let mut v = json!({
        "index": env.index,
        "term": env.term,
        "at": env.at_ms,
        "actor": env.actor,
        "kind": env.event.kind(),
        "summary": env.event.summary(),
        "outcome": match &r.outcome { Outcome::Applied => "applied", Outcome::Rejected { .. } => "rejected" },
        "event": env.event,
    });
    if let Outcome::Rejected { reason } = &r.outcome {
        v["reason"] = json!(reason);
    }
    v
}

pub fn token_json(t: &Token, now_ms: u64) -> Value {
    let status = match t.status(now_ms) {
        TokenStatus::Valid => "valid",
        TokenStatus::Expired => "expired",
        TokenStatus::UsedUp => "used",
        TokenStatus::Revoked => "revoked",
    };
    json!({
        "id": t.id,
        "status": status,
        "issued_at": t.issued_at_ms,
        "expires_at": t.expires_at_ms,
        "uses_total": t.uses_total,
        "uses_left": t.uses_left,
        "used_by": t.used_by,
    })
}

pub fn service_json(s: &Service) -> Value {
    json!({
        "name": s.spec.name,
        "spec": s.spec,
        "spec_hash": s.spec.hash(),
        "placement": s.placement,
        "created_at": s.created_at_ms,
        "serve_from": s.serve_from_ms,
    })
}

pub use coyote_state_machine::format_ms;
