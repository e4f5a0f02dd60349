//! The monitor, the fence, and failover.
//!
//! # Monitor
//! Every [`MonitorConfig::probe_interval`] each node probes its peers (a ping over the cluster's
//! mutual TLS, skipped for a peer that answered one of this node's calls within
//! `coyote_log::cluster::ANSWERED_FRESH`: the leader's heartbeats to its followers count) and, for
//! each service where it is failover or backup, the service at its master (a TCP connection to the
//! service's first published port at the master's address, or an HTTP request there if the spec
//! names an HTTP check path; for an on-demand service, a question to the master's activator over the
//! cluster's mutual TLS, whether it holds the service's listeners, since a connection would start
//! the container and keep it from stopping when idle) and its DNS zone (an SOA query to the nameservers the
//! spec names, if any), through a [`ServiceProbe`]: [`NetProbe`] in production, the simulator's
//! network in `sim/`. A service counts as unreachable only while its check fails AND, if it has a
//! zone, none of the zone's nameservers answers: a zone still served means its master still lives.
//! A subject changes state only after [`MonitorConfig::fail_after`] failed probes in a row, or
//! [`MonitorConfig::recover_after`] good ones; the node then proposes `ReachabilityChanged`, dated
//! from the end of the first probe of the run (the subject has been unreachable, or reachable, since
//! then at least). So the log sees transitions, never probes. The probes a failover decides by (the
//! failover's probe of its service, every member's ping of a master) run in every round; a subject
//! no failover waits on (a peer that is master of nothing, a service this node is only a backup
//! of) is probed in only one round of [`MonitorConfig::steady_every`] (4: every 800 ms) while the
//! log reports it reachable and its probes succeed, and in every round from its first failed probe.
//!
//! The failover of a service proposes `AuthoritySwitched { cause: Failover }` as soon as its own view
//! of the log says the failover rule holds (see the state machine's crate docs: it has seen the
//! service unreachable long enough, and a majority of members report the master unreachable). It
//! looks after every round of probes, whenever the applied state changes, and the moment its wait of
//! `FAILOVER_AFTER_MS` ends. The state machine checks the same rule again when it applies the switch,
//! on every replica. A backup never proposes a switch by itself: when its master is lost it raises one
//! alarm and waits for an instruction. No monitor proposes placements: the state machine refills an
//! empty failover slot itself when it applies the event that emptied it.
//!
//! An instruction is a graceful handover (`HandoverRequested`): the old master's reconciler dumps
//! and stops the service and then proposes the switch (see [`crate::reconciler`]). The target's
//! monitor proposes it instead when the old master has not done so within `HANDOVER_WAIT_MS`, or at
//! once when a majority reports the old master unreachable (it cannot hand anything over then).
//!
//! What a master may serve, and why at most one serves at a time, is the fence's
//! ([`crate::fence`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_log::{LogNode, ProposeError};
use coyote_state_machine::{
    Event, Proposal, Role, State, Subject, SwitchCause, ZoneCheck, FAILOVER_AFTER_MS,
};

pub use crate::probe::{Check, NetProbe, ServiceProbe};
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct MonitorConfig {
    /// How often a round of probes starts (a round lasts up to the probe timeout; the next starts
    /// when it has ended).
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Failed probes in a row before a subject is reported unreachable.
    pub fail_after: u32,
    /// Good probes in a row before it is reported reachable again.
    pub recover_after: u32,
    /// A subject that no failover waits on (a peer that is master of no service, a service this
    /// node is only a backup of) and that is *steady* (the log reports it reachable and every probe
    /// of it since has succeeded) is probed in only one round of this many; every other subject in
    /// every round. Such a subject's first failed probe comes up to `steady_every - 1` intervals
    /// later; from then on it is probed every round. The probes a failover decides by (its own
    /// probe of its service, every member's ping of the master) are never spaced out, so failover
    /// times do not change. 1 probes every subject in every round.
    pub steady_every: u32,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(250),
            fail_after: 3,
            recover_after: 2,
            steady_every: 4,
        }
    }
}

/// Consecutive probe results of one subject, and since when they have run.
#[derive(Clone, Copy, Debug, Default)]
struct Streak {
    fails: u32,
    oks: u32,
    /// The clock reading (ms) of the first probe of the current run.
    since_ms: u64,
    /// The round in which the subject was last probed.
    probed_in: u64,
}

