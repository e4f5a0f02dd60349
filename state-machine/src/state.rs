//! The cluster state, how each event changes it, and the views derived from it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::accounts::{AccountEvent, Accounts};
use crate::certs::{self, AcmeAccount, CertRecord, IssuedCert, OrderClaim};
use crate::data::{
    valid_snapshot_id, BackupFailure, DataLedger, Restored, SnapshotRecord, RETENTION, SNAPSHOTS_MAX,
};
use crate::event::{short_id, Envelope, Event, NodeInfo, Placement, Proposal, Subject, SwitchCause};
use crate::spec::ServiceSpec;
use crate::{Error, LogIndex, NodeId, Rejection};

/// Backups named by the automatic placement of a new service (more can be set by hand).
pub const PLACEMENT_BACKUPS_MAX: usize = 3;
/// Bounds that keep the state small no matter what is proposed.
pub const TOKENS_MAX: usize = 1024;
pub const SERVICES_MAX: usize = 4096;
pub const ALARMS_OPEN_MAX: usize = 4096;
pub const TOKEN_USES_MAX: u32 = 1000;
/// A master that has not confirmed its place in the quorum for this long stops serving.
pub const LEASE_MS: u64 = 600;
/// Allowance for clocks that drift apart between servers, added to the lease before a new master serves.
pub const DRIFT_MARGIN_MS: u64 = 150;
/// How long the failover must have seen a service unreachable before it may take over.
pub const FAILOVER_AFTER_MS: u64 = 250;
/// How long the target of a handover waits for the master to hand over (dump, stop, switch) before
/// it proposes the switch itself. It proposes at once when a majority reports the master unreachable.
pub const HANDOVER_WAIT_MS: u64 = 30_000;
/// The key of the alarm open while a cluster of two or more servers can lose none of them.
pub const TOLERANCE_ALARM_KEY: &str = "fault-tolerance";
/// Tokens are forgotten this long after they expire (their use stays in the event history).
pub const TOKEN_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterInfo {
    pub id: String,
    pub ca_pin: String,
    pub created_at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub addr: String,
    pub joined_at_ms: u64,
    pub joined_index: LogIndex,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret_sha256: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub revoked: bool,
    pub used_by: Vec<NodeId>,
}

/// Why a token cannot be used now, or `None` if it can.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStatus {
    Valid,
    Expired,
    UsedUp,
    Revoked,
}

impl Token {
    pub fn status(&self, now_ms: u64) -> TokenStatus {
        if self.revoked {
            TokenStatus::Revoked
        } else if self.uses_left == 0 {
            TokenStatus::UsedUp
        } else if now_ms >= self.expires_at_ms {
            TokenStatus::Expired
        } else {
            TokenStatus::Valid
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub spec: ServiceSpec,
    pub placement: Option<Placement>,
    pub created_at_ms: u64,
    /// The current master may serve from this moment (set by an authority switch).
    pub serve_from_ms: u64,
}

/// A graceful handover under way: asked for by `HandoverRequested`, ended by the switch (or by the
/// service, the target's role or the master changing otherwise).
///
/// The master (`from`) runs the spec's dump command in its running container, stops it, and then
/// proposes `AuthoritySwitched { cause: Instruction }` to `to`; the new master serves a lease plus
/// the drift margin after that, as after any switch. If the master does not do so within
/// [`HANDOVER_WAIT_MS`], or a majority reports it unreachable, the target proposes the switch itself
/// (the old master is then fenced by its lease, as in a failover).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    pub from: NodeId,
    pub to: NodeId,
    pub requested_at_ms: u64,
    pub reason: String,
}

/// The latest report of one observer about one subject.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub reachable: bool,
    pub since_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Alarm {
    pub id: u64,
    pub key: String,
    pub node: Option<NodeId>,
    pub service: Option<String>,
    pub message: String,
    pub raised_at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Master,
    Failover,
    Backup,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Failover => "failover",
            Role::Backup => "backup",
        }
    }
}

/// What a node should be doing with a service's container.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ContainerGoal {
    /// Master of an always-on service.
    Running,
    /// Master of an on-demand service: stopped until traffic arrives.
    OnDemand,
    /// Failover: created and stopped, ready to start.
    Standby,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DesiredContainer {
    pub service: String,
    pub spec_hash: String,
    pub goal: ContainerGoal,
}

/// The result of applying one envelope. Rejections are deterministic: every replica records the same.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Rejected { reason: String },
}

impl Outcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, Outcome::Applied)
    }
}

/// The whole replicated state of a cluster. Ordered maps only, so that encoding is canonical.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub cluster: Option<ClusterInfo>,
    pub members: BTreeMap<NodeId, Member>,
    /// Ids of nodes that left: never given out again.
    pub departed: BTreeSet<NodeId>,
    pub tokens: BTreeMap<String, Token>,
    pub services: BTreeMap<String, Service>,
    pub alarms: BTreeMap<u64, Alarm>,
    /// Latest reachability reports, by (observer, subject). No report means reachable.
    pub reachability: BTreeMap<(NodeId, Subject), Observation>,
    pub last_applied: LogIndex,
    pub applied_count: u64,
    pub rejected_count: u64,
    /// Graceful handovers under way, by service.
    pub handovers: BTreeMap<String, Handover>,
    /// What the log knows about each service's data: its epoch, snapshots and their holders.
    pub data: BTreeMap<String, DataLedger>,
    /// The cluster's ACME account, once one was created.
    pub acme: Option<AcmeAccount>,
    /// Certificates and their orders, by name (lowercase).
    pub certs: BTreeMap<String, CertRecord>,
    /// Rollbacks asked for and not done yet: service → the snapshot its master restores in place.
    pub rollbacks: BTreeMap<String, String>,
    /// Users, API keys and activation URLs. Snapshots (format 5 on) encode them beside the state, so
    /// that the state's own encoding stays that of format 4.
    #[serde(skip)]
    pub accounts: Accounts,
}

/// [`State`] as snapshots before certificates held it (snapshot format 3), to read them.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct StateV3 {
    pub cluster: Option<ClusterInfo>,
    pub members: BTreeMap<NodeId, Member>,
    pub departed: BTreeSet<NodeId>,
    pub tokens: BTreeMap<String, Token>,
    pub services: BTreeMap<String, Service>,
    pub alarms: BTreeMap<u64, Alarm>,
    pub reachability: BTreeMap<(NodeId, Subject), Observation>,
    pub last_applied: LogIndex,
    pub applied_count: u64,
    pub rejected_count: u64,
    pub handovers: BTreeMap<String, Handover>,
    pub data: BTreeMap<String, DataLedger>,
}

impl From<StateV3> for State {
    fn from(v: StateV3) -> Self {
        State {
            cluster: v.cluster,
            members: v.members,
            departed: v.departed,
            tokens: v.tokens,
            services: v.services,
            alarms: v.alarms,
            reachability: v.reachability,
            last_applied: v.last_applied,
            applied_count: v.applied_count,
            rejected_count: v.rejected_count,
            handovers: v.handovers,
            data: v.data,
            acme: None,
            certs: BTreeMap::new(),
            rollbacks: BTreeMap::new(),
            accounts: Accounts::default(),
        }
    }
}

