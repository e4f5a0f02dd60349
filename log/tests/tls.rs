//! Cluster TLS over real TCP on 127.0.0.1: rustls handshakes, tonic gRPC round trips, no mocks.
//!
//! The gRPC service is written by hand (no protobuf codegen): a unary method whose request and
//! response are protobuf `string`s (prost implements `Message` for `String`), served by
//! `tonic::server::Grpc` and called with `tonic::client::Grpc`, exactly as generated code does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use coyote_log::tls::{self, ClusterCa, Identity, PeerInfo, TlsError, Trust};
use futures::future::BoxFuture;
use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::ServiceExt;

const SERVICE: &str = "coyote.test.WhoAmI";
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------------------------------------------
// A tiny hand-written gRPC service

/// `/coyote.test.WhoAmI/Get` answers "<node id or none>|<remote addr>" from the request's PeerInfo;
/// `/coyote.test.WhoAmI/MembersOnly` answers "ok <id>" for members and UNAUTHENTICATED otherwise.
#[derive(Clone)]
struct WhoAmI;

impl tonic::server::NamedService for WhoAmI {
    const NAME: &'static str = SERVICE;
}

struct Handler {
    members_only: bool,
}

impl tonic::server::UnaryService<String> for Handler {
    type Response = String;
    type Future = BoxFuture<'static, Result<Response<String>, Status>>;

    fn call(&mut self, req: Request<String>) -> Self::Future {
        // This is the path under test: tonic copies TlsConn's ConnectInfo into the extensions.
        let info: Option<PeerInfo> = req.extensions().get::<PeerInfo>().cloned();
        let node = tls::peer_node(&req);
        assert_eq!(info.as_ref().and_then(|i| i.node_id), node);
        assert_eq!(tls::peer_info(&req), info.as_ref());
        let members_only = self.members_only;
        Box::pin(async move {
            let info = info.ok_or_else(|| Status::internal("no PeerInfo in request extensions"))?;
            if members_only {
                return match node {
                    Some(id) => Ok(Response::new(format!("ok {id}"))),
                    None => Err(Status::unauthenticated("a cluster member certificate is required")),
                };
            }
            let node = node.map_or_else(|| "none".to_string(), |n| n.to_string());
            Ok(Response::new(format!("{node}|{}", info.remote_addr)))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for WhoAmI {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let members_only = match req.uri().path() {
                "/coyote.test.WhoAmI/Get" => false,
                "/coyote.test.WhoAmI/MembersOnly" => true,
                _ => return Ok(Status::unimplemented("no such method").into_http()),
            };
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<String, String>::default());
            Ok(grpc.unary(Handler { members_only }, req).await)
        })
    }
}

async fn call(channel: &Channel, method: &'static str) -> Result<String, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(method);
    let mut req = Request::new(String::new());
    req.set_timeout(RPC_TIMEOUT);
    let resp =
        tokio::time::timeout(RPC_TIMEOUT, grpc.unary(req, path, ProstCodec::<String, String>::default()))
            .await
            .map_err(|_| Status::deadline_exceeded("test RPC timed out"))??;
    Ok(resp.into_inner())
}

// ------------------------------------------------------------------------------------------------
// Fixtures

struct Cluster {
    ca: ClusterCa,
}

impl Cluster {
    fn new(name: &str) -> Self {
        Self { ca: ClusterCa::generate(name).expect("generate CA") }
    }

    /// What a join does: the new node makes a key + CSR, the CA signs it for `id`.
    fn member(&self, id: u64) -> Identity {
        let (key_pem, csr_pem) = tls::generate_node_key().expect("node key");
        let cert = self.ca.sign_node(&csr_pem, id).expect("sign node");
        let identity = Identity::from_pem(self.ca.cert_pem(), &cert, &key_pem).expect("identity");
        assert_eq!(identity.node_id().unwrap(), id);
        identity
    }
}

