//! The CRM: the web pages where a cluster is activated and run, served by every node.
//!
//! It reads from the node's replica of the log ([`LogNode`]) and writes only through the node's
//! local API (the same typed requests as the `coyote` CLI, `coyote_wire`), naming who acts in the
//! `coyote-actor` header: `user:NAME` for a person, `key:ID` for an API key. So every action is an
//! event whose envelope names its actor, and the event log is the audit log.
//!
//! # Pages
//! - `/activate/CODE`: the one-time activation URL (`coyote up` and `coyote crm activate` print
//!   it); its first use creates an admin.
//! - `/login`, `/logout`, `/account` (password change).
//! - `/` (overview: servers, services with their roles, open alarms), `/services` (create, show,
//!   switch authority and remove, each with a confirmation), `/alarms` (clear), `/events` (the log,
//!   filtered by kind and actor, live over server-sent events at `/events/stream`, resuming from
//!   `Last-Event-ID`), `/keys` (API keys: created, shown once, revoked).
//! - `/api/v1/...`: the node's API for scripts, with `Authorization: Bearer coyote_ID_SECRET`. A
//!   read key may only `GET`; no key reaches users, keys or activation URLs.
//!
//! # Security
//! Sessions are signed HttpOnly, SameSite=Strict cookies (Secure when served over TLS) that every
//! node of the cluster takes ([`auth`]). Every form carries
//! the session's CSRF token, and a request whose `Origin` is not this site is refused. Wrong
//! passwords are limited per address and per account ([`auth::Limiter`]). Pages are rendered on the
//! server with escaping (askama), work without JavaScript, and are served with a
//! Content-Security-Policy that allows no inline script; the one script (live events) is served by
//! the binary.

pub mod auth;
pub mod charts;
mod pages;
pub mod text;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use coyote_log::LogNode;
use coyote_state_machine::accounts::SignupStatus;
use coyote_wire::ErrorAnswer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower::ServiceExt;

use crate::auth::{Limiter, Session, Sessions};

/// The mark of a request that reached the pages over TLS (set by whoever serves them, the node's
/// proxy at the admin domain): the session cookie is then `Secure`.
#[derive(Clone, Copy, Debug)]
pub struct OverTls;

/// How the CRM is served.
#[derive(Clone, Default)]
pub struct Settings {
    /// Whether its pages reach browsers over TLS (the session cookie is then `Secure`).
    pub secure: bool,
    /// What the session cookies' key is derived from: the cluster CA's private key, which every
    /// node holds, so that a session works on every node. `None`: a random key, and sessions that
    /// work on this node only, until it restarts.
    pub session_secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("secure", &self.secure)
            .field("session_secret", &self.session_secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The CRM of one node.
#[derive(Clone)]
pub struct Crm(Arc<Inner>);

struct Inner {
    node: LogNode,
    api: Router,
    settings: Settings,
    sessions: Sessions,
    limiter: Limiter,
    /// Each applied event, decoded and rendered once for every follower of the events page
    /// ([`Crm::feed`]).
    feed: tokio::sync::broadcast::Sender<std::sync::Arc<FeedBatch>>,
    /// This node's traffic, sampled every [`SAMPLE_EVERY`] rounds of [`Crm::observe`].
    history: std::sync::Mutex<std::collections::VecDeque<Sample>>,
}

/// An event as the live events page receives it, rendered once.
#[derive(Debug)]
pub(crate) struct FeedItem {
    pub index: u64,
    pub kind: String,
    pub actor: String,
    /// The whole server-sent event: its id, and the JSON the page's script reads.
    pub frame: axum::body::Bytes,
}

/// Events applied together, or within [`FEED_COALESCE`] of each other, rendered once: each follower
/// sends a batch as one write, and one with no filter sends `joined` as it is.
#[derive(Debug)]
pub(crate) struct FeedBatch {
    /// In index order, without gaps; each item's frame is a slice of `joined`.
    pub items: Vec<FeedItem>,
    pub joined: axum::body::Bytes,
}

impl FeedBatch {
    fn new(records: &[coyote_log::store::EventRecord]) -> FeedBatch {
        let rendered: Vec<FeedItem> = records.iter().map(pages::feed_item).collect();
        let mut joined = Vec::with_capacity(rendered.iter().map(|i| i.frame.len()).sum());
        let mut at = Vec::with_capacity(rendered.len());
        for item in &rendered {
            at.push(joined.len()..joined.len() + item.frame.len());
            joined.extend_from_slice(&item.frame);
        }
        let joined = axum::body::Bytes::from(joined);
        let items = rendered
            .into_iter()
            .zip(at)
            .map(|(item, range)| FeedItem { frame: joined.slice(range), ..item })
            .collect();
        FeedBatch { items, joined }
    }

    pub fn first_index(&self) -> u64 {
        self.items.first().map_or(0, |i| i.index)
    }

    pub fn last_index(&self) -> u64 {
        self.items.last().map_or(0, |i| i.index)
    }
}

/// How long the feed waits after an event is applied for more, so that a burst goes out as one
/// batch: the live event log is at most this much later than the log.
pub const FEED_COALESCE: std::time::Duration = std::time::Duration::from_millis(20);
/// Events in one batch, at most.
const FEED_BATCH_MAX: usize = 256;

/// Batches the feed holds for followers that fall behind; one that falls further reads the archive.
const FEED_CAPACITY: usize = 256;

/// One reading of this node's traffic counters (totals since the node started).
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    /// Per service: connections and cold starts through the activator.
    pub services: std::collections::BTreeMap<String, (u64, u64)>,
    /// Per domain: requests through the proxy.
    pub domains: std::collections::BTreeMap<String, u64>,
}

/// Samples kept: ten minutes at one every 10 s.
pub(crate) const SAMPLES_KEPT: usize = 61;
/// Rounds of [`Crm::observe`] between two samples.
const SAMPLE_EVERY: u64 = 5;

/// How often [`Crm::observe`] looks for signups to report served.
const OBSERVE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest API answer the CRM reads.
const ANSWER_MAX: usize = 64 << 20;

/// An error shown as a page (or, under `/api`, as JSON).
#[derive(Debug)]
pub struct CrmError {
    pub status: StatusCode,
    pub message: String,
}

impl CrmError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        CrmError { status, message: message.into() }
    }
}

