//! Certificate chains verified before, remembered by their exact bytes.
//!
//! Verifying a peer's chain (the CA's ECDSA signature over the node certificate, its usages, the
//! server name) is a function of four things: the chain's bytes, the trust anchor, the use asked
//! for (server or client) and the time. A node dials the same few peers again and again (after
//! every partition, every restart of a peer), and each full handshake verified their unchanged
//! chains anew. The memo remembers every chain that verified, with the window in which all its
//! certificates are valid; a handshake that presents the very same bytes, for the same anchor, use
//! and server name, inside that window, skips the chain verification.
//!
//! What it never skips: the handshake signature (TLS 1.3 `CertificateVerify`), which proves that
//! the peer holds the certificate's private key. A copied certificate without its key still fails
//! every handshake. Failures are not remembered, so an error always comes from the full
//! verification with its exact reason.
//!
//! The memo is process-wide (a node is one process; the simulator runs all its nodes in one
//! process, where they share it) and bounded: it is emptied when it holds [`MEMO_MAX`] chains.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// How many verified chains the memo holds before it starts afresh (a cluster has a few nodes).
pub(super) const MEMO_MAX: usize = 1024;

/// `(not_before, not_after)` in Unix seconds: the window in which every certificate of a chain is
/// valid, as webpki checks it (`not_before <= now <= not_after`).
type Window = (i64, i64);

static VERIFIED: Mutex<Option<HashMap<Vec<u8>, Window>>> = Mutex::new(None);

/// The memo's key: the use, the anchor, the server name and the chain, each length-prefixed.
fn key(
    use_: u8,
    anchor: &[u8],
    server_name: &[u8],
    end_entity: &[u8],
    intermediates: &[CertificateDer<'_>],
) -> Vec<u8> {
    let parts = [anchor, server_name, end_entity].into_iter().chain(intermediates.iter().map(|c| c.as_ref()));
    let mut key = vec![use_];
    for part in parts {
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part);
    }
    key
}

fn remembered(key: &[u8], now: UnixTime) -> bool {
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let memo = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    memo.as_ref().and_then(|m| m.get(key)).is_some_and(|(from, to)| *from <= now && now <= *to)
}

/// Remembers a chain that verified. A chain whose validity cannot be read is not remembered.
fn remember(key: Vec<u8>, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) {
    let Some(window) = validity(end_entity, intermediates) else { return };
    let mut memo = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    let memo = memo.get_or_insert_with(HashMap::new);
    if memo.len() >= MEMO_MAX {
        memo.clear();
    }
    memo.insert(key, window);
}

/// A chain's verification through the memo: `hit` if the chain under `key` verified before and is
/// valid at `now`, else `verify`, whose success is remembered.
fn through_memo<T>(
    key: Vec<u8>,
    (end_entity, intermediates): (&CertificateDer<'_>, &[CertificateDer<'_>]),
    now: UnixTime,
    hit: impl FnOnce() -> T,
    verify: impl FnOnce() -> Result<T, rustls::Error>,
) -> Result<T, rustls::Error> {
    if remembered(&key, now) {
        return Ok(hit());
    }
    let verified = verify()?;
    remember(key, end_entity, intermediates);
    Ok(verified)
}

/// The window in which the end entity and every intermediate are all valid.
fn validity(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Option<Window> {
    let mut window = (i64::MIN, i64::MAX);
    for der in std::iter::once(end_entity).chain(intermediates) {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let v = cert.validity();
        window = (window.0.max(v.not_before.timestamp()), window.1.min(v.not_after.timestamp()));
    }
    Some(window)
}

/// A server verifier with the memo in front of its chain verification.
pub(super) struct MemoServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    /// The DER of the trust anchor `inner` verifies against.
    anchor: Vec<u8>,
}

impl MemoServerVerifier {
    pub(super) fn new(inner: Arc<dyn ServerCertVerifier>, anchor: &[u8]) -> Self {
        Self { inner, anchor: anchor.to_vec() }
    }
}

impl fmt::Debug for MemoServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoServerVerifier").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl ServerCertVerifier for MemoServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Only names the memo can tell apart, and no OCSP response (coyote sends none).
        let name = match server_name {
            ServerName::DnsName(name) if ocsp_response.is_empty() => name.as_ref().as_bytes(),
            _ => {
                return self.inner.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )
            }
        };
        let key = key(b's', &self.anchor, name, end_entity, intermediates);
        through_memo(key, (end_entity, intermediates), now, ServerCertVerified::assertion, || {
            self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// A client verifier with the memo in front of its chain verification.
pub(super) struct MemoClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// The DER of the trust anchor `inner` verifies against.
    anchor: Vec<u8>,
}

impl MemoClientVerifier {
    pub(super) fn new(inner: Arc<dyn ClientCertVerifier>, anchor: &[u8]) -> Self {
        Self { inner, anchor: anchor.to_vec() }
    }
}

impl fmt::Debug for MemoClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoClientVerifier").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl ClientCertVerifier for MemoClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = key(b'c', &self.anchor, &[], end_entity, intermediates);
        through_memo(key, (end_entity, intermediates), now, ClientCertVerified::assertion, || {
            self.inner.verify_client_cert(end_entity, intermediates, now)
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject;
    use rustls::server::WebPkiClientVerifier;

    use super::*;
    use crate::tls::{ca_roots, generate_node_key, provider, ClusterCa};

    fn chain_of(ca: &ClusterCa, id: u64) -> CertificateDer<'static> {
        let (_, csr) = generate_node_key().unwrap();
        CertificateDer::from_pem_slice(ca.sign_node(&csr, id).unwrap().as_bytes()).unwrap()
    }

    fn verifier(ca: &ClusterCa) -> MemoClientVerifier {
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let inner =
            WebPkiClientVerifier::builder_with_provider(Arc::new(ca_roots(&ca_der).unwrap()), provider())
                .build()
                .unwrap();
        MemoClientVerifier::new(inner, &ca_der)
    }

    #[test]
    fn a_verified_chain_is_remembered_only_for_its_anchor_and_within_its_validity() {
        let ca = ClusterCa::generate("memo-a").unwrap();
        let other = ClusterCa::generate("memo-b").unwrap();
        let cert = chain_of(&ca, 7);
        let ours = verifier(&ca);
        let now = UnixTime::now();
        let key_ours = key(b'c', &ours.anchor, &[], &cert, &[]);
        assert!(!remembered(&key_ours, now));
        ours.verify_client_cert(&cert, &[], now).unwrap();
        assert!(remembered(&key_ours, now), "a chain that verified is remembered");
        ours.verify_client_cert(&cert, &[], now).unwrap();

        // Another cluster's CA: a different key, and the full verification refuses it.
        let theirs = verifier(&other);
        assert!(!remembered(&key(b'c', &theirs.anchor, &[], &cert, &[]), now));
        let err = theirs.verify_client_cert(&cert, &[], now).unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        // Past the certificate's validity the memo does not answer; the verification says why.
        let (_, not_after) = validity(&cert, &[]).unwrap();
        let later = UnixTime::since_unix_epoch(Duration::from_secs(not_after as u64 + 1));
        assert!(!remembered(&key_ours, later));
        let err = ours.verify_client_cert(&cert, &[], later).unwrap_err();
        assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
    }
}
