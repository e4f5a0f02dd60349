//! The snapshot: its encoding, its checks, and building, saving and installing it (see "Snapshots"
//! in the store's docs).

use coyote_state_machine::{encode, State};
use openraft::{SnapshotMeta, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::types::{LogId, Node, NodeId};

use super::*;

pub(super) const SNAPSHOT_META_KEY: &[u8] = b"meta";
pub(super) const SNAPSHOT_DATA_KEY: &[u8] = b"data";

/// Everything in a snapshot, as encoded in its data. Versioned like the proposals in the log, so that a
/// later coyote can still read the snapshots an earlier one wrote.
#[derive(Serialize, Deserialize)]
pub(super) enum SnapshotFile {
    /// Before graceful handovers: the state without them.
    V1(SnapshotBodyV1),
    /// Before the data ledger: the state without it.
    V2(SnapshotBodyV2),
    /// Before certificates: the state without them.
    V3(SnapshotBodyV3),
    /// Before accounts: the state alone.
    V4(Box<SnapshotBodyV4>),
    /// Boxed, as format 4: the largest (a box encodes as what it holds).
    V5(Box<SnapshotBody>),
}

#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotBodyV4 {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Node>,
    /// Encoded without its accounts (see `State::accounts`).
    state: State,
    archive: Vec<EventRecord>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotBodyV3 {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Node>,
    state: coyote_state_machine::StateV3,
    archive: Vec<EventRecord>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotBodyV2 {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Node>,
    state: coyote_state_machine::StateV2,
    archive: Vec<EventRecord>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotBodyV1 {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Node>,
    state: coyote_state_machine::StateV1,
    archive: Vec<EventRecord>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotBody {
    pub(crate) last_applied: Option<LogId>,
    pub(crate) last_membership: StoredMembership<NodeId, Node>,
    pub(crate) state: State,
    pub(crate) archive: Vec<EventRecord>,
    /// `state.accounts`, which the state's own encoding leaves out.
    pub(crate) accounts: coyote_state_machine::Accounts,
}

impl SnapshotBody {
    pub(crate) fn decode(data: &[u8], what: &str) -> Result<Self, StoreError> {
        Ok(match decode_from_disk(data, || what.to_string())? {
            SnapshotFile::V1(b) => SnapshotBody {
                last_applied: b.last_applied,
                last_membership: b.last_membership,
                state: b.state.into(),
                archive: b.archive,
                accounts: Default::default(),
            },
            SnapshotFile::V2(b) => SnapshotBody {
                last_applied: b.last_applied,
                last_membership: b.last_membership,
                state: b.state.into(),
                archive: b.archive,
                accounts: Default::default(),
            },
            SnapshotFile::V3(b) => SnapshotBody {
                last_applied: b.last_applied,
                last_membership: b.last_membership,
                state: b.state.into(),
                archive: b.archive,
                accounts: Default::default(),
            },
            SnapshotFile::V4(b) => SnapshotBody {
                last_applied: b.last_applied,
                last_membership: b.last_membership,
                state: b.state,
                archive: b.archive,
                accounts: Default::default(),
            },
            SnapshotFile::V5(mut body) => {
                body.state.accounts = std::mem::take(&mut body.accounts);
                *body
            }
        })
    }

    /// The body as a snapshot's data.
    pub(crate) fn encode(self) -> Vec<u8> {
        let mut body = self;
        body.accounts = std::mem::take(&mut body.state.accounts);
        encode(&SnapshotFile::V5(Box::new(body)))
    }

    /// Checks the body against its metadata and against itself.
    pub(crate) fn check(&self, meta: &Meta, what: &str) -> Result<(), StoreError> {
        let bad = |reason: String| Err(inconsistent(what, reason));
        if self.last_applied != meta.last_log_id {
            return bad(format!(
                "its data ends at {:?} but its metadata says {:?}",
                self.last_applied, meta.last_log_id
            ));
        }
        if self.last_membership != meta.last_membership {
            return bad("its data and its metadata name different memberships".into());
        }
        let Some(expected) = self.state.applied_count.checked_add(self.state.rejected_count) else {
            return bad("its state counts more events than a u64 holds".into());
        };
        if self.archive.len() as u64 != expected {
            return bad(format!("it archives {} events, its state counts {expected}", self.archive.len()));
        }
        for (position, record) in self.archive.iter().enumerate() {
            if record.envelope.index != position as u64 + 1 {
                return bad(format!(
                    "its archive holds event {} where event {} belongs",
                    record.envelope.index,
                    position + 1
                ));
            }
        }
        if self.state.last_applied != self.archive.len() as u64 {
            return bad(format!(
                "its state has applied {} events, its archive holds {}",
                self.state.last_applied,
                self.archive.len()
            ));
        }
        Ok(())
    }
}

impl Shared {
    /// The persisted snapshot: its metadata and its data, both checked.
    pub(super) fn read_snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
        let meta = self.snapshot.get(SNAPSHOT_META_KEY).map_err(io("read the snapshot"))?;
        let data = self.snapshot.get(SNAPSHOT_DATA_KEY).map_err(io("read the snapshot"))?;
        match (meta, data) {
            (None, None) => Ok(None),
            (Some(meta), Some(data)) => {
                let meta = decode_from_disk(&meta, || "the saved snapshot's metadata".to_string())?;
                Ok(Some((meta, data.to_vec())))
            }
            _ => Err(inconsistent("the saved snapshot", "its metadata or its data is missing")),
        }
    }

    /// Writes a snapshot (metadata and data in one batch); the caller flushes.
    pub(super) fn write_snapshot(&self, meta: &Meta, data: &[u8]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META_KEY, encode(meta));
        batch.insert(SNAPSHOT_DATA_KEY, data);
        self.snapshot.apply_batch(batch).map_err(io("write the snapshot"))
    }

    /// Builds a snapshot of the state as it is now and persists it durably. Blocking.
    pub(super) fn build_snapshot(&self) -> Result<(Meta, Vec<u8>), StoreError> {
        let (state, last_applied, last_membership) = {
            let mut machine = self.write_machine();
            // The snapshot lets openraft purge the log behind it: from then on its events are only
            // in the archive, which the flush below makes durable.
            self.archive_unarchived(&mut machine)?;
            (machine.state.clone(), machine.last_applied, machine.membership.clone())
        };
        // Records up to the state's last event never change once written (only installing a snapshot rewrites
        // them, with the same committed contents, and that waits for the snapshot lock we hold), so
        // reading them after releasing the state lock still gives the archive of this state.
        let archive = self.read_events(1, state.last_applied, usize::MAX, &[])?;
        // A snapshot id only has to be unique; sled's id generator survives restarts.
        let seq = self.db.generate_id().map_err(io("generate a snapshot id"))?;
        let snapshot_id = match last_applied {
            Some(last) => format!("{}-{}-{seq}", last.leader_id.term, last.index),
            None => format!("none-{seq}"),
        };
        let meta =
            SnapshotMeta { last_log_id: last_applied, last_membership: last_membership.clone(), snapshot_id };
        let body =
            SnapshotBody { last_applied, last_membership, state, archive, accounts: Default::default() };
        body.check(&meta, "the snapshot being built")?;
        let data = body.encode();
        self.write_snapshot(&meta, &data)?;
        self.flush_now("flush the snapshot")?;
        Ok((meta, data))
    }

    /// Persists a received snapshot and replaces the state and the archive with its contents. Blocking.
    pub(super) fn install_snapshot(&self, meta: &Meta, data: &[u8]) -> Result<u64, StoreError> {
        let what = format!("the received snapshot {}", meta.snapshot_id);
        let body = SnapshotBody::decode(data, &what)?;
        body.check(meta, &what)?;
        // Snapshot first: if a crash comes before the archive is replaced, `open` repairs the archive
        // from it. sled recovers writes in order, so the reverse (new archive, old snapshot) cannot be.
        self.write_snapshot(meta, data)?;
        let last_index = {
            let mut machine = self.write_machine();
            self.replace_archive(&body.archive)?;
            machine.unarchived.clear();
            machine.state = body.state;
            machine.last_applied = body.last_applied;
            machine.membership = body.last_membership;
            machine.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.flush_now("flush the installed snapshot")?;
        Ok(last_index)
    }
}

#[cfg(test)]
mod tests {
    use openraft::StoredMembership;

    use super::*;

    #[test]
    fn a_snapshot_of_format_1_is_read_with_no_handover_under_way() {
        let mut v1 = coyote_state_machine::StateV1::default();
        v1.departed.insert(7);
        v1.last_applied = 0;
        let data = encode(&SnapshotFile::V1(SnapshotBodyV1 {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state: v1,
            archive: Vec::new(),
        }));
        let body = SnapshotBody::decode(&data, "a format 1 snapshot").expect("format 1 is read");
        assert!(body.state.departed.contains(&7));
        assert!(body.state.handovers.is_empty());
        // And what is written now is format 4, read back as it was.
        let again = body.encode();
        let back = SnapshotBody::decode(&again, "a format 4 snapshot").expect("format 4 is read");
        assert!(back.state.departed.contains(&7));
    }

    /// A snapshot written before the data ledger: each service gets an empty ledger whose epoch is
    /// the last applied event, so no earlier snapshot can be proposed against it.
    #[test]
    fn a_snapshot_of_format_2_is_read_with_an_empty_data_ledger() {
        let mut v2 = coyote_state_machine::StateV2 { last_applied: 41, ..Default::default() };
        let spec = coyote_state_machine::ServiceSpec {
            name: "blog".into(),
            image: "blog:1".into(),
            domains: Vec::new(),
            ports: Vec::new(),
            memory_bytes: None,
            on_demand: false,
            dump: None,
            http_check: None,
            zone: None,
            http_port: None,
            tls_passthrough: false,
            keep: None,
        };
        let service =
            coyote_state_machine::Service { spec, placement: None, created_at_ms: 1, serve_from_ms: 1 };
        v2.services.insert("blog".into(), service);
        let data = encode(&SnapshotFile::V2(SnapshotBodyV2 {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state: v2,
            archive: Vec::new(),
        }));
        let body = SnapshotBody::decode(&data, "a format 2 snapshot").expect("format 2 is read");
        let ledger = &body.state.data["blog"];
        assert_eq!(ledger.epoch, 41);
        assert!(ledger.snapshots.is_empty());
        assert!(body.state.handovers.is_empty());
    }

    /// Event counts whose sum overflows a u64: the check added them unchecked (a panic in a debug
    /// build), reached by the `snapshot` fuzz target. It is an inconsistent snapshot.
    #[test]
    fn a_snapshot_whose_counts_overflow_is_refused() {
        let state = State { applied_count: u64::MAX, rejected_count: 1, ..State::default() };
        let body = SnapshotBody {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state,
            archive: Vec::new(),
            accounts: Default::default(),
        };
        let meta =
            Meta { last_log_id: None, last_membership: StoredMembership::default(), snapshot_id: "x".into() };
        let data = body.encode();
        let body = SnapshotBody::decode(&data, "a snapshot").expect("it decodes");
        let error = body.check(&meta, "a snapshot").expect_err("it is refused").to_string();
        assert!(error.contains("more events than a u64 holds"), "{error}");
    }

    /// A snapshot written before certificates: the state has no ACME account and no certificates.
    #[test]
    fn a_snapshot_of_format_3_is_read_with_no_certificates() {
        let v3 = coyote_state_machine::StateV3 { last_applied: 0, ..Default::default() };
        let mut v3 = v3;
        v3.departed.insert(3);
        let data = encode(&SnapshotFile::V3(SnapshotBodyV3 {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state: v3,
            archive: Vec::new(),
        }));
        let body = SnapshotBody::decode(&data, "a format 3 snapshot").expect("format 3 is read");
        assert!(body.state.departed.contains(&3));
        assert!(body.state.acme.is_none() && body.state.certs.is_empty());
    }

    /// Accounts travel beside the state (format 5); a format 4 snapshot has none.
    #[test]
    fn accounts_survive_a_snapshot_and_format_4_has_none() {
        let mut state = State::default();
        let user = coyote_state_machine::accounts::User {
            name: "alice".into(),
            role: coyote_state_machine::UserRole::Admin,
            password_hash: "$argon2id$v=19$x".into(),
            created_at_ms: 1,
            password_changed_at_ms: 1,
        };
        state.accounts.users.insert("alice".into(), user);
        state.departed.insert(7);
        let body = |state| SnapshotBody {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state,
            archive: Vec::new(),
            accounts: Default::default(),
        };
        let read = SnapshotBody::decode(&body(state.clone()).encode(), "a snapshot").expect("it decodes");
        assert_eq!(read.state.accounts, state.accounts);
        let v4 = encode(&SnapshotFile::V4(Box::new(SnapshotBodyV4 {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state,
            archive: Vec::new(),
        })));
        let read = SnapshotBody::decode(&v4, "a format 4 snapshot").expect("format 4 is read");
        assert!(read.state.departed.contains(&7));
        assert!(read.state.accounts.users.is_empty());
    }
}
