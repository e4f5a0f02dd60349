//! Backups: each service's data follows its authority.
//!
//! Every node keeps one content-addressed chunk store (`DIR/backups`, see `coyote-data`) for the
//! data of the services it holds a role for, and does three things, each from the log's state:
//!
//! - **Snapshots** (master). Every [`BackupSettings::every`], the master of a service (once it has
//!   restored it) snapshots `volumes/NAME`: a running container is paused (`docker pause`) while the files are
//!   read and cut into chunks (only files changed since the last snapshot are read), then resumed;
//!   the new chunks are compressed and stored after it resumes. The snapshot is proposed as
//!   `SnapshotTaken` at the master's epoch: a master that was deposed meanwhile is refused by the
//!   state machine. A snapshot identical to one already recorded at this epoch is not proposed
//!   again (one recorded at an earlier epoch is: the content is the newest again, after a restore). A service
//!   whose spec has a dump command gets it run first once an hour ([`DUMP_EVERY`]; the snapshot is
//!   then of kind `dump`, consistent by the dump, with no pause), and every time once a pause took
//!   longer than [`BackupSettings::pause_limit`]; a dump that fails falls back to the pause.
//! - **Replication** (failover and backups). A node with a role for a service that does not hold its
//!   newest recorded snapshot fetches it from a holder over the cluster's mutual TLS (the `Data`
//!   gRPC service): first the manifest, then the chunks it lacks, each checked against its hash as
//!   it is stored and synced. Only then does it propose `SnapshotStored`. A failure is proposed as
//!   `BackupFailed` with its reason, once per snapshot and reason.
//! - **A ready copy** (failover). The failover keeps the newest snapshot it holds restored in
//!   `volumes/.NAME.ready-ID`, next to the directory its stopped container would use: each new one
//!   is restored over the previous copy, linking the files that did not change, so it costs what
//!   changed. When it becomes master, the copy of the snapshot it restores is renamed into place.
//! - **Restore before serving** (a new master). A node that became master restores the newest
//!   snapshot some node holds into `volumes/NAME` (fetching what it lacks), moving the directory
//!   that was there aside to `volumes/NAME.stale-EPOCH` (never deleting it), and proposes
//!   `RestoreCompleted`. The fence does not let it serve the service before that event is applied
//!   ([`crate::fence::Fence::with_restore_gate`]), so its container starts on the restored data.
//!   It asks only holders its monitor does not report unreachable. If none answers within
//!   [`BackupSettings::fetch_timeout`] (or none is left to ask), it restores the newest snapshot
//!   it holds itself, or keeps its directory when it holds none, and raises the alarm
//!   `data-behind/SERVICE` naming what it could not get.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_data::{Batch, ChunkId, ChunkStore, Manifest, MetaCache};
use coyote_log::pb;
use coyote_log::LogNode;
use coyote_state_machine::{
    short_id, Consistency, Event, NodeId, Outcome, Role, SnapshotKind, State, Subject,
};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::runtime::{ContainerRuntime, RunState, Scope};

/// How often the master runs a service's dump command before a snapshot (`SnapshotKind::Dump`).
pub const DUMP_EVERY: Duration = Duration::from_secs(3600);

/// How long a rollback waits for the service's container to stop before it tries again.
const ROLLBACK_STOP_WAIT: Duration = Duration::from_secs(60);

/// How long a holder may take to answer for a snapshot's manifest before the next holder is asked.
const HOLDER_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Chunks asked for in one call.
const FETCH_BATCH: usize = 64;

/// Received chunks are made durable (and part of the store) this many at a time.
const PUBLISH_EVERY: usize = 4096;
/// Largest gRPC message of the data service: a manifest of a very large tree, or one chunk.
const MESSAGE_MAX_BYTES: usize = 64 * 1024 * 1024;

/// How a node keeps its services' data.
#[derive(Clone, Debug)]
pub struct BackupSettings {
    /// The chunk store's directory (`DIR/backups`).
    pub root: PathBuf,
    /// Services' data directories (`DIR/volumes`, each service's in `volumes/NAME`).
    pub volumes: PathBuf,
    /// How often a master snapshots each service it serves; zero: never on its own.
    pub every: Duration,
    /// A pause longer than this is reported in the node's log, and the service's later snapshots
    /// are made consistent by its dump command instead (when its spec has one).
    pub pause_limit: Duration,
    /// Deadline of a service's dump command.
    pub dump_timeout: Duration,
    /// Free space the chunk store leaves on its file system: below it, storing is refused.
    pub reserve_bytes: u64,
    /// How long a new master tries to fetch the newest snapshot before it restores what it has.
    pub fetch_timeout: Duration,
    /// How often unreferenced chunks are pruned, and how young a chunk must be to be spared (a
    /// transfer or a snapshot in flight).
    pub prune_every: Duration,
    pub prune_grace: Duration,
    /// Run the chunk store's file work on the calling task instead of tokio's blocking pool. Off in
    /// production; on for the simulator, where work on other threads would make a run
    /// nondeterministic (like the store's `Options::durable`).
    pub inline: bool,
}

impl BackupSettings {
    pub fn new(root: PathBuf, volumes: PathBuf) -> Self {
        BackupSettings {
            root,
            volumes,
            every: Duration::from_secs(60),
            pause_limit: Duration::from_secs(2),
            dump_timeout: Duration::from_secs(120),
            reserve_bytes: 256 << 20,
            fetch_timeout: Duration::from_secs(30),
            prune_every: Duration::from_secs(600),
            prune_grace: Duration::from_secs(600),
            inline: false,
        }
    }
}

/// Why a backup step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Data(#[from] coyote_data::Error),
    #[error("{0}")]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("{0}")]
    Propose(#[from] coyote_log::ProposeError),
    #[error("refused by the log: {0}")]
    Rejected(String),
    #[error("{0}")]
    Fetch(String),
    #[error("{0}")]
    Refused(String),
}

/// What one snapshot did, as `coyote backup now` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TakenView {
    pub service: String,
    pub snapshot: String,
    /// Whether the log recorded it now (false: it equals a snapshot already recorded).
    pub recorded: bool,
    pub consistency: String,
    pub files: u64,
    pub changed_files: u64,
    pub bytes: u64,
    pub new_bytes: u64,
    pub stored_bytes: u64,
    /// How long the container was paused (0 when it was not running).
    pub paused_ms: u64,
}

