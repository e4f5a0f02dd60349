//! One node, assembled once: [`Node::start`] builds a whole node from the parts its caller gives.
//!
//! `coyote node` calls it with the operating system's parts (TCP, the system clock, Docker through
//! bollard, real probes, nftables); the simulator calls it with turmoil's sockets, a simulated
//! clock, a model container engine and probes over turmoil. Both run the same wiring, so nothing that
//! joins a node can run in production without running in the simulator too.
//!
//! # What a node is
//! - the log ([`LogNode`]): openraft on the store, serving Raft and the cluster API over gRPC with
//!   mutual TLS on the listener the caller gives, and keeping the Raft membership in line with the
//!   log's members;
//! - the [`Fence`]: this server's lease, which decides what it may serve;
//! - the [`Monitor`]: probes peers and services, reports transitions, fails over;
//! - with containers: the [`Reconciler`] (containers follow the log) and the [`Activator`]
//!   (on-demand services start on their first connection);
//! - the local API ([`crate::api`]): an axum router, which the caller serves (on a unix socket in
//!   production) or calls directly (the simulator, through `tower::ServiceExt::oneshot`).
//!
//! - with containers and backups: [`Backups`] (snapshots of each service's data, shipped to the
//!   nodes that hold a role for it over the same gRPC listener, and restored before a new master
//!   serves; the fence then waits for the restore).
//!
//! - with a front door ([`FrontParts`]): the proxy ([`crate::front`]) on the HTTP and HTTPS
//!   listeners the caller gives, routing each service's domains to its master; other nodes'
//!   proxies forward to this one over the gRPC listener.
//!
//! - with web pages ([`CrmParts`]): the CRM ([`coyote_crm`]), a router the caller serves, which
//!   reads this node's replica and writes through the local API.
//!
//! # What the caller keeps
//! Creating or joining a cluster (writing the data directory, asking for a certificate) happens
//! before: a node starts from a store, an identity and a listener. Signals and the exit status are
//! the binary's; the simulator never stops a node gracefully, it drops the host's runtime.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use coyote_log::store::{LogStore, StateMachineStore, StoreHandle};
use coyote_log::tls::{ClusterCa, Identity, TlsConn};
use coyote_log::{Environment, LogError, LogNode, LogNodeConfig};
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::activator::{Activator, ActivatorConfig};
use crate::api::{self, Api};
use crate::backups::{BackupSettings, Backups};
use crate::fence::Fence;
use crate::forward::Forwarder;
use crate::front::{self, FrontParts};
use crate::monitor::{Monitor, MonitorConfig};
use crate::probe::ServiceProbe;
use crate::reconciler::{self, Reconciler};
use crate::runtime::{ContainerRuntime, Scope};
use crate::sockets::{Sockets, TcpSockets};
use coyote_proxy::Proxy;

/// How long [`Node::stop`] waits for the node's tasks to end.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// How long a node that finds its departure in its replica waits for Raft's membership to drop it.
const DEPART_WAIT: Duration = Duration::from_secs(10);
/// How long it goes on after that, so that its last heartbeats tell the others what committed.
const DEPART_LINGER: Duration = Duration::from_millis(500);

/// How long a stopping node's gRPC server lets calls under way finish before it drops its
/// connections.
const SERVER_DRAIN: Duration = Duration::from_secs(1);

/// Where the node accepts its peers' connections: a listener whose connections the node wraps in
/// its TLS. `tokio::net::TcpListener` is one; the simulator gives turmoil's.
pub trait PeerListener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The accepted connections, each through the TLS handshake of `tls`.
    fn incoming(self, tls: Arc<rustls::ServerConfig>) -> BoxStream<'static, io::Result<TlsConn<Self::Io>>>;
}

impl PeerListener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    fn incoming(self, tls: Arc<rustls::ServerConfig>) -> BoxStream<'static, io::Result<TlsConn<Self::Io>>> {
        Box::pin(coyote_log::tls::tcp_incoming(self, tls))
    }
}

/// What a node is made of; the caller chooses every part that touches the world.
pub struct Parts<L> {
    pub config: LogNodeConfig,
    /// The store, as `coyote_log::store::open` (or `open_memory`) gives it.
    pub store: (LogStore, StateMachineStore, StoreHandle),
    pub identity: Identity,
    /// The cluster CA, which lets this node admit servers.
    pub ca: Option<ClusterCa>,
    /// How the log dials peers, and the clock every part reads.
    pub env: Environment,
    /// Where peers connect.
    pub listener: L,
    pub monitor: MonitorConfig,
    /// How the monitor checks services (`None`: over the operating system's network).
    pub probe: Option<Arc<dyn ServiceProbe>>,
    /// The containers this node runs (`None`: a node that only holds the log).
    pub containers: Option<ContainerParts>,
    /// The front door: HTTP and HTTPS for the services' domains (`None`: no proxy on this node).
    pub front: Option<FrontParts>,
    /// The web pages (`None`: no CRM on this node).
    pub crm: Option<CrmParts>,
}

