//! The data follows authority: what a new master's container finds in its volume when it starts.
//!
//! Model containers append sequence numbers to their volume ([`crate::model::DataRecord`]). When a
//! switch makes a node master, the node restores the newest snapshot it can get before its
//! container starts, and the container goes on from the last number it finds. So the number a new
//! master's first container start finds tells what the restore brought:
//! - the volume is always a clean sequence 1, 2, ..., n (nothing torn, nothing garbled);
//! - never a number the old master wrote only after the switch (a deposed master's snapshot is never
//!   restored): at most the highest number written anywhere by the switch's moment;
//! - after a graceful handover, exactly the old master's last number (a handover loses nothing),
//!   when its container wrote since it became master;
//! - after any other switch, at least what the old master had written since it became master up to
//!   `window_ms` before its last write (a failover loses at most the documented window), unless the
//!   new master announced the loss with a `data-behind/SERVICE` alarm before its container started.

use std::collections::BTreeMap;

use coyote_state_machine::SwitchCause;

use super::Switch;
use crate::model::DataRecord;

/// An applied alarm: when, and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaisedAlarm {
    pub at_ms: u64,
    pub key: String,
}

/// Checks the container starts among `records[from..]`; `host_of` maps node ids to hosts.
pub fn data_followed_authority(
    records: &[DataRecord],
    from: usize,
    switches: &[Switch],
    alarms: &[RaisedAlarm],
    host_of: &BTreeMap<u64, String>,
    window_ms: u64,
) -> Vec<String> {
    let mut found = Vec::new();
    // Writes by (service, host), in order.
    let mut writes: BTreeMap<(&str, &str), Vec<(u64, u64)>> = BTreeMap::new();
    for r in records {
        if let DataRecord::Write { host, service, at_ms, n } = r {
            writes.entry((service.as_str(), host.as_str())).or_default().push((*at_ms, *n));
        }
    }
    let last_write_ms = |service: &str, host: &str| -> Option<u64> {
        writes.get(&(service, host)).and_then(|w| w.last()).map(|(at, _)| *at)
    };
    let written_anywhere = |service: &str, until_ms: u64| -> u64 {
        writes
            .iter()
            .filter(|((s, _), _)| *s == service)
            .flat_map(|(_, w)| w.iter().filter(|(at, _)| *at <= until_ms).map(|(_, n)| *n))
            .max()
            .unwrap_or(0)
    };
    for (position, r) in records.iter().enumerate().skip(from) {
        let DataRecord::Start { host, service, at_ms, last, clean } = r else { continue };
        if !clean {
            found.push(format!(
                "data: {service}'s volume on {host} was not a clean sequence when its container started (clean up to {last})"
            ));
            continue;
        }
        // The last switch of the service before this start, if it made this host master.
        let Some(switch) = switches.iter().rfind(|s| s.service == *service && s.at_ms <= *at_ms) else {
            continue;
        };
        if host_of.get(&switch.to) != Some(host) {
            continue;
        }
        // Only the first start after that switch on this host shows what the restore brought.
        let earlier = records[..position].iter().any(|e| {
            matches!(e, DataRecord::Start { host: h, service: s, at_ms: t, .. }
                if h == host && s == service && *t >= switch.at_ms)
        });
        if earlier {
            continue;
        }
        let Some(old) = host_of.get(&switch.before.master) else { continue };
        let highest = written_anywhere(service, switch.at_ms);
        if *last > highest {
            found.push(format!(
                "data: {service}'s new master {host} found {last} at its start, but only up to {highest} was written by the switch at {}: a deposed master's data was restored",
                switch.index
            ));
            continue;
        }
        // The switch that made the old master master: only what it wrote since counts against it
        // (what it found at its own start was checked at that switch).
        let since_ms = switches
            .iter()
            .rfind(|s| s.service == *service && s.at_ms < switch.at_ms && s.to == switch.before.master)
            .map_or(0, |s| s.at_ms);
        let wrote_since = |until_ms: u64| -> u64 {
            writes
                .get(&(service.as_str(), old.as_str()))
                .map(|w| {
                    w.iter()
                        .filter(|(at, _)| *at >= since_ms && *at <= until_ms)
                        .map(|(_, n)| *n)
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(0)
        };
        if switch.cause == SwitchCause::Handover {
            // An old master whose container never wrote hands over what it restored, which the
            // checker does not see; only the stale-data rule above applies then.
            let expected = wrote_since(switch.at_ms);
            if expected > 0 && *last != expected {
                found.push(format!(
                    "data: after the handover of {service} at {} from {old} to {host}, the new master found {last}, but the old master's last write was {expected}",
                    switch.index
                ));
            }
            continue;
        }
        let old_end = last_write_ms(service, old).unwrap_or(0).min(switch.at_ms);
        let floor = wrote_since(old_end.saturating_sub(window_ms));
        let announced = alarms.iter().any(|a| {
            a.key == format!("data-behind/{service}") && a.at_ms >= switch.at_ms && a.at_ms <= *at_ms
        });
        if *last < floor && !announced {
            found.push(format!(
                "data: after the switch of {service} at {} ({:?}) from {old} to {host}, the new master found {last}, but the old master had written up to {floor} by {window_ms} ms before its last write, and no data-behind alarm says so",
                switch.index, switch.cause
            ));
        }
    }
    found
}
