//! The fence: this server's lease, which decides what it may serve. At most one server serves a
//! service at any instant.
//!
//! A master serves only while its lease holds: every [`Fence::renew_every`] it asks the leader to
//! confirm leadership with a quorum (a read index) and applies the log up to that index. (A server
//! that is master of nothing does not ask: it has nothing to fence.) The leader confirms with the
//! answers of a quorum to heartbeats sent after the request reached it, and answers its last log
//! index (`coyote_log::LogNode::confirm_quorum`). The lease
//! runs for `LEASE_MS` from the moment the confirmation was *asked for*, measured on this server's
//! monotonic clock, and only if the state at that index still names this server master. A server that
//! becomes master (by a switch, at start-up, or after a restart) serves only `LEASE_MS +
//! DRIFT_MARGIN_MS` after it first saw itself master in its applied state (the fence notes that as each
//! entry is applied, and starts serving the moment the wait ends), and not before the service's
//! `serve_from_ms` by its wall clock (derived by the state machine from the switch's `at_ms`).
//!
//! Why this gives at most one server serving: let the switch from A to B commit at time `tc`.
//! - Any confirmation A asks for after `tc` returns a read index at or after the switch, so A's state
//!   no longer names A master: the lease is not renewed.
//! - Any confirmation A asked for before `tc` expires at most `LEASE_MS` after `tc` (by A's clock).
//! - B sees the switch at some time `tb >= tc` and serves from `tb + LEASE_MS + DRIFT_MARGIN_MS` (by
//!   B's clock) at the earliest. So A has stopped before B starts, as long as the two clocks' *rates*
//!   differ by less than `DRIFT_MARGIN_MS` over a lease period. Offsets between wall clocks do not
//!   matter: both durations are measured on each server's own monotonic clock.
//!
//! "First saw itself master" counts each switch on its own: the fence keys it by the
//! `serve_from_ms` the switch gave the service, so a server switched away and back between two of its looks at the applied state
//! (or by one snapshot) waits again. A placement cannot change a service's master (the state machine
//! refuses it): authority moves only by a switch.
//!
//! Assumptions: monotonic clocks whose rates differ by less than the margin over `LEASE_MS`; a server
//! stops serving promptly when its lease lapses (the proxy answers 503, containers are stopped); Raft's
//! own safety (one leader per term, committed entries are never lost). A partitioned old master that
//! cannot reach the quorum cannot renew, so it fences itself even though nobody can tell it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_log::LogNode;
use coyote_state_machine::{Role, DRIFT_MARGIN_MS, LEASE_MS};
use tokio::sync::watch;
use tokio::time::Instant;

/// This server's lease and the moments it became master of each service.
#[derive(Clone)]
pub struct Fence {
    node: LogNode,
    inner: Arc<Mutex<FenceState>>,
    /// The services served, republished after every renewal when it changed.
    serving_tx: Arc<watch::Sender<BTreeSet<String>>>,
    /// Serve a service only once its data was restored at the current epoch (a node that keeps
    /// backups, see [`crate::backups`]).
    restore_gate: bool,
}

#[derive(Default)]
struct FenceState {
    /// When the last successful confirmation was asked for.
    confirmed_at: Option<Instant>,
    /// When this server first saw itself master of each service in its applied state, with the
    /// `serve_from_ms` of the switch that made it master then (for a first placement, the service's
    /// creation time, which `ServiceCreated` sets it to).
    master_since: BTreeMap<String, (u64, Instant)>,
    /// Services this server has let go of for a handover under way (dumped, about to stop): not
    /// served any more, although it is still their master until the switch.
    released: BTreeSet<String>,
}

impl FenceState {
    /// Takes in the services this server is master of now (with the `serve_from_ms` of the switch
    /// that made it master) and those of them with a handover under way.
    fn note(&mut self, masters: BTreeMap<String, u64>, handing_over: &BTreeSet<String>, now: Instant) {
        self.master_since.retain(|name, (switch, _)| masters.get(name) == Some(switch));
        self.released.retain(|name| handing_over.contains(name));
        for (name, switch) in masters {
            self.master_since.entry(name).or_insert((switch, now));
        }
    }

