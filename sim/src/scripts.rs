//! How each [`Scenario`] plays: the faults and commands it injects, what it waits for, and what it
//! expects of the archive at the end.

use std::time::Duration;

use coyote_state_machine::{Event, Outcome, Subject, SwitchCause, LEASE_MS};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::checks::Switch;
use crate::driver::Driver;
use crate::faults::Fault;
use crate::scenario::Scenario;
use crate::world::Admin;

/// How often a scenario that waits for something looks again.
const STEP: Duration = Duration::from_millis(100);

/// How long the backups have to raise their alarm when master and failover are gone.
const ALARM_WAIT: Duration = Duration::from_secs(30);

/// How long the leader's monitor has to report a peer whose answers are lost: three failed probe
/// rounds of 200 ms (the first failing from when the cut began), the commit, and room for a probe
/// that was under way when the cut began.
const REPORT_WAIT: Duration = Duration::from_millis(1_500);

/// How long it has to report the peer reachable again after the heal: a dial begun during the cut
/// can wait out its connect timeout (3 s) before the next one succeeds, then two good probes.
const RECOVER_WAIT: Duration = Duration::from_millis(4_000);

/// How many times `observer` has reported `subject` as `reachable`, in the applied state of the most
/// advanced node.
fn reported(d: &Driver, observer: u64, subject: u64, reachable: bool) -> usize {
    d.snapshots().into_iter().max_by_key(|n| n.applied).map_or(0, |n| {
        n.archive
            .iter()
            .filter(|record| {
                matches!(&record.envelope.event, Event::ReachabilityChanged { observer: o, subject: Subject::Node(s), reachable: said }
                    if *o == observer && *s == subject && *said == reachable)
            })
            .count()
    })
}

/// Runs in steps of `every` until `done` holds, for at most `within`; a violation (`missing`, what
/// did not happen) if it does not. The time it took, or None once the run cannot go on.
fn wait_until(
    d: &mut Driver,
    (within, every): (Duration, Duration),
    missing: impl FnOnce() -> String,
    mut done: impl FnMut(&Driver) -> bool,
) -> Option<Duration> {
    let since = d.sim.elapsed();
    while !done(d) {
        if d.sim.elapsed() >= since + within {
            d.violation(missing());
            return None;
        }
        if !d.run_for(every) {
            return None;
        }
    }
    Some(d.sim.elapsed() - since)
}

/// Runs until `observer` has reported `subject` as `reachable` once more than `before` times, for
/// at most `within`; a violation if it does not.
fn await_report(
    d: &mut Driver,
    (observer, subject, reachable): (u64, u64, bool),
    before: usize,
    within: Duration,
    scenario: Scenario,
) -> bool {
    let state = if reachable { "reachable" } else { "unreachable" };
    let missing = || {
        format!(
            "scenario {}: node {observer} did not report node {subject} {state} within {within:?}",
            scenario.name()
        )
    };
    let every = Duration::from_millis(50);
    let Some(took) =
        wait_until(d, (within, every), missing, |d| reported(d, observer, subject, reachable) > before)
    else {
        return false;
    };
    d.trace(format!("node {observer} reported node {subject} {state} after {took:?}"));
    true
}

/// Whether a backup raised the alarm that the master of the scenario's service is lost.
fn alarmed(d: &Driver) -> bool {
    let prefix = format!("master-lost/{}/", d.focus);
    d.snapshots().into_iter().max_by_key(|n| n.applied).is_some_and(|n| {
        n.archive
            .iter()
            .any(|r| matches!(&r.envelope.event, Event::AlarmRaised { key, .. } if key.starts_with(&prefix)))
    })
}

/// Whether the most advanced node's archive holds an applied event of `kind` (a node's departure).
fn departed_in_archive(d: &Driver, kind: &str) -> bool {
    d.snapshots().into_iter().max_by_key(|n| n.applied).is_some_and(|n| {
        n.archive.iter().any(|r| r.envelope.event.kind() == kind && r.outcome == Outcome::Applied)
    })
}

