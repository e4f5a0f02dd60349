//! Fuzz targets: one pure function per decoder that reads what comes from outside the process.
//!
//! Each target takes any bytes and must return normally: a decoder may refuse its input with an
//! error, never panic or abort. The AFL++ binary (`src/bin/afl.rs`, feature `afl`) runs one target by
//! name; the test `tests/short_run.rs` runs every corpus file and a short seeded mutation run of every
//! target. See `README.md`.

use std::sync::OnceLock;

use coyote_log::fuzzing;
use coyote_log::tls::ClusterCa;
use coyote_log::types::{Batch, TypeConfig};
use coyote_log::{pb, JoinToken, ProposeError, Proposed};
use coyote_nodes::wire::{AlarmRaise, SwitchRequest, TokenCreate};
use coyote_state_machine::{
    decode, spec, Envelope, Event, NodeInfo, Proposal, ServiceSpec, State, SwitchCause,
};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::EntryPayload;
use prost::Message;

pub mod seeds;

/// A fuzz target.
pub type Target = fn(&[u8]);

/// Every target, by name (the name of its corpus directory, `corpus/<name>/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("join_token", join_token),
    ("api_body", api_body),
    ("spec_text", spec_text),
    ("proposal", proposal),
    ("raft_rpc", raft_rpc),
    ("join", join),
    ("file_log", file_log),
    ("snapshot", snapshot),
    ("store_record", store_record),
    ("manifest", manifest),
];

/// The target named `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
}

/// Join tokens, as `coyote join` reads them from the command line: [`JoinToken::parse`].
pub fn join_token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(token) = JoinToken::parse(&text) {
        let _ = token.secret_sha256();
        let again = JoinToken::parse(&token.encode()).expect("a parsed token parses again");
        assert_eq!(again, token, "a parsed token round-trips");
    }
}

/// The JSON bodies of the node's local API (`nodes/src/api.rs`): the same bytes as a
/// [`ServiceSpec`] (create and update), a [`TokenCreate`], a [`SwitchRequest`] and an
/// [`AlarmRaise`]; each body that decodes becomes the event the API proposes, validated and applied
/// to a small cluster's state as the log would.
pub fn api_body(data: &[u8]) {
    if let Ok(spec) = serde_json::from_slice::<ServiceSpec>(data) {
        let valid = spec.validate().is_ok();
        let _ = (spec.hash(), spec.describe());
        if valid {
            let back: ServiceSpec = decode(&coyote_state_machine::encode(&spec)).expect("a spec round-trips");
            assert_eq!(back, spec, "a valid spec round-trips through bincode");
        }
        propose(Event::ServiceCreated { spec: spec.clone() });
        propose(Event::ServiceSpecChanged { spec });
    }
    if let Ok(req) = serde_json::from_slice::<TokenCreate>(data) {
        // The API refuses other lifetimes before it adds one to the clock.
        if req.ttl_ms > 0 && req.ttl_ms <= coyote_nodes::api::TOKEN_TTL_MAX_MS {
            propose(Event::TokenIssued {
                token_id: "fuzz".into(),
                secret_sha256: coyote_state_machine::sha256_hex(b"fuzz"),
                expires_at_ms: AT_MS + req.ttl_ms,
                uses: req.uses,
            });
        }
    }
    if let Ok(req) = serde_json::from_slice::<SwitchRequest>(data) {
        let service = SERVICE.to_string();
        propose(Event::HandoverRequested { service: service.clone(), to: req.to, reason: "fuzz".into() });
        propose(Event::AuthoritySwitched {
            service,
            to: req.to,
            reason: "fuzz".into(),
            not_before_ms: AT_MS,
            cause: SwitchCause::Instruction,
        });
    }
    if let Ok(req) = serde_json::from_slice::<AlarmRaise>(data) {
        propose(Event::AlarmRaised {
            key: req.key,
            node: req.node,
            service: req.service,
            message: req.message,
        });
    }
}

