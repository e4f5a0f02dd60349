//! Raft's RPCs over tonic gRPC: the client side openraft calls (`RaftNetwork`) and the server side that
//! hands incoming RPCs to the local `Raft`.
//!
//! Payloads are openraft's own messages, bincode-encoded inside a protobuf `Blob`: the protobuf schema
//! stays tiny and openraft's types stay the single definition of the protocol. Every channel has HTTP/2
//! keep-alive and every call a deadline, so a peer that vanished (or a partition that silently drops
//! packets) turns into an error instead of a hung call.
//!
//! AppendEntries, the RPC of every write and every heartbeat, goes over long-lived `Replicate`
//! streams: a bidirectional HTTP/2 stream on which each request is answered by one response, in
//! order, used by one call at a time and kept idle on the peer's channel between calls
//! (`AppendStream`). A unary call per AppendEntries costs a new HTTP/2 stream with its headers
//! and a server task each time, on the path of every write. A stream whose exchange failed or timed out is dropped, never
//! reused, so a late answer cannot be paired with a later request. A peer that does not know
//! `Replicate` (an older version) answers `Unimplemented`, and AppendEntries to it go unary.
//!
//! The monitors' pings (every peer, five times a second from every node) go over the same streams as
//! an empty request, answered empty (`PeerChannel::exchange`): as unary calls they would cost a new
//! HTTP/2 stream with headers and trailers and a server task each.

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
/// the channel it used (`PeerChannel::broken`) if nothing on that channel has succeeded for
/// [`SUSPECT_AFTER`] and nothing at all was read from its connection for as long, and the next call
/// dials anew. A slow but live peer keeps sending something (answers, HTTP/2 keep-alive pings) and
/// keeps its connection even while calls to it time out: under a latency of half a second, evicting
/// such connections made nodes redial each other over and over, each time with a full handshake that
/// itself took several round trips (over a hundred handshakes in four seconds in the simulator). A dead
/// peer is redialed at most that often; a fresh channel is not evicted by a late failure on the one
/// it replaced (generations).
#[derive(Clone)]
pub struct Channels {
    tls: Arc<rustls::ClientConfig>,
    dial: tls::DynDial,
    inner: Arc<Mutex<ChannelMap>>,
    /// Set once a member refused this node as removed from the cluster ([`REMOVED_PREFIX`]).
    removed: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

/// How a member's refusal of a removed node begins: the removed node recognises its own removal by it.
pub const REMOVED_PREFIX: &str = "removed from the cluster:";

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
    /// When a call on it last succeeded (its peer answered), if one has.
    last_ok: Arc<Mutex<Option<tokio::time::Instant>>>,
    /// When bytes last came in on its connection (or when it was made); see [`Heard`].
    heard: Arc<Mutex<tokio::time::Instant>>,
    /// Replication streams on this channel that no call is using ([`AppendStream`]).
    idle_streams: Arc<Mutex<Vec<AppendStream>>>,
    /// The peer does not know the `Replicate` call (an older version): AppendEntries go unary.
    unary_only: Arc<std::sync::atomic::AtomicBool>,
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

    /// Whether the peer does not know `Replicate` streams (an older version).
    pub(crate) fn stream_less(&self) -> bool {
        self.entry.unary_only.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends `request` over an idle `Replicate` stream of this channel (or a new one) and waits up to
    /// `ttl` for its answer; the stream goes back to the idle ones after a complete exchange. Watched
    /// as a unary call is: a dead connection, or an exchange dropped before it ended (its caller gave
    /// up waiting), reports the channel broken, so that it is redialed (a partition can leave a
    /// connection that never delivers again). A peer that answers `Unimplemented` is marked
    /// [`PeerChannel::stream_less`].
    pub(crate) async fn exchange(&self, request: Vec<u8>, ttl: Duration) -> Result<Vec<u8>, Status> {
        let idle = self.entry.idle_streams.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        let exchanged = self
            .watch(async {
                match idle {
                    Some(stream) => stream.exchange(request, ttl).await,
                    None => AppendStream::open(self, request, ttl).await,
                }
            })
            .await;
        // A stream whose exchange failed is gone with its call: a late answer must not pair with a
        // later request.
        let (stream, reply) = exchanged.inspect_err(|status| {
            if status.code() == tonic::Code::Unimplemented {
                self.entry.unary_only.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })?;
        let mut idle = self.entry.idle_streams.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < IDLE_STREAMS_MAX {
            idle.push(stream);
        }
        Ok(reply)
    }

    /// A call on this channel failed as if its connection were dead: unless something succeeded on it
    /// lately, the next call to this peer dials a new one.
    fn broken(&self) {
        let last_ok = *self.entry.last_ok.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // `heard` starts when the channel was made, so a channel on which nothing succeeded yet is
        // given that long too.
        let heard = *self.entry.heard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last_ok.map_or(heard, |ok| ok.max(heard)).elapsed() < SUSPECT_AFTER {
            return;
        }
        let mut inner = self.channels.lock();
        if inner.by_addr.get(&self.addr).is_some_and(|e| e.generation == self.entry.generation) {
            inner.by_addr.remove(&self.addr);
        }
    }

    fn succeeded(&self) {
        *self.entry.last_ok.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some(tokio::time::Instant::now());
    }

    /// Whether a call on this channel was answered by the peer within the last `window`: proof that
    /// requests reached it and its answers came back, in both directions, that recently. Bytes merely
    /// arriving (`Heard`) do not count: a one-way cut can leave a connection that still receives.
    pub fn answered_within(&self, window: Duration) -> bool {
        let last_ok = *self.entry.last_ok.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        last_ok.is_some_and(|ok| ok.elapsed() <= window)
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
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                if let Some(why) = status.message().strip_prefix(REMOVED_PREFIX) {
                    let why = why.trim().to_string();
                    self.channels.removed.send_if_modified(|r| {
                        let first = r.is_none();
                        if first {
                            *r = Some(why);
                        }
                        first
                    });
                }
            }
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

/// What openraft is told of a failed call: unreachable (it backs off) or a network error.
fn rpc_error<E: std::error::Error>(status: &Status) -> RPCError<NodeId, Node, E> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            RPCError::Unreachable(Unreachable::new(status))
        }
        _ => RPCError::Network(NetworkError::new(status)),
    }
}