impl Streak {
    /// Whether a subject with this streak (`None`: never probed) is probed in round `round`: every
    /// round if a failover waits on it (`critical`) or it is not steady (reported reachable, and no
    /// probe failed since), else only once `steady_every` rounds have begun since its last probe.
    fn due(
        streak: Option<&Streak>,
        critical: bool,
        reported_reachable: bool,
        round: u64,
        config: &MonitorConfig,
    ) -> bool {
        match streak {
            Some(s) if !critical && reported_reachable && s.fails == 0 && s.oks > 0 => {
                round >= s.probed_in.saturating_add(u64::from(config.steady_every.max(1)))
            }
            _ => true,
        }
    }

    /// Records a probe ended at `now_ms`; returns the reachability to report, and since when it has
    /// held (the end of the first probe of the run), if the streak says it changed.
    fn record(
        &mut self,
        ok: bool,
        reported_reachable: bool,
        now_ms: u64,
        config: &MonitorConfig,
    ) -> Option<(bool, u64)> {
        let (run, other) =
            if ok { (&mut self.oks, &mut self.fails) } else { (&mut self.fails, &mut self.oks) };
        if *run == 0 {
            self.since_ms = now_ms;
        }
        *run += 1;
        *other = 0;
        match reported_reachable {
            true if self.fails >= config.fail_after => Some((false, self.since_ms)),
            false if self.oks >= config.recover_after => Some((true, self.since_ms)),
            _ => None,
        }
    }
}

pub struct Monitor {
    node: LogNode,
    config: MonitorConfig,
    streaks: HashMap<Subject, Streak>,
    /// Rounds begun so far.
    round: u64,
    /// Every subject of the last round, probed in it or not.
    subjects: BTreeSet<Subject>,
    probe: Arc<dyn ServiceProbe>,
    /// Proposals under way, by event, with when they were sent (see [`Monitor::propose`]).
    inflight: Arc<Mutex<HashMap<String, Instant>>>,
}

/// The subjects of one round of probes, with the result of each.
type Round = Vec<(Subject, bool)>;

/// A proposal of the monitor's that has not been answered after this long no longer keeps the same
/// proposal from being sent again: a forward to a leader that just died can hang for seconds.
const PROPOSE_AGAIN_AFTER: Duration = Duration::from_millis(400);

/// Whether the node at `addr` holds on-demand `service`'s listeners, asked over the cluster's mutual
/// TLS within `timeout`: `Some(false)` when it does not or does not answer, `None` when it does not
/// know the question (a build without it), for the caller to probe the service itself.
async fn listening_at(node: &LogNode, addr: &str, service: &str, timeout: Duration) -> Option<bool> {
    let Ok(channel) = node.peer(addr) else { return Some(false) };
    let mut client = coyote_log::pb::activation_client::ActivationClient::new(channel);
    let mut request = tonic::Request::new(coyote_log::pb::ListeningRequest { service: service.to_string() });
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.listening(request)).await {
        Ok(Ok(reply)) => Some(reply.into_inner().listening),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => None,
        _ => Some(false),
    }
}

/// The service check and the zone check of one service (either may be absent).
pub type Checks = (Option<Check>, Option<ZoneCheck>);

/// What the monitor checks of `service` at `master`: the service's first published port at the
/// master's host, over TCP or HTTP as its spec says, and its zone if the spec names one.
pub fn service_checks(state: &State, service: &str, master: u64) -> Checks {
    let Some(svc) = state.services.get(service) else { return (None, None) };
    let zone = svc.spec.zone.clone();
    let check = (|| {
        let port = svc.spec.ports.first()?.host;
        let addr = &state.members.get(&master)?.addr;
        let host = addr.rsplit_once(':').map(|(h, _)| h)?;
        let addr = format!("{host}:{port}");
        Some(match &svc.spec.http_check {
            None => Check::Tcp { addr },
            Some(path) => {
                // The service's own name, as its clients would ask for it; else the master's host.
                let host = svc.spec.domains.first().cloned().unwrap_or_else(|| host.to_string());
                Check::Http { addr, host, path: path.clone() }
            }
        })
    })();
    (check, zone)
}

