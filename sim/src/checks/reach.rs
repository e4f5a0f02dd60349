//! No failover while a majority could reach the master: the ground truth of the network over time,
//! against the switches.

use std::collections::{BTreeMap, BTreeSet};

use coyote_state_machine::SwitchCause;

use super::*;

/// The simulator's ground truth about the network at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Links {
    /// Directed links that lose every message (from, to), by host name.
    pub cut: BTreeSet<(String, String)>,
    /// Hosts whose software is down.
    pub down: BTreeSet<String>,
    /// Message latency is raised beyond what probes tolerate.
    pub slow: bool,
}

impl Links {
    /// Whether `a` and `b` can exchange messages both ways in time.
    pub fn reach(&self, a: &str, b: &str) -> bool {
        !self.slow
            && !self.down.contains(a)
            && !self.down.contains(b)
            && !self.cut.contains(&(a.to_string(), b.to_string()))
            && !self.cut.contains(&(b.to_string(), a.to_string()))
    }
}

/// The ground truth over time: each entry holds from its time (simulated ms) to the next entry's.
#[derive(Clone, Debug, Default)]
pub struct Timeline(pub Vec<(u64, Links)>);

impl Timeline {
    pub fn record(&mut self, at_ms: u64, links: Links) {
        if self.0.last().is_some_and(|(_, l)| *l == links) {
            return;
        }
        if self.0.last().is_some_and(|(t, _)| *t == at_ms) {
            self.0.pop();
        }
        self.0.push((at_ms, links));
    }

    /// Whether `a` and `b` could reach each other during all of `[from, to]`.
    pub fn reach_throughout(&self, a: &str, b: &str, from: u64, to: u64) -> bool {
        let entries = &self.0;
        entries.iter().enumerate().all(|(i, (start, links))| {
            let end = entries.get(i + 1).map(|(t, _)| *t).unwrap_or(u64::MAX);
            let overlaps = *start <= to && end > from;
            !overlaps || links.reach(a, b)
        })
    }
}

/// No switch by failover happened while a majority of the cluster (the master among them) could
/// reach the master: for each such switch, count the hosts that could exchange messages with the
/// master during the whole `window_ms` before it was proposed. `hosts` names each node's host;
/// `epoch_ms` is the simulated clock's reading at simulated time zero.
pub fn no_switch_while_master_reachable(
    switches: &[Switch],
    timeline: &Timeline,
    hosts: &BTreeMap<u64, String>,
    window_ms: u64,
    epoch_ms: u64,
) -> Vec<String> {
    let mut violations = Vec::new();
    for s in switches.iter().filter(|s| s.cause == SwitchCause::Failover) {
        let Some(master) = hosts.get(&s.before.master) else { continue };
        let at = s.at_ms.saturating_sub(epoch_ms);
        let from = at.saturating_sub(window_ms);
        let reaching: Vec<&str> = hosts
            .values()
            .filter(|h| *h != master && timeline.reach_throughout(h, master, from, at))
            .map(|h| h.as_str())
            .collect();
        if 1 + reaching.len() > s.members / 2 {
            violations.push(format!(
                "switch: {} failed over from {master} to node {} at index {} ({at} ms) while {master} and {} could reach each other all along from {from} ms",
                s.service,
                s.to,
                s.index,
                reaching.join(", ")
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::switch;

    #[test]
    fn a_failover_while_a_majority_reaches_the_master_is_a_violation() {
        let hosts: BTreeMap<u64, String> = (1..=5).map(|i| (i, format!("n{i}"))).collect();
        let s = [switch(SwitchCause::Failover, 2, "monitor@node:2")];
        // n1 cut off from everyone from 5 s: a switch at 10 s is fine.
        let mut isolated = Links::default();
        for h in 2..=5 {
            isolated.cut.insert(("n1".into(), format!("n{h}")));
        }
        let mut timeline = Timeline::default();
        timeline.record(0, Links::default());
        timeline.record(5_000, isolated);
        assert!(no_switch_while_master_reachable(&s, &timeline, &hosts, 2_000, 0).is_empty());
        // Only the link between n1 and n2 cut (a one-way cut is enough): the others reach n1.
        let mut one_link = Links::default();
        one_link.cut.insert(("n2".into(), "n1".into()));
        let mut timeline = Timeline::default();
        timeline.record(0, one_link);
        assert_eq!(no_switch_while_master_reachable(&s, &timeline, &hosts, 2_000, 0).len(), 1);
    }
}
