//! The graceful handover (`coyote service switch`), as the reconciler plays it. On the old master, a
//! pass first runs the spec's dump command in the service's running container and releases the
//! service in the [`Fence`](crate::fence::Fence), so the container stops; once none runs here, it
//! proposes the switch to the target ([`crate::monitor::handover_switch`]). On the target there is
//! nothing special to do: its reconciler starts the container once its fence serves the service
//! (a lease plus the drift margin after the switch), as after any switch, and its monitor takes
//! over by itself when the handover is overdue.
//!
//! With backups, nothing written before the stop is lost: once the container has stopped, the old
//! master takes a last snapshot (kind `handover`, read with nothing running) and proposes the switch
//! only when the log records that the target holds it (and one more node, when the service has
//! another), so the target restores exactly what the container last wrote before it serves.

use coyote_state_machine::{NodeId, SwitchCause};
use tokio::time::Instant;

use super::{Reconciler, BACKOFF_MIN};
use crate::runtime::RunState;

impl Reconciler {
    /// Takes the handover's last snapshot of `service` (the same one again when nothing changed)
    /// and tells whether the target `to`, and one more holder when the placement has another node,
    /// hold it.
    async fn last_snapshot_shipped(
        &self,
        backups: &crate::backups::Backups,
        service: &str,
        to: NodeId,
    ) -> bool {
        let taken = match backups.snapshot(service, coyote_state_machine::SnapshotKind::Handover).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(service, "handover: the last snapshot failed: {e}; trying again");
                return false;
            }
        };
        let me = self.executor.scope.node_id;
        let shipped = self.node.store().with_state(|s| {
            let Some(record) = s.data.get(service).and_then(|d| d.snapshots.get(&taken.snapshot)) else {
                return false;
            };
            let others = s
                .services
                .get(service)
                .and_then(|svc| svc.placement.as_ref())
                .map(|p| p.nodes().filter(|n| *n != me && *n != to && s.members.contains_key(n)).count())
                .unwrap_or(0);
            let extra = record.holders.keys().filter(|n| **n != me && **n != to).count();
            record.holders.contains_key(&to) && (others == 0 || extra > 0)
        });
        if !shipped {
            tracing::info!(service, to, snapshot = %taken.snapshot, "handover: waiting for the target to store the last snapshot");
        }
        shipped
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
    pub(super) async fn begin_handovers(&self) {
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
    pub(super) async fn finish_handovers(&self) {
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
            if let Some(backups) = &self.backups {
                if !self.last_snapshot_shipped(backups, &name, to).await {
                    continue;
                }
            }
            let how = if dump.is_some() { "dumped and stopped" } else { "stopped" };
            let reason = format!("handover: node {me} {how} {name}");
            let event = crate::monitor::handover_switch(&name, to, reason, SwitchCause::Handover);
            self.propose(event).await;
        }
    }
}
