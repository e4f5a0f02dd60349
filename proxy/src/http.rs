//! HTTP: serving a client's connection, routing each request, and the pool of connections to
//! containers.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::pages::{self, error};
use crate::table::Route;
use crate::{
    Backend, Body, BoxError, BoxStream, Proxy, Refusal, FORWARDED_CLIENT, FORWARDED_HOST, FORWARDED_PROTO,
    TUNNEL_PASSTHROUGH, TUNNEL_SWITCHED, TUNNEL_UPGRADE,
};

/// Where ACME HTTP-01 challenges are asked for: never redirected to HTTPS.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";
/// HTTP/2 streams a client may have open at once on one connection.
pub const H2_STREAMS_MAX: u32 = 256;

/// Who sent a request, as the container is told.
#[derive(Clone, Copy, Debug)]
struct Peer {
    ip: IpAddr,
    https: bool,
}

/// Serves one client connection (TLS already terminated when `https`), until it closes.
pub(crate) async fn serve<IO>(proxy: Arc<Proxy>, io: IO, peer: SocketAddr, https: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let settings = proxy.settings.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(H2_STREAMS_MAX)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let client = Peer { ip: peer.ip(), https };
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let proxy = proxy.clone();
        async move {
            let request = request.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
            Ok::<_, Infallible>(handle(proxy, request, client).await)
        }
    });
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), service).await {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// The host a request names: its URI's authority (HTTP/2, absolute-form) or its `Host` header.
fn request_host(request: &Request<Body>) -> Option<String> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str().to_string());
    }
    let host = request.headers().get(header::HOST)?.to_str().ok()?;
    (!host.is_empty()).then(|| host.to_string())
}

async fn handle(proxy: Arc<Proxy>, request: Request<Body>, client: Peer) -> Response<Body> {
    let started = Instant::now();
    let host = request_host(&request);
    let table = proxy.table();
    let route = host.as_deref().and_then(|h| table.lookup(h)).cloned();
    let bytes_in = content_length(request.headers()).unwrap_or(0);
    let challenge = request.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX).and_then(|t| proxy.challenge(t));
    let response = match (&host, &route) {
        _ if challenge.is_some() && request.method() == Method::GET => {
            let answer = challenge.unwrap_or_default();
            let mut response = Response::new(pages::full(answer));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        }
        _ if request.method() == Method::CONNECT => {
            error(StatusCode::METHOD_NOT_ALLOWED, "This server is not a forward proxy.")
        }
        (None, _) => error(StatusCode::BAD_REQUEST, "The request names no host."),
        (Some(host), None) => error(
            StatusCode::NOT_FOUND,
            &format!("No site named {} is served here.", crate::table::strip_port(host)),
        ),
        (Some(host), Some(_))
            if !client.https
                && proxy.settings.redirect_to_https
                && !request.uri().path().starts_with(ACME_CHALLENGE_PREFIX) =>
        {
            redirect_to_https(host, request.uri())
        }
        (Some(host), Some(route)) if route.local => match proxy.local_pages() {
            Some(pages) => {
                let mut request = request;
                // HTTP/2 names the host in the URI alone; the pages read the Host header.
                if let Ok(value) = HeaderValue::from_str(host) {
                    request.headers_mut().insert(header::HOST, value);
                }
                let client = crate::ClientInfo { ip: client.ip, https: client.https };
                pages(request, client).await
            }
            None => error(
                StatusCode::NOT_FOUND,
                &format!("No site named {} is served here.", crate::table::strip_port(host)),
            ),
        },
        (Some(host), Some(route)) => {
            let host = host.clone();
            match route.master {
                None => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "The site is being set up; try again in a moment.")
                }
                Some(master) if master == proxy.backend.node_id() => {
                    local(&proxy, route, request, &host, client, None).await
                }
                Some(master) => forward(&proxy, master, request, &host, client).await,
            }
        }
    };
    let domain =
        route.as_ref().and(host.as_deref()).map(|h| crate::table::strip_port(h).to_ascii_lowercase());
    proxy.stats.request(domain.as_deref(), response.status().as_u16(), bytes_in, 0, started.elapsed());
    count_out(&proxy, domain, response)
}

/// Adds the bytes of `response`'s body to the domain's count as they are sent.
fn count_out(proxy: &Arc<Proxy>, domain: Option<String>, response: Response<Body>) -> Response<Body> {
    let Some(domain) = domain else { return response };
    let stats = proxy.stats.clone();
    response.map(move |body| {
        Counted { inner: body, sent: 0, on_end: Some(Box::new(move |n| stats.bytes_out(&domain, n))) }
            .boxed_unsync()
    })
}

