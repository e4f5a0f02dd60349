//! The reconciler: brings this server's containers to what the log asks of it, or raises an alarm.
//!
//! # How it works
//!
//! Each pass is three steps, in the controller pattern of the design:
//!
//! 1. **Derive.** From the replicated state, [`desired`] lists the containers this node should have:
//!    the services it masters (running, or for on-demand services created and stopped: the activator
//!    starts them on traffic) and those it is failover for (created and stopped, ready to start).
//! 2. **Plan.** [`plan`] compares that with what the runtime reports and returns [`Action`]s: create
//!    (and start), start, stop, remove. It is a pure function of its two lists, tested table by table
//!    without Docker; `coyote plan` shows its answer without acting on it.
//! 3. **Act.** The [`Executor`] runs each service's actions in order through a [`ContainerRuntime`]
//!    and reports what it could not do; [`alarm_events`] turns that report into alarm events, which
//!    the [`Reconciler`] (the part that knows the log) proposes. The executor knows nothing of the log,
//!    so unit tests here drive it with a model runtime, as the simulator will.
//!
//! A pass runs whenever the applied log index moves and every [`RESYNC_INTERVAL`] (to repair drift: a
//! container removed or stopped by hand comes back, a container with an old spec label is replaced).
//! The first pass waits until the node has caught up with the cluster (a quorum confirmed the commit
//! index, and this replica applied it), so a node restarting from an old state does not remove
//! containers of services it is about to learn it holds.
//!
//! A spec change is detected by the `coyote.spec` label (the hash of the spec): the old container is
//! stopped and removed and a new one created. Before touching a service whose plan creates a
//! container, the executor checks that the image is present, so a spec change to a missing image
//! leaves the old container serving.
//!
//! # Alarms
//!
//! What cannot be done becomes an alarm in the log, keyed so that at most one is open per problem:
//! `docker/NODE` (daemon down or socket missing), and per service `image-missing/NODE/SERVICE`,
//! `port-taken/NODE/SERVICE`, `crash-loop/NODE/SERVICE`, `container/NODE/SERVICE` (any other failure,
//! creating the `coyote` network included). An alarm is raised only when its key is not open in
//! the state, so a problem that lasts is one event, not one per pass; it is cleared (by finding the open
//! alarm with that key in the state) only on positive evidence that it healed: Docker answered, the
//! image is there, the service's actions succeeded or none were needed. A service whose actions fail
//! is retried with exponential backoff ([`BACKOFF_MIN`] to [`BACKOFF_MAX`]); checking that an image has
//! appeared is cheap and happens every pass, so building or loading a missing image heals within one
//! pass. The decisions are pure ([`alarm_events`]); the node keeps running through all of these.
//!
//! Missing images are pulled in the background (one task per image, at most [`PULLS_MAX`] at a time,
//! progress in the log), never inside a pass; a failed pull raises `image-missing` at once and is
//! retried with backoff, so a server without a registry gets a clear alarm, not a hang.
//!
//! A crash loop is counted here, not by Docker (containers have no restart policy, see
//! [`crate::runtime`]): each start of an exited container that should run is a restart; more than
//! [`CRASH_RESTARTS_MAX`] within [`CRASH_WINDOW`] raises `crash-loop` and backs off. It clears once the
//! container has kept running for a whole window.
//!
//! # Handovers
//!
//! An admin's `coyote service switch` asks for a graceful handover (`HandoverRequested`). On the
//! master, each pass first runs the spec's dump command in the service's running container, then
//! releases the service in the [`Fence`] (it is no longer served here, although this node stays
//! master until the switch), so the pass stops the container (the activator stops an on-demand one).
//! Once no container of the service runs here, the pass proposes the switch to the target, which
//! serves a lease plus the drift margin later. A dump that fails raises `dump-failed/NODE/SERVICE`
//! and keeps the container serving; it is tried again after [`BACKOFF_MIN`], and the target takes
//! over by itself when the handover is overdue (see [`crate::monitor`]). A restart in the middle
//! starts the handover again: the dump runs once more.
//!
//! # Left out
//!
//! - An on-demand container's run state: the reconciler creates it and leaves it alone; the
//!   [`crate::activator`] starts it on traffic and stops it when idle or short of memory.
//! - Containers in the engine's transitional states (paused, restarting, dead) are left alone.
//! - Stopping the node leaves its containers as they are (a restart of coyote is not an outage).
//! - Published ports bind every host address; the volume directory is created root-owned, so an image
//!   that runs as another user cannot write `/data` yet.
//! - Moving a service's data between servers: the volume is local to each server.
//! - [`Reconciler`] reads the state and proposes through [`LogNode`] directly; the simulator can drive
//!   [`Executor`] and [`alarm_events`] with its own log, or put the log behind a trait later.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_log::LogNode;
use coyote_state_machine::{ContainerGoal, Event, NodeId, ServiceSpec, State, SwitchCause};

use crate::fence::Fence;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::runtime::{
    ContainerConfig, ContainerRuntime, ObservedContainer, RunState, RuntimeError, Scope, LABEL_CLUSTER,
    LABEL_NODE, LABEL_SERVICE, LABEL_SPEC, NETWORK,
};

/// A pass runs at least this often, to repair drift.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Backoff of a service whose actions failed: doubles from the minimum up to the maximum.
pub const BACKOFF_MIN: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(120);
/// A failed pull is retried after this, doubling up to [`PULL_BACKOFF_MAX`].
pub const PULL_BACKOFF_MIN: Duration = Duration::from_secs(30);
pub const PULL_BACKOFF_MAX: Duration = Duration::from_secs(1800);
/// Image pulls in flight at once.
pub const PULLS_MAX: usize = 2;
/// More restarts than this within the window is a crash loop.
pub const CRASH_RESTARTS_MAX: usize = 3;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// A pass starts this long after what woke it, so that a burst of events is one pass.
pub const PASS_SPACING: Duration = Duration::from_millis(100);
/// Deadline of one attempt to catch up with the cluster before the first pass.
pub const CATCH_UP_ATTEMPT: Duration = Duration::from_secs(5);
/// Deadline of one alarm proposal (a pass does not wait longer for the log).
pub const PROPOSE_ALARM_TIMEOUT: Duration = Duration::from_secs(20);

