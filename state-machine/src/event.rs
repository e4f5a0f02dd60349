//! Events, the proposals that carry them, and the envelope the log wraps around them.

use serde::{Deserialize, Serialize};

use crate::accounts::AccountEvent;
use crate::spec::ServiceSpec;
use crate::{LogIndex, NodeId, Term};

/// Version of the encoding of a [`Proposal`] in the log.
///
/// A proposal is always written inside [`VersionedProposal`], whose first field on disk is the variant
/// index, so a log written by an older coyote stays readable: when the shape of an event changes, add a
/// `V2` variant, keep decoding `V1` and convert it in `From<VersionedProposal>`.
pub const FORMAT_VERSION: u16 = 1;

/// A member of the cluster as the log knows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Address other members reach this node's Raft/gRPC endpoint at (`HOST:PORT`).
    pub addr: String,
}

/// Who serves a service (master), who takes over by itself (failover), and who holds its data and waits
/// for an instruction (backups).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Placement {
    pub master: NodeId,
    pub failover: Option<NodeId>,
    pub backups: Vec<NodeId>,
}

/// Everything that can happen to a cluster. New variants go at the end: the encoding uses their position.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The first event of every log.
    ClusterCreated {
        cluster_id: String,
        node: NodeInfo,
        ca_pin: String,
    },
    /// A server joined with a token; this also records one use of that token.
    NodeJoined {
        node: NodeInfo,
        token_id: String,
        secret_sha256: String,
    },
    NodeLeft {
        node_id: NodeId,
        reason: String,
    },
    TokenIssued {
        token_id: String,
        secret_sha256: String,
        expires_at_ms: u64,
        uses: u32,
    },
    TokenRevoked {
        token_id: String,
    },
    ServiceCreated {
        spec: ServiceSpec,
    },
    ServiceSpecChanged {
        spec: ServiceSpec,
    },
    ServiceRemoved {
        name: String,
    },
    /// A placement set by hand. No part of coyote proposes it: `ServiceCreated` places a service and
    /// the state machine refills failover slots itself. It is applied only when it keeps the master.
    PlacementSet {
        service: String,
        placement: Placement,
    },
    /// Authority for `service` moves to `to`. The new master may serve from the envelope's `at_ms`
    /// plus [`crate::LEASE_MS`] and [`crate::DRIFT_MARGIN_MS`], derived when the switch is applied
    /// (so one clock reading, the envelope's, decides it), or from `not_before_ms` if that is later.
    AuthoritySwitched {
        service: String,
        to: NodeId,
        reason: String,
        /// 0: as soon as the fence allows (what every part of coyote proposes). Otherwise a later
        /// moment the proposer asks for; one earlier than the fence allows is refused.
        not_before_ms: u64,
        cause: SwitchCause,
    },
    /// An alarm; its id is the log index of this event. At most one alarm per `key` is open.
    AlarmRaised {
        key: String,
        node: Option<NodeId>,
        service: Option<String>,
        message: String,
    },
    AlarmCleared {
        alarm_id: u64,
        reason: String,
    },
    /// What `observer` can reach changed. Monitors propose this at transitions only, never per probe.
    ReachabilityChanged {
        observer: NodeId,
        subject: Subject,
        reachable: bool,
    },
    /// An admin asks for a graceful handover of `service` to `to`: the master runs the spec's dump
    /// command, stops its container and then proposes the switch itself (see `State::handovers`).
    /// Appended last, so that logs written before it decode unchanged.
    HandoverRequested {
        service: String,
        to: NodeId,
        reason: String,
    },
    /// The master of `service` took a snapshot of its data and holds it in its own store. Accepted
    /// only from the current master at the current epoch (see [`crate::DataLedger::epoch`]): a deposed
    /// master's snapshot is refused, so it is never restored.
    SnapshotTaken {
        service: String,
        /// The snapshot's id: the blake3 hash of its manifest, 64 lowercase hex characters.
        snapshot: String,
        /// The snapshot it was taken after (its unchanged files were not read again).
        parent: Option<String>,
        node: NodeId,
        epoch: LogIndex,
        kind: SnapshotKind,
        consistency: Consistency,
        /// Bytes of data it describes, and bytes of chunks that were new to the master's store.
        bytes: u64,
        new_bytes: u64,
    },
    /// `node` holds every chunk of the snapshot, checked by hash and synced to its disk.
    SnapshotStored {
        service: String,
        snapshot: String,
        node: NodeId,
    },
    /// A chunk of the snapshot on `node` failed its hash check: `node` no longer counts as a holder.
    SnapshotCorrupt {
        service: String,
        snapshot: String,
        node: NodeId,
        reason: String,
    },
    /// A snapshot could not be taken or stored on `node` (disk full, unreachable, hash mismatch).
    BackupFailed {
        service: String,
        snapshot: Option<String>,
        node: NodeId,
        reason: String,
    },
    /// Retention dropped the snapshot: its chunks may be pruned on every node.
    SnapshotForgotten {
        service: String,
        snapshot: String,
    },
    /// The master restored the service's data (from `snapshot`, or none: it starts empty) before its
    /// container starts, at its current epoch.
    RestoreCompleted {
        service: String,
        snapshot: Option<String>,
        node: NodeId,
        epoch: LogIndex,
    },
    /// The cluster's account at the ACME CA `directory`; one at another directory is replaced. See
    /// [`crate::certs`] for the events of a certificate's order.
    AcmeAccountCreated {
        directory: String,
        account_url: String,
        /// The account's credentials, sealed under the cluster's key.
        credentials_sealed: Vec<u8>,
    },
    /// `node` works on the certificate of `name`: a new order, an order whose claim lapsed (resumed
    /// by its URL), or its own claim renewed.
    CertOrderClaimed {
        name: String,
        node: NodeId,
    },
    /// The claimant placed the order at the CA, for a certificate of the key it chose (sealed).
    CertOrderPlaced {
        name: String,
        node: NodeId,
        order_url: String,
        key_sealed: Vec<u8>,
    },
    /// A challenge of the order, which every node answers: HTTP-01 (`token`'s path answered with
    /// `key_authorization`) or TLS-ALPN-01 (a handshake for `name` with its digest).
    AcmeChallengeReady {
        name: String,
        node: NodeId,
        token: String,
        key_authorization: String,
    },
    /// The CA issued the certificate of `name`; the order is over.
    CertIssued {
        name: String,
        node: NodeId,
        chain_pem: String,
        /// The certificate's key, sealed.
        key_sealed: Vec<u8>,
        not_before_ms: u64,
        not_after_ms: u64,
        issuer: String,
    },
    /// The order of `name` failed; the next one waits ([`crate::certs::backoff_ms`]).
    CertOrderFailed {
        name: String,
        node: NodeId,
        reason: String,
    },
    /// An admin asks for `service`'s data to be rolled back to `snapshot`, in place: a new epoch
    /// begins, so the master stops serving, restores the snapshot (its directory moved aside) and
    /// serves again once its `RestoreCompleted` is applied.
    RestoreRequested {
        service: String,
        snapshot: String,
        reason: String,
    },
    /// Users, API keys and activation URLs (see [`crate::accounts`]).
    Account(AccountEvent),
    /// A server that is gone for good was removed by an admin (`coyote node remove`). Unless
    /// `forced`, a majority of the other members must report it unreachable. It must be master of
    /// nothing (its failovers take over by themselves first, or the admin switches its services);
    /// its other roles are refilled.
    NodeRemoved {
        node_id: NodeId,
        reason: String,
        forced: bool,
    },
}