impl Scenario {
    /// Plays the scenario; false once the run cannot go on.
    pub(crate) fn run(self, d: &mut Driver) -> bool {
        let leader = d.leader_id();
        let services: Vec<String> = (1..=d.params.services).map(|i| format!("svc{i}")).collect();
        let focus = services
            .iter()
            .find(|s| d.placement(s).is_some_and(|p| Some(p.master) != leader && p.failover != leader))
            .or(services.first())
            .cloned()
            .unwrap_or_default();
        d.focus = focus.clone();
        let service = focus.as_str();
        let Some(p) = d.placement(service) else {
            d.violation(format!("scenario {}: {service} is not placed", self.name()));
            return false;
        };
        let (Some(master), Some(failover)) = (d.host_of(p.master), p.failover.and_then(|f| d.host_of(f)))
        else {
            d.violation(format!("scenario {}: {service} has no master or failover host", self.name()));
            return false;
        };
        d.trace(format!("scenario {}: {service} master {master}, failover {failover}", self.name()));
        d.focus_master = master.clone();
        let secs = Duration::from_secs;
        match self {
            Scenario::MasterCutOff => {
                let (side, rest) = d.isolate(&master);
                let fault = d.start(Fault::Partition { side, rest });
                if !d.run_for(secs(10)) {
                    return false;
                }
                d.end(fault);
            }
            Scenario::FailoverCutFromMaster => {
                let fault = d.start(Fault::Partition { side: vec![failover], rest: vec![master] });
                if !d.run_for(secs(10)) {
                    return false;
                }
                d.end(fault);
            }
            Scenario::LeaderCrashMidSwitch => {
                let Some(leader) = d.leader_host() else {
                    d.violation("scenario: no leader".into());
                    return false;
                };
                let to = p.backups.first().copied().or(p.failover).unwrap_or(p.master);
                d.admin(&leader, Admin::Switch { service: service.into(), to });
                let wait = Duration::from_millis(d.rng.gen_range(10..400));
                if !d.run_for(wait) {
                    return false;
                }
                let fault = d.start(Fault::Crash { host: leader });
                if !d.run_for(secs(4)) {
                    return false;
                }
                d.end(fault);
            }
            Scenario::OldMasterReturns => {
                let fault = d.start(Fault::Crash { host: master });
                if !d.run_for(secs(8)) {
                    return false;
                }
                d.end(fault);
                if !d.run_for(secs(5)) {
                    return false;
                }
            }
            Scenario::ManualSwitch => {
                let Some(to) = p.backups.choose(&mut d.rng).copied() else {
                    d.violation("scenario: no backup".into());
                    return false;
                };
                let hosts = d.running_hosts();
                let via = hosts.choose(&mut d.rng).cloned().unwrap_or(master);
                d.admin(&via, Admin::Switch { service: service.into(), to });
                if !d.run_for(secs(5)) {
                    return false;
                }
            }
            Scenario::LeaderAndOneCrash => {
                let Some(leader) = d.leader_host() else {
                    d.violation("scenario: no leader".into());
                    return false;
                };
                let other = if leader == master { failover } else { master };
                let first = d.start(Fault::Crash { host: leader });
                let second = d.start(Fault::Crash { host: other });
                let missing = || {
                    format!(
                        "scenario {}: three of five nodes run, and none was elected leader within 10 s",
                        self.name()
                    )
                };
                let Some(took) = wait_until(d, (secs(10), STEP), missing, |d| d.leader_host().is_some())
                else {
                    return false;
                };
                d.trace(format!("a leader was elected after {took:?}"));
                d.end(first);
                d.end(second);
            }
            Scenario::LeaderWritesLost => {
                let Some(leader) = d.leader_host() else {
                    d.violation("scenario: no leader".into());
                    return false;
                };
                // Its companion holds no role that would move the service: not its master or failover.
                let companion = d
                    .names
                    .iter()
                    .find(|h| **h != leader && **h != master && **h != failover)
                    .cloned()
                    .unwrap_or_default();
                let side = vec![leader.clone(), companion];
                let rest: Vec<String> = d.names.iter().filter(|h| !side.contains(h)).cloned().collect();
                let fault = d.start(Fault::Partition { side, rest });
                if !d.run_for(secs(10)) {
                    return false;
                }
                d.end(fault);
                if !d.run_for(secs(2)) {
                    return false;
                }
                let Some(to) = p.backups.first().copied() else {
                    d.violation("scenario: no backup".into());
                    return false;
                };
                d.admin(&leader, Admin::Switch { service: service.into(), to });
                if !d.run_for(secs(8)) {
                    return false;
                }
            }
            Scenario::IsolatedLeaderConfirms => {
                let Some(leader) = d.leader_host() else {
                    d.violation("scenario: no leader".into());
                    return false;
                };
                let (side, rest) = d.isolate(&leader);
                let fault = d.start(Fault::Partition { side, rest });
                if !d.run_for(Duration::from_millis(10)) {
                    return false;
                }
                let timeout = Duration::from_millis(LEASE_MS / 2);
                let Some(answer) = d.confirm_on(&leader, timeout) else {
                    d.violation(format!("scenario {}: the leader {leader} is not running", self.name()));
                    return false;
                };
                if !d.run_for(secs(1)) {
                    return false;
                }
                let answer = answer.lock().expect("answer lock").take();
                match answer {
                    Some(Err(reason)) => {
                        d.trace(format!("the isolated leader {leader} could not confirm its leadership: {reason}"))
                    }
                    Some(Ok(index)) => d.violation(format!(
                        "scenario {}: the leader {leader}, cut off from every other node, confirmed its \
                         leadership with a quorum (read index {index})",
                        self.name()
                    )),
                    None => d.violation(format!(
                        "scenario {}: the isolated leader {leader} did not answer within 1 s, its timeout being {timeout:?}",
                        self.name()
                    )),
                }
                if !d.run_for(secs(9)) {
                    return false;
                }
                d.end(fault);
            }
            Scenario::AnswersLost => {
                let (Some(leader), Some(leader_id)) = (d.leader_host(), d.leader_id()) else {
                    d.violation("scenario: no leader".into());
                    return false;
                };
                // A follower that holds no role of the service: its lapsing fence moves nothing.
                let Some((follower_id, follower)) = d
                    .names
                    .iter()
                    .filter(|h| **h != leader && **h != master && **h != failover)
                    .find_map(|h| d.id_of(h).map(|id| (id, h.clone())))
                else {
                    d.violation("scenario: no follower besides master and failover".into());
                    return false;
                };
                let down = reported(d, leader_id, follower_id, false);
                let up = reported(d, leader_id, follower_id, true);
                let fault = d.start(Fault::OneWay { from: vec![follower], to: vec![leader] });
                if !await_report(d, (leader_id, follower_id, false), down, REPORT_WAIT, self) {
                    return false;
                }
                if !d.run_for(secs(10).saturating_sub(REPORT_WAIT)) {
                    return false;
                }
                d.end(fault);
                if !await_report(d, (leader_id, follower_id, true), up, RECOVER_WAIT, self) {
                    return false;
                }
            }
            Scenario::StalePlacement => {
                let (side, rest) = d.isolate(&master);
                let fault = d.start(Fault::Partition { side, rest });
                let since = d.sim.elapsed();
                let missing = || {
                    format!(
                        "scenario {}: no switch of {service} within 8 s of cutting its master off",
                        self.name()
                    )
                };
                let switched = |d: &Driver| d.switches().iter().any(|s| s.service == service);
                if wait_until(d, (secs(8), STEP), missing, switched).is_none() {
                    return false;
                }
                let Some(old_master) = d.id_of(&master) else {
                    d.violation(format!("scenario {}: {master} has no node id", self.name()));
                    return false;
                };
                let event = Event::PlacementSet { service: service.into(), placement: p.clone() };
                let actor = format!("monitor@node:{old_master}");
                let Some(answer) = d.propose_on(&master, event, actor) else {
                    d.violation(format!("scenario {}: {master} is not running", self.name()));
                    return false;
                };
                if !d.run_for(secs(10).saturating_sub(d.sim.elapsed() - since)) {
                    return false;
                }
                d.end(fault);
                // The proposal waits for a leader up to `PROPOSE_TIMEOUT` (15 s) from when it was made.
                let missing =
                    || format!("scenario {}: the stale placement got no answer in 16 s", self.name());
                let answered = |_: &Driver| answer.lock().expect("answer lock").is_some();
                if wait_until(d, (secs(16), STEP), missing, answered).is_none() {
                    return false;
                }
                let answer = answer.lock().expect("answer lock").take();
                let refused = |reason: &str| reason.contains("only an authority switch");
                match answer {
                    Some(Ok(Outcome::Rejected { reason })) if refused(&reason) => {
                        d.trace(format!("the stale placement was written and refused: {reason}"))
                    }
                    Some(Err(reason)) if refused(&reason) => {
                        d.trace(format!("the stale placement was refused before it was written: {reason}"))
                    }
                    other => d.violation(format!(
                        "scenario {}: the stale placement naming node {old_master} master was not refused \
                         for moving authority: {other:?}",
                        self.name()
                    )),
                }
                if !d.run_for(secs(5)) {
                    return false;
                }
            }
            Scenario::NodeLeaves => {
                d.admin(&master, Admin::Leave);
                let missing =
                    || format!("scenario {}: {master} did not leave and stop within 60 s", self.name());
                let stopped = |d: &Driver| d.departed_host(&master).is_some();
                let Some(took) = wait_until(d, (secs(60), STEP), missing, stopped) else {
                    return false;
                };
                d.trace(format!("{master} left and stopped after {took:?}"));
                d.expected_nodes -= 1;
                if !d.run_for(secs(3)) {
                    return false;
                }
            }
            Scenario::CrashedNodeRemoved | Scenario::RemovedNodeReturns | Scenario::Replacement => {
                let Some(victim) = d.id_of(&master) else {
                    d.violation(format!("scenario {}: {master} has no node id", self.name()));
                    return false;
                };
                // The crash is never healed: the server is gone for good.
                let crash = d.start(Fault::Crash { host: master.clone() });
                let via = d.names.iter().find(|h| **h != master).cloned().unwrap_or_default();
                d.admin(&via, Admin::Remove { node: victim, force: false });
                let missing =
                    || format!("scenario {}: node {victim} was not removed within 60 s", self.name());
                let removed = |d: &Driver| {
                    let nodes = d.light_snapshots();
                    !nodes.is_empty()
                        && nodes.iter().all(|n| n.departed.contains(&victim) && !n.voters.contains(&victim))
                };
                let Some(took) = wait_until(d, (secs(60), STEP), missing, removed) else {
                    return false;
                };
                d.trace(format!("node {victim} removed and out of the membership after {took:?}"));
                d.expected_nodes -= 1;
                if !d.run_for(secs(3)) {
                    return false;
                }
                match self {
                    Scenario::RemovedNodeReturns => {
                        d.end(crash);
                        let missing = || {
                            format!("scenario {}: the removed {master} did not stop within 30 s", self.name())
                        };
                        let refused = |d: &Driver| d.departed_host(&master).is_some();
                        let Some(took) = wait_until(d, (secs(30), STEP), missing, refused) else {
                            return false;
                        };
                        d.trace(format!("the removed {master} learned it and stopped after {took:?}"));
                    }
                    Scenario::Replacement => {
                        let name = format!("n{}", d.names.len() + 1);
                        let index = d.names.len();
                        crate::run::add_host(d, index, &name);
                        d.names.push(name.clone());
                        d.expected_nodes += 1;
                        let missing =
                            || format!("scenario {}: {name} did not become a voter within 60 s", self.name());
                        let voter = |d: &Driver| {
                            let id = d.id_of(&name);
                            id.is_some()
                                && d.light_snapshots().iter().all(|n| n.voters.contains(&id.unwrap_or(0)))
                        };
                        let Some(took) = wait_until(d, (secs(60), STEP), missing, voter) else {
                            return false;
                        };
                        d.trace(format!("{name} joined and became a voter after {took:?}"));
                    }
                    _ => {}
                }
                if !d.run_for(secs(3)) {
                    return false;
                }
            }
            Scenario::BackupMasterGone => {
                let crash_master = d.start(Fault::Crash { host: master });
                let crash_failover = d.start(Fault::Crash { host: failover });
                // The backups raise their alarm and wait (up to ALARM_WAIT for it).
                let missing = || {
                    format!(
                        "scenario {}: no backup raised the master-lost alarm within {ALARM_WAIT:?}",
                        self.name()
                    )
                };
                let Some(took) = wait_until(d, (ALARM_WAIT, STEP), missing, alarmed) else {
                    return false;
                };
                d.trace(format!("a backup raised the master-lost alarm after {took:?}"));
                if !d.run_for(secs(3)) {
                    return false;
                }
                let Some(to) = p.backups.first().copied() else {
                    d.violation("scenario: no backup".into());
                    return false;
                };
                let via = d.host_of(to).unwrap_or_default();
                d.admin(&via, Admin::Switch { service: service.into(), to });
                if !d.run_for(secs(5)) {
                    return false;
                }
                d.end(crash_master);
                d.end(crash_failover);
            }
        }
        true
    }

