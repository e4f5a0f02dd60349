//! The front door of a coyote node: HTTP and HTTPS by host name, routed to each service's master.
//!
//! Every node runs one [`Proxy`]. A request is routed by its host name through the [`Table`], which
//! is derived from the log (each service's domains → its current master), so every node routes the
//! same way and a DNS record may point at any of them:
//!
//! - on the master, once its fence lets it serve the service, the request goes to the service's
//!   container over the coyote network (its spec's `http_port`), through a pool of keep-alive
//!   HTTP/1.1 connections; a stopped on-demand container is started first while the request waits
//!   (the node's [`Backend`] does that, through the activator);
//! - on any other node, it is forwarded to the master's proxy over the cluster's mutual TLS
//!   ([`Backend::forward`]); the master handles it as its own ([`Proxy::handle_forwarded`]), never
//!   forwarding again. A protocol switch (a websocket) goes the same way as a tunnel: the forwarded
//!   request's body carries what the client sends, the answer's body what the container sends
//!   ([`TUNNEL_UPGRADE`]).
//!
//! A new table replaces the old one whole ([`Proxy::set_table`]); requests already under way, and
//! upgraded connections (websockets), keep going.
//!
//! # TLS
//! The HTTPS listener reads the ClientHello first ([`tls::read_hello`]). A name whose service asks for
//! passthrough is spliced to the container's port 443 undecrypted, the ClientHello included (at
//! another node, through the master's proxy: [`TUNNEL_PASSTHROUGH`]). Any other
//! name is terminated here with the certificate [`Certificates`] resolves for it (ECDSA P-256, TLS
//! 1.2 and 1.3, session tickets and resumption, HTTP/2 and HTTP/1.1 by ALPN); a name no service has
//! gets a TLS alert (`unrecognized_name`), never another site's certificate.
//!
//! # Limits
//! Each has a clear answer: request headers over [`Settings::max_header_bytes`] get 431; a client
//! that has not sent its headers within [`Settings::header_timeout`] is disconnected; a body over
//! [`Settings::max_body_bytes`] gets 413 (by its `Content-Length`, or cut when a streamed body passes
//! it); connections beyond [`Settings::max_connections`] are closed at once; a container that does not
//! answer within [`Settings::upstream_timeout`] gives 504. Error pages name the cause (502: the site's
//! container is down; 503: it is starting or moving; 504: it did not answer in time) and nothing of the
//! node's internals.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};

pub mod http;
mod pages;
pub mod stats;
pub mod table;
pub mod tls;

pub use coyote_state_machine::NodeId;
pub use stats::Stats;
pub use table::{Route, Table};
pub use tls::{Certificates, Issuer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every request and response that passes through the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A byte stream: a TCP connection, or the simulator's.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Headers a forwarding proxy sets on the request it sends to the master's proxy: the host the
/// client asked for, the client's address, and the scheme it used.
pub const FORWARDED_HOST: &str = "x-coyote-host";
pub const FORWARDED_CLIENT: &str = "x-coyote-client";
pub const FORWARDED_PROTO: &str = "x-coyote-proto";
/// A protocol switch (a websocket) asked of another node's proxy: HTTP/2 has no `Upgrade`, so the
/// forwarding proxy names the protocol in this header, the request's body carries what the client
/// sends, and the master's proxy answers `200` with [`TUNNEL_SWITCHED`] (the protocol the container
/// switched to) and a body that carries what the container sends.
pub const TUNNEL_UPGRADE: &str = "x-coyote-upgrade";
pub const TUNNEL_SWITCHED: &str = "x-coyote-switched";
/// A passed-through TLS connection sent to the master's proxy: the header names the ClientHello's
/// name, the request's body carries the client's bytes (the ClientHello first), and the answer's
/// body the container's.
pub const TUNNEL_PASSTHROUGH: &str = "x-coyote-passthrough";

/// Why a request cannot go to a container from here.
#[derive(Debug)]
pub enum Refusal {
    /// This node does not serve the service now (not its master, or its fence holds it back).
    NotServing,
    /// The container is not running, or could not be started.
    Down(String),
    /// The container did not accept connections in time.
    Timeout(String),
}

/// A container ready for a request, and what keeps it from being stopped as idle meanwhile.
pub struct Opened {
    pub addr: SocketAddr,
    pub guard: Option<Box<dyn Send + Sync>>,
}

/// Who sent a request to the node's own pages ([`Proxy::set_local`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    pub ip: std::net::IpAddr,
    /// It came over TLS, terminated by this proxy.
    pub https: bool,
}

/// The node's own pages, served in-process for the names the table marks local.
pub type Local =
    Arc<dyn Fn(hyper::Request<Body>, ClientInfo) -> BoxFuture<'static, hyper::Response<Body>> + Send + Sync>;

/// What the proxy needs from its node.
pub trait Backend: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> NodeId;

    /// Where the container of `service` accepts web traffic on `port`, if this node serves it now;
    /// starts a stopped on-demand container and waits until it accepts.
    fn open(&self, service: &str, port: u16) -> BoxFuture<'_, Result<Opened, Refusal>>;

    /// Sends `request` to the proxy of node `master` over the cluster's mutual TLS; its URI is the
    /// client's (path and query) and the [`FORWARDED_HOST`], [`FORWARDED_CLIENT`] and
    /// [`FORWARDED_PROTO`] headers are set.
    fn forward(
        &self,
        master: NodeId,
        request: hyper::Request<Body>,
    ) -> BoxFuture<'static, Result<hyper::Response<Body>, String>>;

    /// Opens a connection to a container.
    fn dial(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<BoxStream>>;
}

