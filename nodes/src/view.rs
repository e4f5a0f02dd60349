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

/// `2026-11-25T12:40:52.123Z` from milliseconds since the epoch (UTC, proleptic Gregorian).
pub fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::format_ms;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ms(1_795_610_452_123), "2026-11-25T12:40:52.123Z");
    }
}