/// [`State`] as snapshots before the data ledger held it (snapshot format 2), to read them.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct StateV2 {
    pub cluster: Option<ClusterInfo>,
    pub members: BTreeMap<NodeId, Member>,
    pub departed: BTreeSet<NodeId>,
    pub tokens: BTreeMap<String, Token>,
    pub services: BTreeMap<String, Service>,
    pub alarms: BTreeMap<u64, Alarm>,
    pub reachability: BTreeMap<(NodeId, Subject), Observation>,
    pub last_applied: LogIndex,
    pub applied_count: u64,
    pub rejected_count: u64,
    pub handovers: BTreeMap<String, Handover>,
}

impl From<StateV2> for State {
    /// Services get an empty ledger whose epoch is the last applied event: any snapshot a master
    /// proposes afterwards reads the same epoch from this state, and none from before is known.
    fn from(v: StateV2) -> Self {
        let data = v.services.keys().map(|name| (name.clone(), DataLedger::new(v.last_applied))).collect();
        StateV3 {
            cluster: v.cluster,
            members: v.members,
            departed: v.departed,
            tokens: v.tokens,
            services: v.services,
            alarms: v.alarms,
            reachability: v.reachability,
            last_applied: v.last_applied,
            applied_count: v.applied_count,
            rejected_count: v.rejected_count,
            handovers: v.handovers,
            data,
        }
        .into()
    }
}

/// [`State`] as snapshots before graceful handovers held it (snapshot format 1), to read them.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct StateV1 {
    pub cluster: Option<ClusterInfo>,
    pub members: BTreeMap<NodeId, Member>,
    pub departed: BTreeSet<NodeId>,
    pub tokens: BTreeMap<String, Token>,
    pub services: BTreeMap<String, Service>,
    pub alarms: BTreeMap<u64, Alarm>,
    pub reachability: BTreeMap<(NodeId, Subject), Observation>,
    pub last_applied: LogIndex,
    pub applied_count: u64,
    pub rejected_count: u64,
}

impl From<StateV1> for State {
    fn from(v: StateV1) -> Self {
        StateV2 {
            cluster: v.cluster,
            members: v.members,
            departed: v.departed,
            tokens: v.tokens,
            services: v.services,
            alarms: v.alarms,
            reachability: v.reachability,
            last_applied: v.last_applied,
            applied_count: v.applied_count,
            rejected_count: v.rejected_count,
            handovers: BTreeMap::new(),
        }
        .into()
    }
}

/// The key of the alarm about a name's certificate.
pub fn cert_alarm_key(name: &str) -> String {
    format!("cert/{name}")
}

