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
use axum::routing::get;
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

/// The node's API document: the `/v1` routes, their requests and answers (OpenAPI 3.1).
#[derive(utoipa::OpenApi)]
#[openapi(info(
    title = "coyote",
    description = "A coyote node's API. Reads come from the node's replica of the log; writes propose events."
))]
struct ApiDoc;

/// The API's routes with their document, which both come from the same handlers, so that one
/// cannot name a route the other lacks.
fn routes() -> (Router<Api>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(status))
        .routes(routes!(events))
        .routes(routes!(tokens, token_create))
        .routes(routes!(token_revoke))
        .routes(routes!(services, service_create))
        .routes(routes!(service_show, service_update, service_remove))
        .routes(routes!(service_switch))
        .routes(routes!(serving))
        .routes(routes!(stats))
        .routes(routes!(web_stats))
        .routes(routes!(certs))
        .routes(routes!(plan))
        .routes(routes!(alarms, alarm_raise))
        .routes(routes!(alarm_clear))
        .routes(routes!(backups_view))
        .routes(routes!(backup_verify))
        .routes(routes!(backup_list))
        .routes(routes!(backup_restore))
        .routes(routes!(backup_rollback))
        .routes(routes!(backup_now))
        .routes(routes!(backup_export))
        .routes(routes!(activation_create))
        .routes(routes!(activation_use))
        .routes(routes!(users, user_create))
        .routes(routes!(password_change))
        .routes(routes!(keys, key_create))
        .routes(routes!(key_revoke))
        .routes(routes!(key_used))
        .routes(routes!(settings, settings_change))
        .routes(routes!(invite_create))
        .routes(routes!(invite_revoke))
        .routes(routes!(signup_create))
        .routes(routes!(signup_decide))
        .routes(routes!(signup_served))
        .routes(routes!(leave))
        .routes(routes!(node_remove))
        .split_for_parts()
}

/// The API's OpenAPI document, as JSON.
pub fn openapi_json() -> String {
    routes().1.to_json().expect("the API document serializes")
}

pub fn router(api: Api) -> Router {
    let (routes, doc) = routes();
    let doc = Arc::new(doc);
    routes
        .route("/metrics", get(metrics))
        .route(
            "/v1/openapi.json",
            // Serialized when asked for (rarely), not each time a node starts.
            get(move || async move {
                match doc.to_json() {
                    Ok(json) => ([("content-type", "application/json")], json).into_response(),
                    Err(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }),
        )
        .layer(axum::middleware::map_response(json_errors))
        .with_state(api)
}

/// Longest error text kept when an error is turned into JSON.
const ERROR_TEXT_MAX: usize = 4096;

/// Every error answer is an [`ErrorAnswer`]: the refusals axum's extractors and router make (a body
/// that is not JSON, a path or query that does not parse, no such route) come as text, and become
/// JSON here, so that a client reads one shape whatever went wrong.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, ERROR_TEXT_MAX).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => match status {
            StatusCode::NOT_FOUND => "no such route".to_string(),
            StatusCode::METHOD_NOT_ALLOWED => "this route does not take this method".to_string(),
            other => other.canonical_reason().unwrap_or("error").to_string(),
        },
    };
    let mut answer = (status, Json(ErrorAnswer { error: text })).into_response();
    if let Some(allow) = parts.headers.get(axum::http::header::ALLOW) {
        answer.headers_mut().insert(axum::http::header::ALLOW, allow.clone());
    }
    answer
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

