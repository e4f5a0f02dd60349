//! The proxy between real clients (curl, raw TCP) and a real HTTP server on loopback. The node
//! under the proxy is a small [`Backend`] of the test's own: which node masters a site, whether this
//! node may serve it, and the cluster link between two proxies (a direct call). The whole node, with
//! Docker and the cluster's mutual TLS, is tested in `tests/tests/front.rs`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use coyote_proxy::{Backend, Body, BoxStream, Issuer, NodeId, Opened, Proxy, Refusal, Settings, Table};
use coyote_state_machine::{Placement, Service, ServiceSpec, State};
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A CA of the test's own, which signs a certificate for each name asked.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
    issued: AtomicUsize,
}

impl TestCa {
    fn new() -> Arc<TestCa> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "front test CA");
        let cert = params.self_signed(&key).unwrap();
        let pem = cert.pem();
        Arc::new(TestCa { issuer: rcgen::Issuer::new(params, key), pem, issued: AtomicUsize::new(0) })
    }
}

impl Issuer for TestCa {
    fn issue(&self, name: &str) -> Result<Arc<CertifiedKey>, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::ring::default_provider();
        self.issued.fetch_add(1, Ordering::SeqCst);
        CertifiedKey::from_der(vec![CertificateDer::from(cert.der().to_vec())], der, &provider)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

/// One node as its proxy sees it.
struct TestNode {
    id: NodeId,
    /// Where every site's container listens.
    upstream: SocketAddr,
    serving: AtomicBool,
    peers: Mutex<HashMap<NodeId, Arc<Proxy>>>,
    forwarded: AtomicUsize,
    /// Where a service's container terminates passed-through TLS.
    tls_upstream: Mutex<Option<SocketAddr>>,
}

impl Backend for TestNode {
    fn node_id(&self) -> NodeId {
        self.id
    }

    fn open(&self, _service: &str, port: u16) -> BoxFuture<'_, Result<Opened, Refusal>> {
        Box::pin(async move {
            if !self.serving.load(Ordering::SeqCst) {
                return Err(Refusal::NotServing);
            }
            if port == coyote_state_machine::spec::TLS_PASSTHROUGH_PORT {
                let addr = self.tls_upstream.lock().unwrap().ok_or(Refusal::NotServing)?;
                return Ok(Opened { addr, guard: None });
            }
            Ok(Opened { addr: self.upstream, guard: None })
        })
    }