/// Why a snapshot was taken.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// On the master's schedule.
    Periodic,
    /// After the spec's dump command ran (the hourly one).
    Dump,
    /// The last one before a graceful handover, with the container stopped.
    Handover,
    /// Asked for by an admin (`coyote backup now`).
    Manual,
}

impl SnapshotKind {
    pub fn name(self) -> &'static str {
        match self {
            SnapshotKind::Periodic => "periodic",
            SnapshotKind::Dump => "dump",
            SnapshotKind::Handover => "handover",
            SnapshotKind::Manual => "manual",
        }
    }
}

/// How the files of a snapshot were made consistent with each other.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Read while the container was paused: what a power cut would have left.
    Paused,
    /// Read after the spec's dump command wrote a consistent copy.
    Dumped,
    /// Read while the container was not running.
    Stopped,
}

impl Consistency {
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Paused => "paused",
            Consistency::Dumped => "dumped",
            Consistency::Stopped => "stopped",
        }
    }
}

/// What a monitor probes: a peer, or a service (at its master, together with its DNS zone).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Node(NodeId),
    Service(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Node(n) => write!(f, "node {n}"),
            Subject::Service(s) => write!(f, "service {s}"),
        }
    }
}

/// Why authority moves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchCause {
    /// The failover takes over by itself; accepted only under the failover rule (see `State`).
    Failover,
    /// An admin or an authorised peer instructed it (a backup only ever moves this way).
    Instruction,
    /// Ends the handover under way to `to`: proposed by the old master once it has dumped and
    /// stopped; accepted only while that handover is under way. (Appended: old logs decode.)
    Handover,
    /// Ends the handover under way to `to`, which the old master did not carry out: proposed by the
    /// target; accepted only while that handover is under way and overdue (see `State`).
    HandoverOverdue,
}