    /// The services the fence itself lets this server serve at `now` (the state must also name it
    /// master, see [`Fence::serving`]): while the lease holds, those it has been master of for a lease
    /// plus the drift margin and has not released for a handover.
    fn allowed(&self, now: Instant) -> impl Iterator<Item = &String> + '_ {
        let leased = self.confirmed_at.is_some_and(|at| now < at + Duration::from_millis(LEASE_MS));
        let wait = Duration::from_millis(LEASE_MS + DRIFT_MARGIN_MS);
        self.master_since
            .iter()
            .filter(move |(name, (_, since))| {
                leased && now >= *since + wait && !self.released.contains(*name)
            })
            .map(|(name, _)| name)
    }
}

impl Fence {
    pub fn renew_every() -> Duration {
        Duration::from_millis(LEASE_MS / 4)
    }

    pub fn new(node: LogNode) -> Self {
        Fence {
            node,
            inner: Arc::default(),
            serving_tx: Arc::new(watch::channel(BTreeSet::new()).0),
            restore_gate: false,
        }
    }

    /// Serves a service only once the log records that this server restored its data at the
    /// current epoch (`RestoreCompleted`), so that a new master's container starts on the newest
    /// snapshot, not on whatever its directory held.
    pub fn with_restore_gate(mut self) -> Self {
        self.restore_gate = true;
        self
    }

    /// Whether the state lets `me` serve `service` at `now_ms`: it names `me` master and, with the
    /// restore gate, `me` restored the service's data at its current epoch.
    fn state_allows(&self, s: &coyote_state_machine::State, me: u64, service: &str, now_ms: u64) -> bool {
        s.may_serve(me, service, now_ms)
            && (!self.restore_gate || s.data.get(service).is_some_and(|d| d.restored_at_epoch(me)))
    }