async fn serve(identity: &Identity) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = tls::server_config(identity).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(WhoAmI)
            .serve_with_incoming(tls::tcp_incoming(listener, config))
            .await
            .expect("server failed");
    });
    addr
}

async fn connect(
    addr: SocketAddr,
    identity: Option<&Identity>,
    trust: &Trust,
) -> Result<Channel, tonic::transport::Error> {
    connect_with(addr, tls::client_config(identity, trust).unwrap()).await
}

/// A channel to `addr` through the connector with a client configuration made elsewhere.
async fn connect_with(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .connect_with_connector(tls::connector(tls::TcpDial, config))
        .await
}

/// The connector alone (dial + TLS handshake), as tonic would call it.
async fn handshake(
    addr: SocketAddr,
    identity: Option<&Identity>,
    trust: &Trust,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let config = tls::client_config(identity, trust).unwrap();
    let uri: http::Uri = format!("http://{addr}").parse().unwrap();
    tls::connector(tls::TcpDial, config).oneshot(uri).await
}

/// The whole error chain, so a test can look for the message a user would see.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(" <- ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

// ------------------------------------------------------------------------------------------------
// (1) a member with a certificate: the handler sees its node id

#[tokio::test]
async fn member_with_certificate_is_seen_as_its_node_id() {
    let cluster = Cluster::new("c1");
    let server = cluster.member(1);
    let client = cluster.member(2);
    let addr = serve(&server).await;

    let channel = connect(addr, Some(&client), &Trust::Ca(cluster.ca.cert_pem().to_string())).await.unwrap();
    let answer = call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap();
    let (node, remote) = answer.split_once('|').unwrap();
    assert_eq!(node, "2");
    let remote: SocketAddr = remote.parse().unwrap();
    assert_eq!(remote.ip(), std::net::Ipv4Addr::LOCALHOST);
    assert_ne!(remote.port(), addr.port());
    assert_eq!(call(&channel, "/coyote.test.WhoAmI/MembersOnly").await.unwrap(), "ok 2");

    // A member's client configuration from `member_configs` (what a node uses) connects as its node.
    let (member_client, _) = tls::member_configs(&client).unwrap();
    let channel = connect_with(addr, member_client).await.unwrap();
    assert!(call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap().starts_with("2|"));

    // A member may also trust by pin and still present its certificate.
    let channel = connect(addr, Some(&client), &Trust::Pin(cluster.ca.pin())).await.unwrap();
    assert!(call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap().starts_with("2|"));
}

/// Members agree on TLS 1.3's AES-128-GCM/SHA-256 suite; a client that offers only AES-256-GCM (another
/// TLS stack's preference) still gets a connection, with the suite it asked for.
#[tokio::test]
async fn members_agree_on_aes_128_gcm_and_other_suites_are_still_served() {
    let cluster = Cluster::new("c1");
    let server = cluster.member(1);
    let client = cluster.member(2);
    let addr = serve(&server).await;

    let io = handshake(addr, Some(&client), &Trust::Ca(cluster.ca.cert_pem().to_string())).await.unwrap();
    let suite = io.inner().get_ref().1.negotiated_cipher_suite().expect("a suite").suite();
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);

    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384];
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(cluster.ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
    let stream =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let suite = stream.get_ref().1.negotiated_cipher_suite().expect("a suite").suite();
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
}

// ------------------------------------------------------------------------------------------------
// (2) a joining server without a certificate, trusting by pin: node id None, member RPCs refused

#[tokio::test]
async fn joiner_without_certificate_connects_by_pin_and_is_anonymous() {
    let cluster = Cluster::new("c2");
    let server = cluster.member(1);
    let addr = serve(&server).await;

    let channel = connect(addr, None, &Trust::Pin(cluster.ca.pin())).await.unwrap();
    let answer = call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap();
    assert!(answer.starts_with("none|127.0.0.1:"), "{answer}");
    let status = call(&channel, "/coyote.test.WhoAmI/MembersOnly").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // The pin may be written in upper case with colons, as some tools print fingerprints.
    let pretty = cluster
        .ca
        .pin()
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let channel = connect(addr, None, &Trust::Pin(pretty)).await.unwrap();
    assert!(call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap().starts_with("none|"));
}

