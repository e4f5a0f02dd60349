//! The node's front door: its [`coyote_proxy::Proxy`] on the HTTP and HTTPS listeners the caller
//! gives, fed by the log.
//!
//! - The routing table is derived from the applied state at every change.
//! - A request for a service this node masters goes to its container only while the fence lets
//!   this node serve it ([`Fence::serving`], read per request); an on-demand container is woken
//!   through the activator ([`Activator::wake`]), the request waiting meanwhile.
//! - A request for a service another node masters is forwarded to that node over the cluster's
//!   mutual TLS: an HTTP/2 request on the gRPC channel the log already keeps to it, under the path
//!   prefix [`FORWARD_PREFIX`], which the receiving node's gRPC listener serves ([`routes`]).
//! - Certificates come from the cluster's own CA ([`CaIssuer`]): every node holds it, so every node
//!   issues its own certificate for a name on the first handshake that asks for it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use coyote_log::tls::ClusterCa;
use coyote_log::LogNode;
use coyote_proxy::{Backend, Body, BoxError, BoxStream, NodeId, Opened, Proxy, Refusal, Table};
use coyote_state_machine::Role;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tower::{Service, ServiceExt};

use crate::activator::Activator;
use crate::fence::Fence;
use crate::runtime::{ContainerRuntime, RunState};
use crate::sockets::{Listener, Sockets};
use crate::wire::{DomainStats, WebStats};

/// The path under which a node's gRPC listener takes requests forwarded by other nodes' proxies.
pub const FORWARD_PREFIX: &str = "/coyote-proxy";
/// How long the address of an always-on service's running container is used without asking the
/// container engine again. A container that is replaced gets a new address; for at most this long,
/// requests may still be sent to the old one (and fail with 502) — never to another service's, since
/// an address is only reused once its container is gone and the cache is dropped on a failed dial.
pub const ADDRESS_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest a forwarded request may wait for the peer channel to be ready.
pub const FORWARD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the caller gives a node for its front door.
pub struct FrontParts {
    /// Where plain HTTP arrives (`None`: no HTTP listener).
    pub http: Option<Box<dyn Listener>>,
    /// Where HTTPS arrives (`None`: no HTTPS listener; plain HTTP is then served, not redirected).
    pub https: Option<Box<dyn Listener>>,
    pub settings: coyote_proxy::Settings,
    /// Certificates from this ACME CA (`None`: from the cluster's own CA).
    pub acme: Option<crate::acme::AcmeOptions>,
}

type Addresses = std::collections::HashMap<String, (IpAddr, tokio::time::Instant)>;

/// The node, as its proxy sees it.
struct NodeBackend {
    log: LogNode,
    fence: Fence,
    runtime: Option<Arc<dyn ContainerRuntime>>,
    activator: Option<Arc<Activator>>,
    sockets: Arc<dyn Sockets>,
    /// Always-on services' container addresses, and when each was read (see [`ADDRESS_TTL`]).
    addresses: Arc<std::sync::Mutex<Addresses>>,
}

impl NodeBackend {
    /// The address of the running container of the always-on `service`: read from the container
    /// engine at most every [`ADDRESS_TTL`].
    async fn address(&self, service: &str) -> Result<IpAddr, Refusal> {
        if let Some((ip, at)) = self.addresses.lock().expect("addresses lock").get(service) {
            if at.elapsed() < ADDRESS_TTL {
                return Ok(*ip);
            }
        }
        let ip = self.read_address(service).await;
        let mut addresses = self.addresses.lock().expect("addresses lock");
        match &ip {
            Ok(ip) => addresses.insert(service.to_string(), (*ip, tokio::time::Instant::now())),
            Err(_) => addresses.remove(service),
        };
        ip
    }

    async fn read_address(&self, service: &str) -> Result<IpAddr, Refusal> {
        let Some(runtime) = &self.runtime else {
            return Err(Refusal::Down("this node runs no containers".into()));
        };
        let containers = runtime.list().await.map_err(|e| Refusal::Down(e.to_string()))?;
        let container = containers
            .iter()
            .find(|c| c.service == service && c.state == RunState::Running)
            .ok_or_else(|| Refusal::Down(format!("the container of {service} is not running")))?;
        match runtime.address(&container.id).await {
            Ok(Some(ip)) => Ok(ip),
            Ok(None) => Err(Refusal::Down(format!("the container of {service} has no address"))),
            Err(e) => Err(Refusal::Down(e.to_string())),
        }
    }
}

impl NodeBackend {
    /// Whether this node's fence lets it serve `service` now.
    fn fenced_in(&self, service: &str) -> bool {
        #[cfg(feature = "planted-bugs")]
        if planted::ignores_fence() {
            return true;
        }
        self.fence.serving(service)
    }
}

