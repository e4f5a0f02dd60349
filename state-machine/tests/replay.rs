//! Properties: replaying the same log gives the same state, and a snapshot restored midway and then
//! fed the rest of the log gives the same state as the replica that never stopped.

use coyote_state_machine::{
    decode, encode, sha256_hex, Consistency, Envelope, Event, NodeInfo, Placement, PortMap, Proposal,
    ServiceSpec, SnapshotKind, State, Subject, SwitchCause,
};
use proptest::prelude::*;

/// Small alphabets on purpose: ids and names collide often, so many events are rejected, which
/// exercises the rejection paths as much as the happy ones.
fn event() -> impl Strategy<Value = Event> {
    let node = 1u64..6;
    let name = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
    let token = prop::sample::select(vec!["t1", "t2"]).prop_map(String::from);
    let secret = prop::sample::select(vec!["s1", "s2"]).prop_map(|s| sha256_hex(s.as_bytes()));
    let snapshot = prop::sample::select(vec!["a", "b"]).prop_map(|s| s.repeat(64));
    prop_oneof![
        1 => Just(Event::ClusterCreated {
            cluster_id: "c".into(),
            node: NodeInfo { id: 1, addr: "n1".into() },
            ca_pin: "p".into()
        }),
        3 => (node.clone(), token.clone(), secret.clone()).prop_map(|(id, token_id, secret_sha256)| {
            Event::NodeJoined { node: NodeInfo { id, addr: format!("n{id}") }, token_id, secret_sha256 }
        }),
        1 => node.clone().prop_map(|node_id| Event::NodeLeft { node_id, reason: "r".into() }),
        1 => (node.clone(), any::<bool>()).prop_map(|(node_id, forced)| Event::NodeRemoved { node_id, reason: "r".into(), forced }),
        2 => (token.clone(), secret, 1u32..4, 0u64..20_000).prop_map(|(token_id, secret_sha256, uses, exp)| {
            Event::TokenIssued { token_id, secret_sha256, expires_at_ms: exp, uses }
        }),
        1 => token.prop_map(|token_id| Event::TokenRevoked { token_id }),
        2 => (name.clone(), 1u16..4, any::<bool>(), any::<bool>()).prop_map(|(name, port, on_demand, dump)| Event::ServiceCreated {
            spec: ServiceSpec {
                name,
                image: "img".into(),
                domains: vec![],
                ports: vec![PortMap { host: port, container: 80 }],
                memory_bytes: None,
                on_demand,
                dump: dump.then(|| vec!["sh".into(), "-c".into(), "echo dump".into()]),
                http_check: None,
                zone: None,
                http_port: None,
                tls_passthrough: false,
                keep: None,
            }
        }),
        1 => name.clone().prop_map(|name| Event::ServiceRemoved { name }),
        2 => (name.clone(), node.clone(), prop::option::of(node.clone()), prop::collection::vec(node.clone(), 0..3))
            .prop_map(|(service, master, failover, backups)| Event::PlacementSet {
                service,
                placement: Placement { master, failover, backups }
            }),
        2 => (
            name.clone(),
            node.clone(),
            prop::sample::select(vec![0u64, 500, 3000]),
            prop::sample::select(vec![
                SwitchCause::Failover,
                SwitchCause::Instruction,
                SwitchCause::Handover,
                SwitchCause::HandoverOverdue,
            ])
        )
            .prop_map(|(service, to, from, cause)| Event::AuthoritySwitched {
                service,
                to,
                reason: "r".into(),
                not_before_ms: from,
                cause,
            }),
        3 => (node.clone(), node.clone(), prop::option::of(name.clone()), any::<bool>()).prop_map(
            |(observer, target, service, reachable)| Event::ReachabilityChanged {
                observer,
                subject: match service {
                    Some(s) => Subject::Service(s),
                    None => Subject::Node(target),
                },
                reachable,
            }
        ),
        2 => (name.clone(), node.clone()).prop_map(|(service, to)| Event::HandoverRequested {
            service,
            to,
            reason: "r".into(),
        }),
        1 => (prop::sample::select(vec!["k1", "k2"]), prop::option::of(node.clone())).prop_map(|(key, node)| {
            Event::AlarmRaised { key: key.into(), node, service: None, message: "m".into() }
        }),
        1 => (1u64..40).prop_map(|alarm_id| Event::AlarmCleared { alarm_id, reason: "r".into() }),
        3 => (name.clone(), snapshot.clone(), node.clone(), 1u64..12).prop_map(|(service, snapshot, node, epoch)| {
            Event::SnapshotTaken {
                service,
                snapshot,
                parent: None,
                node,
                epoch,
                kind: SnapshotKind::Periodic,
                consistency: Consistency::Paused,
                bytes: 10,
                new_bytes: 1,
            }
        }),
        2 => (name.clone(), snapshot.clone(), node.clone())
            .prop_map(|(service, snapshot, node)| Event::SnapshotStored { service, snapshot, node }),
        1 => (name.clone(), snapshot.clone(), node.clone()).prop_map(|(service, snapshot, node)| {
            Event::SnapshotCorrupt { service, snapshot, node, reason: "r".into() }
        }),
        1 => (name.clone(), node.clone()).prop_map(|(service, node)| Event::BackupFailed {
            service,
            snapshot: None,
            node,
            reason: "r".into(),
        }),
        1 => (name.clone(), snapshot.clone())
            .prop_map(|(service, snapshot)| Event::SnapshotForgotten { service, snapshot }),
        1 => (name.clone(), prop::option::of(snapshot), node.clone(), 1u64..12).prop_map(
            |(service, snapshot, node, epoch)| Event::RestoreCompleted { service, snapshot, node, epoch }
        ),
    ]
}

