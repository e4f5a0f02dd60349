//! The checkers: each one a pure function over snapshots of the nodes (and the client oracle), giving
//! the violations it finds as readable sentences. The simulator calls them after every check interval
//! and once more at the end; nothing here touches the simulation.

use std::collections::BTreeMap;

use coyote_log::store::EventRecord;
use coyote_state_machine::Event;

/// What one node looked like at one instant.
#[derive(Clone, Debug)]
pub struct NodeSnapshot {
    /// The turmoil host name (`n1`, ...).
    pub host: String,
    pub node_id: u64,
    /// Whether Raft on it considers itself leader.
    pub is_leader: bool,
    pub term: u64,
    /// Who it believes is leader.
    pub leader: Option<u64>,
    /// The index of the last event its state machine applied (events are numbered densely; one log
    /// entry can carry several).
    pub applied: u64,
    /// The last log index its state machine applied.
    pub log_applied: u64,
    /// Every archived event up to `applied`, in index order.
    pub archive: Vec<EventRecord>,
    /// Voters in the membership it knows.
    pub voters: Vec<u64>,
}

/// A proposal the cluster acknowledged: `propose` returned `Ok` with this index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub index: u64,
    pub actor: String,
    pub event: Event,
}

/// Committed prefixes agree: any two nodes hold the same archived events up to the smaller of their
/// applied indexes.
pub fn prefixes_agree(nodes: &[NodeSnapshot]) -> Vec<String> {
    let mut violations = Vec::new();
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            let upto = a.applied.min(b.applied);
            let left: Vec<&EventRecord> = a.archive.iter().take_while(|r| r.envelope.index <= upto).collect();
            let right: Vec<&EventRecord> =
                b.archive.iter().take_while(|r| r.envelope.index <= upto).collect();
            if left == right {
                continue;
            }
            let first = left
                .iter()
                .zip(&right)
                .find(|(l, r)| l != r)
                .map(|(l, r)| format!("index {} vs {}", l.envelope.index, r.envelope.index))
                .unwrap_or_else(|| format!("{} events vs {}", left.len(), right.len()));
            violations.push(format!(
                "prefix: {} and {} disagree below their common applied index {upto} (first difference: {first})",
                a.host, b.host
            ));
        }
    }
    violations
}

/// No acknowledged event is lost: every node that applied up to an acknowledged index archived that
/// very proposal there.
pub fn no_ack_lost(nodes: &[NodeSnapshot], acks: &[Ack]) -> Vec<String> {
    let mut violations = Vec::new();
    for node in nodes {
        let by_index: BTreeMap<u64, &EventRecord> =
            node.archive.iter().map(|r| (r.envelope.index, r)).collect();
        for ack in acks.iter().filter(|a| a.index <= node.applied) {
            match by_index.get(&ack.index) {
                Some(r) if r.envelope.actor == ack.actor && r.envelope.event == ack.event => {}
                Some(r) => violations.push(format!(
                    "lost ack: {} holds {} {:?} at acknowledged index {}, not {} {:?}",
                    node.host, r.envelope.actor, r.envelope.event, ack.index, ack.actor, ack.event
                )),
                None => violations.push(format!(
                    "lost ack: {} applied up to {} but has no event at acknowledged index {} ({} {:?})",
                    node.host, node.applied, ack.index, ack.actor, ack.event
                )),
            }
        }
    }
    violations
}

/// Election safety: at most one leader per term among the nodes seen at one instant.
pub fn one_leader_per_term(nodes: &[NodeSnapshot]) -> Vec<String> {
    let mut leaders: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for node in nodes.iter().filter(|n| n.is_leader) {
        leaders.entry(node.term).or_default().push(&node.host);
    }
    leaders
        .into_iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|(term, hosts)| format!("election safety: {} all lead term {term}", hosts.join(", ")))
        .collect()
}

/// Liveness, after healing: all `expected` nodes are up, exactly one of them leads, all agree on who,
/// all know the same voters, and all applied the same index.
pub fn converged(nodes: &[NodeSnapshot], expected: usize) -> Result<(), String> {
    if nodes.len() != expected {
        return Err(format!("{} of {expected} nodes are running", nodes.len()));
    }
    let leaders: Vec<&NodeSnapshot> = nodes.iter().filter(|n| n.is_leader).collect();
    let [leader] = leaders.as_slice() else {
        return Err(format!("{} nodes consider themselves leader", leaders.len()));
    };
    if let Some(n) = nodes.iter().find(|n| n.leader != Some(leader.node_id)) {
        return Err(format!("{} follows {:?}, not {}", n.host, n.leader, leader.host));
    }
    if let Some(n) = nodes.iter().find(|n| n.voters != leader.voters) {
        return Err(format!("{} knows voters {:?}, the leader {:?}", n.host, n.voters, leader.voters));
    }
    if leader.voters.len() != expected {
        return Err(format!("the membership has {} voters, not {expected}", leader.voters.len()));
    }
    if let Some(n) = nodes.iter().find(|n| n.log_applied != leader.log_applied || n.applied != leader.applied)
    {
        return Err(format!(
            "{} applied log entry {} (event {}), the leader {} (event {})",
            n.host, n.log_applied, n.applied, leader.log_applied, leader.applied
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use coyote_state_machine::{Envelope, Outcome, Proposal};

    fn record(index: u64, key: &str) -> EventRecord {
        let event = Event::AlarmRaised { key: key.into(), node: None, service: None, message: String::new() };
        let proposal = Proposal { at_ms: 1, actor: "sim".into(), event };
        EventRecord { envelope: Envelope::new(index, 1, proposal), outcome: Outcome::Applied }
    }

    fn node(host: &str, applied: u64, archive: Vec<EventRecord>) -> NodeSnapshot {
        NodeSnapshot {
            host: host.into(),
            node_id: 1,
            is_leader: false,
            term: 1,
            leader: None,
            applied,
            log_applied: applied,
            archive,
            voters: vec![1],
        }
    }

    #[test]
    fn prefixes_compare_only_up_to_the_common_applied_index() {
        let a = node("a", 2, vec![record(1, "x"), record(2, "y")]);
        let b = node("b", 1, vec![record(1, "x")]);
        assert!(prefixes_agree(&[a.clone(), b]).is_empty());
        let c = node("c", 2, vec![record(1, "x"), record(2, "z")]);
        assert_eq!(prefixes_agree(&[a, c]).len(), 1);
    }

    #[test]
    fn an_acknowledged_event_must_be_where_it_was_acknowledged() {
        let ack = Ack { index: 2, actor: "sim".into(), event: record(2, "y").envelope.event };
        let good = node("a", 2, vec![record(1, "x"), record(2, "y")]);
        let behind = node("b", 1, vec![record(1, "x")]);
        assert!(no_ack_lost(&[good, behind], std::slice::from_ref(&ack)).is_empty());
        let other = node("c", 3, vec![record(1, "x"), record(2, "z")]);
        assert_eq!(no_ack_lost(&[other], &[ack]).len(), 1);
    }

    #[test]
    fn two_leaders_of_one_term_are_a_violation() {
        let mut a = node("a", 0, vec![]);
        a.is_leader = true;
        let mut b = a.clone();
        b.host = "b".into();
        assert_eq!(one_leader_per_term(&[a.clone(), b.clone()]).len(), 1);
        b.term = 2;
        assert!(one_leader_per_term(&[a, b]).is_empty());
    }
}
