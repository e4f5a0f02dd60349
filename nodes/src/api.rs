//! The node's local API: JSON over HTTP on a unix socket in the data directory (like docker.sock).
//!
//! The CLI, and later the proxy and the CRM, reach the node through it. Access is governed by the
//! socket file's permissions (the data directory is 0700), so it needs no password and no network.
//! Reads come from the local replica; writes are proposals, forwarded to the leader when needed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use coyote_log::store::EventRecord;
use coyote_log::{JoinToken, LogNode, ProposeError, Proposed};
use coyote_state_machine::{
    serve_from, sha256_hex, AccountEvent, Event, Outcome, ServiceSpec, SwitchCause, HANDOVER_WAIT_MS,
};
use serde::Deserialize;
use serde_json::json;

use crate::activator::Activator;
use crate::fence::Fence;
use crate::reconciler::Reconciler;
use crate::wire;
use crate::wire::{
    AlarmRaise, AlarmRaised, Committed, ErrorAnswer, EventView, EventsPage, PlanView, ServiceCreated,
    ServiceStats, ServiceUpdated, ServiceView, Serving, Status, SwitchAnswer, SwitchHow, SwitchRequest,
    TokenCreate, TokenCreated, TokenView,
};
use coyote_state_machine::Alarm;

/// Events scanned by one non-following request (one page), at most.
pub const EVENTS_PAGE_MAX: usize = 10_000;
/// Largest token lifetime: a week.
pub const TOKEN_TTL_MAX_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Clone)]
pub struct Api {
    pub node: LogNode,
    /// This node's address, which the tokens it issues point at.
    pub advertise: String,
    /// `None` when this node does not manage containers.
    pub reconciler: Option<Arc<Reconciler>>,
    /// This server's lease: which services it may serve right now.
    pub fence: Fence,
    /// `None` when this node does not manage containers.
    pub activator: Option<Arc<Activator>>,
    /// `None` when this node keeps no backups.
    pub backups: Option<Arc<crate::backups::Backups>>,
    /// `None` when this node runs no proxy.
    pub proxy: Option<Arc<coyote_proxy::Proxy>>,
    /// The ACME CA this node's proxy orders certificates from (`None`: the cluster's own CA).
    pub acme_directory: Option<String>,
    /// Where this node serves the CRM (`http://HOST:PORT`), for the activation URLs it issues.
    pub crm_url: Option<String>,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/v1/tokens", get(tokens).post(token_create))
        .route("/v1/tokens/{id}", axum::routing::delete(token_revoke))
        .route("/v1/services", get(services).post(service_create))
        .route("/v1/services/{name}", get(service_show).put(service_update).delete(service_remove))
        .route("/v1/services/{name}/switch", post(service_switch))
        .route("/v1/serving", get(serving))
        .route("/v1/stats", get(stats))
        .route("/v1/stats/web", get(web_stats))
        .route("/v1/certs", get(certs))
        .route("/metrics", get(metrics))
        .route("/v1/plan", get(plan))
        .route("/v1/alarms", get(alarms).post(alarm_raise))
        .route("/v1/alarms/{id}/clear", post(alarm_clear))
        .route("/v1/backups", get(backups_view))
        .route("/v1/backups/verify", post(backup_verify))
        .route("/v1/backups/{service}", get(backup_list))
        .route("/v1/backups/{service}/restore", post(backup_restore))
        .route("/v1/backups/{service}/rollback", post(backup_rollback))
        .route("/v1/backups/{service}/now", post(backup_now))
        .route("/v1/backups/{service}/export", get(backup_export))
        .route("/v1/activations", post(activation_create))
        .route("/v1/activations/use", post(activation_use))
        .route("/v1/users", get(users).post(user_create))
        .route("/v1/users/{name}/password", post(password_change))
        .route("/v1/keys", get(keys).post(key_create))
        .route("/v1/keys/{id}", axum::routing::delete(key_revoke))
        .route("/v1/keys/{id}/used", post(key_used))
        .route("/v1/settings", get(settings).put(settings_change))
        .route("/v1/invites", post(invite_create))
        .route("/v1/invites/{id}", axum::routing::delete(invite_revoke))
        .route("/v1/signups", post(signup_create))
        .route("/v1/signups/{name}/decide", post(signup_decide))
        .route("/v1/signups/{name}/served", post(signup_served))
        .route("/v1/leave", post(leave))
        .route("/v1/nodes/{id}/remove", post(node_remove))
        .with_state(api)
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorAnswer { error: self.1 })).into_response()
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        let code = match e {
            ProposeError::Rejected(_) => StatusCode::CONFLICT,
            ProposeError::NoLeader(_)
            | ProposeError::Forward(_)
            | ProposeError::NotLeader
            | ProposeError::Uncertain(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProposeError::DiskFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ProposeError::Fatal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The request header that names who asks (the CRM names its user, the simulator its admin). Without
/// it, the actor is the CLI on this node (`cli@node:N`). Anyone who can open the socket may act, so
/// this names, it does not authorise.
pub use coyote_wire::ACTOR_HEADER;
/// Longest actor name, in bytes.
pub const ACTOR_MAX_BYTES: usize = 128;

/// A request that proposes: the node's API, and who asks (recorded in the event's envelope).
struct Caller {
    api: Api,
    actor: String,
}

impl FromRequestParts<Api> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, ApiError> {
        let actor = match parts.headers.get(ACTOR_HEADER) {
            None => format!("cli@node:{}", api.node.id()),
            Some(value) => {
                let bad = || {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "the {ACTOR_HEADER} header must be 1 to {ACTOR_MAX_BYTES} printable characters"
                        ),
                    )
                };
                let text = value.to_str().map_err(|_| bad())?;
                if text.is_empty() || text.len() > ACTOR_MAX_BYTES || text.chars().any(char::is_control) {
                    return Err(bad());
                }
                text.to_string()
            }
        };
        Ok(Caller { api: api.clone(), actor })
    }
}

