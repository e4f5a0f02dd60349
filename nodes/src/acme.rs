//! Certificates from an ACME CA (Let's Encrypt by default), ordered once for the whole cluster.
//!
//! The rules live in the log (see `coyote_state_machine::certs`); this module is the part that talks
//! to the CA:
//!
//! - Every node's [`Orderer`] looks at the log every [`CHECK_EVERY`]. The leader claims the names
//!   that need a certificate (none yet, due for renewal, or an order whose claim lapsed), one at a
//!   time; the claim is an event, so exactly one node works on a name. A node also carries on with
//!   the orders it holds (after a restart, say).
//! - Working on an order (HTTP-01 or TLS-ALPN-01, [`Challenge`]): the account comes from the log (created by the first node that needed
//!   one, its key sealed); a new order's URL and the certificate's key are in the log before any
//!   challenge is answered, so a node that takes the claim over resumes the same order by its URL
//!   and finalizes it with the same key. The challenge answers go into the log and every
//!   node's proxy answers them ([`Installed`]), whichever node the CA reaches. The claimant renews
//!   its claim while it waits for the CA.
//! - A failure is an event too: the state machine decides when the next attempt may be (1 minute,
//!   10 minutes, 100 minutes, then daily) and keeps an alarm open until a certificate comes.
//! - Each node's proxy serves the certificates in the log ([`Installed::update`]); a name whose
//!   certificate is pending gets a self-signed placeholder ([`Placeholder`]), so TLS stays up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coyote_log::tls::{self as log_tls, ClusterCa};
use coyote_log::{LogNode, ProposeError};
use coyote_proxy::Proxy;
use coyote_state_machine::certs::CLAIM_LEASE_MS;
use coyote_state_machine::{Event, Outcome, State};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// Let's Encrypt's production directory: the default CA.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// How often each node looks for certificates to order.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often the claimant renews its claim while it waits for the CA (a third of the lease).
pub const RENEW_CLAIM_EVERY: Duration = Duration::from_millis(CLAIM_LEASE_MS / 3);
/// The longest one order may take, from its claim to its certificate.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the CA is asked about an order it is working on.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Time for the other nodes to apply a challenge answer before the CA is told to check it.
const CHALLENGE_SETTLE: Duration = Duration::from_millis(500);

/// Where certificates come from, and as whom.
#[derive(Clone, Debug)]
pub struct AcmeOptions {
    /// The CA's directory URL.
    pub directory: String,
    /// A contact address for the account (the CA writes before a certificate expires unrenewed).
    pub email: Option<String>,
    /// A PEM file with the root that the CA's own HTTPS certificate chains to, for a test or private
    /// CA (Let's Encrypt's is trusted by the system already).
    pub root_pem: Option<PathBuf>,
    /// How the CA checks that the cluster serves a name.
    pub challenge: Challenge,
}

/// The ACME challenge the cluster answers; every node's proxy answers either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// An HTTP request to port 80 (`/.well-known/acme-challenge/TOKEN`).
    Http01,
    /// A TLS handshake on port 443 with the ALPN protocol `acme-tls/1`.
    TlsAlpn01,
}

impl Challenge {
    pub fn parse(text: &str) -> Option<Challenge> {
        match text {
            "http-01" => Some(Challenge::Http01),
            "tls-alpn-01" => Some(Challenge::TlsAlpn01),
            _ => None,
        }
    }

    fn acme_type(self) -> ChallengeType {
        match self {
            Challenge::Http01 => ChallengeType::Http01,
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }
}

fn certified_key(chain: Vec<Vec<u8>>, key_der: Vec<u8>) -> Result<Arc<CertifiedKey>, String> {
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The certificate answering a TLS-ALPN-01 challenge, with its key. Not checked against its key
/// by parsing it: its critical `acmeIdentifier` extension is one that certificate parsers refuse.
fn challenge_key(cert: Vec<u8>, key_der: Vec<u8>) -> Result<Arc<CertifiedKey>, String> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(cert)], signing)))
}

/// Self-signed certificates for names whose real one is pending.
pub struct Placeholder;

impl coyote_proxy::Issuer for Placeholder {
    fn issue(&self, name: &str) -> Result<Arc<CertifiedKey>, String> {
        let (cert, key) = log_tls::placeholder_site(name).map_err(|e| e.to_string())?;
        certified_key(vec![cert], key)
    }
}

/// The certificates and challenge answers of the log, as installed in this node's proxy.
#[derive(Default)]
pub(crate) struct Installed {
    /// By name: when the certificate was issued (to know it unchanged) and the key to serve.
    certificates: HashMap<String, (u64, Arc<CertifiedKey>)>,
    challenges: HashMap<String, String>,
    /// TLS-ALPN-01: by name, the key authorization and the certificate that answers it.
    alpn: HashMap<String, (String, Arc<CertifiedKey>)>,
}