impl Crm {
    /// The CRM over `node`, writing through `api` (the node's local API router).
    pub fn new(node: LogNode, api: Router, settings: Settings) -> Crm {
        Crm(Arc::new(Inner {
            node,
            api,
            sessions: match &settings.session_secret {
                Some(secret) => Sessions::from_secret(secret),
                None => Sessions::random(),
            },
            settings,
            limiter: Limiter::default(),
            history: Default::default(),
            feed: tokio::sync::broadcast::channel(FEED_CAPACITY).0,
        }))
    }

    /// The pages and the `/api/v1` door, for the caller to serve (with
    /// `into_make_service_with_connect_info::<SocketAddr>` so that login limits see addresses).
    pub fn router(&self) -> Router {
        pages::router(self.clone())
    }

    /// Reports, for each signup whose service this node masters, when this node serves it
    /// (`SignupServed`, the last step a member sees). Runs until `stop`.
    pub async fn observe(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let me = self.node().id();
        let actor = format!("crm@node:{me}");
        let mut round = 0u64;
        loop {
            if round.is_multiple_of(SAMPLE_EVERY) {
                self.sample(&actor).await;
            }
            round += 1;
            let due: Vec<String> = self.node().store().with_state(|s| {
                s.accounts
                    .signups
                    .values()
                    .filter(|su| su.status == SignupStatus::Approved && su.served_at_ms.is_none())
                    .filter(|su| {
                        s.services
                            .get(&su.name)
                            .and_then(|svc| svc.placement.as_ref())
                            .is_some_and(|p| p.master == me)
                    })
                    .map(|su| su.name.clone())
                    .collect()
            });
            for name in due {
                // Refused (409) while this node does not serve it yet: asked again next round.
                let path = format!("/v1/signups/{name}/served");
                let _ = self.call::<coyote_wire::Committed>(&actor, Method::POST, &path, None::<&()>).await;
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(OBSERVE_EVERY) => {}
            }
        }
    }

