//! Cluster TLS: the cluster's own certificate authority, node identities, and the rustls / tonic glue
//! that makes every node-to-node gRPC connection mutually authenticated.
//!
//! # The trust model
//!
//! **What is trusted.** A coyote cluster trusts exactly one thing: its own certificate authority (CA),
//! a self-signed ECDSA P-256 certificate that `coyote init` creates ([`ClusterCa::generate`]). The CA
//! signs one certificate per node ([`ClusterCa::sign_node`]); that certificate names the node id
//! (a SAN URI `coyote://node/<id>`, plus the readable common name `node-<id>`). Nothing else is
//! trusted: no system root store, no public CA, no hostname. Whoever holds a certificate signed by the
//! cluster CA, and the matching private key, *is* node `<id>` of this cluster. The CA private key is
//! therefore the cluster's crown jewel: it lives only where new nodes are admitted (see below), never
//! in a node certificate chain and never on the wire.
//!
//! **Why no hostname check.** Every node certificate carries the same DNS SAN [`SERVER_NAME`]
//! (`coyote-node`), and every client connects with that server name whatever address it dialed. A
//! hostname check would only prove "the certificate was issued for the address I dialed", but
//! addresses in a cluster move (a node gets a new IP, a container is rescheduled, a test runs under
//! a simulated network) while its identity does not. The property that matters is "the peer is a
//! member of *this* cluster", and that is proven by the CA signature alone: the CA is private to the
//! cluster and signs only members. Which member a peer is can be read from its certificate
//! ([`PeerInfo::node_id`], [`node_id_of_pem`]) where a caller needs it.
//!
//! **One port, client authentication optional at the TLS layer.** Each node serves all gRPC traffic
//! (HTTP/2, ALPN `h2`) on one TLS port. The server *asks* for a client certificate but does not
//! require one ([`server_config`]): Raft RPCs come from members that present their certificate, but
//! the `Join` RPC comes from a new server that has no certificate yet. When a client does present a
//! certificate it must chain to the cluster CA and carry the client-auth usage, or the handshake
//! fails; a certificate from another cluster never gets as far as a handler. The decision "is this
//! RPC allowed without a certificate?" is made per RPC: [`incoming`] attaches a [`PeerInfo`] to
//! every connection, tonic copies it into each request's extensions, and a handler calls
//! [`peer_node`] and refuses (typically with `Status::unauthenticated`) when it needs a member and
//! gets `None`. Only the join handler (and whatever else is explicitly public) accepts `None`.
//!
//! **Bootstrapping a join with a pin.** A joining server knows only a join token: a member's address
//! and the *pin* of the cluster CA, the lowercase hex SHA-256 of the CA certificate's DER bytes
//! ([`ClusterCa::pin`], [`pin_of_pem`]). It connects without a client certificate and with
//! [`Trust::Pin`]: every node presents the chain `[node certificate, CA certificate]`, so the joiner
//! finds, among the presented certificates, the one whose SHA-256 equals the pin, and then verifies
//! the node certificate against it exactly as a member would (signature, validity, usage,
//! `coyote-node` name). A man in the middle cannot forge a certificate with the pinned hash, and
//! cannot get a certificate signed by the pinned CA, so the joiner talks to a real member. Over that
//! connection the joiner sends its CSR ([`generate_node_key`]) with the join token's secret; the
//! member (the leader) checks the secret, signs the CSR with [`ClusterCa::sign_node`] — the CA
//! ignores the subject and names the CSR asks for and writes only the node id the cluster assigned —
//! and returns the node certificate and the CA certificate. From then on the new node uses an
//! [`Identity`] and [`Trust::Ca`] like every other member. The pin is not a secret (it is a public
//! hash); the secret part of a join token is what authorizes the join, and that is checked by the
//! join handler, not here.
//!
//! **TLS 1.3 only, no session resumption.** All peers are coyote nodes, so there is no old client to
//! accommodate; TLS 1.3 also encrypts the client certificate, so a passive observer does not learn
//! which node connects. Connections are long-lived HTTP/2, so resumption would save little; without
//! it every connection's peer is verified afresh, and the tickets of different nodes (which all
//! share one server name) cannot get mixed up.
//!
//! **Deliberately left out (later work):**
//! - *Rotation.* Node certificates are valid for [`NODE_CERT_VALIDITY`] (10 years) and the CA for
//!   [`CA_CERT_VALIDITY`] (20 years); there is no renewal, no re-keying, and no CA roll-over yet.
//!   A node certificate can outlive the CA that signed it if it is issued late in the CA's life;
//!   rotation will have to handle that.
//! - *Revocation.* There is no CRL or OCSP: a node removed from the Raft membership still holds a
//!   certificate the TLS layer accepts. Authorization of Raft RPCs must therefore also check that
//!   the peer's node id is a current member; a compromised node key means re-keying the cluster.
//! - *Hardware keys / encryption of key files at rest*: keys are PEM strings; storing them safely
//!   (file mode 0600) is the caller's job.
//!
//! # Wiring
//!
//! Server:
//! ```ignore
//! let config = tls::server_config(&identity)?;
//! let listener = tokio::net::TcpListener::bind(addr).await?;
//! tonic::transport::Server::builder()
//!     .add_service(svc)
//!     .serve_with_incoming(tls::tcp_incoming(listener, config))
//!     .await?;
//! // in a handler:
//! let node: Option<u64> = tls::peer_node(&request);
//! ```
//! Client (note the `http://` scheme: TLS is done by our connector, not by tonic):
//! ```ignore
//! let config = tls::client_config(Some(&identity), &tls::Trust::Ca(identity.ca_cert_pem.clone()))?;
//! let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
//!     .connect_with_connector(tls::connector(tls::TcpDial, config))
//!     .await?;
//! ```
//! A member that is both (every node) builds the two with [`member_configs`], which checks its
//! identity once for both.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Semaphore};
use tonic::codegen::http::Uri;