// ------------------------------------------------------------------------------------------------
// (3) a client certificate from another CA is refused at the handshake

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let cluster = Cluster::new("c3");
    let other = Cluster::new("intruders");
    let server = cluster.member(1);
    let intruder = other.member(5);
    let addr = serve(&server).await;

    // Through tonic: whether the connect or the first RPC notices (TLS 1.3 sends the server's
    // verdict on the client certificate after the client's handshake is done), no RPC succeeds.
    let trust = Trust::Ca(cluster.ca.cert_pem().to_string());
    match connect(addr, Some(&intruder), &trust).await {
        Ok(channel) => {
            let status = call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap_err();
            assert!(chain(&status).contains("UnknownCA"), "{}", chain(&status));
        }
        Err(e) => assert!(chain(&e).contains("UnknownCA"), "{}", chain(&e)),
    }
}

#[tokio::test]
async fn refused_handshake_never_reaches_the_incoming_stream() {
    let cluster = Cluster::new("c3b");
    let other = Cluster::new("intruders");
    let server = cluster.member(1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Box::pin(tls::tcp_incoming(listener, tls::server_config(&server).unwrap()));
    let trust = Trust::Ca(cluster.ca.cert_pem().to_string());

    // The intruder's handshake may complete on its side; its first read gets the server's alert.
    let intruder = other.member(5);
    if let Ok(io) = handshake(addr, Some(&intruder), &trust).await {
        let mut io = io.into_inner();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(RPC_TIMEOUT, io.read(&mut buf)).await.expect("server answers");
        let err = read.expect_err("server must refuse the certificate");
        assert!(chain(&err).to_lowercase().contains("alert"), "{}", chain(&err));
    }

    // The next, good client is the first connection the server side ever yields.
    let member = cluster.member(9);
    let _client = handshake(addr, Some(&member), &trust).await.unwrap();
    let conn = tokio::time::timeout(RPC_TIMEOUT, incoming.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(conn.peer().node_id, Some(9));
    assert_eq!(conn.peer().remote_addr.ip(), std::net::Ipv4Addr::LOCALHOST);
}

// ------------------------------------------------------------------------------------------------
// (4) pins: the right one works (above), a wrong one fails with the mismatch message

#[tokio::test]
async fn wrong_pin_fails_with_mismatch_message() {
    let cluster = Cluster::new("c4");
    let server = cluster.member(1);
    let addr = serve(&server).await;
    let wrong = Cluster::new("elsewhere").ca.pin();

    let err = handshake(addr, None, &Trust::Pin(wrong.clone())).await.unwrap_err();
    let msg = chain(&err);
    assert!(msg.contains("CA pin mismatch"), "{msg}");
    assert!(msg.contains(&format!("expected {wrong}")), "{msg}");
    assert!(msg.contains(&format!("server presented {}", cluster.ca.pin())), "{msg}");
    assert!(msg.contains(&addr.to_string()), "{msg}");
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<TlsError>());
    assert!(matches!(inner, Some(TlsError::Connect { .. })), "{inner:?}");

    // And through tonic, the user sees the same reason in the error chain.
    let err = connect(addr, None, &Trust::Pin(wrong)).await.unwrap_err();
    assert!(chain(&err).contains("CA pin mismatch"), "{}", chain(&err));

    // The right pin completes the handshake.
    handshake(addr, None, &Trust::Pin(cluster.ca.pin())).await.unwrap();
}

// ------------------------------------------------------------------------------------------------
// (5) trusting another cluster's CA fails

#[tokio::test]
async fn trusting_another_clusters_ca_fails() {
    let cluster = Cluster::new("c5");
    let other = Cluster::new("other");
    let server = cluster.member(1);
    let addr = serve(&server).await;

    let err = handshake(addr, None, &Trust::Ca(other.ca.cert_pem().to_string())).await.unwrap_err();
    assert!(chain(&err).contains("invalid peer certificate"), "{}", chain(&err));
    // Even a member of the other cluster, with its own valid certificate, gets nowhere.
    let stranger = other.member(1);
    let err = connect(addr, Some(&stranger), &Trust::Ca(other.ca.cert_pem().to_string())).await.unwrap_err();
    assert!(chain(&err).contains("UnknownIssuer"), "{}", chain(&err));
}

// ------------------------------------------------------------------------------------------------
// (6) garbage and silent clients do not stop a good client from being served

#[tokio::test]
async fn garbage_and_silent_clients_do_not_block_good_clients() {
    let cluster = Cluster::new("c6");
    let server = cluster.member(1);
    let client = cluster.member(2);
    let addr = serve(&server).await;

    // Clients that open TCP and never start a handshake: they hold handshake slots until the
    // handshake timeout, which is much longer than this test's budget for the good client.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // A client that speaks something else entirely.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x16\x03\x01garbage").await.unwrap();
    // A client that starts a TLS record and stalls in the middle of it.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();

    let started = std::time::Instant::now();
    let channel = connect(addr, Some(&client), &Trust::Ca(cluster.ca.cert_pem().to_string())).await.unwrap();
    assert!(call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap().starts_with("2|"));
    assert!(started.elapsed() < tls::HANDSHAKE_TIMEOUT / 2, "took {:?}", started.elapsed());

    // The garbage client was answered (alert) or dropped, not kept around.
    let mut buf = vec![0u8; 256];
    let read = tokio::time::timeout(RPC_TIMEOUT, async {
        loop {
            match garbage.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // a TLS alert record, then EOF
            }
        }
    })
    .await;
    assert!(read.is_ok(), "server kept the garbage connection open");

    // The server still serves new clients after all that.
    let channel = connect(addr, None, &Trust::Pin(cluster.ca.pin())).await.unwrap();
    assert!(call(&channel, "/coyote.test.WhoAmI/Get").await.unwrap().starts_with("none|"));
    drop(silent);
}