impl Channels {
    pub fn new(tls: Arc<rustls::ClientConfig>, dial: tls::DynDial) -> Self {
        Channels { tls, dial, inner: Arc::default(), removed: Arc::new(tokio::sync::watch::channel(None).0) }
    }

    /// Becomes `Some(why)` once a member refused this node as removed from the cluster.
    pub fn removed(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.removed.subscribe()
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
                let heard = Arc::new(Mutex::new(tokio::time::Instant::now()));
                let dial = tls::DynDial::new(Heard { dial: self.dial.clone(), at: heard.clone() });
                let channel = channel(addr, self.tls.clone(), &dial)?;
                inner.generation += 1;
                let entry = Entry {
                    generation: inner.generation,
                    channel,
                    heard,
                    last_ok: Arc::default(),
                    idle_streams: Arc::default(),
                    unary_only: Arc::default(),
                };
                inner.by_addr.insert(addr.to_string(), entry.clone());
                entry
            }
        };
        Ok(PeerChannel { addr: addr.to_string(), entry, channels: self.clone() })
    }
}

/// A dialer whose connections note when bytes last came in: the sign that a connection is alive,
/// whatever happens to the calls on it ([`PeerChannel::broken`]).
#[derive(Clone)]
struct Heard {
    dial: tls::DynDial,
    at: Arc<Mutex<tokio::time::Instant>>,
}

impl tls::Dial for Heard {
    type Io = HeardIo;

    fn dial(&self, addr: String) -> futures::future::BoxFuture<'static, std::io::Result<HeardIo>> {
        let (dialing, at) = (self.dial.dial(addr), self.at.clone());
        Box::pin(async move { Ok(HeardIo { io: dialing.await?, at }) })
    }
}

struct HeardIo {
    io: Box<dyn tls::DialedIo>,
    at: Arc<Mutex<tokio::time::Instant>>,
}

impl tokio::io::AsyncRead for HeardIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            *self.at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = tokio::time::Instant::now();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for HeardIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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
        let reply = reply.map_err(|status| rpc_error(&status))?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            coyote_state_machine::decode(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl PeerClient {
    /// AppendEntries over an idle replication stream of the peer's channel, or a new one; unary if the
    /// peer does not know streams.
    async fn append(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let peer = self
            .channels
            .get(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&Text(e.to_string()))))?;
        if peer.stream_less() {
            return self.call(Method::Append, rpc, option).await;
        }
        let reply = match peer.exchange(encode(rpc), option.hard_ttl()).await {
            Ok(reply) => reply,
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(peer = %self.addr, %status, "the peer does not take replication streams: AppendEntries go unary");
                return self.call(Method::Append, rpc, option).await;
            }
            Err(status) => return Err(rpc_error(&status)),
        };
        let result: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            coyote_state_machine::decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Idle replication streams kept per peer: one for the replication task, the others for pings and
/// for openraft's own leadership confirmations, which run beside it.
const IDLE_STREAMS_MAX: usize = 4;

/// One `Replicate` call: a long-lived HTTP/2 stream on which each AppendEntries request is answered by
/// one response, in order. It is used by one call at a time (taken from the peer's idle streams and put
/// back after a complete exchange); a stream whose exchange failed or timed out is dropped, which
/// ends the call, so an answer can never be taken for the next request's.
pub(crate) struct AppendStream {
    requests: tokio::sync::mpsc::Sender<pb::Blob>,
    replies: tonic::Streaming<pb::Blob>,
}