/// Whether `spec` has the domain `name` (lowercase, no trailing dot).
fn serves_name(spec: &ServiceSpec, name: &str) -> bool {
    spec.domains.iter().any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(name))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl State {
    /// Applies one committed envelope. A command that no longer holds is recorded as rejected; an `Err`
    /// means the state was already broken (a bug), and the caller must stop rather than diverge.
    pub fn apply(&mut self, env: &Envelope) -> Result<Outcome, Error> {
        if env.index <= self.last_applied {
            return Err(Error::Invariant(format!(
                "envelope {} applied after {}: the log went backwards",
                env.index, self.last_applied
            )));
        }
        self.last_applied = env.index;
        let outcome = match self.check(&env.event, env.at_ms) {
            Err(rejection) => {
                self.rejected_count += 1;
                Outcome::Rejected { reason: rejection.reason }
            }
            Ok(()) => {
                self.mutate(env);
                self.applied_count += 1;
                Outcome::Applied
            }
        };
        self.check_invariants()?;
        Ok(outcome)
    }

    /// Validates a proposal against the current state, before it is proposed.
    pub fn validate(&self, proposal: &Proposal) -> Result<(), Rejection> {
        self.check(&proposal.event, proposal.at_ms)
    }

    fn check(&self, event: &Event, at_ms: u64) -> Result<(), Rejection> {
        let reject = |m: String| Err(Rejection::new(m));
        if self.cluster.is_none() && !matches!(event, Event::ClusterCreated { .. }) {
            return reject("the cluster has not been created yet".into());
        }
        match event {
            Event::ClusterCreated { cluster_id, node, .. } => {
                if self.cluster.is_some() {
                    return reject("the cluster already exists".into());
                }
                if cluster_id.is_empty() || node.id == 0 {
                    return reject("cluster id and node id must be set".into());
                }
            }
            Event::NodeJoined { node, token_id, secret_sha256 } => {
                if node.id == 0 || self.members.contains_key(&node.id) || self.departed.contains(&node.id) {
                    return reject(format!("node id {} is already taken", node.id));
                }
                if self.members.values().any(|m| m.addr == node.addr) {
                    return reject(format!("address {} is already used by a member", node.addr));
                }
                let Some(token) = self.tokens.get(token_id) else {
                    return reject(format!("token {token_id} does not exist"));
                };
                if token.secret_sha256 != *secret_sha256 {
                    return reject(format!("wrong secret for token {token_id}"));
                }
                match token.status(at_ms) {
                    TokenStatus::Valid => {}
                    TokenStatus::Expired => return reject(format!("token {token_id} has expired")),
                    TokenStatus::UsedUp => return reject(format!("token {token_id} has already been used")),
                    TokenStatus::Revoked => return reject(format!("token {token_id} has been revoked")),
                }
            }
            Event::NodeLeft { node_id, .. } => {
                if !self.members.contains_key(node_id) {
                    return reject(format!("node {node_id} is not a member"));
                }
                if self.members.len() == 1 {
                    return reject("the last member cannot leave".into());
                }
                if let Some(name) = self.services_where(*node_id, Role::Master).next() {
                    return reject(format!("node {node_id} is master of {name}: switch it away first"));
                }
            }
            Event::NodeRemoved { node_id, forced, .. } => {
                if !self.members.contains_key(node_id) {
                    return reject(format!("node {node_id} is not a member"));
                }
                if self.members.len() == 1 {
                    return reject("the last member cannot be removed".into());
                }
                if !forced {
                    let (votes, needed) = self.master_down_votes(*node_id);
                    if votes < needed {
                        return reject(format!(
                            "node {node_id} is not gone: only {votes} of the {needed} members needed report it unreachable. On that server, run `coyote node leave`; to remove it anyway, use --force"
                        ));
                    }
                }
                // Authority moves only by a switch: by the failover rule, or by an instruction.
                if let Some(name) = self.services_where(*node_id, Role::Master).next() {
                    let failover = self.services[name].placement.as_ref().and_then(|p| p.failover);
                    return reject(match failover {
                        Some(f) => format!(
                            "node {node_id} is still master of {name}: its failover, node {f}, takes over by itself once it has seen it gone; remove it after that (or switch {name} away: coyote service switch {name} --to NODE --now)"
                        ),
                        None => format!(
                            "node {node_id} is master of {name}, which has no failover: switch it to one of its backups first (coyote service switch {name} --to NODE --now)"
                        ),
                    });
                }
            }
            Event::TokenIssued { token_id, expires_at_ms, uses, secret_sha256 } => {
                if token_id.is_empty() || token_id.len() > 64 || secret_sha256.len() != 64 {
                    return reject("token id or secret hash is malformed".into());
                }
                if self.tokens.contains_key(token_id) {
                    return reject(format!("token {token_id} already exists"));
                }
                if *uses == 0 || *uses > TOKEN_USES_MAX {
                    return reject(format!("a token allows 1 to {TOKEN_USES_MAX} uses"));
                }
                if *expires_at_ms <= at_ms {
                    return reject("the token would already be expired".into());
                }
                if self.valid_tokens(at_ms).count() >= TOKENS_MAX {
                    return reject(format!("too many valid tokens (at most {TOKENS_MAX}): revoke some"));
                }
            }
            Event::TokenRevoked { token_id } => match self.tokens.get(token_id) {
                None => return reject(format!("token {token_id} does not exist")),
                Some(t) if t.revoked => return reject(format!("token {token_id} is already revoked")),
                Some(_) => {}
            },
            Event::ServiceCreated { spec } => self.check_new_service(spec)?,
            Event::ServiceSpecChanged { spec } => {
                spec.validate()?;
                if !self.services.contains_key(&spec.name) {
                    return reject(format!("service {} does not exist", spec.name));
                }
                self.check_ports_free(spec)?;
            }
            Event::ServiceRemoved { name } => {
                if !self.services.contains_key(name) {
                    return reject(format!("service {name} does not exist"));
                }
            }
            Event::PlacementSet { service, placement } => {
                let Some(svc) = self.services.get(service) else {
                    return reject(format!("service {service} does not exist"));
                };
                // Authority moves only by a switch, which the fences wait for. A placement computed
                // before a switch (a refill of the failover slot) and committed after it would
                // otherwise give the service back to its old master, which serves at once.
                let current = svc.placement.as_ref().filter(|p| p.master != placement.master);
                #[cfg(feature = "planted-bugs")]
                let current = current.filter(|_| !crate::planted::placement_moves_master());
                if let Some(current) = current {
                    return reject(format!(
                        "node {} is master of {service}: a placement cannot change that, only an authority switch (coyote service switch)",
                        current.master
                    ));
                }
                self.check_placement(placement)?;
            }
            Event::AuthoritySwitched { service, to, not_before_ms, cause, .. } => {
                let placement = self.check_new_master(service, *to)?;
                let earliest = serve_from(at_ms);
                if *not_before_ms != 0 && *not_before_ms < earliest {
                    return reject(format!(
                        "the new master may serve from {} at the earliest (lease {LEASE_MS} ms plus drift margin {DRIFT_MARGIN_MS} ms), not {}",
                        crate::format_ms(earliest),
                        crate::format_ms(*not_before_ms)
                    ));
                }
                match cause {
                    SwitchCause::Failover => self.check_failover_rule(service, placement, *to, at_ms)?,
                    SwitchCause::Instruction => {}
                    SwitchCause::Handover | SwitchCause::HandoverOverdue => {
                        if self.handovers.get(service).is_none_or(|h| h.to != *to) {
                            return reject(format!("no handover of {service} to node {to} is under way"));
                        }
                        if *cause == SwitchCause::HandoverOverdue
                            && self.handover_overdue(service, at_ms).is_none()
                        {
                            return reject(format!(
                                "the handover of {service} is not overdue: the master may still carry it out"
                            ));
                        }
                    }
                }
            }
            Event::SnapshotTaken { service, snapshot, parent, node, epoch, .. } => {
                let (master, ledger) = self.check_data(service, snapshot)?;
                if let Some(parent) = parent {
                    if !valid_snapshot_id(parent) {
                        return reject(format!("{parent:?} is not a snapshot id"));
                    }
                }
                if *node != master {
                    return reject(format!(
                        "node {node} is not master of {service} (node {master} is): its snapshot is refused"
                    ));
                }
                if *epoch != ledger.epoch {
                    return reject(format!(
                        "snapshot of {service} taken at epoch {epoch}, but the epoch is {}: a deposed master's snapshot is refused",
                        ledger.epoch
                    ));
                }
                // The same content taken again at a later epoch (a master that restored it, a
                // rollback) is recorded again as the newest; at the same epoch it is a repeat.
                if ledger.snapshots.get(snapshot).is_some_and(|r| r.epoch == *epoch) {
                    return reject(format!(
                        "snapshot {} of {service} is already recorded at this epoch",
                        short_id(snapshot)
                    ));
                }
                if ledger.snapshots.len() >= SNAPSHOTS_MAX {
                    return reject(format!(
                        "{service} has {SNAPSHOTS_MAX} snapshots recorded: forget some first"
                    ));
                }
            }
            Event::SnapshotStored { service, snapshot, node } => {
                let record = self.check_known_snapshot(service, snapshot)?;
                if !self.members.contains_key(node) {
                    return reject(format!("node {node} is not a member"));
                }
                if record.holders.contains_key(node) {
                    return reject(format!("node {node} already holds snapshot {}", short_id(snapshot)));
                }
            }
            Event::SnapshotCorrupt { service, snapshot, node, .. } => {
                let record = self.check_known_snapshot(service, snapshot)?;
                if !record.holders.contains_key(node) {
                    return reject(format!("node {node} does not hold snapshot {}", short_id(snapshot)));
                }
            }
            Event::BackupFailed { service, snapshot, node, .. } => {
                if !self.data.contains_key(service) {
                    return reject(format!("service {service} does not exist"));
                }
                if let Some(id) = snapshot {
                    if !valid_snapshot_id(id) {
                        return reject(format!("{id:?} is not a snapshot id"));
                    }
                }
                if !self.members.contains_key(node) {
                    return reject(format!("node {node} is not a member"));
                }
            }
            Event::SnapshotForgotten { service, snapshot } => {
                self.check_known_snapshot(service, snapshot)?;
            }
            Event::RestoreCompleted { service, snapshot, node, epoch } => {
                let Some(ledger) = self.data.get(service) else {
                    return reject(format!("service {service} does not exist"));
                };
                let master = self.services[service].placement.as_ref().map(|p| p.master);
                if master != Some(*node) {
                    return reject(format!("node {node} is not master of {service}"));
                }
                if *epoch != ledger.epoch {
                    return reject(format!(
                        "restore of {service} at epoch {epoch}, but the epoch is {}",
                        ledger.epoch
                    ));
                }
                if let Some(id) = snapshot {
                    if !ledger.snapshots.contains_key(id) {
                        return reject(format!("snapshot {} of {service} is not recorded", short_id(id)));
                    }
                }
            }
            Event::HandoverRequested { service, to, .. } => {
                self.check_new_master(service, *to)?;
                if let Some(h) = self.handovers.get(service) {
                    return reject(format!(
                        "a handover of {service} to node {} is already under way (asked for at {})",
                        h.to, h.requested_at_ms
                    ));
                }
            }
            Event::AcmeAccountCreated { directory, account_url, credentials_sealed } => {
                if directory.is_empty() || account_url.is_empty() || credentials_sealed.is_empty() {
                    return reject("an ACME account needs its directory, URL and credentials".into());
                }
                if let Some(acme) = self.acme.as_ref().filter(|a| a.directory == *directory) {
                    return reject(format!(
                        "the cluster has an account at {directory}: {}",
                        acme.account_url
                    ));
                }
            }
            Event::CertOrderClaimed { name, node } => {
                if !self.members.contains_key(node) {
                    return reject(format!("node {node} is not a member"));
                }
                if !self.orderable(name) {
                    return reject(format!(
                        "{name} is not a domain of any service whose TLS coyote terminates"
                    ));
                }
                let record = self.certs.get(name);
                match record.and_then(|r| r.claimed_by(at_ms)) {
                    Some(holder) if holder == *node => {}
                    Some(holder) => {
                        return reject(format!("node {holder} holds the order of {name}"));
                    }
                    None => {
                        let Some(record) = record else { return Ok(()) };
                        if record.order.is_none() && !record.due(at_ms) {
                            return reject(format!(
                                "the certificate of {name} is not due for renewal before {}",
                                crate::format_ms(record.renew_at_ms().unwrap_or(0))
                            ));
                        }
                        if at_ms < record.retry_at_ms {
                            return reject(format!(
                                "{name} may be ordered again from {}, after {} failure(s)",
                                crate::format_ms(record.retry_at_ms),
                                record.failures
                            ));
                        }
                    }
                }
            }
            Event::CertOrderPlaced { name, node, order_url, key_sealed } => {
                let order = self.check_order_holder(name, *node, at_ms)?;
                if order_url.is_empty() || key_sealed.is_empty() {
                    return reject("an order needs its URL and key".into());
                }
                if order.order_url.as_ref().is_some_and(|u| u != order_url) {
                    return reject(format!("the order of {name} is already placed"));
                }
            }
            Event::AcmeChallengeReady { name, node, token, key_authorization } => {
                let order = self.check_order_holder(name, *node, at_ms)?;
                if order.order_url.is_none() {
                    return reject(format!("the order of {name} is not placed yet"));
                }
                if !certs::valid_token(token) || !key_authorization.starts_with(&format!("{token}.")) {
                    return reject(format!("{token:?} is not an ACME challenge with its key authorization"));
                }
                if order.challenges.len() >= 16 && !order.challenges.contains_key(token) {
                    return reject(format!("the order of {name} has too many challenges"));
                }
            }
            Event::CertIssued { name, node, chain_pem, key_sealed, not_before_ms, not_after_ms, .. } => {
                self.check_order_holder(name, *node, at_ms)?;
                if chain_pem.is_empty() || key_sealed.is_empty() || not_after_ms <= not_before_ms {
                    return reject(format!("the certificate of {name} is incomplete"));
                }
            }
            Event::CertOrderFailed { name, node, .. } => {
                self.check_order_holder(name, *node, at_ms)?;
            }
            Event::Account(e) => {
                self.accounts.check(e, at_ms)?;
                if let Some(spec) = self.accounts.provisions(e) {
                    self.check_new_service(&spec)?;
                }
                if let AccountEvent::SettingsChanged { settings } = e {
                    let taken = settings.admin_domain.as_deref().and_then(|d| {
                        self.services
                            .values()
                            .find(|s| s.spec.domains.iter().any(|e| e.eq_ignore_ascii_case(d)))
                    });
                    if let (Some(d), Some(svc)) = (&settings.admin_domain, taken) {
                        return reject(format!("domain {d} is already served by service {}", svc.spec.name));
                    }
                }
            }
            Event::RestoreRequested { service, snapshot, .. } => {
                let record = self.check_known_snapshot(service, snapshot)?;
                if record.holders.is_empty() {
                    return reject(format!("no node holds snapshot {} of {service}", short_id(snapshot)));
                }
                if self.services[service].placement.is_none() {
                    return reject(format!("service {service} has no master to restore it"));
                }
                if let Some(h) = self.handovers.get(service) {
                    return reject(format!("a handover of {service} to node {} is under way", h.to));
                }
            }
            Event::AlarmRaised { key, node, service, .. } => {
                if key.is_empty() {
                    return reject("an alarm needs a key".into());
                }
                if let Some(open) = self.alarms.values().find(|a| a.key == *key) {
                    return reject(format!("alarm {key} is already open as {}", open.id));
                }
                if let Some(n) = node {
                    if !self.members.contains_key(n) {
                        return reject(format!("node {n} is not a member"));
                    }
                }
                if let Some(s) = service {
                    if !self.services.contains_key(s) {
                        return reject(format!("service {s} does not exist"));
                    }
                }
                if self.alarms.len() >= ALARMS_OPEN_MAX {
                    return reject(format!("too many open alarms (at most {ALARMS_OPEN_MAX})"));
                }
            }
            Event::AlarmCleared { alarm_id, .. } => {
                if !self.alarms.contains_key(alarm_id) {
                    return reject(format!("alarm {alarm_id} is not open"));
                }
            }
            Event::ReachabilityChanged { observer, subject, reachable } => {
                if !self.members.contains_key(observer) {
                    return reject(format!("node {observer} is not a member"));
                }
                match subject {
                    Subject::Node(n) if !self.members.contains_key(n) || n == observer => {
                        return reject(format!("node {observer} cannot report on node {n}"));
                    }
                    Subject::Service(s) if !self.services.contains_key(s) => {
                        return reject(format!("service {s} does not exist"));
                    }
                    _ => {}
                }
                if self.reachable(*observer, subject) == *reachable {
                    return reject(format!("node {observer} already reported {subject} that way"));
                }
            }
        }
        Ok(())
    }

    /// The rule under which a failover may take authority by itself (see the crate docs).
    fn check_failover_rule(
        &self,
        service: &str,
        p: &Placement,
        to: NodeId,
        at_ms: u64,
    ) -> Result<(), Rejection> {
        if p.failover != Some(to) {
            return Err(Rejection::new(format!(
                "node {to} is not the failover of {service}: only the failover takes over by itself, a backup waits for an instruction"
            )));
        }
        let subject = Subject::Service(service.to_string());
        match self.reachability.get(&(to, subject)) {
            Some(o) if !o.reachable && o.since_ms.saturating_add(FAILOVER_AFTER_MS) <= at_ms => {}
            Some(o) if !o.reachable => {
                return Err(Rejection::new(format!(
                "node {to} has seen {service} unreachable only since {}, less than {FAILOVER_AFTER_MS} ms",
                o.since_ms
            )))
            }
            _ => return Err(Rejection::new(format!("node {to} has not reported {service} unreachable"))),
        }
        let (votes, needed) = self.master_down_votes(p.master);
        #[cfg(feature = "planted-bugs")]
        let votes = if crate::planted::failover_ignores_votes() { needed } else { votes };
        if votes < needed {
            return Err(Rejection::new(format!(
                "only {votes} of the {needed} members needed report master {} unreachable",
                p.master
            )));
        }
        Ok(())
    }

    /// The latest report of `observer` about `subject`; no report means reachable.
    pub fn reachable(&self, observer: NodeId, subject: &Subject) -> bool {
        self.reachability.get(&(observer, subject.clone())).is_none_or(|o| o.reachable)
    }

    /// How many members report `master` unreachable, and how many make a majority of all members.
    pub fn master_down_votes(&self, master: NodeId) -> (usize, usize) {
        let subject = Subject::Node(master);
        let votes = self.members.keys().filter(|m| **m != master && !self.reachable(**m, &subject)).count();
        (votes, self.members.len() / 2 + 1)
    }

    fn check_new_service(&self, spec: &ServiceSpec) -> Result<(), Rejection> {
        spec.validate()?;
        if self.services.contains_key(&spec.name) {
            return Err(Rejection::new(format!("service {} already exists", spec.name)));
        }
        if self.services.len() >= SERVICES_MAX {
            return Err(Rejection::new(format!("too many services (at most {SERVICES_MAX})")));
        }
        self.check_ports_free(spec)
    }

    fn create_service(&mut self, spec: &ServiceSpec, env: &Envelope) {
        // The placement follows from the state: deriving it here makes a service and its
        // placement one event, which no crash can split.
        let placement = self.place();
        self.services.insert(
            spec.name.clone(),
            Service { spec: spec.clone(), placement, created_at_ms: env.at_ms, serve_from_ms: env.at_ms },
        );
        self.data.insert(spec.name.clone(), DataLedger::new(env.index));
    }

    fn check_ports_free(&self, spec: &ServiceSpec) -> Result<(), Rejection> {
        if let Some(d) =
            self.admin_domain().filter(|d| spec.domains.iter().any(|e| e.eq_ignore_ascii_case(d)))
        {
            return Err(Rejection::new(format!("domain {d} is the cluster's admin domain (the CRM)")));
        }
        for (name, svc) in &self.services {
            if *name == spec.name {
                continue;
            }
            for p in &spec.ports {
                if svc.spec.ports.iter().any(|q| q.host == p.host) {
                    return Err(Rejection::new(format!(
                        "host port {} is already used by service {name}",
                        p.host
                    )));
                }
            }
            for d in &spec.domains {
                if svc.spec.domains.iter().any(|e| e.eq_ignore_ascii_case(d)) {
                    return Err(Rejection::new(format!("domain {d} is already served by service {name}")));
                }
            }
        }
        Ok(())
    }

    fn check_placement(&self, placement: &Placement) -> Result<(), Rejection> {
        let mut seen = BTreeSet::new();
        for n in placement.nodes() {
            if !self.members.contains_key(&n) {
                return Err(Rejection::new(format!("node {n} is not a member")));
            }
            if !seen.insert(n) {
                return Err(Rejection::new(format!("node {n} is named twice in the placement")));
            }
        }
        Ok(())
    }

    fn mutate(&mut self, env: &Envelope) {
        match &env.event {
            Event::ClusterCreated { cluster_id, node, ca_pin } => {
                self.cluster = Some(ClusterInfo {
                    id: cluster_id.clone(),
                    ca_pin: ca_pin.clone(),
                    created_at_ms: env.at_ms,
                });
                self.add_member(node, env);
            }
            Event::NodeJoined { node, token_id, .. } => {
                let token = self.tokens.get_mut(token_id).expect("checked: token exists");
                token.uses_left -= 1;
                token.used_by.push(node.id);
                self.add_member(node, env);
            }
            Event::NodeLeft { node_id, .. } => self.depart(*node_id),
            Event::NodeRemoved { node_id, .. } => self.depart(*node_id),
            Event::TokenIssued { token_id, secret_sha256, expires_at_ms, uses } => {
                self.tokens.retain(|_, t| t.expires_at_ms.saturating_add(TOKEN_RETENTION_MS) > env.at_ms);
                self.tokens.insert(
                    token_id.clone(),
                    Token {
                        id: token_id.clone(),
                        secret_sha256: secret_sha256.clone(),
                        issued_at_ms: env.at_ms,
                        expires_at_ms: *expires_at_ms,
                        uses_total: *uses,
                        uses_left: *uses,
                        revoked: false,
                        used_by: Vec::new(),
                    },
                );
            }
            Event::TokenRevoked { token_id } => {
                self.tokens.get_mut(token_id).expect("checked: token exists").revoked = true;
            }
            Event::ServiceCreated { spec } => self.create_service(spec, env),
            Event::ServiceSpecChanged { spec } => {
                self.services.get_mut(&spec.name).expect("checked: service exists").spec = spec.clone();
            }
            Event::ServiceRemoved { name } => {
                self.services.remove(name);
                self.data.remove(name);
                self.rollbacks.remove(name);
                self.alarms.retain(|_, a| a.service.as_deref() != Some(name));
                self.reachability.retain(|(_, s), _| *s != Subject::Service(name.clone()));
            }
            Event::PlacementSet { service, placement } => {
                self.services.get_mut(service).expect("checked: service exists").placement =
                    Some(placement.clone());
            }
            Event::AuthoritySwitched { service, to, not_before_ms, .. } => {
                let svc = self.services.get_mut(service).expect("checked: service exists");
                let p = svc.placement.as_mut().expect("checked: placement exists");
                let old = p.master;
                if p.failover == Some(*to) {
                    p.failover = None;
                }
                p.backups.retain(|b| b != to);
                p.backups.insert(0, old);
                p.master = *to;
                svc.serve_from_ms = serve_from(env.at_ms).max(*not_before_ms);
                let ledger = self.data.entry(service.clone()).or_default();
                ledger.epoch = env.index;
                ledger.restored = None;
                // A rollback asked of the old master is not the new master's to do: it restores the
                // newest snapshot.
                self.rollbacks.remove(service);
                // Reports about the service were about its old master: monitors start afresh.
                self.reachability.retain(|(_, s), _| *s != Subject::Service(service.clone()));
            }
            Event::AlarmRaised { key, node, service, message } => {
                self.alarms.insert(
                    env.index,
                    Alarm {
                        id: env.index,
                        key: key.clone(),
                        node: *node,
                        service: service.clone(),
                        message: message.clone(),
                        raised_at_ms: env.at_ms,
                    },
                );
            }
            Event::AlarmCleared { alarm_id, .. } => {
                self.alarms.remove(alarm_id);
            }
            Event::ReachabilityChanged { observer, subject, reachable } => {
                let observation = Observation { reachable: *reachable, since_ms: env.at_ms };
                if *reachable {
                    // Reachable is the default: keep only what is unreachable, so the map stays small.
                    self.reachability.remove(&(*observer, subject.clone()));
                } else {
                    self.reachability.insert((*observer, subject.clone()), observation);
                }
            }
            Event::SnapshotTaken {
                service,
                snapshot,
                parent,
                node,
                epoch,
                kind,
                consistency,
                bytes,
                new_bytes,
            } => {
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                let holders = match ledger.snapshots.get(snapshot) {
                    Some(old) => {
                        let mut holders = old.holders.clone();
                        holders.insert(*node, env.at_ms);
                        holders
                    }
                    None => BTreeMap::from([(*node, env.at_ms)]),
                };
                let corrupt_on =
                    ledger.snapshots.get(snapshot).map(|r| r.corrupt_on.clone()).unwrap_or_default();
                ledger.snapshots.insert(
                    snapshot.clone(),
                    SnapshotRecord {
                        id: snapshot.clone(),
                        parent: parent.clone(),
                        taken_by: *node,
                        epoch: *epoch,
                        kind: *kind,
                        consistency: *consistency,
                        bytes: *bytes,
                        new_bytes: *new_bytes,
                        taken_at_ms: env.at_ms,
                        taken_index: env.index,
                        holders,
                        corrupt_on,
                    },
                );
                ledger.failures.remove(node);
                // Retention follows from the ledger: what the policy no longer keeps is forgotten
                // with the snapshot that made it so.
                let keep_for: Vec<NodeId> = self.services[service]
                    .placement
                    .as_ref()
                    .map(|p| p.nodes().collect())
                    .unwrap_or_default();
                let retention = self.services[service].spec.keep.unwrap_or(RETENTION);
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                let keep = retention.retained(ledger, &keep_for);
                ledger.snapshots.retain(|id, _| keep.contains(id));
            }
            Event::SnapshotStored { service, snapshot, node } => {
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                let record = ledger.snapshots.get_mut(snapshot).expect("checked: snapshot recorded");
                record.holders.insert(*node, env.at_ms);
                record.corrupt_on.remove(node);
                ledger.failures.remove(node);
            }
            Event::SnapshotCorrupt { service, snapshot, node, .. } => {
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                let record = ledger.snapshots.get_mut(snapshot).expect("checked: snapshot recorded");
                record.holders.remove(node);
                record.corrupt_on.insert(*node);
            }
            Event::BackupFailed { service, snapshot, node, reason } => {
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                ledger.failures.insert(
                    *node,
                    BackupFailure { snapshot: snapshot.clone(), reason: reason.clone(), at_ms: env.at_ms },
                );
            }
            Event::SnapshotForgotten { service, snapshot } => {
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                ledger.snapshots.remove(snapshot);
            }
            Event::RestoreCompleted { service, snapshot, node, epoch } => {
                self.rollbacks.remove(service);
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                ledger.restored = Some(Restored {
                    node: *node,
                    epoch: *epoch,
                    snapshot: snapshot.clone(),
                    at_ms: env.at_ms,
                });
            }
            Event::AcmeAccountCreated { directory, account_url, credentials_sealed } => {
                self.acme = Some(AcmeAccount {
                    directory: directory.clone(),
                    account_url: account_url.clone(),
                    credentials_sealed: credentials_sealed.clone(),
                    created_at_ms: env.at_ms,
                });
            }
            Event::CertOrderClaimed { name, node } => {
                let record = self.certs.entry(name.clone()).or_default();
                match &mut record.order {
                    Some(order) => {
                        order.node = *node;
                        order.renewed_at_ms = env.at_ms;
                    }
                    None => {
                        record.order = Some(OrderClaim {
                            node: *node,
                            claimed_at_ms: env.at_ms,
                            renewed_at_ms: env.at_ms,
                            order_url: None,
                            key_sealed: None,
                            challenges: BTreeMap::new(),
                        })
                    }
                }
            }
            Event::CertOrderPlaced { name, order_url, key_sealed, .. } => {
                let order = self.order_mut(name);
                order.order_url = Some(order_url.clone());
                order.key_sealed = Some(key_sealed.clone());
                order.renewed_at_ms = env.at_ms;
            }
            Event::AcmeChallengeReady { name, token, key_authorization, .. } => {
                let order = self.order_mut(name);
                order.challenges.insert(token.clone(), key_authorization.clone());
                order.renewed_at_ms = env.at_ms;
            }
            Event::CertIssued {
                name, chain_pem, key_sealed, not_before_ms, not_after_ms, issuer, ..
            } => {
                let record = self.certs.get_mut(name).expect("checked: the order exists");
                record.current = Some(IssuedCert {
                    chain_pem: chain_pem.clone(),
                    key_sealed: key_sealed.clone(),
                    not_before_ms: *not_before_ms,
                    not_after_ms: *not_after_ms,
                    issuer: issuer.clone(),
                    issued_at_ms: env.at_ms,
                });
                record.order = None;
                record.failures = 0;
                record.last_error = None;
                record.retry_at_ms = 0;
                let key = cert_alarm_key(name);
                self.alarms.retain(|_, a| a.key != key);
            }
            Event::CertOrderFailed { name, node, reason } => {
                let record = self.certs.get_mut(name).expect("checked: the order exists");
                record.order = None;
                record.failures = record.failures.saturating_add(1);
                record.last_error = Some(reason.clone());
                record.retry_at_ms = env.at_ms + certs::backoff_ms(record.failures);
                let message = format!(
                    "the certificate of {name} could not be ordered ({} failure(s) in a row; next try at {}): {reason}",
                    record.failures,
                    crate::format_ms(record.retry_at_ms)
                );
                let key = cert_alarm_key(name);
                if !self.alarms.values().any(|a| a.key == key) && self.alarms.len() < ALARMS_OPEN_MAX {
                    let service = self
                        .services
                        .values()
                        .find(|s| serves_name(&s.spec, name))
                        .map(|s| s.spec.name.clone());
                    let alarm = Alarm {
                        id: env.index,
                        key,
                        node: Some(*node),
                        service,
                        message,
                        raised_at_ms: env.at_ms,
                    };
                    self.alarms.insert(env.index, alarm);
                }
            }
            Event::Account(e) => {
                // A signup that is approved creates the member's service in the same event.
                let provision = self.accounts.provisions(e);
                self.accounts.mutate(e, env.at_ms, env.index);
                if let Some(spec) = provision {
                    self.create_service(&spec, env);
                }
            }
            Event::RestoreRequested { service, snapshot, .. } => {
                let ledger = self.data.get_mut(service).expect("checked: ledger exists");
                ledger.epoch = env.index;
                ledger.restored = None;
                self.rollbacks.insert(service.clone(), snapshot.clone());
            }
            Event::HandoverRequested { service, to, reason } => {
                let from =
                    self.services[service].placement.as_ref().expect("checked: placement exists").master;
                self.handovers.insert(
                    service.clone(),
                    Handover { from, to: *to, requested_at_ms: env.at_ms, reason: reason.clone() },
                );
            }
        }
        if changes_members(&env.event) {
            self.refill_backups();
        }
        if refills_failovers(&env.event) {
            self.refill_failovers();
        }
        if changes_tolerance(&env.event) {
            self.refresh_tolerance_alarm(env);
        }
        // A handover ends with the switch, or when what it was about is gone: the service, the
        // master it was asked of, or the target's role.
        let services = &self.services;
        self.handovers.retain(|name, h| {
            services
                .get(name)
                .and_then(|s| s.placement.as_ref())
                .is_some_and(|p| p.master == h.from && p.nodes().any(|n| n == h.to))
        });
    }

    /// Takes `node` out of the cluster (checked: it masters nothing): out of the members for good,
    /// out of every placement, and out of the holders of every snapshot.
    fn depart(&mut self, node: NodeId) {
        self.members.remove(&node);
        self.departed.insert(node);
        self.reachability.retain(|(o, s), _| *o != node && *s != Subject::Node(node));
        for svc in self.services.values_mut() {
            if let Some(p) = &mut svc.placement {
                if p.failover == Some(node) {
                    p.failover = None;
                }
                p.backups.retain(|b| *b != node);
            }
        }
        // A node that left holds nothing any more.
        for ledger in self.data.values_mut() {
            for record in ledger.snapshots.values_mut() {
                record.holders.remove(&node);
            }
            ledger.failures.remove(&node);
        }
    }

    /// Brings every placement back to [`PLACEMENT_BACKUPS_MAX`] backups where members allow it:
    /// after a member joined or one was taken out, the least loaded healthy members not yet placed
    /// are added (the backups then fetch the service's snapshots). Deterministic: in the order of
    /// the services' names, ties to the lower node id.
    fn refill_backups(&mut self) {
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, svc)| {
                svc.placement.as_ref().is_some_and(|p| {
                    p.backups.len() < PLACEMENT_BACKUPS_MAX && p.nodes().count() < self.members.len()
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let Some(order) = self.place() else { return };
            let p = self.services[&name].placement.clone().expect("listed above");
            let placed: BTreeSet<NodeId> = p.nodes().collect();
            let wanted = PLACEMENT_BACKUPS_MAX - p.backups.len();
            let add: Vec<NodeId> =
                order.nodes().filter(|n| !placed.contains(n) && self.healthy(*n)).take(wanted).collect();
            if !add.is_empty() {
                let p =
                    self.services.get_mut(&name).and_then(|s| s.placement.as_mut()).expect("listed above");
                p.backups.extend(add);
            }
        }
    }

    /// A member that no majority reports unreachable.
    fn healthy(&self, node: NodeId) -> bool {
        let (votes, needed) = self.master_down_votes(node);
        self.members.contains_key(&node) && votes < needed
    }

    /// How many members the cluster can lose and still have a majority, counting as lost already
    /// the members a majority reports unreachable: `(can_lose, members, lost)`.
    pub fn fault_tolerance(&self) -> (usize, usize, Vec<NodeId>) {
        let members = self.members.len();
        let lost: Vec<NodeId> = self.members.keys().copied().filter(|n| !self.healthy(*n)).collect();
        let up = members - lost.len();
        (up.saturating_sub(members / 2 + 1), members, lost)
    }

    /// Opens the alarm [`TOLERANCE_ALARM_KEY`] while a cluster of two or more members can lose none
    /// of them, and clears it once it can (a single server is a choice, not a fault).
    fn refresh_tolerance_alarm(&mut self, env: &Envelope) {
        let (can_lose, members, lost) = self.fault_tolerance();
        let open = self.alarms.values().find(|a| a.key == TOLERANCE_ALARM_KEY).map(|a| a.id);
        if members < 2 || can_lose > 0 {
            if let Some(id) = open {
                self.alarms.remove(&id);
            }
            return;
        }
        let message = if lost.is_empty() {
            format!(
                "the cluster can lose none of its {members} servers: one failure stops every change; add a server (coyote token create, then coyote join on it)"
            )
        } else {
            let names: Vec<String> = lost.iter().map(|n| format!("node {n}")).collect();
            let names = names.join(", ");
            if members - lost.len() > members / 2 {
                format!(
                    "the cluster can lose none of its {members} servers: a majority reports {names} unreachable, and one more failure stops every change; bring it back, or replace it (add a server, then coyote node remove)"
                )
            } else {
                format!(
                    "the cluster has lost its majority of {members} servers: a majority reports {names} unreachable; bring them back"
                )
            }
        };
        match open {
            Some(id) => {
                if let Some(alarm) = self.alarms.get_mut(&id) {
                    alarm.message = message;
                }
            }
            None if self.alarms.len() < ALARMS_OPEN_MAX => {
                let alarm = Alarm {
                    id: env.index,
                    key: TOLERANCE_ALARM_KEY.to_string(),
                    node: None,
                    service: None,
                    message,
                    raised_at_ms: env.at_ms,
                };
                self.alarms.insert(env.index, alarm);
            }
            None => {}
        }
    }

    /// Fills every empty failover slot that can be filled ([`State::refill_failover`]), in the order
    /// of the services' names.
    fn refill_failovers(&mut self) {
        let members = self.members.len();
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, svc)| {
                svc.placement.as_ref().is_some_and(|p| {
                    p.failover.is_none() && (!p.backups.is_empty() || p.nodes().count() < members)
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            if let Some(placement) = self.refill_failover(&name) {
                self.services.get_mut(&name).expect("listed above").placement = Some(placement);
            }
        }
    }

    fn add_member(&mut self, node: &NodeInfo, env: &Envelope) {
        self.members.insert(
            node.id,
            Member { id: node.id, addr: node.addr.clone(), joined_at_ms: env.at_ms, joined_index: env.index },
        );
    }

    /// That `service` exists and is placed and `snapshot` has the form of an id; returns its master
    /// and its ledger.
    fn check_data(&self, service: &str, snapshot: &str) -> Result<(NodeId, &DataLedger), Rejection> {
        let reject = |m: String| Err(Rejection::new(m));
        let (Some(svc), Some(ledger)) = (self.services.get(service), self.data.get(service)) else {
            return reject(format!("service {service} does not exist"));
        };
        let Some(placement) = &svc.placement else {
            return reject(format!("service {service} has no placement yet"));
        };
        if !valid_snapshot_id(snapshot) {
            return reject(format!("{snapshot:?} is not a snapshot id (64 lowercase hex characters)"));
        }
        Ok((placement.master, ledger))
    }

    /// That `snapshot` of `service` is recorded in its ledger; returns the record.
    fn check_known_snapshot(&self, service: &str, snapshot: &str) -> Result<&SnapshotRecord, Rejection> {
        let Some(ledger) = self.data.get(service) else {
            return Err(Rejection::new(format!("service {service} does not exist")));
        };
        ledger.snapshots.get(snapshot).ok_or_else(|| {
            Rejection::new(format!("snapshot {} of {service} is not recorded", short_id(snapshot)))
        })
    }

    /// That `to` may become master of `service`: it exists and is placed, and `to` is a member
    /// holding another role for it. Returns the placement.
    fn check_new_master(&self, service: &str, to: NodeId) -> Result<&Placement, Rejection> {
        let reject = |m: String| Err(Rejection::new(m));
        let Some(svc) = self.services.get(service) else {
            return reject(format!("service {service} does not exist"));
        };
        let Some(placement) = &svc.placement else {
            return reject(format!("service {service} has no placement yet"));
        };
        if placement.master == to {
            return reject(format!("node {to} is already master of {service}"));
        }
        if !placement.nodes().any(|n| n == to) {
            return reject(format!("node {to} holds no role for {service}"));
        }
        if !self.members.contains_key(&to) {
            return reject(format!("node {to} is not a member"));
        }
        Ok(placement)
    }

    /// Whether coyote may order a certificate for `name`: a lowercase domain of a service whose TLS
    /// the proxy terminates (not passed through).
    pub fn orderable(&self, name: &str) -> bool {
        !name.is_empty()
            && name == name.to_ascii_lowercase()
            && (self.services.values().any(|s| !s.spec.tls_passthrough && serves_name(&s.spec, name))
                || self.admin_domain() == Some(name))
    }

    /// The domain every node's proxy serves the CRM at, if the admin set one.
    pub fn admin_domain(&self) -> Option<&str> {
        self.accounts.settings.admin_domain.as_deref()
    }

    /// Every name coyote may order a certificate for, in order: the services' domains (but those
    /// passed through to their containers) and the admin domain.
    pub fn orderable_names(&self) -> BTreeSet<String> {
        self.services
            .values()
            .filter(|s| !s.spec.tls_passthrough)
            .flat_map(|s| s.spec.domains.iter().map(|d| d.trim_end_matches('.').to_ascii_lowercase()))
            .chain(self.admin_domain().map(str::to_string))
            .collect()
    }

    fn check_order_holder(&self, name: &str, node: NodeId, at_ms: u64) -> Result<&OrderClaim, Rejection> {
        let record = self.certs.get(name);
        let Some(order) = record.and_then(|r| r.order.as_ref()) else {
            return Err(Rejection::new(format!("no order of {name} is under way")));
        };
        if order.node != node {
            return Err(Rejection::new(format!(
                "node {} holds the order of {name}, not node {node}",
                order.node
            )));
        }
        if record.and_then(|r| r.claimed_by(at_ms)) != Some(node) {
            return Err(Rejection::new(format!("the claim of node {node} on the order of {name} lapsed")));
        }
        Ok(order)
    }

    fn order_mut(&mut self, name: &str) -> &mut OrderClaim {
        self.certs.get_mut(name).and_then(|r| r.order.as_mut()).expect("checked: the order exists")
    }

    /// Checks what must never be false. Kept in release builds: a broken state must stop the node.
    pub fn check_invariants(&self) -> Result<(), Error> {
        for (name, h) in &self.handovers {
            let master = self.services.get(name).and_then(|s| s.placement.as_ref()).map(|p| p.master);
            if master != Some(h.from) || h.from == h.to {
                return Err(Error::Invariant(format!("handover of {name} from node {} is stale", h.from)));
            }
        }
        for (name, svc) in &self.services {
            if svc.spec.name != *name {
                return Err(Error::Invariant(format!("service {name} stored under another name")));
            }
            let Some(p) = &svc.placement else { continue };
            let mut seen = BTreeSet::new();
            for n in p.nodes() {
                if !seen.insert(n) {
                    return Err(Error::Invariant(format!("service {name}: node {n} holds two roles")));
                }
            }
            if !self.members.contains_key(&p.master) {
                return Err(Error::Invariant(format!("service {name}: master {} is not a member", p.master)));
            }
        }
        for (id, m) in &self.members {
            if m.id != *id || self.departed.contains(id) {
                return Err(Error::Invariant(format!("member {id} is inconsistent")));
            }
        }
        Ok(())
    }

    // ---- derived views ----

    /// The role `node` holds for `service`, if any.
    pub fn role(&self, service: &str, node: NodeId) -> Option<Role> {
        let p = self.services.get(service)?.placement.as_ref()?;
        if p.master == node {
            Some(Role::Master)
        } else if p.failover == Some(node) {
            Some(Role::Failover)
        } else if p.backups.contains(&node) {
            Some(Role::Backup)
        } else {
            None
        }
    }

    /// Roles of every node for every placed service.
    pub fn roles(&self) -> BTreeMap<String, BTreeMap<NodeId, Role>> {
        let mut out = BTreeMap::new();
        for (name, svc) in &self.services {
            let Some(p) = &svc.placement else { continue };
            let mut roles = BTreeMap::new();
            roles.insert(p.master, Role::Master);
            if let Some(f) = p.failover {
                roles.insert(f, Role::Failover);
            }
            for b in &p.backups {
                roles.insert(*b, Role::Backup);
            }
            out.insert(name.clone(), roles);
        }
        out
    }

    /// Names of services where `node` holds `role`.
    pub fn services_where(&self, node: NodeId, role: Role) -> impl Iterator<Item = &str> + '_ {
        self.services.keys().filter(move |s| self.role(s, node) == Some(role)).map(|s| s.as_str())
    }

    /// The containers `node` should have, derived from its roles.
    pub fn desired_containers(&self, node: NodeId) -> Vec<DesiredContainer> {
        let mut out = Vec::new();
        for (name, svc) in &self.services {
            let goal = match self.role(name, node) {
                Some(Role::Master) if svc.spec.on_demand => ContainerGoal::OnDemand,
                Some(Role::Master) => ContainerGoal::Running,
                Some(Role::Failover) => ContainerGoal::Standby,
                Some(Role::Backup) | None => continue,
            };
            out.push(DesiredContainer { service: name.clone(), spec_hash: svc.spec.hash(), goal });
        }
        out
    }

    pub fn open_alarms(&self) -> impl Iterator<Item = &Alarm> {
        self.alarms.values()
    }

    /// Tokens that can still be used at `now_ms`.
    pub fn valid_tokens(&self, now_ms: u64) -> impl Iterator<Item = &Token> {
        self.tokens.values().filter(move |t| t.status(now_ms) == TokenStatus::Valid)
    }

    /// The id a newly joining node gets: never one in use or used before.
    pub fn next_node_id(&self) -> NodeId {
        let max_member = self.members.keys().next_back().copied().unwrap_or(0);
        let max_departed = self.departed.iter().next_back().copied().unwrap_or(0);
        max_member.max(max_departed) + 1
    }

    /// The handover of `service` under way, if any.
    pub fn handover(&self, service: &str) -> Option<&Handover> {
        self.handovers.get(service)
    }

    /// Whether the target of the handover of `service` may propose the switch itself at `now_ms`,
    /// and why: the master did not hand over within [`HANDOVER_WAIT_MS`], or a majority reports it
    /// unreachable.
    pub fn handover_overdue(&self, service: &str, now_ms: u64) -> Option<String> {
        let h = self.handovers.get(service)?;
        let (votes, needed) = self.master_down_votes(h.from);
        if votes >= needed {
            return Some(format!("handover: the master (node {}) is unreachable by a majority", h.from));
        }
        (now_ms >= h.requested_at_ms.saturating_add(HANDOVER_WAIT_MS)).then(|| {
            format!(
                "handover: the master (node {}) did not hand over within {} s",
                h.from,
                HANDOVER_WAIT_MS / 1000
            )
        })
    }

    /// Whether `node` may serve `service` at `now_ms`: it is the master and its switch's moment has come.
    pub fn may_serve(&self, node: NodeId, service: &str, now_ms: u64) -> bool {
        self.role(service, node) == Some(Role::Master)
            && self.services.get(service).is_some_and(|s| now_ms >= s.serve_from_ms)
    }

    /// For a service whose failover slot is empty: the placement with the slot refilled, from the
    /// backups first (in order, skipping those a majority reports unreachable), else from the least
    /// loaded member without a role. `None` if the slot is taken or nobody can fill it.
    pub fn refill_failover(&self, service: &str) -> Option<Placement> {
        let p = self.services.get(service)?.placement.as_ref()?;
        if p.failover.is_some() {
            return None;
        }
        let healthy = |n: &NodeId| self.healthy(*n);
        let mut next = p.clone();
        if let Some(pos) = p.backups.iter().position(healthy) {
            next.failover = Some(next.backups.remove(pos));
            return Some(next);
        }
        let placed: BTreeSet<NodeId> = p.nodes().collect();
        let candidate =
            self.place().and_then(|order| order.nodes().find(|n| !placed.contains(n) && healthy(n)))?;
        next.failover = Some(candidate);
        Some(next)
    }

    /// A placement for a new service: the least loaded member is master, the next failover, then up to
    /// [`PLACEMENT_BACKUPS_MAX`] backups. Deterministic: ties go to the lower node id.
    pub fn place(&self) -> Option<Placement> {
        let mut load: BTreeMap<NodeId, (usize, usize)> =
            self.members.keys().map(|id| (*id, (0, 0))).collect();
        for svc in self.services.values() {
            let Some(p) = &svc.placement else { continue };
            if let Some(l) = load.get_mut(&p.master) {
                l.0 += 1;
            }
            for n in p.nodes().skip(1) {
                if let Some(l) = load.get_mut(&n) {
                    l.1 += 1;
                }
            }
        }
        let mut order: Vec<NodeId> = load.keys().copied().collect();
        order.sort_by_key(|id| (load[id], *id));
        let mut it = order.into_iter();
        let master = it.next()?;
        let failover = it.next();
        let backups = it.take(PLACEMENT_BACKUPS_MAX).collect();
        Some(Placement { master, failover, backups })
    }
}

/// The moment a master switched to at `at_ms` may serve from: the old master has fenced itself by
/// then (its lease has run out, with the drift margin on top).
pub fn serve_from(at_ms: u64) -> u64 {
    at_ms.saturating_add(LEASE_MS + DRIFT_MARGIN_MS)
}

/// Whether applying `event` may empty a failover slot or make a node able to fill one: a switch
/// (the failover becomes master), a member joining or leaving, a node reported reachable or not, or
/// a placement set by hand.
fn refills_failovers(event: &Event) -> bool {
    matches!(
        event,
        Event::AuthoritySwitched { .. }
            | Event::NodeJoined { .. }
            | Event::NodeLeft { .. }
            | Event::NodeRemoved { .. }
            | Event::PlacementSet { .. }
            | Event::ReachabilityChanged { subject: Subject::Node(_), .. }
    )
}

/// Whether applying `event` changes who the members are.
fn changes_members(event: &Event) -> bool {
    matches!(event, Event::NodeJoined { .. } | Event::NodeLeft { .. } | Event::NodeRemoved { .. })
}

/// Whether applying `event` may change how many members the cluster can lose.
fn changes_tolerance(event: &Event) -> bool {
    changes_members(event)
        || matches!(
            event,
            Event::ClusterCreated { .. } | Event::ReachabilityChanged { subject: Subject::Node(_), .. }
        )
}