    /// Renders each event this node applies, once, for the followers of the events page. Runs until
    /// `stop`.
    pub async fn feed(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let store = self.node().store();
        let mut applied = store.subscribe();
        let mut next = store.with_state(|s| s.last_applied + 1);
        loop {
            let records = store.events(next, FEED_BATCH_MAX).unwrap_or_default();
            let caught_up = records.len() < FEED_BATCH_MAX;
            if let Some(last) = records.last() {
                next = last.envelope.index + 1;
                // No follower: nothing to do.
                let _ = self.0.feed.send(std::sync::Arc::new(FeedBatch::new(&records)));
            }
            if caught_up {
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = &mut stop => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(FEED_COALESCE) => {}
                    _ = &mut stop => return,
                }
            }
        }
    }

    /// Reads this node's traffic counters into the history.
    async fn sample(&self, actor: &str) {
        let mut sample = Sample::default();
        let none: Option<&()> = None;
        if let Ok(stats) =
            self.call::<Vec<coyote_wire::ServiceStats>>(actor, Method::GET, "/v1/stats", none).await
        {
            for s in stats {
                sample.services.insert(s.service, (s.connections, s.cold_starts));
            }
        }
        if let Ok(web) = self.call::<coyote_wire::WebStats>(actor, Method::GET, "/v1/stats/web", none).await {
            for d in web.domains {
                sample.domains.insert(d.domain, d.requests_by_class.iter().sum());
            }
        }
        let mut history = self.0.history.lock().expect("history lock");
        history.push_back(sample);
        while history.len() > SAMPLES_KEPT {
            history.pop_front();
        }
    }

    fn node(&self) -> &LogNode {
        &self.0.node
    }

    /// Calls the node's API as `actor`, with `body` as JSON, and reads its answer.
    async fn call<T: DeserializeOwned>(
        &self,
        actor: &str,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CrmError> {
        let response = self
            .forward(actor, method, path, body.map(|b| serde_json::to_vec(b)).transpose().ok().flatten())
            .await;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), ANSWER_MAX)
            .await
            .map_err(|e| CrmError::new(StatusCode::BAD_GATEWAY, format!("reading the node's answer: {e}")))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorAnswer>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CrmError::new(status, message));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            CrmError::new(StatusCode::BAD_GATEWAY, format!("the node's answer is not understood: {e}"))
        })
    }

    /// Sends one request to the node's API as `actor`.
    async fn forward(&self, actor: &str, method: Method, path: &str, body: Option<Vec<u8>>) -> Response {
        let mut request = Request::builder().method(method).uri(path);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request =
            request.header(coyote_wire::ACTOR_HEADER, actor).body(Body::from(body.unwrap_or_default()));
        match request {
            Ok(request) => match self.0.api.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
            Err(e) => {
                (StatusCode::BAD_REQUEST, axum::Json(ErrorAnswer { error: format!("bad request: {e}") }))
                    .into_response()
            }
        }
    }

    /// The session the request names, or a new visitor's session (with the cookie to set).
    /// A session that is in the second half of its life comes with a renewed cookie.
    fn session(&self, headers: &HeaderMap) -> (Session, Option<HeaderValue>) {
        let now = self.node().now_ms();
        if let Some(value) = cookie(headers, auth::COOKIE) {
            if let Some(session) = self.0.sessions.check(value, now, |user| self.password_of(user)) {
                if !self.0.sessions.ageing(&session, now) {
                    return (session, None);
                }
                let renewed = self.0.sessions.renewed(&session, now);
                let cookie = self.cookie(&renewed);
                return (renewed, Some(cookie));
            }
        }
        let session = self.0.sessions.create(None, now);
        let cookie = self.cookie(&session);
        (session, Some(cookie))
    }

    /// A new session for `user` (or a visitor).
    fn new_session(&self, user: Option<String>) -> Session {
        self.0.sessions.create(user, self.node().now_ms())
    }

    /// The password hash of `user` in the log, which the user's sessions are signed over.
    fn password_of(&self, user: &str) -> Option<String> {
        self.node().store().with_state(|s| s.accounts.users.get(user).map(|u| u.password_hash.clone()))
    }

    /// The cookie that carries `session`.
    fn cookie(&self, session: &Session) -> HeaderValue {
        let password = session.user.as_deref().and_then(|u| self.password_of(u)).unwrap_or_default();
        self.cookie_over(session, &password)
    }

    /// The cookie that carries `session`, signed over its user's `password_hash`.
    fn cookie_over(&self, session: &Session, password_hash: &str) -> HeaderValue {
        let value = self.0.sessions.cookie_value(session, password_hash);
        let secure = if self.0.settings.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!("{}={value}; Path=/; HttpOnly; SameSite=Strict{secure}", auth::COOKIE))
            .expect("a cookie of hex, digits, dots and dashes is a valid header value")
    }

    /// The cookie that ends the session in the browser.
    fn cookie_cleared(&self) -> HeaderValue {
        let secure = if self.0.settings.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}",
            auth::COOKIE
        ))
        .expect("a valid header value")
    }
}

/// The value of cookie `name` in the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}