    fn forward(
        &self,
        master: NodeId,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, String>> {
        self.forwarded.fetch_add(1, Ordering::SeqCst);
        let peer = self.peers.lock().unwrap().get(&master).cloned();
        Box::pin(async move {
            let peer = peer.ok_or_else(|| format!("node {master} is not reachable"))?;
            Ok(peer.handle_forwarded(request).await)
        })
    }

    fn dial(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<BoxStream>> {
        Box::pin(async move { Ok(Box::new(TcpStream::connect(addr).await?) as BoxStream) })
    }
}

/// A web server that tells what it received, and echoes the bytes of an upgraded connection.
async fn container() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|mut request: Request<Incoming>| async move {
                    if request.headers().contains_key(header::UPGRADE) {
                        let upgrade = hyper::upgrade::on(&mut request);
                        tokio::spawn(async move {
                            if let Ok(upgraded) = upgrade.await {
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let response = Response::builder()
                            .status(101)
                            .header(header::CONNECTION, "upgrade")
                            .header(header::UPGRADE, "echo")
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        return Ok::<_, Infallible>(response);
                    }
                    let h = |name: &str| {
                        request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string()
                    };
                    let text = format!(
                        "path={} host={} xff={} xfp={} xfh={} version={:?}\n",
                        request.uri(),
                        h("host"),
                        h("x-forwarded-for"),
                        h("x-forwarded-proto"),
                        h("x-forwarded-host"),
                        request.version()
                    );
                    Ok(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn spec(name: &str, domain: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        image: "img:1".into(),
        domains: vec![domain.into()],
        ports: vec![],
        memory_bytes: None,
        on_demand: false,
        dump: None,
        http_check: None,
        zone: None,
        http_port: None,
        tls_passthrough: false,
        keep: None,
    }
}

/// The table of a cluster where `blog.test` and `shop.test` are mastered by `master`.
fn table(master: NodeId) -> Table {
    let mut state = State::default();
    for (name, domain) in [("blog", "blog.test"), ("shop", "shop.test")] {
        state.services.insert(
            name.into(),
            Service {
                spec: spec(name, domain),
                placement: Some(Placement { master, failover: None, backups: vec![] }),
                created_at_ms: 0,
                serve_from_ms: 0,
            },
        );
    }
    Table::from_state(&state)
}

struct Front {
    node: Arc<TestNode>,
    proxy: Arc<Proxy>,
    http: SocketAddr,
    https: SocketAddr,
    ca: Arc<TestCa>,
    ca_file: tempfile::NamedTempFile,
}

async fn listen(proxy: Arc<Proxy>, https: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { return };
            let io = Box::new(stream) as BoxStream;
            let proxy = proxy.clone();
            if https {
                tokio::spawn(proxy.serve_https(io, peer));
            } else {
                tokio::spawn(proxy.serve_http(io, peer));
            }
        }
    });
    addr
}

async fn front(id: NodeId, master: NodeId, settings: Settings) -> Front {
    let upstream = container().await;
    let node = Arc::new(TestNode {
        id,
        upstream,
        serving: AtomicBool::new(true),
        peers: Mutex::default(),
        forwarded: AtomicUsize::new(0),
        tls_upstream: Mutex::default(),
    });
    let ca = TestCa::new();
    let proxy = Proxy::new(node.clone(), ca.clone(), settings);
    proxy.set_table(table(master));
    let http = listen(proxy.clone(), false).await;
    let https = listen(proxy.clone(), true).await;
    let mut ca_file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut ca_file, ca.pem.as_bytes()).unwrap();
    Front { node, proxy, http, https, ca, ca_file }
}

/// curl's exit status, its output and its stderr.
async fn curl(args: Vec<String>) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || Command::new("curl").args(&args).output())
        .await
        .unwrap()
        .expect("curl is needed by this test (apt-get install curl)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn https_args(f: &Front, name: &str, path: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "--resolve".into(),
        format!("{name}:{}:127.0.0.1", f.https.port()),
        "--cacert".into(),
        f.ca_file.path().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("https://{name}:{}{path}", f.https.port()));
    args
}

#[tokio::test]
async fn sites_are_served_by_name_over_http1_and_http2() {
    let f = front(1, 1, Settings::default()).await;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (code, out, err) =
            curl(https_args(&f, "blog.test", "/a?b=c", &[flag, "-w", "\\n%{http_version} %{http_code}"]))
                .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("path=/a?b=c host=blog.test:"), "{out}");
        assert!(out.contains("xff=127.0.0.1 xfp=https xfh=blog.test version=HTTP/1.1"), "{out}");
        assert!(out.ends_with(&format!("{version} 200")), "{flag}: {out}");
    }
    // One certificate per name, issued once and kept.
    let (code, _, err) = curl(https_args(&f, "shop.test", "/", &[])).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(f.ca.issued.load(Ordering::SeqCst), 2);
    let counts = f.proxy.stats.domains();
    assert_eq!(counts["blog.test"].by_class[1], 2, "{counts:?}");
    assert!(counts["blog.test"].bytes_out > 0);
}

#[tokio::test]
async fn plain_http_is_sent_to_https_except_acme_challenges() {
    let f = front(1, 1, Settings::default()).await;
    let url = |path: &str| format!("http://blog.test:{}{path}", f.http.port());
    let resolve = format!("blog.test:{}:127.0.0.1", f.http.port());
    let (_, out, _) = curl(vec![
        "-s".into(),
        "--resolve".into(),
        resolve.clone(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code} %{redirect_url}".into(),
        url("/x?y=1"),
    ])
    .await;
    assert_eq!(out, "308 https://blog.test/x?y=1");
    let (_, out, _) =
        curl(vec!["-s".into(), "--resolve".into(), resolve, url("/.well-known/acme-challenge/t0ken")]).await;
    assert!(out.contains("path=/.well-known/acme-challenge/t0ken") && out.contains("xfp=http"), "{out}");
}