/// A request forwarded by another node's proxy: served here or refused, never forwarded again.
pub(crate) async fn handle_forwarded(proxy: Arc<Proxy>, mut request: Request<Body>) -> Response<Body> {
    if let Some(name) = request.headers_mut().remove(TUNNEL_PASSTHROUGH) {
        let name = name.to_str().unwrap_or_default().to_string();
        return crate::tls::passthrough_forwarded(&proxy, &name, request.into_body()).await;
    }
    let headers = request.headers_mut();
    let host = headers.remove(FORWARDED_HOST).and_then(|v| v.to_str().ok().map(str::to_string));
    let ip = headers
        .remove(FORWARDED_CLIENT)
        .and_then(|v| v.to_str().ok().and_then(|s| s.parse::<IpAddr>().ok()))
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let https = headers.remove(FORWARDED_PROTO).is_some_and(|v| v.as_bytes() == b"https");
    let Some(host) = host else {
        return error(StatusCode::BAD_REQUEST, "The forwarded request names no host.");
    };
    let table = proxy.table();
    let Some(route) = table.lookup(&host).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("No site named {} is served here.", crate::table::strip_port(&host)),
        );
    };
    if route.master != Some(proxy.backend.node_id()) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The site is moving to another server; try again in a moment.",
        );
    }
    let peer = Peer { ip, https };
    match request.headers_mut().remove(TUNNEL_UPGRADE) {
        None => local(&proxy, &route, request, &host, peer, None).await,
        Some(protocol) => {
            // The switch as the container expects it; the body is the client's side of the tunnel.
            let (mut parts, tunnel) = request.into_parts();
            parts.version = Version::HTTP_11;
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
            let request = Request::from_parts(parts, pages::empty());
            local(&proxy, &route, request, &host, peer, Some(tunnel)).await
        }
    }
}

fn redirect_to_https(host: &str, uri: &Uri) -> Response<Body> {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("https://{}{path}", crate::table::strip_port(host));
    let mut response = Response::new(pages::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => error(StatusCode::BAD_REQUEST, "The request's path cannot be redirected."),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Whether `request` asks to switch protocols (a websocket, say): HTTP/1.1 with `Connection:
/// upgrade` and an `Upgrade` header.
fn is_upgrade(request: &Request<Body>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Headers that belong to one connection and are not passed on: the fixed list and those that
/// `Connection` names. With `keep_upgrade`, `Connection` and `Upgrade` stay (a protocol switch passes
/// them on).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    for name in
        ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "proxy-authorization"]
    {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Adds what the container should know about the client: `X-Forwarded-For` (appended to what the
/// client sent), `-Proto`, `-Host`, and `Forwarded` (RFC 7239, appended).
fn set_forwarding_headers(headers: &mut HeaderMap, host: &str, client: Peer) {
    let proto = if client.https { "https" } else { "http" };
    let ip = client.ip.to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) if !before.trim().is_empty() => format!("{before}, {ip}"),
        _ => ip.clone(),
    };
    let node = match client.ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let forwarded_host = crate::table::strip_port(host);
    let forwarded = format!("for={node};proto={proto};host=\"{host}\"");
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(before) if !before.trim().is_empty() => format!("{before}, {forwarded}"),
        _ => forwarded,
    };
    for (name, value) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", proto.to_string()),
        ("x-forwarded-host", forwarded_host.to_string()),
        ("forwarded", forwarded),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// The request's body, cut at the proxy's limit; the 413 answer when its `Content-Length` is already
/// over.
#[allow(clippy::result_large_err)] // built once per request, never propagated further
fn limit_body(proxy: &Proxy, request: Request<Body>) -> Result<Request<Body>, Response<Body>> {
    let max = proxy.settings.max_body_bytes;
    if content_length(request.headers()).is_some_and(|n| n > max) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("The request's body is larger than this server accepts ({max} bytes)."),
        ));
    }
    Ok(request.map(|b| Limited::new(b, max as usize).boxed_unsync()))
}