#[tokio::test]
async fn incoming_ends_when_the_accept_stream_ends() {
    let cluster = Cluster::new("c6b");
    let server = cluster.member(1);
    let accepted = futures::stream::empty::<std::io::Result<(TcpStream, SocketAddr)>>();
    let mut incoming = Box::pin(tls::incoming(accepted, tls::server_config(&server).unwrap()));
    let next = tokio::time::timeout(RPC_TIMEOUT, incoming.next()).await.unwrap();
    assert!(next.is_none());
}

// ------------------------------------------------------------------------------------------------
// (7) malformed input gives a TlsError, never a panic

#[test]
fn malformed_pem_is_an_error_not_a_panic() {
    let cluster = Cluster::new("c7");
    let key = tls::NodeKey::generate().unwrap();
    let cert = cluster.ca.sign_node(&key.csr_pem, 3).unwrap();
    let ca = cluster.ca.cert_pem();

    let err = Identity::from_pem("not pem at all", &cert, &key.key_pem).unwrap_err();
    assert!(matches!(err, TlsError::InvalidPem { what: "CA certificate", .. }), "{err}");
    assert_eq!(err.to_string(), "CA certificate is not valid PEM: no CERTIFICATE block found");

    let err = Identity::from_pem(ca, "", &key.key_pem).unwrap_err();
    assert!(err.to_string().starts_with("node certificate is not valid PEM"), "{err}");

    let err = Identity::from_pem(
        ca,
        &cert,
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("node private key is not valid PEM"), "{err}");

    // A PEM block whose content is not a certificate.
    let bogus = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
    let err = Identity::from_pem(bogus, &cert, &key.key_pem).unwrap_err();
    assert!(matches!(err, TlsError::InvalidCertificate { what: "CA certificate", .. }), "{err}");

    // Truncated PEM.
    let truncated = &cert[..cert.len() / 2];
    assert!(Identity::from_pem(ca, truncated, &key.key_pem).is_err());

    assert!(matches!(tls::pin_of_pem("garbage"), Err(TlsError::InvalidPem { .. })));
    assert!(matches!(ClusterCa::from_pem("garbage", "garbage"), Err(TlsError::InvalidPem { .. })));
    let err = cluster.ca.sign_node("garbage", 1).unwrap_err();
    assert!(matches!(err, TlsError::InvalidCsr(_)), "{err}");
    assert!(matches!(
        tls::client_config(None, &Trust::Ca("garbage".into())),
        Err(TlsError::InvalidPem { .. })
    ));
    let err = tls::client_config(None, &Trust::Pin("abc".into())).unwrap_err();
    assert!(matches!(err, TlsError::InvalidPin(_)), "{err}");
    assert!(matches!(tls::node_id_of_pem("garbage"), Err(TlsError::InvalidPem { .. })));
}