#[utoipa::path(get, path = "/v1/status", tag = "cluster", summary = "This node, the cluster, the services and the fault tolerance", responses((status = 200, description = "Done", body = Status), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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
#[utoipa::path(post, path = "/v1/leave", tag = "nodes", summary = "One step of this server's leave", responses((status = 200, description = "Done", body = wire::LeaveAnswer), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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
#[utoipa::path(post, path = "/v1/nodes/{id}/remove", tag = "nodes", summary = "Takes a server that is gone out of the cluster", params(("id" = u64, Path, description = "The node's id")), request_body = wire::NodeRemove, responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// The first index to return (0: from the start).
    from: Option<u64>,
    /// Only the events of this kind.
    kind: Option<String>,
    /// Keep the connection and send each event as it commits, one JSON object per line.
    #[serde(default)]
    follow: bool,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", summary = "The event history: one page, or with follow=true every event as it commits (one JSON object per line)", params(EventsQuery), responses((status = 200, description = "One page (JSON), or with follow=true one event per line", content((EventsPage = "application/json"), (EventView = "application/x-ndjson"))), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", summary = "Issues a join token", request_body = TokenCreate, responses((status = 200, description = "Done", body = TokenCreated), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", summary = "The join tokens", responses((status = 200, description = "Done", body = Vec<TokenView>), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn tokens(State(api): State<Api>) -> ApiResult<Vec<TokenView>> {
    let now = api.node.now_ms();
    Ok(Json(api.node.store().with_state(|s| s.tokens.values().map(|t| TokenView::new(t, now)).collect())))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", summary = "Revokes a join token", params(("id" = String, Path, description = "The token's id")), responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn token_revoke(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::TokenRevoked { token_id: id }).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(post, path = "/v1/services", tag = "services", summary = "Creates a service; the log places it", request_body = ServiceSpec, responses((status = 200, description = "Done", body = ServiceCreated), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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
#[utoipa::path(post, path = "/v1/services/{name}/switch", tag = "services", summary = "Moves a service's authority to another node", params(("name" = String, Path, description = "The service's name")), request_body = SwitchRequest, responses((status = 200, description = "Done", body = SwitchAnswer), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(get, path = "/v1/stats", tag = "stats", summary = "Connections, cold starts and pauses of the services on this node", responses((status = 200, description = "Done", body = Vec<ServiceStats>), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn stats(State(api): State<Api>) -> ApiResult<Vec<ServiceStats>> {
    Ok(Json(match &api.activator {
        Some(a) => a.stats().await,
        None => Vec::new(),
    }))
}

#[utoipa::path(get, path = "/v1/stats/web", tag = "stats", summary = "The traffic of this node's proxy, per domain", responses((status = 200, description = "Done", body = wire::WebStats), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(get, path = "/v1/serving", tag = "services", summary = "The services this node's fence lets it serve now", responses((status = 200, description = "Done", body = Serving), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn serving(State(api): State<Api>) -> ApiResult<Serving> {
    Ok(Json(Serving { node_id: api.node.id(), serving: api.fence.serving_services() }))
}

#[utoipa::path(get, path = "/v1/services", tag = "services", summary = "The services", responses((status = 200, description = "Done", body = Vec<ServiceView>), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn services(State(api): State<Api>) -> ApiResult<Vec<ServiceView>> {
    Ok(Json(api.node.store().with_state(|s| s.services.values().map(ServiceView::from).collect())))
}

#[utoipa::path(get, path = "/v1/services/{name}", tag = "services", summary = "One service", params(("name" = String, Path, description = "The service's name")), responses((status = 200, description = "Done", body = ServiceView), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn service_show(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<ServiceView> {
    api.node
        .store()
        .with_state(|s| s.services.get(&name).map(ServiceView::from))
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("service {name} does not exist")))
}

#[utoipa::path(put, path = "/v1/services/{name}", tag = "services", summary = "Replaces a service's spec", params(("name" = String, Path, description = "The service's name")), request_body = ServiceSpec, responses((status = 200, description = "Done", body = ServiceUpdated), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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
#[utoipa::path(get, path = "/v1/plan", tag = "cluster", summary = "What this node's reconciler would do now", responses((status = 200, description = "Done", body = serde_json::Value), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(delete, path = "/v1/services/{name}", tag = "services", summary = "Removes a service", params(("name" = String, Path, description = "The service's name")), responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn service_remove(caller: Caller, Path(name): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::ServiceRemoved { name }).await?;
    Ok(Json(Committed { index: proposed.index }))
}

/// Every name a certificate may be ordered for, with what the log knows of it (no keys).
#[utoipa::path(get, path = "/v1/certs", tag = "certs", summary = "Every name a certificate may be ordered for, and its state", responses((status = 200, description = "Done", body = Vec<wire::CertView>), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(get, path = "/v1/alarms", tag = "alarms", summary = "The open alarms", responses((status = 200, description = "Done", body = Vec<Alarm>), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn alarms(State(api): State<Api>) -> ApiResult<Vec<Alarm>> {
    Ok(Json(api.node.store().with_state(|s| s.open_alarms().cloned().collect())))
}