/// The proxy's limits and choices.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Send plain-HTTP requests for known names to HTTPS (308), except ACME challenges.
    pub redirect_to_https: bool,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub max_body_bytes: u64,
    pub max_connections: usize,
    /// How long a container may take to send its response's headers.
    pub upstream_timeout: Duration,
    /// How long a TLS client may take to send its ClientHello and finish its handshake.
    pub handshake_timeout: Duration,
    /// Idle keep-alive connections to containers are closed after this.
    pub pool_idle: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            redirect_to_https: true,
            max_header_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(10),
            max_body_bytes: 256 * 1024 * 1024,
            max_connections: 10_000,
            upstream_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            pool_idle: Duration::from_secs(60),
        }
    }
}

/// One node's proxy.
pub struct Proxy {
    backend: Arc<dyn Backend>,
    settings: Settings,
    table: watch::Sender<Arc<Table>>,
    certificates: Arc<Certificates>,
    tls: Arc<rustls::ServerConfig>,
    client: http::Upstream,
    connections: Arc<Semaphore>,
    /// ACME HTTP-01 challenges this node answers: token → key authorization.
    challenges: std::sync::RwLock<std::collections::HashMap<String, String>>,
    /// ACME TLS-ALPN-01 challenges this node answers: name → the certificate that answers it.
    alpn_challenges: std::sync::RwLock<std::collections::HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    /// The node's own pages, once the node gave them.
    local: std::sync::OnceLock<Local>,
    pub stats: Arc<Stats>,
}

impl Proxy {
    pub fn new(backend: Arc<dyn Backend>, issuer: Arc<dyn Issuer>, settings: Settings) -> Arc<Proxy> {
        let (table, _) = watch::channel(Arc::new(Table::default()));
        let certificates = Arc::new(Certificates::new(issuer));
        let tls = tls::server_config(certificates.clone());
        let client = http::Upstream::new(backend.clone(), settings.pool_idle);
        let connections = Arc::new(Semaphore::new(settings.max_connections));
        Arc::new(Proxy {
            backend,
            settings,
            table,
            certificates,
            tls,
            client,
            connections,
            challenges: Default::default(),
            alpn_challenges: Default::default(),
            local: std::sync::OnceLock::new(),
            stats: Arc::new(Stats::default()),
        })
    }

    /// Routes by `table` from now on; requests under way are not affected.
    pub fn set_table(&self, table: Table) {
        let table = Arc::new(table);
        self.certificates.retain(&table);
        self.table.send_if_modified(|current| {
            if **current == *table {
                return false;
            }
            *current = table;
            true
        });
    }

    /// Serves the names the table marks local (the CRM at the admin domain) with `local`. Set once;
    /// until then such names answer 404.
    pub fn set_local(&self, local: Local) {
        let _ = self.local.set(local);
    }

    pub(crate) fn local_pages(&self) -> Option<&Local> {
        self.local.get()
    }

    /// The certificates the HTTPS listener serves.
    pub fn certificates(&self) -> &Arc<Certificates> {
        &self.certificates
    }

    /// Answers these ACME HTTP-01 challenges (token → key authorization) from now on, on any name.
    pub fn set_challenges(&self, challenges: std::collections::HashMap<String, String>) {
        *self.challenges.write().expect("challenges lock") = challenges;
    }

    /// Answers these ACME TLS-ALPN-01 challenges (name → its challenge certificate) from now on.
    pub fn set_alpn_challenges(
        &self,
        challenges: std::collections::HashMap<String, Arc<rustls::sign::CertifiedKey>>,
    ) {
        *self.alpn_challenges.write().expect("challenges lock") = challenges;
    }

    /// The certificate answering a TLS-ALPN-01 challenge for `name`, if this node answers one.
    pub fn alpn_challenge(&self, name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.alpn_challenges.read().expect("challenges lock").get(&name.to_ascii_lowercase()).cloned()
    }

    /// The key authorization for the HTTP-01 challenge `token`, if this node answers it.
    pub fn challenge(&self, token: &str) -> Option<String> {
        self.challenges.read().expect("challenges lock").get(token).cloned()
    }

    /// The table requests are routed by now.
    pub fn table(&self) -> Arc<Table> {
        self.table.borrow().clone()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Serves one connection accepted on the HTTP listener, until it closes.
    pub async fn serve_http(self: Arc<Self>, io: BoxStream, peer: SocketAddr) {
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            return; // over the connection limit: closed at once
        };
        self.stats.connection_opened();
        http::serve(self.clone(), io, peer, false).await;
        self.stats.connection_closed();
    }

    /// Serves one connection accepted on the HTTPS listener, until it closes.
    pub async fn serve_https(self: Arc<Self>, io: BoxStream, peer: SocketAddr) {
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            return;
        };
        self.stats.connection_opened();
        tls::serve(self.clone(), io, peer).await;
        self.stats.connection_closed();
    }

    /// Handles a request that another node's proxy forwarded here (this node being the master it
    /// believed in): served from the container here, or refused, never forwarded again.
    pub async fn handle_forwarded(self: Arc<Self>, request: hyper::Request<Body>) -> hyper::Response<Body> {
        http::handle_forwarded(self, request).await
    }
}