impl SwitchCause {
    /// Whether an admin's instruction is behind it (directly, or through a handover it asked for).
    pub fn instructed(self) -> bool {
        self != SwitchCause::Failover
    }
}

impl Event {
    /// Short stable name, used by `events tail --kind` and in JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::ClusterCreated { .. } => "cluster_created",
            Event::NodeJoined { .. } => "node_joined",
            Event::NodeLeft { .. } => "node_left",
            Event::TokenIssued { .. } => "token_issued",
            Event::TokenRevoked { .. } => "token_revoked",
            Event::ServiceCreated { .. } => "service_created",
            Event::ServiceSpecChanged { .. } => "service_spec_changed",
            Event::ServiceRemoved { .. } => "service_removed",
            Event::PlacementSet { .. } => "placement_set",
            Event::AuthoritySwitched { .. } => "authority_switched",
            Event::AlarmRaised { .. } => "alarm_raised",
            Event::AlarmCleared { .. } => "alarm_cleared",
            Event::ReachabilityChanged { .. } => "reachability_changed",
            Event::HandoverRequested { .. } => "handover_requested",
            Event::SnapshotTaken { .. } => "snapshot_taken",
            Event::SnapshotStored { .. } => "snapshot_stored",
            Event::SnapshotCorrupt { .. } => "snapshot_corrupt",
            Event::BackupFailed { .. } => "backup_failed",
            Event::SnapshotForgotten { .. } => "snapshot_forgotten",
            Event::RestoreCompleted { .. } => "restore_completed",
            Event::AcmeAccountCreated { .. } => "acme_account_created",
            Event::CertOrderClaimed { .. } => "cert_order_claimed",
            Event::CertOrderPlaced { .. } => "cert_order_placed",
            Event::AcmeChallengeReady { .. } => "acme_challenge_ready",
            Event::CertIssued { .. } => "cert_issued",
            Event::CertOrderFailed { .. } => "cert_order_failed",
            Event::RestoreRequested { .. } => "restore_requested",
            Event::Account(e) => e.kind(),
            Event::NodeRemoved { .. } => "node_removed",
        }
    }

    /// All kinds, for validating `--kind` filters.
    pub const KINDS: &'static [&'static str] = &[
        "cluster_created",
        "node_joined",
        "node_left",
        "token_issued",
        "token_revoked",
        "service_created",
        "service_spec_changed",
        "service_removed",
        "placement_set",
        "authority_switched",
        "alarm_raised",
        "alarm_cleared",
        "reachability_changed",
        "handover_requested",
        "snapshot_taken",
        "snapshot_stored",
        "snapshot_corrupt",
        "backup_failed",
        "snapshot_forgotten",
        "restore_completed",
        "acme_account_created",
        "cert_order_claimed",
        "cert_order_placed",
        "acme_challenge_ready",
        "cert_issued",
        "cert_order_failed",
        "restore_requested",
        "activation_issued",
        "admin_activated",
        "user_created",
        "password_changed",
        "api_key_created",
        "api_key_revoked",
        "api_key_used",
        "node_removed",
    ];

    /// One human line describing the event.
    pub fn summary(&self) -> String {
        match self {
            Event::ClusterCreated { cluster_id, node, ca_pin } => format!(
                "cluster {cluster_id} created by node {} at {} (CA pin {})",
                node.id,
                node.addr,
                &ca_pin[..ca_pin.len().min(16)]
            ),
            Event::NodeJoined { node, token_id, .. } => {
                format!("node {} joined at {} using token {token_id}", node.id, node.addr)
            }
            Event::NodeLeft { node_id, reason } => format!("node {node_id} left: {reason}"),
            Event::TokenIssued { token_id, expires_at_ms, uses, .. } => {
                format!(
                    "token {token_id} issued for {uses} use(s), expires {}",
                    crate::format_ms(*expires_at_ms)
                )
            }
            Event::TokenRevoked { token_id } => format!("token {token_id} revoked"),
            Event::ServiceCreated { spec } => format!("service {} created ({})", spec.name, spec.describe()),
            Event::ServiceSpecChanged { spec } => {
                format!("service {} spec changed ({})", spec.name, spec.describe())
            }
            Event::ServiceRemoved { name } => format!("service {name} removed"),
            Event::PlacementSet { service, placement } => {
                format!("service {service} placed: {}", placement.describe())
            }
            Event::AuthoritySwitched { service, to, reason, not_before_ms, cause } => {
                let how = match cause {
                    SwitchCause::Failover => "failover",
                    SwitchCause::Instruction => "instructed",
                    SwitchCause::Handover => "handover",
                    SwitchCause::HandoverOverdue => "handover, overdue",
                };
                let when = match not_before_ms {
                    0 => String::new(),
                    ms => format!(", not before {}", crate::format_ms(*ms)),
                };
                format!("service {service} authority to node {to} ({how}{when}): {reason}")
            }
            Event::AlarmRaised { key, message, .. } => format!("alarm {key}: {message}"),
            Event::AlarmCleared { alarm_id, reason } => format!("alarm {alarm_id} cleared: {reason}"),
            Event::ReachabilityChanged { observer, subject, reachable } => {
                let now = if *reachable { "reachable again" } else { "unreachable" };
                format!("node {observer} sees {subject} {now}")
            }
            Event::HandoverRequested { service, to, reason } => {
                format!("service {service}: handover to node {to} requested ({reason}); the master dumps and stops first")
            }
            Event::SnapshotTaken {
                service,
                snapshot,
                node,
                epoch,
                kind,
                consistency,
                bytes,
                new_bytes,
                ..
            } => {
                format!(
                    "service {service}: snapshot {} taken by node {node} at epoch {epoch} ({}, {}): {}, {} new",
                    short_id(snapshot),
                    kind.name(),
                    consistency.name(),
                    crate::spec::human_bytes(*bytes),
                    crate::spec::human_bytes(*new_bytes)
                )
            }
            Event::SnapshotStored { service, snapshot, node } => {
                format!("service {service}: snapshot {} stored on node {node}", short_id(snapshot))
            }
            Event::SnapshotCorrupt { service, snapshot, node, reason } => {
                format!("service {service}: snapshot {} corrupt on node {node}: {reason}", short_id(snapshot))
            }
            Event::BackupFailed { service, snapshot, node, reason } => match snapshot {
                Some(id) => format!(
                    "service {service}: backup of snapshot {} failed on node {node}: {reason}",
                    short_id(id)
                ),
                None => format!("service {service}: backup failed on node {node}: {reason}"),
            },
            Event::SnapshotForgotten { service, snapshot } => {
                format!("service {service}: snapshot {} forgotten", short_id(snapshot))
            }
            Event::RestoreCompleted { service, snapshot, node, epoch } => match snapshot {
                Some(id) => format!(
                    "service {service}: node {node} restored snapshot {} at epoch {epoch}",
                    short_id(id)
                ),
                None => format!("service {service}: node {node} starts with no snapshot at epoch {epoch}"),
            },
            Event::AcmeAccountCreated { directory, account_url, .. } => {
                format!("ACME account {account_url} created at {directory}")
            }
            Event::CertOrderClaimed { name, node } => format!("certificate of {name}: node {node} orders it"),
            Event::CertOrderPlaced { name, node, order_url, .. } => {
                format!("certificate of {name}: node {node} placed order {order_url}")
            }
            Event::AcmeChallengeReady { name, token, .. } => {
                format!("certificate of {name}: challenge {token} answered by every node")
            }
            Event::CertIssued { name, issuer, not_after_ms, .. } => format!(
                "certificate of {name} issued by {issuer}, valid until {}",
                crate::format_ms(*not_after_ms)
            ),
            Event::CertOrderFailed { name, node, reason } => {
                format!("certificate of {name}: the order by node {node} failed: {reason}")
            }
            Event::RestoreRequested { service, snapshot, reason } => {
                format!("service {service}: roll its data back to snapshot {} ({reason})", short_id(snapshot))
            }
            Event::Account(e) => e.summary(),
            Event::NodeRemoved { node_id, reason, forced } => {
                let how = if *forced { "removed by force" } else { "removed" };
                format!("node {node_id} {how}: {reason}")
            }
        }
    }

    /// The event without its sealed secrets (keys and account credentials), for showing outside the
    /// node: sealed as they are, they still have no business in a terminal or a browser.
    pub fn redacted(&self) -> Event {
        let mut event = self.clone();
        match &mut event {
            Event::AcmeAccountCreated { credentials_sealed, .. } => credentials_sealed.clear(),
            Event::CertOrderPlaced { key_sealed, .. } | Event::CertIssued { key_sealed, .. } => {
                key_sealed.clear()
            }
            Event::Account(a) => a.redact(),
            _ => {}
        }
        event
    }
}

