//! What runs beside each node: the simulated admin (its commands go through the node's API
//! router), the join, the workload of alarms that the client oracle records, and the visitors of
//! the on-demand services.

use std::sync::atomic::Ordering;
use std::time::Duration;

use coyote_log::{cluster, LogNode};
use coyote_nodes::wire;
use coyote_state_machine::{sha256_hex, AccountEvent, Event, KeyScope, Outcome, ServiceSpec, UserRole};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::checks::Ack;
use crate::material::material;
use crate::net;
use crate::params::{
    ADMIN_ACTOR, CRM_ADMIN, CRM_KEY_ID, CRM_KEY_SECRET, CRM_PASSWORD_HASH, HTTP_PORT, JOIN_RETRY,
    VISIT_TIMEOUT,
};
use crate::world::{Admin, HostState, World};

/// Runs the admin's commands queued for this host, one at a time, through this node's API router
/// (the CLI's path, without the unix socket).
pub(crate) async fn admin(world: &World, host: &HostState, api: axum::Router, crm: Option<axum::Router>) {
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let next = world.admin.lock().expect("admin lock").get_mut(&host.name).and_then(|q| q.pop_front());
        match next {
            Some(Admin::CreateService(spec)) => create_service(world, &api, spec).await,
            Some(Admin::CreateServiceInCrm(spec)) => match &crm {
                Some(crm) => create_service_in_crm(world, crm, spec).await,
                None => world.trace("admin: this node serves no CRM".into()),
            },
            Some(Admin::Switch { service, to }) => {
                // `coyote service switch` without `--now`: a graceful handover.
                let path = format!("/v1/services/{service}/switch");
                let request = wire::SwitchRequest { to, now: false };
                match call::<_, wire::SwitchAnswer>(&api, "POST", &path, &request).await {
                    Ok(answer) => world.trace(format!(
                        "admin: switch {service} to node {to}: handover asked at {}",
                        answer.index
                    )),
                    Err(e) => world.trace(format!("admin: switch {service} to node {to} failed: {e}")),
                }
            }
            Some(Admin::Leave) => leave(world, &api).await,
            Some(Admin::Remove { node, force }) => remove(world, &api, node, force).await,
            None => {}
        }
    }
}