/// A container this node should have, with the spec it is made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Desired {
    pub service: String,
    pub spec_hash: String,
    pub goal: ContainerGoal,
    pub spec: ServiceSpec,
}

/// The containers `node` should have, from the replicated state.
pub fn desired(state: &State, node: NodeId) -> Vec<Desired> {
    state
        .desired_containers(node)
        .into_iter()
        .filter_map(|d| {
            let spec = state.services.get(&d.service)?.spec.clone();
            Some(Desired { service: d.service, spec_hash: d.spec_hash, goal: d.goal, spec })
        })
        .collect()
}

/// One step toward the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Create the service's container from its current spec, and start it if `start`.
    Create {
        service: String,
        spec_hash: String,
        start: bool,
    },
    Start {
        service: String,
        id: String,
    },
    Stop {
        service: String,
        id: String,
    },
    Remove {
        service: String,
        id: String,
    },
}

impl Action {
    pub fn service(&self) -> &str {
        match self {
            Action::Create { service, .. }
            | Action::Start { service, .. }
            | Action::Stop { service, .. }
            | Action::Remove { service, .. } => service,
        }
    }

    pub fn describe(&self) -> String {
        let short = |id: &str| id.chars().take(12).collect::<String>();
        match self {
            Action::Create { service, spec_hash, start: true } => {
                format!("create and start {service} (spec {})", short(spec_hash))
            }
            Action::Create { service, spec_hash, start: false } => {
                format!("create {service}, stopped (spec {})", short(spec_hash))
            }
            Action::Start { service, id } => format!("start {service} (container {})", short(id)),
            Action::Stop { service, id } => format!("stop {service} (container {})", short(id)),
            Action::Remove { service, id } => format!("remove {service} (container {})", short(id)),
        }
    }
}