/// The DNS name every node certificate carries and every client uses as TLS server name.
///
/// Identity is cluster membership, proven by the CA signature; see the module docs for why a
/// per-address hostname check would add nothing.
pub const SERVER_NAME: &str = "coyote-node";

/// Prefix of the SAN URI that carries the node id: `coyote://node/<id>`.
pub const NODE_ID_URI_PREFIX: &str = "coyote://node/";

/// The ALPN protocol of every connection: HTTP/2 (gRPC).
pub const ALPN_H2: &[u8] = b"h2";

/// Validity of a node certificate. Rotation is later work; see the module docs.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Validity of a web site's certificate signed by the cluster CA ([`ClusterCa::sign_site`]).
/// The first bytes of a secret sealed by [`ClusterCa::seal`].
const SEALED_MAGIC: &[u8] = b"coyote-sealed-1:";
pub const SITE_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Validity of the cluster CA certificate.
pub const CA_CERT_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// Certificates are back-dated by this much, so a peer whose clock is a little behind the signer's
/// does not reject a fresh certificate as "not valid yet".
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);

/// How long a server-side TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many server-side handshakes may run at once; further accepts wait for a free slot.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 128;

/// How long the client [`Connector`] may take to dial and complete the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an accept error (e.g. out of file descriptors), so a
/// persistent error does not become a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

pub type Result<T> = std::result::Result<T, TlsError>;

/// Errors of this module; each message says what is wrong with which input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The text is not PEM, or has no block of the expected kind.
    #[error("{what} is not valid PEM: {detail}")]
    InvalidPem { what: &'static str, detail: String },
    /// The PEM decodes but the certificate / key inside is not usable.
    #[error("{what} is not usable: {detail}")]
    InvalidCertificate { what: &'static str, detail: String },
    /// The private key does not belong to the certificate it was loaded with.
    #[error("{key} does not belong to the {cert} (their public keys differ)")]
    KeyMismatch { key: &'static str, cert: &'static str },
    /// The node certificate does not verify against the CA certificate it was loaded with.
    #[error("node certificate is not valid for this cluster's CA: {0}")]
    NotIssuedByCa(String),
    /// The certificate signing request cannot be parsed or its signature is wrong.
    #[error("certificate signing request is invalid: {0}")]
    InvalidCsr(String),
    /// A pin is not 64 hex digits.
    #[error("CA pin {0:?} is not valid: expected the 64 hex digits of a SHA-256 hash")]
    InvalidPin(String),
    /// The server did not present the CA certificate the client pinned.
    #[error("CA pin mismatch: expected {expected}, server presented {}", presented_list(.presented))]
    PinMismatch { expected: String, presented: Vec<String> },
    /// A node certificate has no (or an unreadable) node id.
    #[error("node certificate carries no valid node id (SAN URI {NODE_ID_URI_PREFIX}<id>): {0}")]
    NoNodeId(String),
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// rustls refused a configuration.
    #[error("TLS configuration error: {0}")]
    Config(String),
    /// A client-side dial + handshake failed (carried inside an `io::Error` by the [`Connector`]).
    #[error("TLS connection to {addr} failed: {reason}")]
    Connect { addr: String, reason: String },
}

fn presented_list(presented: &[String]) -> String {
    if presented.is_empty() {
        "no CA certificate (only its own certificate)".to_string()
    } else {
        presented.join(", ")
    }
}

/// ring's provider, with AES-128-GCM/SHA-256 as the first cipher suite (ring's default puts
/// AES-256-GCM/SHA-384 first). It is TLS 1.3's mandatory suite and 128-bit secure. SHA-256, which its
/// key schedule and transcript hash use, runs on the CPU's SHA extensions where it has them; SHA-384
/// has no such help on x86-64. A client that prefers another suite of the list still gets it: the
/// server follows the client's order.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    // Always explicit: with two providers in the graph the process default cannot be determined.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

// ---------------------------------------------------------------------------------------------
// PEM helpers

fn parse_one_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        certs.push(item.map_err(|e| TlsError::InvalidPem { what, detail: e.to_string() })?);
    }
    match certs.len() {
        0 => Err(TlsError::InvalidPem { what, detail: "no CERTIFICATE block found".into() }),
        1 => {
            let cert = certs.pop().expect("one element");
            // Parse once so that garbage inside a well-formed PEM block is reported here.
            webpki::EndEntityCert::try_from(&cert)
                .map_err(|e| TlsError::InvalidCertificate { what, detail: format!("not X.509 ({e})") })?;
            Ok(cert)
        }
        n => Err(TlsError::InvalidPem { what, detail: format!("expected one certificate, found {n}") }),
    }
}