impl Installed {
    /// Brings the proxy in line with the log's certificates and challenges; reads a certificate only
    /// when it changed.
    pub(crate) fn update(&mut self, state: &State, ca: &ClusterCa, proxy: &Proxy) {
        let challenges: HashMap<String, String> = state
            .certs
            .values()
            .filter_map(|r| r.order.as_ref())
            .flat_map(|o| o.challenges.iter().map(|(t, k)| (t.clone(), k.clone())))
            .collect();
        if challenges != self.challenges {
            proxy.set_challenges(challenges.clone());
            self.challenges = challenges;
        }
        let wanted: HashMap<&String, &String> = state
            .certs
            .iter()
            .filter_map(|(name, r)| Some((name, r.order.as_ref()?.challenges.values().next_back()?)))
            .collect();
        let same = wanted.len() == self.alpn.len()
            && wanted.iter().all(|(n, k)| self.alpn.get(*n).is_some_and(|(have, _)| have == *k));
        if !same {
            let mut alpn = HashMap::new();
            for (name, key_authorization) in wanted {
                let kept = self.alpn.get(name).filter(|(have, _)| have == key_authorization);
                let key = match kept {
                    Some((_, key)) => Ok(key.clone()),
                    None => log_tls::acme_alpn_site(name, key_authorization)
                        .map_err(|e| e.to_string())
                        .and_then(|(cert, key)| challenge_key(cert, key)),
                };
                match key {
                    Ok(key) => {
                        alpn.insert(name.clone(), (key_authorization.clone(), key));
                    }
                    Err(e) => tracing::error!(name, "cannot answer the TLS-ALPN-01 challenge: {e}"),
                }
            }
            proxy.set_alpn_challenges(alpn.iter().map(|(n, (_, k))| (n.clone(), k.clone())).collect());
            self.alpn = alpn;
        }
        let mut changed =
            self.certificates.len() != state.certs.values().filter(|r| r.current.is_some()).count();
        let mut certificates = HashMap::new();
        for (name, record) in &state.certs {
            let Some(current) = &record.current else { continue };
            if let Some((at, key)) = self.certificates.get(name).filter(|(at, _)| *at == current.issued_at_ms)
            {
                certificates.insert(name.clone(), (*at, key.clone()));
                continue;
            }
            changed = true;
            let key = ca
                .unseal(&current.key_sealed)
                .map_err(|e| e.to_string())
                .and_then(|key| {
                    Ok((log_tls::chain_facts(&current.chain_pem).map_err(|e| e.to_string())?, key))
                })
                .and_then(|(facts, key)| certified_key(facts.chain, key));
            match key {
                Ok(key) => {
                    certificates.insert(name.clone(), (current.issued_at_ms, key));
                }
                Err(e) => tracing::error!(name, "the certificate in the log cannot be served: {e}"),
            }
        }
        if changed {
            proxy
                .certificates()
                .install(certificates.iter().map(|(n, (_, k))| (n.clone(), k.clone())).collect());
            self.certificates = certificates;
        }
    }
}

/// Why an order stopped.
#[derive(Debug)]
enum Stopped {
    /// Another node holds the order now (or the name is no longer wanted): nothing to report.
    Lost(String),
    /// The order failed: recorded in the log, which decides when to try again.
    Failed(String),
}

impl From<instant_acme::Error> for Stopped {
    fn from(e: instant_acme::Error) -> Self {
        Stopped::Failed(format!("the CA said: {e}"))
    }
}

/// One node's part in ordering certificates.
pub(crate) struct Orderer {
    log: LogNode,
    ca: ClusterCa,
    options: AcmeOptions,
    account: tokio::sync::Mutex<Option<Account>>,
}

impl Orderer {
    pub(crate) fn new(log: LogNode, ca: ClusterCa, options: AcmeOptions) -> Arc<Orderer> {
        Arc::new(Orderer { log, ca, options, account: tokio::sync::Mutex::new(None) })
    }

    fn actor(&self) -> String {
        format!("acme@node:{}", self.log.id())
    }