/// Serves `request` from the service's container on this node. `tunnel` is the client's side of a
/// protocol switch forwarded by another node's proxy ([`TUNNEL_UPGRADE`]).
async fn local(
    proxy: &Arc<Proxy>,
    route: &Route,
    request: Request<Body>,
    host: &str,
    client: Peer,
    tunnel: Option<Body>,
) -> Response<Body> {
    let mut request = match limit_body(proxy, request) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let upgrade = is_upgrade(&request);
    let client_upgrade = (upgrade && tunnel.is_none()).then(|| hyper::upgrade::on(&mut request));
    let opened = match proxy.backend.open(&route.service, route.port).await {
        Ok(opened) => opened,
        Err(Refusal::NotServing) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The site is moving to another server; try again in a moment.",
            )
        }
        Err(Refusal::Down(why)) => {
            tracing::info!(service = route.service, "{why}");
            return error(StatusCode::BAD_GATEWAY, "The site's container is not running.");
        }
        Err(Refusal::Timeout(why)) => {
            tracing::info!(service = route.service, "{why}");
            return error(StatusCode::SERVICE_UNAVAILABLE, "The site is starting; try again in a moment.");
        }
    };
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = match format!("http://{}{path}", opened.addr).parse() {
        Ok(uri) => uri,
        Err(_) => return error(StatusCode::BAD_REQUEST, "The request's path is not valid."),
    };
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Ok(value) = HeaderValue::from_str(host) {
        parts.headers.insert(header::HOST, value);
    }
    set_forwarding_headers(&mut parts.headers, host, client);
    let sent = tokio::time::timeout(
        proxy.settings.upstream_timeout,
        proxy.client.send(Request::from_parts(parts, body)),
    )
    .await;
    let mut response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::info!(service = route.service, error = %e, "the container did not take the request");
            return error(StatusCode::BAD_GATEWAY, "The site's container did not answer.");
        }
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "The site did not answer within {} seconds.",
                    proxy.settings.upstream_timeout.as_secs()
                ),
            )
        }
    };
    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, response.status()) {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let guard = opened.guard;
        let service = route.service.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) else {
                tracing::debug!(service, "a protocol switch did not complete");
                return;
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            // No idle cut: the connection lasts while either side keeps it open.
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, pages::empty());
    }
    if let (Some(tunnel), StatusCode::SWITCHING_PROTOCOLS) = (tunnel, response.status()) {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned().unwrap_or(HeaderValue::from_static(""));
        strip_hop_by_hop(&mut parts.headers, false);
        parts.status = StatusCode::OK;
        parts.headers.insert(TUNNEL_SWITCHED, protocol);
        let (to_client, body) = tunnel_body();
        let guard = opened.guard;
        let service = route.service.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(upstream) = upstream_upgrade.await else {
                tracing::debug!(service, "a forwarded protocol switch did not complete");
                return;
            };
            // No idle cut: the tunnel lasts while either side keeps it open.
            bridge(TokioIo::new(upstream), to_client, tunnel).await;
        });
        return Response::from_parts(parts, body);
    }
    strip_hop_by_hop(response.headers_mut(), false);
    let guard = opened.guard;
    response.map(move |body| {
        let body = body.map_err(|e| Box::new(e) as BoxError);
        Counted { inner: body.boxed_unsync(), sent: 0, on_end: Some(Box::new(move |_| drop(guard))) }
            .boxed_unsync()
    })
}

/// Sends `request` to the master's proxy.
async fn forward(
    proxy: &Arc<Proxy>,
    master: crate::NodeId,
    request: Request<Body>,
    host: &str,
    client: Peer,
) -> Response<Body> {
    let mut request = request;
    let switch = is_upgrade(&request)
        .then(|| {
            request.headers().get(header::UPGRADE).cloned().map(|p| (p, hyper::upgrade::on(&mut request)))
        })
        .flatten();
    let (mut parts, mut body) = match limit_body(proxy, request) {
        Ok(r) => r.into_parts(),
        Err(response) => return response,
    };
    strip_hop_by_hop(&mut parts.headers, false);
    // A protocol switch travels as a tunnel: the request's body carries what the client sends.
    let tunnel = switch.map(|(protocol, client_upgrade)| {
        parts.headers.insert(TUNNEL_UPGRADE, protocol);
        let (to_master, tunnel) = tunnel_body();
        body = tunnel;
        (client_upgrade, to_master)
    });
    let forwarded = [
        (FORWARDED_HOST, host.to_string()),
        (FORWARDED_CLIENT, client.ip.to_string()),
        (FORWARDED_PROTO, if client.https { "https" } else { "http" }.to_string()),
    ];
    for (name, value) in forwarded {
        match HeaderValue::from_str(&value) {
            Ok(v) => {
                parts.headers.insert(name, v);
            }
            Err(_) => return error(StatusCode::BAD_REQUEST, "The request's host is not valid."),
        }
    }
    let timeout = proxy.settings.upstream_timeout + Duration::from_secs(5);
    match tokio::time::timeout(timeout, proxy.backend.forward(master, Request::from_parts(parts, body))).await
    {
        Ok(Ok(response)) => match tunnel {
            Some((client_upgrade, to_master)) => tunnel_back(response, client_upgrade, to_master),
            None => response,
        },
        Ok(Err(e)) => {
            tracing::info!(master, error = %e, "cannot forward a request to the master's proxy");
            error(StatusCode::BAD_GATEWAY, "The server that runs this site cannot be reached from here.")
        }
        Err(_) => {
            error(StatusCode::GATEWAY_TIMEOUT, "The server that runs this site did not answer in time.")
        }
    }
}