fn parse_key(pem: &str, what: &'static str) -> Result<(PrivateKeyDer<'static>, KeyPair)> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::InvalidPem {
        what,
        detail: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block found".to_string(),
            other => other.to_string(),
        },
    })?;
    let pair = KeyPair::from_pem(pem)
        .map_err(|e| TlsError::InvalidCertificate { what, detail: format!("unsupported key ({e})") })?;
    Ok((der, pair))
}

/// The lowercase hex SHA-256 over the DER of the (single) certificate in `cert_pem`: the pin of a CA.
pub fn pin_of_pem(cert_pem: &str) -> Result<String> {
    Ok(sha256_hex(&parse_one_cert(cert_pem, "certificate")?))
}

/// Normalizes a pin: trims, lowercases, accepts `:` separators; it must be 64 hex digits.
pub fn normalize_pin(pin: &str) -> Result<String> {
    let norm: String = pin.trim().chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if norm.len() == 64 && norm.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(norm)
    } else {
        Err(TlsError::InvalidPin(pin.to_string()))
    }
}

/// The node id written in a certificate by [`ClusterCa::sign_node`] (SAN URI `coyote://node/<id>`).
///
/// This only reads the certificate; it does not verify it. [`Identity::from_pem`] and the TLS
/// handshake verify; [`PeerInfo::node_id`] is only set for verified peers.
pub fn node_id_of_pem(cert_pem: &str) -> Result<u64> {
    node_id_of_der(&parse_one_cert(cert_pem, "node certificate")?)
}

fn node_id_of_der(der: &CertificateDer<'_>) -> Result<u64> {
    let cert = webpki::EndEntityCert::try_from(der).map_err(|e| TlsError::NoNodeId(e.to_string()))?;
    let mut ids = cert.valid_uri_names().filter_map(|uri| uri.strip_prefix(NODE_ID_URI_PREFIX));
    let Some(first) = ids.next() else {
        return Err(TlsError::NoNodeId("no such SAN".into()));
    };
    if ids.next().is_some() {
        return Err(TlsError::NoNodeId("more than one node id SAN".into()));
    }
    // u64::from_str accepts a leading '+'; we only ever write plain decimal digits.
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TlsError::NoNodeId(format!("{NODE_ID_URI_PREFIX}{first} is not a number")));
    }
    first.parse().map_err(|e| TlsError::NoNodeId(format!("{NODE_ID_URI_PREFIX}{first}: {e}")))
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Sets the validity of a certificate issued now (written without naming `time` types, so we need not
/// depend on the `time` crate directly).
fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = rcgen::date_time_ymd(1970, 1, 1) + unix_now();
    params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    params.not_after = now + lifetime;
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte
    SerialNumber::from_slice(&bytes)
}

// ---------------------------------------------------------------------------------------------
// The cluster CA

/// The cluster's certificate authority: its certificate and private key, as PEM.
#[derive(Clone)]
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("pin", &self.pin()).field("key_pem", &"<redacted>").finish()
    }
}