impl AppendStream {
    /// Opens a stream with `first` as its first request (sent with the call's headers) and waits for
    /// the answer to it.
    async fn open(peer: &PeerChannel, first: Vec<u8>, ttl: Duration) -> Result<(Self, Vec<u8>), Status> {
        let (requests, queue) = tokio::sync::mpsc::channel(1);
        requests
            .try_send(pb::Blob { data: first })
            .map_err(|_| Status::internal("a new replication stream refused its first request"))?;
        let outgoing = futures::stream::unfold(queue, |mut queue| async move {
            queue.recv().await.map(|blob| (blob, queue))
        });
        let mut client = pb::raft_client::RaftClient::new(peer.channel())
            .max_decoding_message_size(MESSAGE_MAX_BYTES)
            .max_encoding_message_size(MESSAGE_MAX_BYTES);
        let work = async {
            let mut replies = client.replicate(outgoing).await?.into_inner();
            let reply = next_reply(&mut replies).await?;
            Ok((AppendStream { requests, replies }, reply))
        };
        tokio::time::timeout(ttl, work).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded("no answer on a new replication stream in time"))
        })
    }

    /// Sends one request and waits for its answer.
    async fn exchange(mut self, request: Vec<u8>, ttl: Duration) -> Result<(Self, Vec<u8>), Status> {
        let work = async {
            self.requests
                .send(pb::Blob { data: request })
                .await
                .map_err(|_| Status::unavailable("the replication stream ended"))?;
            next_reply(&mut self.replies).await
        };
        let reply = tokio::time::timeout(ttl, work).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded("no answer on the replication stream in time"))
        })?;
        Ok((self, reply))
    }
}