/// Bytes read at a time from one side of a tunnel.
const TUNNEL_BUFFER: usize = 16 * 1024;
/// Frames a tunnel's body holds before the side that reads into it waits.
const TUNNEL_FRAMES: usize = 8;

pub(crate) type TunnelSender = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// A body fed by the sender: one side of a tunnel.
pub(crate) fn tunnel_body() -> (TunnelSender, Body) {
    let (sender, receiver) = tokio::sync::mpsc::channel(TUNNEL_FRAMES);
    let frames = futures::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|f| (f, r)) });
    (sender, StreamBody::new(frames).boxed_unsync())
}

/// Sends what `from` reads into a tunnel's body, until either ends.
async fn pump(mut from: impl AsyncRead + Unpin, to: TunnelSender) {
    let mut buffer = vec![0u8; TUNNEL_BUFFER];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send(Ok(Frame::data(Bytes::copy_from_slice(&buffer[..n])))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Carries a connection's bytes into a tunnel (`to`) and the tunnel's bytes (`from`) back to it,
/// until both directions have ended.
pub(crate) async fn bridge(io: impl AsyncRead + AsyncWrite, to: TunnelSender, from: Body) {
    let (read, write) = tokio::io::split(io);
    tokio::join!(pump(read, to), drain(from, write));
}

/// Writes a tunnel's body to `to`, then closes `to`'s sending side.
async fn drain(mut from: Body, mut to: impl AsyncWrite + Unpin) {
    while let Some(Ok(frame)) = from.frame().await {
        if let Ok(data) = frame.into_data() {
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
    }
    let _ = to.shutdown().await;
}

/// The master's answer to a forwarded protocol switch, for the client: `101` and a tunnel between
/// the client's connection and the answer's body when the container switched, else the answer.
fn tunnel_back(
    response: Response<Body>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    to_master: TunnelSender,
) -> Response<Body> {
    let Some(protocol) = response.headers().get(TUNNEL_SWITCHED).cloned() else { return response };
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, from_master) = response.into_parts();
    parts.headers.remove(TUNNEL_SWITCHED);
    parts.status = StatusCode::SWITCHING_PROTOCOLS;
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, protocol);
    tokio::spawn(async move {
        let Ok(client) = client_upgrade.await else {
            tracing::debug!("a forwarded protocol switch did not complete");
            return;
        };
        bridge(TokioIo::new(client), to_master, from_master).await;
    });
    Response::from_parts(parts, pages::empty())
}

/// Counts a body's bytes as they pass, and calls `on_end` with the count when the body ends or is
/// dropped.
struct Counted {
    inner: Body,
    sent: u64,
    on_end: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.sent += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.sent);
        }
    }
}

/// Keep-alive HTTP/1.1 connections to containers, pooled per address.
pub(crate) struct Upstream {
    client: Client<Connector, Body>,
}

impl Upstream {
    pub(crate) fn new(backend: Arc<dyn Backend>, idle: Duration) -> Upstream {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .set_host(false)
            .build(Connector { backend });
        Upstream { client }
    }

    async fn send(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(request).await
    }
}

/// Dials containers through the node's [`Backend::dial`] (the operating system's TCP, or the
/// simulator's).
#[derive(Clone)]
pub(crate) struct Connector {
    backend: Arc<dyn Backend>,
}

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Conn>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let backend = self.backend.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::other(format!("{uri} names no container address")))?;
            let stream = backend.dial(addr).await?;
            Ok(Conn(TokioIo::new(stream)))
        })
    }
}

/// A connection to a container, as hyper's client pool takes it.
pub(crate) struct Conn(TokioIo<BoxStream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key(header::CONNECTION) && h.contains_key(header::UPGRADE));
    }

    #[test]
    fn the_container_learns_who_asked() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        let client = Peer { ip: "2001:db8::1".parse().unwrap(), https: true };
        set_forwarding_headers(&mut h, "blog.example.org:443", client);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "blog.example.org");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https;host=\"blog.example.org:443\"");
    }

    #[test]
    fn redirects_keep_the_path_and_drop_the_port() {
        let uri: Uri = "/a/b?c=d".parse().unwrap();
        let r = redirect_to_https("blog.example.org:80", &uri);
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "https://blog.example.org/a/b?c=d");
    }
}