impl ClusterCa {
    /// Creates a new CA (ECDSA P-256, valid [`CA_CERT_VALIDITY`]) named after `cluster_id`.
    ///
    /// The CA may sign end-entity certificates only (path length 0).
    pub fn generate(cluster_id: &str) -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "coyote");
        dn.push(DnType::CommonName, format!("coyote cluster {cluster_id} CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, CA_CERT_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().clone() })
    }

    /// Loads a CA from PEM, checking that the certificate is a CA certificate and the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let cert_der = parse_one_cert(cert_pem, "CA certificate")?;
        let (key_der, key) = parse_key(key_pem, "CA private key")?;
        check_key_matches(&cert_der, key_der, "CA private key", "CA certificate")?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| TlsError::InvalidCertificate { what: "CA certificate", detail: e.to_string() })?;
        let usages = issuer.key_usages();
        if !usages.is_empty() && !usages.contains(&KeyUsagePurpose::KeyCertSign) {
            return Err(TlsError::InvalidCertificate {
                what: "CA certificate",
                detail: "it may not sign certificates (its key usage lacks keyCertSign); is it a node \
                         certificate?"
                    .into(),
            });
        }
        let ca = Self { cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string(), cert_der };
        // Self-test: a certificate this CA signs must verify against it (catches a CA certificate
        // that is not usable as a trust anchor, or whose name does not round-trip).
        let probe = NodeKey::generate()?;
        let probe_cert = ca.sign_node(&probe.csr_pem, 0)?;
        Identity::from_pem(cert_pem, &probe_cert, &probe.key_pem).map_err(|e| {
            TlsError::InvalidCertificate {
                what: "CA certificate",
                detail: format!("cannot issue node certificates: {e}"),
            }
        })?;
        Ok(ca)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Keep it secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The pin of this CA: lowercase hex SHA-256 of the certificate's DER.
    pub fn pin(&self) -> String {
        sha256_hex(&self.cert_der)
    }

    /// Signs a node certificate for `node_id` with the public key of `csr_pem`, and returns it as PEM.
    ///
    /// The CSR's signature is checked (proof that the requester holds the key); the subject and names
    /// it asks for are ignored. The certificate gets CN `node-<id>`, SANs DNS [`SERVER_NAME`] and URI
    /// `coyote://node/<id>`, key usage digitalSignature, extended key usages server and client auth,
    /// and is valid for [`NODE_CERT_VALIDITY`].
    pub fn sign_node(&self, csr_pem: &str, node_id: u64) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::CouldNotParseCertificationRequest => TlsError::InvalidCsr(
                "not a PEM-encoded PKCS#10 CERTIFICATE REQUEST (is it the right file?)".into(),
            ),
            other => TlsError::InvalidCsr(other.to_string()),
        })?;
        let key = KeyPair::from_pem(&self.key_pem)
            .map_err(|e| TlsError::InvalidCertificate { what: "CA private key", detail: e.to_string() })?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, key)
            .map_err(|e| TlsError::InvalidCertificate { what: "CA certificate", detail: e.to_string() })?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("node-{node_id}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::DnsName(SERVER_NAME.try_into().map_err(|e| TlsError::Generate(format!("{e}")))?),
            SanType::URI(
                format!("{NODE_ID_URI_PREFIX}{node_id}")
                    .try_into()
                    .map_err(|e| TlsError::Generate(format!("{e}")))?,
            ),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, NODE_CERT_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert =
            params.signed_by(&csr.public_key, &issuer).map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(cert.pem())
    }
}

impl ClusterCa {
    /// The cluster's sealing key: derived from the CA's private key, which every member holds and
    /// nothing outside the cluster does.
    fn sealing_key(&self) -> ring::aead::LessSafeKey {
        let mut hash = Sha256::new();
        hash.update(b"coyote sealing key v1\0");
        hash.update(self.key_pem.as_bytes());
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &hash.finalize())
            .expect("a SHA-256 digest is a ChaCha20-Poly1305 key");
        ring::aead::LessSafeKey::new(key)
    }

    /// `plain` sealed under the cluster's key (ChaCha20-Poly1305, a random nonce), for secrets the
    /// log holds: ACME account credentials and certificate keys.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let mut out = Vec::with_capacity(SEALED_MAGIC.len() + 12 + plain.len() + 16);
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.sealing_key()
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut body,
            )
            .expect("sealing into a Vec cannot fail");
        out.extend_from_slice(&body);
        out
    }

    /// Opens what [`ClusterCa::seal`] sealed; an error when it was sealed under another cluster's key
    /// or was changed.
    pub fn unseal(&self, sealed: &[u8]) -> Result<Vec<u8>> {
        let bad =
            |detail: &str| TlsError::InvalidCertificate { what: "sealed secret", detail: detail.to_string() };
        let rest = sealed.strip_prefix(SEALED_MAGIC).ok_or_else(|| bad("it is not sealed by coyote"))?;
        if rest.len() < 12 + 16 {
            return Err(bad("it is truncated"));
        }
        let (nonce, body) = rest.split_at(12);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad("bad nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .sealing_key()
            .open_in_place(nonce, ring::aead::Aad::empty(), &mut body)
            .map_err(|_| bad("it was sealed under another cluster's key, or changed"))?;
        Ok(plain.to_vec())
    }

    /// A certificate for the web names `names` (the proxy's, when certificates come from the
    /// cluster's own CA rather than ACME): a new ECDSA P-256 key, DNS SANs, server auth only, valid
    /// for [`SITE_CERT_VALIDITY`]. Returns the certificate and the key (PKCS#8), DER. Browsers trust
    /// it only where the cluster CA was installed; node authentication never accepts it (it has no
    /// node URI and no client auth).
    pub fn sign_site(&self, names: &[String]) -> Result<(Vec<u8>, Vec<u8>)> {
        let key = KeyPair::from_pem(&self.key_pem)
            .map_err(|e| TlsError::InvalidCertificate { what: "CA private key", detail: e.to_string() })?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, key)
            .map_err(|e| TlsError::InvalidCertificate { what: "CA certificate", detail: e.to_string() })?;
        let site_key = generate_site_key()?;
        let mut params = site_params(names)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, SITE_CERT_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&site_key, &issuer).map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok((cert.der().to_vec(), site_key.serialize_der()))
    }
}

// ---------------------------------------------------------------------------------------------
// Web certificates from an ACME CA, and the placeholder while one is pending

/// How long a placeholder certificate is valid.
pub const PLACEHOLDER_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

fn generate_site_key() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| TlsError::Generate(e.to_string()))
}