async fn next_reply(replies: &mut tonic::Streaming<pb::Blob>) -> Result<Vec<u8>, Status> {
    match replies.message().await? {
        Some(blob) => Ok(blob.data),
        None => Err(Status::unavailable("the peer ended the replication stream")),
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
        let reply = self.append(&rpc, &option).await;
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
    refuse: Refuse,
}

/// Whether a peer is refused though its certificate holds (it was removed from the cluster), and why.
pub type Refuse = Arc<dyn Fn(NodeId) -> Option<Status> + Send + Sync>;

impl RaftService {
    pub fn new(raft: Raft, refuse: Refuse) -> Self {
        RaftService { raft, refuse }
    }

    fn require_member<T>(&self, request: &Request<T>) -> Result<NodeId, Status> {
        let peer = require_member(request)?;
        match (self.refuse)(peer) {
            Some(status) => Err(status),
            None => Ok(peer),
        }
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
        self.require_member(&request)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&request.into_inner().data)?;
        tracing::debug!(target: "coyote_path", entries = rpc.entries.len(), "ae recv");
        let result = self.raft.append_entries(rpc).await;
        tracing::debug!(target: "coyote_path", "ae answer");
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }

    type ReplicateStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::Blob, Status>> + Send + 'static>>;

    /// Answers each AppendEntries of the stream in order, in the task that serves the stream (no task
    /// per request). A malformed request ends the stream with an error.
    async fn replicate(
        &self,
        request: Request<tonic::Streaming<pb::Blob>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        self.require_member(&request)?;
        let state = Some((request.into_inner(), self.raft.clone()));
        let answers = futures::stream::unfold(state, |state| async move {
            let (mut inbound, raft) = state?;
            let blob = match inbound.message().await {
                Ok(Some(blob)) => blob,
                Ok(None) => return None,
                Err(status) => return Some((Err(status), None)),
            };
            // An empty request is a ping (an encoded AppendEntries never is): answered at once, empty.
            if blob.data.is_empty() {
                return Some((Ok(pb::Blob { data: Vec::new() }), Some((inbound, raft))));
            }
            let rpc: AppendEntriesRequest<TypeConfig> = match decode(&blob.data) {
                Ok(rpc) => rpc,
                Err(status) => return Some((Err(status), None)),
            };
            tracing::debug!(target: "coyote_path", entries = rpc.entries.len(), "ae recv");
            let result = raft.append_entries(rpc).await;
            tracing::debug!(target: "coyote_path", "ae answer");
            Some((Ok(pb::Blob { data: encode(&result) }), Some((inbound, raft))))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        self.require_member(&request)?;
        let rpc: VoteRequest<NodeId> = decode(&request.into_inner().data)?;
        let result = self.raft.vote(rpc).await;
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }

    async fn install_snapshot(&self, request: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        self.require_member(&request)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(&request.into_inner().data)?;
        let result = self.raft.install_snapshot(rpc).await;
        Ok(Response::new(pb::Blob { data: encode(&result) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    /// Hands out one in-memory stream, then refuses.
    #[derive(Clone)]
    struct OneStream(Arc<Mutex<Option<DuplexStream>>>);

    impl tls::Dial for OneStream {
        type Io = DuplexStream;

        fn dial(&self, _addr: String) -> futures::future::BoxFuture<'static, std::io::Result<DuplexStream>> {
            let stream = self.0.lock().unwrap().take();
            Box::pin(async move {
                stream.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"))
            })
        }
    }

    fn channels() -> Channels {
        let tls = tls::client_config(None, &tls::Trust::Pin("ab".repeat(32))).unwrap();
        Channels::new(tls, tls::DynDial::new(OneStream(Arc::default())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_notes_when_bytes_come_in_not_when_they_go_out() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let dial = tls::DynDial::new(OneStream(Arc::new(Mutex::new(Some(ours)))));
        let start = Instant::now();
        let at = Arc::new(Mutex::new(start));
        let mut io = tls::Dial::dial(&Heard { dial, at: at.clone() }, "peer:7100".into()).await.unwrap();

        tokio::time::advance(Duration::from_secs(1)).await;
        theirs.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(*at.lock().unwrap(), start + Duration::from_secs(1));

        tokio::time::advance(Duration::from_secs(1)).await;
        io.write_all(b"pong").await.unwrap();
        io.flush().await.unwrap();
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(*at.lock().unwrap(), start + Duration::from_secs(1), "writing is no sign of life");

        // The peer closing the connection (a read of zero bytes) is no sign of life either.
        drop(theirs);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(io.read(&mut got).await.unwrap(), 0);
        assert_eq!(*at.lock().unwrap(), start + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_call_the_peer_answered_counts_as_an_answer_and_only_for_its_window() {
        let channels = channels();
        let peer = channels.get("peer:7100").unwrap();
        let window = Duration::from_millis(60);
        assert!(!peer.answered_within(window), "a new channel has answered nothing");

        // Bytes coming in are not an answer: a one-way cut can leave a connection that still receives.
        *peer.entry.heard.lock().unwrap() = Instant::now();
        assert!(!peer.answered_within(window));

        // Calls that failed, as a dead connection or as the peer refusing, are no answer either.
        let failed = peer.watch(async { Err::<(), _>(Status::unavailable("cut")) }).await;
        assert!(failed.is_err());
        let refused = peer.watch(async { Err::<(), _>(Status::permission_denied("no")) }).await;
        assert!(refused.is_err());
        assert!(!peer.answered_within(window));

        // An answered call counts for the window, and no longer.
        peer.watch(async { Ok::<_, Status>(()) }).await.unwrap();
        assert!(peer.answered_within(window));
        tokio::time::advance(window).await;
        assert!(peer.answered_within(window));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!peer.answered_within(window));

        // A failure later does not erase the answer, nor refresh it.
        peer.watch(async { Ok::<_, Status>(()) }).await.unwrap();
        tokio::time::advance(Duration::from_millis(30)).await;
        let _ = peer.watch(async { Err::<(), _>(Status::unavailable("cut")) }).await;
        assert!(peer.answered_within(window));
        tokio::time::advance(Duration::from_millis(31)).await;
        assert!(!peer.answered_within(window));

        // A channel made anew after the old one broke has answered nothing.
        tokio::time::advance(SUSPECT_AFTER * 2).await;
        peer.broken();
        let fresh = channels.get("peer:7100").unwrap();
        assert_ne!(fresh.entry.generation, peer.entry.generation);
        assert!(!fresh.answered_within(window));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_channel_is_kept_while_its_connection_hears_from_the_peer() {
        let channels = channels();
        let first = channels.get("peer:7100").unwrap();
        let generation = |c: &PeerChannel| c.entry.generation;

        // Calls failed for longer than SUSPECT_AFTER, but bytes came in just now: kept.
        tokio::time::advance(SUSPECT_AFTER * 2).await;
        *first.entry.heard.lock().unwrap() = Instant::now();
        first.broken();
        assert_eq!(generation(&channels.get("peer:7100").unwrap()), generation(&first));

        // A call succeeded lately: kept.
        tokio::time::advance(SUSPECT_AFTER * 2).await;
        first.succeeded();
        first.broken();
        assert_eq!(generation(&channels.get("peer:7100").unwrap()), generation(&first));

        // Neither for SUSPECT_AFTER: the next call dials anew.
        tokio::time::advance(SUSPECT_AFTER).await;
        first.broken();
        let second = channels.get("peer:7100").unwrap();
        assert_ne!(generation(&second), generation(&first));

        // A late failure on the old channel does not evict the new one.
        tokio::time::advance(SUSPECT_AFTER * 2).await;
        first.broken();
        assert_eq!(generation(&channels.get("peer:7100").unwrap()), generation(&second));
    }
}