/// Proposes and turns a committed rejection into an error, so callers see one kind of failure.
async fn propose(caller: &Caller, event: Event) -> Result<Proposed, ApiError> {
    propose_at(caller, event, caller.api.node.now_ms()).await
}

/// [`propose`] with the envelope's clock reading given, for an answer that derives a moment from it
/// (one clock reading per proposal).
async fn propose_at(caller: &Caller, event: Event, at_ms: u64) -> Result<Proposed, ApiError> {
    let proposed = caller.api.node.propose_at(event, caller.actor.clone(), at_ms).await?;
    match &proposed.outcome {
        Outcome::Applied => Ok(proposed),
        Outcome::Rejected { reason } => Err(ApiError(StatusCode::CONFLICT, reason.clone())),
    }
}

async fn status(State(api): State<Api>) -> ApiResult<Status> {
    let cluster = api.node.status().await;
    let now_ms = api.node.now_ms();
    let services = api.node.store().with_state(|s| {
        s.services
            .iter()
            .map(|(name, svc)| {
                let p = svc.placement.as_ref();
                let failover = p.and_then(|p| p.failover);
                let ledger = s.data.get(name);
                wire::ServiceData {
                    service: name.clone(),
                    master: p.map(|p| p.master),
                    failover,
                    data_age_ms: failover.zip(ledger).and_then(|(f, d)| d.data_age_ms(f, now_ms)),
                    snapshots: ledger.map_or(0, |d| d.snapshots.len() as u64),
                }
            })
            .collect()
    });
    let voters: Vec<_> = cluster.members.iter().filter(|m| m.role != "learner").collect();
    let tolerance = wire::Tolerance::of(voters.len(), voters.iter().filter(|m| m.reachable).count());
    Ok(Json(Status { cluster, services, tolerance }))
}

/// One step of this server's leave (`coyote node leave`), asked again until it has left. While it
/// is master of services, each is handed over (gracefully, with its data) to its failover, or its
/// first backup: the handovers not yet under way are asked for, and the answer lists them all.
/// Once it masters nothing, the leave itself is recorded: its other roles are refilled elsewhere,
/// the leader takes it out of Raft's membership, and this node removes its containers and stops.
async fn leave(caller: Caller) -> ApiResult<wire::LeaveAnswer> {
    let me = caller.api.node.id();
    let plan: Result<Vec<(wire::HandingOver, bool)>, String> = caller.api.node.store().with_state(|s| {
        let mut out = Vec::new();
        for name in s.services_where(me, coyote_state_machine::Role::Master) {
            if let Some(h) = s.handover(name) {
                out.push((wire::HandingOver { service: name.to_string(), to: h.to }, false));
                continue;
            }
            let p = s.services[name].placement.as_ref();
            let to = p.and_then(|p| p.failover.or_else(|| p.backups.first().copied()));
            let Some(to) = to else {
                return Err(format!(
                    "{name} has no other server to go to (no failover, no backup): add a server first, or remove the service"
                ));
            };
            out.push((wire::HandingOver { service: name.to_string(), to }, true));
        }
        Ok(out)
    });
    let plan = plan.map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    if plan.is_empty() {
        let event = Event::NodeLeft { node_id: me, reason: "it left (coyote node leave)".into() };
        let proposed = propose(&caller, event).await?;
        return Ok(Json(wire::LeaveAnswer { handing_over: Vec::new(), left_at: Some(proposed.index) }));
    }
    let mut handing_over = Vec::new();
    for (h, ask) in plan {
        if ask {
            let reason = format!("node {me} leaves the cluster");
            propose(&caller, Event::HandoverRequested { service: h.service.clone(), to: h.to, reason })
                .await?;
        }
        handing_over.push(h);
    }
    Ok(Json(wire::LeaveAnswer { handing_over, left_at: None }))
}

