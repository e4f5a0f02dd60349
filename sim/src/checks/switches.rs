//! Authority moves only by authorised switches: the replay of the archive that finds them, and the
//! checks over them.

use std::collections::BTreeMap;

use coyote_log::store::EventRecord;
use coyote_state_machine::{Event, Placement, State, SwitchCause};

/// An applied authority switch, with the placement it replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switch {
    pub index: u64,
    pub at_ms: u64,
    pub actor: String,
    pub service: String,
    pub cause: SwitchCause,
    pub to: u64,
    /// The placement just before the switch.
    pub before: Placement,
    /// Members of the cluster just before the switch.
    pub members: usize,
    /// The handover under way just before the switch, if any: its master, its target, and who
    /// asked for it.
    pub handover: Option<(u64, u64, String)>,
}

/// Every applied authority switch in an archive (which must start at the first event), found by
/// replaying it through the state machine.
pub fn switches(archive: &[EventRecord]) -> Result<Vec<Switch>, String> {
    let mut replay = Replay::default();
    replay.advance(archive)?;
    Ok(replay.found)
}

/// The replay behind [`switches`], kept between checks: each check replays only the events that
/// are new since the last one.
#[derive(Default)]
pub struct Replay {
    state: State,
    /// The last event replayed, to notice an archive that disagrees with what was replayed.
    last: Option<EventRecord>,
    /// Who asked for each handover, by service.
    asked_by: BTreeMap<String, String>,
    found: Vec<Switch>,
    moves: Vec<Move>,
    data: DataCounts,
    alarms: Vec<super::RaisedAlarm>,
}

/// Applied events of the data ledger, as the run's summary shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataCounts {
    pub snapshots_taken: usize,
    pub snapshots_stored: usize,
    /// Restores of a new master from a snapshot, and with none recorded (a new service's first).
    pub restored: usize,
    pub restored_empty: usize,
}

/// An applied event other than an authority switch that changed the master of a placed service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub index: u64,
    pub actor: String,
    /// The event's kind (`placement_set`, ...).
    pub kind: &'static str,
    pub service: String,
    pub from: u64,
    pub to: u64,
}

impl Replay {
    /// The switches found so far.
    pub fn switches(&self) -> &[Switch] {
        &self.found
    }

    pub fn data_counts(&self) -> DataCounts {
        self.data
    }

    /// Every applied alarm, in order.
    pub fn alarms(&self) -> &[super::RaisedAlarm] {
        &self.alarms
    }

    /// The masters moved by anything but a switch, found so far.
    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    /// Replays the events of `archive` (which must start at the first event) after the last one
    /// replayed. An archive shorter than what was replayed adds nothing; one whose event at the
    /// last replayed index differs from it is an error.
    pub fn advance(&mut self, archive: &[EventRecord]) -> Result<(), String> {
        if archive.first().is_some_and(|r| r.envelope.index != 1) {
            return Err(format!("the archive starts at {}", archive[0].envelope.index));
        }
        let done = self.last.as_ref().map_or(0, |r| r.envelope.index);
        if let Some(last) = &self.last {
            if let Some(same) = archive.get(done as usize - 1) {
                if same != last {
                    return Err(format!("its event at index {done} differs from the one replayed before"));
                }
            }
        }
        for record in archive.iter().skip(done as usize) {
            self.apply(record)?;
        }
        Ok(())
    }