    /// The set of services served, updated within a renewal period of every change.
    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<String>> {
        self.serving_tx.subscribe()
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Self::renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut applied = Some(self.node.store().subscribe());
        loop {
            let settles = self.next_settle();
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = tick.tick() => self.renew().await,
                // A switch that makes this server master counts from the moment it is applied, not
                // from the next renewal.
                changed = async { applied.as_mut().expect("guarded").changed().await }, if applied.is_some() => {
                    if changed.is_err() {
                        applied = None;
                    }
                    self.note_masters();
                }
                // Serving starts the moment the wait after becoming master ends, not at the next tick.
                _ = tokio::time::sleep_until(settles.unwrap_or_else(Instant::now)), if settles.is_some() => {
                    self.publish();
                }
            }
        }
    }

    /// Asks for a confirmation; on success the lease runs from the moment it was asked for. A server
    /// that is master of nothing asks for none: it has nothing to fence, and a confirmation costs a
    /// call to the leader and a wait for its next heartbeats' answers.
    pub async fn renew(&self) {
        if self.masters().is_empty() {
            self.note_masters();
            return;
        }
        let asked = Instant::now();
        let confirmed = self.node.confirm_quorum(Duration::from_millis(LEASE_MS / 2)).await.is_ok();
        if confirmed {
            self.inner.lock().expect("fence lock").confirmed_at = Some(asked);
        }
        self.note_masters();
    }

    /// The services this server is master of, each with the `serve_from_ms` of the switch that made
    /// it master (which tells one term of mastership from the next).
    fn masters(&self) -> BTreeMap<String, u64> {
        let me = self.node.id();
        self.node.store().with_state(|s| {
            s.services_where(me, Role::Master)
                .map(|name| (name.to_string(), s.services.get(name).map_or(0, |svc| svc.serve_from_ms)))
                .collect()
        })
    }

    /// Records when this server first saw itself master of each service (now, for new ones), forgets
    /// the others, and publishes what it serves.
    ///
    /// A server can be switched away from and back to between two looks (the applied state is
    /// sampled, and a snapshot jumps over many entries), never seeing itself not master. The switch
    /// back carries its own `serve_from_ms`, so the wait starts again then. (Two switches of one
    /// service with the same `serve_from_ms` would need their proposers' clocks to differ by the
    /// exact time between them, to the millisecond.)
    fn note_masters(&self) {
        let masters = self.masters();
        let handing_over: BTreeSet<String> = self
            .node
            .store()
            .with_state(|s| s.handovers.keys().filter(|n| masters.contains_key(*n)).cloned().collect());
        self.inner.lock().expect("fence lock").note(masters, &handing_over, Instant::now());
        self.publish();
    }

    /// The next moment a service this server is master of ends its wait, if one is still waiting.
    fn next_settle(&self) -> Option<Instant> {
        let wait = Duration::from_millis(LEASE_MS + DRIFT_MARGIN_MS);
        let now = Instant::now();
        let inner = self.inner.lock().expect("fence lock");
        inner.master_since.values().map(|(_, since)| *since + wait).filter(|at| *at > now).min()
    }

    fn publish(&self) {
        let serving: BTreeSet<String> = self.serving_services().into_iter().collect();
        self.serving_tx.send_if_modified(|current| {
            let changed = *current != serving;
            if changed {
                tracing::info!(?serving, "services served by this node changed");
                *current = serving;
            }
            changed
        });
    }

    /// Stops serving `service` for the handover under way (the reconciler has run its dump): it
    /// stays unserved here until the switch, or until the handover ends otherwise.
    pub fn release(&self, service: &str) {
        self.inner.lock().expect("fence lock").released.insert(service.to_string());
        self.publish();
    }

    /// Whether `service` was released for a handover (see [`Fence::release`]).
    pub fn released(&self, service: &str) -> bool {
        self.inner.lock().expect("fence lock").released.contains(service)
    }

    /// Whether this server may serve `service` now.
    pub fn serving(&self, service: &str) -> bool {
        let inner = self.inner.lock().expect("fence lock");
        let allowed = inner.allowed(Instant::now()).any(|name| name == service);
        drop(inner);
        allowed
            && self
                .node
                .store()
                .with_state(|s| self.state_allows(s, self.node.id(), service, self.node.now_ms()))
    }

    /// Every service this server may serve now: those for which [`Fence::serving`] holds, found with
    /// one look at the fence and one at the state (the simulator asks after every step).
    pub fn serving_services(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("fence lock");
        let mut candidates = inner.allowed(Instant::now()).peekable();
        if candidates.peek().is_none() {
            return Vec::new();
        }
        let (me, now_ms) = (self.node.id(), self.node.now_ms());
        // The fence's lock is held while the state is read; nothing takes them in the other order.
        self.node.store().with_state(|s| {
            candidates.filter(|name| self.state_allows(s, me, name, now_ms)).cloned().collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_back_restarts_the_wait_even_when_the_loss_was_never_seen() {
        let t0 = Instant::now();
        let wait = Duration::from_millis(LEASE_MS + DRIFT_MARGIN_MS);
        let masters = |serve_from: u64| BTreeMap::from([("svc".to_string(), serve_from)]);
        let allowed = |f: &FenceState, at: Instant| f.allowed(at).cloned().collect::<Vec<_>>();
        let mut fence = FenceState { confirmed_at: Some(t0 + wait * 4), ..Default::default() };
        fence.note(masters(0), &BTreeSet::new(), t0);
        fence.note(masters(0), &BTreeSet::new(), t0 + wait);
        // Master since t0: serving once the wait has passed, while the lease holds.
        assert_eq!(allowed(&fence, t0 + wait * 4), vec!["svc".to_string()]);
        // Switched away and back (a new switch, serving from 9000) between two looks: the wait
        // starts again from the look that saw the new switch.
        let back = t0 + wait * 4;
        fence.note(masters(9000), &BTreeSet::new(), back);
        assert!(allowed(&fence, back).is_empty());
        assert!(allowed(&fence, back + wait - Duration::from_millis(1)).is_empty());
        fence.confirmed_at = Some(back + wait);
        assert_eq!(allowed(&fence, back + wait), vec!["svc".to_string()]);
        // Not master any more: forgotten.
        fence.note(BTreeMap::new(), &BTreeSet::new(), back + wait);
        assert!(fence.master_since.is_empty());
    }
}