/// A new ECDSA P-256 key for a web certificate, PKCS#8 DER.
pub fn new_site_key() -> Result<Vec<u8>> {
    Ok(generate_site_key()?.serialize_der())
}

/// The name and DNS names of a web certificate for `names` (the first is its common name).
fn site_params(names: &[String]) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|n| n.clone().try_into().map(SanType::DnsName))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TlsError::Generate(format!("{e}")))?;
    Ok(params)
}

fn site_key(key_der: &[u8]) -> Result<KeyPair> {
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key_der);
    KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::InvalidCertificate { what: "web certificate key", detail: e.to_string() })
}

/// A certificate signing request (DER) for `names`, with the key `key_der` (PKCS#8 DER).
pub fn site_csr(names: &[String], key_der: &[u8]) -> Result<Vec<u8>> {
    let mut params = site_params(names)?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&site_key(key_der)?).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// A self-signed certificate for `name`, to keep TLS up while its real one is pending: a new ECDSA
/// P-256 key, valid for [`PLACEHOLDER_VALIDITY`]. Returns the certificate and the key (PKCS#8), DER.
pub fn placeholder_site(name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let key = generate_site_key()?;
    let mut params = site_params(&[name.to_string()])?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut params, PLACEHOLDER_VALIDITY);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

/// The certificate that answers an ACME TLS-ALPN-01 challenge for `name` (RFC 8737): self-signed,
/// for `name` alone, carrying the SHA-256 of the challenge's key authorization. Returns the
/// certificate and its key (PKCS#8), DER.
pub fn acme_alpn_site(name: &str, key_authorization: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let key = generate_site_key()?;
    let mut params = site_params(&[name.to_string()])?;
    let digest = Sha256::digest(key_authorization.as_bytes());
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    set_validity(&mut params, PLACEHOLDER_VALIDITY);
    let cert = params.self_signed(&key).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

/// What people need to know of an issued certificate chain (PEM): its leaf's validity and issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainFacts {
    /// The chain's certificates, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// The leaf issuer's common name (or its whole name, when it has none).
    pub issuer: String,
    /// The DNS names the leaf is for.
    pub names: Vec<String>,
}

/// Reads a certificate chain in PEM: an error names what is wrong with it.
pub fn chain_facts(chain_pem: &str) -> Result<ChainFacts> {
    let bad = |detail: String| TlsError::InvalidCertificate { what: "issued certificate chain", detail };
    let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let Some(leaf) = chain.first() else { return Err(bad("it holds no certificate".into())) };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    let ms = |t: x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64).saturating_mul(1000);
    let issuer = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| cert.issuer().to_string());
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    let facts = ChainFacts {
        not_before_ms: ms(cert.validity().not_before),
        not_after_ms: ms(cert.validity().not_after),
        issuer,
        names,
        chain: Vec::new(),
    };
    Ok(ChainFacts { chain, ..facts })
}

// ---------------------------------------------------------------------------------------------
// Node keys

/// A new node's private key and the CSR to send to the cluster (the CA ignores the CSR's names).
#[derive(Clone)]
pub struct NodeKey {
    /// PKCS#8 private key, PEM. Keep it secret.
    pub key_pem: String,
    /// PKCS#10 certificate signing request, PEM.
    pub csr_pem: String,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey").field("key_pem", &"<redacted>").field("csr_pem", &self.csr_pem).finish()
    }
}

impl NodeKey {
    /// A new ECDSA P-256 key and its CSR.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Self::from_key(key)
    }

    /// A fresh CSR for an existing key (e.g. a join that is retried after a restart).
    pub fn from_key_pem(key_pem: &str) -> Result<Self> {
        let (_, key) = parse_key(key_pem, "node private key")?;
        Self::from_key(key)
    }

    fn from_key(key: KeyPair) -> Result<Self> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "coyote node (unassigned)");
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).map_err(|e| TlsError::Generate(e.to_string()))?;
        let csr_pem = csr.pem().map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Self { key_pem: key.serialize_pem(), csr_pem })
    }
}

/// A new ECDSA P-256 node key and its CSR, as `(key_pem, csr_pem)`; see [`NodeKey`].
pub fn generate_node_key() -> Result<(String, String)> {
    let NodeKey { key_pem, csr_pem } = NodeKey::generate()?;
    Ok((key_pem, csr_pem))
}

// ---------------------------------------------------------------------------------------------
// Identity

/// What a member needs for TLS: the cluster CA certificate, its own certificate and its key (PEM).
///
/// Build it with [`Identity::from_pem`], which checks that the three fit together, so a node fails
/// at start-up with a clear message instead of at its first handshake. The fields are public plain
/// data; [`server_config`], [`client_config`] and [`member_configs`] check them again, so an
/// `Identity` assembled by hand cannot produce a configuration that silently does not work.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub ca_cert_pem: String,
    pub node_cert_pem: String,
    /// Keep it secret; `Debug` does not print it.
    pub node_key_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id().ok())
            .field("ca_pin", &pin_of_pem(&self.ca_cert_pem).ok())
            .field("node_key_pem", &"<redacted>")
            .finish()
    }
}

