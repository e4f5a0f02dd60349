//! The seed inputs of the corpus: small valid inputs of each target, made with the project's own
//! encoders (`cargo test -p coyote-fuzz -- --ignored write_seeds` writes them to `corpus/`).

use std::collections::{BTreeMap, BTreeSet};

use coyote_log::fuzzing;
use coyote_log::tls::{ClusterCa, NodeKey};
use coyote_log::types::{Batch, Entry, LogId, TypeConfig};
use coyote_log::{pb, JoinToken, ProposeError, Proposed};
use coyote_state_machine::{
    encode, sha256_hex, Envelope, Event, Outcome, Placement, PortMap, Proposal, ServiceSpec, Subject,
    SwitchCause, ZoneCheck,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, EntryPayload, Membership, SnapshotMeta, StoredMembership, Vote,
};
use prost::Message;

use crate::{node_info, AT_MS, SERVICE};

/// One seed: its target, its file name and its bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Seed {
    Seed { target, name: format!("seed-{}", name.into()), bytes: bytes.into() }
}

/// The events that make the base state of the targets: a cluster of three nodes, one service.
pub fn base_events() -> Vec<Event> {
    let secret = sha256_hex(b"secret");
    let joined =
        |id| Event::NodeJoined { node: node_info(id), token_id: "t1".into(), secret_sha256: secret.clone() };
    vec![
        Event::ClusterCreated { cluster_id: "fuzz".into(), node: node_info(1), ca_pin: "a".repeat(64) },
        Event::TokenIssued {
            token_id: "t1".into(),
            secret_sha256: secret.clone(),
            expires_at_ms: AT_MS + 3_600_000,
            uses: 5,
        },
        joined(2),
        joined(3),
        Event::ServiceCreated { spec: full_spec() },
    ]
}

/// A spec with every field set.
pub fn full_spec() -> ServiceSpec {
    ServiceSpec {
        name: SERVICE.into(),
        image: "nginx:1.27".into(),
        domains: vec!["www.example.com".into()],
        ports: vec![PortMap { host: 8080, container: 80 }],
        memory_bytes: Some(256 << 20),
        on_demand: true,
        dump: Some(vec!["pg_dump".into(), "-U".into(), "postgres".into()]),
        http_check: Some("/healthz".into()),
        zone: Some(ZoneCheck { zone: "example.com.".into(), nameservers: vec!["127.0.0.1:5353".into()] }),
        http_port: Some(8080),
        tls_passthrough: true,
        keep: None,
    }
}

fn minimal_spec() -> ServiceSpec {
    ServiceSpec {
        name: "db".into(),
        image: "postgres".into(),
        domains: vec![],
        ports: vec![],
        memory_bytes: None,
        on_demand: false,
        dump: None,
        http_check: None,
        zone: None,
        http_port: None,
        tls_passthrough: false,
        keep: None,
    }
}

/// One event of every kind, each valid against the base state where it can be.
pub fn sample_events() -> Vec<Event> {
    vec![
        Event::ClusterCreated { cluster_id: "c".into(), node: node_info(1), ca_pin: "b".repeat(64) },
        Event::NodeJoined { node: node_info(4), token_id: "t1".into(), secret_sha256: sha256_hex(b"secret") },
        Event::NodeLeft { node_id: 3, reason: "retired".into() },
        Event::TokenIssued {
            token_id: "t2".into(),
            secret_sha256: sha256_hex(b"x"),
            expires_at_ms: AT_MS + 1000,
            uses: 1,
        },
        Event::TokenRevoked { token_id: "t1".into() },
        Event::ServiceCreated { spec: minimal_spec() },
        Event::ServiceSpecChanged { spec: ServiceSpec { on_demand: false, dump: None, ..full_spec() } },
        Event::ServiceRemoved { name: SERVICE.into() },
        Event::PlacementSet {
            service: SERVICE.into(),
            placement: Placement { master: 1, failover: Some(2), backups: vec![3] },
        },
        Event::AuthoritySwitched {
            service: SERVICE.into(),
            to: 2,
            reason: "fuzz".into(),
            not_before_ms: AT_MS,
            cause: SwitchCause::Failover,
        },
        Event::AlarmRaised { key: "disk".into(), node: Some(1), service: None, message: "full".into() },
        Event::AlarmCleared { alarm_id: 1, reason: "gone".into() },
        Event::ReachabilityChanged { observer: 2, subject: Subject::Node(1), reachable: false },
        Event::ReachabilityChanged {
            observer: 2,
            subject: Subject::Service(SERVICE.into()),
            reachable: false,
        },
        Event::HandoverRequested { service: SERVICE.into(), to: 2, reason: "fuzz".into() },
        Event::NodeRemoved { node_id: 3, reason: "gone".into(), forced: true },
    ]
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn membership() -> Membership<u64, BasicNode> {
    let nodes: BTreeMap<u64, BasicNode> =
        (1..=3).map(|id| (id, BasicNode::new(node_info(id).addr))).collect();
    Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes)
}

