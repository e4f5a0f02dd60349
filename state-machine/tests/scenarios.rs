//! Scenario tests: each `scenarios/NAME.txt` is a list of commands; running it prints a transcript that
//! must equal `scenarios/NAME.out`. Run with `UPDATE_SCENARIOS=1` to rewrite the transcripts after an
//! intended change of behaviour, then read the diff.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use coyote_state_machine::accounts::{AccountEvent, CrmSettings, InviteUse, SignupMode, SignupTemplate};
use coyote_state_machine::spec::{parse_bytes, parse_port};
use coyote_state_machine::{
    sha256_hex, short_id, Consistency, Envelope, Event, NodeInfo, Outcome, Placement, Proposal, ServiceSpec,
    SnapshotKind, State, Subject, SwitchCause,
};

struct Runner {
    state: State,
    index: u64,
    clock_ms: u64,
    out: String,
}

fn args(words: &[&str]) -> (Vec<String>, BTreeMap<String, String>) {
    let mut pos = Vec::new();
    let mut kv = BTreeMap::new();
    for w in words {
        match w.split_once('=') {
            Some((k, v)) => {
                kv.insert(k.to_string(), v.to_string());
            }
            None => pos.push(w.to_string()),
        }
    }
    (pos, kv)
}

/// A snapshot id from a short name in a scenario: `a1` is `a1a1...` (64 characters); `bad` stays.
fn snapshot_id(short: &str) -> String {
    if short.is_empty() || !short.bytes().all(|b| b.is_ascii_hexdigit()) {
        return short.to_string();
    }
    short.repeat(64 / short.len() + 1)[..64].to_string()
}

fn node_list(text: &str) -> Vec<u64> {
    text.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().expect("node id")).collect()
}

impl Runner {
    fn propose(&mut self, event: Event) {
        self.index += 1;
        let proposal = Proposal { at_ms: self.clock_ms, actor: "scenario".into(), event };
        let pre = self.state.validate(&proposal);
        let env = Envelope::new(self.index, 1, proposal);
        let kind = env.event.kind();
        let outcome = self.state.apply(&env).expect("invariants hold");
        // Validation before proposing and application agree when nothing happened in between.
        assert_eq!(pre.is_ok(), outcome.is_applied(), "validate and apply disagree at {}", self.index);
        match outcome {
            Outcome::Applied => writeln!(self.out, "{} {kind}: applied", self.index).unwrap(),
            Outcome::Rejected { reason } => {
                writeln!(self.out, "{} {kind}: rejected: {reason}", self.index).unwrap()
            }
        }
    }

    fn spec(&self, pos: &[String], kv: &BTreeMap<String, String>) -> ServiceSpec {
        ServiceSpec {
            name: pos[1].clone(),
            image: kv.get("image").cloned().unwrap_or_default(),
            domains: kv.get("domains").map(|d| d.split(',').map(String::from).collect()).unwrap_or_default(),
            ports: kv
                .get("ports")
                .map(|p| p.split(',').map(|x| parse_port(x).expect("port")).collect())
                .unwrap_or_default(),
            memory_bytes: kv.get("memory").map(|m| parse_bytes(m).expect("memory")),
            on_demand: pos.iter().any(|p| p == "on-demand"),
            dump: kv.get("dump").map(|d| d.split(',').map(String::from).collect()),
            http_check: None,
            zone: None,
            http_port: kv.get("http-port").map(|p| p.parse().expect("http-port")),
            tls_passthrough: pos.iter().any(|p| p == "tls-passthrough"),
            // `keep=last:2,hourly:0` (a `:` for the `=` the scenario's own syntax takes).
            keep: kv.get("keep").map(|k| k.replace(':', "=").parse().expect("keep")),
        }
    }