/// What the CRM of a node needs.
pub struct CrmParts {
    pub settings: coyote_crm::Settings,
    /// Where the caller serves it (`http://HOST:PORT`), for the activation URLs this node prints.
    pub url: Option<String>,
}

/// What a node that runs containers needs.
pub struct ContainerParts {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub reconciler: reconciler::Settings,
    pub activator: ActivatorConfig,
    /// Kernel forwarding of warm on-demand connections (`None`: the activator splices them).
    pub forwarder: Option<Arc<Forwarder>>,
    /// Where the activator listens and dials (`None`: the operating system's TCP).
    pub sockets: Option<Arc<dyn Sockets>>,
    /// Snapshots of the services' data (`None`: data stays on the master, new masters start on
    /// their own directory).
    pub backups: Option<BackupSettings>,
}

/// A running node.
pub struct Node {
    pub log: LogNode,
    pub fence: Fence,
    pub reconciler: Option<Arc<Reconciler>>,
    pub activator: Option<Arc<Activator>>,
    pub backups: Option<Arc<Backups>>,
    pub proxy: Option<Arc<Proxy>>,
    /// The local API, for the caller to serve or call.
    pub api: axum::Router,
    /// `/metrics` alone, for the caller to serve where Prometheus can scrape it.
    pub metrics: axum::Router,
    /// The CRM's pages, for the caller to serve (`None`: no CRM on this node).
    pub crm: Option<axum::Router>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts the log on the store and every part on top of it, each in a task of its own.
    pub async fn start<L: PeerListener>(parts: Parts<L>) -> Result<Node, LogError> {
        let Parts { config, store, identity, ca, env, listener, monitor, probe, containers, front, crm } =
            parts;
        let advertise = config.addr.clone();
        let scope = Scope { cluster_id: config.cluster_id.clone(), node_id: config.node_id };
        let (log_store, sm, handle) = store;
        let ca_for_front = ca.clone();
        // The CRM's sessions are signed with a key derived from the cluster CA's, which every node
        // holds: a session made by one node's pages is taken by every other's.
        let session_secret = ca.as_ref().map(|ca| ca.key_pem().as_bytes().to_vec());
        let log = LogNode::start_in(config, log_store, sm, handle, &identity, ca, env).await?;
        let (stop, _) = watch::channel(false);
        let stopped = || until_stopped(&stop);
        let mut tasks = Vec::new();
        let mut fence = Fence::new(log.clone());
        let backups =
            match containers.as_ref().and_then(|c| c.backups.clone().map(|b| (c.runtime.clone(), b))) {
                Some((runtime, settings)) => {
                    fence = fence.with_restore_gate();
                    let backups = Backups::open(log.clone(), runtime, scope.clone(), settings)
                        .map_err(|e| LogError::Transport(format!("cannot open the backup store: {e}")))?;
                    Some(backups)
                }
                None => None,
            };
        {
            let log = log.clone();
            let shutdown = stopped();
            tasks.push(tokio::spawn(async move { log.run_membership(shutdown).await }));
        }
        tasks.push(tokio::spawn(fence.clone().run(stopped())));
        let mut monitor = Monitor::new(log.clone(), monitor);
        if let Some(probe) = probe {
            monitor = monitor.with_probe(probe);
        }
        tasks.push(tokio::spawn(monitor.run(stopped())));
        if let Some(backups) = &backups {
            tasks.push(tokio::spawn(backups.clone().run(stopped())));
        }
        let mut sockets: Arc<dyn Sockets> = Arc::new(TcpSockets);
        let mut runtime = None;
        let (reconciler, activator) = match containers {
            Some(c) => {
                runtime = Some(c.runtime.clone());
                let reconciler = Arc::new(
                    Reconciler::new(log.clone(), c.runtime.clone(), scope, c.reconciler)
                        .with_fence(fence.clone())
                        .with_backups(backups.clone()),
                );
                let mut activator = Activator::new(log.clone(), c.runtime, fence.clone(), c.activator)
                    .with_forwarder(c.forwarder);
                if let Some(s) = c.sockets {
                    sockets = s.clone();
                    activator = activator.with_sockets(s);
                }
                let activator = Arc::new(activator);
                tasks.push(tokio::spawn(activator.clone().run(stopped())));
                tasks.push(tokio::spawn(reconciler.clone().run(stopped())));
                (Some(reconciler), Some(activator))
            }
            None => (None, None),
        };
        let mut routes = backups.as_ref().map(|b| b.routes()).unwrap_or_default();
        if let Some(activator) = &activator {
            routes = activator.routes(routes);
        }
        let mut acme_directory = None;
        let proxy = match front {
            Some(FrontParts { http, https, mut settings, acme }) => {
                acme_directory = acme.as_ref().map(|a| a.directory.clone());
                settings.redirect_to_https &= https.is_some();
                let proxy = front::proxy(
                    &log,
                    &fence,
                    runtime,
                    activator.clone(),
                    sockets,
                    front::issuer(ca_for_front.clone(), acme.is_some()),
                    settings,
                );
                routes = front::routes(proxy.clone(), routes);
                let follow = front::follow_log(proxy.clone(), log.clone(), ca_for_front.clone(), stopped());
                tasks.push(tokio::spawn(follow));
                match (acme, &ca_for_front) {
                    (Some(options), Some(ca)) => {
                        let orderer = crate::acme::Orderer::new(log.clone(), ca.clone(), options);
                        tasks.push(tokio::spawn(orderer.run(stopped())));
                    }
                    (Some(_), None) => {
                        tracing::warn!("this node holds no cluster CA key: it orders no certificates")
                    }
                    (None, _) => {}
                }
                for (listener, https) in [(http, false), (https, true)] {
                    if let Some(listener) = listener {
                        tasks.push(tokio::spawn(front::accept(proxy.clone(), listener, https, stopped())));
                    }
                }
                Some(proxy)
            }
            None => None,
        };
        {
            let log = log.clone();
            let incoming = listener.incoming(log.server_tls());
            let (shutdown, stopping) = (stopped(), stopped());
            tasks.push(tokio::spawn(async move {
                // A graceful stop waits for every connection to close, and peers keep theirs open:
                // the connections still open a second after the stop are dropped.
                let dropped = async {
                    stopping.await;
                    tokio::time::sleep(SERVER_DRAIN).await;
                };
                tokio::select! {
                    served = log.serve_with(incoming, shutdown, routes) => if let Err(e) = served {
                        tracing::error!(error = %e, "the node's gRPC server stopped");
                    },
                    () = dropped => {}
                }
            }));
        }
        let api = Api {
            node: log.clone(),
            advertise,
            reconciler: reconciler.clone(),
            fence: fence.clone(),
            activator: activator.clone(),
            backups: backups.clone(),
            proxy: proxy.clone(),
            acme_directory,
            crm_url: crm.as_ref().and_then(|c| c.url.clone()),
        };
        let metrics = api::metrics_router(api.clone());
        let api = api::router(api);
        let crm = crm.map(|c| {
            let mut settings = c.settings;
            settings.session_secret = settings.session_secret.or(session_secret);
            let crm = coyote_crm::Crm::new(log.clone(), api.clone(), settings);
            tasks.push(tokio::spawn(crm.clone().observe(stopped())));
            tasks.push(tokio::spawn(crm.clone().feed(stopped())));
            crm.router()
        });
        // The proxy serves the CRM at the admin domain too (HTTPS, by the cluster's certificate).
        if let (Some(proxy), Some(router)) = (&proxy, &crm) {
            proxy.set_local(front::local_pages(router.clone()));
        }
        Ok(Node { log, fence, reconciler, activator, backups, proxy, api, metrics, crm, stop, tasks })
    }