/// An [`Identity`], parsed and verified.
struct CheckedIdentity {
    ca_der: CertificateDer<'static>,
    node_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

impl Clone for CheckedIdentity {
    fn clone(&self) -> Self {
        CheckedIdentity {
            ca_der: self.ca_der.clone(),
            node_der: self.node_der.clone(),
            key_der: self.key_der.clone_key(),
        }
    }
}

impl Identity {
    /// Loads and checks an identity: each PEM parses, the key belongs to the node certificate, the
    /// node certificate is currently valid, chains to the CA for both server and client use, is
    /// valid for [`SERVER_NAME`], and carries a node id.
    pub fn from_pem(ca_cert_pem: &str, node_cert_pem: &str, node_key_pem: &str) -> Result<Self> {
        let identity = Self {
            ca_cert_pem: ca_cert_pem.to_string(),
            node_cert_pem: node_cert_pem.to_string(),
            node_key_pem: node_key_pem.to_string(),
        };
        identity.check()?;
        Ok(identity)
    }

    fn check(&self) -> Result<CheckedIdentity> {
        let ca_der = parse_one_cert(&self.ca_cert_pem, "CA certificate")?;
        let node_der = parse_one_cert(&self.node_cert_pem, "node certificate")?;
        let (key_der, _) = parse_key(&self.node_key_pem, "node private key")?;
        check_key_matches(&node_der, key_der.clone_key(), "node private key", "node certificate")?;

        let provider = provider();
        let roots = Arc::new(ca_roots(&ca_der)?);
        let now = UnixTime::now();
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        server_verifier
            .verify_server_cert(&node_der, &[], &server_name(), &[], now)
            .map_err(|e| TlsError::NotIssuedByCa(e.to_string()))?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        client_verifier
            .verify_client_cert(&node_der, &[], now)
            .map_err(|e| TlsError::NotIssuedByCa(e.to_string()))?;
        node_id_of_der(&node_der)?;
        Ok(CheckedIdentity { ca_der, node_der, key_der })
    }

    /// The node id named by the node certificate (SAN URI `coyote://node/<id>`). Never fails for an
    /// identity made by [`Identity::from_pem`]; this only reads, it does not verify.
    pub fn node_id(&self) -> Result<u64> {
        node_id_of_pem(&self.node_cert_pem)
    }

    /// The pin of the cluster CA (what a join token carries).
    pub fn ca_pin(&self) -> Result<String> {
        pin_of_pem(&self.ca_cert_pem)
    }
}

fn check_key_matches(
    cert: &CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    key_what: &'static str,
    cert_what: &'static str,
) -> Result<()> {
    match rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key, &provider()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(TlsError::KeyMismatch { key: key_what, cert: cert_what })
        }
        Err(e) => Err(TlsError::InvalidCertificate { what: key_what, detail: e.to_string() }),
    }
}

fn ca_roots(ca_der: &CertificateDer<'static>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone()).map_err(|e| TlsError::InvalidCertificate {
        what: "CA certificate",
        detail: format!("not usable as a trust anchor ({e})"),
    })?;
    Ok(roots)
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name")
}

// ---------------------------------------------------------------------------------------------
// rustls configurations

/// The server side of every node: presents `[node certificate, CA certificate]` (so a pinning client
/// finds the CA), asks for a client certificate but accepts connections without one, and rejects a
/// client certificate that does not chain to the cluster CA. TLS 1.3, ALPN `h2`.
pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>> {
    server_config_checked(id.check()?)
}

/// Both sides of a member's TLS, the client trusting the member's own cluster CA: what
/// [`client_config`] with [`Trust::Ca`] and [`server_config`] give, with the identity checked once
/// instead of twice (each check verifies the certificate against the CA for both uses).
pub fn member_configs(id: &Identity) -> Result<(Arc<ClientConfig>, Arc<ServerConfig>)> {
    let checked = id.check()?;
    let client = client_config_checked(Some(checked.clone()), &Trust::Ca(id.ca_cert_pem.clone()))?;
    Ok((client, server_config_checked(checked)?))
}

fn server_config_checked(id: CheckedIdentity) -> Result<Arc<ServerConfig>> {
    let provider = provider();
    let roots = Arc::new(ca_roots(&id.ca_der)?);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![id.node_der, id.ca_der], id.key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session resumption (see `client_config`).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// How a client decides that the server belongs to the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The cluster CA certificate, PEM (members).
    Ca(String),
    /// The hex SHA-256 pin of the cluster CA certificate (a joining server with only a join token).
    Pin(String),
}

/// The client side: trusts the server per `trust`, presents `identity`'s certificate if given,
/// TLS 1.3, ALPN `h2`. Connect with server name [`SERVER_NAME`] (the [`Connector`] does).
pub fn client_config(identity: Option<&Identity>, trust: &Trust) -> Result<Arc<ClientConfig>> {
    client_config_checked(identity.map(Identity::check).transpose()?, trust)
}