/// `coyote node leave`: the node's API asks the handovers, then records the leave; asked again
/// every half second until it has, for at most a minute and a half.
async fn leave(world: &World, api: &axum::Router) {
    for _ in 0..180 {
        match call::<_, wire::LeaveAnswer>(api, "POST", "/v1/leave", &()).await {
            Ok(wire::LeaveAnswer { left_at: Some(index), .. }) => {
                world.trace(format!("admin: this node left at {index}"));
                return;
            }
            Ok(answer) => {
                let list: Vec<String> =
                    answer.handing_over.iter().map(|h| format!("{} to node {}", h.service, h.to)).collect();
                world.trace(format!("admin: leaving; handing over {}", list.join(", ")));
            }
            Err(e) => world.trace(format!("admin: leave: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    world.trace("admin: the leave did not end in 90 s".into());
}

/// `coyote node remove`: again while the members do not report the node gone yet (or no leader
/// answers), as an admin would, for at most a minute.
async fn remove(world: &World, api: &axum::Router, node: u64, force: bool) {
    let request = wire::NodeRemove { force, reason: Some("gone for good".into()) };
    let path = format!("/v1/nodes/{node}/remove");
    for _ in 0..60 {
        match call::<_, wire::Committed>(api, "POST", &path, &request).await {
            Ok(c) => {
                world.trace(format!("admin: node {node} removed at {}", c.index));
                return;
            }
            Err(e) => {
                world.trace(format!("admin: remove node {node}: {e}"));
                let settles = ["is not gone", "is still master of", "503"];
                if !settles.iter().any(|s| e.contains(s)) {
                    return;
                }
            }
        }
        tokio::time::sleep(JOIN_RETRY).await;
    }
}

/// `coyote service create`: one request, which the log places. The admin runs it again until the
/// service exists, as a person would after an error.
pub(crate) async fn create_service(world: &World, api: &axum::Router, spec: ServiceSpec) {
    let name = spec.name.clone();
    loop {
        match call::<_, wire::ServiceCreated>(api, "POST", "/v1/services", &spec).await {
            Ok(_) => break,
            Err(e) if e.contains("already exists") => break,
            Err(e) => {
                world.trace(format!("admin: creating {name}: {e}"));
                tokio::time::sleep(JOIN_RETRY).await;
            }
        }
    }
    world.trace(format!("admin: {name} created and placed"));
}

/// The CRM's door for scripts (`/api/v1`), with the admin's API key. Again after an error, until
/// the service exists. (The pages' login checks the password on tokio's blocking pool, whose
/// threads would make a run differ from its replay: the simulator goes through the key instead.)
pub(crate) async fn create_service_in_crm(world: &World, crm: &axum::Router, spec: ServiceSpec) {
    let name = spec.name.clone();
    loop {
        match crm_create(crm, &spec).await {
            Ok(()) => break,
            Err(e) if e.contains("already exists") => break,
            Err(e) => {
                world.trace(format!("admin: creating {name} in the CRM: {e}"));
                tokio::time::sleep(JOIN_RETRY).await;
            }
        }
    }
    world.trace(format!("admin: {name} created in the CRM"));
}

async fn crm_create(crm: &axum::Router, spec: &ServiceSpec) -> Result<(), String> {
    use tower::ServiceExt;
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/api/v1/services")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}{CRM_KEY_ID}_{CRM_KEY_SECRET}", wire::KEY_PREFIX))
        .body(axum::body::Body::from(serde_json::to_vec(spec).map_err(|e| e.to_string())?))
        .map_err(|e| e.to_string())?;
    let response = crm.clone().oneshot(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.map_err(|e| e.to_string())?;
    if status.is_success() {
        return Ok(());
    }
    let error = serde_json::from_slice::<wire::ErrorAnswer>(&bytes).map(|e| e.error).unwrap_or_default();
    Err(format!("{status}: {error}"))
}

/// Node 1 creates the CRM's admin and her API key with the cluster.
pub(crate) async fn create_crm_admin(world: &World, node: &LogNode) {
    let events = [
        Event::Account(AccountEvent::UserCreated {
            name: CRM_ADMIN.into(),
            role: UserRole::Admin,
            password_hash: CRM_PASSWORD_HASH.into(),
        }),
        Event::Account(AccountEvent::ApiKeyCreated {
            key_id: CRM_KEY_ID.into(),
            owner: CRM_ADMIN.into(),
            label: "the simulated admin".into(),
            scope: KeyScope::Write,
            secret_sha256: sha256_hex(CRM_KEY_SECRET.as_bytes()),
        }),
    ];
    for event in events {
        loop {
            match node.propose(event.clone(), "sim@n1".into()).await {
                Ok(proposed) => {
                    world.trace(format!("CRM {} at {}", event.kind(), proposed.index));
                    break;
                }
                Err(_) => tokio::time::sleep(JOIN_RETRY).await,
            }
        }
    }
}

/// One request to a node's API router, as the simulated admin: its answer, or the status and error.
pub(crate) async fn call<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    api: &axum::Router,
    method: &str,
    path: &str,
    body: &B,
) -> Result<T, String> {
    use tower::ServiceExt;
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header(coyote_nodes::api::ACTOR_HEADER, ADMIN_ACTOR)
        .body(axum::body::Body::from(serde_json::to_vec(body).map_err(|e| e.to_string())?))
        .map_err(|e| e.to_string())?;
    let response = api.clone().oneshot(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.map_err(|e| e.to_string())?;
    if status.is_success() {
        serde_json::from_slice(&bytes).map_err(|e| format!("an answer the admin cannot read: {e}"))
    } else {
        let error = serde_json::from_slice::<wire::ErrorAnswer>(&bytes).map(|e| e.error).unwrap_or_default();
        Err(format!("{status}: {error}"))
    }
}

/// Node 1 issues the token the others join with.
pub(crate) async fn issue_token(world: &World, node: &LogNode) {
    let event = Event::TokenIssued {
        token_id: world.token.id.clone(),
        secret_sha256: world.token.secret_sha256(),
        expires_at_ms: node.now_ms() + 24 * 3600 * 1000,
        uses: (2 * world.nodes_expected) as u32,
    };
    loop {
        match node.propose(event.clone(), "sim@n1".into()).await {
            Ok(proposed) => {
                world.trace(format!("token issued at {}", proposed.index));
                return;
            }
            Err(_) => tokio::time::sleep(JOIN_RETRY).await,
        }
    }
}

/// The real join path: a CSR and the token to a member, a certificate back.
pub(crate) async fn join(world: &World, host: &HostState, addr: &str) -> (u64, String, String) {
    let keys = &material().joiner_keys;
    let (key_pem, csr_pem) = &keys[host.index % keys.len()];
    let dial = net::dial();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        // A server that joins later (a replacement) asks the first servers in turn: the one in the
        // token may be the one it replaces.
        let mut token = world.token.clone();
        if host.index >= world.nodes_expected {
            token.addr = format!("n{}:{}", attempts as usize % world.nodes_expected + 1, crate::params::PORT);
        }
        match cluster::request_join_with(&token, addr, csr_pem, &dial).await {
            Ok(reply) => {
                world.trace(format!(
                    "{} joined as node {} after {attempts} attempts",
                    host.name, reply.node_id
                ));
                return (reply.node_id, reply.node_cert_pem, key_pem.clone());
            }
            Err(_) => tokio::time::sleep(JOIN_RETRY).await,
        }
    }
}

/// Proposes alarms (raised and cleared) through this node, one at a time, and tells the oracle about
/// each acknowledged one.
pub(crate) async fn workload(world: &World, host: &HostState, node: &LogNode, incarnation: u64) {
    let mut rng = StdRng::seed_from_u64(
        world.seed ^ ((host.index as u64 + 1) << 40) ^ incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut raised: Vec<u64> = Vec::new();
    let mut counter = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
        if !world.workload.load(Ordering::SeqCst) {
            continue;
        }
        counter += 1;
        let clear = !raised.is_empty() && rng.gen_bool(0.4);
        let event = if clear {
            let alarm_id = raised.swap_remove(rng.gen_range(0..raised.len()));
            Event::AlarmCleared { alarm_id, reason: "simulated".into() }
        } else {
            Event::AlarmRaised {
                key: format!("{}.{incarnation}.{counter}", host.name),
                node: None,
                service: None,
                message: "simulated".into(),
            }
        };
        let actor = format!("sim@{}.{incarnation}.{counter}", host.name);
        match node.propose(event.clone(), actor.clone()).await {
            Ok(proposed) => {
                if !clear && proposed.outcome == Outcome::Applied {
                    raised.push(proposed.index);
                }
                world.trace(format!("ack {actor} at {}", proposed.index));
                world.acks.lock().expect("acks lock").push(Ack { index: proposed.index, actor, event });
            }
            Err(e) => world.trace(format!("no ack for {actor}: {}: {e}", error_kind(&e))),
        }
    }
}

/// People visiting the on-demand services: every so often, a request to a service's host port at
/// its master (as this node sees it), answered once the activator there has started the container.
/// Each answer is noted with its time ([`World::visits`]).
/// A web visitor on this host: every so often, a request for a random service's domain to a random
/// member's proxy (not necessarily the master's: the proxy forwards). Counts the answers.
pub(crate) async fn web_visitors(world: &World, host: &HostState, node: &LogNode, incarnation: u64) {
    let mut rng = StdRng::seed_from_u64(
        world.seed
            ^ ((host.index as u64 + 1) << 40)
            ^ incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ 0x3eb,
    );
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2000))).await;
        let (domains, hosts): (Vec<String>, Vec<String>) = node.store().with_state(|s| {
            (
                s.services.values().flat_map(|svc| svc.spec.domains.iter().cloned()).collect(),
                s.members.values().filter_map(|m| Some(m.addr.split(':').next()?.to_string())).collect(),
            )
        });
        let (Some(domain), Some(at)) = (domains.choose(&mut rng).cloned(), hosts.choose(&mut rng).cloned())
        else {
            continue;
        };
        let answered = tokio::time::timeout(VISIT_TIMEOUT, async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = turmoil::net::TcpStream::connect((at.as_str(), HTTP_PORT)).await?;
            let request = format!("GET / HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            // The whole answer, as a browser reads it. (A visitor that hangs up in the middle of
            // an answer makes runs of one seed diverge; the cause is not found yet.)
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok::<bool, std::io::Error>(answer.starts_with(b"HTTP/1.1 200"))
        })
        .await;
        let ok = matches!(answered, Ok(Ok(true)));
        world.trace(format!(
            "{} asks {at}'s proxy for {domain}: {}",
            host.name,
            if ok { "answered" } else { "not answered" }
        ));
        let mut web = world.web.lock().expect("web lock");
        if ok {
            web.0 += 1;
        } else {
            web.1 += 1;
        }
    }
}

