//! The driver of one seed: steps turmoil, runs the checkers after every step (serving, splices)
//! or every [`Params::check_every`] (the rest), forms the cluster, and runs the liveness phase.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use coyote_log::store::{self, EventRecord};
use coyote_state_machine::{Event, Placement, SwitchCause, DRIFT_MARGIN_MS, LEASE_MS};
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};

use crate::checks::{self, Links, NodeSnapshot, Timeline};
use crate::panics;
use crate::params::service_spec;
use crate::params::{
    Params, ADMIN_ACTOR, DATA_WINDOW_MS, EPOCH_UNIX_S, REACH_WINDOW_MS, SPLICE_LAG_STEPS, VISIT_TIMEOUT,
};
use crate::world::{Admin, Answer, ProposalAnswer, SimNode, World};

/// A master lost by a fault, waiting for another node to serve its service.
pub(crate) struct Loss {
    pub(crate) at: Duration,
    pub(crate) master: String,
    pub(crate) healed: bool,
}

/// Drives one seed.
pub(crate) struct Driver<'a> {
    pub(crate) sim: turmoil::Sim<'a>,
    pub(crate) world: Arc<World>,
    pub(crate) names: Vec<String>,
    pub(crate) params: Params,
    pub(crate) rng: StdRng,
    pub(crate) violations: Vec<String>,
    pub(crate) leaders: Vec<(String, u64)>,
    pub(crate) next_check: Duration,
    pub(crate) faults: usize,
    /// A host failed or panicked: the run stops.
    pub(crate) broken: bool,
    /// The ground truth of the network now, and over time.
    pub(crate) links: Links,
    pub(crate) timeline: Timeline,
    /// The host of each node id seen.
    pub(crate) hosts: BTreeMap<u64, String>,
    /// Who serves each service, as last traced.
    pub(crate) serving: BTreeMap<String, Vec<String>>,
    /// What each running host served after the last step.
    pub(crate) serving_by_host: BTreeMap<String, Vec<String>>,
    /// Each host's archive as read at the last check ([`Driver::archive_of`]).
    pub(crate) archives: std::cell::RefCell<BTreeMap<String, Arc<Vec<EventRecord>>>>,
    /// Masters lost by a fault, by service.
    pub(crate) losses: BTreeMap<String, Loss>,
    pub(crate) failover_ms: Vec<u64>,
    /// How many of the switches found so far are traced.
    pub(crate) switches_traced: usize,
    /// The replay of the archive that finds the switches, advanced at every check.
    pub(crate) replay: checks::Replay,
    /// The service a scenario acts on.
    pub(crate) focus: String,
    /// The host that was its master when the scenario began.
    pub(crate) focus_master: String,
    /// Connections spliced to on-demand containers so far.
    pub(crate) spliced: usize,
    /// Data records already checked ([`checks::data_followed_authority`]).
    pub(crate) data_checked: usize,
    /// The last step after which each host served each service it no longer serves.
    pub(crate) served_until: BTreeMap<(String, String), Duration>,
    /// How many nodes the cluster has now: the parameter, less those that left or were removed,
    /// plus those that joined since.
    pub(crate) expected_nodes: usize,
    /// When a check first found each node recorded as departed (it left or was removed).
    pub(crate) departed_seen: BTreeMap<u64, Duration>,
}
impl Driver<'_> {
    pub(crate) fn trace(&self, line: String) {
        let ms = self.sim.elapsed().as_millis();
        self.world.trace.lock().expect("trace lock").push(format!("{ms:>7} {line}"));
    }

    pub(crate) fn violation(&mut self, v: String) {
        self.trace(format!("VIOLATION {v}"));
        self.violations.push(v);
    }

    /// One turmoil step, the serving checker, then the other checkers if they are due. False once the
    /// run cannot go on.
    pub(crate) fn step(&mut self) -> bool {
        if let Err(e) = self.sim.step() {
            self.violation(format!("a host failed: {e}"));
            self.broken = true;
        }
        for panic in panics::take() {
            self.violation(format!("panic: {panic}"));
            self.broken = true;
        }
        self.world.clock_ms.store(self.sim.since_epoch().as_millis() as u64, Ordering::SeqCst);
        self.check_splices();
        self.check_serving();
        if self.sim.elapsed() >= self.next_check {
            self.next_check = self.sim.elapsed() + self.params.check_every;
            self.check();
        }
        !self.broken
    }

    /// After every step, before [`Self::check_serving`] looks: every connection through which an
    /// on-demand container received a client's bytes was accepted from an activator on a node that
    /// served the service. The activator decides to splice (its fence check) a step before the
    /// container accepts (turmoil delivers a connection to the host's own address a step later),
    /// and a host reads the time of a step a step apart from the driver, so a splice is also
    /// allowed when the node served the service up to [`SPLICE_LAG_STEPS`] steps before. (The
    /// fence's drift margin covers far more than that lag.) A splice is reported once its first
    /// bytes arrived, which can be later.
    pub(crate) fn check_splices(&mut self) {
        let splices: Vec<(String, crate::model::Splice)> = {
            let running = self.world.running.lock().expect("running lock");
            running
                .iter()
                .flat_map(|(host, n)| n.containers.take_splices().into_iter().map(|s| (host.clone(), s)))
                .collect()
        };
        for (host, splice) in splices {
            self.spliced += 1;
            let lag = self.params.tick * SPLICE_LAG_STEPS;
            let served_before = self.serving_by_host.get(&host).is_some_and(|s| s.contains(&splice.service))
                || self
                    .served_until
                    .get(&(host.clone(), splice.service.clone()))
                    .is_some_and(|until| *until + lag >= splice.at);
            if !splice.serving && !served_before {
                self.violation(checks::spliced_while_not_serving(&host, &splice.service, splice.at));
                self.broken = true;
            }
        }
    }

    /// After every step: at most one node serves each service; failover times.
    pub(crate) fn check_serving(&mut self) {
        let by_host: BTreeMap<String, Vec<String>> = {
            let running = self.world.running.lock().expect("running lock");
            // Most steps change nothing: then the verdict and the failover times stay as they were.
            let mut serving = running.values().map(SimNode::serving);
            let unchanged = running.len() == self.serving_by_host.len()
                && running
                    .keys()
                    .zip(&self.serving_by_host)
                    .all(|(host, (was_host, was))| host == was_host && serving.next().as_ref() == Some(was));
            if unchanged {
                return;
            }
            running.iter().map(|(h, n)| (h.clone(), n.serving())).collect()
        };
        let before = self.sim.elapsed().saturating_sub(self.params.tick);
        for (host, was) in &self.serving_by_host {
            for service in was.iter().filter(|s| by_host.get(host).is_none_or(|now| !now.contains(s))) {
                self.served_until.insert((host.clone(), service.clone()), before);
            }
        }
        self.serving_by_host = by_host.clone();
        let found = checks::at_most_one_serving(&by_host);
        if !found.is_empty() {
            self.broken = true;
        }
        for v in found {
            self.violation(v);
        }
        let mut by_service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (host, services) in &by_host {
            for s in services {
                by_service.entry(s.clone()).or_default().push(host.clone());
            }
        }
        if by_service != self.serving {
            let now = self.sim.elapsed();
            let mut lines = Vec::new();
            for (service, loss) in &self.losses {
                let hosts = by_service.get(service).cloned().unwrap_or_default();
                if hosts.iter().any(|h| *h != loss.master) {
                    let ms = (now - loss.at).as_millis() as u64;
                    // The new master serves at least a lease after its switch was applied, so the
                    // archive checked every 500 ms already holds the switch: count only failovers.
                    let cause = self.switches().iter().rev().find(|s| s.service == *service).map(|s| s.cause);
                    if cause == Some(SwitchCause::Failover) {
                        self.failover_ms.push(ms);
                        lines.push(format!("failover of {service} from {}: {ms} ms", loss.master));
                    } else {
                        lines.push(format!("{service} served again after {ms} ms, not by a failover"));
                    }
                }
            }
            self.losses.retain(|service, loss| {
                let hosts = by_service.get(service).cloned().unwrap_or_default();
                let failed_over = hosts.iter().any(|h| *h != loss.master);
                let back = loss.healed && hosts.contains(&loss.master);
                !failed_over && !back
            });
            let all = self.world_services();
            let served: Vec<String> = all
                .iter()
                .map(|s| format!("{s}={}", by_service.get(s).map(|h| h.join("+")).unwrap_or("-".into())))
                .collect();
            self.trace(format!("serving {}", served.join(" ")));
            for line in lines {
                self.trace(line);
            }
            self.serving = by_service;
        }
    }

    pub(crate) fn world_services(&self) -> Vec<String> {
        (1..=self.params.services).map(|i| format!("svc{i}")).collect()
    }

    pub(crate) fn snapshots(&self) -> Vec<NodeSnapshot> {
        self.snapshots_of(true)
    }

    /// Snapshots without the archives (empty), for the convergence checks, which run every 100 ms of
    /// simulated time and need no events.
    pub(crate) fn light_snapshots(&self) -> Vec<NodeSnapshot> {
        self.snapshots_of(false)
    }

    /// The archive of `host`'s node: the copy read at the last check, extended by the events applied
    /// since. Read again in full when the node's archive no longer ends as the copy does (it shrank
    /// after a restart, or an event was replaced).
    pub(crate) fn archive_of(&self, host: &str, store: &store::StoreHandle) -> Arc<Vec<EventRecord>> {
        let mut archives = self.archives.borrow_mut();
        let copy = archives.entry(host.to_string()).or_default();
        let have = copy.last().map(|r| r.envelope.index).unwrap_or(0);
        let read = |from: u64| store.events(from, usize::MAX).expect("the archive reads");
        if store.last_event() != have {
            // From the copy's last event, which must still be there, unchanged.
            let fresh = read(have.max(1));
            let continues = have == 0 || fresh.first().is_some_and(|first| Some(first) == copy.last());
            if continues {
                let new = fresh.into_iter().skip(usize::from(have > 0));
                Arc::make_mut(copy).extend(new);
            } else {
                *copy = Arc::new(read(1));
            }
        }
        copy.clone()
    }

    pub(crate) fn snapshots_of(&self, with_archive: bool) -> Vec<NodeSnapshot> {
        let running = self.world.running.lock().expect("running lock");
        running
            .iter()
            .map(|(host, sim_node)| {
                let node = &sim_node.node;
                let m = node.raft().metrics().borrow().clone();
                let store = node.store();
                let log_applied = store.last_applied();
                let applied = store.last_event();
                let archive = if with_archive { self.archive_of(host, store) } else { Arc::default() };
                let (members, placements, departed) = store.with_state(|s| {
                    let members = s.members.keys().copied().collect();
                    let placements =
                        s.services.iter().map(|(n, svc)| (n.clone(), svc.placement.clone())).collect();
                    (members, placements, s.departed.iter().copied().collect())
                });
                NodeSnapshot {
                    host: host.clone(),
                    node_id: node.id(),
                    is_leader: m.state == openraft::ServerState::Leader,
                    term: m.current_term,
                    leader: m.current_leader,
                    applied,
                    log_applied,
                    archive,
                    voters: m.membership_config.membership().voter_ids().collect(),
                    members,
                    placements,
                    departed,
                    serving: sim_node.serving(),
                    containers: sim_node.containers.running(),
                }
            })
            .collect()
    }

    /// The authority switches applied so far, as of the last check.
    pub(crate) fn switches(&self) -> &[checks::Switch] {
        self.replay.switches()
    }

    pub(crate) fn data_counts(&self) -> checks::DataCounts {
        self.replay.data_counts()
    }

    pub(crate) fn check(&mut self) {
        let nodes = self.snapshots();
        for n in &nodes {
            self.hosts.insert(n.node_id, n.host.clone());
        }
        let now = self.sim.elapsed();
        for id in nodes.iter().flat_map(|n| n.departed.iter()) {
            self.departed_seen.entry(*id).or_insert(now);
        }
        let acks = self.world.acks.lock().expect("acks lock").clone();
        let mut found = checks::prefixes_agree(&nodes);
        // A node that left or was removed serves nothing once a lease (and the drift margin) has
        // passed since a check first found it recorded so: a removed master that still runs cannot
        // renew its lease, and one that was down when it was removed never gets one.
        let grace = Duration::from_millis(LEASE_MS + DRIFT_MARGIN_MS) + self.params.check_every;
        for n in nodes.iter().filter(|n| !n.serving.is_empty()) {
            if let Some(seen) = self.departed_seen.get(&n.node_id).filter(|seen| now > **seen + grace) {
                found.push(format!(
                    "removed: {} (node {}) serves {:?} {} ms after it was found removed",
                    n.host,
                    n.node_id,
                    n.serving,
                    (now - *seen).as_millis()
                ));
            }
        }
        found.extend(checks::no_ack_lost(&nodes, &acks));
        found.extend(checks::one_leader_per_term(&nodes));
        found.extend(checks::roles_well_formed(&nodes));
        if let Some(longest) = nodes.iter().max_by_key(|n| n.applied) {
            match self.replay.advance(&longest.archive) {
                Ok(()) => {
                    let switches = self.replay.switches();
                    found.extend(checks::switches_authorised(switches, ADMIN_ACTOR));
                    found.extend(checks::authority_moved_only_by_switches(self.replay.moves()));
                    let window = REACH_WINDOW_MS;
                    let epoch_ms = EPOCH_UNIX_S * 1000;
                    found.extend(checks::no_switch_while_master_reachable(
                        switches,
                        &self.timeline,
                        &self.hosts,
                        window,
                        epoch_ms,
                    ));
                    let lines: Vec<String> = switches[self.switches_traced..]
                        .iter()
                        .map(|s| {
                            format!(
                                "switch at {}: {} from node {} to node {} ({:?}, by {})",
                                s.index, s.service, s.before.master, s.to, s.cause, s.actor
                            )
                        })
                        .collect();
                    self.switches_traced = switches.len();
                    for line in lines {
                        self.trace(line);
                    }
                    let records = self.world.data.lock().expect("data log lock").clone();
                    let host_of: BTreeMap<u64, String> =
                        self.hosts.iter().map(|(id, host)| (*id, host.clone())).collect();
                    found.extend(checks::data_followed_authority(
                        &records,
                        self.data_checked,
                        self.replay.switches(),
                        self.replay.alarms(),
                        &host_of,
                        DATA_WINDOW_MS,
                    ));
                    self.data_checked = records.len();
                }
                Err(e) => found.push(format!("archive: {} cannot be replayed: {e}", longest.host)),
            }
        }
        // The first violations end the run: later checks would only repeat them.
        if !found.is_empty() {
            self.broken = true;
        }
        for v in found {
            self.violation(v);
        }
        let leaders: Vec<(String, u64)> =
            nodes.iter().filter(|n| n.is_leader).map(|n| (n.host.clone(), n.term)).collect();
        if leaders != self.leaders {
            self.trace(format!("leaders {leaders:?}"));
            self.leaders = leaders;
        }
    }

    pub(crate) fn run_until(&mut self, end: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        while self.sim.elapsed() < end {
            if !self.step() {
                return false;
            }
            if done(self) {
                return true;
            }
        }
        false
    }

    /// Runs for `d` of simulated time; false once the run cannot go on.
    pub(crate) fn run_for(&mut self, d: Duration) -> bool {
        let end = self.sim.elapsed() + d;
        while self.sim.elapsed() < end {
            if !self.step() {
                return false;
            }
        }
        true
    }

    /// Whether the log converged and every service is served by its master alone.
    pub(crate) fn all_converged(&self) -> Result<(), String> {
        let nodes = self.light_snapshots();
        checks::converged(&nodes, self.expected_nodes)?;
        checks::services_converged(&nodes, self.params.services)
    }

    pub(crate) fn formation(&mut self) -> bool {
        let end = self.sim.elapsed() + self.params.formation;
        let expected = self.expected_nodes;
        let mut probe = Duration::ZERO;
        let formed = self.run_until(end, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            checks::converged(&d.light_snapshots(), expected).is_ok()
        });
        if !formed {
            if !self.broken {
                let why = checks::converged(&self.snapshots(), expected).err().unwrap_or_default();
                self.violation(format!(
                    "formation: the cluster did not form within {:?}: {why}",
                    self.params.formation
                ));
            }
            return false;
        }
        self.trace("formed".into());
        // The admin creates the services through node 1: the first on the CRM's page, the others
        // with `coyote service create`.
        for i in 1..=self.params.services {
            let spec = service_spec(i, self.params.nodes);
            let command = if i == 1 { Admin::CreateServiceInCrm(spec) } else { Admin::CreateService(spec) };
            self.admin(&self.names[0].clone(), command);
        }
        let mut probe = Duration::ZERO;
        let served = self.run_until(end + self.params.formation, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            d.all_converged().is_ok()
        });
        if served {
            self.trace("services served".into());
        } else if !self.broken {
            let why = self.all_converged().err().unwrap_or_default();
            self.violation(format!("formation: the services were not served in time: {why}"));
        }
        served
    }

    /// Asks the node of `host`, on its own runtime, to confirm its leadership with a quorum, as a
    /// master's fence does before it serves on (`LogNode::confirm_quorum`); the answer (the read index,
    /// or why not) lands in the returned cell. None if the host is not running.
    pub(crate) fn confirm_on(&self, host: &str, timeout: Duration) -> Option<Answer> {
        let running = self.world.running.lock().expect("running lock");
        let sim_node = running.get(host)?;
        let answer: Answer = Arc::default();
        let (node, cell) = (sim_node.node.clone(), answer.clone());
        sim_node.rt.spawn(async move {
            let result = node.confirm_quorum(timeout).await.map_err(|e| e.to_string());
            *cell.lock().expect("answer lock") = Some(result);
        });
        Some(answer)
    }

    /// Proposes `event` as `actor` through the node of `host`, on its own runtime, as that node's
    /// monitor or reconciler would; the answer lands in the returned cell. None if the host is not
    /// running.
    pub(crate) fn propose_on(&mut self, host: &str, event: Event, actor: String) -> Option<ProposalAnswer> {
        self.trace(format!("proposing through {host} as {actor}: {event:?}"));
        let running = self.world.running.lock().expect("running lock");
        let sim_node = running.get(host)?;
        let answer: ProposalAnswer = Arc::default();
        let (node, cell) = (sim_node.node.clone(), answer.clone());
        sim_node.rt.spawn(async move {
            let result = node.propose(event, actor).await.map(|p| p.outcome).map_err(|e| e.to_string());
            *cell.lock().expect("answer lock") = Some(result);
        });
        Some(answer)
    }

    pub(crate) fn admin(&mut self, host: &str, command: Admin) {
        self.trace(format!("admin via {host}: {command:?}"));
        self.world.admin.lock().expect("admin lock").entry(host.to_string()).or_default().push_back(command);
    }

    pub(crate) fn leader_id(&self) -> Option<u64> {
        self.light_snapshots().into_iter().find(|n| n.is_leader).map(|n| n.node_id)
    }

    pub(crate) fn leader_host(&self) -> Option<String> {
        self.light_snapshots().into_iter().find(|n| n.is_leader).map(|n| n.host)
    }

    /// The placement of `service` in the leader's state (else the most advanced node's).
    pub(crate) fn placement(&self, service: &str) -> Option<Placement> {
        let nodes = self.light_snapshots();
        let node = nodes.iter().find(|n| n.is_leader).or_else(|| nodes.iter().max_by_key(|n| n.applied))?;
        node.placements.get(service).cloned().flatten()
    }

    /// The host of node `id`.
    pub(crate) fn host_of(&self, id: u64) -> Option<String> {
        let running = self.world.running.lock().expect("running lock");
        running
            .iter()
            .find(|(_, n)| n.node.id() == id)
            .map(|(h, _)| h.clone())
            .or_else(|| self.hosts.get(&id).cloned())
    }

    /// The node id of `host`.
    pub(crate) fn id_of(&self, host: &str) -> Option<u64> {
        let running = self.world.running.lock().expect("running lock");
        running
            .get(host)
            .map(|n| n.node.id())
            .or_else(|| self.hosts.iter().find(|(_, h)| *h == host).map(|(id, _)| *id))
    }

    /// Why `host`'s node is no longer a member, once it has stopped for that.
    pub(crate) fn departed_host(&self, host: &str) -> Option<String> {
        self.world.departed.lock().expect("departed lock").get(host).cloned()
    }

    pub(crate) fn running_hosts(&self) -> Vec<String> {
        self.world.running.lock().expect("running lock").keys().cloned().collect()
    }

    /// Once the cluster has converged, every on-demand service answers a visitor before `end`: its
    /// master holds the first connection while it starts the container, then serves it.
    pub(crate) fn visited_after_convergence(&mut self, end: Duration) {
        let since = self.sim.elapsed();
        let on_demand: Vec<String> = (1..=self.params.services)
            .map(|i| service_spec(i, self.params.nodes))
            .filter(|spec| spec.on_demand)
            .map(|spec| spec.name)
            .collect();
        let answered = |d: &mut Self| {
            let visits = d.world.visits.lock().expect("visits lock");
            on_demand.iter().all(|s| visits.get(s).is_some_and(|at| *at >= since))
        };
        if !self.run_until(end.max(since + VISIT_TIMEOUT * 2), answered) && !self.broken {
            let visits = self.world.visits.lock().expect("visits lock").clone();
            let silent: Vec<&String> =
                on_demand.iter().filter(|s| visits.get(*s).is_none_or(|at| *at < since)).collect();
            self.violation(format!(
                "liveness: on-demand services {silent:?} answered no visitor after the cluster converged at {} ms",
                since.as_millis()
            ));
        }
    }

    pub(crate) fn liveness(&mut self) {
        self.world.workload.store(false, Ordering::SeqCst);
        self.trace("faults over; workload stopped".into());
        let end = self.sim.elapsed() + self.params.liveness;
        let mut probe = Duration::ZERO;
        let converged = self.run_until(end, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            d.all_converged().is_ok()
        });
        if self.broken {
            return;
        }
        if !converged {
            let why = self.all_converged().err().unwrap_or_default();
            self.violation(format!(
                "liveness: no convergence within {:?} after healing: {why}",
                self.params.liveness
            ));
            return;
        }
        self.trace("converged".into());
        self.check();
        // The state at convergence: what was acknowledged must be applied everywhere by then. (A
        // proposal that was held up by a fault can still be acknowledged later; it is not lost.)
        let nodes = self.snapshots();
        let acked_max = self.world.acks.lock().expect("acks lock").iter().map(|a| a.index).max();
        let applied = nodes.iter().map(|n| n.applied).min().unwrap_or(0);
        if let Some(acked) = acked_max.filter(|a| *a > applied) {
            self.violation(format!(
                "lost ack: index {acked} was acknowledged, the cluster converged at {applied}"
            ));
        }
        for node in &nodes {
            let mut hash = Sha256::new();
            for record in node.archive.iter() {
                hash.update(coyote_state_machine::encode(record));
            }
            let line = format!(
                "final {} applied {} archive {}",
                node.host,
                node.applied,
                hex::encode(hash.finalize())
            );
            self.trace(line);
        }
        self.visited_after_convergence(end);
    }
}
