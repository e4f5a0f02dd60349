//! The checkers: each one a pure function over snapshots of the nodes (and the client oracle), giving
//! the violations it finds as readable sentences. The simulator calls them after every check interval
//! and once more at the end; nothing here touches the simulation.

use std::collections::{BTreeMap, BTreeSet};

use coyote_log::store::EventRecord;
use coyote_state_machine::{Event, Placement, State, SwitchCause};

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
    /// Every archived event up to `applied`, in index order (shared with the driver's copy, which
    /// it extends by the new events at each check).
    pub archive: std::sync::Arc<Vec<EventRecord>>,
    /// Voters in the membership it knows.
    pub voters: Vec<u64>,
    /// Members in its applied state.
    pub members: Vec<u64>,
    /// Every service in its applied state, with its placement.
    pub placements: BTreeMap<String, Option<Placement>>,
    /// The services its fence lets it serve now.
    pub serving: Vec<String>,
    /// The services whose (model) container runs on its host now.
    pub containers: Vec<String>,
}

/// A proposal the cluster acknowledged: `propose` returned `Ok` with this index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub index: u64,
    pub actor: String,
    pub event: Event,
}

/// Committed prefixes agree: any two nodes hold the same archived events up to the smaller of their
/// applied indexes. Each node is compared with the most advanced one only: if every node agrees with
/// it up to its own applied index, any two agree up to the smaller of theirs, and if one does not,
/// that pair disagrees.
pub fn prefixes_agree(nodes: &[NodeSnapshot]) -> Vec<String> {
    let Some(most) = nodes.iter().max_by_key(|n| n.applied) else { return Vec::new() };
    let mut violations = Vec::new();
    for node in nodes.iter().filter(|n| !std::ptr::eq(*n, most)) {
        let upto = node.applied.min(most.applied);
        let prefix = |n| prefix(n, upto);
        if std::sync::Arc::ptr_eq(&node.archive, &most.archive) || prefix(node).eq(prefix(most)) {
            continue;
        }
        let first = prefix(node)
            .zip(prefix(most))
            .find(|(l, r)| l != r)
            .map(|(l, r)| format!("index {} vs {}", l.envelope.index, r.envelope.index))
            .unwrap_or_else(|| format!("{} events vs {}", prefix(node).count(), prefix(most).count()));
        violations.push(format!(
            "prefix: {} and {} disagree below their common applied index {upto} (first difference: {first})",
            node.host, most.host
        ));
    }
    violations
}

/// The archived events of `node` up to `upto`.
fn prefix(node: &NodeSnapshot, upto: u64) -> impl Iterator<Item = &EventRecord> {
    node.archive.iter().take_while(move |r| r.envelope.index <= upto)
}

/// The record at `index` of an archive in index order (found where a dense archive from index 1 has
/// it, else by binary search).
fn record_at(archive: &[EventRecord], index: u64) -> Option<&EventRecord> {
    let dense = index.checked_sub(1).and_then(|i| archive.get(usize::try_from(i).ok()?));
    match dense {
        Some(r) if r.envelope.index == index => Some(r),
        _ => archive.binary_search_by_key(&index, |r| r.envelope.index).ok().map(|i| &archive[i]),
    }
}