pub(crate) async fn visitors(world: &World, host: &HostState, node: &LogNode, incarnation: u64) {
    let mut rng = StdRng::seed_from_u64(
        world.seed
            ^ ((host.index as u64 + 1) << 32)
            ^ incarnation.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ 0x715,
    );
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2000))).await;
        let targets: Vec<(String, String, u16)> = node.store().with_state(|s| {
            s.services
                .values()
                .filter(|svc| svc.spec.on_demand)
                .filter_map(|svc| {
                    let master = s.members.get(&svc.placement.as_ref()?.master)?;
                    let host = master.addr.split(':').next()?.to_string();
                    Some((svc.spec.name.clone(), host, svc.spec.ports.first()?.host))
                })
                .collect()
        });
        let Some((service, at, port)) = targets.choose(&mut rng).cloned() else { continue };
        let answered = tokio::time::timeout(VISIT_TIMEOUT, async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = turmoil::net::TcpStream::connect((at.as_str(), port)).await?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut answer = [0u8; 12];
            stream.read_exact(&mut answer).await?;
            Ok::<bool, std::io::Error>(answer.starts_with(b"HTTP/1.1 200"))
        })
        .await;
        let ok = matches!(answered, Ok(Ok(true)));
        world.trace(format!(
            "{} visits {service} at {at}: {}",
            host.name,
            if ok { "answered" } else { "no answer" }
        ));
        if ok {
            let at_ms = turmoil::sim_elapsed().unwrap_or_default();
            world.visits.lock().expect("visits lock").insert(service, at_ms);
        }
    }
}

pub(crate) fn error_kind(e: &coyote_log::ProposeError) -> &'static str {
    use coyote_log::ProposeError::*;
    match e {
        Rejected(_) => "rejected",
        NoLeader(_) => "no leader",
        NotLeader => "not leader",
        Forward(_) => "forward failed",
        Uncertain(_) => "outcome unknown",
        DiskFull(_) => "disk full",
        Fatal(_) => "fatal",
    }
}