fn client_config_checked(identity: Option<CheckedIdentity>, trust: &Trust) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        Trust::Ca(ca_pem) => {
            let ca_der = parse_one_cert(ca_pem, "CA certificate")?;
            WebPkiServerVerifier::builder_with_provider(Arc::new(ca_roots(&ca_der)?), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?
        }
        Trust::Pin(pin) => {
            Arc::new(PinnedCaVerifier { pin: normalize_pin(pin)?, provider: provider.clone() })
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.node_der], id.key_der)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session resumption: connections are long-lived HTTP/2, so a full handshake costs little,
    // every connection's peer is then verified afresh, and tickets of different nodes (which all
    // share one server name) cannot get mixed up.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Verifies a server against a pinned CA: the CA must be among the presented certificates, and the
/// end-entity is then verified against it like with [`Trust::Ca`].
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let presented: Vec<String> = intermediates.iter().map(|c| sha256_hex(c)).collect();
        let Some(ca) =
            intermediates.iter().zip(&presented).find(|(_, pin)| **pin == self.pin).map(|(c, _)| c)
        else {
            let err = TlsError::PinMismatch { expected: self.pin.clone(), presented };
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(err)),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether an I/O error of a handshake is a TLS protocol / certificate error (rather than EOF etc.).
fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

/// A readable reason for a handshake error, unwrapping our own errors from rustls' wrappers.
fn describe_handshake_error(e: &io::Error) -> String {
    if let Some(rustls_err) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        let other = match rustls_err {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => Some(o),
            rustls::Error::Other(o) => Some(o),
            _ => None,
        };
        if let Some(ours) = other.and_then(|o| o.0.downcast_ref::<TlsError>()) {
            return ours.to_string();
        }
        return rustls_err.to_string();
    }
    e.to_string()
}

// ---------------------------------------------------------------------------------------------
// Server side: incoming connections

/// Who is on the other end of a connection; tonic puts it into every request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The node id of the verified client certificate; `None` when the client sent none.
    pub node_id: Option<u64>,
}

/// A server-side TLS connection whose handshake is complete, with the peer it was made with.
pub struct TlsConn<IO> {
    inner: tokio_rustls::server::TlsStream<IO>,
    peer: PeerInfo,
}

impl<IO> fmt::Debug for TlsConn<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn").field("peer", &self.peer).finish()
    }
}

impl<IO> TlsConn<IO> {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    pub fn get_ref(&self) -> &tokio_rustls::server::TlsStream<IO> {
        &self.inner
    }

    pub fn into_inner(self) -> tokio_rustls::server::TlsStream<IO> {
        self.inner
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConn<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConn<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<IO> tonic::transport::server::Connected for TlsConn<IO> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

/// The [`PeerInfo`] of the connection a request came in on (set by tonic from [`TlsConn`]).
pub fn peer_info<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// The verified node id of the client of a request; `None` without a client certificate (or when the
/// server was not fed by [`incoming`]). Handlers of member-only RPCs refuse `None`.
pub fn peer_node<T>(req: &tonic::Request<T>) -> Option<u64> {
    peer_info(req).and_then(|p| p.node_id)
}

/// TLS-accepts the connections of `accepted`, for `tonic::transport::Server::serve_with_incoming`.
///
/// Handshakes run concurrently in spawned tasks (at most [`MAX_CONCURRENT_HANDSHAKES`], each bounded
/// by [`HANDSHAKE_TIMEOUT`]), so a slow or silent client does not hold up others. A failed or timed
/// out handshake is logged and the connection dropped; the stream goes on. Accept errors of
/// `accepted` are logged too (with a short pause) and not passed on, so the stream yields only
/// `Ok` items; it ends when `accepted` ends and the handshakes in flight are done. Dropping the
/// stream stops accepting (and drops `accepted`, e.g. closing the listener).
///
/// Must be called within a tokio runtime.
pub fn incoming<S, IO>(
    accepted: S,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = io::Result<TlsConn<IO>>> + Send + 'static
where
    S: Stream<Item = io::Result<(IO, SocketAddr)>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<TlsConn<IO>>(MAX_CONCURRENT_HANDSHAKES);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(accept_loop(accepted, acceptor, tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok)))
}

async fn accept_loop<S, IO>(accepted: S, acceptor: tokio_rustls::TlsAcceptor, tx: mpsc::Sender<TlsConn<IO>>)
where
    S: Stream<Item = io::Result<(IO, SocketAddr)>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut accepted = std::pin::pin!(accepted);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = accepted.next() => next,
        };
        let (io, remote_addr) = match next {
            None => return,
            Some(Ok(conn)) => conn,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            // The permit is held until the connection is handed over, so a consumer that stops
            // pulling also stops the accepting.
            let _permit = permit;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) if is_tls_error(&e) => {
                    let error = describe_handshake_error(&e);
                    tracing::warn!(%remote_addr, %error, "TLS handshake refused; connection dropped");
                    return;
                }
                Ok(Err(e)) => {
                    // EOF or reset before the handshake finished: port probes, clients that gave up.
                    tracing::debug!(%remote_addr, error = %e, "connection closed during TLS handshake");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote_addr, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out; connection dropped");
                    return;
                }
            };
            let node_id =
                stream.get_ref().1.peer_certificates().and_then(|certs| certs.first()).and_then(|cert| {
                    match node_id_of_der(cert) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            // Verified by the CA but without an id: treat as no client certificate.
                            tracing::warn!(%remote_addr, error = %e, "client certificate has no node id");
                            None
                        }
                    }
                });
            tracing::debug!(%remote_addr, ?node_id, "TLS connection accepted");
            let _ = tx.send(TlsConn { inner: stream, peer: PeerInfo { remote_addr, node_id } }).await;
        });
    }
}