fn log() -> impl Strategy<Value = Vec<Envelope>> {
    prop::collection::vec((event(), 0u64..500), 1..80).prop_map(|events| {
        let mut at_ms = 0;
        events
            .into_iter()
            .enumerate()
            .map(|(i, (event, step))| {
                at_ms += step;
                Envelope::new(i as u64 + 1, 1, Proposal { at_ms, actor: "p".into(), event })
            })
            .collect()
    })
}

fn replay(log: &[Envelope]) -> (State, Vec<coyote_state_machine::Outcome>) {
    let mut state = State::default();
    let outcomes = log.iter().map(|e| state.apply(e).expect("invariants hold")).collect();
    (state, outcomes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn replay_is_deterministic(log in log()) {
        let (a, outcomes_a) = replay(&log);
        let (b, outcomes_b) = replay(&log);
        prop_assert_eq!(&outcomes_a, &outcomes_b);
        prop_assert_eq!(encode(&a), encode(&b));
        prop_assert_eq!(a.applied_count + a.rejected_count, log.len() as u64);
    }

    #[test]
    fn snapshot_and_restore_give_the_same_state(log in log(), cut in 0usize..80) {
        let cut = cut.min(log.len());
        let (whole, outcomes) = replay(&log);
        let (before, _) = replay(&log[..cut]);
        let mut restored: State = decode(&encode(&before)).expect("snapshot decodes");
        prop_assert_eq!(&restored, &before);
        for (env, expected) in log[cut..].iter().zip(&outcomes[cut..]) {
            let got = restored.apply(env).expect("invariants hold");
            prop_assert_eq!(&got, expected);
        }
        prop_assert_eq!(encode(&restored), encode(&whole));
    }

    #[test]
    fn proposals_survive_their_encoding(log in log()) {
        for env in &log {
            let p = Proposal { at_ms: env.at_ms, actor: env.actor.clone(), event: env.event.clone() };
            let back: Proposal = decode(&encode(&p)).expect("decodes");
            prop_assert_eq!(back, p);
        }
    }
}

#[test]
fn garbage_does_not_decode_as_a_proposal() {
    assert!(decode::<Proposal>(&[0xff, 0xff, 0xff, 0x01]).is_err());
    assert!(decode::<Proposal>(&[]).is_err());
    let mut bytes = encode(&Proposal {
        at_ms: 1,
        actor: "a".into(),
        event: Event::TokenRevoked { token_id: "t".into() },
    });
    bytes.push(0);
    assert!(decode::<Proposal>(&bytes).is_err(), "trailing bytes accepted");
}

#[test]
fn proposal_encoding_starts_with_its_format_version() {
    // V1 is variant 0 of VersionedProposal: the first encoded byte.
    let bytes = encode(&Proposal {
        at_ms: 1,
        actor: "a".into(),
        event: Event::TokenRevoked { token_id: "t".into() },
    });
    assert_eq!(bytes[0], 0);
    assert_eq!(coyote_state_machine::FORMAT_VERSION, 1);
}