/// The first 12 characters of a snapshot id, as people see it.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

impl Placement {
    pub fn describe(&self) -> String {
        let failover = self.failover.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        let backups: Vec<String> = self.backups.iter().map(|n| n.to_string()).collect();
        format!("master {} failover {} backups [{}]", self.master, failover, backups.join(","))
    }

    /// Every node named, master first.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        std::iter::once(self.master).chain(self.failover).chain(self.backups.iter().copied())
    }
}

/// What a proposer submits to the log: the event, with the proposer's clock and identity.
///
/// Time arrives here, from outside, so that applying stays pure: every replica sees the same `at_ms`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(into = "VersionedProposal", from = "VersionedProposal")]
pub struct Proposal {
    /// Proposer's wall clock, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who asked: `node:2`, `cli@node:1`, `monitor@node:3`, ...
    pub actor: String,
    pub event: Event,
}

/// The on-disk form of a [`Proposal`]; see [`FORMAT_VERSION`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum VersionedProposal {
    V1 { at_ms: u64, actor: String, event: Event },
}

impl From<Proposal> for VersionedProposal {
    fn from(p: Proposal) -> Self {
        VersionedProposal::V1 { at_ms: p.at_ms, actor: p.actor, event: p.event }
    }
}

impl From<VersionedProposal> for Proposal {
    fn from(v: VersionedProposal) -> Self {
        match v {
            VersionedProposal::V1 { at_ms, actor, event } => Proposal { at_ms, actor, event },
        }
    }
}