    /// What the scenario expects of the run, beyond the checkers, as violations.
    pub(crate) fn expect(self, d: &Driver) -> Vec<String> {
        let service = d.focus.as_str();
        let switches: Vec<&Switch> = d.switches().iter().filter(|s| s.service == service).collect();
        let failovers = switches.iter().filter(|s| s.cause == SwitchCause::Failover).count();
        let instructed: Vec<&&Switch> = switches.iter().filter(|s| s.cause.instructed()).collect();
        let mut problems = Vec::new();
        let mut expect = |ok: bool, what: &str| {
            if !ok {
                problems.push(format!(
                    "scenario {}: expected {what}; switches of {service}: {switches:?}",
                    self.name()
                ));
            }
        };
        match self {
            Scenario::MasterCutOff | Scenario::OldMasterReturns | Scenario::StalePlacement => {
                expect(failovers >= 1, "a switch by failover");
                expect(
                    switches.first().is_some_and(|s| s.before.failover == Some(s.to)),
                    "the first switch to go to the failover",
                );
            }
            Scenario::FailoverCutFromMaster => expect(switches.is_empty(), "no switch"),
            Scenario::LeaderAndOneCrash | Scenario::IsolatedLeaderConfirms => {}
            Scenario::AnswersLost => expect(switches.is_empty(), "no switch"),
            Scenario::LeaderCrashMidSwitch => {
                expect(failovers == 0, "no switch by failover");
                expect(instructed.len() <= 1, "at most the one instructed switch");
            }
            Scenario::ManualSwitch | Scenario::LeaderWritesLost => {
                expect(failovers == 0, "no switch by failover");
                expect(
                    instructed.len() == 1 && instructed[0].before.backups.contains(&instructed[0].to),
                    "one instructed switch, to a backup",
                );
            }
            Scenario::NodeLeaves => {
                expect(failovers == 0, "no switch by failover");
                expect(
                    switches.first().is_some_and(|s| {
                        matches!(s.cause, SwitchCause::Handover | SwitchCause::HandoverOverdue)
                            && s.before.failover == Some(s.to)
                    }),
                    "a graceful handover to the failover",
                );
                expect(departed_in_archive(d, "node_left"), "the leave in the log");
                expect(d.departed_host(&d.focus_master).is_some(), "the node that left to stop");
            }
            Scenario::CrashedNodeRemoved | Scenario::RemovedNodeReturns | Scenario::Replacement => {
                expect(failovers >= 1, "a switch by failover before the removal");
                expect(departed_in_archive(d, "node_removed"), "the removal in the log");
                if self == Scenario::RemovedNodeReturns {
                    expect(d.departed_host(&d.focus_master).is_some(), "the removed node to stop");
                }
                if self == Scenario::Replacement {
                    let newest = d.names.last().and_then(|h| d.id_of(h));
                    let placed = d.placement(service).is_some_and(|p| {
                        p.failover.is_some() && newest.is_some_and(|n| p.nodes().any(|m| m == n))
                    });
                    expect(placed, "the new server to hold a role of the service, and a failover");
                    // Its role brings the service's snapshots to it: the holders are back to the count.
                    let stored = d.snapshots().into_iter().max_by_key(|n| n.applied).is_some_and(|n| {
                        n.archive.iter().any(|r| {
                            r.outcome == Outcome::Applied
                                && matches!(&r.envelope.event, Event::SnapshotStored { service: s, node, .. }
                                    if s == service && Some(*node) == newest)
                        })
                    });
                    expect(stored, "the new server to store a snapshot of the service");
                }
            }
            Scenario::BackupMasterGone => {
                expect(failovers == 0, "no switch by failover (the failover is down too)");
                expect(instructed.len() == 1, "the instructed switch to the backup");
                expect(alarmed(d), "a backup to raise the master-lost alarm");
            }
        }
        problems
    }
}
