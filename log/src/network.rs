//! Raft's RPCs over tonic gRPC: the client side openraft calls (`RaftNetwork`) and the server side that
//! hands incoming RPCs to the local `Raft`.
//!
//! Payloads are openraft's own messages, bincode-encoded inside a protobuf `Blob`: the protobuf schema
//! stays tiny and openraft's types stay the single definition of the protocol. Every channel has HTTP/2
//! keep-alive and every call a deadline, so a peer that vanished (or a partition that silently drops
//! packets) turns into an error instead of a hung call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::pb;
use crate::store::Durable;
use crate::tls;
use crate::types::{Node, NodeId, Raft, TypeConfig};

/// How long connecting plus the TLS handshake to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 keep-alive: ping this often, and drop the connection if a ping is not answered in time.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound on any single RPC that has no deadline of its own.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest gRPC message accepted (snapshot chunks, batches of entries).
pub const MESSAGE_MAX_BYTES: usize = 64 * 1024 * 1024;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    coyote_state_machine::encode(value)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    coyote_state_machine::decode(bytes)
        .map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))
}

/// A lazily connected channel to `addr` over the cluster's TLS, dialed with `dial`.
pub fn channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    dial: &tls::DynDial,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_with_connector_lazy(tls::connector(dial.clone(), tls)))
}

/// One channel (one HTTP/2 connection) per peer address, shared by everything a node sends to that
/// peer: replication, votes, the heartbeats that confirm leadership for a read index, forwarded
/// proposals and pings.
///
/// openraft asks for a new client for every election, every leadership confirmation and every
/// replication stream. With a channel per client, each of those was a new TCP connection and a full
/// mutual-TLS handshake: the fence of every node confirms leadership several times a second, so a
/// five-node cluster did over a hundred handshakes a second while idle.
///
/// A shared connection must not outlive a fault, though: one that lost packets in a partition hangs
/// until HTTP/2 keep-alive gives up on it, and every call to that peer would wait with it. So a call
/// that fails as a dead connection would (unavailable, deadline exceeded, no answer in time) evicts
/// the channel it used ([`PeerChannel::broken`]) if nothing on that channel has succeeded for
/// [`SUSPECT_AFTER`], and the next call dials anew. A slow but live peer keeps answering something
/// (pings, replication) and keeps its connection; a dead peer is redialed at most that often; a fresh
/// channel is not evicted by a late failure on the one it replaced (generations).
#[derive(Clone)]
pub struct Channels {
    tls: Arc<rustls::ClientConfig>,
    dial: tls::DynDial,
    inner: Arc<Mutex<ChannelMap>>,
}

/// A channel on which nothing succeeded for this long is dropped after its next failure.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(500);

#[derive(Default)]
struct ChannelMap {
    generation: u64,
    by_addr: BTreeMap<String, Entry>,
}

#[derive(Clone)]
struct Entry {
    generation: u64,
    channel: Channel,
    /// When a call on it last succeeded (or when it was made).
    last_ok: Arc<Mutex<tokio::time::Instant>>,
}

/// A channel from [`Channels`], with what is needed to report it broken.
#[derive(Clone)]
pub struct PeerChannel {
    addr: String,
    entry: Entry,
    channels: Channels,
}

impl PeerChannel {
    /// The channel, for a gRPC client; run its calls through [`PeerChannel::watch`].
    pub fn channel(&self) -> Channel {
        self.entry.channel.clone()
    }

    /// A call on this channel failed as if its connection were dead: unless something succeeded on it
    /// lately, the next call to this peer dials a new one.
    fn broken(&self) {
        let last_ok = *self.entry.last_ok.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last_ok.elapsed() < SUSPECT_AFTER {
            return;
        }
        let mut inner = self.channels.lock();
        if inner.by_addr.get(&self.addr).is_some_and(|e| e.generation == self.entry.generation) {
            inner.by_addr.remove(&self.addr);
        }
    }

    fn succeeded(&self) {
        *self.entry.last_ok.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            tokio::time::Instant::now();
    }

    /// Runs `call` on this channel. If it fails as a dead connection would, or is dropped before it
    /// ends (its caller gave up waiting), the channel is reported broken.
    pub async fn watch<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        struct Pending<'a>(Option<&'a PeerChannel>);
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                if let Some(peer) = self.0 {
                    peer.broken();
                }
            }
        }
        let mut pending = Pending(Some(self));
        let result = call.await;
        pending.0 = None;
        match &result {
            Ok(_) => self.succeeded(),
            Err(status) if dead_connection(status.code()) => self.broken(),
            Err(_) => {}
        }
        result
    }
}