#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::{AtomicBool, Ordering};

    static IGNORES_FENCE: AtomicBool = AtomicBool::new(false);

    /// The proxy hands requests to the container of every service this node masters in its applied
    /// state, whether or not its fence lets it serve.
    pub fn ignore_fence(on: bool) {
        IGNORES_FENCE.store(on, Ordering::SeqCst);
    }

    pub(crate) fn ignores_fence() -> bool {
        IGNORES_FENCE.load(Ordering::SeqCst)
    }
}

impl Backend for NodeBackend {
    fn node_id(&self) -> NodeId {
        self.log.id()
    }

    fn open(&self, service: &str, port: u16) -> BoxFuture<'_, Result<Opened, Refusal>> {
        let service = service.to_string();
        Box::pin(async move {
            let me = self.log.id();
            let on_demand = self.log.store().with_state(|s| {
                (s.role(&service, me) == Some(Role::Master))
                    .then(|| s.services.get(&service).map(|x| x.spec.on_demand))
            });
            let Some(Some(on_demand)) = on_demand else { return Err(Refusal::NotServing) };
            if !self.fenced_in(&service) {
                return Err(Refusal::NotServing);
            }
            if on_demand {
                let Some(activator) = &self.activator else {
                    return Err(Refusal::Down("this node runs no containers".into()));
                };
                return match activator.wake(&service).await {
                    Ok((ip, active)) => {
                        Ok(Opened { addr: SocketAddr::new(ip, port), guard: Some(Box::new(active)) })
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Err(Refusal::NotServing),
                    Err(e) if e.to_string().contains("did not accept connections") => {
                        Err(Refusal::Timeout(e.to_string()))
                    }
                    Err(e) => Err(Refusal::Down(e.to_string())),
                };
            }
            let ip = self.address(&service).await?;
            Ok(Opened { addr: SocketAddr::new(ip, port), guard: None })
        })
    }

    fn forward(
        &self,
        master: NodeId,
        request: hyper::Request<Body>,
    ) -> BoxFuture<'static, Result<hyper::Response<Body>, String>> {
        let addr = self.log.store().with_state(|s| s.members.get(&master).map(|m| m.addr.clone()));
        let log = self.log.clone();
        Box::pin(async move {
            let addr = addr.ok_or_else(|| format!("node {master} is not a member"))?;
            let mut channel = log.peer(&addr).map_err(|e| e.to_string())?;
            let (mut parts, body) = request.into_parts();
            let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            parts.uri = format!("{FORWARD_PREFIX}{path}").parse().map_err(|e| format!("{e}"))?;
            parts.version = hyper::Version::HTTP_2;
            let request = hyper::Request::from_parts(parts, tonic::body::Body::new(body));
            let ready = tokio::time::timeout(FORWARD_CONNECT_TIMEOUT, channel.ready())
                .await
                .map_err(|_| format!("node {master} ({addr}) cannot be reached"))?;
            ready.map_err(|e| format!("node {master} ({addr}): {e}"))?;
            let response = channel.call(request).await.map_err(|e| format!("node {master} ({addr}): {e}"))?;
            Ok(response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
        })
    }

