//! A member of the cluster's log: the `Raft` instance, its store, its gRPC services, proposals with
//! forwarding to the leader, joins, and the loop that turns joined servers into voters.
//!
//! # Proposals
//! [`LogNode::propose`] validates a command against the local state first (so a user gets a clear
//! reason at once), then writes it through Raft. A node that is not the leader forwards the proposal
//! to the leader over the cluster's mutual TLS; the leader proposes it without forwarding again. While
//! no leader is known (an election is under way) the proposal is retried until [`PROPOSE_TIMEOUT`].
//! A forward is retried only when the leader could not be reached at all or answered that it is no
//! longer the leader, so a proposal is not sent twice because of a slow answer; events that must not
//! be applied twice carry ids that the state machine rejects on a second application anyway.
//!
//! # Group commit
//! On the leader, proposals do not go to Raft one by one. They queue for one batcher task, which
//! writes everything queued so far as one Raft entry (a [`Batch`], at most [`BATCH_MAX`] proposals)
//! and keeps at most [`BATCHES_IN_FLIGHT`] entries in Raft at once. A proposal that arrives while
//! the limit is reached waits in the queue and joins the next entry. So under load one append, one
//! `fsync`, one replication round trip and one apply call serve many proposals, and a lone proposal
//! is written at once without waiting for company. Openraft 0.9 appends each `client_write` on its
//! own and flushes it before the next, so without this the leader writes strictly one proposal per
//! flush. Each proposal of a batch is applied on its own, in order, and gets its own event index and
//! outcome; one that no longer holds is rejected without affecting the others. If the entry cannot
//! be written (this node lost the leadership), every proposal in it gets the same answer and each
//! proposer handles it as before: forward to the new leader, or give up.
//!
//! # Joins
//! A new server calls `Join` with a token's id and secret and a certificate signing request, without
//! a client certificate (it has none yet) but after checking the member's certificate against the CA
//! pin in its token. The member forwards the call to the leader, which proposes `NodeJoined` (the state
//! machine checks the token again when it applies it), signs the CSR with the cluster CA, adds the
//! node as a Raft learner and answers with the certificate and the CA. The membership loop on the
//! leader promotes a learner to voter once it has caught up. Every member holds the CA key, so any
//! member that becomes leader can admit servers; a cluster is one owner's set of servers.
//!
//! # Left out
//! Removing a member from Raft's membership when it leaves is done by the same loop, but there is no
//! CLI command to make a node leave yet.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coyote_state_machine::{Event, NodeInfo, Outcome, Proposal};
use futures::stream::{FuturesUnordered, StreamExt};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::network::{self, decode, encode, require_member, Network, RaftService, MESSAGE_MAX_BYTES};
use crate::store::{LogStore, StateMachineStore, StoreHandle};
use crate::tls::{self, ClusterCa, Identity, Trust};
use crate::token::JoinToken;
use crate::types::{Batch, NodeId, Raft};
use crate::{pb, LogError};

/// How long a proposal may wait for a leader and its commit.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a proposer waits for its own replica to apply what it committed.
pub const READ_YOUR_WRITES_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the leader checks whether joined servers need adding or promoting.
pub const MEMBERSHIP_INTERVAL: Duration = Duration::from_millis(300);
/// A learner is promoted to voter when it is at most this many entries behind the leader.
pub const PROMOTE_LAG_MAX: u64 = 64;
/// Deadline of a reachability ping.
pub const PING_TIMEOUT: Duration = Duration::from_millis(800);
/// A peer that answered a call (a heartbeat, a forwarded proposal, a ping) this recently counts as
/// reachable without a ping of its own: a little more than the default heartbeat interval, so that a
/// leader need not ping the followers its heartbeats reach anyway.
pub const ANSWERED_FRESH: Duration = Duration::from_millis(60);
/// Free space below which a node refuses new proposals, by default: 64 MiB.
pub const DISK_RESERVE_DEFAULT: u64 = 64 << 20;
/// Most proposals in one Raft entry.
pub const BATCH_MAX: usize = 256;
/// Most batches written through Raft at once, per leader; more proposals queue for the next batch.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// Raft timing, log compaction and the disk reserve, with defaults for servers on the same continent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot (for followers that lag a little).
    pub keep_logs: u64,
    /// Refuse new proposals while less than this many bytes are free on the store's file system
    /// (0: never refuse). See [`ProposeError::DiskFull`].
    pub disk_reserve_bytes: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 50,
            election_min_ms: 150,
            election_max_ms: 300,
            snapshot_every: 10_000,
            keep_logs: 1_000,
            disk_reserve_bytes: DISK_RESERVE_DEFAULT,
        }
    }
}