/// A server that is gone is taken out of the cluster (`coyote node remove`).
async fn node_remove(
    caller: Caller,
    Path(id): Path<u64>,
    Json(req): Json<wire::NodeRemove>,
) -> ApiResult<Committed> {
    if id == caller.api.node.id() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("node {id} is this server: to take it out, run `coyote node leave` on it"),
        ));
    }
    let reason = req.reason.unwrap_or_else(|| format!("removed through node {}", caller.api.node.id()));
    if reason.len() > 200 || reason.chars().any(char::is_control) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "a reason is at most 200 printable bytes".into()));
    }
    let event = Event::NodeRemoved { node_id: id, reason, forced: req.force };
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[derive(Deserialize)]
struct EventsQuery {
    from: Option<u64>,
    kind: Option<String>,
    #[serde(default)]
    follow: bool,
}

async fn events(State(api): State<Api>, Query(q): Query<EventsQuery>) -> Result<Response, ApiError> {
    if let Some(kind) = &q.kind {
        if !Event::KINDS.contains(&kind.as_str()) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown event kind {kind:?}; kinds: {}", Event::KINDS.join(", ")),
            ));
        }
    }
    let from = q.from.unwrap_or(0);
    if !q.follow {
        // One page: `next` is where the following page starts, absent after the last one.
        let records = read_events(&api, from, EVENTS_PAGE_MAX)?;
        let next = (records.len() == EVENTS_PAGE_MAX).then(|| records.last().map(|r| r.envelope.index + 1));
        let events: Vec<EventView> = records
            .iter()
            .filter(|r| q.kind.as_deref().is_none_or(|k| k == r.envelope.event.kind()))
            .map(EventView::from)
            .collect();
        return Ok(Json(EventsPage { events, next: next.flatten() }).into_response());
    }
    // Following: one JSON object per line, for as long as the client keeps the connection.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let mut next = from;
        let mut applied = api.node.store().subscribe();
        loop {
            let records = match read_events(&api, next, 1000) {
                Ok(r) => r,
                Err(e) => {
                    let line = json!(ErrorAnswer { error: e.1 });
                    let _ = tx.send(Ok(Bytes::from(format!("{line}\n")))).await;
                    return;
                }
            };
            let caught_up = records.len() < 1000;
            for r in records {
                next = r.envelope.index + 1;
                if q.kind.as_deref().is_some_and(|k| k != r.envelope.event.kind()) {
                    continue;
                }
                let line = format!("{}\n", json!(EventView::from(&r)));
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return; // the client went away
                }
            }
            if caught_up {
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    // A heartbeat newline lets the client notice a dead node.
                    _ = tokio::time::sleep(Duration::from_secs(15)) => {
                        if tx.send(Ok(Bytes::from_static(b"\n"))).await.is_err() { return }
                    }
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(Response::builder().header("content-type", "application/x-ndjson").body(body).expect("valid response"))
}

fn read_events(api: &Api, from: u64, limit: usize) -> Result<Vec<EventRecord>, ApiError> {
    api.node
        .store()
        .events(from, limit)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the event archive: {e}")))
}