    fn dial(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<BoxStream>> {
        let connect = self.sockets.connect(addr);
        let addresses = self.addresses.clone();
        Box::pin(async move {
            let stream = connect.await;
            if stream.is_err() {
                // A container that went away: ask the engine again next time.
                addresses.lock().expect("addresses lock").retain(|_, (ip, _)| *ip != addr.ip());
            }
            stream
        })
    }
}

/// Certificates signed by the cluster's own CA.
pub struct CaIssuer(pub ClusterCa);

impl coyote_proxy::Issuer for CaIssuer {
    fn issue(&self, name: &str) -> Result<Arc<CertifiedKey>, String> {
        let (cert, key) = self.0.sign_site(&[name.to_string()]).map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(vec![CertificateDer::from(cert)], key, &provider)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

/// No certificates: a node without the cluster CA answers TLS with an alert.
struct NoIssuer;

impl coyote_proxy::Issuer for NoIssuer {
    fn issue(&self, name: &str) -> Result<Arc<CertifiedKey>, String> {
        Err(format!("this node holds no CA to issue a certificate for {name}"))
    }
}

/// Where the proxy's certificates come from, for names with none in the log: a self-signed
/// placeholder while ACME orders the real one, else the cluster's CA.
pub(crate) fn issuer(ca: Option<ClusterCa>, acme: bool) -> Arc<dyn coyote_proxy::Issuer> {
    match ca {
        _ if acme => Arc::new(crate::acme::Placeholder),
        Some(ca) => Arc::new(CaIssuer(ca)),
        None => Arc::new(NoIssuer),
    }
}

/// Builds the node's proxy.
pub(crate) fn proxy(
    log: &LogNode,
    fence: &Fence,
    runtime: Option<Arc<dyn ContainerRuntime>>,
    activator: Option<Arc<Activator>>,
    sockets: Arc<dyn Sockets>,
    issuer: Arc<dyn coyote_proxy::Issuer>,
    settings: coyote_proxy::Settings,
) -> Arc<Proxy> {
    let backend = NodeBackend {
        log: log.clone(),
        fence: fence.clone(),
        runtime,
        activator,
        sockets,
        addresses: Arc::default(),
    };
    Proxy::new(Arc::new(backend), issuer, settings)
}

/// Keeps the proxy's routing table, and the certificates and ACME challenge answers it serves, in
/// line with the log, until `shutdown`.
pub(crate) async fn follow_log(
    proxy: Arc<Proxy>,
    log: LogNode,
    ca: Option<ClusterCa>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut applied = log.store().subscribe();
    let mut installed = crate::acme::Installed::default();
    loop {
        proxy.set_table(log.store().with_state(Table::from_state));
        if let Some(ca) = &ca {
            log.store().with_state(|s| installed.update(s, ca, &proxy));
        }
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            changed = applied.changed() => if changed.is_err() { return },
        }
    }
}

/// Accepts connections on `listener` and hands each to the proxy, until `shutdown`.
pub(crate) async fn accept(
    proxy: Arc<Proxy>,
    listener: Box<dyn Listener>,
    https: bool,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let proxy = proxy.clone();
                if https {
                    tokio::spawn(proxy.serve_https(stream, peer));
                } else {
                    tokio::spawn(proxy.serve_http(stream, peer));
                }
            }
            // Out of file descriptors, most likely: let some connections end first.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// The routes through which this node's gRPC listener takes requests forwarded by other nodes'
/// proxies (only members reach that listener: it requires a member's certificate).
pub(crate) fn routes(proxy: Arc<Proxy>, routes: tonic::service::Routes) -> tonic::service::Routes {
    let handler = move |request: axum::extract::Request| {
        let proxy = proxy.clone();
        async move {
            let (mut parts, body) = request.into_parts();
            let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let original = path.strip_prefix(FORWARD_PREFIX).unwrap_or(path);
            let original =
                if original.starts_with('/') { original.to_string() } else { format!("/{original}") };
            parts.uri = original.parse().unwrap_or_else(|_| hyper::Uri::from_static("/"));
            let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
            let response = proxy.handle_forwarded(hyper::Request::from_parts(parts, body)).await;
            response.map(axum::body::Body::new)
        }
    };
    let router = routes
        .into_axum_router()
        .route(FORWARD_PREFIX, axum::routing::any(handler.clone()))
        .route(&format!("{FORWARD_PREFIX}/"), axum::routing::any(handler.clone()))
        .route(&format!("{FORWARD_PREFIX}/{{*rest}}"), axum::routing::any(handler));
    tonic::service::Routes::from(router)
}

/// This node's proxy traffic as `GET /v1/stats/web` answers it.
pub fn web_stats(stats: &coyote_proxy::Stats) -> WebStats {
    let (open_connections, connections, tls_handshakes, tls_handshake_failures) = stats.connections();
    let bound = |counts: &coyote_proxy::stats::Counts, q: u64| {
        let total: u64 = counts.latency.iter().sum();
        let rank = (total * q).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, n) in counts.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return coyote_proxy::stats::LATENCY_BUCKETS_MS.get(i).copied();
            }
        }
        None
    };
    let domains = stats
        .domains()
        .into_iter()
        .map(|(domain, c)| DomainStats {
            requests_by_class: c.by_class,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            latency_p50_ms_at_most: bound(&c, 50),
            latency_p99_ms_at_most: bound(&c, 99),
            domain,
        })
        .collect();
    WebStats { open_connections, connections, tls_handshakes, tls_handshake_failures, domains }
}

/// The node's own pages behind the proxy: `router` (the CRM) answers the admin domain in-process,
/// told who asks (for its limits) and whether over TLS (for its cookies).
pub(crate) fn local_pages(router: axum::Router) -> coyote_proxy::Local {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    Arc::new(move |mut request: hyper::Request<coyote_proxy::Body>, client: coyote_proxy::ClientInfo| {
        let router = router.clone();
        Box::pin(async move {
            let extensions = request.extensions_mut();
            extensions.insert(axum::extract::ConnectInfo(std::net::SocketAddr::new(client.ip, 0)));
            if client.https {
                extensions.insert(coyote_crm::OverTls);
            }
            let request = request.map(axum::body::Body::new);
            let Ok(response) = router.oneshot(request).await;
            response.map(|body| body.map_err(|e| Box::new(e) as coyote_proxy::BoxError).boxed_unsync())
        })
    })
}