/// The spec parsers that take user text (`coyote service create` flags): the input as one line for
/// each of them, and split on NUL bytes as a dump command's argv.
pub fn spec_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = spec::parse_port(&text);
    if let Ok(n) = spec::parse_bytes(&text) {
        assert_eq!(spec::parse_bytes(&spec::format_bytes(n)), Ok(n), "a size round-trips");
    }
    let _ = spec::validate_name(&text);
    let _ = spec::validate_http_path(&text);
    let _ = spec::nameserver_addr(&text);
    let argv: Vec<String> = text.split('\0').map(str::to_string).collect();
    let _ = spec::validate_dump(&argv);
    let _ = spec::format_argv(&argv);
    let zone = spec::ZoneCheck { zone: argv[0].clone(), nameservers: argv[1..].to_vec() };
    let _ = spec::validate_zone(&zone);
}

/// A forwarded proposal (the `Propose` RPC): bincode into a [`Proposal`], then validated and applied
/// to a small cluster's state, as the leader does.
pub fn proposal(data: &[u8]) {
    if let Ok(p) = decode::<Proposal>(data) {
        apply(&p);
    }
    if let Ok(batch) = decode::<Batch>(data) {
        for p in &batch.0 {
            apply(p);
        }
    }
}

/// The Raft RPCs between members (`log/src/network.rs`) and the answers to the calls a member makes
/// (`log/src/cluster.rs`): the first byte picks the type, the rest is the bincode payload. The
/// proposals of a decoded AppendEntries are applied as a follower would once they are committed.
pub fn raft_rpc(data: &[u8]) {
    let Some((&kind, payload)) = data.split_first() else { return };
    match kind % 9 {
        0 => {
            if let Ok(rpc) = decode::<AppendEntriesRequest<TypeConfig>>(payload) {
                for entry in &rpc.entries {
                    if let EntryPayload::Normal(batch) = &entry.payload {
                        batch.0.iter().for_each(apply);
                    }
                }
            }
        }
        1 => drop(decode::<VoteRequest<u64>>(payload)),
        2 => drop(decode::<InstallSnapshotRequest<TypeConfig>>(payload)),
        3 => drop(decode::<Result<AppendEntriesResponse<u64>, RaftError<u64>>>(payload)),
        4 => drop(decode::<Result<VoteResponse<u64>, RaftError<u64>>>(payload)),
        5 => drop(decode::<Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>>(
            payload,
        )),
        6 => drop(decode::<Result<Proposed, ProposeError>>(payload)),
        7 => drop(decode::<Result<u64, ProposeError>>(payload)),
        _ => drop(decode::<u64>(payload)),
    }
}

/// The join path (`log/src/cluster.rs`): the bytes as a protobuf `JoinRequest`, whose CSR the leader
/// signs, and as a `JoinResponse`, whose certificates the joining server reads.
pub fn join(data: &[u8]) {
    if let Ok(req) = pb::JoinRequest::decode(data) {
        let _ = fuzz_ca().sign_node(&req.csr_pem, 7);
    }
    if let Ok(resp) = pb::JoinResponse::decode(data) {
        let _ = coyote_log::tls::pin_of_pem(&resp.ca_cert_pem);
        let _ = coyote_log::tls::node_id_of_pem(&resp.node_cert_pem);
    }
}

/// The on-disk Raft log (`log/src/filelog.rs`), opened over segments in memory and read back whole.
///
/// The first byte picks how the rest becomes segments. Even: raw bytes, cut into one segment at each
/// segment magic (the segments of a real log, concatenated, come back as they were). Odd: a segment
/// header, then records framed with valid CRCs, so that mutations reach the record decoder: the rest
/// is a sequence of `[len: u8][len bytes]` chunks, each one record, a cut last chunk left as a torn
/// tail; with bit 1 set, the records are spread over two segments.
pub fn file_log(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let segments = if mode & 1 == 0 {
        split_segments(rest)
    } else {
        let mut chunks = Vec::new();
        let mut torn: &[u8] = &[];
        let mut at = rest;
        while let Some((&len, tail)) = at.split_first() {
            if tail.len() < len as usize {
                torn = tail;
                break;
            }
            chunks.push(&tail[..len as usize]);
            at = &tail[len as usize..];
        }
        let two = mode & 2 != 0 && chunks.len() > 1;
        let cut = if two { chunks.len() / 2 } else { chunks.len() };
        let mut first = fuzzing::segment_header(1);
        chunks[..cut].iter().for_each(|c| first.extend(fuzzing::frame(c)));
        let mut segments = vec![(1, first)];
        if two {
            let mut second = fuzzing::segment_header(2);
            chunks[cut..].iter().for_each(|c| second.extend(fuzzing::frame(c)));
            segments.push((2, second));
        }
        segments.last_mut().expect("a segment").1.extend_from_slice(torn);
        segments
    };
    let _ = fuzzing::open_file_log(segments);
}

