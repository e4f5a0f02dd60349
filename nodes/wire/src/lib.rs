//! What the node's local API and its clients exchange: one type per request and per answer, used by
//! both sides (the node's API in `coyote-nodes`, the `coyote` CLI and the CRM). A renamed field
//! fails to compile on both sides; a field missing from an answer is an error for the client, never
//! a zero. Times are milliseconds since the Unix epoch, and every such field ends in `_ms`.

use coyote_log::store::EventRecord;
use coyote_state_machine::{Event, Outcome, Placement, Service, ServiceSpec, Token, TokenStatus};
use serde::{Deserialize, Serialize};

/// The request header that names who acts (recorded in the event's envelope).
pub const ACTOR_HEADER: &str = "coyote-actor";

/// The proxy's traffic on one node (`GET /v1/stats/web`).
#[derive(Serialize, Deserialize, Clone, Debug, utoipa::ToSchema)]
pub struct WebStats {
    pub open_connections: u64,
    pub connections: u64,
    pub tls_handshakes: u64,
    pub tls_handshake_failures: u64,
    pub domains: Vec<DomainStats>,
}

/// One domain's requests through this node's proxy.
#[derive(Serialize, Deserialize, Clone, Debug, utoipa::ToSchema)]
pub struct DomainStats {
    pub domain: String,
    /// Requests answered with 1xx, 2xx, 3xx, 4xx, 5xx.
    pub requests_by_class: [u64; 5],
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Upper bounds of the latency buckets that hold the median and the 99th percentile (`None`:
    /// no request yet, or slower than the last bound).
    pub latency_p50_ms_at_most: Option<u64>,
    pub latency_p99_ms_at_most: Option<u64>,
}

pub use coyote_log::ClusterStatus;
pub use coyote_state_machine::Alarm;

/// Every error answer: the HTTP status says what kind, `error` says what in words.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorAnswer {
    pub error: String,
}

/// A name's certificate (`GET /v1/certs`, `coyote cert list`).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CertView {
    pub name: String,
    /// `valid`, `renewing`, `ordering`, `waiting` (to retry after a failure), `expired`, `pending`,
    /// or `cluster CA` (no ACME on this node: certificates come from the cluster's own CA).
    pub state: String,
    pub issuer: Option<String>,
    pub not_before_ms: Option<u64>,
    pub not_after_ms: Option<u64>,
    pub renew_at_ms: Option<u64>,
    /// The node working on its order, while one is under way.
    pub ordering_node: Option<u64>,
    pub order_url: Option<String>,
    /// Failed orders in a row, and the last one's reason.
    pub failures: u32,
    pub last_error: Option<String>,
    /// No new order before this moment.
    pub retry_at_ms: Option<u64>,
}

/// An event as `coyote events tail` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventView {
    pub index: u64,
    pub term: u64,
    pub at_ms: u64,
    pub actor: String,
    pub kind: String,
    pub summary: String,
    pub outcome: EventOutcome,
    /// Why it was rejected, for a rejected one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[schema(value_type = Object)]
    pub event: Event,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventOutcome {
    Applied,
    Rejected,
}

impl From<&EventRecord> for EventView {
    fn from(r: &EventRecord) -> Self {
        let env = &r.envelope;
        let (outcome, reason) = match &r.outcome {
            Outcome::Applied => (EventOutcome::Applied, None),
            Outcome::Rejected { reason } => (EventOutcome::Rejected, Some(reason.clone())),
        };
        EventView {
            index: env.index,
            term: env.term,
            at_ms: env.at_ms,
            actor: env.actor.clone(),
            kind: env.event.kind().to_string(),
            summary: env.event.summary(),
            outcome,
            reason,
            event: env.event.redacted(),
        }
    }
}

/// One page of the event history; `next` is where the following page starts, absent after the last.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventsPage {
    pub events: Vec<EventView>,
    pub next: Option<u64>,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCreate {
    pub ttl_ms: u64,
    pub uses: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCreated {
    /// The whole token, to give to the joining server (shown once).
    pub token: String,
    pub id: String,
    pub expires_at_ms: u64,
    pub uses: u32,
    pub index: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    pub status: TokenState,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub used_by: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    Valid,
    Expired,
    Used,
    Revoked,
}

impl TokenView {
    pub fn new(t: &Token, now_ms: u64) -> Self {
        let status = match t.status(now_ms) {
            TokenStatus::Valid => TokenState::Valid,
            TokenStatus::Expired => TokenState::Expired,
            TokenStatus::UsedUp => TokenState::Used,
            TokenStatus::Revoked => TokenState::Revoked,
        };
        TokenView {
            id: t.id.clone(),
            status,
            issued_at_ms: t.issued_at_ms,
            expires_at_ms: t.expires_at_ms,
            uses_total: t.uses_total,
            uses_left: t.uses_left,
            used_by: t.used_by.clone(),
        }
    }
}

impl std::fmt::Display for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenState::Valid => "valid",
            TokenState::Expired => "expired",
            TokenState::Used => "used",
            TokenState::Revoked => "revoked",
        })
    }
}