impl RaftSettings {
    fn to_config(&self, cluster_id: &str) -> Result<openraft::Config, LogError> {
        let config = openraft::Config {
            cluster_name: cluster_id.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_logs,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        config.validate().map_err(|e| LogError::Config(e.to_string()))
    }
}

/// A proposal that was committed, with what the state machine made of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proposed {
    /// The event's index in the cluster's history (`coyote events tail`, alarm ids).
    pub index: u64,
    /// The index of the Raft log entry that carried it.
    pub log_index: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    /// The command does not hold against the current state.
    #[error("{0}")]
    Rejected(String),
    #[error("no leader could be reached within {0} s; is a majority of members running?")]
    NoLeader(u64),
    /// Answered by a node that was asked to propose as leader but no longer is.
    #[error("this node is not the leader")]
    NotLeader,
    #[error("the leader could not be reached: {0}")]
    Forward(String),
    /// The connection to the leader broke after the proposal was sent: it may or may not be committed.
    #[error("the connection to the leader broke before it answered ({0}); the event may or may not have been committed: check `coyote events tail`")]
    Uncertain(String),
    /// The disk under this node's store (or the leader's) is below the reserve: nothing was proposed.
    #[error("{0}")]
    DiskFull(String),
    #[error("the log failed: {0}")]
    Fatal(String),
}

/// What `coyote status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub state: String,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The index of the last event this node applied (events are numbered apart from log entries).
    pub last_event: u64,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub members: Vec<MemberStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub addr: String,
    /// `leader`, `voter` or `learner`.
    pub role: String,
    pub reachable: bool,
}

/// Where a node gets the time of day for its proposals' `at_ms`: the system clock in production, the
/// simulated clock in the simulator.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// Milliseconds since the Unix epoch from [`now_ms`].
    pub fn system() -> Self {
        Clock(Arc::new(now_ms))
    }

    /// A clock that reads `now_ms` (milliseconds since the Unix epoch).
    pub fn new(now_ms: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now_ms))
    }

    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// What a node takes from the world outside it, besides its listener: how it dials peers and what
/// time it is. [`Default`] is production: real TCP and the system clock. (Raft's randomness is set per
/// thread, see [`crate::runtime`].)
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub dial: tls::DynDial,
    pub clock: Clock,
}

pub struct LogNodeConfig {
    pub node_id: NodeId,
    pub cluster_id: String,
    /// Address members dial this node at.
    pub addr: String,
    pub raft: RaftSettings,
}

/// One running member of the log. Cheap to clone.
#[derive(Clone)]
pub struct LogNode(Arc<Inner>);

struct Inner {
    id: NodeId,
    cluster_id: String,
    addr: String,
    raft: Raft,
    store: StoreHandle,
    ca: Option<ClusterCa>,
    server_tls: Arc<rustls::ServerConfig>,
    env: Environment,
    /// One channel per peer address, shared with Raft: forwards, pings and replication.
    channels: network::Channels,
    /// The queue of the group-commit batcher (see the module docs).
    batcher: mpsc::UnboundedSender<Queued>,
    /// See [`RaftSettings::disk_reserve_bytes`].
    disk_reserve: u64,
}

/// A proposal waiting for the batcher, with where its answer goes.
struct Queued {
    proposal: Proposal,
    reply: oneshot::Sender<Result<Proposed, WriteError>>,
}

/// Why this node could not write a batch through Raft.
#[derive(Clone, Debug)]
enum WriteError {
    /// This node is not the leader; the leader, if one is known.
    ForwardToLeader(Option<BasicNode>),
    DiskFull(String),
    /// Written while this node led, but its term ended and no answer came (see [`STALE_WRITE_GRACE`]).
    Uncertain(String),
    Fatal(String),
}

/// The batcher task: writes what is queued as Raft entries, at most [`BATCHES_IN_FLIGHT`] at once.
/// Ends when every sender is gone and the queue and the writes in flight are done.
async fn run_batcher(raft: Raft, mut queue: mpsc::UnboundedReceiver<Queued>) {
    let mut waiting: Vec<Queued> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        while in_flight.len() < BATCHES_IN_FLIGHT && !waiting.is_empty() {
            let rest = waiting.split_off(waiting.len().min(BATCH_MAX));
            let batch = std::mem::replace(&mut waiting, rest);
            in_flight.push(write_batch(raft.clone(), batch));
        }
        if !open && waiting.is_empty() && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            received = queue.recv(), if open => match received {
                Some(queued) => {
                    waiting.push(queued);
                    while let Ok(queued) = queue.try_recv() {
                        waiting.push(queued);
                    }
                }
                None => open = false,
            },
        }
    }
}