/// What to do to go from `observed` to `desired`. Containers of services this node no longer holds go
/// first (so their host ports are free for what follows), then each desired service in order.
pub fn plan(desired: &[Desired], observed: &[ObservedContainer]) -> Vec<Action> {
    let wanted: BTreeSet<&str> = desired.iter().map(|d| d.service.as_str()).collect();
    let mut actions = Vec::new();
    let retire = |o: &ObservedContainer, actions: &mut Vec<Action>| {
        if o.state.is_running() {
            actions.push(Action::Stop { service: o.service.clone(), id: o.id.clone() });
        }
        actions.push(Action::Remove { service: o.service.clone(), id: o.id.clone() });
    };
    for o in observed.iter().filter(|o| !wanted.contains(o.service.as_str())) {
        retire(o, &mut actions);
    }
    for d in desired {
        let mine: Vec<&ObservedContainer> = observed.iter().filter(|o| o.service == d.service).collect();
        // Keep one container with the current spec (a running one if there are several); the rest go.
        let keep = mine
            .iter()
            .filter(|o| o.spec_hash == d.spec_hash)
            .max_by_key(|o| o.state.is_running())
            .map(|o| o.id.clone());
        for o in mine.iter().filter(|o| Some(&o.id) != keep.as_ref()) {
            retire(o, &mut actions);
        }
        let Some(kept) = mine.iter().find(|o| Some(&o.id) == keep.as_ref()) else {
            let start = d.goal == ContainerGoal::Running;
            actions.push(Action::Create {
                service: d.service.clone(),
                spec_hash: d.spec_hash.clone(),
                start,
            });
            continue;
        };
        match (d.goal, kept.state) {
            (ContainerGoal::Running, RunState::Created | RunState::Exited) => {
                actions.push(Action::Start { service: d.service.clone(), id: kept.id.clone() })
            }
            (ContainerGoal::Standby, RunState::Running) => {
                actions.push(Action::Stop { service: d.service.clone(), id: kept.id.clone() })
            }
            // On demand: the activator starts and stops it; the engine's transitional states: wait.
            _ => {}
        }
    }
    actions
}

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
    fn problem(&mut self, key: String, service: Option<&str>, message: String) {
        self.healed.remove(&key);
        self.problems.insert(key, Problem { service: service.map(String::from), message });
    }

    fn heal(&mut self, key: String) {
        if !self.problems.contains_key(&key) {
            self.healed.insert(key);
        }
    }

    fn heal_service(&mut self, node: NodeId, service: &str, kinds: &[ProblemKind]) {
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

/// Exponential backoff of one service.
#[derive(Clone, Debug)]
struct Backoff {
    failures: u32,
    retry_at: Instant,
    /// What the service should be when it failed: when that changes (its spec changed, it was
    /// removed, its goal moved) the new plan is tried at once.
    target: Target,
}

/// What a service should be: its spec and goal, or nothing (its container should go).
type Target = Option<(String, ContainerGoal)>;

fn target(want: Option<&Desired>) -> Target {
    want.map(|d| (d.spec_hash.clone(), d.goal))
}

fn backoff_delay(failures: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    min.saturating_mul(factor).min(max)
}

#[derive(Clone, Debug)]
enum PullState {
    Running,
    Failed { error: String, failures: u32, retry_at: Instant },
}

/// What a pass remembers between passes (lost on restart, on purpose: a restart retries at once).
#[derive(Default)]
struct Memory {
    backoff: HashMap<String, Backoff>,
    restarts: HashMap<String, VecDeque<Instant>>,
    crash_backoff: HashMap<String, CrashBackoff>,
    network_ready: bool,
}

#[derive(Clone, Debug)]
struct CrashBackoff {
    failures: u32,
    retry_at: Instant,
}

/// What `coyote plan` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanView {
    pub node: NodeId,
    pub desired: Vec<DesiredView>,
    pub observed: Vec<ObservedContainer>,
    pub actions: Vec<Action>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DesiredView {
    pub service: String,
    pub goal: ContainerGoal,
    pub spec_hash: String,
    pub image: String,
}

pub struct Settings {
    /// Each service's volume is `volumes/NAME` under this directory (absolute).
    pub volumes: PathBuf,
    /// Pull missing images (else only raise the alarm).
    pub pull: bool,
    /// Deadline of a service's dump command before a handover.
    pub dump_timeout: Duration,
}

/// The running reconciler of one node: the [`Executor`] glued to the log (reads the state, proposes
/// alarm events).
pub struct Reconciler {
    node: LogNode,
    executor: Executor,
    /// When set, a master's container runs only while this server holds its lease (see
    /// [`crate::monitor`]); otherwise it is kept created and stopped, like a failover's.
    fence: Option<Fence>,
    /// Handovers whose dump failed here, by service: when the dump may be tried again.
    dump_retry: Mutex<HashMap<String, Instant>>,
}

impl Reconciler {
    pub fn new(node: LogNode, runtime: Arc<dyn ContainerRuntime>, scope: Scope, settings: Settings) -> Self {
        Reconciler {
            node,
            executor: Executor::new(runtime, scope, settings),
            fence: None,
            dump_retry: Default::default(),
        }
    }

    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    /// What this node should run now: the log's view, with masters fenced by the lease.
    fn desired_now(&self) -> Vec<Desired> {
        let node = self.executor.scope.node_id;
        let mut wanted = self.node.store().with_state(|s| desired(s, node));
        if let Some(fence) = &self.fence {
            for d in &mut wanted {
                if d.goal == ContainerGoal::Running && !fence.serving(&d.service) {
                    d.goal = ContainerGoal::Standby;
                }
            }
        }
        wanted
    }

    fn actor(&self) -> String {
        format!("reconciler@node:{}", self.executor.scope.node_id)
    }

    /// What this node would do now, without doing it.
    pub async fn plan_now(&self) -> Result<PlanView, RuntimeError> {
        let node = self.executor.scope.node_id;
        let desired = self.desired_now();
        let observed = self.executor.runtime.list().await?;
        let actions = plan(&desired, &observed);
        let desired = desired
            .into_iter()
            .map(|d| DesiredView {
                service: d.service,
                goal: d.goal,
                spec_hash: d.spec_hash,
                image: d.spec.image,
            })
            .collect();
        Ok(PlanView { node, desired, observed, actions })
    }

    /// Runs passes on every applied-index change and every [`RESYNC_INTERVAL`] until `shutdown`.
    ///
    /// The first pass waits until this node has caught up with the cluster (a quorum confirmed the
    /// leader's commit index and this replica applied it): a node restarting from an old snapshot
    /// would otherwise remove the containers of services it learns about a moment later.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            _ = self.catch_up() => {}
        }
        let mut applied = self.node.store().subscribe();
        let mut serving = match &self.fence {
            Some(f) => f.subscribe(),
            None => tokio::sync::watch::channel(Default::default()).1,
        };
        let mut tick = tokio::time::interval(RESYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                changed = applied.changed() => if changed.is_err() { return },
                // A lease gained or lost: start or stop at once, not at the next resync.
                Ok(()) = serving.changed() => {}
                _ = tick.tick() => {}
                _ = self.executor.wake.notified() => {}
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = async {
                    // A burst of events is one pass, not one pass per event.
                    tokio::time::sleep(PASS_SPACING).await;
                    applied.borrow_and_update();
                    self.pass().await
                } => {}
            }
        }
    }

    async fn catch_up(&self) {
        let mut logged = false;
        loop {
            match self.node.confirm_quorum(CATCH_UP_ATTEMPT).await {
                Ok(index) => {
                    tracing::info!(index, "reconciler caught up with the cluster; converging containers");
                    return;
                }
                Err(e) if !logged => {
                    logged = true;
                    tracing::warn!("reconciler waits for a quorum before touching containers: {e}");
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One pass: derive, plan, act, and propose the alarm events that follow. Handovers asked of
    /// this node are begun before (dump, release) and finished after (the switch, once stopped).
    pub async fn pass(&self) {
        let node = self.executor.scope.node_id;
        self.begin_handovers().await;
        let desired = self.desired_now();
        let report = self.executor.converge(&desired).await;
        let events = self.node.store().with_state(|s| alarm_events(s, node, &report));
        for event in events {
            self.propose(event).await;
        }
        self.finish_handovers().await;
    }

    async fn propose(&self, event: Event) {
        let summary = event.summary();
        match tokio::time::timeout(PROPOSE_ALARM_TIMEOUT, self.node.propose(event, self.actor())).await {
            Ok(Ok(_)) => tracing::info!("{summary}"),
            Ok(Err(e)) => tracing::warn!("could not record \"{summary}\": {e}"),
            Err(_) => tracing::warn!("could not record \"{summary}\": the log did not answer in time"),
        }
    }

    /// The handovers asked of this node, as master: service, target, dump command.
    fn handovers_asked(&self) -> Vec<(String, NodeId, Option<Vec<String>>)> {
        let me = self.executor.scope.node_id;
        self.node.store().with_state(|s| {
            s.handovers
                .iter()
                .filter(|(_, h)| h.from == me)
                .map(|(name, h)| {
                    (name.clone(), h.to, s.services.get(name).and_then(|svc| svc.spec.dump.clone()))
                })
                .collect()
        })
    }

    /// For each handover asked of this node and not yet released: runs the spec's dump command in
    /// the service's running container (if it has one and the container runs), then releases the
    /// service in the fence, so that it is stopped (by this pass, or by the activator for an
    /// on-demand service) and never started again here. A dump that fails raises
    /// `dump-failed/NODE/SERVICE`, keeps the container serving, and is tried again after a backoff;
    /// the target takes over by itself when the handover is overdue (`HANDOVER_WAIT_MS`).
    async fn begin_handovers(&self) {
        let Some(fence) = &self.fence else { return };
        let me = self.executor.scope.node_id;
        let asked: Vec<_> =
            self.handovers_asked().into_iter().filter(|(name, ..)| !fence.released(name)).collect();
        self.dump_retry
            .lock()
            .expect("dump retry lock")
            .retain(|name, _| asked.iter().any(|(n, ..)| n == name));
        if asked.is_empty() {
            return;
        }
        let observed = match self.executor.runtime.list().await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!("handover: cannot list containers: {e}");
                return;
            }
        };
        for (name, to, dump) in asked {
            let running = observed.iter().find(|c| c.service == name && c.state == RunState::Running);
            if let (Some(argv), Some(c)) = (&dump, running) {
                let retry_at = self.dump_retry.lock().expect("dump retry lock").get(&name).copied();
                if retry_at.is_some_and(|at| Instant::now() < at) {
                    continue;
                }
                tracing::info!(service = name, to, "handover: running the dump command");
                let dumped = crate::activator::run_dump(
                    self.executor.runtime.as_ref(),
                    &c.id,
                    argv,
                    self.executor.settings.dump_timeout,
                )
                .await;
                let event = match &dumped {
                    Ok(()) => self.node.store().with_state(|s| {
                        crate::activator::dump_alarm_cleared(s, me, &name, "the dump command succeeded")
                    }),
                    Err(problem) => {
                        self.dump_retry
                            .lock()
                            .expect("dump retry lock")
                            .insert(name.clone(), Instant::now() + BACKOFF_MIN);
                        let message = format!(
                            "the dump command of {name} failed before its handover to node {to}: {problem}; it keeps running here, next try in {} s",
                            BACKOFF_MIN.as_secs()
                        );
                        tracing::warn!("{message}");
                        self.node
                            .store()
                            .with_state(|s| crate::activator::dump_alarm_raised(s, me, &name, message))
                    }
                };
                if let Some(event) = event {
                    self.propose(event).await;
                }
                if dumped.is_err() {
                    continue;
                }
            }
            tracing::info!(
                service = name,
                to,
                "handover: released here; the container stops, then the switch follows"
            );
            fence.release(&name);
        }
    }

    /// For each released handover whose container no longer runs here: proposes the switch to the
    /// target, which serves a lease plus the drift margin later, as after any switch.
    async fn finish_handovers(&self) {
        let Some(fence) = &self.fence else { return };
        let me = self.executor.scope.node_id;
        let released: Vec<_> =
            self.handovers_asked().into_iter().filter(|(name, ..)| fence.released(name)).collect();
        if released.is_empty() {
            return;
        }
        let Ok(observed) = self.executor.runtime.list().await else { return };
        for (name, to, dump) in released {
            // An on-demand container is the activator's to stop (it does so as the fence releases
            // it); stopping it here as well is harmless and does not leave the switch to the next pass.
            let mut stopped = true;
            for c in observed.iter().filter(|c| c.service == name && c.state == RunState::Running) {
                if let Err(e) = self.executor.runtime.stop(&c.id).await {
                    tracing::warn!(service = name, "handover: cannot stop {}: {e}", c.id);
                    stopped = false;
                }
            }
            if !stopped {
                continue;
            }
            let how = if dump.is_some() { "dumped and stopped" } else { "stopped" };
            let reason = format!("handover: node {me} {how} {name}");
            let event = crate::monitor::handover_switch(&name, to, reason, SwitchCause::Handover);
            self.propose(event).await;
        }
    }
}

/// Acts on a container runtime: runs each service's planned actions, remembers failures (backoff,
/// restarts, pulls) between passes, and reports what it found. It knows nothing of the log, so the
/// simulator and the unit tests drive it with their own runtimes.
pub struct Executor {
    runtime: Arc<dyn ContainerRuntime>,
    scope: Scope,
    settings: Settings,
    /// Held for a whole pass, so passes never overlap.
    memory: tokio::sync::Mutex<Memory>,
    /// Pulls in flight or failed, by image. A std mutex: never held across an await.
    pulls: Arc<Mutex<HashMap<String, PullState>>>,
    /// Notified when a pull ends, so the next pass need not wait for the timer.
    wake: Arc<Notify>,
}

impl Executor {
    pub fn new(runtime: Arc<dyn ContainerRuntime>, scope: Scope, settings: Settings) -> Self {
        Executor {
            runtime,
            scope,
            settings,
            memory: Default::default(),
            pulls: Default::default(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Converges the runtime toward `desired`, as far as it can now.
    pub async fn converge(&self, desired: &[Desired]) -> PassReport {
        let node = self.scope.node_id;
        let mut report = PassReport::default();
        let mut memory = self.memory.lock().await;
        let observed = match self.runtime.list().await {
            Ok(o) => o,
            Err(e) => {
                memory.network_ready = false;
                report.problem(docker_key(node), None, e.to_string());
                return report;
            }
        };
        report.heal(docker_key(node));
        report.complete = true;
        let actions = plan(desired, &observed);
        let mut services: BTreeSet<String> = desired.iter().map(|d| d.service.clone()).collect();
        services.extend(observed.iter().map(|o| o.service.clone()));
        report.seen = services.clone();
        // Forget services that are gone, so memory stays bounded by what this node holds.
        memory.backoff.retain(|s, _| services.contains(s));
        memory.restarts.retain(|s, _| services.contains(s));
        memory.crash_backoff.retain(|s, _| services.contains(s));
        let now = Instant::now();
        for service in &services {
            let group: Vec<&Action> = actions.iter().filter(|a| a.service() == service).collect();
            let want = desired.iter().find(|d| d.service == *service);
            if group.is_empty() {
                memory.backoff.remove(service);
                let restarts = memory.restarts.entry(service.clone()).or_default();
                restarts.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
                let mut kinds =
                    vec![ProblemKind::ImageMissing, ProblemKind::PortTaken, ProblemKind::Container];
                if restarts.is_empty() {
                    memory.restarts.remove(service);
                    memory.crash_backoff.remove(service);
                    kinds.push(ProblemKind::CrashLoop);
                }
                report.heal_service(node, service, &kinds);
                continue;
            }
            match self.converge_service(&mut memory, &mut report, service, want, &group, &observed, now).await
            {
                Ok(()) => {}
                Err(e) => {
                    // Docker went away in the middle of the pass: the rest can wait.
                    memory.network_ready = false;
                    report.problem(docker_key(node), None, e.to_string());
                    report.complete = false;
                    return report;
                }
            }
        }
        report
    }

    /// Runs one service's actions. An `Err` means Docker itself is unreachable.
    #[allow(clippy::too_many_arguments)]
    async fn converge_service(
        &self,
        memory: &mut Memory,
        report: &mut PassReport,
        service: &str,
        want: Option<&Desired>,
        group: &[&Action],
        observed: &[ObservedContainer],
        now: Instant,
    ) -> Result<(), RuntimeError> {
        let node = self.scope.node_id;
        let creates = group.iter().any(|a| matches!(a, Action::Create { .. }));
        if let (true, Some(want)) = (creates, want) {
            if !self.runtime.image_present(&want.spec.image).await? {
                if let Some(message) = self.image_missing(&want.spec.image, now) {
                    report.problem(ProblemKind::ImageMissing.key(node, service), Some(service), message);
                }
                return Ok(());
            }
        }
        report.heal(ProblemKind::ImageMissing.key(node, service));
        if let Some(b) = memory.backoff.get(service) {
            if now < b.retry_at && b.target == target(want) {
                return Ok(());
            }
        }
        // A start of a container that ran and stopped is a restart: count them.
        let restarting = group.iter().any(|a| match a {
            Action::Start { id, .. } => observed.iter().any(|o| o.id == *id && o.state == RunState::Exited),
            _ => false,
        });
        if restarting {
            let restarts = memory.restarts.entry(service.to_string()).or_default();
            restarts.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
            if restarts.len() >= CRASH_RESTARTS_MAX {
                let status = observed
                    .iter()
                    .find(|o| o.service == service)
                    .map(|o| o.status.clone())
                    .unwrap_or_default();
                let message = format!(
                    "{service} was restarted {} times within {} s and stopped again ({status}); retrying with backoff",
                    restarts.len(),
                    CRASH_WINDOW.as_secs()
                );
                report.problem(ProblemKind::CrashLoop.key(node, service), Some(service), message);
                // The first time: wait. Then one more start each time the (doubling) backoff runs out.
                let due = match memory.crash_backoff.get_mut(service) {
                    None => {
                        let retry_at = now + backoff_delay(1, BACKOFF_MIN, BACKOFF_MAX);
                        memory
                            .crash_backoff
                            .insert(service.to_string(), CrashBackoff { failures: 1, retry_at });
                        false
                    }
                    Some(b) if now < b.retry_at => false,
                    Some(b) => {
                        b.failures += 1;
                        b.retry_at = now + backoff_delay(b.failures, BACKOFF_MIN, BACKOFF_MAX);
                        true
                    }
                };
                if !due {
                    return Ok(());
                }
            }
            let restarts = memory.restarts.entry(service.to_string()).or_default();
            restarts.push_back(now);
        }
        for action in group {
            if let Err(e) = self.execute(memory, action, want).await {
                let kind = match e {
                    RuntimeError::Unavailable(_) => return Err(e),
                    RuntimeError::ImageMissing(_) => ProblemKind::ImageMissing,
                    RuntimeError::PortTaken(_) => ProblemKind::PortTaken,
                    // The container vanished under us: the next pass sees the new picture.
                    RuntimeError::NotFound(_) => return Ok(()),
                    RuntimeError::Failed(_) => ProblemKind::Container,
                };
                tracing::warn!(service, "{}: {e}", action.describe());
                let message = format!("{}: {e}", action.describe());
                report.problem(kind.key(node, service), Some(service), message);
                Self::fail(memory, service, want, now);
                return Ok(());
            }
            tracing::info!(service, "{}", action.describe());
        }
        memory.backoff.remove(service);
        report.heal_service(node, service, &[ProblemKind::PortTaken, ProblemKind::Container]);
        Ok(())
    }

    fn fail(memory: &mut Memory, service: &str, want: Option<&Desired>, now: Instant) {
        let target = target(want);
        let failures = match memory.backoff.get(service) {
            Some(b) if b.target == target => b.failures + 1,
            _ => 1,
        };
        let retry_at = now + backoff_delay(failures, BACKOFF_MIN, BACKOFF_MAX);
        memory.backoff.insert(service.to_string(), Backoff { failures, retry_at, target });
    }

    async fn execute(
        &self,
        memory: &mut Memory,
        action: &Action,
        want: Option<&Desired>,
    ) -> Result<(), RuntimeError> {
        match action {
            Action::Create { service, start, .. } => {
                let Some(want) = want else {
                    return Err(RuntimeError::Failed(format!("{service} is not desired here")));
                };
                if !memory.network_ready {
                    self.runtime.ensure_network(NETWORK).await?;
                    memory.network_ready = true;
                }
                let config = self.container_config(want)?;
                let id = self.runtime.create(&config).await?;
                if *start {
                    self.runtime.start(&id).await?;
                }
                Ok(())
            }
            Action::Start { id, .. } => self.runtime.start(id).await,
            Action::Stop { id, .. } => self.runtime.stop(id).await,
            Action::Remove { id, .. } => self.runtime.remove(id).await,
        }
    }

    fn container_config(&self, want: &Desired) -> Result<ContainerConfig, RuntimeError> {
        let volume = self.settings.volumes.join(&want.service);
        std::fs::create_dir_all(&volume).map_err(|e| {
            RuntimeError::Failed(format!("cannot create the volume directory {}: {e}", volume.display()))
        })?;
        let labels = BTreeMap::from([
            (LABEL_CLUSTER.to_string(), self.scope.cluster_id.clone()),
            (LABEL_NODE.to_string(), self.scope.node_id.to_string()),
            (LABEL_SERVICE.to_string(), want.service.clone()),
            (LABEL_SPEC.to_string(), want.spec_hash.clone()),
        ]);
        Ok(ContainerConfig {
            name: self.scope.container_name(&want.service),
            image: want.spec.image.clone(),
            labels,
            // An on-demand service's host ports belong to the activator, which forwards to the
            // container's address on the coyote network.
            ports: if want.spec.on_demand { Vec::new() } else { want.spec.ports.clone() },
            memory_bytes: want.spec.memory_bytes,
            volume,
            network: NETWORK.to_string(),
        })
    }

    /// The alarm message for a missing image, or `None` while a pull may still bring it. Starts a pull
    /// in the background when one is due.
    fn image_missing(&self, image: &str, now: Instant) -> Option<String> {
        if !self.settings.pull {
            return Some(format!(
                "image {image} is not on this server and pulling is off; build or load it (docker load) and it will be used"
            ));
        }
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        let failures = match pulls.get(image) {
            Some(PullState::Running) => return None,
            Some(PullState::Failed { error, retry_at, .. }) if now < *retry_at => {
                return Some(format!(
                    "image {image} is not on this server and could not be pulled ({error}); build or load it (docker load) and it will be used"
                ));
            }
            Some(PullState::Failed { failures, .. }) => *failures,
            None => 0,
        };
        let running = pulls.values().filter(|p| matches!(p, PullState::Running)).count();
        if running >= PULLS_MAX {
            return None;
        }
        pulls.insert(image.to_string(), PullState::Running);
        let (runtime, all, wake, image) =
            (self.runtime.clone(), self.pulls.clone(), self.wake.clone(), image.to_string());
        tokio::spawn(async move {
            let result = runtime.pull(&image).await;
            let mut pulls = all.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(()) => {
                    pulls.remove(&image);
                }
                Err(e) => {
                    tracing::warn!(image, "pull failed: {e}");
                    let failures = failures + 1;
                    let retry_at =
                        Instant::now() + backoff_delay(failures, PULL_BACKOFF_MIN, PULL_BACKOFF_MAX);
                    pulls.insert(image, PullState::Failed { error: e.to_string(), failures, retry_at });
                }
            }
            drop(pulls);
            wake.notify_one();
        });
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coyote_state_machine::{Envelope, Proposal};

    fn spec(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            image: "img:1".into(),
            domains: vec![],
            ports: vec![],
            memory_bytes: None,
            on_demand: false,
            dump: None,
            http_check: None,
            zone: None,
        }
    }

    fn want(service: &str, hash: &str, goal: ContainerGoal) -> Desired {
        Desired { service: service.into(), spec_hash: hash.into(), goal, spec: spec(service) }
    }

    fn seen(id: &str, service: &str, hash: &str, state: RunState) -> ObservedContainer {
        ObservedContainer {
            id: id.into(),
            name: format!("coyote-{service}"),
            service: service.into(),
            spec_hash: hash.into(),
            image: "img:1".into(),
            state,
            status: String::new(),
        }
    }

    fn create(service: &str, hash: &str, start: bool) -> Action {
        Action::Create { service: service.into(), spec_hash: hash.into(), start }
    }
    fn start(service: &str, id: &str) -> Action {
        Action::Start { service: service.into(), id: id.into() }
    }
    fn stop(service: &str, id: &str) -> Action {
        Action::Stop { service: service.into(), id: id.into() }
    }
    fn remove(service: &str, id: &str) -> Action {
        Action::Remove { service: service.into(), id: id.into() }
    }

    use ContainerGoal::{OnDemand, Running, Standby};
    use RunState::{Created, Exited, Other, Running as Up};

    #[test]
    fn plan_table() {
        /// Name, desired, observed, expected plan.
        type Case = (&'static str, Vec<Desired>, Vec<ObservedContainer>, Vec<Action>);
        let cases: Vec<Case> = vec![
            ("nothing wanted, nothing there", vec![], vec![], vec![]),
            (
                "missing and should run: create and start",
                vec![want("a", "h1", Running)],
                vec![],
                vec![create("a", "h1", true)],
            ),
            (
                "missing standby: create, stopped",
                vec![want("a", "h1", Standby)],
                vec![],
                vec![create("a", "h1", false)],
            ),
            (
                "missing on demand: create, stopped",
                vec![want("a", "h1", OnDemand)],
                vec![],
                vec![create("a", "h1", false)],
            ),
            (
                "stopped but should run: start",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![start("a", "c1")],
            ),
            (
                "created but should run: start",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Created)],
                vec![start("a", "c1")],
            ),
            (
                "running and should run: nothing",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Up)],
                vec![],
            ),
            (
                "running but standby: stop",
                vec![want("a", "h1", Standby)],
                vec![seen("c1", "a", "h1", Up)],
                vec![stop("a", "c1")],
            ),
            (
                "standby and stopped: nothing",
                vec![want("a", "h1", Standby)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![],
            ),
            (
                "spec differs, stopped: remove and create",
                vec![want("a", "h2", Running)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![remove("a", "c1"), create("a", "h2", true)],
            ),
            (
                "spec differs, running: stop, remove and create",
                vec![want("a", "h2", Running)],
                vec![seen("c1", "a", "h1", Up)],
                vec![stop("a", "c1"), remove("a", "c1"), create("a", "h2", true)],
            ),
            (
                "spec differs, standby: replaced, stopped",
                vec![want("a", "h2", Standby)],
                vec![seen("c1", "a", "h1", Created)],
                vec![remove("a", "c1"), create("a", "h2", false)],
            ),
            (
                "service no longer held, running: stop and remove",
                vec![],
                vec![seen("c1", "gone", "h1", Up)],
                vec![stop("gone", "c1"), remove("gone", "c1")],
            ),
            (
                "service no longer held, stopped: remove",
                vec![],
                vec![seen("c1", "gone", "h1", Exited)],
                vec![remove("gone", "c1")],
            ),
            (
                "on-demand master, exists and stopped: nothing",
                vec![want("a", "h1", OnDemand)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![],
            ),
            (
                "on-demand master, started by the activator: nothing",
                vec![want("a", "h1", OnDemand)],
                vec![seen("c1", "a", "h1", Up)],
                vec![],
            ),
            (
                "busy container (paused, restarting, dead): wait",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Other)],
                vec![],
            ),
            (
                "duplicates: keep the running one with the current spec",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Exited), seen("c2", "a", "h1", Up), seen("c3", "a", "h0", Up)],
                vec![remove("a", "c1"), stop("a", "c3"), remove("a", "c3")],
            ),
            (
                "departing services go first, then the rest in order",
                vec![want("a", "h1", Running), want("b", "h1", Standby)],
                vec![seen("c9", "z", "h1", Up), seen("c2", "b", "h1", Up)],
                vec![stop("z", "c9"), remove("z", "c9"), create("a", "h1", true), stop("b", "c2")],
            ),
        ];
        for (name, desired, observed, expected) in cases {
            assert_eq!(plan(&desired, &observed), expected, "case: {name}");
        }
    }

    #[test]
    fn a_converged_node_plans_nothing_the_second_time() {
        let desired = vec![want("a", "h1", Running), want("b", "h2", Standby), want("c", "h3", OnDemand)];
        let observed =
            vec![seen("1", "a", "h1", Up), seen("2", "b", "h2", Created), seen("3", "c", "h3", Exited)];
        assert!(plan(&desired, &observed).is_empty());
    }

    fn state_with_service(node: NodeId) -> State {
        let mut state = State::default();
        let events = vec![
            Event::ClusterCreated {
                cluster_id: "c".into(),
                node: coyote_state_machine::NodeInfo { id: node, addr: "127.0.0.1:1".into() },
                ca_pin: "p".into(),
            },
            Event::ServiceCreated { spec: spec("a") },
        ];
        for (i, event) in events.into_iter().enumerate() {
            let env = Envelope::new(i as u64 + 1, 1, Proposal { at_ms: 1, actor: "t".into(), event });
            assert!(state.apply(&env).unwrap().is_applied());
        }
        state
    }

    fn apply(state: &mut State, event: Event) {
        let index = state.last_applied + 1;
        let env = Envelope::new(index, 1, Proposal { at_ms: 1, actor: "t".into(), event });
        assert!(state.apply(&env).unwrap().is_applied());
    }

    #[test]
    fn desired_carries_the_spec() {
        let state = state_with_service(1);
        let d = desired(&state, 1);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].spec, spec("a"));
        assert_eq!(d[0].spec_hash, spec("a").hash());
        assert_eq!(d[0].goal, Running);
        assert!(desired(&state, 2).is_empty());
    }

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

    /// A model runtime: containers in a map; images, taken ports, crashing images and an engine that
    /// is down are switches the test flips.
    #[derive(Default)]
    struct Fake(Mutex<FakeState>);

    #[derive(Default)]
    struct FakeState {
        down: bool,
        images: BTreeSet<String>,
        taken_ports: BTreeSet<u16>,
        /// Containers of these images exit right after they start.
        crashing: BTreeSet<String>,
        containers: BTreeMap<String, (ObservedContainer, Vec<u16>)>,
        next_id: u64,
        starts: usize,
    }

    impl Fake {
        fn with(&self, f: impl FnOnce(&mut FakeState)) {
            f(&mut self.0.lock().unwrap())
        }
        fn up(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, RuntimeError> {
            let state = self.0.lock().unwrap();
            if state.down {
                return Err(RuntimeError::Unavailable("Docker is not reachable at /fake.sock".into()));
            }
            Ok(state)
        }
        fn observed(&self) -> Vec<ObservedContainer> {
            self.0.lock().unwrap().containers.values().map(|c| c.0.clone()).collect()
        }
    }

    #[async_trait::async_trait]
    impl ContainerRuntime for Fake {
        async fn list(&self) -> Result<Vec<ObservedContainer>, RuntimeError> {
            let mut state = self.up()?;
            let crashing = state.crashing.clone();
            for (c, _) in state.containers.values_mut() {
                if c.state == RunState::Running && crashing.contains(&c.image) {
                    c.state = RunState::Exited;
                    c.status = "Exited (3) 1 second ago".into();
                }
            }
            Ok(state.containers.values().map(|c| c.0.clone()).collect())
        }
        async fn address(&self, _id: &str) -> Result<Option<std::net::IpAddr>, RuntimeError> {
            Ok(Some(std::net::IpAddr::from([127, 0, 0, 1])))
        }
        async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
            Ok(self.up()?.images.contains(image))
        }
        async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
            Err(RuntimeError::Failed(format!("no registry for {image}")))
        }
        async fn ensure_network(&self, _name: &str) -> Result<(), RuntimeError> {
            self.up().map(|_| ())
        }
        async fn create(&self, config: &ContainerConfig) -> Result<String, RuntimeError> {
            let mut state = self.up()?;
            if !state.images.contains(&config.image) {
                return Err(RuntimeError::ImageMissing(config.image.clone()));
            }
            if state.containers.values().any(|c| c.0.name == config.name) {
                return Err(RuntimeError::Failed(format!("name {} in use", config.name)));
            }
            state.next_id += 1;
            let id = format!("c{}", state.next_id);
            let observed = ObservedContainer {
                id: id.clone(),
                name: config.name.clone(),
                service: config.labels[LABEL_SERVICE].clone(),
                spec_hash: config.labels[LABEL_SPEC].clone(),
                image: config.image.clone(),
                state: RunState::Created,
                status: "Created".into(),
            };
            let ports = config.ports.iter().map(|p| p.host).collect();
            state.containers.insert(id.clone(), (observed, ports));
            Ok(id)
        }
        async fn start(&self, id: &str) -> Result<(), RuntimeError> {
            let mut state = self.up()?;
            let taken = state.taken_ports.clone();
            let Some((c, ports)) = state.containers.get_mut(id) else {
                return Err(RuntimeError::NotFound(format!("no container {id}")));
            };
            if let Some(p) = ports.iter().find(|p| taken.contains(p)) {
                return Err(RuntimeError::PortTaken(format!("0.0.0.0:{p}: address already in use")));
            }
            c.state = RunState::Running;
            state.starts += 1;
            Ok(())
        }
        async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
            let mut state = self.up()?;
            if let Some((c, _)) = state.containers.get_mut(id) {
                c.state = RunState::Exited;
            }
            Ok(())
        }
        async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.up()?.containers.remove(id);
            Ok(())
        }
    }

    struct Rig {
        fake: Arc<Fake>,
        executor: Executor,
        _volumes: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let volumes = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        fake.with(|s| {
            s.images.insert("img:1".into());
        });
        let scope = Scope { cluster_id: "c0".into(), node_id: 1 };
        let settings = Settings {
            volumes: volumes.path().to_path_buf(),
            pull: false,
            dump_timeout: Duration::from_secs(10),
        };
        let executor = Executor::new(fake.clone(), scope, settings);
        Rig { fake, executor, _volumes: volumes }
    }

    fn running(services: &[(&str, &str)]) -> Vec<Desired> {
        services
            .iter()
            .map(|(name, image)| {
                let spec = ServiceSpec { image: image.to_string(), ..spec(name) };
                Desired { service: name.to_string(), spec_hash: spec.hash(), goal: Running, spec }
            })
            .collect()
    }

    #[tokio::test]
    async fn the_executor_converges_and_repairs_drift() {
        let rig = rig();
        let desired = running(&[("a", "img:1")]);
        let report = rig.executor.converge(&desired).await;
        assert!(report.problems.is_empty(), "{report:?}");
        assert!(report.healed.contains(&docker_key(1)));
        let seen = rig.fake.observed();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].state, seen[0].spec_hash.as_str()), (Up, desired[0].spec_hash.as_str()));
        assert!(rig._volumes.path().join("a").is_dir(), "the volume directory is created");

        // Converged: a second pass does nothing.
        rig.executor.converge(&desired).await;
        assert_eq!(rig.fake.0.lock().unwrap().starts, 1);

        // Removed by hand: it comes back.
        rig.fake.with(|s| s.containers.clear());
        rig.executor.converge(&desired).await;
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Up));

        // No longer desired: removed.
        let report = rig.executor.converge(&[]).await;
        assert!(rig.fake.observed().is_empty());
        assert!(report.healed.contains(&ProblemKind::Container.key(1, "a")));
    }

    #[tokio::test]
    async fn a_missing_image_is_reported_until_it_appears_and_keeps_the_old_container() {
        let rig = rig();
        let old = running(&[("a", "img:1")]);
        rig.executor.converge(&old).await;
        let new = running(&[("a", "img:2")]);
        let key = ProblemKind::ImageMissing.key(1, "a");
        let report = rig.executor.converge(&new).await;
        assert!(report.problems[&key].message.contains("img:2"), "{report:?}");
        // The old container still serves.
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Up && c.image == "img:1"));

        rig.fake.with(|s| {
            s.images.insert("img:2".into());
        });
        let report = rig.executor.converge(&new).await;
        assert!(report.healed.contains(&key) && report.problems.is_empty(), "{report:?}");
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Up && c.image == "img:2"));
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_then_backed_off() {
        let rig = rig();
        let mut desired = running(&[("a", "img:1")]);
        desired[0].spec.ports = vec![coyote_state_machine::PortMap { host: 8080, container: 80 }];
        desired[0].spec_hash = desired[0].spec.hash();
        rig.fake.with(|s| {
            s.taken_ports.insert(8080);
        });
        let key = ProblemKind::PortTaken.key(1, "a");
        let report = rig.executor.converge(&desired).await;
        assert!(report.problems[&key].message.contains("8080"), "{report:?}");
        // Within the backoff the same start is not tried again; the alarm is neither raised nor cleared.
        let report = rig.executor.converge(&desired).await;
        assert!(!report.problems.contains_key(&key) && !report.healed.contains(&key), "{report:?}");
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Created));
    }

    #[tokio::test]
    async fn a_crash_loop_is_reported_after_repeated_restarts() {
        let rig = rig();
        rig.fake.with(|s| {
            s.images.insert("crash:1".into());
            s.crashing.insert("crash:1".into());
        });
        let desired = running(&[("a", "crash:1")]);
        let key = ProblemKind::CrashLoop.key(1, "a");
        // Created and started, then restarted CRASH_RESTARTS_MAX times: no alarm yet.
        for _ in 0..=CRASH_RESTARTS_MAX {
            let report = rig.executor.converge(&desired).await;
            assert!(report.problems.is_empty(), "{report:?}");
        }
        assert_eq!(rig.fake.0.lock().unwrap().starts, CRASH_RESTARTS_MAX + 1);
        // It stops once more: a crash loop, and no start until the backoff runs out.
        let report = rig.executor.converge(&desired).await;
        assert!(report.problems[&key].message.contains("Exited (3)"), "{report:?}");
        rig.executor.converge(&desired).await;
        assert_eq!(rig.fake.0.lock().unwrap().starts, CRASH_RESTARTS_MAX + 1);
    }

    #[tokio::test]
    async fn an_engine_that_is_down_is_one_problem_and_touches_nothing() {
        let rig = rig();
        rig.fake.with(|s| s.down = true);
        let report = rig.executor.converge(&running(&[("a", "img:1")])).await;
        assert_eq!(report.problems.keys().collect::<Vec<_>>(), vec!["docker/1"]);
        assert!(!report.complete);
        rig.fake.with(|s| s.down = false);
        let report = rig.executor.converge(&running(&[("a", "img:1")])).await;
        assert!(report.healed.contains("docker/1") && report.complete);
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        assert_eq!(backoff_delay(1, BACKOFF_MIN, BACKOFF_MAX), BACKOFF_MIN);
        assert_eq!(backoff_delay(2, BACKOFF_MIN, BACKOFF_MAX), BACKOFF_MIN * 2);
        assert_eq!(backoff_delay(40, BACKOFF_MIN, BACKOFF_MAX), BACKOFF_MAX);
    }
}