    /// Looks for certificates to order every [`CHECK_EVERY`], until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = self.pass() => {}
            }
        }
    }

    async fn pass(&self) {
        let me = self.log.id();
        let now = self.log.now_ms();
        let (mine, wanted) = self.log.store().with_state(|s| {
            let mut mine = Vec::new();
            let mut wanted = Vec::new();
            for name in s.orderable_names() {
                match s.certs.get(&name) {
                    Some(r) if r.claimed_by(now) == Some(me) => mine.push(name),
                    Some(r) if r.claimed_by(now).is_some() || now < r.retry_at_ms => {}
                    Some(r) if r.order.is_some() || r.due(now) => wanted.push(name),
                    Some(_) => {}
                    None => wanted.push(name),
                }
            }
            (mine, wanted)
        });
        for name in mine {
            self.work(&name).await;
        }
        if wanted.is_empty() || self.log.raft().current_leader().await != Some(me) {
            return;
        }
        for name in wanted {
            match self.propose(Event::CertOrderClaimed { name: name.clone(), node: me }).await {
                Ok(()) => self.work(&name).await,
                Err(Stopped::Lost(why) | Stopped::Failed(why)) => {
                    tracing::debug!(name, "not ordering a certificate: {why}")
                }
            }
        }
    }

    /// Works on the order of `name` this node holds, until it is over one way or another.
    async fn work(&self, name: &str) {
        tracing::info!(name, "ordering a certificate from {}", self.options.directory);
        let outcome = match tokio::time::timeout(ORDER_TIMEOUT, self.order(name)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                Err(Stopped::Failed(format!("the order took longer than {} s", ORDER_TIMEOUT.as_secs())))
            }
        };
        match outcome {
            Ok(()) => tracing::info!(name, "certificate issued"),
            Err(Stopped::Lost(why)) => tracing::info!(name, "left the order: {why}"),
            Err(Stopped::Failed(reason)) => {
                tracing::warn!(name, "the certificate order failed: {reason}");
                let event = Event::CertOrderFailed { name: name.to_string(), node: self.log.id(), reason };
                if let Err(Stopped::Lost(e) | Stopped::Failed(e)) = self.propose(event).await {
                    tracing::warn!(name, "cannot record the failure: {e}");
                }
            }
        }
    }

    async fn order(&self, name: &str) -> Result<(), Stopped> {
        let me = self.log.id();
        let account = self.account().await?;
        let placed = self.log.store().with_state(|s| {
            s.certs
                .get(name)
                .and_then(|r| r.order.as_ref())
                .map(|o| (o.order_url.clone(), o.key_sealed.clone()))
        });
        let Some((order_url, key_sealed)) = placed else {
            return Err(Stopped::Lost("no order of this name is under way".into()));
        };
        let (mut order, key_der, key_sealed) = match (order_url, key_sealed) {
            (Some(url), Some(sealed)) => {
                tracing::info!(name, url, "resuming the order");
                let key =
                    self.ca.unseal(&sealed).map_err(|e| Stopped::Failed(format!("the order's key: {e}")))?;
                (account.order(url).await?, key, sealed)
            }
            _ => {
                let key = log_tls::new_site_key().map_err(|e| Stopped::Failed(e.to_string()))?;
                let identifiers = [Identifier::Dns(name.to_string())];
                let order = account.new_order(&NewOrder::new(&identifiers)).await?;
                let sealed = self.ca.seal(&key);
                let event = Event::CertOrderPlaced {
                    name: name.to_string(),
                    node: me,
                    order_url: order.url().to_string(),
                    key_sealed: sealed.clone(),
                };
                self.propose(event).await?;
                (order, key, sealed)
            }
        };
        let mut renewed = tokio::time::Instant::now();
        if order.state().status == OrderStatus::Pending {
            let mut ready = Vec::new();
            {
                let mut authorizations = order.authorizations();
                while let Some(authorization) = authorizations.next().await {
                    let mut authorization = authorization?;
                    match authorization.status {
                        AuthorizationStatus::Valid => continue,
                        AuthorizationStatus::Pending => {}
                        other => return Err(Stopped::Failed(format!("the CA's authorization is {other:?}"))),
                    }
                    let kind = self.options.challenge;
                    let challenge = authorization
                        .challenge(kind.acme_type())
                        .ok_or_else(|| Stopped::Failed(format!("the CA offers no {kind:?} challenge")))?;
                    ready.push((
                        challenge.token.clone(),
                        challenge.key_authorization().as_str().to_string(),
                        challenge.status == ChallengeStatus::Pending,
                        challenge.url.clone(),
                    ));
                }
            }
            for (token, key_authorization, _, _) in &ready {
                let event = Event::AcmeChallengeReady {
                    name: name.to_string(),
                    node: me,
                    token: token.clone(),
                    key_authorization: key_authorization.clone(),
                };
                self.propose(event).await?;
            }
            tokio::time::sleep(CHALLENGE_SETTLE).await;
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization?;
                if let Some(mut challenge) = authorization.challenge(self.options.challenge.acme_type()) {
                    let pending = ready.iter().any(|(_, _, pending, url)| *pending && *url == challenge.url);
                    if pending {
                        challenge.set_ready().await?;
                    }
                }
            }
        }
        loop {
            let state = order.refresh().await?;
            match state.status {
                OrderStatus::Ready | OrderStatus::Processing | OrderStatus::Valid => break,
                OrderStatus::Invalid => {
                    let why = state
                        .error
                        .as_ref()
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "no reason given".into());
                    return Err(Stopped::Failed(format!("the CA found the order invalid: {why}")));
                }
                OrderStatus::Pending => {}
            }
            if renewed.elapsed() >= RENEW_CLAIM_EVERY {
                self.propose(Event::CertOrderClaimed { name: name.to_string(), node: me }).await?;
                renewed = tokio::time::Instant::now();
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        if order.state().status == OrderStatus::Ready {
            let csr = log_tls::site_csr(&[name.to_string()], &key_der)
                .map_err(|e| Stopped::Failed(e.to_string()))?;
            order.finalize_csr(&csr).await?;
        }
        let chain_pem = loop {
            if let Some(pem) = order.certificate().await? {
                break pem;
            }
            tokio::time::sleep(POLL_EVERY).await;
        };
        let facts = log_tls::chain_facts(&chain_pem)
            .map_err(|e| Stopped::Failed(format!("the CA sent an unusable certificate: {e}")))?;
        if !facts.names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(Stopped::Failed(format!(
                "the CA's certificate is for {:?}, not {name}",
                facts.names
            )));
        }
        certified_key(facts.chain.clone(), key_der)
            .map_err(|e| Stopped::Failed(format!("the certificate does not go with its key: {e}")))?;
        self.propose(Event::CertIssued {
            name: name.to_string(),
            node: me,
            chain_pem,
            key_sealed,
            not_before_ms: facts.not_before_ms,
            not_after_ms: facts.not_after_ms,
            issuer: facts.issuer,
        })
        .await
    }

    /// The cluster's account at the CA: from the log, or created now (and put in the log).
    async fn account(&self) -> Result<Account, Stopped> {
        let mut cached = self.account.lock().await;
        if let Some(account) = cached.as_ref() {
            return Ok(account.clone());
        }
        let directory = &self.options.directory;
        let sealed = || {
            self.log.store().with_state(|s| {
                s.acme.as_ref().filter(|a| a.directory == *directory).map(|a| a.credentials_sealed.clone())
            })
        };
        let account = match sealed() {
            Some(sealed) => self.restore_account(&sealed).await?,
            None => {
                let contact = self.options.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = self.builder()?.create(&new, directory.clone(), None).await?;
                let json = serde_json::to_vec(&credentials).map_err(|e| Stopped::Failed(e.to_string()))?;
                let event = Event::AcmeAccountCreated {
                    directory: directory.clone(),
                    account_url: account.id().to_string(),
                    credentials_sealed: self.ca.seal(&json),
                };
                match self.propose(event).await {
                    Ok(()) => account,
                    // Another node created one first: use that one.
                    Err(_) => {
                        let sealed =
                            sealed().ok_or_else(|| Stopped::Failed("no ACME account in the log".into()))?;
                        self.restore_account(&sealed).await?
                    }
                }
            }
        };
        *cached = Some(account.clone());
        Ok(account)
    }

    async fn restore_account(&self, sealed: &[u8]) -> Result<Account, Stopped> {
        let json = self.ca.unseal(sealed).map_err(|e| Stopped::Failed(format!("the ACME account: {e}")))?;
        let credentials: AccountCredentials =
            serde_json::from_slice(&json).map_err(|e| Stopped::Failed(format!("the ACME account: {e}")))?;
        Ok(self.builder()?.from_credentials(credentials).await?)
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, Stopped> {
        let builder = match &self.options.root_pem {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        builder.map_err(|e| Stopped::Failed(format!("cannot set up HTTPS to the CA: {e}")))
    }

    /// Proposes `event`; a rejection means the order is no longer this node's.
    async fn propose(&self, event: Event) -> Result<(), Stopped> {
        match self.log.propose(event, self.actor()).await {
            Ok(proposed) => match proposed.outcome {
                Outcome::Applied => Ok(()),
                Outcome::Rejected { reason } => Err(Stopped::Lost(reason)),
            },
            Err(ProposeError::Rejected(reason)) => Err(Stopped::Lost(reason)),
            Err(e) => Err(Stopped::Lost(format!("the log did not take it: {e}"))),
        }
    }
}