#[tokio::test]
async fn unknown_names_and_garbage_get_tls_alerts_and_others_are_unaffected() {
    let f = front(1, 1, Settings::default()).await;
    let (code, _, err) = curl(https_args(&f, "other.test", "/", &[])).await;
    assert_eq!(code, 35, "a TLS failure: {err}");
    assert!(err.contains("unrecognized name"), "{err}");
    // Bytes that are not TLS: an alert back, then the connection closes.
    let mut s = TcpStream::connect(f.https).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: blog.test\r\n\r\n").await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await.unwrap().unwrap();
    assert_eq!(back.first(), Some(&0x15), "a TLS alert record: {back:?}");
    let (code, out, err) = curl(https_args(&f, "blog.test", "/", &[])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host=blog.test"));
    assert_eq!(f.ca.issued.load(Ordering::SeqCst), 1, "no certificate for an unknown name");
}

/// Sends `request` raw to `addr`; returns what came back before the server closed (or 5 s).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await;
    String::from_utf8_lossy(&back).into_owned()
}

#[tokio::test]
async fn limits_answer_with_a_status_and_slow_clients_are_cut() {
    let settings = Settings {
        redirect_to_https: false,
        max_header_bytes: 16 * 1024,
        header_timeout: Duration::from_millis(500),
        max_body_bytes: 1000,
        ..Settings::default()
    };
    let f = front(1, 1, settings).await;
    let big = format!("GET / HTTP/1.1\r\nHost: blog.test\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    assert!(raw(f.http, big.as_bytes()).await.starts_with("HTTP/1.1 431"));
    let post = "POST / HTTP/1.1\r\nHost: blog.test\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n";
    assert!(raw(f.http, post.as_bytes()).await.starts_with("HTTP/1.1 413"));
    assert!(raw(f.http, b"GARBAGE\r\n\r\n").await.starts_with("HTTP/1.1 400"));
    let none = raw(f.http, b"GET / HTTP/1.1\r\nHost: nothing.test\r\nConnection: close\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 404") && none.contains("No site named nothing.test"), "{none}");
    // A client that never finishes its headers is disconnected; others go on meanwhile.
    let slow = tokio::spawn(async move {
        let started = std::time::Instant::now();
        raw(f.http, b"GET / HTTP/1.1\r\nHost: blog.te").await;
        started.elapsed()
    });
    let fine = raw(f.http, b"GET /ok HTTP/1.1\r\nHost: blog.test\r\nConnection: close\r\n\r\n").await;
    assert!(fine.starts_with("HTTP/1.1 200") && fine.contains("path=/ok"), "{fine}");
    let took = slow.await.unwrap();
    assert!(took < Duration::from_secs(4), "the slow client was cut after {took:?}");
}

#[tokio::test]
async fn a_node_that_is_not_the_master_forwards_to_it() {
    let master = front(2, 2, Settings { redirect_to_https: false, ..Settings::default() }).await;
    let other = front(1, 2, Settings { redirect_to_https: false, ..Settings::default() }).await;
    other.node.peers.lock().unwrap().insert(2, master.proxy.clone());
    let request =
        "GET /via HTTP/1.1\r\nHost: blog.test\r\nX-Forwarded-For: 198.51.100.7\r\nConnection: close\r\n\r\n";
    let back = raw(other.http, request.as_bytes()).await;
    assert!(back.starts_with("HTTP/1.1 200"), "{back}");
    assert!(back.contains("path=/via host=blog.test xff=198.51.100.7, 127.0.0.1 xfp=http"), "{back}");
    assert_eq!(other.node.forwarded.load(Ordering::SeqCst), 1);
    // The master that no longer serves (its fence) refuses; it never forwards again.
    master.node.serving.store(false, Ordering::SeqCst);
    let back = raw(other.http, request.as_bytes()).await;
    assert!(back.starts_with("HTTP/1.1 503"), "{back}");
    assert!(back.to_ascii_lowercase().contains("retry-after: 2"), "{back}");
    assert_eq!(master.node.forwarded.load(Ordering::SeqCst), 0);
    // The master's node cannot be reached: 502, saying so.
    other.node.peers.lock().unwrap().clear();
    let back = raw(other.http, request.as_bytes()).await;
    assert!(back.starts_with("HTTP/1.1 502") && back.contains("cannot be reached"), "{back}");
}