/// How long a write still waits for its answer after this node's term has ended. Openraft answers a
/// write of a leader that lost its term when the entry is applied (the next leader kept it) or
/// truncated (it did not), but not when a snapshot from the next leader replaced that part of the log:
/// unbounded, such a write would hold one of the [`BATCHES_IN_FLIGHT`] slots for good, and every later
/// proposal through this node would wait behind it.
pub const STALE_WRITE_GRACE: Duration = Duration::from_secs(2);

/// Resolves [`STALE_WRITE_GRACE`] after this node's Raft term moves past the one it is in now.
async fn term_ended(raft: &Raft) {
    let mut metrics = raft.metrics();
    let term = metrics.borrow().current_term;
    if metrics.wait_for(|m| m.current_term != term).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(STALE_WRITE_GRACE).await;
}

/// Writes one batch as one Raft entry and answers each proposer.
async fn write_batch(raft: Raft, batch: Vec<Queued>) {
    let (proposals, replies): (Vec<Proposal>, Vec<_>) =
        batch.into_iter().map(|q| (q.proposal, q.reply)).unzip();
    let count = proposals.len();
    tracing::debug!(target: "coyote_path", count, "client_write");
    let written = tokio::select! {
        written = raft.client_write(Batch(proposals)) => written,
        () = term_ended(&raft) => {
            let e = WriteError::Uncertain(format!(
                "this node's term as leader ended and its write was not answered within {} s; the event may or may not have been committed: check `coyote events tail`",
                STALE_WRITE_GRACE.as_secs()
            ));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let result = match written {
        Ok(response) if response.data.len() == count => Ok(response),
        Ok(response) => Err(WriteError::Fatal(format!(
            "the state machine answered {} outcomes for a batch of {count}",
            response.data.len()
        ))),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
            Err(WriteError::ForwardToLeader(forward.leader_node))
        }
        Err(RaftError::APIError(e)) => Err(WriteError::Fatal(e.to_string())),
        Err(RaftError::Fatal(e)) => Err(WriteError::Fatal(e.to_string())),
    };
    match result {
        Ok(response) => {
            let log_index = response.log_id.index;
            tracing::debug!(target: "coyote_path", log_index, "client_write done");
            for (reply, committed) in replies.into_iter().zip(response.data) {
                let proposed = Proposed { index: committed.index, log_index, outcome: committed.outcome };
                // A proposer that stopped waiting does not need its answer.
                let _ = reply.send(Ok(proposed));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// The system clock, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl LogNode {
    /// Starts a node in the production [`Environment`]: real TCP and the system clock.
    pub async fn start(
        config: LogNodeConfig,
        log: LogStore,
        state_machine: StateMachineStore,
        store: StoreHandle,
        identity: &Identity,
        ca: Option<ClusterCa>,
    ) -> Result<Self, LogError> {
        Self::start_in(config, log, state_machine, store, identity, ca, Environment::default()).await
    }

    /// Starts a node that dials and reads the time through `env` (the simulator's network and clock).
    pub async fn start_in(
        config: LogNodeConfig,
        log: LogStore,
        state_machine: StateMachineStore,
        store: StoreHandle,
        identity: &Identity,
        ca: Option<ClusterCa>,
        env: Environment,
    ) -> Result<Self, LogError> {
        let raft_config = Arc::new(config.raft.to_config(&config.cluster_id)?);
        let (client_tls, server_tls) = tls::member_configs(identity)?;
        let channels = network::Channels::new(client_tls.clone(), env.dial.clone());
        let network = Network::new(channels.clone(), store.durable());
        log.set_node_id(config.node_id);
        let raft = Raft::new(config.node_id, raft_config, network, log, state_machine)
            .await
            .map_err(|e| LogError::Raft(e.to_string()))?;
        let (batcher, queue) = mpsc::unbounded_channel();
        tokio::spawn(run_batcher(raft.clone(), queue));
        Ok(LogNode(Arc::new(Inner {
            id: config.node_id,
            cluster_id: config.cluster_id,
            addr: config.addr,
            raft,
            store,
            ca,
            server_tls,
            env,
            channels,
            batcher,
            disk_reserve: config.raft.disk_reserve_bytes,
        })))
    }

    pub fn id(&self) -> NodeId {
        self.0.id
    }

    pub fn raft(&self) -> &Raft {
        &self.0.raft
    }

    pub fn store(&self) -> &StoreHandle {
        &self.0.store
    }

    pub fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        self.0.server_tls.clone()
    }

    /// The time of day by this node's [`Clock`], in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.0.env.clock.now_ms()
    }

    /// Makes this node the only member of a new cluster and commits `ClusterCreated`.
    pub async fn initialize(&self, ca_pin: String) -> Result<Proposed, LogError> {
        let mut members = BTreeMap::new();
        members.insert(self.0.id, BasicNode::new(&self.0.addr));
        self.0.raft.initialize(members).await.map_err(|e| LogError::Raft(e.to_string()))?;
        let event = Event::ClusterCreated {
            cluster_id: self.0.cluster_id.clone(),
            node: NodeInfo { id: self.0.id, addr: self.0.addr.clone() },
            ca_pin,
        };
        let proposed = self.propose(event, format!("node:{}", self.0.id)).await?;
        Ok(proposed)
    }

    /// Serves Raft and the cluster API on `incoming` until `shutdown` resolves.
    pub async fn serve<S, IO>(&self, incoming: S, shutdown: impl Future<Output = ()>) -> Result<(), LogError>
    where
        S: futures::Stream<Item = std::io::Result<tls::TlsConn<IO>>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_with(incoming, shutdown, tonic::service::Routes::default()).await
    }

    /// [`LogNode::serve`], with the node's other gRPC services (`routes`) on the same listener and
    /// the same mutual TLS.
    pub async fn serve_with<S, IO>(
        &self,
        incoming: S,
        shutdown: impl Future<Output = ()>,
        routes: tonic::service::Routes,
    ) -> Result<(), LogError>
    where
        S: futures::Stream<Item = std::io::Result<tls::TlsConn<IO>>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let refuse: network::Refuse = {
            let node = self.clone();
            Arc::new(move |peer| node.refusal(peer))
        };
        let raft = pb::raft_server::RaftServer::new(RaftService::new(self.0.raft.clone(), refuse))
            .max_decoding_message_size(MESSAGE_MAX_BYTES)
            .max_encoding_message_size(MESSAGE_MAX_BYTES);
        let cluster = pb::cluster_server::ClusterServer::new(ClusterService { node: self.clone() });
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(network::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(network::KEEPALIVE_TIMEOUT))
            .add_routes(routes)
            .add_service(raft)
            .add_service(cluster)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| LogError::Transport(e.to_string()))
    }

    /// The channel to the member at `addr` (mutual TLS; one connection per peer, shared by every
    /// call), for the node's other gRPC services.
    pub fn peer(&self, addr: &str) -> Result<tonic::transport::Channel, ProposeError> {
        self.0
            .channels
            .get(addr)
            .map(|p| p.channel())
            .map_err(|e| ProposeError::Forward(format!("bad address {addr}: {e}")))
    }

    async fn channel(&self, addr: &str) -> Result<network::PeerChannel, ProposeError> {
        self.0.channels.get(addr).map_err(|e| ProposeError::Forward(format!("bad address {addr}: {e}")))
    }

    /// Refuses with [`ProposeError::DiskFull`] while the store's file system has less free space than
    /// the reserve. A node that ran out of space mid-write would stop (openraft treats a failed write
    /// as fatal); refusing early keeps it running, readable, and able to answer why.
    fn check_disk(&self) -> Result<(), ProposeError> {
        if self.0.disk_reserve == 0 {
            return Ok(());
        }
        match self.0.store.free_space() {
            Some(Ok(free)) if free < self.0.disk_reserve => Err(ProposeError::DiskFull(format!(
                "node {} has only {} MiB free on the disk that holds its store (the reserve is {} MiB); \
                 nothing was written: free some space and try again",
                self.0.id,
                free >> 20,
                self.0.disk_reserve >> 20
            ))),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the free space of the store's file system");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Validates and commits an event, forwarding to the leader when needed.
    pub async fn propose(&self, event: Event, actor: String) -> Result<Proposed, ProposeError> {
        self.propose_at(event, actor, self.now_ms()).await
    }

    /// [`LogNode::propose`] with the proposer's clock reading given: for a retried proposal that
    /// reports what was observed at `at_ms` (the monitor's reachability reports).
    pub async fn propose_at(
        &self,
        event: Event,
        actor: String,
        at_ms: u64,
    ) -> Result<Proposed, ProposeError> {
        tracing::debug!(target: "coyote_path", "propose");
        let proposal = Proposal { at_ms, actor, event };
        if self.0.store.with_state(|s| s.validate(&proposal)).is_err() {
            // This node may only lag behind (it just joined, or restarted): catch up with what the
            // quorum has committed, then judge again, so a rejection reflects the cluster's state. A
            // node that has applied nothing yet (not even the cluster's creation) may not know its
            // leader either: it waits, boundedly, until it has caught up.
            let deadline = tokio::time::Instant::now() + READ_YOUR_WRITES_TIMEOUT;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let caught_up = self.confirm_quorum(left).await.is_ok();
                let (valid, created) =
                    self.0.store.with_state(|s| (s.validate(&proposal).is_ok(), s.cluster.is_some()));
                if valid || (caught_up && created) || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.0.store.with_state(|s| s.validate(&proposal)).map_err(|r| ProposeError::Rejected(r.reason))?;
        self.check_disk()?;
        let proposed = self.submit(proposal, true).await?;
        self.wait_applied(proposed.log_index).await;
        tracing::debug!(target: "coyote_path", "propose done");
        Ok(proposed)
    }

    /// Waits (boundedly) until the local replica has applied the log entry at `index`, so that a
    /// caller who proposed through this node reads its own write here, even when the leader is another
    /// node.
    pub async fn wait_applied(&self, index: u64) {
        let mut applied = self.0.store.subscribe();
        let wait = applied.wait_for(|a| *a >= index);
        if tokio::time::timeout(READ_YOUR_WRITES_TIMEOUT, wait).await.is_err() {
            tracing::warn!(index, "the local replica has not applied a committed proposal yet");
        }
    }

    async fn submit(&self, proposal: Proposal, may_forward: bool) -> Result<Proposed, ProposeError> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let leader = match self.write(proposal.clone()).await {
                Ok(proposed) => return Ok(proposed),
                Err(WriteError::ForwardToLeader(leader)) => leader,
                Err(WriteError::DiskFull(e)) => return Err(ProposeError::DiskFull(e)),
                Err(WriteError::Uncertain(e)) => return Err(ProposeError::Uncertain(e)),
                Err(WriteError::Fatal(e)) => return Err(ProposeError::Fatal(e)),
            };
            if !may_forward {
                return Err(ProposeError::NotLeader);
            }
            if let Some(leader) = leader {
                tracing::debug!(node = self.0.id, leader = %leader.addr, "forwarding a proposal to the leader");
                let forwarded = self.forward(&leader.addr, &proposal).await;
                if let Err(e) = &forwarded {
                    tracing::debug!(node = self.0.id, leader = %leader.addr, error = %e, "forwarding failed");
                }
                match forwarded {
                    Ok(done) => return Ok(done),
                    Err(ProposeError::NotLeader) | Err(ProposeError::Forward(_))
                        if tokio::time::Instant::now() < deadline => {}
                    Err(e) => return Err(e),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProposeError::NoLeader(PROPOSE_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes `proposal` through this node's Raft, batched with whatever else is queued.
    async fn write(&self, proposal: Proposal) -> Result<Proposed, WriteError> {
        self.check_disk().map_err(|e| WriteError::DiskFull(e.to_string()))?;
        let (reply, answer) = oneshot::channel();
        let stopped = || WriteError::Fatal("the log is shutting down".to_string());
        self.0.batcher.send(Queued { proposal, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn forward(&self, leader_addr: &str, proposal: &Proposal) -> Result<Proposed, ProposeError> {
        let peer = self.channel(leader_addr).await?;
        let mut client = pb::cluster_client::ClusterClient::new(peer.channel());
        let reply =
            peer.watch(client.propose(pb::Blob { data: encode(proposal) })).await.map_err(|s| {
                match s.code() {
                    tonic::Code::Unavailable => ProposeError::Forward(s.message().to_string()),
                    tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
                        ProposeError::Uncertain(s.message().to_string())
                    }
                    _ => ProposeError::Fatal(format!("forwarding to the leader failed: {}", s.message())),
                }
            })?;
        let result: Result<Proposed, ProposeError> =
            coyote_state_machine::decode(&reply.into_inner().data)
                .map_err(|e| ProposeError::Fatal(format!("malformed reply from the leader: {e}")))?;
        result
    }

    /// The leader's side of a join: admit the server named in `request` if its token holds.
    async fn admit(&self, request: pb::JoinRequest) -> Result<pb::JoinResponse, Status> {
        let ca =
            self.0.ca.as_ref().ok_or_else(|| Status::failed_precondition("this member holds no CA key"))?;
        let node_id = self.0.store.with_state(|s| s.next_node_id());
        let secret_sha256 = coyote_state_machine::sha256_hex(request.secret.as_bytes());
        let event = Event::NodeJoined {
            node: NodeInfo { id: node_id, addr: request.addr.clone() },
            token_id: request.token_id.clone(),
            secret_sha256,
        };
        let proposal = Proposal { at_ms: self.now_ms(), actor: format!("join@node:{}", self.0.id), event };
        self.0
            .store
            .with_state(|s| s.validate(&proposal))
            .map_err(|r| Status::permission_denied(r.reason))?;
        // Sign first: a malformed CSR must not consume the token.
        let cert =
            ca.sign_node(&request.csr_pem, node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let proposed = self.submit(proposal, false).await.map_err(propose_status)?;
        if let Outcome::Rejected { reason } = proposed.outcome {
            return Err(Status::permission_denied(reason));
        }
        if let Err(e) = self.0.raft.add_learner(node_id, BasicNode::new(&request.addr), false).await {
            // The membership loop adds it later; the join itself is committed.
            tracing::warn!(node_id, error = %e, "adding the new node as a learner failed; will retry");
        }
        tracing::info!(node_id, addr = %request.addr, "admitted a new node");
        Ok(pb::JoinResponse {
            node_id,
            cluster_id: self.0.cluster_id.clone(),
            node_cert_pem: cert,
            ca_cert_pem: ca.cert_pem().to_string(),
            ca_key_pem: ca.key_pem().to_string(),
        })
    }

    /// On the leader: add joined servers as learners, promote learners that caught up, drop members
    /// that left. Runs until `shutdown` resolves.
    pub async fn run_membership(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(MEMBERSHIP_INTERVAL) => {}
            }
            if let Err(e) = self.membership_step().await {
                tracing::warn!(error = %e, "membership change failed; will retry");
            }
        }
    }

    async fn membership_step(&self) -> Result<(), LogError> {
        let metrics = self.0.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Ok(());
        }
        let membership = metrics.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return Ok(()); // a change is under way
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: BTreeMap<NodeId, BasicNode> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let members = self.0.store.with_state(|s| s.members.clone());
        let raft_err =
            |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| LogError::Raft(e.to_string());

        for (id, member) in &members {
            if !known.contains_key(id) {
                tracing::info!(node_id = id, "adding joined node as a learner");
                self.0.raft.add_learner(*id, BasicNode::new(&member.addr), false).await.map_err(raft_err)?;
                return Ok(());
            }
        }
        let last = metrics.last_log_index.unwrap_or(0);
        let replication = metrics.replication.unwrap_or_default();
        for id in known.keys().filter(|id| !voters.contains(id) && members.contains_key(id)) {
            let matched = replication.get(id).cloned().flatten().map(|l| l.index).unwrap_or(0);
            if matched + PROMOTE_LAG_MAX >= last {
                tracing::info!(node_id = id, matched, last, "promoting caught-up learner to voter");
                let change = ChangeMembers::AddVoterIds(BTreeSet::from([*id]));
                self.0.raft.change_membership(change, false).await.map_err(raft_err)?;
                return Ok(());
            }
        }
        let gone: BTreeSet<NodeId> = known.keys().filter(|id| !members.contains_key(id)).copied().collect();
        if !gone.is_empty() && !members.is_empty() {
            let gone_voters: BTreeSet<NodeId> = gone.intersection(&voters).copied().collect();
            tracing::info!(?gone, "removing nodes that left from the membership");
            if !gone_voters.is_empty() {
                self.0
                    .raft
                    .change_membership(ChangeMembers::RemoveVoters(gone_voters), false)
                    .await
                    .map_err(raft_err)?;
            } else {
                self.0
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(gone), false)
                    .await
                    .map_err(raft_err)?;
            }
        }
        Ok(())
    }

    /// Raft's view of this node and the membership, with a live reachability check of every member.
    pub async fn status(&self) -> ClusterStatus {
        let m = self.0.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes: Vec<(NodeId, String)> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        let pings = nodes.iter().map(|(id, addr)| async move {
            if *id == self.0.id {
                true
            } else {
                match self.channel(addr).await {
                    Ok(peer) => Self::ping(&peer).await,
                    Err(_) => false,
                }
            }
        });
        let reachable = futures::future::join_all(pings).await;
        let members = nodes
            .into_iter()
            .zip(reachable)
            .map(|((id, addr), reachable)| MemberStatus {
                role: if m.current_leader == Some(id) {
                    "leader"
                } else if voters.contains(&id) {
                    "voter"
                } else {
                    "learner"
                }
                .to_string(),
                id,
                addr,
                reachable,
            })
            .collect();
        ClusterStatus {
            cluster_id: self.0.cluster_id.clone(),
            node_id: self.0.id,
            leader: m.current_leader,
            state: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            last_event: self.0.store.last_event(),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            members,
        }
    }

    /// Confirms that this node is part of a working quorum right now: the leader confirms its
    /// leadership with a quorum and answers its read index; this node then waits (boundedly) until it
    /// has applied that index, so that its view of the state is at least as new as the confirmation.
    /// Returns the read index.
    pub async fn confirm_quorum(&self, timeout: Duration) -> Result<u64, ProposeError> {
        let work = async {
            let index = match self.read_index().await {
                Ok(index) => index,
                Err(ProposeError::NotLeader) => {
                    let leader = self.leader_addr().ok_or(ProposeError::NoLeader(0))?;
                    let peer = self.channel(&leader).await?;
                    let reply = peer
                        .watch(
                            pb::cluster_client::ClusterClient::new(peer.channel())
                                .confirm(pb::Blob { data: Vec::new() }),
                        )
                        .await
                        .map_err(|s| ProposeError::Forward(s.message().to_string()))?;
                    let result: Result<u64, ProposeError> =
                        coyote_state_machine::decode(&reply.into_inner().data).map_err(|e| {
                            ProposeError::Fatal(format!("malformed reply from the leader: {e}"))
                        })?;
                    result?
                }
                Err(e) => return Err(e),
            };
            let mut applied = self.0.store.subscribe();
            applied
                .wait_for(|a| *a >= index)
                .await
                .map_err(|_| ProposeError::Fatal("store closed".into()))?;
            Ok(index)
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| ProposeError::NoLeader(timeout.as_secs()))?
    }

    /// On the leader: confirm leadership with a quorum and answer the read index.
    ///
    /// The confirmation is a quorum's answers to AppendEntries sent after this call began: the
    /// heartbeats every follower gets anyway (every `heartbeat_ms`), whose send times openraft keeps as
    /// the time a quorum last acknowledged the leader. openraft's own `ensure_linearizable` sends a
    /// round of its own to every voter for each call, and the fence of every master asks several times
    /// a second. Why it holds: a voter that accepted an AppendEntries of this term received after the
    /// call began had not voted in a later term before then, so no later leader existed when the call
    /// began, and every entry committed by then is in this leader's log, within the last index it
    /// reports with that acknowledgement. A leader alone in its membership needs no round at all.
    async fn read_index(&self) -> Result<u64, ProposeError> {
        let asked = tokio::time::Instant::now();
        let mut metrics = self.0.raft.metrics();
        let (vote, alone) = {
            let m = metrics.borrow_and_update();
            if m.state != openraft::ServerState::Leader {
                return Err(ProposeError::NotLeader);
            }
            (m.vote, m.membership_config.membership().voter_ids().count() <= 1)
        };
        if alone {
            return self.ensure_linearizable().await;
        }
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.state != openraft::ServerState::Leader || m.vote != vote {
                    return Err(ProposeError::NotLeader);
                }
                // Reported some time before now, so this is no later than the true acknowledgement;
                // the millisecond is for the rounding down of `millis_since_quorum_ack`.
                let acked = m
                    .millis_since_quorum_ack
                    .and_then(|ms| tokio::time::Instant::now().checked_sub(Duration::from_millis(ms + 1)));
                #[cfg(feature = "planted-bugs")]
                if acked.is_some() && crate::store::planted::confirms_from_stale_acks() {
                    return Ok(m.last_log_index.unwrap_or(0));
                }
                if acked.is_some_and(|at| at >= asked) {
                    return Ok(m.last_log_index.unwrap_or(0));
                }
            }
            metrics.changed().await.map_err(|_| ProposeError::Fatal("raft stopped".into()))?;
        }
    }

    async fn ensure_linearizable(&self) -> Result<u64, ProposeError> {
        match self.0.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(ProposeError::NotLeader)
            }
            Err(e) => Err(ProposeError::Forward(e.to_string())),
        }
    }

    fn leader_addr(&self) -> Option<String> {
        let m = self.0.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
    }

    /// Whether the member at `addr` is reachable: it answered a call of this node within
    /// [`ANSWERED_FRESH`], or it answers a ping in time.
    pub async fn ping_peer(&self, addr: &str) -> bool {
        let Ok(peer) = self.channel(addr).await else { return false };
        peer.answered_within(ANSWERED_FRESH) || Self::ping(&peer).await
    }

    /// An empty exchange on one of the peer's replication streams (see [`network`]); a unary call to
    /// a peer that does not know them.
    async fn ping(peer: &network::PeerChannel) -> bool {
        if !peer.stream_less() {
            match peer.exchange(Vec::new(), PING_TIMEOUT).await {
                Ok(_) => return true,
                Err(status) if status.code() == tonic::Code::Unimplemented => {}
                Err(_) => return false,
            }
        }
        let mut client = pb::cluster_client::ClusterClient::new(peer.channel());
        let mut request = Request::new(pb::Blob { data: Vec::new() });
        request.set_timeout(PING_TIMEOUT);
        matches!(tokio::time::timeout(PING_TIMEOUT, peer.watch(client.ping(request))).await, Ok(Ok(_)))
    }

    /// Resolves when Raft on this node has stopped by itself, with the reason: openraft stops a node
    /// whose store failed (a full disk, an I/O error), and a node without Raft can only exit.
    pub async fn stopped(&self) -> String {
        let mut metrics = self.0.raft.metrics();
        while metrics.changed().await.is_ok() {}
        match self.0.raft.ensure_linearizable().await {
            Err(RaftError::Fatal(fatal)) => fatal.to_string(),
            Err(e) => e.to_string(),
            Ok(_) => "raft stopped".to_string(),
        }
    }

    /// Why a call of `peer` is refused although its certificate holds: the log records it as removed
    /// (it left or was removed) and Raft's membership no longer names it. While the membership still
    /// does (the change is under way), Raft carries on with it, so that the change itself commits.
    pub fn refusal(&self, peer: NodeId) -> Option<Status> {
        if !self.0.store.with_state(|s| s.departed.contains(&peer)) {
            return None;
        }
        let m = self.0.raft.metrics().borrow().clone();
        if m.membership_config.membership().get_node(&peer).is_some() {
            return None;
        }
        Some(Status::permission_denied(format!(
            "{} node {peer} was removed from cluster {}: it can no longer take part",
            network::REMOVED_PREFIX,
            self.0.cluster_id
        )))
    }

    /// Becomes `Some(why)` once a member refused this node as removed from the cluster.
    pub fn removed(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.0.channels.removed()
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.0.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }
}

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::Rejected(r) => Status::permission_denied(r),
        ProposeError::NotLeader
        | ProposeError::NoLeader(_)
        | ProposeError::Forward(_)
        | ProposeError::Uncertain(_) => Status::unavailable(e.to_string()),
        ProposeError::DiskFull(_) => Status::resource_exhausted(e.to_string()),
        ProposeError::Fatal(_) => Status::internal(e.to_string()),
    }
}