/// [`incoming`] over a tokio TCP listener (sets `TCP_NODELAY` on each accepted socket).
pub fn tcp_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = io::Result<TlsConn<tokio::net::TcpStream>>> + Send + 'static {
    let accepted = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.inspect(|(stream, _)| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "setting TCP_NODELAY failed");
            }
        });
        Some((next, listener))
    });
    incoming(accepted, config)
}

// ---------------------------------------------------------------------------------------------
// Client side: connector

/// How the [`Connector`] opens a byte stream to `host:port` (TCP now, a simulated network in tests).
pub trait Dial: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn dial(&self, addr: String) -> BoxFuture<'static, io::Result<Self::Io>>;
}

/// Dials real TCP and sets `TCP_NODELAY`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpDial;

impl Dial for TcpDial {
    type Io = tokio::net::TcpStream;

    fn dial(&self, addr: String) -> BoxFuture<'static, io::Result<Self::Io>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

/// A byte stream a [`DynDial`] returns: any `AsyncRead + AsyncWrite`, boxed.
pub trait DialedIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> DialedIo for T {}

type DialFn = dyn Fn(String) -> BoxFuture<'static, io::Result<Box<dyn DialedIo>>> + Send + Sync;

/// Any [`Dial`] behind one type, so that a node can take its dialer from the caller without being
/// generic over it: [`TcpDial`] in production, a simulated network in the simulator. The only cost is
/// one allocation per connection and dynamic dispatch per read and write.
#[derive(Clone)]
pub struct DynDial(Arc<DialFn>);

impl DynDial {
    pub fn new<D: Dial>(dial: D) -> Self {
        DynDial(Arc::new(move |addr| {
            let dialing = dial.dial(addr);
            Box::pin(async move { dialing.await.map(|io| Box::new(io) as Box<dyn DialedIo>) })
        }))
    }

    /// Real TCP ([`TcpDial`]).
    pub fn tcp() -> Self {
        DynDial::new(TcpDial)
    }
}

impl Default for DynDial {
    fn default() -> Self {
        DynDial::tcp()
    }
}

impl fmt::Debug for DynDial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DynDial")
    }
}

impl Dial for DynDial {
    type Io = Box<dyn DialedIo>;

    fn dial(&self, addr: String) -> BoxFuture<'static, io::Result<Self::Io>> {
        (self.0)(addr)
    }
}

/// A `tower::Service<Uri>` for `tonic::transport::Endpoint::connect_with_connector`: dials the URI's
/// `host:port` with `D`, then does the TLS handshake with server name [`SERVER_NAME`], all within
/// [`CONNECT_TIMEOUT`]. Use an `http://` URI: the TLS is ours, not tonic's. Errors are `io::Error`s
/// whose inner error is a [`TlsError::Connect`] that says why (e.g. "CA pin mismatch: ...").
#[derive(Clone)]
pub struct Connector<D> {
    dial: D,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl<D> fmt::Debug for Connector<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector").field("timeout", &self.timeout).finish()
    }
}

/// See [`Connector`].
pub fn connector<D: Dial>(dial: D, config: Arc<ClientConfig>) -> Connector<D> {
    Connector { dial, tls: tokio_rustls::TlsConnector::from(config), timeout: CONNECT_TIMEOUT }
}

impl<D> Connector<D> {
    /// Overrides [`CONNECT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

fn addr_of(uri: &Uri) -> io::Result<String> {
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("endpoint URI {uri} has no host"))
    })?;
    let port = uri.port_u16().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("endpoint URI {uri} has no port"))
    })?;
    if host.contains(':') && !host.starts_with('[') {
        Ok(format!("[{host}]:{port}"))
    } else {
        Ok(format!("{host}:{port}"))
    }
}

impl<D: Dial> tower::Service<Uri> for Connector<D> {
    type Response = TokioIo<tokio_rustls::client::TlsStream<D::Io>>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = self.dial.clone();
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let addr = addr_of(&uri)?;
            let fail = |kind: io::ErrorKind, reason: String| {
                io::Error::new(kind, TlsError::Connect { addr: addr.clone(), reason })
            };
            let attempt = async {
                let io = dial.dial(addr.clone()).await.map_err(|e| fail(e.kind(), e.to_string()))?;
                tls.connect(server_name(), io).await.map_err(|e| fail(e.kind(), describe_handshake_error(&e)))
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(fail(io::ErrorKind::TimedOut, format!("no connection within {timeout:?}"))),
            }
        })
    }
}
