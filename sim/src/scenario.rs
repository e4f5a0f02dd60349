//! Hand-written scenarios, beside the random fault schedule. Each acts on one service after
//! formation (the first whose master and failover do not hold the Raft leadership, so that the
//! scenario exercises the monitor and the fence rather than an election), then the run goes on as
//! usual (liveness phase, every checker), and the scenario checks what it expects of the archive at
//! the end. The seed still fixes the network's randomness, the workload and the moments the scenario
//! draws.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The master of a service is cut off from everyone for 10 s: its failover takes over.
    MasterCutOff,
    /// Only the link between master and failover is cut: the others still reach the master, so no
    /// switch happens.
    FailoverCutFromMaster,
    /// The admin instructs a switch through the leader, and the leader crashes a moment later.
    LeaderCrashMidSwitch,
    /// The master crashes, its failover takes over, and the old master restarts from its disk.
    OldMasterReturns,
    /// The admin switches the service to one of its backups.
    ManualSwitch,
    /// Master and failover crash: the backups raise an alarm and wait; the admin instructs one.
    BackupMasterGone,
    /// The Raft leader and one more node crash: the other three must elect a leader (with
    /// openraft's `single-term-leader` they split their votes round after round, see `sim/README.md`).
    LeaderAndOneCrash,
    /// The leader and one follower are cut off from the other three for 10 s. The leader stays
    /// leader of its term and takes proposals (the workload, the monitors) that cannot commit; the
    /// others elect a leader and compact their logs past a snapshot, which the old leader installs
    /// after the heal in place of its uncommitted entries. A switch the admin then asks through the
    /// old leader must still be applied.
    LeaderWritesLost,
    /// The Raft leader is cut off from everyone; a moment later it is asked to confirm its
    /// leadership with a quorum, as a master's fence asks before serving on. It must not: no
    /// AppendEntries it sends after the question can be acknowledged. (The random schedule cannot
    /// tell this check apart: an isolated leader appends its monitor's reports within a few probe
    /// rounds, and a confirmation then waits for them to commit, which also fails.)
    IsolatedLeaderConfirms,
    /// What one follower sends the Raft leader is lost for 10 s; the other way works. The leader's
    /// heartbeats still reach the follower (so it stays a follower), but none is answered: the
    /// leader's monitor must report it unreachable within `REPORT_WAIT`, and reachable again
    /// within `RECOVER_WAIT` of the heal. (A peer that answered a call lately counts as reachable
    /// without a ping: this is the case where only answers, not mere traffic, may count.)
    AnswersLost,
    /// The master is cut off from everyone for 10 s. While cut off, and after its failover has
    /// taken over, its stale view of the log proposes the placement it still believes in (naming
    /// itself master). No part of coyote proposes placements (the state machine derives them), so
    /// this is the regression test of the rule that stands behind that: the proposal waits for a
    /// leader until the heal and must then be refused, since authority moves only by a switch,
    /// which the fences wait for.
    StalePlacement,
    /// The master leaves the cluster (`coyote node leave`): its services are handed over with their
    /// data, then it leaves Raft's membership, removes its containers and stops.
    NodeLeaves,
    /// The master crashes for good and the admin removes it (`coyote node remove`) once the others
    /// report it gone: its services move to their failovers, its roles are refilled, and the
    /// membership shrinks.
    CrashedNodeRemoved,
    /// As `crashed-node-removed`, then the removed server restarts from its disk, which never heard
    /// of its removal: the members refuse its calls, it learns it was removed and stops, and it never
    /// serves.
    RemovedNodeReturns,
    /// As `crashed-node-removed`, then a new server joins in its place and takes the roles it held.
    Replacement,
}

impl Scenario {
    pub const ALL: [Scenario; 15] = [
        Scenario::MasterCutOff,
        Scenario::FailoverCutFromMaster,
        Scenario::LeaderCrashMidSwitch,
        Scenario::OldMasterReturns,
        Scenario::ManualSwitch,
        Scenario::BackupMasterGone,
        Scenario::LeaderAndOneCrash,
        Scenario::LeaderWritesLost,
        Scenario::IsolatedLeaderConfirms,
        Scenario::AnswersLost,
        Scenario::StalePlacement,
        Scenario::NodeLeaves,
        Scenario::CrashedNodeRemoved,
        Scenario::RemovedNodeReturns,
        Scenario::Replacement,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::MasterCutOff => "master-cut-off",
            Scenario::FailoverCutFromMaster => "failover-cut-from-master",
            Scenario::LeaderCrashMidSwitch => "leader-crash-mid-switch",
            Scenario::OldMasterReturns => "old-master-returns",
            Scenario::ManualSwitch => "manual-switch",
            Scenario::BackupMasterGone => "backup-master-gone",
            Scenario::LeaderAndOneCrash => "leader-and-one-crash",
            Scenario::LeaderWritesLost => "leader-writes-lost",
            Scenario::IsolatedLeaderConfirms => "isolated-leader-confirms",
            Scenario::AnswersLost => "answers-lost",
            Scenario::StalePlacement => "stale-placement",
            Scenario::NodeLeaves => "node-leaves",
            Scenario::CrashedNodeRemoved => "crashed-node-removed",
            Scenario::RemovedNodeReturns => "removed-node-returns",
            Scenario::Replacement => "replacement",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }
}