async fn token_create(caller: Caller, Json(req): Json<TokenCreate>) -> ApiResult<TokenCreated> {
    let api = &caller.api;
    if req.ttl_ms == 0 || req.ttl_ms > TOKEN_TTL_MAX_MS {
        return Err(ApiError(StatusCode::BAD_REQUEST, "a token lives between 1 ms and 7 days".into()));
    }
    let pin = api.node.store().with_state(|s| s.cluster.as_ref().map(|c| c.ca_pin.clone()));
    let pin = pin
        .ok_or_else(|| ApiError(StatusCode::SERVICE_UNAVAILABLE, "the cluster is not created yet".into()))?;
    let token = JoinToken::generate(api.advertise.clone(), pin);
    let at_ms = api.node.now_ms();
    let expires_at_ms = at_ms + req.ttl_ms;
    let event = Event::TokenIssued {
        token_id: token.id.clone(),
        secret_sha256: token.secret_sha256(),
        expires_at_ms,
        uses: req.uses,
    };
    let proposed = propose_at(&caller, event, at_ms).await?;
    Ok(Json(TokenCreated {
        token: token.encode(),
        id: token.id,
        expires_at_ms,
        uses: req.uses,
        index: proposed.index,
    }))
}

async fn tokens(State(api): State<Api>) -> ApiResult<Vec<TokenView>> {
    let now = api.node.now_ms();
    Ok(Json(api.node.store().with_state(|s| s.tokens.values().map(|t| TokenView::new(t, now)).collect())))
}

async fn token_revoke(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::TokenRevoked { token_id: id }).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn service_create(caller: Caller, Json(spec): Json<ServiceSpec>) -> ApiResult<ServiceCreated> {
    let api = &caller.api;
    let name = spec.name.clone();
    let created = propose(&caller, Event::ServiceCreated { spec }).await?;
    // The log placed the service when it applied the event; the local replica has applied it once
    // `propose` returns on the leader, and a follower catches up within a heartbeat or two.
    let placement =
        api.node.store().with_state(|s| s.services.get(&name).and_then(|svc| svc.placement.clone()));
    Ok(Json(ServiceCreated { name, index: created.index, placement }))
}

/// An instruction: the way a backup (or any member with a role) becomes master. By default a
/// graceful handover (the master dumps, stops and then switches; see `State::handovers`); with
/// `now`, the switch itself.
async fn service_switch(
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<SwitchRequest>,
) -> ApiResult<SwitchAnswer> {
    let api = &caller.api;
    let reason = format!("instructed through node {}", api.node.id());
    if !req.now {
        let master = api
            .node
            .store()
            .with_state(|s| s.services.get(&name).and_then(|svc| svc.placement.as_ref()).map(|p| p.master));
        let event = Event::HandoverRequested { service: name.clone(), to: req.to, reason };
        let proposed = propose(&caller, event).await?;
        let how = SwitchHow::Handover { from: master, wait_ms: HANDOVER_WAIT_MS };
        return Ok(Json(SwitchAnswer { name, to: req.to, index: proposed.index, how }));
    }
    let event = Event::AuthoritySwitched {
        service: name.clone(),
        to: req.to,
        reason: format!("{reason}, at once"),
        not_before_ms: 0,
        cause: SwitchCause::Instruction,
    };
    // One clock reading: the envelope's, from which `apply` derives the moment of serving.
    let at_ms = api.node.now_ms();
    let proposed = propose_at(&caller, event, at_ms).await?;
    let how = SwitchHow::Now { serve_from_ms: serve_from(at_ms) };
    Ok(Json(SwitchAnswer { name, to: req.to, index: proposed.index, how }))
}

async fn stats(State(api): State<Api>) -> ApiResult<Vec<ServiceStats>> {
    Ok(Json(match &api.activator {
        Some(a) => a.stats().await,
        None => Vec::new(),
    }))
}

async fn web_stats(State(api): State<Api>) -> ApiResult<crate::wire::WebStats> {
    match &api.proxy {
        Some(p) => Ok(Json(crate::front::web_stats(&p.stats))),
        None => Err(ApiError(StatusCode::NOT_FOUND, "this node runs no proxy (--no-proxy)".into())),
    }
}

/// A router with only `/metrics` (the Prometheus text), for a TCP listener (`--metrics`): the rest of
/// the API stays on the unix socket.
pub fn metrics_router(api: Api) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(api)
}