    /// A future that ends when the node stops (for the caller's servers of the API).
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        until_stopped(&self.stop)
    }

    /// Stops every part, then the log; waits up to [`STOP_WAIT`] for the parts to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.log.shutdown().await;
        let _ = tokio::time::timeout(STOP_WAIT, futures::future::join_all(self.tasks)).await;
    }

    /// Resolves once this server is no longer a member, with why: its own replica records that it
    /// left or was removed, or a member refused it as removed (a server that was down while it was
    /// removed learns it that way, its replica never will).
    ///
    /// A node that finds its departure in its replica goes on until Raft's membership no longer
    /// names it (or a member refuses it, or [`DEPART_WAIT`] has passed), and a moment more: a
    /// leader that left must stay long enough for the others to learn that its entries committed.
    pub async fn departed(&self) -> String {
        let me = self.log.id();
        let mut applied = self.log.store().subscribe();
        let mut refused = self.log.removed();
        loop {
            if let Some(why) = refused.borrow_and_update().clone() {
                return why;
            }
            let recorded = self.log.store().with_state(|s| s.departed.contains(&me));
            if recorded {
                break;
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { std::future::pending::<()>().await },
                changed = refused.changed() => if changed.is_err() { std::future::pending::<()>().await },
            }
        }
        let mut metrics = self.log.raft().metrics();
        let out = metrics.wait_for(|m| m.membership_config.membership().get_node(&me).is_none());
        let _ = tokio::time::timeout(DEPART_WAIT, async {
            tokio::select! {
                _ = out => {}
                _ = refused.wait_for(Option::is_some) => {}
            }
        })
        .await;
        tokio::time::sleep(DEPART_LINGER).await;
        format!("node {me} is no longer a member of the cluster: it left or was removed")
    }

    /// Stops a server that is no longer a member: every part and the log stop first, so that nothing
    /// starts a container again, then every container of this node is removed (its volumes stay in
    /// the data directory). Returns whether the containers are gone.
    pub async fn retire(self) -> bool {
        let reconciler = self.reconciler.clone();
        self.stop().await;
        match reconciler {
            Some(r) => r.remove_all().await,
            None => true,
        }
    }
}

/// A future that ends once `stop` says so (or is dropped).
fn until_stopped(stop: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}