/// A service as `coyote service show` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub spec: ServiceSpec,
    pub spec_hash: String,
    pub placement: Option<Placement>,
    pub created_at_ms: u64,
    /// The current master may serve from this moment.
    pub serve_from_ms: u64,
}

impl From<&Service> for ServiceView {
    fn from(s: &Service) -> Self {
        ServiceView {
            name: s.spec.name.clone(),
            spec: s.spec.clone(),
            spec_hash: s.spec.hash(),
            placement: s.placement.clone(),
            created_at_ms: s.created_at_ms,
            serve_from_ms: s.serve_from_ms,
        }
    }
}

/// `POST /v1/services`: the spec. The answer: where the log placed it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceCreated {
    pub name: String,
    pub index: u64,
    /// As this node has applied it (`None` only if it has not applied the event yet).
    pub placement: Option<Placement>,
}

/// `PUT /v1/services/NAME`: the spec. The answer:
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceUpdated {
    pub name: String,
    pub index: u64,
    pub spec_hash: String,
}

/// `POST /v1/services/NAME/switch`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SwitchRequest {
    pub to: u64,
    /// Switch at once, without the master's dump and stop (for a master that is gone for good).
    #[serde(default)]
    pub now: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SwitchAnswer {
    pub name: String,
    pub to: u64,
    pub index: u64,
    #[serde(flatten)]
    pub how: SwitchHow,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "switch", rename_all = "snake_case")]
pub enum SwitchHow {
    /// A handover was asked for: the master (`from`) dumps and stops, then switches; the target takes
    /// over by itself after `wait_ms` if it has not.
    Handover { from: Option<u64>, wait_ms: u64 },
    /// The switch itself: the new master serves from `serve_from_ms`.
    Now { serve_from_ms: u64 },
}

/// `GET /v1/serving`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Serving {
    pub node_id: u64,
    pub serving: Vec<String>,
}

/// `POST /v1/alarms`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlarmRaise {
    pub key: String,
    pub message: String,
    pub node: Option<u64>,
    pub service: Option<String>,
}

/// An alarm raised: its id is the index of the event that raised it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlarmRaised {
    pub id: u64,
    pub index: u64,
}

/// What was done by one event, with its index: a token revoked, a service removed, an alarm cleared.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Committed {
    pub index: u64,
}

/// `coyote status`: the cluster as this node sees it, and each service's data age.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Status {
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub cluster: ClusterStatus,
    pub services: Vec<ServiceData>,
    pub tolerance: Tolerance,
}

/// How many servers the cluster can lose now and still make changes: of its voting members, those
/// this node reaches right now, less the majority it needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Tolerance {
    pub voters: usize,
    pub reachable: usize,
    pub can_lose: usize,
}

impl Tolerance {
    pub fn of(voters: usize, reachable: usize) -> Self {
        Tolerance { voters, reachable, can_lose: reachable.saturating_sub(voters / 2 + 1) }
    }
}

/// `POST /v1/leave`: where this server's leave stands. Asked again until `left_at` is set.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaveAnswer {
    /// The services this server is still master of, each with the server it is handed over to.
    pub handing_over: Vec<HandingOver>,
    /// The event that recorded the leave, once nothing was left to hand over.
    pub left_at: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct HandingOver {
    pub service: String,
    pub to: u64,
}

/// `POST /v1/nodes/{id}/remove`: take a server that is gone out of the cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRemove {
    /// Remove it even though a majority does not report it unreachable.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// How old the copy of a service's data is that its failover would restore.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceData {
    pub service: String,
    pub master: Option<u64>,
    pub failover: Option<u64>,
    /// Time since the newest snapshot the failover holds was taken (`None`: it holds none).
    pub data_age_ms: Option<u64>,
    /// Snapshots recorded.
    pub snapshots: u64,
}

/// `coyote backup verify [SERVICE]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupVerify {
    #[serde(default)]
    pub service: Option<String>,
}

/// `coyote backup restore SERVICE [--snapshot ID]` (in place).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupRollback {
    /// An id or the start of one [default: the newest snapshot some node holds].
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// A rollback asked for: the index of its event (the service's new epoch) and the snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackAsked {
    pub index: u64,
    pub snapshot: String,
}

/// `coyote backup restore SERVICE --into DIR [--snapshot ID]`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupRestore {
    #[serde(default)]
    pub snapshot: Option<String>,
    /// A directory on this node's machine that does not exist yet.
    pub into: String,
}

/// This node's backups: how long snapshots paused running containers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupsView {
    pub pauses: PauseStats,
}