    fn apply(&mut self, record: &EventRecord) -> Result<(), String> {
        let env = &record.envelope;
        let expected = self.last.as_ref().map_or(1, |r| r.envelope.index + 1);
        if env.index != expected {
            return Err(format!("the archive has index {} where {expected} was due", env.index));
        }
        if let Event::HandoverRequested { service, .. } = &env.event {
            if record.outcome.is_applied() {
                self.asked_by.insert(service.clone(), env.actor.clone());
            }
        }
        if record.outcome.is_applied() {
            match &env.event {
                Event::SnapshotTaken { .. } => self.data.snapshots_taken += 1,
                Event::SnapshotStored { .. } => self.data.snapshots_stored += 1,
                Event::RestoreCompleted { snapshot: Some(_), .. } => self.data.restored += 1,
                Event::RestoreCompleted { snapshot: None, .. } => self.data.restored_empty += 1,
                Event::AlarmRaised { key, .. } => {
                    self.alarms.push(super::RaisedAlarm { at_ms: env.at_ms, key: key.clone() })
                }
                _ => {}
            }
        }
        let state = &self.state;
        let handover = match &env.event {
            Event::AuthoritySwitched { service, .. } => state
                .handover(service)
                .map(|h| (h.from, h.to, self.asked_by.get(service).cloned().unwrap_or_default())),
            _ => None,
        };
        let before = match &env.event {
            Event::AuthoritySwitched { service, .. } => state
                .services
                .get(service)
                .and_then(|s| s.placement.clone())
                .map(|p| (p, state.members.len())),
            _ => None,
        };
        // Every other event must leave each placed service's master where it was.
        let masters: Vec<(String, u64)> = match &env.event {
            Event::AuthoritySwitched { .. } => Vec::new(),
            _ => masters(state),
        };
        let outcome = self.state.apply(env).map_err(|e| format!("replaying index {}: {e}", env.index))?;
        if outcome.is_applied() && !masters.is_empty() {
            let now = masters_by_name(&self.state);
            for (service, from) in masters {
                if let Some(&to) = now.get(service.as_str()).filter(|to| **to != from) {
                    self.moves.push(Move {
                        index: env.index,
                        actor: env.actor.clone(),
                        kind: env.event.kind(),
                        service,
                        from,
                        to,
                    });
                }
            }
        }
        if let (Event::AuthoritySwitched { service, to, cause, .. }, Some((before, members))) =
            (&env.event, before)
        {
            if outcome.is_applied() {
                self.found.push(Switch {
                    index: env.index,
                    at_ms: env.at_ms,
                    actor: env.actor.clone(),
                    service: service.clone(),
                    cause: *cause,
                    to: *to,
                    before,
                    members,
                    handover,
                });
            }
        }
        self.last = Some(record.clone());
        Ok(())
    }
}

fn masters(state: &State) -> Vec<(String, u64)> {
    masters_by_name(state).into_iter().map(|(name, master)| (name.to_string(), master)).collect()
}

fn masters_by_name(state: &State) -> BTreeMap<&str, u64> {
    state
        .services
        .iter()
        .filter_map(|(name, svc)| svc.placement.as_ref().map(|p| (name.as_str(), p.master)))
        .collect()
}

/// Authority moved only by switches: no other applied event (a placement computed before a switch
/// and committed after it, say) changed the master of a placed service. Such a move takes no
/// switch, so it names no moment from which the new master may serve, and no fence waits for it.
pub fn authority_moved_only_by_switches(moves: &[Move]) -> Vec<String> {
    moves
        .iter()
        .map(|m| {
            format!(
                "authority: {} at index {} (by {:?}) moved the master of {} from node {} to node {} without a switch",
                m.kind, m.index, m.actor, m.service, m.from, m.to
            )
        })
        .collect()
}