/// The segment magic, which starts every segment.
const SEGMENT_MAGIC: &[u8] = b"coyote-raft-log\n";

/// Cuts `bytes` before each segment magic (after the first byte); segment `n` gets sequence number `n`.
fn split_segments(bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut starts: Vec<usize> =
        (1..bytes.len()).filter(|&i| bytes[i..].starts_with(SEGMENT_MAGIC)).collect();
    starts.insert(0, 0);
    starts.push(bytes.len());
    starts.windows(2).enumerate().map(|(n, w)| (n as u64 + 1, bytes[w[0]..w[1]].to_vec())).collect()
}

/// Snapshot data, as a node reads a received snapshot or its saved one (`SnapshotBody::decode` and
/// its check in `log/src/store/snapshot.rs`).
pub fn snapshot(data: &[u8]) {
    let _ = fuzzing::snapshot(None, data);
}

/// A snapshot's manifest, as a node reads one fetched from another node before it restores or
/// fetches its chunks (`coyote_data::Manifest::decode`): one that decodes must survive its own
/// encoding unchanged, and its paths must be safe to restore. (Its bytes need not be the canonical
/// encoding: a manifest is named by the hash of the bytes it was stored as.)
pub fn manifest(data: &[u8]) {
    let Ok(manifest) = coyote_data::Manifest::decode(data) else { return };
    let again = manifest.encode().expect("a decoded manifest encodes");
    let back = coyote_data::Manifest::decode(&again).expect("an encoded manifest decodes");
    assert!(back == manifest, "a manifest changed through its own encoding");
    for entry in manifest.entries() {
        let path = entry.path();
        assert!(
            path.components().all(|c| matches!(c, std::path::Component::Normal(_))),
            "a decoded manifest holds an unsafe path {path:?}"
        );
    }
}

/// The records the store reads from sled (`log/src/store/`): the first byte picks the kind
/// ([`fuzzing::STORE_RECORDS`]), the next 8 bytes are the key (for an archived event), the rest is
/// the value.
pub fn store_record(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let (key, value) = rest.split_at(rest.len().min(8));
    let _ = fuzzing::store_record(kind, key, value);
}

/// The clock reading of the proposals the targets apply.
pub const AT_MS: u64 = 1_795_610_452_123;
/// The service of the base state.
pub const SERVICE: &str = "web";

/// A cluster of three nodes with one service and one token, as the proposals apply to.
pub fn base_state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut state = State::default();
        for (n, event) in seeds::base_events().into_iter().enumerate() {
            let env = Envelope::new(n as u64 + 1, 1, Proposal { at_ms: AT_MS, actor: "fuzz".into(), event });
            let outcome = state.apply(&env).expect("the base state applies");
            assert_eq!(outcome, coyote_state_machine::Outcome::Applied, "base event {n}");
        }
        state
    })
}

/// Validates `proposal` against the base state and applies it, as the leader and then every replica
/// do. Rejections are fine; an `Err` from `apply` means the state broke an invariant, which stops a
/// node, so it counts as a crash.
fn apply(proposal: &Proposal) {
    let mut state = base_state().clone();
    let _ = state.validate(proposal);
    let env = Envelope::new(state.last_applied + 1, 1, proposal.clone());
    if let Err(e) = state.apply(&env) {
        panic!("applying {proposal:?} broke the state: {e}");
    }
}

fn propose(event: Event) {
    apply(&Proposal { at_ms: AT_MS, actor: "cli@node:1".into(), event });
}

/// The CA that signs the CSRs of the join target (made once per process).
fn fuzz_ca() -> &'static ClusterCa {
    static CA: OnceLock<ClusterCa> = OnceLock::new();
    CA.get_or_init(|| ClusterCa::generate("fuzz").expect("a CA"))
}

#[doc(hidden)]
pub fn node_info(id: u64) -> NodeInfo {
    NodeInfo { id, addr: format!("127.0.0.{id}:7001") }
}