fn proposal(event: Event) -> Proposal {
    Proposal { at_ms: AT_MS, actor: "cli@node:1".into(), event }
}

/// A few entries of every payload kind.
pub fn sample_entries() -> Vec<Entry> {
    vec![
        Entry { log_id: log_id(1, 1), payload: EntryPayload::Blank },
        Entry { log_id: log_id(1, 2), payload: EntryPayload::Membership(membership()) },
        Entry {
            log_id: log_id(1, 3),
            payload: EntryPayload::Normal(Batch(vec![proposal(Event::AlarmRaised {
                key: "k".into(),
                node: None,
                service: None,
                message: "m".into(),
            })])),
        },
    ]
}

fn meta() -> SnapshotMeta<u64, BasicNode> {
    SnapshotMeta {
        last_log_id: Some(log_id(1, 3)),
        last_membership: StoredMembership::new(Some(log_id(1, 2)), membership()),
        snapshot_id: "1-3-1".into(),
    }
}

fn tagged(tag: u8, payload: Vec<u8>) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(payload);
    out
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();

    // manifest
    {
        use coyote_data::{Attrs, ChunkId, ChunkRef, Entry, EntryKind, Manifest, Timestamp};
        let attrs =
            |mode| Attrs { mode, uid: 1000, gid: 1000, mtime: Timestamp { secs: 1_700_000_000, nanos: 5 } };
        let entries = vec![
            Entry { path: b"db".to_vec(), kind: EntryKind::Dir, attrs: attrs(0o755) },
            Entry {
                path: b"db/data".to_vec(),
                kind: EntryKind::File {
                    size: 70_000,
                    chunks: vec![
                        ChunkRef { id: ChunkId::of(b"one"), len: 65_536 },
                        ChunkRef { id: ChunkId::of(b"two"), len: 4_464 },
                    ],
                },
                attrs: attrs(0o600),
            },
            Entry {
                path: b"link".to_vec(),
                kind: EntryKind::Symlink { target: b"db/data".to_vec() },
                attrs: attrs(0o777),
            },
        ];
        let manifest = Manifest::new(attrs(0o755), entries).expect("a valid manifest");
        out.push(seed("manifest", "tree", manifest.encode().expect("encodes")));
        let empty = Manifest::new(attrs(0o700), Vec::new()).expect("a valid manifest");
        out.push(seed("manifest", "empty", empty.encode().expect("encodes")));
    }

    // join_token
    let token = JoinToken {
        addr: "127.0.0.1:7001".into(),
        ca_pin: "0123456789abcdef".repeat(4),
        id: "a1b2c3d4e5f6".into(),
        secret: "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I".into(),
    };
    out.push(seed("join_token", "token", token.encode()));
    out.push(seed("join_token", "token-spaces", format!("  {}\n", token.encode())));
    out.push(seed("join_token", "empty-object", "cyt1_e30"));

    // api_body
    out.push(seed("api_body", "spec-full", serde_json::to_vec(&full_spec()).expect("json")));
    out.push(seed("api_body", "spec-minimal", serde_json::to_vec(&minimal_spec()).expect("json")));
    out.push(seed("api_body", "token-create", r#"{"ttl_ms":3600000,"uses":1}"#));
    out.push(seed("api_body", "switch", r#"{"to":2,"now":true}"#));
    out.push(seed("api_body", "alarm", r#"{"key":"disk","message":"full","node":1,"service":"web"}"#));

    // spec_text
    for (name, text) in [
        ("port-map", "8080:80"),
        ("port", "25"),
        ("size", "256MiB"),
        ("name", "web-1"),
        ("path", "/healthz?x=1"),
        ("nameserver", "ns1.example.com:53"),
        ("dump", "pg_dump\0-U\0postgres"),
        ("zone", "example.com.\x00127.0.0.1:5353\x00[::1]:53"),
    ] {
        out.push(seed("spec_text", name, text));
    }

    // proposal
    for (n, event) in sample_events().into_iter().enumerate() {
        out.push(seed("proposal", format!("{n:02}-{}", event.kind()), encode(&proposal(event))));
    }
    out.push(seed("proposal", "batch", encode(&Batch(vec![proposal(sample_events()[10].clone())]))));

    // raft_rpc
    let vote = Vote::new_committed(1, 1);
    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: Some(log_id(1, 0)),
        entries: sample_entries(),
        leader_commit: Some(log_id(1, 1)),
    };
    out.push(seed("raft_rpc", "append-entries", tagged(0, encode(&append))));
    out.push(seed(
        "raft_rpc",
        "vote",
        tagged(1, encode(&VoteRequest::new(Vote::new(2, 2), Some(log_id(1, 3))))),
    ));
    let install = InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: meta(),
        offset: 0,
        data: vec![1, 2, 3],
        done: true,
    };
    out.push(seed("raft_rpc", "install-snapshot", tagged(2, encode(&install))));
    let ok_append: Result<AppendEntriesResponse<u64>, openraft::error::RaftError<u64>> =
        Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(1, 2))));
    out.push(seed("raft_rpc", "append-answer", tagged(3, encode(&ok_append))));
    let ok_vote: Result<VoteResponse<u64>, openraft::error::RaftError<u64>> =
        Ok(VoteResponse::new(vote, Some(log_id(1, 3)), true));
    out.push(seed("raft_rpc", "vote-answer", tagged(4, encode(&ok_vote))));
    let ok_install: Result<
        InstallSnapshotResponse<u64>,
        openraft::error::RaftError<u64, openraft::error::InstallSnapshotError>,
    > = Ok(InstallSnapshotResponse { vote });
    out.push(seed("raft_rpc", "install-answer", tagged(5, encode(&ok_install))));
    let proposed: Result<Proposed, ProposeError> =
        Ok(Proposed { index: 7, log_index: 9, outcome: Outcome::Rejected { reason: "no".into() } });
    out.push(seed("raft_rpc", "propose-answer", tagged(6, encode(&proposed))));
    let refused: Result<Proposed, ProposeError> = Err(ProposeError::Rejected("no such service".into()));
    out.push(seed("raft_rpc", "propose-refused", tagged(6, encode(&refused))));
    let confirmed: Result<u64, ProposeError> = Ok(12);
    out.push(seed("raft_rpc", "confirm-answer", tagged(7, encode(&confirmed))));
    out.push(seed("raft_rpc", "ping-answer", tagged(8, encode(&3u64))));

    // join
    let key = NodeKey::generate().expect("a node key");
    let request = pb::JoinRequest {
        token_id: "a1b2c3d4e5f6".into(),
        secret: "secret".into(),
        addr: "127.0.0.1:7002".into(),
        csr_pem: key.csr_pem.clone(),
    };
    out.push(seed("join", "request", request.encode_to_vec()));
    let ca = ClusterCa::generate("seed").expect("a CA");
    let response = pb::JoinResponse {
        node_id: 2,
        cluster_id: "seed".into(),
        node_cert_pem: ca.sign_node(&key.csr_pem, 2).expect("signed"),
        ca_cert_pem: ca.cert_pem().into(),
        ca_key_pem: String::new(),
    };
    out.push(seed("join", "response", response.encode_to_vec()));

    // file_log
    let segments = fuzzing::sample_segments(&sample_entries());
    out.push(seed(
        "file_log",
        "raw-two-segments",
        tagged(0, segments.iter().flat_map(|s| s.1.clone()).collect()),
    ));
    let one = fuzzing::sample_segments(&sample_entries()[..1]);
    out.push(seed("file_log", "raw-one-entry", tagged(0, one.iter().flat_map(|s| s.1.clone()).collect())));
    let records: Vec<Vec<u8>> = vec![
        tagged(1, encode(&Vote::new(1, 1))),
        tagged(0, encode(&sample_entries()[0])),
        tagged(0, encode(&sample_entries()[2])),
        tagged(2, encode(&Some(log_id(1, 1)))),
        tagged(4, encode(&3u64)),
        tagged(3, encode(&log_id(1, 1))),
    ];
    let chunks: Vec<u8> = records
        .iter()
        .flat_map(|r| {
            let mut c = vec![u8::try_from(r.len()).expect("a small record")];
            c.extend(r);
            c
        })
        .collect();
    out.push(seed("file_log", "framed", tagged(1, chunks.clone())));
    out.push(seed("file_log", "framed-two-segments", tagged(3, chunks)));

    // snapshot
    let state = crate::base_state().clone();
    let archive: Vec<coyote_log::store::EventRecord> = base_events()
        .into_iter()
        .enumerate()
        .map(|(n, event)| coyote_log::store::EventRecord {
            envelope: Envelope::new(n as u64 + 1, 1, Proposal { at_ms: AT_MS, actor: "fuzz".into(), event }),
            outcome: Outcome::Applied,
        })
        .collect();
    let stored = StoredMembership::new(Some(log_id(1, 2)), membership());
    out.push(seed(
        "snapshot",
        "base",
        fuzzing::encode_snapshot(Some(log_id(1, 5)), stored.clone(), state, archive.clone()),
    ));
    out.push(seed(
        "snapshot",
        "empty",
        fuzzing::encode_snapshot(None, stored, coyote_state_machine::State::default(), vec![]),
    ));

    // store_record
    let keyed = |kind: u8, key: u64, value: Vec<u8>| {
        let mut b = vec![kind];
        b.extend(key.to_be_bytes());
        b.extend(value);
        b
    };
    out.push(seed("store_record", "event", keyed(0, 1, encode(&archive[0]))));
    out.push(seed("store_record", "service-event", keyed(0, 5, encode(&archive[4]))));
    out.push(seed("store_record", "snapshot-meta", keyed(1, 0, encode(&meta()))));
    out.push(seed("store_record", "vote", keyed(2, 0, encode(&vote))));
    out.push(seed("store_record", "committed", keyed(3, 0, encode(&Some(log_id(1, 3))))));
    out.push(seed("store_record", "purged", keyed(4, 0, encode(&log_id(1, 2)))));
    out.push(seed("store_record", "entry", keyed(5, 0, encode(&sample_entries()[1]))));
    out
}