impl Monitor {
    pub fn new(node: LogNode, config: MonitorConfig) -> Self {
        Monitor {
            node,
            config,
            streaks: HashMap::new(),
            round: 0,
            subjects: BTreeSet::new(),
            probe: Arc::new(NetProbe),
            inflight: Arc::default(),
        }
    }

    /// Probes services with `probe` instead of [`NetProbe`] (the simulator's network).
    pub fn with_probe(mut self, probe: Arc<dyn ServiceProbe>) -> Self {
        self.probe = probe;
        self
    }

    /// Probes every [`MonitorConfig::probe_interval`] (a round lasts up to the probe timeout; the
    /// next starts when it has ended) and acts on roles after each round, and also whenever the
    /// applied state changes and the moment a failover's wait ends: a report that completes the
    /// failover rule is acted on when it is applied, not at the end of the next round.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut applied = Some(self.node.store().subscribe());
        let mut round: Option<futures::future::BoxFuture<'static, Round>> = None;
        let mut due: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                results = async { round.as_mut().expect("guarded").await }, if round.is_some() => {
                    round = None;
                    self.record(results);
                }
                changed = async { applied.as_mut().expect("guarded").changed().await }, if applied.is_some() => {
                    if changed.is_err() {
                        applied = None;
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
                _ = tick.tick(), if round.is_none() => {
                    round = Some(Box::pin(self.probe_round()));
                    continue;
                }
            }
            due = self.act_on_roles().map(|wait| Instant::now() + wait);
        }
    }

    fn actor(&self) -> String {
        format!("monitor@node:{}", self.node.id())
    }

    /// Proposes `event` in the background: probing goes on while it commits, also when the leader
    /// just died and the proposal waits for a new one. The same event is not sent again while an
    /// earlier copy is under way (for up to [`PROPOSE_AGAIN_AFTER`]); a copy that commits twice is
    /// harmless, the state machine rejects the second (a report that changes nothing, a switch to a
    /// node already master). `at_ms` is the clock reading the event was decided on.
    fn propose_at(&self, event: Event, at_ms: u64) {
        let key = format!("{event:?}");
        let now = Instant::now();
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            inflight.retain(|_, sent| now < *sent + PROPOSE_AGAIN_AFTER);
            if inflight.contains_key(&key) {
                return;
            }
            inflight.insert(key.clone(), now);
        }
        let (node, actor, inflight) = (self.node.clone(), self.actor(), self.inflight.clone());
        tokio::spawn(async move {
            let summary = event.summary();
            match node.propose_at(event, actor, at_ms).await {
                Ok(p) if p.outcome.is_applied() => tracing::info!(index = p.index, "{summary}"),
                Ok(p) => tracing::debug!(index = p.index, ?p.outcome, "not applied: {summary}"),
                // Someone else got there first, or the state moved: the next step looks again.
                Err(ProposeError::Rejected(reason)) => tracing::debug!(%reason, "not proposed: {summary}"),
                Err(e) => tracing::warn!(error = %e, "could not propose: {summary}"),
            }
            let mut inflight = inflight.lock().expect("inflight lock");
            if inflight.get(&key).is_some_and(|sent| *sent == now) {
                inflight.remove(&key);
            }
        });
    }

    /// Probes, at once, every peer and every service this node is failover or backup of that is due
    /// in this round ([`MonitorConfig::steady_every`]).
    fn probe_round(&mut self) -> impl std::future::Future<Output = Round> + Send + 'static {
        let me = self.node.id();
        self.round += 1;
        let (round, streaks, config) = (self.round, &self.streaks, &self.config);
        let (subjects, peers, services) = self.node.store().with_state(|s| {
            let due = |subject: &Subject, critical: bool| {
                Streak::due(streaks.get(subject), critical, s.reachable(me, subject), round, config)
            };
            let masters: BTreeSet<u64> =
                s.services.values().filter_map(|svc| svc.placement.as_ref().map(|p| p.master)).collect();
            let mut subjects = BTreeSet::new();
            let mut peers: Vec<(u64, String)> = Vec::new();
            for m in s.members.values().filter(|m| m.id != me) {
                let subject = Subject::Node(m.id);
                // Every member's view of a master counts towards the majority a failover needs.
                if due(&subject, masters.contains(&m.id)) {
                    peers.push((m.id, m.addr.clone()));
                }
                subjects.insert(subject);
            }
            let mut services: Vec<(String, Checks, Option<String>, bool)> = Vec::new();
            for name in s.services.keys() {
                let role = s.role(name, me);
                if !matches!(role, Some(Role::Failover) | Some(Role::Backup)) {
                    continue;
                }
                let subject = Subject::Service(name.clone());
                if due(&subject, role == Some(Role::Failover)) {
                    let master = s.services[name].placement.as_ref().map(|p| p.master).unwrap_or(0);
                    let master_addr = s.members.get(&master).map(|m| m.addr.clone());
                    let on_demand = s.services[name].spec.on_demand;
                    services.push((name.clone(), service_checks(s, name, master), master_addr, on_demand));
                }
                subjects.insert(subject);
            }
            (subjects, peers, services)
        });
        self.subjects = subjects;

        let timeout = self.config.probe_timeout;
        let peer_probes: Vec<_> = peers
            .iter()
            .map(|(_, addr)| {
                let node = self.node.clone();
                let addr = addr.clone();
                async move { tokio::time::timeout(timeout, node.ping_peer(&addr)).await.unwrap_or(false) }
            })
            .collect();
        let service_probes: Vec<_> = services
            .iter()
            .map(|(name, (check, zone), master_addr, on_demand)| {
                let probe = check.clone().map(|c| self.probe.probe(c, timeout));
                let zone = zone.clone().map(|z| self.probe.zone(z, timeout));
                let node = self.node.clone();
                let master_addr = master_addr.clone();
                let (name, on_demand) = (name.clone(), *on_demand);
                async move {
                    // The service counts as unreachable only while its zone is too (when it has one).
                    let (service_ok, zone_ok) = tokio::join!(
                        async {
                            // An on-demand service is asked of its master's activator: connecting to
                            // it would start its container, and keep it from ever stopping when idle.
                            let listening = match (&master_addr, on_demand) {
                                (Some(addr), true) => listening_at(&node, addr, &name, timeout).await,
                                _ => None,
                            };
                            match (listening, probe, master_addr) {
                                (Some(listening), _, _) => listening,
                                (None, Some(probe), _) => probe.await,
                                // A service with no port cannot be probed: its master's reachability decides.
                                (None, None, Some(addr)) => {
                                    tokio::time::timeout(timeout, node.ping_peer(&addr))
                                        .await
                                        .unwrap_or(false)
                                }
                                (None, None, None) => false,
                            }
                        },
                        async {
                            match zone {
                                Some(zone) => zone.await,
                                None => false,
                            }
                        }
                    );
                    service_ok || zone_ok
                }
            })
            .collect();
        async move {
            let (peer_ok, service_ok) = tokio::join!(
                futures::future::join_all(peer_probes),
                futures::future::join_all(service_probes)
            );
            let mut results: Round = Vec::new();
            results.extend(peers.iter().map(|(id, _)| Subject::Node(*id)).zip(peer_ok));
            results.extend(services.into_iter().map(|(name, ..)| Subject::Service(name)).zip(service_ok));
            results
        }
    }

    /// Counts a round's results into the streaks and reports the transitions, each with the moment
    /// its run began (a report retried because its leader died under it still says since when).
    fn record(&mut self, results: Round) {
        let me = self.node.id();
        let now = self.node.now_ms();
        for (subject, ok) in results {
            let reported = self.node.store().with_state(|s| s.reachable(me, &subject));
            let streak = self.streaks.entry(subject.clone()).or_default();
            streak.probed_in = self.round;
            if (ok && streak.oks == 0) || (!ok && streak.fails == 0) {
                tracing::debug!(node = me, %subject, ok, "a probe's result changed");
            }
            if let Some((reachable, since)) = streak.record(ok, reported, now, &self.config) {
                self.propose_at(Event::ReachabilityChanged { observer: me, subject, reachable }, since);
            }
        }
        // Forget streaks of subjects that are gone (not those that were only not due).
        let subjects = &self.subjects;
        self.streaks.retain(|s, _| subjects.contains(s));
    }

    /// Proposes what this node's roles call for now; returns how long until a failover's wait
    /// ends, when one is waiting only for time to pass.
    fn act_on_roles(&self) -> Option<Duration> {
        let me = self.node.id();
        // One clock reading: what is validated here is proposed with the same `at_ms`.
        let now = self.node.now_ms();
        let mut due: Option<u64> = None;
        let (takeovers, waiting) = self.node.store().with_state(|s| {
            let mut takeovers = Vec::new();
            let mut waiting = Vec::new();
            for name in s.services.keys() {
                // The target of a handover the master did not carry out in time takes it over.
                if let Some(reason) = s.handover(name).filter(|h| h.to == me).and_then(|_| s.handover_overdue(name, now)) {
                    let event = handover_switch(name, me, reason, SwitchCause::HandoverOverdue);
                    let proposal = Proposal { at_ms: now, actor: String::new(), event: event.clone() };
                    if s.validate(&proposal).is_ok() {
                        takeovers.push(event);
                    }
                }
                match s.role(name, me) {
                    Some(Role::Failover) => {
                        let event = takeover(name, me, "master and service unreachable".into());
                        let proposal = Proposal { at_ms: now, actor: String::new(), event: event.clone() };
                        if s.validate(&proposal).is_ok() {
                            takeovers.push(event);
                        } else if let Some(o) = s.reachability.get(&(me, Subject::Service(name.clone()))) {
                            let ends = o.since_ms.saturating_add(FAILOVER_AFTER_MS);
                            if !o.reachable && ends > now {
                                due = Some(due.map_or(ends, |d| d.min(ends)));
                            }
                        }
                    }
                    Some(Role::Backup) => {
                        let master = s.services[name].placement.as_ref().map(|p| p.master).unwrap_or(0);
                        let (votes, needed) = s.master_down_votes(master);
                        let key = format!("master-lost/{name}/{me}");
                        let service_down = !s.reachable(me, &Subject::Service(name.clone()));
                        #[cfg(feature = "planted-bugs")]
                        if planted::backup_takes_over() && service_down && votes >= needed {
                            // The planted bug: when its master is lost, the backup instructs itself
                            // instead of raising the alarm and waiting.
                            let mut event = takeover(name, me, "planted bug: the backup takes over".into());
                            if let Event::AuthoritySwitched { cause, .. } = &mut event {
                                *cause = SwitchCause::Instruction;
                            }
                            let proposal = Proposal { at_ms: now, actor: String::new(), event: event.clone() };
                            if s.validate(&proposal).is_ok() {
                                takeovers.push(event);
                            }
                        }
                        if service_down && votes >= needed && !s.open_alarms().any(|a| a.key == key) {
                            waiting.push(Event::AlarmRaised {
                                key,
                                node: Some(me),
                                service: Some(name.clone()),
                                message: format!(
                                    "the master (node {master}) of {name} is unreachable; node {me} is a backup and waits for an instruction (coyote service switch {name} --to {me})"
                                ),
                            });
                        }
                    }
                    _ => {}
                }
            }
            (takeovers, waiting)
        });
        for event in takeovers.into_iter().chain(waiting) {
            self.propose_at(event, now);
        }
        due.map(|at| Duration::from_millis(at - now))
    }
}