struct ClusterService {
    node: LogNode,
}

impl ClusterService {
    fn require_member<T>(&self, request: &Request<T>) -> Result<NodeId, Status> {
        let peer = require_member(request)?;
        match self.node.refusal(peer) {
            Some(status) => Err(status),
            None => Ok(peer),
        }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        let m = self.node.0.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return self.node.admit(request).await.map(Response::new);
        }
        let leader = self
            .node
            .leader_addr()
            .ok_or_else(|| Status::unavailable("no leader is known right now; try again in a few seconds"))?;
        let peer = self.node.channel(&leader).await.map_err(propose_status)?;
        peer.watch(pb::cluster_client::ClusterClient::new(peer.channel()).join(request)).await
    }

    async fn propose(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        self.require_member(&request)?;
        let proposal: Proposal = decode(&request.into_inner().data)?;
        let result = self.node.submit(proposal, false).await;
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }

    async fn ping(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        self.require_member(&request)?;
        Ok(Response::new(pb::Blob { data: encode(&self.node.0.id) }))
    }

    async fn confirm(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        self.require_member(&request)?;
        let result = self.node.read_index().await;
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }
}

/// The new server's side of a join: trust the member by the token's CA pin, present the CSR, get a
/// certificate back.
pub async fn request_join(
    token: &JoinToken,
    addr: &str,
    csr_pem: &str,
) -> Result<pb::JoinResponse, LogError> {
    request_join_with(token, addr, csr_pem, &tls::DynDial::tcp()).await
}

/// [`request_join`], dialing the member with `dial`.
pub async fn request_join_with(
    token: &JoinToken,
    addr: &str,
    csr_pem: &str,
    dial: &tls::DynDial,
) -> Result<pb::JoinResponse, LogError> {
    let tls = tls::client_config(None, &Trust::Pin(token.ca_pin.clone()))?;
    let channel = network::channel(&token.addr, tls, dial)
        .map_err(|e| LogError::Join(format!("bad address in token: {e}")))?;
    let mut client = pb::cluster_client::ClusterClient::new(channel);
    let request = pb::JoinRequest {
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        addr: addr.to_string(),
        csr_pem: csr_pem.to_string(),
    };
    let reply = client.join(request).await.map_err(|s| {
        let detail = if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
        match s.code() {
            tonic::Code::PermissionDenied => {
                LogError::Join(format!("the cluster refused the token: {detail}"))
            }
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                LogError::Join(format!("cannot reach the cluster at {}: {detail}", token.addr))
            }
            _ => LogError::Join(detail),
        }
    })?;
    Ok(reply.into_inner())
}