/// What `coyote backup verify` found.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct VerifyView {
    /// Chunks re-hashed, and those whose bytes no longer match their name (removed).
    pub checked_chunks: u64,
    pub corrupt_chunks: u64,
    /// Snapshots this node holds that are whole.
    pub whole: u64,
    /// Snapshots that lost chunks and were fetched again from another holder.
    pub repaired: Vec<String>,
    /// Snapshots that lost chunks and could not be fetched again (this node no longer holds them).
    pub lost: Vec<String>,
}

/// What `coyote backup restore --into` did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct RestoredCopy {
    pub snapshot: String,
    pub into: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

pub use coyote_wire::PauseStats;

/// The backup part of a node.
pub struct Backups {
    node: LogNode,
    store: Arc<ChunkStore>,
    runtime: Arc<dyn ContainerRuntime>,
    scope: Scope,
    settings: BackupSettings,
    /// Per service: the metadata cache of its last snapshot, and when it was taken.
    caches: tokio::sync::Mutex<HashMap<String, (MetaCache, Option<tokio::time::Instant>)>>,
    /// Failures already proposed, by (service, snapshot): not proposed again with the same reason.
    reported: Mutex<BTreeMap<(String, String), String>>,
    pauses: Mutex<Vec<u64>>,
    /// When chunks were last pruned.
    pruned_at: Mutex<Option<tokio::time::Instant>>,
    /// When each service's dump command last ran before a snapshot.
    dumped_at: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Services whose last pause was longer than the limit: their dump command makes their
    /// snapshots consistent instead, while they have one.
    pause_too_long: Mutex<std::collections::BTreeSet<String>>,
    /// The ready copies on disk, by service: the snapshot each holds. `None` until the volumes
    /// directory was looked at once (copies left by an earlier run are found then).
    ready: Mutex<Option<HashMap<String, String>>>,
}

impl Backups {
    /// Opens the chunk store under `settings.root` (created if missing).
    pub fn open(
        node: LogNode,
        runtime: Arc<dyn ContainerRuntime>,
        scope: Scope,
        settings: BackupSettings,
    ) -> Result<Arc<Self>, BackupError> {
        let store = ChunkStore::open(&settings.root)?.with_reserve(settings.reserve_bytes);
        Ok(Arc::new(Backups {
            node,
            store: Arc::new(store),
            runtime,
            scope,
            settings,
            caches: tokio::sync::Mutex::new(HashMap::new()),
            reported: Mutex::new(BTreeMap::new()),
            pauses: Mutex::new(Vec::new()),
            pruned_at: Mutex::new(None),
            dumped_at: Mutex::new(HashMap::new()),
            pause_too_long: Mutex::new(Default::default()),
            ready: Mutex::new(None),
        }))
    }