/// Three messages sent on an upgraded connection to the echoing container, and each read back.
async fn echo_rounds(s: &mut TcpStream) {
    for round in 0..3 {
        let msg = format!("hello {round}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg.as_bytes());
    }
}

#[tokio::test]
async fn an_upgraded_connection_outlives_a_routing_change() {
    let f = front(1, 1, Settings { redirect_to_https: false, ..Settings::default() }).await;
    let mut s = TcpStream::connect(f.http).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: blog.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The site moves to another node: new requests go there, this connection goes on.
    f.proxy.set_table(table(2));
    echo_rounds(&mut s).await;
    let back = raw(f.http, b"GET / HTTP/1.1\r\nHost: blog.test\r\nConnection: close\r\n\r\n").await;
    assert!(back.starts_with("HTTP/1.1 502") && back.contains("cannot be reached"), "now forwarded: {back}");
}

#[tokio::test]
async fn an_upgraded_connection_reaches_the_master_through_another_node() {
    let master = front(2, 2, Settings { redirect_to_https: false, ..Settings::default() }).await;
    let other = front(1, 2, Settings { redirect_to_https: false, ..Settings::default() }).await;
    other.node.peers.lock().unwrap().insert(2, master.proxy.clone());
    let mut s = TcpStream::connect(other.http).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: blog.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte)).await.unwrap().unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo") && !head.contains("x-coyote"), "{head}");
    assert_eq!(other.node.forwarded.load(Ordering::SeqCst), 1);
    // Both ways, several times, and a large message in pieces.
    echo_rounds(&mut s).await;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = big.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        // The client closes its side: the close travels to the container and back.
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert!(back == big, "{} bytes came back of {}", back.len(), big.len());
}

/// One certificate for every name.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A container that terminates TLS itself with a certificate for `name` from `ca`, and answers the
/// request of each connection with a page that says so.
async fn tls_container(ca: &TestCa, name: &str) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(ca.issue(name).unwrap())));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let page = "terminated by the container";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn passed_through_tls_reaches_the_container_from_any_node() {
    let master = front(2, 2, Settings::default()).await;
    let other = front(1, 2, Settings::default()).await;
    other.node.peers.lock().unwrap().insert(2, master.proxy.clone());
    // The container's certificate comes from the master's test CA, which curl trusts; the proxies
    // never issue one for the name.
    let vault = tls_container(&master.ca, "vault.test").await;
    let issued_before = (master.ca.issued.load(Ordering::SeqCst), other.ca.issued.load(Ordering::SeqCst));
    *master.node.tls_upstream.lock().unwrap() = Some(vault);
    let mut state = State::default();
    let mut vault_spec = spec("vault", "vault.test");
    vault_spec.tls_passthrough = true;
    state.services.insert(
        "vault".into(),
        Service {
            spec: vault_spec,
            placement: Some(Placement { master: 2, failover: None, backups: vec![] }),
            created_at_ms: 0,
            serve_from_ms: 0,
        },
    );
    for f in [&master, &other] {
        f.proxy.set_table(Table::from_state(&state));
    }
    for (f, through) in [(&master, "the master"), (&other, "another node")] {
        let args = vec![
            "-sS".to_string(),
            "--max-time".into(),
            "10".into(),
            "--cacert".into(),
            master.ca_file.path().display().to_string(),
            "--resolve".into(),
            format!("vault.test:{}:127.0.0.1", f.https.port()),
            format!("https://vault.test:{}/", f.https.port()),
        ];
        let (code, out, err) = curl(args).await;
        assert_eq!((code, out.as_str()), (0, "terminated by the container"), "through {through}: {err}");
    }
    assert_eq!(other.node.forwarded.load(Ordering::SeqCst), 1);
    assert_eq!(
        (master.ca.issued.load(Ordering::SeqCst), other.ca.issued.load(Ordering::SeqCst)),
        issued_before,
        "a proxy made a certificate for a passed-through name"
    );
}