async fn metrics(State(api): State<Api>) -> Response {
    let stats = match &api.activator {
        Some(a) => a.stats().await,
        None => Vec::new(),
    };
    let mut text = crate::activator::prometheus(&stats);
    if let Some(r) = &api.reconciler {
        // Also when Docker is down, where `/v1/plan` cannot answer.
        text.push_str("# TYPE coyote_reconciler_passes_total counter\n");
        text.push_str(&format!("coyote_reconciler_passes_total {}\n", r.passes()));
    }
    if let Some(b) = &api.backups {
        let p = b.pause_stats();
        text.push_str("# TYPE coyote_backup_pause_ms summary\n");
        for (q, v) in [("0.5", p.p50_ms), ("0.99", p.p99_ms), ("1", p.max_ms)] {
            text.push_str(&format!("coyote_backup_pause_ms{{quantile=\"{q}\"}} {v}\n"));
        }
        text.push_str(&format!("coyote_backup_pause_ms_count {}\n", p.count));
    }
    if let Some(p) = &api.proxy {
        text.push_str(&p.stats.prometheus());
    }
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

async fn serving(State(api): State<Api>) -> ApiResult<Serving> {
    Ok(Json(Serving { node_id: api.node.id(), serving: api.fence.serving_services() }))
}

async fn services(State(api): State<Api>) -> ApiResult<Vec<ServiceView>> {
    Ok(Json(api.node.store().with_state(|s| s.services.values().map(ServiceView::from).collect())))
}

async fn service_show(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<ServiceView> {
    api.node
        .store()
        .with_state(|s| s.services.get(&name).map(ServiceView::from))
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("service {name} does not exist")))
}

async fn service_update(
    caller: Caller,
    Path(name): Path<String>,
    Json(spec): Json<ServiceSpec>,
) -> ApiResult<ServiceUpdated> {
    if spec.name != name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the spec names service {:?}, not {name:?}", spec.name),
        ));
    }
    let spec_hash = spec.hash();
    let proposed = propose(&caller, Event::ServiceSpecChanged { spec }).await?;
    Ok(Json(ServiceUpdated { name, index: proposed.index, spec_hash }))
}

/// What this node's reconciler would do now, without doing it.
async fn plan(State(api): State<Api>) -> ApiResult<PlanView> {
    let Some(reconciler) = &api.reconciler else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this node does not manage containers (it runs with --no-reconcile)".into(),
        ));
    };
    let view =
        reconciler.plan_now().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(view))
}

async fn service_remove(caller: Caller, Path(name): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::ServiceRemoved { name }).await?;
    Ok(Json(Committed { index: proposed.index }))
}

/// Every name a certificate may be ordered for, with what the log knows of it (no keys).
async fn certs(State(api): State<Api>) -> ApiResult<Vec<crate::wire::CertView>> {
    let now = api.node.now_ms();
    let acme = api.acme_directory.clone();
    let views = api.node.store().with_state(|s| {
        s.orderable_names()
            .into_iter()
            .map(|name| {
                let record = s.certs.get(&name).cloned().unwrap_or_default();
                let current = record.current.as_ref();
                let state = match (&acme, current) {
                    (None, None) => "cluster CA",
                    _ => record.state_name(now),
                };
                crate::wire::CertView {
                    issuer: current.map(|c| c.issuer.clone()),
                    not_before_ms: current.map(|c| c.not_before_ms),
                    not_after_ms: current.map(|c| c.not_after_ms),
                    renew_at_ms: record.renew_at_ms(),
                    state: state.to_string(),
                    ordering_node: record.order.as_ref().map(|o| o.node),
                    order_url: record.order.as_ref().and_then(|o| o.order_url.clone()),
                    failures: record.failures,
                    last_error: record.last_error.clone(),
                    retry_at_ms: (record.retry_at_ms > now).then_some(record.retry_at_ms),
                    name,
                }
            })
            .collect()
    });
    Ok(Json(views))
}

async fn alarms(State(api): State<Api>) -> ApiResult<Vec<Alarm>> {
    Ok(Json(api.node.store().with_state(|s| s.open_alarms().cloned().collect())))
}

async fn alarm_raise(caller: Caller, Json(req): Json<AlarmRaise>) -> ApiResult<AlarmRaised> {
    let event =
        Event::AlarmRaised { key: req.key, node: req.node, service: req.service, message: req.message };
    let proposed = propose(&caller, event).await?;
    // The alarm's id is the index of the event that raised it.
    Ok(Json(AlarmRaised { id: proposed.index, index: proposed.index }))
}

