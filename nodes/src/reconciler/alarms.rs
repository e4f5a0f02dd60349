//! The alarms a pass raises and clears: the problems it found ([`PassReport`]), keyed so that at most
//! one alarm is open per problem, and the pure decision of which alarm events that calls for
//! ([`alarm_events`]).

use std::collections::{BTreeMap, BTreeSet};

use coyote_state_machine::{Event, NodeId, State};

/// The kinds of per-service problems, and the alarm key of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    ImageMissing,
    PortTaken,
    CrashLoop,
    Container,
}

impl ProblemKind {
    pub const ALL: [ProblemKind; 4] =
        [ProblemKind::ImageMissing, ProblemKind::PortTaken, ProblemKind::CrashLoop, ProblemKind::Container];

    fn prefix(self) -> &'static str {
        match self {
            ProblemKind::ImageMissing => "image-missing",
            ProblemKind::PortTaken => "port-taken",
            ProblemKind::CrashLoop => "crash-loop",
            ProblemKind::Container => "container",
        }
    }

    pub fn key(self, node: NodeId, service: &str) -> String {
        format!("{}/{node}/{service}", self.prefix())
    }
}

pub fn docker_key(node: NodeId) -> String {
    format!("docker/{node}")
}

/// The service a per-service key of `node` names, if `key` is one.
fn key_service(key: &str, node: NodeId) -> Option<&str> {
    let (prefix, rest) = key.split_once('/')?;
    ProblemKind::ALL.iter().find(|k| k.prefix() == prefix)?;
    let (n, service) = rest.split_once('/')?;
    (n.parse::<NodeId>().ok()? == node).then_some(service)
}

/// A problem found in a pass: the alarm it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub service: Option<String>,
    pub message: String,
}

/// What one pass found: problems to raise, and keys proven healthy (to clear if open).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub problems: BTreeMap<String, Problem>,
    pub healed: BTreeSet<String>,
    /// Services this pass looked at (desired or observed): alarms of others are stale.
    pub seen: BTreeSet<String>,
    /// False when the pass could not look at the containers at all (Docker down).
    pub complete: bool,
}

impl PassReport {
    pub(super) fn problem(&mut self, key: String, service: Option<&str>, message: String) {
        self.healed.remove(&key);
        self.problems.insert(key, Problem { service: service.map(String::from), message });
    }

    pub(super) fn heal(&mut self, key: String) {
        if !self.problems.contains_key(&key) {
            self.healed.insert(key);
        }
    }

    pub(super) fn heal_service(&mut self, node: NodeId, service: &str, kinds: &[ProblemKind]) {
        for k in kinds {
            self.heal(k.key(node, service));
        }
    }
}

/// The alarm events a pass calls for: raise each problem whose key is not open, clear each open alarm
/// whose key healed (or that names a service this node no longer has anything to do with).
pub fn alarm_events(state: &State, node: NodeId, report: &PassReport) -> Vec<Event> {
    let open: BTreeMap<&str, u64> = state.open_alarms().map(|a| (a.key.as_str(), a.id)).collect();
    let mut events = Vec::new();
    for (key, problem) in &report.problems {
        if open.contains_key(key.as_str()) {
            continue;
        }
        // An alarm may name only a service that exists.
        let service = problem.service.clone().filter(|s| state.services.contains_key(s));
        events.push(Event::AlarmRaised {
            key: key.clone(),
            node: Some(node),
            service,
            message: problem.message.clone(),
        });
    }
    for (key, id) in &open {
        let healed = report.healed.contains(*key);
        let stale = report.complete
            && !report.problems.contains_key(*key)
            && key_service(key, node).is_some_and(|s| !report.seen.contains(s));
        if healed || stale {
            events.push(Event::AlarmCleared { alarm_id: *id, reason: "healed".into() });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconciler::test_support::{apply, state_with_service};

    #[test]
    fn alarms_are_raised_once_and_cleared_when_healed() {
        let mut state = state_with_service(1);
        let key = ProblemKind::ImageMissing.key(1, "a");
        let mut report = PassReport { complete: true, ..Default::default() };
        report.seen.insert("a".into());
        report.problem(key.clone(), Some("a"), "image img:1 is missing".into());
        let events = alarm_events(&state, 1, &report);
        assert_eq!(events.len(), 1);
        assert!(
            matches!(&events[0], Event::AlarmRaised { key: k, node: Some(1), service: Some(s), .. } if *k == key && s == "a")
        );
        apply(&mut state, events[0].clone());

        // The problem lasts: no new event.
        assert!(alarm_events(&state, 1, &report).is_empty());

        // Neither a problem nor healed (a backoff skipped the service): the alarm stays.
        let mut quiet = PassReport { complete: true, ..Default::default() };
        quiet.seen.insert("a".into());
        assert!(alarm_events(&state, 1, &quiet).is_empty());

        // Healed: cleared, by the id of the open alarm.
        let mut healed = quiet.clone();
        healed.heal(key.clone());
        let id = state.open_alarms().next().unwrap().id;
        assert_eq!(
            alarm_events(&state, 1, &healed),
            vec![Event::AlarmCleared { alarm_id: id, reason: "healed".into() }]
        );

        // A service this node no longer sees at all: its alarm is stale, cleared...
        let empty = PassReport { complete: true, ..Default::default() };
        assert_eq!(alarm_events(&state, 1, &empty).len(), 1);
        // ...but not when the pass could not look (Docker down), nor another node's alarm.
        let blind = PassReport::default();
        assert!(alarm_events(&state, 1, &blind).is_empty());
        assert!(alarm_events(&state, 2, &empty).is_empty());
    }

    #[test]
    fn docker_down_is_one_node_alarm() {
        let mut state = state_with_service(1);
        let mut report = PassReport::default();
        report.problem(docker_key(1), None, "Docker is not reachable".into());
        let events = alarm_events(&state, 1, &report);
        assert!(matches!(&events[..], [Event::AlarmRaised { key, service: None, .. }] if key == "docker/1"));
        apply(&mut state, events[0].clone());
        assert!(alarm_events(&state, 1, &report).is_empty());
        let mut up = PassReport { complete: true, ..Default::default() };
        up.seen.insert("a".into());
        up.heal(docker_key(1));
        assert!(matches!(&alarm_events(&state, 1, &up)[..], [Event::AlarmCleared { .. }]));
    }

    #[test]
    fn keys_name_their_service() {
        assert_eq!(key_service("image-missing/3/blog", 3), Some("blog"));
        assert_eq!(key_service("image-missing/3/blog", 4), None);
        assert_eq!(key_service("docker/3", 3), None);
        assert_eq!(key_service("other/3/blog", 3), None);
    }
}
