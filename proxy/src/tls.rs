//! TLS on the HTTPS listener: the ClientHello read first (to route passthrough names undecrypted),
//! certificates resolved by name, and the handshake.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::table::Table;
use crate::{BoxStream, Proxy, TUNNEL_PASSTHROUGH};

/// The most a ClientHello may take, in bytes (they are a few hundred; post-quantum key shares make
/// them a few thousand).
pub const HELLO_MAX_BYTES: usize = 64 * 1024;
/// A certificate is issued again once it is this old (the cluster CA's are valid for 90 days).
pub const REISSUE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);
/// TLS sessions the server remembers for resumption by session id (tickets need no memory).
pub const SESSION_CACHE: usize = 4096;
/// The fatal `unrecognized_name` alert (TLS record: alert, TLS 1.2 record version, length 2, fatal,
/// 112), sent to a client that asks for a name no service has, or for none.
const UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Makes certificates for names.
pub trait Issuer: Send + Sync + 'static {
    /// A certificate and its key for `name`.
    fn issue(&self, name: &str) -> Result<Arc<CertifiedKey>, String>;
}

/// The certificates of the names the routing table holds: those installed from the log (issued by
/// an ACME CA) first; for any other name, one from the [`Issuer`] (the cluster CA's, or a
/// self-signed placeholder while the real one is pending), made on a first handshake and kept.
pub struct Certificates {
    issuer: Arc<dyn Issuer>,
    known: RwLock<HashSet<String>>,
    installed: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    issued: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").field("known", &self.known.read().map(|k| k.len()).ok()).finish()
    }
}

impl Certificates {
    pub fn new(issuer: Arc<dyn Issuer>) -> Self {
        Certificates {
            issuer,
            known: RwLock::default(),
            installed: RwLock::default(),
            issued: Mutex::default(),
        }
    }

    /// Serves these certificates from now on (by lowercase name), in place of those installed before.
    pub fn install(&self, certificates: HashMap<String, Arc<CertifiedKey>>) {
        *self.installed.write().expect("certificates lock") = certificates;
    }

    /// Whether a certificate from the log is installed for `name`.
    pub fn is_installed(&self, name: &str) -> bool {
        self.installed.read().expect("certificates lock").contains_key(name)
    }

    /// Serves the names of `table` from now on, and forgets the certificates of other names.
    pub fn retain(&self, table: &Table) {
        let names: HashSet<String> = table.names().map(str::to_string).collect();
        self.issued.lock().expect("certificates lock").retain(|name, _| names.contains(name));
        *self.known.write().expect("certificates lock") = names;
    }

    /// The certificate for `name`, if the table holds it; issued now if it has none yet (or an old one).
    pub fn get(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !self.known.read().expect("certificates lock").contains(&name) {
            return None;
        }
        if let Some(key) = self.installed.read().expect("certificates lock").get(&name) {
            return Some(key.clone());
        }
        let mut issued = self.issued.lock().expect("certificates lock");
        if let Some((at, key)) = issued.get(&name) {
            if at.elapsed() < REISSUE_AFTER {
                return Some(key.clone());
            }
        }
        match self.issuer.issue(&name) {
            Ok(key) => {
                issued.insert(name, (Instant::now(), key.clone()));
                Some(key)
            }
            Err(e) => {
                tracing::warn!(name, "cannot issue a certificate: {e}");
                issued.get(&name).map(|(_, key)| key.clone())
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get(hello.server_name()?)
    }
}

/// The server side of the proxy's TLS: certificates by name, TLS 1.3 and 1.2, HTTP/2 and HTTP/1.1
/// by ALPN, session tickets and a session cache for resumption.
pub fn server_config(certificates: Arc<Certificates>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    match rustls::crypto::ring::Ticketer::new() {
        Ok(ticketer) => config.ticketer = ticketer,
        Err(e) => tracing::warn!("TLS session tickets are off: {e}"),
    }
    Arc::new(config)
}

/// The ALPN protocol of ACME's TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// What the proxy reads of a ClientHello.
pub struct Hello {
    /// The bytes read, to be replayed to the handshake or the container.
    pub seen: Vec<u8>,
    /// The name it asks for.
    pub name: Option<String>,
    /// Whether it asks for the ACME TLS-ALPN-01 protocol.
    pub acme: bool,
}

/// Reads a client's ClientHello from `io`. A malformed hello gets its TLS alert and an error.
pub async fn read_hello(io: &mut BoxStream) -> io::Result<Hello> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed before its ClientHello",
            ));
        }
        seen.extend_from_slice(&chunk[..n]);
        acceptor.read_tls(&mut &chunk[..n])?;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let name = hello.server_name().map(str::to_string);
                let acme = hello.alpn().is_some_and(|mut p| p.any(|p| p == ACME_TLS_ALPN));
                return Ok(Hello { seen, name, acme });
            }
            Ok(None) if seen.len() > HELLO_MAX_BYTES => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "the ClientHello is too large"));
            }
            Ok(None) => {}
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = io.write_all(&out).await;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a TLS ClientHello: {e}"),
                ));
            }
        }
    }
}