async fn alarm_clear(caller: Caller, Path(id): Path<u64>) -> ApiResult<Committed> {
    let event = Event::AlarmCleared { alarm_id: id, reason: "cleared by an admin".into() };
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn backup_list(State(api): State<Api>, Path(service): Path<String>) -> ApiResult<wire::BackupList> {
    let now_ms = api.node.now_ms();
    api.node
        .store()
        .with_state(|s| {
            let svc = s.services.get(&service)?;
            let ledger = s.data.get(&service)?;
            let placement = svc.placement.as_ref();
            let failover = placement.and_then(|p| p.failover);
            let data_age_ms = failover.and_then(|f| ledger.data_age_ms(f, now_ms));
            Some(wire::BackupList {
                service: service.clone(),
                epoch: ledger.epoch,
                master: placement.map(|p| p.master),
                failover,
                data_age_ms,
                snapshots: ledger
                    .newest_first()
                    .into_iter()
                    .map(|r| wire::SnapshotView {
                        snapshot: r.id.clone(),
                        parent: r.parent.clone(),
                        taken_at_ms: r.taken_at_ms,
                        taken_by: r.taken_by,
                        epoch: r.epoch,
                        kind: r.kind.name().to_string(),
                        consistency: r.consistency.name().to_string(),
                        bytes: r.bytes,
                        new_bytes: r.new_bytes,
                        holders: r.holders.keys().copied().collect(),
                        corrupt_on: r.corrupt_on.iter().copied().collect(),
                    })
                    .collect(),
                failures: ledger
                    .failures
                    .iter()
                    .map(|(node, f)| wire::BackupFailureView {
                        node: *node,
                        snapshot: f.snapshot.clone(),
                        reason: f.reason.clone(),
                        at_ms: f.at_ms,
                    })
                    .collect(),
                restored: ledger.restored.as_ref().filter(|r| r.epoch == ledger.epoch).map(|r| {
                    wire::RestoredView { node: r.node, snapshot: r.snapshot.clone(), at_ms: r.at_ms }
                }),
            })
        })
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("service {service} does not exist")))
}

fn backups_of(api: &Api) -> Result<&Arc<crate::backups::Backups>, ApiError> {
    api.backups.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            "this node keeps no backups (it runs without containers or with --no-backups)".into(),
        )
    })
}

/// Asks for `service`'s data to be rolled back in place to a snapshot (an id or the start of one;
/// the newest some node holds by default): proposes `RestoreRequested`.
async fn backup_rollback(
    caller: Caller,
    Path(service): Path<String>,
    Json(req): Json<wire::BackupRollback>,
) -> ApiResult<wire::RollbackAsked> {
    // A snapshot no node holds is refused by the state machine, saying so.
    let found = caller
        .api
        .node
        .store()
        .with_state(|s| s.data.get(&service)?.find(req.snapshot.as_deref()).map(|r| r.id.clone()));
    let Some(snapshot) = found else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            match &req.snapshot {
                Some(p) => format!(
                    "no single snapshot of {service} has an id starting with {p:?} (see coyote backup list {service})"
                ),
                None => format!("no node holds a snapshot of {service}"),
            },
        ));
    };
    let event = Event::RestoreRequested {
        service,
        snapshot: snapshot.clone(),
        reason: format!("asked by {}", caller.actor),
    };
    let proposed = propose(&caller, event).await?;
    Ok(Json(wire::RollbackAsked { index: proposed.index, snapshot }))
}

async fn backup_now(
    State(api): State<Api>,
    Path(service): Path<String>,
    body: Option<Json<wire::BackupNow>>,
) -> ApiResult<wire::TakenView> {
    let backups = backups_of(&api)?;
    let kind = match body.and_then(|Json(b)| b.kind).as_deref() {
        None | Some("manual") => coyote_state_machine::SnapshotKind::Manual,
        Some("dump") => coyote_state_machine::SnapshotKind::Dump,
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown snapshot kind {other:?} (manual or dump)"),
            ))
        }
    };
    let me = api.node.id();
    let master = api
        .node
        .store()
        .with_state(|s| s.services.get(&service).map(|svc| svc.placement.as_ref().map(|p| p.master)));
    match master {
        None => return Err(ApiError(StatusCode::NOT_FOUND, format!("service {service} does not exist"))),
        Some(Some(m)) if m != me => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("node {m} is the master of {service}: run this on that node"),
            ))
        }
        _ => {}
    }
    backups.snapshot(&service, kind).await.map(Json).map_err(|e| match e {
        crate::backups::BackupError::Refused(m) | crate::backups::BackupError::Rejected(m) => {
            ApiError(StatusCode::CONFLICT, m)
        }
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    })
}