#[test]
fn identities_that_do_not_fit_together_are_refused() {
    let cluster = Cluster::new("c7b");
    let other = Cluster::new("other");
    let key = tls::NodeKey::generate().unwrap();
    let cert = cluster.ca.sign_node(&key.csr_pem, 3).unwrap();

    // Certificate signed by another CA.
    let err = Identity::from_pem(other.ca.cert_pem(), &cert, &key.key_pem).unwrap_err();
    assert!(matches!(err, TlsError::NotIssuedByCa(_)), "{err}");

    // Assembled by hand, bypassing from_pem: the configurations check again.
    let by_hand = Identity {
        ca_cert_pem: other.ca.cert_pem().to_string(),
        node_cert_pem: cert.clone(),
        node_key_pem: key.key_pem.clone(),
    };
    assert!(matches!(tls::server_config(&by_hand), Err(TlsError::NotIssuedByCa(_))));
    let trust = Trust::Pin(other.ca.pin());
    assert!(matches!(tls::client_config(Some(&by_hand), &trust), Err(TlsError::NotIssuedByCa(_))));
    assert!(matches!(tls::member_configs(&by_hand), Err(TlsError::NotIssuedByCa(_))));
    assert_eq!(by_hand.node_id().unwrap(), 3, "node_id only reads the certificate");

    // Key of another node.
    let other_key = tls::NodeKey::generate().unwrap();
    let err = Identity::from_pem(cluster.ca.cert_pem(), &cert, &other_key.key_pem).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "node private key does not belong to the node certificate (their public keys differ)"
    );

    // CA certificate with the wrong key, and a node certificate posing as a CA.
    let err = ClusterCa::from_pem(cluster.ca.cert_pem(), other.ca.key_pem()).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    let err = ClusterCa::from_pem(&cert, &key.key_pem).unwrap_err();
    assert!(matches!(err, TlsError::InvalidCertificate { what: "CA certificate", .. }), "{err}");

    // A self-signed certificate without a node id is not an identity.
    let self_signed = rcgen::generate_simple_self_signed(vec![tls::SERVER_NAME.to_string()]).unwrap();
    let err = tls::node_id_of_pem(&self_signed.cert.pem()).unwrap_err();
    assert!(matches!(err, TlsError::NoNodeId(_)), "{err}");
}

// ------------------------------------------------------------------------------------------------
// CA and certificate contents