/// No acknowledged event is lost: every node that applied up to an acknowledged index archived that
/// very proposal there.
pub fn no_ack_lost(nodes: &[NodeSnapshot], acks: &[Ack]) -> Vec<String> {
    let mut violations = Vec::new();
    for node in nodes {
        for ack in acks.iter().filter(|a| a.index <= node.applied) {
            match record_at(&node.archive, ack.index) {
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

/// Election safety as openraft 0.9 defines it: at most one leader per leader id, (term, node id),
/// among the nodes seen at one instant. Openraft lets two candidates win the same term (the one with
/// the higher node id supersedes the other, whose entries can then no longer commit), so two leaders
/// of one term are allowed; two hosts leading with the same leader id are not (they would be one node
/// id given to two servers). Whether what leaders wrote is safe is checked by [`prefixes_agree`] and
/// [`no_ack_lost`].
pub fn one_leader_per_term(nodes: &[NodeSnapshot]) -> Vec<String> {
    let mut leaders: BTreeMap<(u64, u64), Vec<&str>> = BTreeMap::new();
    for node in nodes.iter().filter(|n| n.is_leader) {
        leaders.entry((node.term, node.node_id)).or_default().push(&node.host);
    }
    leaders
        .into_iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|((term, id), hosts)| {
            format!("election safety: {} all lead term {term} as node {id}", hosts.join(", "))
        })
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

/// At most one node serves a service at any instant: `serving` maps each host to the services its
/// fence lets it serve at this instant.
pub fn at_most_one_serving(serving: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut by_service: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (host, services) in serving {
        for s in services {
            by_service.entry(s).or_default().push(host);
        }
    }
    by_service
        .into_iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|(s, hosts)| format!("serving: {} all serve {s} at once", hosts.join(", ")))
        .collect()
}

/// Roles are well formed on every node: each placement names distinct members, and a node serves a
/// service only if its own state names it master.
pub fn roles_well_formed(nodes: &[NodeSnapshot]) -> Vec<String> {
    let mut violations = Vec::new();
    for node in nodes {
        let members: BTreeSet<u64> = node.members.iter().copied().collect();
        for (service, placement) in &node.placements {
            let Some(p) = placement else { continue };
            let named: Vec<u64> = p.nodes().collect();
            let distinct: BTreeSet<u64> = named.iter().copied().collect();
            if distinct.len() != named.len() {
                violations.push(format!(
                    "roles: {} places {service} on {named:?}: a node holds two roles",
                    node.host
                ));
            }
            if let Some(n) = named.iter().find(|n| !members.contains(n)) {
                violations
                    .push(format!("roles: {} gives node {n}, not a member, a role for {service}", node.host));
            }
        }
        for service in &node.serving {
            let master = node.placements.get(service).and_then(|p| p.as_ref()).map(|p| p.master);
            if master != Some(node.node_id) {
                violations.push(format!(
                    "roles: {} serves {service}, whose master in its own state is {master:?}",
                    node.host
                ));
            }
        }
    }
    violations
}

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
/// are new since the last one (replaying the whole archive every check cost the simulator about
/// 2% of its time on a long run).
#[derive(Default)]
pub struct Replay {
    state: State,
    /// The last event replayed, to notice an archive that disagrees with what was replayed.
    last: Option<EventRecord>,
    /// Who asked for each handover, by service.
    asked_by: BTreeMap<String, String>,
    found: Vec<Switch>,
    moves: Vec<Move>,
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

/// Liveness of the services: every service is placed, its master (by the leader's state) serves it
/// and runs its container, and no other node serves it or runs its container.
pub fn services_converged(nodes: &[NodeSnapshot], services: usize) -> Result<(), String> {
    let leader = nodes.iter().find(|n| n.is_leader).ok_or("no leader")?;
    if leader.placements.len() != services {
        return Err(format!("the leader knows {} services, not {services}", leader.placements.len()));
    }
    for (service, placement) in &leader.placements {
        let Some(p) = placement else { return Err(format!("{service} is not placed")) };
        for n in nodes {
            let master = n.node_id == p.master;
            let serves = n.serving.contains(service);
            let runs = n.containers.contains(service);
            if master && !serves {
                return Err(format!("{service}: its master {} does not serve it", n.host));
            }
            if master && !runs {
                return Err(format!("{service}: its master {} does not run its container", n.host));
            }
            if !master && (serves || runs) {
                return Err(format!("{service}: {} serves it or runs its container, not its master", n.host));
            }
        }
        if !nodes.iter().any(|n| n.node_id == p.master) {
            return Err(format!("{service}: its master node {} is not running", p.master));
        }
    }
    Ok(())
}

/// The activator's checker (`Driver::check_splices` finds the case): a connection handed to an
/// on-demand container on a node that was not serving the service.
pub fn spliced_while_not_serving(host: &str, service: &str, at: std::time::Duration) -> String {
    format!(
        "activator: {host} spliced a connection of {service} to its container at {} ms while not serving it",
        at.as_millis()
    )
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
            archive: archive.into(),
            voters: vec![1],
            members: vec![1],
            placements: BTreeMap::new(),
            serving: Vec::new(),
            containers: Vec::new(),
        }
    }

    #[test]
    fn prefixes_compare_only_up_to_the_common_applied_index() {
        let a = node("a", 2, vec![record(1, "x"), record(2, "y")]);
        let b = node("b", 1, vec![record(1, "x")]);
        assert!(prefixes_agree(&[a.clone(), b]).is_empty());
        let c = node("c", 2, vec![record(1, "x"), record(2, "z")]);
        assert_eq!(prefixes_agree(&[a.clone(), c]).len(), 1);
        // Two nodes behind the most advanced: one agrees with it, the other does not, wherever the
        // most advanced one stands in the list.
        let ahead = node("ahead", 3, vec![record(1, "x"), record(2, "y"), record(3, "w")]);
        let wrong = node("wrong", 2, vec![record(1, "x"), record(2, "q")]);
        for nodes in
            [vec![ahead.clone(), a.clone(), wrong.clone()], vec![wrong.clone(), a.clone(), ahead.clone()]]
        {
            let found = prefixes_agree(&nodes);
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(found[0].contains("wrong and ahead") && found[0].contains("index 2 vs 2"), "{found:?}");
        }
        // An archive shorter than its applied index says so.
        let short = node("short", 2, vec![record(1, "x")]);
        let found = prefixes_agree(&[ahead, short]);
        assert!(found.len() == 1 && found[0].contains("1 events vs 2"), "{found:?}");
    }

    #[test]
    fn a_record_is_found_by_its_index_in_dense_and_sparse_archives() {
        let dense: Vec<EventRecord> = (1..=3).map(|i| record(i, "k")).collect();
        assert_eq!(record_at(&dense, 2).map(|r| r.envelope.index), Some(2));
        assert!(record_at(&dense, 0).is_none() && record_at(&dense, 4).is_none());
        let sparse = vec![record(2, "k"), record(5, "k"), record(9, "k")];
        assert_eq!(record_at(&sparse, 5).map(|r| r.envelope.index), Some(5));
        assert_eq!(record_at(&sparse, 9).map(|r| r.envelope.index), Some(9));
        assert!(record_at(&sparse, 3).is_none());
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
    fn two_leaders_of_one_term_are_a_violation() {
        let mut a = node("a", 0, vec![]);
        a.is_leader = true;
        let mut b = a.clone();
        b.host = "b".into();
        assert_eq!(one_leader_per_term(&[a.clone(), b.clone()]).len(), 1, "one leader id, two hosts");
        b.node_id = 2;
        assert!(one_leader_per_term(&[a.clone(), b.clone()]).is_empty(), "openraft allows this");
        b.term = 2;
        assert!(one_leader_per_term(&[a, b]).is_empty());
    }

    #[test]
    fn two_nodes_serving_one_service_is_a_violation() {
        let mut serving = BTreeMap::new();
        serving.insert("n1".to_string(), vec!["a".to_string()]);
        serving.insert("n2".to_string(), vec!["b".to_string()]);
        assert!(at_most_one_serving(&serving).is_empty());
        serving.insert("n3".to_string(), vec!["a".to_string()]);
        assert_eq!(at_most_one_serving(&serving).len(), 1);
    }

    fn switch(cause: SwitchCause, to: u64, actor: &str) -> Switch {
        Switch {
            index: 9,
            at_ms: 10_000,
            actor: actor.into(),
            service: "a".into(),
            cause,
            to,
            before: Placement { master: 1, failover: Some(2), backups: vec![3, 4, 5] },
            members: 5,
            handover: None,
        }
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