    /// The chunk store.
    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// The gRPC service other members fetch chunks from.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        let server = pb::data_server::DataServer::new(DataService {
            store: self.store.clone(),
            inline: self.settings.inline,
            node: self.node.clone(),
        })
        .max_decoding_message_size(MESSAGE_MAX_BYTES)
        .max_encoding_message_size(MESSAGE_MAX_BYTES);
        tonic::service::Routes::new(server)
    }

    fn actor(&self) -> String {
        format!("backups@node:{}", self.node.id())
    }

    /// Restores, replicates and snapshots whenever the applied state changes and every second, until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut applied = self.node.store().subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                changed = applied.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = self.pass() => {}
            }
        }
    }

    /// One look at the state: restores first (a new master waits for it), then replication, then
    /// the snapshots that are due.
    async fn pass(&self) {
        let me = self.node.id();
        let (restores, replicas, masters, failovers) = self.node.store().with_state(|s| {
            let masters: Vec<String> = s.services_where(me, Role::Master).map(String::from).collect();
            let restores = masters
                .iter()
                .filter(|name| s.data.get(*name).is_some_and(|d| !d.restored_at_epoch(me)))
                .cloned()
                .collect::<Vec<_>>();
            let replicas: Vec<String> = s
                .services_where(me, Role::Failover)
                .chain(s.services_where(me, Role::Backup))
                .filter(|name| {
                    s.data
                        .get(*name)
                        .and_then(|d| d.newest_held())
                        .is_some_and(|r| !r.holders.contains_key(&me))
                })
                .map(String::from)
                .collect();
            let failovers: Vec<String> = s.services_where(me, Role::Failover).map(String::from).collect();
            (restores, replicas, masters, failovers)
        });
        for service in restores {
            if let Err(e) = self.restore_before_serving(&service).await {
                tracing::warn!(%service, error = %e, "cannot restore before serving; trying again");
            }
        }
        for service in replicas {
            if let Err(e) = self.replicate(&service).await {
                tracing::warn!(%service, error = %e, "cannot store the newest snapshot");
            }
        }
        self.keep_ready(&failovers).await;
        let prune_due = {
            let mut at = self.pruned_at.lock().expect("prune lock");
            let due = at.is_none_or(|t| t.elapsed() >= self.settings.prune_every);
            if due {
                *at = Some(tokio::time::Instant::now());
            }
            due
        };
        if prune_due {
            match self.prune().await {
                Ok(r) if r.removed > 0 => {
                    tracing::info!(
                        removed = r.removed,
                        bytes = r.removed_bytes,
                        "pruned chunks no snapshot needs"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot prune the backup store"),
            }
        }
        if self.settings.every.is_zero() {
            return;
        }
        for service in masters {
            let due = {
                let caches = self.caches.lock().await;
                caches
                    .get(&service)
                    .and_then(|(_, at)| *at)
                    .is_none_or(|at| at.elapsed() >= self.settings.every)
            };
            // Not only while the fence serves: a master that lost its lease for a while may still
            // have written, and the epoch keeps a deposed master's snapshot out of the log.
            // Nothing to snapshot before the reconciler created the service's volume.
            if due && self.volume(&service).is_dir() {
                let has_dump = self
                    .node
                    .store()
                    .with_state(|s| s.services.get(&service).is_some_and(|svc| svc.spec.dump.is_some()));
                let hourly = has_dump
                    && self
                        .dumped_at
                        .lock()
                        .expect("dump lock")
                        .get(&service)
                        .is_none_or(|at| at.elapsed() >= DUMP_EVERY);
                let kind = if hourly { SnapshotKind::Dump } else { SnapshotKind::Periodic };
                if let Err(e) = self.snapshot(&service, kind).await {
                    tracing::warn!(%service, error = %e, "periodic snapshot failed");
                    self.report_failure(&service, None, &e.to_string()).await;
                }
            }
        }
    }

    fn volume(&self, service: &str) -> PathBuf {
        self.settings.volumes.join(service)
    }

    fn cache_path(&self, service: &str) -> PathBuf {
        self.settings.root.join("caches").join(service)
    }

    /// Takes a snapshot of `service` (this node must be its master and have restored it) and records
    /// it in the log.
    pub async fn snapshot(&self, service: &str, kind: SnapshotKind) -> Result<TakenView, BackupError> {
        let me = self.node.id();
        let (epoch, parent) = self
            .node
            .store()
            .with_state(|s| {
                let ledger = s.data.get(service)?;
                (s.role(service, me) == Some(Role::Master) && ledger.restored_at_epoch(me))
                    .then(|| (ledger.epoch, ledger.newest_held_by(me).map(|r| r.id.clone())))
            })
            .ok_or_else(|| {
                BackupError::Refused(format!(
                "node {me} is not the master of {service} with its data restored: only that node snapshots it"
            ))
            })?;
        let dir = self.volume(service);
        if !dir.is_dir() {
            return Err(BackupError::Refused(format!(
                "{service} has no data directory on node {me} yet ({}): its container was never created here",
                dir.display()
            )));
        }
        let mut caches = self.caches.lock().await;
        let entry = caches
            .entry(service.to_string())
            .or_insert_with(|| (MetaCache::load(self.cache_path(service)), None));
        let container = self.running_container(service).await?;
        let dumped = match &container {
            Some(id) => self.dump_first(service, id, kind).await,
            None => false,
        };
        let store = self.store.clone();
        let cache = std::mem::take(&mut entry.0);
        // A running container not made consistent by its dump is paused while its files are read.
        let paused_id = container.as_deref().filter(|_| !dumped);
        if let Some(id) = paused_id {
            self.runtime.pause(id).await?;
        }
        let started = tokio::time::Instant::now();
        let captured = self
            .blocking(move || Ok::<_, BackupError>((coyote_data::capture(&dir, &cache, &store), cache)))
            .await;
        let mut paused = Duration::ZERO;
        if let Some(id) = paused_id {
            paused = started.elapsed();
            // Resume whatever happened while reading.
            self.runtime.unpause(id).await?;
            self.note_pause(service, paused);
        }
        let (capture, cache) = captured?;
        let consistency = match (&container, dumped) {
            (None, _) => Consistency::Stopped,
            (Some(_), true) => Consistency::Dumped,
            (Some(_), false) => Consistency::Paused,
        };
        let store = self.store.clone();
        let cache_path = self.cache_path(service);
        let (report, cache) = self
            .blocking(move || {
                let mut cache = cache;
                let report = capture?.commit(&store, &mut cache);
                if report.is_ok() {
                    if let Some(parent) = cache_path.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    if let Err(e) = cache.save(&cache_path) {
                        tracing::warn!(error = %e, "cannot save the snapshot's metadata cache");
                    }
                }
                Ok::<_, BackupError>((report, cache))
            })
            .await?;
        entry.0 = cache;
        entry.1 = Some(tokio::time::Instant::now());
        drop(caches);
        let report = report?;
        let snapshot = report.id.to_hex();
        let known = self.node.store().with_state(|s| {
            s.data.get(service).and_then(|d| d.snapshots.get(&snapshot)).is_some_and(|r| r.epoch == epoch)
        });
        let mut view = TakenView {
            service: service.to_string(),
            snapshot: snapshot.clone(),
            recorded: false,
            consistency: consistency.name().to_string(),
            files: report.files,
            changed_files: report.changed_files,
            bytes: report.bytes,
            new_bytes: report.new_bytes,
            stored_bytes: report.stored_bytes,
            paused_ms: paused.as_millis() as u64,
        };
        if known {
            return Ok(view);
        }
        let event = Event::SnapshotTaken {
            service: service.to_string(),
            snapshot,
            parent: parent.filter(|p| *p != view.snapshot),
            node: me,
            epoch,
            kind,
            consistency,
            bytes: report.bytes,
            new_bytes: report.new_bytes,
        };
        self.propose(event).await?;
        view.recorded = true;
        Ok(view)
    }

    /// Runs the service's dump command in its running container `id` when this snapshot is made
    /// consistent by it: an hourly one (`kind` Dump), or any once a pause was too long. Whether it
    /// ran and succeeded; if it failed, the snapshot is taken under a pause instead, with a warning.
    async fn dump_first(&self, service: &str, id: &str, kind: SnapshotKind) -> bool {
        let Some(argv) =
            self.node.store().with_state(|s| s.services.get(service).and_then(|svc| svc.spec.dump.clone()))
        else {
            return false;
        };
        let too_long = self.pause_too_long.lock().expect("pause lock").contains(service);
        if kind != SnapshotKind::Dump && !too_long {
            return false;
        }
        match crate::activator::run_dump(self.runtime.as_ref(), id, &argv, self.settings.dump_timeout).await {
            Ok(()) => {
                self.dumped_at
                    .lock()
                    .expect("dump lock")
                    .insert(service.to_string(), tokio::time::Instant::now());
                true
            }
            Err(problem) => {
                tracing::warn!(%service, "the dump command failed before a snapshot ({problem}); pausing the container instead");
                false
            }
        }
    }

    /// The id of this node's running container of `service`, if it runs.
    async fn running_container(&self, service: &str) -> Result<Option<String>, BackupError> {
        let name = self.scope.container_name(service);
        let containers = self.runtime.list().await?;
        Ok(containers.into_iter().find(|c| c.name == name && c.state == RunState::Running).map(|c| c.id))
    }

    fn note_pause(&self, service: &str, paused: Duration) {
        if paused > self.settings.pause_limit {
            tracing::warn!(
                %service,
                paused_ms = paused.as_millis() as u64,
                limit_ms = self.settings.pause_limit.as_millis() as u64,
                "the container was paused longer than the limit while its files were read; its dump \
                 command (if its spec has one) makes its snapshots consistent from now on"
            );
            self.pause_too_long.lock().expect("pause lock").insert(service.to_string());
        }
        let mut pauses = self.pauses.lock().expect("pauses lock");
        pauses.push(paused.as_millis() as u64);
        let excess = pauses.len().saturating_sub(1024);
        pauses.drain(..excess);
    }

    /// Pause durations of the last snapshots of running containers.
    pub fn pause_stats(&self) -> PauseStats {
        let mut all = self.pauses.lock().expect("pauses lock").clone();
        all.sort_unstable();
        let at = |q: f64| all.get(((all.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
        PauseStats {
            count: all.len() as u64,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: all.last().copied().unwrap_or(0),
        }
    }

    async fn propose(&self, event: Event) -> Result<(), BackupError> {
        let proposed = self.node.propose(event, self.actor()).await?;
        match proposed.outcome {
            Outcome::Applied => Ok(()),
            Outcome::Rejected { reason } => Err(BackupError::Rejected(reason)),
        }
    }

    async fn report_failure(&self, service: &str, snapshot: Option<&str>, reason: &str) {
        let key = (service.to_string(), snapshot.unwrap_or_default().to_string());
        {
            let mut reported = self.reported.lock().expect("reported lock");
            if reported.get(&key).is_some_and(|r| r == reason) {
                return;
            }
            reported.insert(key, reason.to_string());
        }
        let event = Event::BackupFailed {
            service: service.to_string(),
            snapshot: snapshot.map(String::from),
            node: self.node.id(),
            reason: reason.to_string(),
        };
        if let Err(e) = self.propose(event).await {
            tracing::warn!(%service, error = %e, "cannot record a backup failure");
        }
    }

    /// Fetches the newest recorded snapshot of `service` that another node holds, and records that
    /// this node holds it.
    async fn replicate(&self, service: &str) -> Result<(), BackupError> {
        let Some((snapshot, holders)) = self.newest_elsewhere(service) else { return Ok(()) };
        match self.fetch(service, &snapshot, &holders).await {
            Ok(()) => self.record_stored(service, &snapshot).await,
            Err(e) => {
                self.report_failure(service, Some(&snapshot), &e.to_string()).await;
                Err(e)
            }
        }
    }

    /// Records that this node holds `snapshot` (all its chunks are here), unless the log says so
    /// already (this node's replication and `backup verify` may both have fetched it).
    async fn record_stored(&self, service: &str, snapshot: &str) -> Result<(), BackupError> {
        let me = self.node.id();
        let held = || {
            self.node.store().with_state(|s| {
                s.data
                    .get(service)
                    .and_then(|d| d.snapshots.get(snapshot))
                    .is_some_and(|r| r.holders.contains_key(&me))
            })
        };
        if held() {
            return Ok(());
        }
        let event =
            Event::SnapshotStored { service: service.to_string(), snapshot: snapshot.to_string(), node: me };
        match self.propose(event).await {
            Err(
                e @ (BackupError::Rejected(_) | BackupError::Propose(coyote_log::ProposeError::Rejected(_))),
            ) => {
                // Refused by a replica further ahead than this one (the leader), maybe because the
                // other fetch was recorded there already: see whether this one catches up to that.
                for _ in 0..40 {
                    if held() {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e)
            }
            other => other,
        }
    }

    /// The newest snapshot of `service` some node holds, with the addresses of its holders other
    /// than this node (the master first).
    fn newest_elsewhere(&self, service: &str) -> Option<(String, Vec<(NodeId, String)>)> {
        let me = self.node.id();
        self.node.store().with_state(|s| {
            let record = s.data.get(service)?.newest_held()?;
            Some((record.id.clone(), holders_of(s, service, &record.id, me)))
        })
    }

    /// Brings every chunk of `snapshot` into this node's store, from the first of `holders` that
    /// has them all.
    async fn fetch(
        &self,
        service: &str,
        snapshot: &str,
        holders: &[(NodeId, String)],
    ) -> Result<(), BackupError> {
        let id: ChunkId =
            snapshot.parse().map_err(|_| BackupError::Fetch(format!("{snapshot:?} is not a snapshot id")))?;
        if self.complete(&id).await? {
            return Ok(());
        }
        let mut last = format!("no other node holds snapshot {}", short_id(snapshot));
        for (holder, addr) in holders {
            match self.fetch_from(service, &id, addr).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(%service, holder, error = %e, "cannot fetch a snapshot from this holder");
                    last = format!("node {holder}: {e}");
                }
            }
        }
        Err(BackupError::Fetch(last))
    }

    /// Whether the store holds the manifest (its index and parts) and every chunk of snapshot `id`.
    async fn complete(&self, id: &ChunkId) -> Result<bool, BackupError> {
        let store = self.store.clone();
        let id = *id;
        self.blocking(move || {
            if !store.contains(&id) {
                return Ok(false);
            }
            let manifest = match Manifest::load(&store, &id) {
                Ok(manifest) => manifest,
                // A part of the manifest is not here (yet).
                Err(coyote_data::Error::MissingChunk { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            Ok(coyote_data::missing(&store, &manifest).is_empty())
        })
        .await
    }

    async fn fetch_from(&self, service: &str, id: &ChunkId, addr: &str) -> Result<(), BackupError> {
        let channel = self.node.peer(addr)?;
        let mut client = pb::data_client::DataClient::new(channel)
            .max_decoding_message_size(MESSAGE_MAX_BYTES)
            .max_encoding_message_size(MESSAGE_MAX_BYTES);
        if !self.store.contains(id) {
            // A holder that does not answer the manifest promptly is passed over for the next one.
            let batch = tokio::time::timeout(
                HOLDER_ANSWER_TIMEOUT,
                self.fetch_chunks(&mut client, service, &[*id], Batch::default()),
            )
            .await
            .map_err(|_| {
                BackupError::Fetch(format!("no answer within {} s", HOLDER_ANSWER_TIMEOUT.as_secs()))
            })??;
            self.publish(batch).await?;
        }
        // The manifest's parts, then the chunks it names.
        let store = self.store.clone();
        let manifest_id = *id;
        let parts = self
            .blocking(move || {
                let parts = Manifest::parts(&store, &manifest_id)?;
                Ok::<_, BackupError>(parts.into_iter().filter(|p| !store.contains(p)).collect::<Vec<_>>())
            })
            .await?;
        let mut batch = Batch::default();
        for ids in parts.chunks(FETCH_BATCH) {
            batch = self.fetch_chunks(&mut client, service, ids, batch).await?;
        }
        self.publish(batch).await?;
        let store = self.store.clone();
        let missing = self
            .blocking(move || {
                let manifest = Manifest::load(&store, &manifest_id)?;
                Ok::<_, BackupError>(coyote_data::missing(&store, &manifest))
            })
            .await?;
        // Made durable a few thousand chunks at a time: few syncs, and a broken transfer keeps
        // what it published.
        let mut batch = Batch::default();
        for ids in missing.chunks(FETCH_BATCH) {
            batch = self.fetch_chunks(&mut client, service, ids, batch).await?;
            if batch.len() >= PUBLISH_EVERY {
                self.publish(std::mem::take(&mut batch)).await?;
            }
        }
        self.publish(batch).await?;
        if !self.complete(id).await? {
            return Err(BackupError::Fetch("the snapshot is still incomplete after fetching it".into()));
        }
        Ok(())
    }

    /// Fetches chunks `ids` from a holder, checks each and writes it to `batch`, which it returns
    /// (dropped, with its temporary files, on a failure).
    async fn fetch_chunks(
        &self,
        client: &mut pb::data_client::DataClient<tonic::transport::Channel>,
        service: &str,
        ids: &[ChunkId],
        batch: Batch,
    ) -> Result<Batch, BackupError> {
        let request = pb::ChunksRequest {
            service: service.to_string(),
            ids: ids.iter().map(|id| id.as_bytes().to_vec()).collect(),
        };
        let mut stream = client
            .chunks(request)
            .await
            .map_err(|s| BackupError::Fetch(format!("unreachable or refused: {}", s.message())))?
            .into_inner();
        let mut received = 0;
        let mut chunks = Vec::with_capacity(ids.len());
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| BackupError::Fetch(format!("transfer broke: {}", s.message())))?
        {
            let Some(expected) = ids.get(received) else {
                return Err(BackupError::Fetch("the holder sent more chunks than asked for".into()));
            };
            received += 1;
            if chunk.id.as_slice() != expected.as_bytes() {
                return Err(BackupError::Fetch(format!("the holder answered chunk {expected} out of order")));
            }
            if chunk.missing {
                return Err(BackupError::Fetch(format!("the holder lacks chunk {expected}")));
            }
            chunks.push((*expected, chunk.data));
        }
        if received != ids.len() {
            return Err(BackupError::Fetch(format!("the holder sent {received} of {} chunks", ids.len())));
        }
        let store = self.store.clone();
        self.blocking(move || {
            let mut batch = batch;
            for (id, data) in &chunks {
                store.stage_compressed(&mut batch, id, data)?;
            }
            Ok(batch)
        })
        .await
    }

    /// Makes the chunks of `batch` part of the store, durably.
    async fn publish(&self, batch: Batch) -> Result<(), BackupError> {
        let store = self.store.clone();
        self.blocking(move || Ok(store.publish(batch)?)).await
    }

    /// Removes the chunks that no snapshot recorded in the log needs (those retention forgot, those
    /// of removed services, a transfer's leftovers), sparing chunks younger than
    /// [`BackupSettings::prune_grace`].
    pub async fn prune(&self) -> Result<coyote_data::GcReport, BackupError> {
        let keep: Vec<ChunkId> = self.node.store().with_state(|s| {
            s.data.values().flat_map(|d| d.snapshots.keys()).filter_map(|id| id.parse().ok()).collect()
        });
        // Not while a snapshot is between its capture and its commit.
        let _snapshots = self.caches.lock().await;
        let store = self.store.clone();
        let grace = self.settings.prune_grace;
        self.blocking(move || {
            let keep: Vec<ChunkId> = keep.into_iter().filter(|id| store.contains(id)).collect();
            Ok(coyote_data::gc(&store, &keep, grace)?)
        })
        .await
    }

    /// Re-hashes every chunk this node holds. A snapshot of `service` (or of any service) this node
    /// holds that lost a chunk is recorded as corrupt here, fetched again from another holder and,
    /// once whole, recorded as held again.
    pub async fn verify(&self, service: Option<&str>) -> Result<VerifyView, BackupError> {
        let store = self.store.clone();
        let report = self.blocking(move || Ok(store.verify()?)).await?;
        for id in &report.corrupt {
            let store = self.store.clone();
            let id = *id;
            self.blocking(move || Ok(store.remove(&id)?)).await?;
        }
        let me = self.node.id();
        let held: Vec<(String, String)> = self.node.store().with_state(|s| {
            s.data
                .iter()
                .filter(|(name, _)| service.is_none_or(|wanted| wanted == name.as_str()))
                .flat_map(|(name, d)| {
                    d.snapshots
                        .values()
                        .filter(|r| r.holders.contains_key(&me))
                        .map(move |r| (name.clone(), r.id.clone()))
                })
                .collect()
        });
        let mut view = VerifyView {
            checked_chunks: report.checked,
            corrupt_chunks: report.corrupt.len() as u64,
            ..VerifyView::default()
        };
        for (name, snapshot) in held {
            let Ok(id) = snapshot.parse::<ChunkId>() else { continue };
            if self.complete(&id).await.unwrap_or(false) {
                view.whole += 1;
                continue;
            }
            let reason = format!("{} corrupt chunk(s) found by coyote backup verify", report.corrupt.len());
            let event = Event::SnapshotCorrupt {
                service: name.clone(),
                snapshot: snapshot.clone(),
                node: me,
                reason,
            };
            if let Err(e) = self.propose(event).await {
                tracing::warn!(service = %name, error = %e, "cannot record a corrupt snapshot");
            }
            let holders = self.node.store().with_state(|s| holders_of(s, &name, &snapshot, me));
            match self.fetch(&name, &snapshot, &holders).await {
                Ok(()) => {
                    // This node's replication may have fetched and recorded it first.
                    if let Err(e) = self.record_stored(&name, &snapshot).await {
                        tracing::info!(service = %name, %snapshot, "not recorded by verify: {e}");
                    }
                    view.repaired.push(snapshot);
                }
                Err(e) => {
                    tracing::warn!(service = %name, %snapshot, error = %e, "a corrupt snapshot cannot be fetched again");
                    view.lost.push(snapshot);
                }
            }
        }
        Ok(view)
    }

    /// Restores a snapshot of `service` (by id or the start of one; the newest some node holds when
    /// `None`) into `into`, a directory that must not exist yet; the service itself is untouched.
    pub async fn restore_copy(
        &self,
        service: &str,
        snapshot: Option<&str>,
        into: PathBuf,
    ) -> Result<RestoredCopy, BackupError> {
        if into.exists() {
            return Err(BackupError::Refused(format!(
                "{} exists: restore into a new directory",
                into.display()
            )));
        }
        let id = self.export_source(service, snapshot).await?;
        let store = self.store.clone();
        let target = into.clone();
        let report = self.blocking(move || Ok(coyote_data::restore(&store, &id, &target)?)).await?;
        Ok(RestoredCopy {
            snapshot: id.to_hex(),
            into: into.display().to_string(),
            files: report.files,
            dirs: report.dirs,
            symlinks: report.symlinks,
            bytes: report.bytes,
        })
    }

    /// The snapshot `coyote backup export` streams: `snapshot` (an id or a prefix of one), or the
    /// newest some node holds; fetched into this node's store first when it lacks chunks of it.
    pub async fn export_source(&self, service: &str, snapshot: Option<&str>) -> Result<ChunkId, BackupError> {
        let me = self.node.id();
        let found = self.node.store().with_state(|s| {
            let record = s.data.get(service)?.find(snapshot)?;
            Some((record.id.clone(), holders_of(s, service, &record.id, me)))
        });
        let Some((id, holders)) = found else {
            return Err(BackupError::Refused(match snapshot {
                Some(p) => format!("no single snapshot of {service} has an id starting with {p:?} (see coyote backup list {service})"),
                None => format!("no node holds a snapshot of {service} yet"),
            }));
        };
        self.fetch(service, &id, &holders).await?;
        id.parse().map_err(|_| BackupError::Fetch(format!("{id:?} is not a snapshot id")))
    }

    /// Keeps a ready copy of each of `failovers` (the services this node is the failover of), and
    /// none of any other service.
    async fn keep_ready(&self, failovers: &[String]) {
        let me = self.node.id();
        let known = self.ready.lock().expect("ready lock").clone();
        let known = match known {
            Some(known) => known,
            None => {
                let volumes = self.settings.volumes.clone();
                let found = self.blocking(move || Ok(all_ready_copies(&volumes))).await.unwrap_or_default();
                *self.ready.lock().expect("ready lock") = Some(found.clone());
                found
            }
        };
        let wanted: Vec<(String, String)> = self.node.store().with_state(|s| {
            failovers
                .iter()
                .filter_map(|name| {
                    let newest = s.data.get(name)?.newest_held_by(me)?;
                    Some((name.clone(), newest.id.clone()))
                })
                .collect()
        });
        for (service, newest) in &wanted {
            if known.get(service) == Some(newest) {
                continue;
            }
            match self.make_ready(service, newest).await {
                Ok(true) => self.note_ready(service, Some(newest)),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%service, error = %e, "cannot keep a ready copy of the newest snapshot")
                }
            }
        }
        let stale: Vec<String> = known.keys().filter(|s| !failovers.contains(s)).cloned().collect();
        if stale.is_empty() {
            return;
        }
        let volumes = self.settings.volumes.clone();
        let services = stale.clone();
        let dropped = self
            .blocking(move || {
                for service in &services {
                    for (_, dir) in ready_copies(&volumes, service) {
                        coyote_data::remove_restored(&dir);
                    }
                }
                Ok(())
            })
            .await;
        match dropped {
            Ok(()) => stale.iter().for_each(|s| self.note_ready(s, None)),
            Err(e) => tracing::warn!(error = %e, "cannot drop stale ready copies"),
        }
    }

    fn note_ready(&self, service: &str, snapshot: Option<&str>) {
        let mut ready = self.ready.lock().expect("ready lock");
        let map = ready.get_or_insert_with(HashMap::new);
        match snapshot {
            Some(id) => map.insert(service.to_string(), id.to_string()),
            None => map.remove(service),
        };
    }

    /// Restores snapshot `newest`, which this node holds, into `volumes/.NAME.ready-ID` (over the
    /// previous ready copy), unless it is there already; false when the store lacks some of it.
    async fn make_ready(&self, service: &str, newest: &str) -> Result<bool, BackupError> {
        let newest = newest.to_string();
        let id: ChunkId =
            newest.parse().map_err(|_| BackupError::Fetch(format!("{newest:?} is not a snapshot id")))?;
        if !self.complete(&id).await? {
            return Ok(false);
        }
        let volumes = self.settings.volumes.clone();
        let store = self.store.clone();
        let service = service.to_string();
        self.blocking(move || {
            let ready = ready_copies(&volumes, &service);
            if !ready.iter().any(|(r, _)| *r == newest) {
                let target = volumes.join(format!(".{service}.ready-{newest}"));
                // Not synced now: it is synced once, when it is put to use.
                restore_over_ready(&store, &id, &target, &ready, false)?;
            }
            for (r, dir) in ready {
                if r != newest {
                    coyote_data::remove_restored(&dir);
                }
            }
            Ok(true)
        })
        .await
    }

    /// Restores the newest snapshot into `volumes/NAME` before this node, a new master, serves it;
    /// or, for a rollback an admin asked for, the snapshot asked for, once the container stopped.
    async fn restore_before_serving(&self, service: &str) -> Result<(), BackupError> {
        let rollback = self.node.store().with_state(|s| s.rollbacks.get(service).cloned());
        if let Some(snapshot) = rollback {
            return self.roll_back(service, &snapshot).await;
        }
        let me = self.node.id();
        let Some((epoch, newest, mine)) = self.node.store().with_state(|s| {
            let ledger = s.data.get(service)?;
            // Only holders this node's monitor does not report unreachable: a new master is usually
            // one because the old master is gone, and waiting for it would only delay serving.
            let newest = ledger.newest_held().map(|r| {
                let mut holders = holders_of(s, service, &r.id, me);
                holders.retain(|(n, _)| s.reachable(me, &Subject::Node(*n)));
                (r.id.clone(), holders)
            });
            let mine = ledger.newest_held_by(me).map(|r| r.id.clone());
            Some((ledger.epoch, newest, mine))
        }) else {
            return Ok(());
        };
        let chosen = match newest {
            None => None,
            Some((newest, holders)) => {
                let fetched =
                    tokio::time::timeout(self.settings.fetch_timeout, self.fetch(service, &newest, &holders))
                        .await;
                match fetched {
                    Ok(Ok(())) => Some(newest),
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!(
                                "no holder answered within {} s",
                                self.settings.fetch_timeout.as_secs()
                            ),
                        };
                        let mut fallback = None;
                        if let Some(id) = &mine {
                            if let Ok(cid) = id.parse::<ChunkId>() {
                                if self.complete(&cid).await.unwrap_or(false) {
                                    fallback = Some(id.clone());
                                }
                            }
                        }
                        let message = match &fallback {
                            Some(id) => format!(
                                "node {me} restored snapshot {} of {service}, not the newest {} ({why})",
                                short_id(id),
                                short_id(&newest)
                            ),
                            None => format!(
                                "node {me} serves {service} from its own directory, without the newest snapshot {} ({why})",
                                short_id(&newest)
                            ),
                        };
                        let alarm = Event::AlarmRaised {
                            key: format!("data-behind/{service}"),
                            node: Some(me),
                            service: Some(service.to_string()),
                            message,
                        };
                        if let Err(e) = self.propose(alarm).await {
                            tracing::warn!(%service, error = %e, "cannot raise the data-behind alarm");
                        }
                        fallback
                    }
                }
            }
        };
        #[cfg(feature = "planted-bugs")]
        let chosen_to_restore = chosen.as_ref().filter(|_| !planted::skips_restore());
        #[cfg(not(feature = "planted-bugs"))]
        let chosen_to_restore = chosen.as_ref();
        if let Some(snapshot) = chosen_to_restore {
            let id: ChunkId = snapshot.parse().map_err(|_| BackupError::Fetch("bad id".into()))?;
            let store = self.store.clone();
            let target = self.volume(service);
            self.blocking(move || restore_into(&store, &id, &target, epoch)).await?;
            // The ready copies of the service went into place or away.
            self.note_ready(service, None);
            // The cache described the directory that was moved aside.
            self.caches.lock().await.remove(service);
            let _ = std::fs::remove_file(self.cache_path(service));
        }
        let event =
            Event::RestoreCompleted { service: service.to_string(), snapshot: chosen, node: me, epoch };
        self.propose(event).await
    }
}

impl Backups {
    /// Rolls `service`'s data back to `snapshot` in place: waits until its container has stopped
    /// (its fence stopped serving it at the rollback's epoch), restores the snapshot (the directory
    /// moved aside), records the restore, and snapshots the restored data at once, so that a
    /// failover restores it rather than a snapshot from before the rollback. When the snapshot cannot
    /// be had, the directory stays as it is, the restore is recorded without a snapshot (the service
    /// serves again) and the alarm `restore-failed/SERVICE` says why.
    async fn roll_back(&self, service: &str, snapshot: &str) -> Result<(), BackupError> {
        let me = self.node.id();
        let epoch = self.node.store().with_state(|s| s.data.get(service).map(|d| d.epoch)).unwrap_or(0);
        let deadline = tokio::time::Instant::now() + ROLLBACK_STOP_WAIT;
        while self.running_container(service).await?.is_some() {
            if tokio::time::Instant::now() >= deadline {
                return Err(BackupError::Refused(format!(
                    "the container of {service} is still running {} s after the rollback was asked",
                    ROLLBACK_STOP_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let holders = self.node.store().with_state(|s| holders_of(s, service, snapshot, me));
        let fetched =
            tokio::time::timeout(self.settings.fetch_timeout, self.fetch(service, snapshot, &holders)).await;
        let restored = match fetched {
            Ok(Ok(())) => {
                let id: ChunkId = snapshot.parse().map_err(|_| BackupError::Fetch("bad id".into()))?;
                let store = self.store.clone();
                let target = self.volume(service);
                self.blocking(move || restore_into(&store, &id, &target, epoch))
                    .await
                    .map_err(|e| e.to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no holder answered within {} s", self.settings.fetch_timeout.as_secs())),
        };
        self.note_ready(service, None);
        let chosen = match restored {
            Ok(()) => {
                self.caches.lock().await.remove(service);
                let _ = std::fs::remove_file(self.cache_path(service));
                Some(snapshot.to_string())
            }
            Err(why) => {
                let alarm = Event::AlarmRaised {
                    key: format!("restore-failed/{service}"),
                    node: Some(me),
                    service: Some(service.to_string()),
                    message: format!(
                        "node {me} could not roll {service} back to snapshot {}: {why}; its data is as it was",
                        short_id(snapshot)
                    ),
                };
                if let Err(e) = self.propose(alarm).await {
                    tracing::warn!(%service, error = %e, "cannot raise the restore-failed alarm");
                }
                None
            }
        };
        let done = chosen.is_some();
        let event =
            Event::RestoreCompleted { service: service.to_string(), snapshot: chosen, node: me, epoch };
        self.propose(event).await?;
        if done {
            if let Err(e) = self.snapshot(service, SnapshotKind::Manual).await {
                tracing::warn!(%service, error = %e, "cannot snapshot the rolled-back data");
            }
        }
        Ok(())
    }
}

/// The addresses of the nodes other than `me` that hold `snapshot` of `service`, its master first.
fn holders_of(s: &State, service: &str, snapshot: &str, me: NodeId) -> Vec<(NodeId, String)> {
    let master = s.services.get(service).and_then(|svc| svc.placement.as_ref()).map(|p| p.master);
    let Some(record) = s.data.get(service).and_then(|d| d.snapshots.get(snapshot)) else { return Vec::new() };
    let mut holders: Vec<(NodeId, String)> = record
        .holders
        .keys()
        .filter(|n| **n != me)
        .filter_map(|n| s.members.get(n).map(|m| (*n, m.addr.clone())))
        .collect();
    // Those this node's monitor reports reachable first (a lost master is the likeliest holder of the
    // newest snapshot and the least likely to answer), the master first among them.
    holders.sort_by_key(|(n, _)| (!s.reachable(me, &Subject::Node(*n)), Some(*n) != master));
    holders
}

/// The ready copies of `service` in `volumes`: `.NAME.ready-ID` directories, with their snapshot ids.
fn ready_copies(volumes: &Path, service: &str) -> Vec<(String, PathBuf)> {
    let prefix = format!(".{service}.ready-");
    let Ok(entries) = std::fs::read_dir(volumes) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix(&prefix)?.to_string();
            Some((id, e.path()))
        })
        .collect()
}

/// Every ready copy in `volumes`: service → the snapshot it holds.
fn all_ready_copies(volumes: &Path) -> HashMap<String, String> {
    let Ok(entries) = std::fs::read_dir(volumes) else { return HashMap::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (service, id) = name.strip_prefix('.')?.rsplit_once(".ready-")?;
            Some((service.to_string(), id.to_string()))
        })
        .collect()
}

/// Restores snapshot `id` as the new directory `target`, linking the unchanged files of one of the
/// `ready` copies.
fn restore_over_ready(
    store: &ChunkStore,
    id: &ChunkId,
    target: &Path,
    ready: &[(String, PathBuf)],
    sync: bool,
) -> Result<(), BackupError> {
    let base = ready.iter().find_map(|(r, dir)| {
        let manifest = Manifest::load(store, &r.parse::<ChunkId>().ok()?).ok()?;
        Some((manifest, dir))
    });
    let base = base.as_ref().map(|(manifest, dir)| coyote_data::Base { manifest, dir: dir.as_path() });
    coyote_data::restore_with_base(store, id, target, base, sync)?;
    Ok(())
}

/// Restores snapshot `id` into `target`: the failover's ready copy of it is used as it is; otherwise
/// it is restored into a sibling directory first (over a ready copy of another snapshot, if any).
/// Then the old directory (if any) is moved aside to `NAME.stale-EPOCH` and the restored one renamed
/// into place.
fn restore_into(store: &ChunkStore, id: &ChunkId, target: &Path, epoch: u64) -> Result<(), BackupError> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| BackupError::Refused(format!("{} has no file name", target.display())))?;
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| BackupError::Refused(format!("cannot create {}: {e}", parent.display())))?;
    let ready = ready_copies(parent, &name);
    let staging = match ready.iter().find(|(r, _)| *r == id.to_hex()) {
        Some((_, dir)) => {
            coyote_data::sync_restored(dir)?;
            dir.clone()
        }
        None => {
            let staging = parent.join(format!(".{name}.restoring"));
            if staging.exists() {
                std::fs::remove_dir_all(&staging)
                    .map_err(|e| BackupError::Refused(format!("cannot clear {}: {e}", staging.display())))?;
            }
            restore_over_ready(store, id, &staging, &ready, true)?;
            staging
        }
    };
    if target.exists() {
        let mut aside = parent.join(format!("{name}.stale-{epoch}"));
        let mut n = 1;
        while aside.exists() {
            aside = parent.join(format!("{name}.stale-{epoch}.{n}"));
            n += 1;
        }
        std::fs::rename(target, &aside)
            .map_err(|e| BackupError::Refused(format!("cannot move {} aside: {e}", target.display())))?;
    }
    // A directory the reconciler created meanwhile is empty: rename replaces an empty directory.
    std::fs::rename(&staging, target).map_err(|e| {
        BackupError::Refused(format!("cannot move the restored data into {}: {e}", target.display()))
    })?;
    for (_, dir) in ready_copies(parent, &name) {
        coyote_data::remove_restored(&dir);
    }
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

impl Backups {
    /// Runs blocking store work on tokio's blocking pool, or right here with
    /// [`BackupSettings::inline`].
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
    ) -> Result<T, BackupError> {
        if self.settings.inline {
            return work();
        }
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result,
            Err(e) => Err(BackupError::Refused(format!("the backup task failed: {e}"))),
        }
    }
}

/// The `Data` gRPC service: chunks of this node's store, to members only (a removed server's
/// certificate still holds, so it is refused by the log's record: `LogNode::refusal`).
struct DataService {
    store: Arc<ChunkStore>,
    inline: bool,
    node: LogNode,
}

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<pb::Chunk, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::data_server::Data for DataService {
    type ChunksStream = ChunkStream;

    async fn chunks(
        &self,
        request: tonic::Request<pb::ChunksRequest>,
    ) -> Result<tonic::Response<Self::ChunksStream>, tonic::Status> {
        let Some(peer) = coyote_log::tls::peer_node(&request) else {
            return Err(tonic::Status::unauthenticated("a certificate from this cluster's CA is required"));
        };
        if let Some(refused) = self.node.refusal(peer) {
            return Err(refused);
        }
        let request = request.into_inner();
        if request.ids.len() > FETCH_BATCH * 4 {
            return Err(tonic::Status::invalid_argument(format!(
                "at most {} chunks per call",
                FETCH_BATCH * 4
            )));
        }
        let mut ids = Vec::with_capacity(request.ids.len());
        for raw in &request.ids {
            let bytes: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| tonic::Status::invalid_argument("a chunk id is 32 bytes"))?;
            ids.push(ChunkId(bytes));
        }
        let store = self.store.clone();
        let inline = self.inline;
        let stream = futures::stream::iter(ids).then(move |id| {
            let store = store.clone();
            async move {
                let read = if inline {
                    store.get_compressed(&id)
                } else {
                    tokio::task::spawn_blocking(move || store.get_compressed(&id))
                        .await
                        .map_err(|e| tonic::Status::internal(format!("reading a chunk failed: {e}")))?
                };
                Ok(match read {
                    Ok(data) => pb::Chunk { id: id.as_bytes().to_vec(), data, missing: false },
                    Err(_) => pb::Chunk { id: id.as_bytes().to_vec(), data: Vec::new(), missing: true },
                })
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// Deliberate bugs, for the simulator to show that its checkers catch them. Compiled only with the
/// `planted-bugs` feature, and off until switched on.
#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::{AtomicBool, Ordering};

    static SKIPS_RESTORE: AtomicBool = AtomicBool::new(false);

    /// A new master records its restore (`RestoreCompleted`) without restoring anything: its
    /// container starts on whatever its directory held.
    pub fn skip_restore(on: bool) {
        SKIPS_RESTORE.store(on, Ordering::SeqCst);
    }

    pub(crate) fn skips_restore() -> bool {
        SKIPS_RESTORE.load(Ordering::SeqCst)
    }
}
