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
//!
//! # Files
//!
//! - `plan.rs`: the pure plan ([`desired`], [`plan`], [`Action`], [`PlanView`]).
//! - `executor.rs`: the [`Executor`], which acts on a [`ContainerRuntime`] (backoff, crash loops).
//! - `alarms.rs`: what a pass found ([`PassReport`]) and the alarm events it calls for.
//! - `pull.rs`: background pulls of missing images.
//! - `handover.rs`: the graceful handover.
//! - this file: the [`Reconciler`], which glues the executor to the log and runs the passes.

mod alarms;
mod executor;
mod handover;
mod plan;
mod pull;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_log::LogNode;
use coyote_state_machine::{ContainerGoal, Event};
use tokio::time::Instant;

use crate::fence::Fence;
use crate::runtime::{ContainerRuntime, RuntimeError, Scope};

pub use alarms::{alarm_events, docker_key, PassReport, Problem, ProblemKind};
pub use executor::{Executor, BACKOFF_MAX, BACKOFF_MIN, CRASH_RESTARTS_MAX, CRASH_WINDOW};
pub use plan::{desired, plan, Action, Desired, DesiredView, PlanView};
pub use pull::{PULLS_MAX, PULL_BACKOFF_MAX, PULL_BACKOFF_MIN};

/// A pass runs at least this often, to repair drift.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// A pass starts this long after what woke it, so that a burst of events is one pass.
pub const PASS_SPACING: Duration = Duration::from_millis(100);
/// Deadline of one attempt to catch up with the cluster before the first pass.
pub const CATCH_UP_ATTEMPT: Duration = Duration::from_secs(5);
/// Deadline of one alarm proposal (a pass does not wait longer for the log).
pub const PROPOSE_ALARM_TIMEOUT: Duration = Duration::from_secs(20);

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
    /// Passes completed since this node started ([`PlanView::passes`]).
    passes: AtomicU64,
    /// When set, a handover ships a last snapshot, taken after the container stopped, to the target
    /// before the switch (see [`handover`]).
    backups: Option<Arc<crate::backups::Backups>>,
}

impl Reconciler {
    pub fn new(node: LogNode, runtime: Arc<dyn ContainerRuntime>, scope: Scope, settings: Settings) -> Self {
        Reconciler {
            node,
            executor: Executor::new(runtime, scope, settings),
            fence: None,
            dump_retry: Default::default(),
            passes: AtomicU64::new(0),
            backups: None,
        }
    }

    pub fn with_backups(mut self, backups: Option<Arc<crate::backups::Backups>>) -> Self {
        self.backups = backups;
        self
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
        Ok(PlanView { node, desired, observed, actions, passes: self.passes() })
    }

    /// How many passes this reconciler has completed since the node started. A pass that begins
    /// after a moment has looked at the state and containers of that moment, so whoever needs to see
    /// that the reconciler looked (and did nothing) waits until this has grown by 2 past it.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
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
                _ = self.executor.pulls.ended() => {}
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
        self.passes.fetch_add(1, Ordering::Release);
    }

    /// Removes every container of this node (its scope), whatever the state says: for a node that is
    /// no longer a member. Returns whether the runtime could be asked, and every removal succeeded.
    pub async fn remove_all(&self) -> bool {
        let report = self.executor.converge(&[]).await;
        report.complete && report.problems.is_empty()
    }

    async fn propose(&self, event: Event) {
        let summary = event.summary();
        match tokio::time::timeout(PROPOSE_ALARM_TIMEOUT, self.node.propose(event, self.actor())).await {
            Ok(Ok(_)) => tracing::info!("{summary}"),
            Ok(Err(e)) => tracing::warn!("could not record \"{summary}\": {e}"),
            Err(_) => tracing::warn!("could not record \"{summary}\": the log did not answer in time"),
        }
    }
}

/// What the unit tests of this module's files share.
#[cfg(test)]
mod test_support {
    use coyote_state_machine::{Envelope, Event, NodeId, Proposal, ServiceSpec, State};

    pub fn spec(name: &str) -> ServiceSpec {
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
            http_port: None,
            tls_passthrough: false,
            keep: None,
        }
    }

    pub fn state_with_service(node: NodeId) -> State {
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

    pub fn apply(state: &mut State, event: Event) {
        let index = state.last_applied + 1;
        let env = Envelope::new(index, 1, Proposal { at_ms: 1, actor: "t".into(), event });
        assert!(state.apply(&env).unwrap().is_applied());
    }
}