/// The switch a failover proposes (the state machine derives when the new master serves).
pub fn takeover(service: &str, to: u64, reason: String) -> Event {
    Event::AuthoritySwitched {
        service: service.to_string(),
        to,
        reason,
        not_before_ms: 0,
        cause: SwitchCause::Failover,
    }
}

/// The switch that ends a handover: `Handover` from the old master once it has stopped,
/// `HandoverOverdue` from the target when the old master did not in time.
pub fn handover_switch(service: &str, to: u64, reason: String, cause: SwitchCause) -> Event {
    Event::AuthoritySwitched { service: service.to_string(), to, reason, not_before_ms: 0, cause }
}

/// Deliberate bugs, for the simulator to show that its checkers catch them. Compiled only with the
/// `planted-bugs` feature, and off until switched on.
#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::{AtomicBool, Ordering};

    static BACKUP_TAKES_OVER: AtomicBool = AtomicBool::new(false);

    /// A backup whose master is lost (its service unreachable from it, a majority reporting the master
    /// unreachable) switches authority to itself (as an instruction, which the state machine accepts
    /// from an admin), instead of raising an alarm and waiting.
    pub fn backup_takes_over_by_itself(on: bool) {
        BACKUP_TAKES_OVER.store(on, Ordering::SeqCst);
    }

    pub(crate) fn backup_takes_over() -> bool {
        BACKUP_TAKES_OVER.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays rounds 1.. of one subject (`critical`: a failover waits on it) whose probes succeed in
    /// the rounds `ok_in` says, with the log updated by what the streak reports; returns the rounds
    /// it was probed in and the reports (round, reachable).
    fn play(
        config: &MonitorConfig,
        critical: bool,
        rounds: u64,
        ok_in: impl Fn(u64) -> bool,
    ) -> (Vec<u64>, Vec<(u64, bool)>) {
        let (mut streak, mut reported, mut probed, mut reports) =
            (None::<Streak>, true, Vec::new(), Vec::new());
        for round in 1..=rounds {
            if !Streak::due(streak.as_ref(), critical, reported, round, config) {
                continue;
            }
            probed.push(round);
            let s = streak.get_or_insert_with(Streak::default);
            s.probed_in = round;
            if let Some((reachable, _)) = s.record(ok_in(round), reported, round * 200, config) {
                reported = reachable;
                reports.push((round, reachable));
            }
        }
        (probed, reports)
    }

    #[test]
    fn a_steady_subject_no_failover_waits_on_is_probed_less_often() {
        let config = MonitorConfig { fail_after: 3, recover_after: 2, steady_every: 2, ..Default::default() };
        // Healthy throughout: the first probe, then every other round.
        let (probed, reports) = play(&config, false, 9, |_| true);
        assert_eq!(probed, vec![1, 3, 5, 7, 9]);
        assert!(reports.is_empty());

        // Lost from round 6 on: the probe of round 7 fails, and from then on every round is probed,
        // so the third failure (round 9) reports it, two rounds after the first.
        let (probed, reports) = play(&config, false, 12, |r| r < 6);
        assert_eq!(probed, vec![1, 3, 5, 7, 8, 9, 10, 11, 12]);
        assert_eq!(reports, vec![(9, false)]);

        // Back from round 12: probed every round while the log still reports it unreachable, and
        // every other round again once it is reported reachable (round 13).
        let (probed, reports) = play(&config, false, 20, |r| !(6..12).contains(&r));
        assert_eq!(probed, vec![1, 3, 5, 7, 8, 9, 10, 11, 12, 13, 15, 17, 19]);
        assert_eq!(reports, vec![(9, false), (13, true)]);

        // One failed probe between good ones: probed every round until a good one, then steady again.
        let (probed, reports) = play(&config, false, 11, |r| r != 5);
        assert_eq!(probed, vec![1, 3, 5, 6, 8, 10]);
        assert!(reports.is_empty());

        // What a failover waits on is probed in every round, and its loss reported as soon as before.
        let (probed, reports) = play(&config, true, 12, |r| r < 6);
        assert_eq!(probed, (1..=12).collect::<Vec<_>>());
        assert_eq!(reports, vec![(8, false)]);

        // steady_every 1 (or 0) probes every subject in every round.
        for steady_every in [0, 1] {
            let config = MonitorConfig { steady_every, ..config.clone() };
            assert_eq!(play(&config, false, 4, |_| true).0, vec![1, 2, 3, 4]);
        }
        // The default spaces a steady subject's probes 4 rounds apart.
        assert_eq!(play(&MonitorConfig::default(), false, 9, |_| true).0, vec![1, 5, 9]);
    }

    #[test]
    fn streaks_report_transitions_only() {
        let config = MonitorConfig { fail_after: 3, recover_after: 2, ..Default::default() };
        let mut s = Streak::default();
        assert_eq!(s.record(true, true, 100, &config), None);
        assert_eq!(s.record(false, true, 300, &config), None);
        assert_eq!(s.record(false, true, 500, &config), None);
        // Reported with the end of the first failed probe: the subject has been unreachable since.
        assert_eq!(s.record(false, true, 700, &config), Some((false, 300)));
        // Reported now; further failures say nothing new.
        assert_eq!(s.record(false, false, 900, &config), None);
        assert_eq!(s.record(true, false, 1100, &config), None);
        assert_eq!(s.record(true, false, 1300, &config), Some((true, 1100)));
        // A single good probe in a failing run resets the count and the start of the run.
        let mut s = Streak::default();
        s.record(false, true, 0, &config);
        s.record(false, true, 200, &config);
        s.record(true, true, 400, &config);
        assert_eq!(s.record(false, true, 600, &config), None);
        assert_eq!(s.record(false, true, 800, &config), None);
        assert_eq!(s.record(false, true, 1000, &config), Some((false, 600)));
    }
}