/// No backup took authority without an instruction: a switch by failover names the failover and
/// comes from that node's monitor; an instructed switch comes from an admin (`admin_actor`); a
/// switch that ends a handover ends one an admin asked for, to that same node, and comes from the
/// old master's reconciler (`Handover`) or from the target's monitor (`HandoverOverdue`).
pub fn switches_authorised(switches: &[Switch], admin_actor: &str) -> Vec<String> {
    let mut violations = Vec::new();
    for s in switches {
        let ok = match s.cause {
            SwitchCause::Failover => {
                s.before.failover == Some(s.to) && s.actor == format!("monitor@node:{}", s.to)
            }
            SwitchCause::Instruction => s.actor == admin_actor,
            SwitchCause::Handover | SwitchCause::HandoverOverdue => {
                let (by, old_master) = match s.cause {
                    SwitchCause::Handover => ("reconciler", true),
                    _ => ("monitor", false),
                };
                s.handover.as_ref().is_some_and(|(from, to, asker)| {
                    let proposer = if old_master { from } else { to };
                    *to == s.to && asker == admin_actor && s.actor == format!("{by}@node:{proposer}")
                })
            }
        };
        if !ok {
            let role = if s.before.backups.contains(&s.to) {
                "a backup"
            } else if s.before.failover == Some(s.to) {
                "the failover"
            } else {
                "a node"
            };
            violations.push(format!(
                "authority: node {} ({role} of {}) took authority ({:?}) at index {} by {:?} without an instruction",
                s.to, s.service, s.cause, s.index, s.actor
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::{record, switch};

    #[test]
    fn the_replay_goes_on_from_where_it_stopped_and_refuses_a_different_history() {
        let archive: Vec<EventRecord> = (1..=4).map(|i| record(i, &format!("k{i}"))).collect();
        let mut replay = Replay::default();
        replay.advance(&archive[..2]).unwrap();
        assert_eq!(replay.last.as_ref().map(|r| r.envelope.index), Some(2));
        // A shorter archive (a node that is behind) adds nothing and is no error.
        replay.advance(&archive[..1]).unwrap();
        assert_eq!(replay.last.as_ref().map(|r| r.envelope.index), Some(2));
        replay.advance(&archive).unwrap();
        assert_eq!(replay.last.as_ref().map(|r| r.envelope.index), Some(4));
        assert_eq!(replay.state, {
            let mut whole = Replay::default();
            whole.advance(&archive).unwrap();
            whole.state
        });
        // An archive whose event at the last replayed index is another one.
        let mut other = archive.clone();
        other[3] = record(4, "else");
        other.push(record(5, "k5"));
        let err = replay.advance(&other).unwrap_err();
        assert!(err.contains("index 4 differs"), "{err}");
        // An archive with a gap, and one that does not start at the first event.
        let gap = vec![record(1, "k1"), record(3, "k3")];
        assert!(Replay::default().advance(&gap).unwrap_err().contains("index 3 where 2 was due"));
        assert!(switches(&archive[1..]).unwrap_err().contains("starts at 2"));
    }

    #[test]
    fn only_the_failover_fails_over_and_only_an_admin_instructs() {
        let good = [
            switch(SwitchCause::Failover, 2, "monitor@node:2"),
            switch(SwitchCause::Instruction, 3, "admin"),
        ];
        assert!(switches_authorised(&good, "admin").is_empty());
        let bad = [
            switch(SwitchCause::Failover, 3, "monitor@node:3"),
            switch(SwitchCause::Instruction, 3, "monitor@node:3"),
        ];
        assert_eq!(switches_authorised(&bad, "admin").len(), 2);
    }

    #[test]
    fn a_handover_is_finished_by_the_old_master_or_the_target_only_as_asked() {
        let handing = |cause: SwitchCause, to: u64, actor: &str, asker: &str| Switch {
            handover: Some((1, 3, asker.into())),
            ..switch(cause, to, actor)
        };
        use SwitchCause::{Handover, HandoverOverdue};
        let good = [
            handing(Handover, 3, "reconciler@node:1", "admin"),
            handing(HandoverOverdue, 3, "monitor@node:3", "admin"),
        ];
        assert!(switches_authorised(&good, "admin").is_empty());
        let bad = [
            // to another node than the one asked for
            handing(Handover, 4, "reconciler@node:1", "admin"),
            // by a third node, or by the other party
            handing(HandoverOverdue, 3, "monitor@node:4", "admin"),
            handing(Handover, 3, "reconciler@node:3", "admin"),
            // a handover nobody authorised asked for
            handing(Handover, 3, "reconciler@node:1", "monitor@node:3"),
            // no handover under way at all
            Switch { handover: None, ..switch(Handover, 3, "reconciler@node:1") },
        ];
        assert_eq!(switches_authorised(&bad, "admin").len(), 5);
    }
}