/// Whether a call that failed with `code` may have failed because its connection is dead.
fn dead_connection(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

impl Channels {
    pub fn new(tls: Arc<rustls::ClientConfig>, dial: tls::DynDial) -> Self {
        Channels { tls, dial, inner: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChannelMap> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The channel to `addr`, made (lazily connected) on first use and after it was reported broken.
    pub fn get(&self, addr: &str) -> Result<PeerChannel, tonic::transport::Error> {
        let mut inner = self.lock();
        let entry = match inner.by_addr.get(addr) {
            Some(entry) => entry.clone(),
            None => {
                let channel = channel(addr, self.tls.clone(), &self.dial)?;
                inner.generation += 1;
                let entry = Entry {
                    generation: inner.generation,
                    channel,
                    last_ok: Arc::new(Mutex::new(tokio::time::Instant::now())),
                };
                inner.by_addr.insert(addr.to_string(), entry.clone());
                entry
            }
        };
        Ok(PeerChannel { addr: addr.to_string(), entry, channels: self.clone() })
    }
}

/// Makes openraft's per-peer clients; all clients of one address share its channel ([`Channels`]).
#[derive(Clone)]
pub struct Network {
    channels: Channels,
    durable: tokio::sync::watch::Receiver<Durable>,
}

impl Network {
    /// `durable` is how far the local log is on disk: an AppendEntries that would tell a follower a
    /// commit index beyond it waits until it is (see "The leader's flush" in [`crate::store`]).
    pub fn new(channels: Channels, durable: tokio::sync::watch::Receiver<Durable>) -> Self {
        Network { channels, durable }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            durable: self.durable.clone(),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    durable: tokio::sync::watch::Receiver<Durable>,
    /// The peer's address; its channel is looked up for every call, so that a call after one that
    /// found the connection dead dials anew. An address that does not parse as a URI gives an error on
    /// every call instead of a panic.
    addr: String,
    channels: Channels,
}

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, Node, E>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        method: Method,
        rpc: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, RaftError<NodeId, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let peer = self
            .channels
            .get(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&Text(e.to_string()))))?;
        let mut client = pb::raft_client::RaftClient::new(peer.channel())
            .max_decoding_message_size(MESSAGE_MAX_BYTES)
            .max_encoding_message_size(MESSAGE_MAX_BYTES);
        let mut request = Request::new(pb::Blob { data: encode(rpc) });
        request.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::Append => peer.watch(client.append_entries(request)).await,
            Method::Vote => peer.watch(client.vote(request)).await,
            Method::Snapshot => peer.watch(client.install_snapshot(request)).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            coyote_state_machine::decode(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

#[derive(Debug)]
struct Text(String);
impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Text {}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        tracing::debug!(target: "coyote_path", to = self.target, entries = rpc.entries.len(), "ae send");
        if let Some(commit) = rpc.leader_commit {
            // A follower applies what it learns is committed: not before it is durable here too.
            let wait = self.durable.wait_for(|d| d.index >= commit.index || d.failed);
            match tokio::time::timeout(option.hard_ttl(), wait).await {
                Ok(Ok(d)) if !d.failed => {}
                _ => {
                    let why = Text(format!("the local log is not durable up to the commit index {commit}"));
                    return Err(RPCError::Unreachable(Unreachable::new(&why)));
                }
            }
        }
        let reply = self.call(Method::Append, &rpc, &option).await;
        tracing::debug!(target: "coyote_path", to = self.target, "ae reply");
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(Method::Snapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        self.call(Method::Vote, &rpc, &option).await
    }
}

/// The server side of Raft's RPCs. Only members (a client certificate from the cluster CA) may call.
pub struct RaftService {
    raft: Raft,
}

impl RaftService {
    pub fn new(raft: Raft) -> Self {
        RaftService { raft }
    }
}

pub(crate) fn require_member<T>(request: &Request<T>) -> Result<NodeId, Status> {
    tls::peer_node(request).ok_or_else(|| {
        Status::unauthenticated("a certificate from this cluster's CA is required for this call")
    })
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        require_member(&request)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&request.into_inner().data)?;
        tracing::debug!(target: "coyote_path", entries = rpc.entries.len(), "ae recv");
        let result = self.raft.append_entries(rpc).await;
        tracing::debug!(target: "coyote_path", "ae answer");
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }

    async fn vote(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        require_member(&request)?;
        let rpc: VoteRequest<NodeId> = decode(&request.into_inner().data)?;
        let result = self.raft.vote(rpc).await;
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }

    async fn install_snapshot(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        require_member(&request)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(&request.into_inner().data)?;
        let result = self.raft.install_snapshot(rpc).await;
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }
}