/// `coyote backup list SERVICE`: what the log knows about a service's data.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupList {
    pub service: String,
    /// The index of the event that made the current master the master.
    pub epoch: u64,
    pub master: Option<u64>,
    pub failover: Option<u64>,
    /// Time since the newest snapshot the failover holds was taken (`None`: it holds none).
    pub data_age_ms: Option<u64>,
    /// Newest first.
    pub snapshots: Vec<SnapshotView>,
    pub failures: Vec<BackupFailureView>,
    /// The current master's restore at the current epoch, once done.
    pub restored: Option<RestoredView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotView {
    pub snapshot: String,
    pub parent: Option<String>,
    pub taken_at_ms: u64,
    pub taken_by: u64,
    pub epoch: u64,
    pub kind: String,
    pub consistency: String,
    pub bytes: u64,
    pub new_bytes: u64,
    pub holders: Vec<u64>,
    pub corrupt_on: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupFailureView {
    pub node: u64,
    pub snapshot: Option<String>,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoredView {
    pub node: u64,
    pub snapshot: Option<String>,
    pub at_ms: u64,
}

/// `coyote backup now SERVICE`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupNow {
    /// Why: shown in the log as the snapshot's kind (`manual` when absent).
    #[serde(default)]
    pub kind: Option<String>,
}

/// Traffic of one service, as shown by `coyote stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceStats {
    pub service: String,
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub cold_starts: u64,
    pub cold_start_ms_p50: Option<u64>,
    pub cold_start_ms_p99: Option<u64>,
    pub running_ms: u64,
    pub running: bool,
    /// Connections that went through the activator's userspace splice (all of them in userspace
    /// mode; in kernel mode, those that arrived while the container was stopped or starting).
    pub spliced_connections: u64,
    /// The kernel forwards the service's new connections to its container right now.
    pub kernel_forwarding: bool,
    /// Stops after the idle time, and under memory pressure.
    pub idle_stops: u64,
    pub memory_stops: u64,
    /// Dump commands that failed (each kept the container running).
    pub dumps_failed: u64,
}

/// Pause durations of this node's snapshots, for `coyote stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PauseStats {
    pub count: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

/// `POST /v1/activations`: a new one-time URL that creates an admin.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActivationCreate {
    /// Its lifetime (default: an hour, at most a day).
    pub ttl_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActivationCreated {
    pub activation_id: String,
    /// `ID.SECRET`, the last part of the URL; shown once, the log keeps only the secret's SHA-256.
    pub code: String,
    /// The whole URL, when this node serves the CRM.
    pub url: Option<String>,
    pub expires_at_ms: u64,
    pub index: u64,
}

/// `POST /v1/activations/use`: the first visit of an activation URL creates its admin.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActivationUse {
    /// `ID.SECRET`, as in the URL.
    pub code: String,
    pub name: String,
    pub password_hash: String,
}

/// `POST /v1/users`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserCreate {
    pub name: String,
    pub role: coyote_state_machine::UserRole,
    pub password_hash: String,
}

/// `POST /v1/users/{name}/password`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PasswordChange {
    pub password_hash: String,
}

/// A user as `GET /v1/users` shows it (never the password hash).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub name: String,
    pub role: coyote_state_machine::UserRole,
    pub created_at_ms: u64,
    pub password_changed_at_ms: u64,
}

/// `POST /v1/keys`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyCreate {
    pub owner: String,
    pub label: String,
    pub scope: coyote_state_machine::KeyScope,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyCreated {
    pub key_id: String,
    /// `coyote_ID_SECRET`: shown once, the log keeps only the secret's SHA-256.
    pub key: String,
    pub index: u64,
}

/// An API key as `GET /v1/keys` shows it (never its secret).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyView {
    pub key_id: String,
    pub owner: String,
    pub label: String,
    pub scope: coyote_state_machine::KeyScope,
    pub created_at_ms: u64,
    pub last_used_at_ms: Option<u64>,
    pub revoked: bool,
}

/// The prefix of every API key.
pub const KEY_PREFIX: &str = "coyote_";

/// Splits an API key (`coyote_ID_SECRET`) into its id and secret.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Splits an activation code (`ID.SECRET`) into its id and secret.
pub fn parse_activation(code: &str) -> Option<(&str, &str)> {
    let (id, secret) = code.split_once('.')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// `POST /v1/invites`: a new invite link for the signup page.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InviteCreate {
    pub ttl_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InviteCreated {
    pub invite_id: String,
    /// `ID.SECRET`, for the link `/signup?invite=CODE`; shown once.
    pub code: String,
    pub expires_at_ms: u64,
    pub index: u64,
}

/// `POST /v1/signups`: what the signup page sends.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignupCreate {
    pub name: String,
    pub password_hash: String,
    /// `ID.SECRET` of an invite link.
    pub invite: Option<String>,
}

/// `POST /v1/signups/{name}/decide`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignupDecide {
    pub approve: bool,
    pub reason: String,
}