#[utoipa::path(post, path = "/v1/alarms", tag = "alarms", summary = "Raises an alarm", request_body = AlarmRaise, responses((status = 200, description = "Done", body = AlarmRaised), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn alarm_raise(caller: Caller, Json(req): Json<AlarmRaise>) -> ApiResult<AlarmRaised> {
    let event =
        Event::AlarmRaised { key: req.key, node: req.node, service: req.service, message: req.message };
    let proposed = propose(&caller, event).await?;
    // The alarm's id is the index of the event that raised it.
    Ok(Json(AlarmRaised { id: proposed.index, index: proposed.index }))
}

#[utoipa::path(post, path = "/v1/alarms/{id}/clear", tag = "alarms", summary = "Clears an alarm", params(("id" = u64, Path, description = "The alarm's id")), responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn alarm_clear(caller: Caller, Path(id): Path<u64>) -> ApiResult<Committed> {
    let event = Event::AlarmCleared { alarm_id: id, reason: "cleared by an admin".into() };
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(get, path = "/v1/backups/{service}", tag = "backups", summary = "A service's snapshots and who holds them", params(("service" = String, Path, description = "The service's name")), responses((status = 200, description = "Done", body = wire::BackupList), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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
#[utoipa::path(post, path = "/v1/backups/{service}/rollback", tag = "backups", summary = "Rolls a service's data back to a snapshot", params(("service" = String, Path, description = "The service's name")), request_body = wire::BackupRollback, responses((status = 200, description = "Done", body = wire::RollbackAsked), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/backups/{service}/now", tag = "backups", summary = "Takes a snapshot now, on the service's master", params(("service" = String, Path, description = "The service's name")), request_body = Option<wire::BackupNow>, responses((status = 200, description = "Done", body = wire::TakenView), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ExportQuery {
    /// A snapshot id, or the start of one (the newest by default).
    snapshot: Option<String>,
}

#[utoipa::path(get, path = "/v1/backups/{service}/export", tag = "backups", summary = "A snapshot as a tar archive", params(("service" = String, Path, description = "The service's name"), ExportQuery), responses((status = 200, description = "A tar archive", content_type = "application/x-tar"), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(get, path = "/v1/backups", tag = "backups", summary = "This node's snapshot pauses", responses((status = 200, description = "Done", body = wire::BackupsView), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/backups/verify", tag = "backups", summary = "Re-hashes the chunks this node holds and repairs what it can", request_body = Option<wire::BackupVerify>, responses((status = 200, description = "Done", body = wire::VerifyView), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/backups/{service}/restore", tag = "backups", summary = "Restores a snapshot into a directory of this node", params(("service" = String, Path, description = "The service's name")), request_body = wire::BackupRestore, responses((status = 200, description = "Done", body = wire::RestoredCopy), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/activations", tag = "accounts", summary = "Issues a one-time activation URL", request_body = wire::ActivationCreate, responses((status = 200, description = "Done", body = wire::ActivationCreated), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/activations/use", tag = "accounts", summary = "Uses an activation code: creates the first admin", request_body = wire::ActivationUse, responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(get, path = "/v1/users", tag = "accounts", summary = "The users", responses((status = 200, description = "Done", body = Vec<wire::UserView>), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/users", tag = "accounts", summary = "Creates a user", request_body = wire::UserCreate, responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn user_create(caller: Caller, Json(req): Json<wire::UserCreate>) -> ApiResult<Committed> {
    let event = Event::Account(AccountEvent::UserCreated {
        name: req.name,
        role: req.role,
        password_hash: req.password_hash,
    });
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(post, path = "/v1/users/{name}/password", tag = "accounts", summary = "Changes a user's password", params(("name" = String, Path, description = "The user's name")), request_body = wire::PasswordChange, responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn password_change(
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<wire::PasswordChange>,
) -> ApiResult<Committed> {
    let event = Event::Account(AccountEvent::PasswordChanged { name, password_hash: req.password_hash });
    let proposed = propose(&caller, event).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(get, path = "/v1/keys", tag = "accounts", summary = "The API keys (never their secrets)", responses((status = 200, description = "Done", body = Vec<wire::KeyView>), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/keys", tag = "accounts", summary = "Creates an API key; its secret is shown once", request_body = wire::KeyCreate, responses((status = 200, description = "Done", body = wire::KeyCreated), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "accounts", summary = "Revokes an API key", params(("id" = String, Path, description = "The key's id")), responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn key_revoke(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::ApiKeyRevoked { key_id: id })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(post, path = "/v1/keys/{id}/used", tag = "accounts", summary = "Records an API key's use", params(("id" = String, Path, description = "The key's id")), responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn key_used(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::ApiKeyUsed { key_id: id })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(get, path = "/v1/settings", tag = "settings", summary = "The CRM's settings", responses((status = 200, description = "Done", body = coyote_state_machine::accounts::CrmSettings), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn settings(State(api): State<Api>) -> ApiResult<coyote_state_machine::accounts::CrmSettings> {
    Ok(Json(api.node.store().with_state(|s| s.accounts.settings.clone())))
}

#[utoipa::path(put, path = "/v1/settings", tag = "settings", summary = "Changes the CRM's settings", request_body = coyote_state_machine::accounts::CrmSettings, responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn settings_change(
    caller: Caller,
    Json(settings): Json<coyote_state_machine::accounts::CrmSettings>,
) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::SettingsChanged { settings })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(post, path = "/v1/invites", tag = "signups", summary = "Issues an invite link", request_body = wire::InviteCreate, responses((status = 200, description = "Done", body = wire::InviteCreated), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(delete, path = "/v1/invites/{id}", tag = "signups", summary = "Revokes an invite link", params(("id" = String, Path, description = "The invite's id")), responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn invite_revoke(caller: Caller, Path(id): Path<String>) -> ApiResult<Committed> {
    let proposed = propose(&caller, Event::Account(AccountEvent::InviteRevoked { invite_id: id })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[utoipa::path(post, path = "/v1/signups", tag = "signups", summary = "Records a signup", request_body = wire::SignupCreate, responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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

#[utoipa::path(post, path = "/v1/signups/{name}/decide", tag = "signups", summary = "Approves or refuses a signup", params(("name" = String, Path, description = "The member's name")), request_body = wire::SignupDecide, responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
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
#[utoipa::path(post, path = "/v1/signups/{name}/served", tag = "signups", summary = "Records that a member's service is served", params(("name" = String, Path, description = "The member's name")), responses((status = 200, description = "Done", body = Committed), (status = "4XX", description = "Refused: the answer says why", body = ErrorAnswer), (status = "5XX", description = "The node or the cluster cannot answer now", body = ErrorAnswer)))]
async fn signup_served(caller: Caller, Path(name): Path<String>) -> ApiResult<Committed> {
    if !caller.api.fence.serving_services().contains(&name) {
        return Err(ApiError(StatusCode::CONFLICT, format!("this node does not serve {name}")));
    }
    let node = caller.api.node.id();
    let proposed = propose(&caller, Event::Account(AccountEvent::SignupServed { name, node })).await?;
    Ok(Json(Committed { index: proposed.index }))
}

#[cfg(test)]
mod document {
    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v.as_str()) {
                        ("$ref", Some(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_operation_is_described_and_every_schema_it_names_exists() {
        let doc: serde_json::Value = serde_json::from_str(&super::openapi_json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut operations = 0;
        for (path, item) in paths {
            assert!(path.starts_with("/v1/"), "{path}");
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                assert!(
                    op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{method} {path} has no summary"
                );
                assert!(op["tags"][0].is_string(), "{method} {path} has no tag");
                assert!(op["responses"]["200"].is_object(), "{method} {path} has no answer");
                assert!(op["responses"]["4XX"].is_object(), "{method} {path} names no errors");
                for name in path.split('{').skip(1).map(|p| &p[..p.find('}').unwrap()]) {
                    let params = op["parameters"].as_array().unwrap();
                    assert!(
                        params.iter().any(|p| p["name"] == name && p["in"] == "path"),
                        "{method} {path} does not describe {name}"
                    );
                }
            }
        }
        assert!(operations >= 40, "{operations} operations");
        let mut names = Vec::new();
        refs(&doc, &mut names);
        assert!(names.iter().any(|r| r.ends_with("/ServiceSpec")));
        for r in names {
            let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r}"));
            assert!(doc["components"]["schemas"][name].is_object(), "{r} names no schema");
        }
    }
}