    fn run(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (pos, kv) = args(&words);
        let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
        let num =
            |k: &str| get(k).parse::<u64>().unwrap_or_else(|_| panic!("{k}= needs a number in {line:?}"));
        match pos[0].as_str() {
            "clock" => self.clock_ms = pos[1].parse().expect("clock ms"),
            "cluster" => self.propose(Event::ClusterCreated {
                cluster_id: pos[1].clone(),
                node: NodeInfo { id: num("node"), addr: get("addr") },
                ca_pin: "ab".repeat(32),
            }),
            "token-issue" => self.propose(Event::TokenIssued {
                token_id: pos[1].clone(),
                secret_sha256: sha256_hex(get("secret").as_bytes()),
                expires_at_ms: num("expires"),
                uses: num("uses") as u32,
            }),
            "token-revoke" => self.propose(Event::TokenRevoked { token_id: pos[1].clone() }),
            "join" => self.propose(Event::NodeJoined {
                node: NodeInfo { id: num("node"), addr: get("addr") },
                token_id: get("token"),
                secret_sha256: sha256_hex(get("secret").as_bytes()),
            }),
            "leave" => self.propose(Event::NodeLeft { node_id: num("node"), reason: "scenario".into() }),
            "remove" => self.propose(Event::NodeRemoved {
                node_id: num("node"),
                reason: "scenario".into(),
                forced: pos.iter().any(|p| p == "force"),
            }),
            "service-create" => {
                let spec = self.spec(&pos, &kv);
                self.propose(Event::ServiceCreated { spec })
            }
            "service-change" => {
                let spec = self.spec(&pos, &kv);
                self.propose(Event::ServiceSpecChanged { spec })
            }
            "service-rm" => self.propose(Event::ServiceRemoved { name: pos[1].clone() }),
            "placement" => self.propose(Event::PlacementSet {
                service: pos[1].clone(),
                placement: Placement {
                    master: num("master"),
                    failover: kv.get("failover").map(|f| f.parse().expect("failover id")),
                    backups: node_list(&get("backups")),
                },
            }),
            "switch" | "failover" | "handover-done" | "handover-overdue" => {
                let not_before_ms = match kv.get("from") {
                    Some(d) => self.clock_ms + d.trim_start_matches('+').parse::<u64>().expect("from=+MS"),
                    None => 0,
                };
                let cause = match pos[0].as_str() {
                    "failover" => SwitchCause::Failover,
                    "handover-done" => SwitchCause::Handover,
                    "handover-overdue" => SwitchCause::HandoverOverdue,
                    _ => SwitchCause::Instruction,
                };
                self.propose(Event::AuthoritySwitched {
                    service: pos[1].clone(),
                    to: num("to"),
                    reason: "scenario".into(),
                    not_before_ms,
                    cause,
                })
            }
            "handover" => self.propose(Event::HandoverRequested {
                service: pos[1].clone(),
                to: num("to"),
                reason: "scenario".into(),
            }),
            "observe" => {
                let subject = match (kv.get("node"), kv.get("service")) {
                    (Some(n), None) => Subject::Node(n.parse().expect("node id")),
                    (None, Some(s)) => Subject::Service(s.clone()),
                    _ => panic!("observe needs node= or service= in {line:?}"),
                };
                let reachable = match pos.get(1).map(String::as_str) {
                    Some("up") => true,
                    Some("down") => false,
                    _ => panic!("observe needs up or down in {line:?}"),
                };
                self.propose(Event::ReachabilityChanged { observer: num("by"), subject, reachable })
            }
            "alarm-raise" => self.propose(Event::AlarmRaised {
                key: get("key"),
                node: kv.get("node").map(|n| n.parse().expect("node id")),
                service: kv.get("service").cloned(),
                message: get("message"),
            }),
            "alarm-clear" => self.propose(Event::AlarmCleared {
                alarm_id: pos[1].parse().expect("id"),
                reason: "scenario".into(),
            }),
            "snapshot-taken" => {
                let service = pos[1].clone();
                let epoch = match kv.get("epoch").map(String::as_str) {
                    None | Some("current") => self.state.data.get(&service).map(|d| d.epoch).unwrap_or(0),
                    Some(e) => e.parse().expect("epoch"),
                };
                let kind = match kv.get("kind").map(String::as_str) {
                    None | Some("periodic") => SnapshotKind::Periodic,
                    Some("dump") => SnapshotKind::Dump,
                    Some("handover") => SnapshotKind::Handover,
                    Some("manual") => SnapshotKind::Manual,
                    Some(k) => panic!("unknown kind {k}"),
                };
                self.propose(Event::SnapshotTaken {
                    service,
                    snapshot: snapshot_id(&get("id")),
                    parent: kv.get("parent").map(|p| snapshot_id(p)),
                    node: num("node"),
                    epoch,
                    kind,
                    consistency: if kind == SnapshotKind::Handover {
                        Consistency::Stopped
                    } else {
                        Consistency::Paused
                    },
                    bytes: kv.get("bytes").map(|b| parse_bytes(b).expect("bytes")).unwrap_or(1 << 20),
                    new_bytes: kv.get("new").map(|b| parse_bytes(b).expect("new")).unwrap_or(4096),
                })
            }
            "snapshot-stored" => self.propose(Event::SnapshotStored {
                service: pos[1].clone(),
                snapshot: snapshot_id(&get("id")),
                node: num("node"),
            }),
            "snapshot-corrupt" => self.propose(Event::SnapshotCorrupt {
                service: pos[1].clone(),
                snapshot: snapshot_id(&get("id")),
                node: num("node"),
                reason: "hash mismatch".into(),
            }),
            "backup-failed" => self.propose(Event::BackupFailed {
                service: pos[1].clone(),
                snapshot: kv.get("id").map(|i| snapshot_id(i)),
                node: num("node"),
                reason: get("reason").replace('_', " "),
            }),
            "snapshot-forget" => self.propose(Event::SnapshotForgotten {
                service: pos[1].clone(),
                snapshot: snapshot_id(&get("id")),
            }),
            "restored" => {
                let service = pos[1].clone();
                let epoch = match kv.get("epoch").map(String::as_str) {
                    None | Some("current") => self.state.data.get(&service).map(|d| d.epoch).unwrap_or(0),
                    Some(e) => e.parse().expect("epoch"),
                };
                self.propose(Event::RestoreCompleted {
                    service,
                    snapshot: kv.get("id").map(|i| snapshot_id(i)),
                    node: num("node"),
                    epoch,
                })
            }
            "acme-account" => self.propose(Event::AcmeAccountCreated {
                directory: get("dir"),
                account_url: format!("{}/acct/1", get("dir")),
                credentials_sealed: b"sealed".to_vec(),
            }),
            "cert-claim" => self.propose(Event::CertOrderClaimed { name: pos[1].clone(), node: num("node") }),
            "cert-placed" => self.propose(Event::CertOrderPlaced {
                name: pos[1].clone(),
                node: num("node"),
                order_url: get("url"),
                key_sealed: b"sealed key".to_vec(),
            }),
            "cert-challenge" => self.propose(Event::AcmeChallengeReady {
                name: pos[1].clone(),
                node: num("node"),
                token: get("token"),
                key_authorization: kv
                    .get("keyauth")
                    .cloned()
                    .unwrap_or_else(|| format!("{}.thumb", get("token"))),
            }),
            "cert-issued" => {
                let days: u64 = kv.get("days").map(|d| d.parse().expect("days")).unwrap_or(90);
                self.propose(Event::CertIssued {
                    name: pos[1].clone(),
                    node: num("node"),
                    chain_pem: "-----BEGIN CERTIFICATE-----".into(),
                    key_sealed: b"sealed key".to_vec(),
                    not_before_ms: self.clock_ms,
                    not_after_ms: self.clock_ms + days * 86_400_000,
                    issuer: "Pebble Intermediate CA".into(),
                })
            }
            "cert-failed" => self.propose(Event::CertOrderFailed {
                name: pos[1].clone(),
                node: num("node"),
                reason: get("reason").replace('_', " "),
            }),
            "rollback" => self.propose(Event::RestoreRequested {
                service: pos[1].clone(),
                snapshot: snapshot_id(&get("id")),
                reason: "scenario".into(),
            }),
            "settings" => {
                let template = kv.get("image").map(|image| SignupTemplate {
                    image: image.clone(),
                    domain: get("domain"),
                    http_port: kv.get("http-port").map(|p| p.parse().expect("http-port")),
                    memory_bytes: None,
                    on_demand: pos.iter().any(|p| p == "on-demand"),
                });
                let settings = CrmSettings {
                    cluster_name: get("name"),
                    admin_domain: kv.get("admin-domain").cloned(),
                    signup: SignupMode::parse(&get("signup")).expect("signup=off|public|approval|invite"),
                    template,
                };
                self.propose(Event::Account(AccountEvent::SettingsChanged { settings }))
            }
            "invite-issue" => self.propose(Event::Account(AccountEvent::InviteIssued {
                invite_id: pos[1].clone(),
                secret_sha256: sha256_hex(pos[1].as_bytes()),
                expires_at_ms: num("expires"),
            })),
            "invite-revoke" => {
                self.propose(Event::Account(AccountEvent::InviteRevoked { invite_id: pos[1].clone() }))
            }
            "signup" => self.propose(Event::Account(AccountEvent::SignupRequested {
                name: pos[1].clone(),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
                invite: kv.get("invite").map(|i| InviteUse {
                    invite_id: i.clone(),
                    secret_sha256: sha256_hex(kv.get("secret").unwrap_or(i).as_bytes()),
                }),
            })),
            "signup-decide" => self.propose(Event::Account(AccountEvent::SignupDecided {
                name: pos[1].clone(),
                approve: pos.get(2).is_some_and(|d| d == "approve"),
                reason: "scenario".into(),
            })),
            "signup-served" => self.propose(Event::Account(AccountEvent::SignupServed {
                name: pos[1].clone(),
                node: num("node"),
            })),
            "show" => self.show(&pos[1], pos.get(2)),
            other => panic!("unknown scenario command {other:?}"),
        }
    }