/// A proposal as committed: the log position it was committed at, around it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub index: LogIndex,
    pub term: Term,
    pub at_ms: u64,
    pub actor: String,
    pub event: Event,
}

impl Envelope {
    pub fn new(index: LogIndex, term: Term, proposal: Proposal) -> Self {
        Envelope { index, term, at_ms: proposal.at_ms, actor: proposal.actor, event: proposal.event }
    }
}

/// Encode a value with the project's bincode configuration.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain data structures into a Vec cannot fail: no I/O, no size limit, no non-string
    // map keys in our types.
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("bincode encoding of coyote state into memory cannot fail")
}

/// Decode a value encoded by [`encode`]; trailing bytes are an error.
///
/// bincode allocates the length a string or byte vector claims before it reads its bytes, so without a
/// limit a few bytes claiming an exabyte abort the process. The limit here grows with the input: bincode
/// counts each value it reads at its size in memory, at most 16 times its encoded size, so every
/// valid input stays under 16 times its length, and a claim beyond that is an error.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, crate::Error> {
    fn limited<T: serde::de::DeserializeOwned, const LIMIT: usize>(
        bytes: &[u8],
    ) -> Result<(T, usize), bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<LIMIT>())
    }
    let need = bytes.len().saturating_mul(16);
    macro_rules! ladder {
        ($($shift:literal)*) => {
            $(if need <= 1usize << $shift { limited::<T, { 1usize << $shift }>(bytes) } else)*
            { limited::<T, { usize::MAX }>(bytes) }
        };
    }
    let (value, read) =
        ladder!(16 18 20 22 24 26 28 30 32 34 36).map_err(|e| crate::Error::Decode(e.to_string()))?;
    if read != bytes.len() {
        return Err(crate::Error::Decode(format!("{} trailing bytes", bytes.len() - read)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A string that claims 2^60 bytes: before the limit, bincode allocated them and the process
    /// aborted ("memory allocation failed"); every bincode target reaches it.
    #[test]
    fn a_huge_claimed_length_is_an_error_not_an_allocation() {
        let mut claim = vec![0xfd];
        claim.extend((1u64 << 60).to_le_bytes());
        assert!(matches!(decode::<String>(&claim), Err(crate::Error::Decode(_))));
        // In a proposal: `at_ms`, then the actor's length.
        let mut proposal = vec![0, 7];
        proposal.extend(&claim);
        assert!(matches!(decode::<Proposal>(&proposal), Err(crate::Error::Decode(_))));
    }

    #[test]
    fn the_limit_keeps_every_valid_input() {
        let big = Proposal {
            at_ms: u64::MAX,
            actor: "a".repeat(100_000),
            event: Event::AlarmCleared { alarm_id: u64::MAX, reason: "r".repeat(70_000) },
        };
        assert_eq!(decode::<Proposal>(&encode(&big)).unwrap(), big);
        let ids: Vec<u64> = vec![1; 50_000];
        assert_eq!(decode::<Vec<u64>>(&encode(&ids)).unwrap(), ids);
    }
}