#[test]
fn ca_round_trips_and_pins_agree() {
    let ca = ClusterCa::generate("round-trip").unwrap();
    assert_eq!(tls::pin_of_pem(ca.cert_pem()).unwrap(), ca.pin());
    assert_eq!(ca.pin().len(), 64);
    let loaded = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    assert_eq!(loaded.pin(), ca.pin());

    // A CA loaded from PEM issues certificates that verify against the original.
    let key = tls::NodeKey::generate().unwrap();
    let cert = loaded.sign_node(&key.csr_pem, u64::MAX).unwrap();
    let id = Identity::from_pem(ca.cert_pem(), &cert, &key.key_pem).unwrap();
    assert_eq!(id.node_id().unwrap(), u64::MAX);
    assert_eq!(id.ca_pin().unwrap(), ca.pin());
    assert!(!format!("{ca:?}{id:?}").contains("PRIVATE KEY"), "Debug must not print keys");

    // A CSR made again from the same key is signed to the same identity.
    let again = tls::NodeKey::from_key_pem(&key.key_pem).unwrap();
    let cert = ca.sign_node(&again.csr_pem, 4).unwrap();
    assert_eq!(Identity::from_pem(ca.cert_pem(), &cert, &key.key_pem).unwrap().node_id().unwrap(), 4);
}

#[test]
fn sign_node_ignores_the_names_a_csr_asks_for() {
    let ca = ClusterCa::generate("names").unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI("coyote://node/99".try_into().unwrap()));
    params.distinguished_name.push(rcgen::DnType::CommonName, "node-99");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();

    let cert_pem = ca.sign_node(&csr, 7).unwrap();
    assert_eq!(tls::node_id_of_pem(&cert_pem).unwrap(), 7);
    let der = rustls::pki_types::CertificateDer::from(
        rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'_>| c.to_vec())
            .unwrap(),
    );
    let parsed = webpki::EndEntityCert::try_from(&der).unwrap();
    assert_eq!(parsed.valid_dns_names().collect::<Vec<_>>(), vec![tls::SERVER_NAME]);
    assert_eq!(parsed.valid_uri_names().collect::<Vec<_>>(), vec!["coyote://node/7"]);
    let id = Identity::from_pem(ca.cert_pem(), &cert_pem, &key.serialize_pem()).unwrap();
    assert_eq!(id.node_id().unwrap(), 7);
}

// ------------------------------------------------------------------------------------------------
// A member's certificate is no proof without its key

/// Presents a member's certificate with a key that is not its own, as someone who copied the
/// certificate (it is no secret: every handshake shows it) would.
#[derive(Debug)]
struct CopiedCertificate(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for CopiedCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_member_certificate_without_its_key_is_refused() {
    let cluster = Cluster::new("c-copied");
    let server = cluster.member(1);
    let member = cluster.member(3);
    let addr = serve(&server).await;
    let trust = Trust::Ca(cluster.ca.cert_pem().to_string());

    // The member connects.
    let channel = connect(addr, Some(&member), &trust).await.expect("member connects");
    assert_eq!(call(&channel, "/coyote.test.WhoAmI/MembersOnly").await.unwrap(), "ok 3");

    // The same certificate bytes with another key: the chain verifies, the handshake signature
    // made with the wrong key does not, and no RPC gets through.
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(member.node_cert_pem.as_bytes()).unwrap();
    let (other_key_pem, _) = tls::generate_node_key().unwrap();
    let other_key = rustls::pki_types::PrivateKeyDer::from_pem_slice(other_key_pem.as_bytes()).unwrap();
    let signer = rustls::crypto::ring::default_provider().key_provider.load_private_key(other_key).unwrap();
    let copied = rustls::sign::CertifiedKey::new(vec![cert], signer);
    let mut config = (*tls::client_config(None, &trust).unwrap()).clone();
    config.client_auth_cert_resolver = std::sync::Arc::new(CopiedCertificate(std::sync::Arc::new(copied)));
    let refusal = match connect_with(addr, std::sync::Arc::new(config)).await {
        Ok(channel) => chain(&call(&channel, "/coyote.test.WhoAmI/MembersOnly").await.unwrap_err()),
        Err(e) => chain(&e),
    };
    assert!(refusal.contains("DecryptError") || refusal.contains("BadSignature"), "{refusal}");

    // The member itself still connects, on a new connection.
    let again = connect(addr, Some(&member), &trust).await.expect("member connects again");
    assert_eq!(call(&again, "/coyote.test.WhoAmI/MembersOnly").await.unwrap(), "ok 3");
}