/// Serves one connection of the HTTPS listener.
pub(crate) async fn serve(proxy: Arc<Proxy>, mut io: BoxStream, peer: SocketAddr) {
    let timeout = proxy.settings.handshake_timeout;
    let Hello { seen, name, acme } = match tokio::time::timeout(timeout, read_hello(&mut io)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS connection refused: {e}");
            proxy.stats.handshake(false);
            return;
        }
        Err(_) => {
            proxy.stats.handshake(false);
            return;
        }
    };
    if acme {
        // The CA checking a TLS-ALPN-01 challenge: the handshake is the answer, nothing follows it.
        if let Some(key) = name.as_deref().and_then(|n| proxy.alpn_challenge(n)) {
            answer_alpn_challenge(key, seen, io, timeout).await;
        } else {
            let _ = io.write_all(&UNRECOGNIZED_NAME).await;
        }
        return;
    }
    let route = name.as_deref().and_then(|n| proxy.table().lookup(n).cloned());
    let Some(route) = route else {
        // A name no service has, or none: say so, never show another site's certificate.
        let _ = io.write_all(&UNRECOGNIZED_NAME).await;
        proxy.stats.handshake(false);
        return;
    };
    if route.passthrough {
        passthrough(&proxy, &route, name.as_deref().unwrap_or_default(), seen, io).await;
        return;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(proxy.tls.clone());
    let stream = match tokio::time::timeout(timeout, acceptor.accept(Rewind { seen, at: 0, inner: io })).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            proxy.stats.handshake(false);
            return;
        }
        Err(_) => {
            proxy.stats.handshake(false);
            return;
        }
    };
    proxy.stats.handshake(true);
    crate::http::serve(proxy, stream, peer, true).await;
}

/// One certificate for every name.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Completes a handshake with the challenge certificate, speaking only `acme-tls/1`.
async fn answer_alpn_challenge(key: Arc<CertifiedKey>, seen: Vec<u8>, io: BoxStream, timeout: Duration) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    else {
        return;
    };
    let mut config = builder.with_no_client_auth().with_cert_resolver(Arc::new(Fixed(key)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    if let Ok(Ok(mut stream)) =
        tokio::time::timeout(timeout, acceptor.accept(Rewind { seen, at: 0, inner: io })).await
    {
        let _ = stream.shutdown().await;
    }
}

/// Splices a TLS connection, its ClientHello first, to the container that terminates it: here when
/// this node is the service's master, else through the master's proxy ([`TUNNEL_PASSTHROUGH`]).
async fn passthrough(proxy: &Arc<Proxy>, route: &crate::Route, name: &str, seen: Vec<u8>, mut io: BoxStream) {
    match route.master {
        None => return,
        Some(master) if master != proxy.backend.node_id() => {
            let Ok(name) = hyper::header::HeaderValue::from_str(name) else { return };
            let (to_master, body) = crate::http::tunnel_body();
            let Ok(request) = hyper::Request::builder()
                .method(hyper::Method::POST)
                .uri("/")
                .header(TUNNEL_PASSTHROUGH, name)
                .body(body)
            else {
                return;
            };
            if to_master.send(Ok(hyper::body::Frame::data(bytes::Bytes::from(seen)))).await.is_err() {
                return;
            }
            let timeout = proxy.settings.upstream_timeout + Duration::from_secs(5);
            let response = match tokio::time::timeout(timeout, proxy.backend.forward(master, request)).await {
                Ok(Ok(response)) if response.status() == hyper::StatusCode::OK => response,
                Ok(Ok(response)) => {
                    tracing::info!(service = route.service, status = %response.status(), "the master refused a passthrough connection");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::info!(service = route.service, error = %e, "cannot forward a passthrough connection");
                    return;
                }
                Err(_) => return,
            };
            crate::http::bridge(io, to_master, response.into_body()).await;
            return;
        }
        Some(_) => {}
    }
    let opened =
        match proxy.backend.open(&route.service, coyote_state_machine::spec::TLS_PASSTHROUGH_PORT).await {
            Ok(opened) => opened,
            Err(e) => {
                tracing::info!(service = route.service, "passthrough connection refused: {e:?}");
                return;
            }
        };
    let Ok(mut upstream) = proxy.backend.dial(opened.addr).await else { return };
    if upstream.write_all(&seen).await.is_err() {
        return;
    }
    let _guard = opened.guard;
    let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
}

/// A passed-through TLS connection forwarded by another node's proxy: spliced to the container
/// here, the answer's body carrying what the container sends.
pub(crate) async fn passthrough_forwarded(
    proxy: &Arc<Proxy>,
    name: &str,
    from_client: crate::Body,
) -> hyper::Response<crate::Body> {
    use crate::pages::error;
    use hyper::StatusCode;
    let route = proxy.table().lookup(name).cloned();
    let Some(route) = route.filter(|r| r.passthrough) else {
        return error(StatusCode::NOT_FOUND, "No site with TLS passthrough has this name here.");
    };
    if route.master != Some(proxy.backend.node_id()) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The site is moving to another server; try again in a moment.",
        );
    }
    let opened =
        match proxy.backend.open(&route.service, coyote_state_machine::spec::TLS_PASSTHROUGH_PORT).await {
            Ok(opened) => opened,
            Err(e) => {
                tracing::info!(service = route.service, "forwarded passthrough connection refused: {e:?}");
                return error(StatusCode::SERVICE_UNAVAILABLE, "The site cannot be reached now.");
            }
        };
    let Ok(upstream) = proxy.backend.dial(opened.addr).await else {
        return error(StatusCode::BAD_GATEWAY, "The site's container is not running.");
    };
    let (to_client, body) = crate::http::tunnel_body();
    let guard = opened.guard;
    tokio::spawn(async move {
        let _guard = guard;
        crate::http::bridge(upstream, to_client, from_client).await;
    });
    hyper::Response::new(body)
}

/// A stream that first yields bytes already read from it.
struct Rewind {
    seen: Vec<u8>,
    at: usize,
    inner: BoxStream,
}

impl AsyncRead for Rewind {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.at < me.seen.len() {
            let n = (me.seen.len() - me.at).min(buf.remaining());
            buf.put_slice(&me.seen[me.at..me.at + n]);
            me.at += n;
            if me.at == me.seen.len() {
                me.seen = Vec::new();
                me.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