    fn show(&mut self, what: &str, arg: Option<&String>) {
        let s = &self.state;
        let out = &mut self.out;
        match what {
            "signups" => {
                for su in s.accounts.signups.values() {
                    let user = s.accounts.users.get(&su.name).map(|u| u.role.name()).unwrap_or("no user");
                    let service = s
                        .services
                        .get(&su.name)
                        .map(|svc| svc.spec.domains.join(","))
                        .unwrap_or_else(|| "no service".into());
                    writeln!(
                        out,
                        "  {}: {:?} requested at {} approved at {:?} served by {:?}; {user}; {service}",
                        su.name, su.status, su.requested_index, su.approved_index, su.served_by
                    )
                    .unwrap();
                }
            }
            "members" => {
                for m in s.members.values() {
                    writeln!(out, "  node {} at {}", m.id, m.addr).unwrap();
                }
            }
            "roles" => {
                for (svc, roles) in s.roles() {
                    let r: Vec<String> = roles.iter().map(|(n, r)| format!("{n}={}", r.as_str())).collect();
                    writeln!(out, "  {svc}: {}", r.join(" ")).unwrap();
                }
            }
            "tokens" => {
                for t in s.tokens.values() {
                    writeln!(
                        out,
                        "  {}: {:?} uses_left={} used_by={:?}",
                        t.id,
                        t.status(self.clock_ms),
                        t.uses_left,
                        t.used_by
                    )
                    .unwrap();
                }
                let valid: Vec<&str> = s.valid_tokens(self.clock_ms).map(|t| t.id.as_str()).collect();
                writeln!(out, "  valid: {valid:?}").unwrap();
            }
            "desired" => {
                let node: u64 = arg.expect("node id").parse().expect("node id");
                for d in s.desired_containers(node) {
                    writeln!(out, "  node {node}: {} {:?}", d.service, d.goal).unwrap();
                }
            }
            "serving" => {
                for name in s.services.keys() {
                    let who: Vec<String> = s
                        .members
                        .keys()
                        .filter(|n| s.may_serve(**n, name, self.clock_ms))
                        .map(|n| n.to_string())
                        .collect();
                    writeln!(out, "  {name}: served by [{}] at {}", who.join(","), self.clock_ms).unwrap();
                }
            }
            "handovers" => {
                for (name, h) in &s.handovers {
                    let overdue =
                        s.handover_overdue(name, self.clock_ms).unwrap_or_else(|| "not overdue".into());
                    writeln!(
                        out,
                        "  {name}: from node {} to node {}, asked at {}; at {}: {overdue}",
                        h.from, h.to, h.requested_at_ms, self.clock_ms
                    )
                    .unwrap();
                }
                if s.handovers.is_empty() {
                    writeln!(out, "  none").unwrap();
                }
            }
            "alarms" => {
                for a in s.open_alarms() {
                    writeln!(out, "  alarm {} {}: {}", a.id, a.key, a.message).unwrap();
                }
            }
            "data" => {
                let name = arg.expect("service");
                let Some(d) = s.data.get(name) else {
                    writeln!(out, "  {name}: no ledger").unwrap();
                    return;
                };
                writeln!(out, "  {name}: epoch {}", d.epoch).unwrap();
                for r in d.newest_first() {
                    let holders: Vec<String> = r.holders.keys().map(|n| n.to_string()).collect();
                    let corrupt: Vec<String> = r.corrupt_on.iter().map(|n| n.to_string()).collect();
                    writeln!(
                        out,
                        "  snapshot {} by node {} at epoch {} ({}): holders [{}] corrupt on [{}]",
                        short_id(&r.id),
                        r.taken_by,
                        r.epoch,
                        r.kind.name(),
                        holders.join(","),
                        corrupt.join(",")
                    )
                    .unwrap();
                }
                for (node, f) in &d.failures {
                    writeln!(out, "  failure on node {node}: {}", f.reason).unwrap();
                }
                if let Some(r) = &d.restored {
                    let from = r.snapshot.as_deref().map(short_id).unwrap_or("nothing");
                    writeln!(out, "  restored by node {} at epoch {} from {from}", r.node, r.epoch).unwrap();
                }
                if let Some(id) = s.rollbacks.get(name) {
                    writeln!(out, "  rollback to {} asked", short_id(id)).unwrap();
                }
                let newest = d.newest_held().map(|r| short_id(&r.id)).unwrap_or("none");
                writeln!(out, "  newest held: {newest}").unwrap();
            }
            "certs" => {
                for (name, r) in &s.certs {
                    let order = match &r.order {
                        Some(o) => format!(
                            "order by node {} (claimed {}, renewed {}) url {} challenges [{}]",
                            o.node,
                            o.claimed_at_ms,
                            o.renewed_at_ms,
                            o.order_url.as_deref().unwrap_or("-"),
                            o.challenges
                                .iter()
                                .map(|(t, k)| format!("{t}={k}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                        None => "no order".into(),
                    };
                    let current = match &r.current {
                        Some(c) => format!(
                            "valid {}..{} renew at {}",
                            c.not_before_ms,
                            c.not_after_ms,
                            r.renew_at_ms().unwrap_or(0)
                        ),
                        None => "no certificate".into(),
                    };
                    writeln!(
                        out,
                        "  {name}: {} at {}; {current}; {order}; failures {} retry at {} last error {:?}",
                        r.state_name(self.clock_ms),
                        self.clock_ms,
                        r.failures,
                        r.retry_at_ms,
                        r.last_error
                    )
                    .unwrap();
                }
                let names: Vec<String> = s.orderable_names().into_iter().collect();
                writeln!(out, "  orderable: [{}]", names.join(",")).unwrap();
            }
            other => panic!("unknown show {other:?}"),
        }
    }
}

fn run_scenario(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("scenario file");
    let mut r = Runner { state: State::default(), index: 0, clock_ms: 1_000, out: String::new() };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        writeln!(r.out, "> {line}").unwrap();
        r.run(line);
    }
    r.out
}

#[test]
fn scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let update = std::env::var_os("UPDATE_SCENARIOS").is_some();
    let mut count = 0;
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "txt")) {
        count += 1;
        let got = run_scenario(&path);
        let expected_path = path.with_extension("out");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_SCENARIOS=1", expected_path.display()));
        assert_eq!(got, expected, "scenario {} differs from its transcript", path.display());
    }
    assert!(count >= 2, "no scenarios found in {}", dir.display());
}