#[derive(serde::Deserialize)]
struct ExportQuery {
    snapshot: Option<String>,
}

async fn backup_export(
    State(api): State<Api>,
    Path(service): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let backups = backups_of(&api)?.clone();
    let snapshot = backups.export_source(&service, q.snapshot.as_deref()).await.map_err(|e| match e {
        crate::backups::BackupError::Refused(m) => ApiError(StatusCode::NOT_FOUND, m),
        other => ApiError(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
    let store = backups.store().clone();
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter(tx.clone());
        if let Err(e) = coyote_data::export_tar(&store, &snapshot, &mut writer) {
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", "application/x-tar")], body).into_response())
}

/// Hands what a blocking writer writes to an async body, a buffer at a time.
struct ChannelWriter(tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn backups_view(State(api): State<Api>) -> ApiResult<wire::BackupsView> {
    let backups = backups_of(&api)?;
    Ok(Json(wire::BackupsView { pauses: backups.pause_stats() }))
}

fn backup_error(e: crate::backups::BackupError) -> ApiError {
    match e {
        crate::backups::BackupError::Refused(m) | crate::backups::BackupError::Rejected(m) => {
            ApiError(StatusCode::CONFLICT, m)
        }
        other => ApiError(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

async fn backup_verify(
    State(api): State<Api>,
    body: Option<Json<wire::BackupVerify>>,
) -> ApiResult<wire::VerifyView> {
    let backups = backups_of(&api)?;
    let service = body.and_then(|Json(b)| b.service);
    if let Some(name) = &service {
        if api.node.store().with_state(|s| !s.services.contains_key(name)) {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("service {name} does not exist")));
        }
    }
    backups.verify(service.as_deref()).await.map(Json).map_err(backup_error)
}

async fn backup_restore(
    State(api): State<Api>,
    Path(service): Path<String>,
    Json(req): Json<wire::BackupRestore>,
) -> ApiResult<wire::RestoredCopy> {
    let backups = backups_of(&api)?;
    let into = std::path::PathBuf::from(&req.into);
    if !into.is_absolute() {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("{:?} is not an absolute path", req.into)));
    }
    backups.restore_copy(&service, req.snapshot.as_deref(), into).await.map(Json).map_err(backup_error)
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut bytes = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

async fn activation_create(
    caller: Caller,
    Json(req): Json<wire::ActivationCreate>,
) -> ApiResult<wire::ActivationCreated> {
    use coyote_state_machine::accounts::{ACTIVATION_TTL_MAX_MS, ACTIVATION_TTL_MS};
    let ttl_ms = req.ttl_ms.unwrap_or(ACTIVATION_TTL_MS);
    if ttl_ms == 0 || ttl_ms > ACTIVATION_TTL_MAX_MS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "an activation URL lives between 1 ms and a day".into(),
        ));
    }
    let (activation_id, secret) = (random_hex(6), random_hex(32));
    let at_ms = caller.api.node.now_ms();
    let expires_at_ms = at_ms + ttl_ms;
    let event = Event::Account(AccountEvent::ActivationIssued {
        activation_id: activation_id.clone(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        expires_at_ms,
    });
    let proposed = propose_at(&caller, event, at_ms).await?;
    let code = format!("{activation_id}.{secret}");
    let url = caller.api.crm_url.as_ref().map(|base| format!("{base}/activate/{code}"));
    Ok(Json(wire::ActivationCreated { activation_id, code, url, expires_at_ms, index: proposed.index }))
}

async fn activation_use(caller: Caller, Json(req): Json<wire::ActivationUse>) -> ApiResult<Committed> {
    let Some((id, secret)) = wire::parse_activation(&req.code) else {
        return Err(ApiError(StatusCode::BAD_REQUEST, "an activation code is ID.SECRET".into()));
    };
    let event = Event::Account(AccountEvent::AdminActivated {
        activation_id: id.to_string(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        name: req.name,
        password_hash: req.password_hash,
    });
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn users(State(api): State<Api>) -> ApiResult<Vec<wire::UserView>> {
    Ok(Json(api.node.store().with_state(|s| {
        s.accounts
            .users
            .values()
            .map(|u| wire::UserView {
                name: u.name.clone(),
                role: u.role,
                created_at_ms: u.created_at_ms,
                password_changed_at_ms: u.password_changed_at_ms,
            })
            .collect()
    })))
}

async fn user_create(caller: Caller, Json(req): Json<wire::UserCreate>) -> ApiResult<Committed> {
    let event = Event::Account(AccountEvent::UserCreated {
        name: req.name,
        role: req.role,
        password_hash: req.password_hash,
    });
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn password_change(
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<wire::PasswordChange>,
) -> ApiResult<Committed> {
    let event = Event::Account(AccountEvent::PasswordChanged { name, password_hash: req.password_hash });
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn keys(State(api): State<Api>) -> ApiResult<Vec<wire::KeyView>> {
    Ok(Json(api.node.store().with_state(|s| {
        s.accounts
            .api_keys
            .values()
            .map(|k| wire::KeyView {
                key_id: k.id.clone(),
                owner: k.owner.clone(),
                label: k.label.clone(),
                scope: k.scope,
                created_at_ms: k.created_at_ms,
                last_used_at_ms: k.last_used_at_ms,
                revoked: k.revoked,
            })
            .collect()
    })))
}

async fn key_create(caller: Caller, Json(req): Json<wire::KeyCreate>) -> ApiResult<wire::KeyCreated> {
    let (key_id, secret) = (random_hex(6), random_hex(32));
    let event = Event::Account(AccountEvent::ApiKeyCreated {
        key_id: key_id.clone(),
        owner: req.owner,
        label: req.label,
        scope: req.scope,
        secret_sha256: sha256_hex(secret.as_bytes()),
    });
    let proposed = propose(&caller, event).await?;
    let key = format!("{}{key_id}_{secret}", wire::KEY_PREFIX);
    Ok(Json(wire::KeyCreated { key_id, key, index: proposed.index }))
}

async fn key_revoke(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::ApiKeyRevoked { key_id: id })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn key_used(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::ApiKeyUsed { key_id: id })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn settings(State(api): State<Api>) -> ApiResult<coyote_state_machine::accounts::CrmSettings> {
    Ok(Json(api.node.store().with_state(|s| s.accounts.settings.clone())))
}

async fn settings_change(
    caller: Caller,
    Json(settings): Json<coyote_state_machine::accounts::CrmSettings>,
) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::SettingsChanged { settings })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn invite_create(
    caller: Caller,
    Json(req): Json<wire::InviteCreate>,
) -> ApiResult<wire::InviteCreated> {
    let (invite_id, secret) = (random_hex(6), random_hex(32));
    let at_ms = caller.api.node.now_ms();
    let expires_at_ms = at_ms.saturating_add(req.ttl_ms);
    let event = Event::Account(AccountEvent::InviteIssued {
        invite_id: invite_id.clone(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        expires_at_ms,
    });
    let proposed = propose_at(&caller, event, at_ms).await?;
    let code = format!("{invite_id}.{secret}");
    Ok(Json(wire::InviteCreated { invite_id, code, expires_at_ms, index: proposed.index }))
}

async fn invite_revoke(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::InviteRevoked { invite_id: id })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn signup_create(caller: Caller, Json(req): Json<wire::SignupCreate>) -> ApiResult<Committed> {
    let invite = match &req.invite {
        None => None,
        Some(code) => {
            let Some((id, secret)) = wire::parse_activation(code) else {
                return Err(ApiError(StatusCode::BAD_REQUEST, "an invite code is ID.SECRET".into()));
            };
            Some(coyote_state_machine::accounts::InviteUse {
                invite_id: id.to_string(),
                secret_sha256: sha256_hex(secret.as_bytes()),
            })
        }
    };
    let event = Event::Account(AccountEvent::SignupRequested {
        name: req.name,
        password_hash: req.password_hash,
        invite,
    });
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

async fn signup_decide(
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<wire::SignupDecide>,
) -> ApiResult<Committed> {
    let event =
        Event::Account(AccountEvent::SignupDecided { name, approve: req.approve, reason: req.reason });
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

/// This node observes that it serves the member's service (its fence lets it serve it).
async fn signup_served(caller: Caller, Path(name): Path<String>) -> ApiResult<Committed> {
    if !caller.api.fence.serving_services().contains(&name) {
        return Err(ApiError(StatusCode::CONFLICT, format!("this node does not serve {name}")));
    }
    let node = caller.api.node.id();
    let proposed = propose(&caller, Event::Account(AccountEvent::SignupServed { name, node })).await?;
    Ok(Json(Committed { index: proposed.index }))
}
