//! One seed of the simulation: a turmoil `Sim` with one host per node, the cluster formed through the
//! real join path, services created and placed, a workload and its oracle, a seeded fault schedule
//! (or a hand-written scenario), then a liveness phase.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use coyote_log::store::{self, EventRecord, MemoryDisk};
use coyote_log::tls::{self, ClusterCa, Identity};
use coyote_log::{cluster, Clock, Environment, JoinToken, LogNode, LogNodeConfig, RaftSettings};
use coyote_nodes::activator::ActivatorConfig;
use coyote_nodes::fence::Fence;
use coyote_nodes::monitor::MonitorConfig;
use coyote_nodes::node::{ContainerParts, Node, Parts};
use coyote_nodes::{reconciler, wire};
use coyote_state_machine::{
    spec::NAMESERVERS_MAX, Event, Outcome, Placement, PortMap, ServiceSpec, SwitchCause, ZoneCheck,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::checks::{self, Ack, Links, NodeSnapshot, Timeline};
use crate::model::{image_listening_on, Containers, ModelRuntime, TurmoilProbe};
use crate::scenario::Scenario;
use crate::{net, panics};

/// The port every simulated node serves Raft and the cluster API on.
pub const PORT: u16 = 7100;
/// The cluster id every simulation uses (its CA is made once per process).
pub const CLUSTER_ID: &str = "sim";
/// Most nodes a simulation may have (keys for joiners are made up front).
pub const NODES_MAX: usize = 9;
/// The simulated wall clock starts here (2026-06-01), so `at_ms` is the same in every run.
pub const EPOCH_UNIX_S: u64 = 1_780_272_000;
/// How long a joiner waits before trying again.
const JOIN_RETRY: Duration = Duration::from_millis(500);
/// The secret of the join token the simulated cluster issues.
const TOKEN_SECRET: &str = "simulated-join-secret";
/// The actor of every instructed switch: the simulated admin.
pub const ADMIN_ACTOR: &str = "admin@sim";
/// Services are named `svc1`, `svc2`, ... and listen on ports from here.
const SERVICE_PORT_BASE: u16 = 8000;
/// The containers of on-demand services listen on ports from here (the activator dials them).
const ON_DEMAND_PORT_BASE: u16 = 9000;
/// How long an on-demand container may be idle before the activator stops it.
const IDLE_STOP: Duration = Duration::from_secs(3);
/// How many steps a splice may lag behind the end of its node's serving ([`Driver::check_splices`]).
const SPLICE_LAG_STEPS: u32 = 2;
/// How long a visitor waits for an on-demand service's answer (a cold start included).
const VISIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The checker of switches by failover looks this far back: a host that could reach the master
/// during all of it should have told the log so. Reachability in the log lags the network: a gRPC
/// connection that lost data in a partition hangs until HTTP/2 keep-alive gives up on it (2 s + 3 s)
/// after the partition heals, then 2 good probes (250 ms apart) and a commit (which needs a leader)
/// are needed to report the master reachable again.
pub const REACH_WINDOW_MS: u64 = 8_000;
/// Latency above this makes a link too slow for probes (400 ms timeouts, round trips, handshakes).
const SLOW_LATENCY_MS: u64 = 100;

/// Simulated milliseconds per turmoil step unless `--tick-ms` says otherwise ([`Params::tick`]).
pub const DEFAULT_TICK_MS: u64 = 4;

/// What a run does; the defaults are what CI runs.
#[derive(Clone, Debug)]
pub struct Params {
    pub nodes: usize,
    /// How long the cluster has to form (all nodes voters, one leader) before faults start.
    pub formation: Duration,
    /// How long faults are injected.
    pub faults: Duration,
    /// How long the cluster has to converge after the faults stop.
    pub liveness: Duration,
    /// Simulated time per turmoil step. 4 ms by default: every host's runtime and turmoil's network
    /// are stepped once per tick whatever happens, a fixed cost per step (see `sim/README.md`,
    /// "Speed"), and nothing here acts on a finer scale (heartbeats every 50 ms, elections after
    /// 150–300 ms, probes every 200 ms, latencies up to 20 ms). Messages are delivered at step
    /// boundaries; timers fire at their own instants. On the same code over 1,024 seeds, 4 ms steps
    /// give a failover p99 of 2.82 s against 2.39 s with 2 ms steps (2.68 s over 10,000 seeds), and run
    /// about 1.14 to 1.27 times as fast.
    pub tick: Duration,
    /// How often the checkers run.
    pub check_every: Duration,
    /// Largest message latency outside latency faults.
    pub latency_max: Duration,
    /// Whether the fault schedule crashes and restarts nodes (see `sim/README.md` on determinism).
    pub crashes: bool,
    /// Services created (and placed) after formation.
    pub services: usize,
    /// A hand-written scenario instead of the random fault schedule.
    pub scenario: Option<Scenario>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            nodes: 5,
            formation: Duration::from_secs(30),
            faults: Duration::from_secs(15),
            liveness: Duration::from_secs(30),
            tick: Duration::from_millis(DEFAULT_TICK_MS),
            check_every: Duration::from_millis(500),
            latency_max: Duration::from_millis(20),
            crashes: true,
            services: 4,
            scenario: None,
        }
    }
}

impl Params {
    /// The flags that reproduce these parameters on the command line.
    pub fn flags(&self) -> String {
        let crashes = if self.crashes { "" } else { " --no-crashes" };
        let tick = match self.tick.as_millis() as u64 {
            DEFAULT_TICK_MS => String::new(),
            ms => format!(" --tick-ms {ms}"),
        };
        let scenario = match self.scenario {
            Some(s) => format!(" --scenario {}", s.name()),
            None => String::new(),
        };
        format!(
            "--nodes {} --services {} --fault-secs {} --liveness-secs {}{crashes}{tick}{scenario}",
            self.nodes,
            self.services,
            self.faults.as_secs(),
            self.liveness.as_secs()
        )
    }
}

/// Raft settings in the simulation: production timing, frequent snapshots so that snapshot building
/// and installing are exercised.
fn raft_settings() -> RaftSettings {
    RaftSettings { snapshot_every: 40, keep_logs: 10, ..RaftSettings::default() }
}

/// What one seed gave.
#[derive(Debug)]
pub struct SeedReport {
    pub seed: u64,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    /// SHA-256 over the trace: equal for two runs of one seed.
    pub trace_hash: String,
    pub simulated: Duration,
    pub wall: Duration,
    pub acks: usize,
    pub faults: usize,
    /// Master lost (the fault began) to another node serving, for each failover seen, in simulated ms.
    pub failover_ms: Vec<u64>,
    /// Applied authority switches: by failover, by instruction.
    pub switches: (usize, usize),
    /// Connections the activators spliced to on-demand containers.
    pub spliced: usize,
}

/// Certificates and keys. They are fixed (`sim/fixtures/material.json`), not generated, because the
/// CA's pin is written into the log (`ClusterCreated`): with a new CA per process, a seed replayed in
/// another process would archive different bytes. Regenerate with
/// `cargo test -p coyote-sim --release -- --ignored write_material` (the certificates are valid
/// for 10 years from then, by real time: rustls checks validity against the real clock).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Material {
    ca_cert_pem: String,
    ca_key_pem: String,
    first_cert_pem: String,
    first_key_pem: String,
    /// `(key, csr)` of the joiner at each host index.
    joiner_keys: Vec<(String, String)>,
    #[serde(skip)]
    ca: Option<ClusterCa>,
}

impl Material {
    /// New keys and certificates, for the fixture file.
    pub fn generate() -> Material {
        let ca = ClusterCa::generate(CLUSTER_ID).expect("a CA can be generated");
        let (first_key_pem, csr) = tls::generate_node_key().expect("a node key can be generated");
        let first_cert_pem = ca.sign_node(&csr, 1).expect("the CA signs node 1");
        let joiner_keys =
            (0..NODES_MAX).map(|_| tls::generate_node_key().expect("a node key can be generated")).collect();
        Material {
            ca_cert_pem: ca.cert_pem().to_string(),
            ca_key_pem: ca.key_pem().to_string(),
            first_cert_pem,
            first_key_pem,
            joiner_keys,
            ca: Some(ca),
        }
    }

    fn ca(&self) -> &ClusterCa {
        self.ca.as_ref().expect("loaded with its CA")
    }
}

/// The fixture file the simulation loads its certificates and keys from.
pub const MATERIAL_JSON: &str = include_str!("../fixtures/material.json");

fn material() -> &'static Material {
    static MATERIAL: OnceLock<Material> = OnceLock::new();
    MATERIAL.get_or_init(|| {
        let mut material: Material =
            serde_json::from_str(MATERIAL_JSON).expect("sim/fixtures/material.json is valid");
        let ca =
            ClusterCa::from_pem(&material.ca_cert_pem, &material.ca_key_pem).expect("the fixture CA loads");
        assert!(material.joiner_keys.len() >= NODES_MAX, "the fixtures have a key per possible joiner");
        material.ca = Some(ca);
        material
    })
}

#[cfg(test)]
mod fixtures {
    /// Writes new fixtures (run by hand, see [`super::Material`]).
    #[test]
    #[ignore]
    fn write_material() {
        let json = serde_json::to_string_pretty(&super::Material::generate()).expect("encodes");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/material.json");
        std::fs::write(path, json + "\n").expect("the fixture file is writable");
    }
}

/// What the hosts and the driver share. Everything runs on one thread; the locks are only there
/// because the log's types need `Send`.
struct World {
    seed: u64,
    nodes_expected: usize,
    trace: Mutex<Vec<String>>,
    acks: Mutex<Vec<Ack>>,
    /// The running nodes, by host name.
    running: Mutex<BTreeMap<String, SimNode>>,
    workload: AtomicBool,
    token: JoinToken,
    /// Commands for the simulated admin, by the host whose node proposes them.
    admin: Mutex<BTreeMap<String, VecDeque<Admin>>>,
    /// Extra delay of container starts while a slow-start fault is in force, in ms.
    slow_start_ms: Arc<AtomicU64>,
    /// Simulated time since the epoch after the last step, in ms (the clock outside hosts).
    clock_ms: Arc<AtomicU64>,
    /// The last answer each on-demand service gave a visitor, in simulated time since the start.
    visits: Mutex<BTreeMap<String, Duration>>,
}

/// One running node: its log, its fence, its runtime (to read the fence's clock from outside) and
/// its host's containers.
#[derive(Clone)]
struct SimNode {
    node: LogNode,
    fence: Fence,
    rt: tokio::runtime::Handle,
    containers: Arc<Containers>,
}

impl SimNode {
    /// The services this node's fence lets it serve now, read on its own runtime's clock.
    fn serving(&self) -> Vec<String> {
        let _inside = self.rt.enter();
        self.fence.serving_services()
    }
}

/// Where an answer from a node's runtime lands ([`Driver::confirm_on`]).
pub(crate) type Answer = Arc<Mutex<Option<Result<u64, String>>>>;

/// Where the answer to a proposal lands: its outcome in the log, or why it was not written.
pub(crate) type ProposalAnswer = Arc<Mutex<Option<Result<Outcome, String>>>>;

/// What the simulated admin does (`coyote service create`, `coyote service switch`).
#[derive(Clone, Debug)]
pub enum Admin {
    CreateService(ServiceSpec),
    Switch { service: String, to: u64 },
}

impl World {
    fn trace(&self, line: String) {
        let ms = turmoil::sim_elapsed().map(|d| d.as_millis()).unwrap_or(0);
        self.trace.lock().expect("trace lock").push(format!("{ms:>7} {line}"));
    }
}

/// What survives a crash of one host: its disk, its identity, and whether it created the cluster.
struct HostState {
    name: String,
    index: usize,
    disk: MemoryDisk,
    /// `(node id, certificate, key)` once admitted.
    identity: Mutex<Option<(u64, String, String)>>,
    initialized: AtomicBool,
    starts: AtomicU64,
    containers: Arc<Containers>,
}

/// The wall clock of a simulated node: turmoil's simulated time since the epoch. Outside a host (the
/// driver reading a fence between steps) turmoil has no current host; then the time the driver
/// recorded after its last step.
fn sim_clock(outside: Arc<AtomicU64>) -> Clock {
    Clock::new(move || {
        turmoil::since_epoch().map(|d| d.as_millis() as u64).unwrap_or_else(|| outside.load(Ordering::SeqCst))
    })
}

type HostResult = turmoil::Result;

/// A host's software. Everything runs in runtime tasks (`tokio::spawn`), none on turmoil's `LocalSet`:
/// a crash drops the runtime's tasks inside the runtime's context, but the `LocalSet`'s outside of it.
async fn host_main(world: Arc<World>, host: Arc<HostState>) -> HostResult {
    match tokio::spawn(host_software(world, host)).await {
        Ok(result) => result.map_err(|e| e.to_string().into()),
        Err(e) => Err(format!("the host's software failed: {e}").into()),
    }
}

type SendResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn host_software(world: Arc<World>, host: Arc<HostState>) -> SendResult {
    let incarnation = host.starts.fetch_add(1, Ordering::SeqCst);
    world.trace(format!("{} starts (incarnation {incarnation})", host.name));
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let addr = format!("{}:{PORT}", host.name);
    let material = material();
    let known = host.identity.lock().expect("identity lock").clone();
    let (node_id, cert_pem, key_pem) = match known {
        Some(known) => known,
        None if host.index == 0 => (1, material.first_cert_pem.clone(), material.first_key_pem.clone()),
        None => join(&world, &host, &addr).await,
    };
    *host.identity.lock().expect("identity lock") = Some((node_id, cert_pem.clone(), key_pem.clone()));
    let identity = Identity::from_pem(material.ca().cert_pem(), &cert_pem, &key_pem)?;
    let store = store::open_memory(&host.disk)?;
    let config =
        LogNodeConfig { node_id, cluster_id: CLUSTER_ID.into(), addr: addr.clone(), raft: raft_settings() };
    host.containers.reboot();
    // The node `coyote node` runs, assembled by the same function, from the simulation's parts.
    let node = Node::start(Parts {
        config,
        store,
        identity,
        ca: Some(material.ca().clone()),
        env: Environment { dial: net::dial(), clock: sim_clock(world.clock_ms.clone()) },
        listener: net::PeerListener(listener),
        monitor: MonitorConfig::default(),
        probe: Some(Arc::new(TurmoilProbe)),
        containers: Some(ContainerParts {
            runtime: Arc::new(ModelRuntime(host.containers.clone())),
            reconciler: reconciler::Settings {
                volumes: volumes_dir(&host.name),
                pull: false,
                dump_timeout: Duration::from_secs(10),
            },
            activator: ActivatorConfig { idle_stop: IDLE_STOP, ..ActivatorConfig::default() },
            forwarder: None,
            sockets: Some(Arc::new(net::Sockets)),
        }),
    })
    .await?;
    {
        let fence = node.fence.clone();
        host.containers.set_serving(Arc::new(move |service: &str| fence.serving(service)));
    }
    if host.index == 0 && !host.initialized.load(Ordering::SeqCst) {
        node.log.initialize(material.ca().pin()).await?;
        issue_token(&world, &node.log).await;
        host.initialized.store(true, Ordering::SeqCst);
    }
    {
        let (world, host, api) = (world.clone(), host.clone(), node.api.clone());
        tokio::spawn(async move { admin(&world, &host, api).await });
    }
    let sim_node = SimNode {
        node: node.log.clone(),
        fence: node.fence.clone(),
        rt: tokio::runtime::Handle::current(),
        containers: host.containers.clone(),
    };
    world.running.lock().expect("running lock").insert(host.name.clone(), sim_node);
    world.trace(format!("{} runs node {node_id}", host.name));
    {
        let (world, host, log) = (world.clone(), host.clone(), node.log.clone());
        tokio::spawn(async move { visitors(&world, &host, &log, incarnation).await });
    }
    workload(&world, &host, &node.log, incarnation).await;
    Ok(())
}

/// The reconciler creates each service's volume directory here (the only real file system the
/// simulation touches; nothing reads it).
fn volumes_dir(host: &str) -> std::path::PathBuf {
    std::env::temp_dir().join("coyote-sim-volumes").join(host)
}

/// The spec of the `i`th simulated service (from 1).
/// Services are checked each in another way: `svc1` (and 5, 7, ...) over TCP, `svc2` by an HTTP
/// check, `svc3` by TCP and its DNS zone, whose nameservers are every host that may become its
/// master (only a running container of the service answers). Every fourth (`svc4`, `svc8`, ...) is
/// on demand: the activator listens on its host port and starts its container on the first
/// connection (the monitor's probes and the visitors' requests), which listens on its container
/// port ([`ON_DEMAND_PORT_BASE`] + `i`).
pub fn service_spec(i: usize, nodes: usize) -> ServiceSpec {
    let port = SERVICE_PORT_BASE + i as u16;
    let on_demand = i.is_multiple_of(4);
    let zone = (i.is_multiple_of(3) && !on_demand).then(|| ZoneCheck {
        zone: format!("svc{i}.sim.test"),
        nameservers: (1..=nodes).map(|n| format!("n{n}:{port}")).take(NAMESERVERS_MAX).collect(),
    });
    let (image, container) = if on_demand {
        let container = ON_DEMAND_PORT_BASE + i as u16;
        (image_listening_on(container), container)
    } else {
        ("sim/app:1".to_string(), 80)
    };
    ServiceSpec {
        name: format!("svc{i}"),
        image,
        domains: Vec::new(),
        ports: vec![PortMap { host: port, container }],
        memory_bytes: None,
        on_demand,
        dump: None,
        http_check: (i % 3 == 2).then(|| "/health".to_string()),
        zone,
    }
}

/// Runs the admin's commands queued for this host, one at a time, through this node's API router
/// (the CLI's path, without the unix socket).
async fn admin(world: &World, host: &HostState, api: axum::Router) {
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let next = world.admin.lock().expect("admin lock").get_mut(&host.name).and_then(|q| q.pop_front());
        match next {
            Some(Admin::CreateService(spec)) => create_service(world, &api, spec).await,
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
            None => {}
        }
    }
}

/// `coyote service create`: one request, which the log places. The admin runs it again until the
/// service exists, as a person would after an error.
async fn create_service(world: &World, api: &axum::Router, spec: ServiceSpec) {
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

/// One request to a node's API router, as the simulated admin: its answer, or the status and error.
async fn call<B: serde::Serialize, T: serde::de::DeserializeOwned>(
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
async fn issue_token(world: &World, node: &LogNode) {
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
async fn join(world: &World, host: &HostState, addr: &str) -> (u64, String, String) {
    let (key_pem, csr_pem) = &material().joiner_keys[host.index];
    let dial = net::dial();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match cluster::request_join_with(&world.token, addr, csr_pem, &dial).await {
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
async fn workload(world: &World, host: &HostState, node: &LogNode, incarnation: u64) {
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
async fn visitors(world: &World, host: &HostState, node: &LogNode, incarnation: u64) {
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

fn error_kind(e: &coyote_log::ProposeError) -> &'static str {
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

/// A fault in force, and how to undo it.
#[derive(Debug)]
pub(crate) enum Fault {
    Partition {
        side: Vec<String>,
        rest: Vec<String>,
    },
    /// Messages from `from` to `to` are lost; the other way works.
    OneWay {
        from: Vec<String>,
        to: Vec<String>,
    },
    Hold {
        side: Vec<String>,
        rest: Vec<String>,
    },
    Crash {
        host: String,
    },
    Latency,
    SlowStarts,
    /// Not a fault: the admin instructed a switch (nothing to undo).
    Instructed,
}

/// A master lost by a fault, waiting for another node to serve its service.
struct Loss {
    at: Duration,
    master: String,
    healed: bool,
}

/// Drives one seed.
pub(crate) struct Driver<'a> {
    pub(crate) sim: turmoil::Sim<'a>,
    world: Arc<World>,
    pub(crate) names: Vec<String>,
    pub(crate) params: Params,
    pub(crate) rng: StdRng,
    violations: Vec<String>,
    leaders: Vec<(String, u64)>,
    next_check: Duration,
    pub(crate) faults: usize,
    /// A host failed or panicked: the run stops.
    broken: bool,
    /// The ground truth of the network now, and over time.
    links: Links,
    timeline: Timeline,
    /// The host of each node id seen.
    hosts: BTreeMap<u64, String>,
    /// Who serves each service, as last traced.
    serving: BTreeMap<String, Vec<String>>,
    /// What each running host served after the last step.
    serving_by_host: BTreeMap<String, Vec<String>>,
    /// Each host's archive as read at the last check ([`Driver::archive_of`]).
    archives: std::cell::RefCell<BTreeMap<String, Arc<Vec<EventRecord>>>>,
    /// Masters lost by a fault, by service.
    losses: BTreeMap<String, Loss>,
    failover_ms: Vec<u64>,
    /// How many of the switches found so far are traced.
    switches_traced: usize,
    /// The replay of the archive that finds the switches, advanced at every check.
    replay: checks::Replay,
    /// The service a scenario acts on.
    pub(crate) focus: String,
    /// Connections spliced to on-demand containers so far.
    spliced: usize,
    /// The last step after which each host served each service it no longer serves.
    served_until: BTreeMap<(String, String), Duration>,
}

impl Driver<'_> {
    pub(crate) fn trace(&self, line: String) {
        let ms = self.sim.elapsed().as_millis();
        self.world.trace.lock().expect("trace lock").push(format!("{ms:>7} {line}"));
    }

    pub(crate) fn violation(&mut self, v: String) {
        self.trace(format!("VIOLATION {v}"));
        self.violations.push(v);
    }

    /// One turmoil step, the serving checker, then the other checkers if they are due. False once the
    /// run cannot go on.
    fn step(&mut self) -> bool {
        if let Err(e) = self.sim.step() {
            self.violation(format!("a host failed: {e}"));
            self.broken = true;
        }
        for panic in panics::take() {
            self.violation(format!("panic: {panic}"));
            self.broken = true;
        }
        self.world.clock_ms.store(self.sim.since_epoch().as_millis() as u64, Ordering::SeqCst);
        self.check_splices();
        self.check_serving();
        if self.sim.elapsed() >= self.next_check {
            self.next_check = self.sim.elapsed() + self.params.check_every;
            self.check();
        }
        !self.broken
    }

    /// After every step, before [`Self::check_serving`] looks: every connection an on-demand
    /// container accepted came from an activator on a node that served the service. The activator
    /// decides to splice one step before the container accepts (turmoil delivers a connection to
    /// the host's own address a step later), and a host reads the time of a step a step apart from
    /// the driver, so a connection is also allowed when the node served the service up to
    /// [`SPLICE_LAG_STEPS`] steps before. (The fence's drift margin covers far more than that lag.)
    fn check_splices(&mut self) {
        let splices: Vec<(String, crate::model::Splice)> = {
            let running = self.world.running.lock().expect("running lock");
            running
                .iter()
                .flat_map(|(host, n)| n.containers.take_splices().into_iter().map(|s| (host.clone(), s)))
                .collect()
        };
        for (host, splice) in splices {
            self.spliced += 1;
            let lag = self.params.tick * SPLICE_LAG_STEPS;
            let served_before = self.serving_by_host.get(&host).is_some_and(|s| s.contains(&splice.service))
                || self
                    .served_until
                    .get(&(host.clone(), splice.service.clone()))
                    .is_some_and(|until| *until + lag >= splice.at);
            if !splice.serving && !served_before {
                self.violation(checks::spliced_while_not_serving(&host, &splice.service, splice.at));
                self.broken = true;
            }
        }
    }

    /// After every step: at most one node serves each service; failover times.
    fn check_serving(&mut self) {
        let by_host: BTreeMap<String, Vec<String>> = {
            let running = self.world.running.lock().expect("running lock");
            // Most steps change nothing: then the verdict and the failover times stay as they were.
            let mut serving = running.values().map(SimNode::serving);
            let unchanged = running.len() == self.serving_by_host.len()
                && running
                    .keys()
                    .zip(&self.serving_by_host)
                    .all(|(host, (was_host, was))| host == was_host && serving.next().as_ref() == Some(was));
            if unchanged {
                return;
            }
            running.iter().map(|(h, n)| (h.clone(), n.serving())).collect()
        };
        let before = self.sim.elapsed().saturating_sub(self.params.tick);
        for (host, was) in &self.serving_by_host {
            for service in was.iter().filter(|s| by_host.get(host).is_none_or(|now| !now.contains(s))) {
                self.served_until.insert((host.clone(), service.clone()), before);
            }
        }
        self.serving_by_host = by_host.clone();
        let found = checks::at_most_one_serving(&by_host);
        if !found.is_empty() {
            self.broken = true;
        }
        for v in found {
            self.violation(v);
        }
        let mut by_service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (host, services) in &by_host {
            for s in services {
                by_service.entry(s.clone()).or_default().push(host.clone());
            }
        }
        if by_service != self.serving {
            let now = self.sim.elapsed();
            let mut lines = Vec::new();
            for (service, loss) in &self.losses {
                let hosts = by_service.get(service).cloned().unwrap_or_default();
                if hosts.iter().any(|h| *h != loss.master) {
                    let ms = (now - loss.at).as_millis() as u64;
                    // The new master serves at least a lease after its switch was applied, so the
                    // archive checked every 500 ms already holds the switch: count only failovers.
                    let cause = self.switches().iter().rev().find(|s| s.service == *service).map(|s| s.cause);
                    if cause == Some(SwitchCause::Failover) {
                        self.failover_ms.push(ms);
                        lines.push(format!("failover of {service} from {}: {ms} ms", loss.master));
                    } else {
                        lines.push(format!("{service} served again after {ms} ms, not by a failover"));
                    }
                }
            }
            self.losses.retain(|service, loss| {
                let hosts = by_service.get(service).cloned().unwrap_or_default();
                let failed_over = hosts.iter().any(|h| *h != loss.master);
                let back = loss.healed && hosts.contains(&loss.master);
                !failed_over && !back
            });
            let all = self.world_services();
            let served: Vec<String> = all
                .iter()
                .map(|s| format!("{s}={}", by_service.get(s).map(|h| h.join("+")).unwrap_or("-".into())))
                .collect();
            self.trace(format!("serving {}", served.join(" ")));
            for line in lines {
                self.trace(line);
            }
            self.serving = by_service;
        }
    }

    fn world_services(&self) -> Vec<String> {
        (1..=self.params.services).map(|i| format!("svc{i}")).collect()
    }

    pub(crate) fn snapshots(&self) -> Vec<NodeSnapshot> {
        self.snapshots_of(true)
    }

    /// Snapshots without the archives (empty), for the convergence checks, which run every 100 ms of
    /// simulated time and need no events: reading five archives each time was a tenth of a run.
    fn light_snapshots(&self) -> Vec<NodeSnapshot> {
        self.snapshots_of(false)
    }

    /// The archive of `host`'s node: the copy read at the last check, extended by the events applied
    /// since. Read again in full when the node's archive no longer ends as the copy does (it shrank
    /// after a restart, or an event was replaced): reading every archive in full at every check was a
    /// tenth of a run.
    fn archive_of(&self, host: &str, store: &store::StoreHandle) -> Arc<Vec<EventRecord>> {
        let mut archives = self.archives.borrow_mut();
        let copy = archives.entry(host.to_string()).or_default();
        let have = copy.last().map(|r| r.envelope.index).unwrap_or(0);
        let read = |from: u64| store.events(from, usize::MAX).expect("the archive reads");
        if store.last_event() != have {
            // From the copy's last event, which must still be there, unchanged.
            let fresh = read(have.max(1));
            let continues = have == 0 || fresh.first().is_some_and(|first| Some(first) == copy.last());
            if continues {
                let new = fresh.into_iter().skip(usize::from(have > 0));
                Arc::make_mut(copy).extend(new);
            } else {
                *copy = Arc::new(read(1));
            }
        }
        copy.clone()
    }

    fn snapshots_of(&self, with_archive: bool) -> Vec<NodeSnapshot> {
        let running = self.world.running.lock().expect("running lock");
        running
            .iter()
            .map(|(host, sim_node)| {
                let node = &sim_node.node;
                let m = node.raft().metrics().borrow().clone();
                let store = node.store();
                let log_applied = store.last_applied();
                let applied = store.last_event();
                let archive = if with_archive { self.archive_of(host, store) } else { Arc::default() };
                let (members, placements) = store.with_state(|s| {
                    let members = s.members.keys().copied().collect();
                    let placements =
                        s.services.iter().map(|(n, svc)| (n.clone(), svc.placement.clone())).collect();
                    (members, placements)
                });
                NodeSnapshot {
                    host: host.clone(),
                    node_id: node.id(),
                    is_leader: m.state == openraft::ServerState::Leader,
                    term: m.current_term,
                    leader: m.current_leader,
                    applied,
                    log_applied,
                    archive,
                    voters: m.membership_config.membership().voter_ids().collect(),
                    members,
                    placements,
                    serving: sim_node.serving(),
                    containers: sim_node.containers.running(),
                }
            })
            .collect()
    }

    /// The authority switches applied so far, as of the last check.
    pub(crate) fn switches(&self) -> &[checks::Switch] {
        self.replay.switches()
    }

    fn check(&mut self) {
        let nodes = self.snapshots();
        for n in &nodes {
            self.hosts.insert(n.node_id, n.host.clone());
        }
        let acks = self.world.acks.lock().expect("acks lock").clone();
        let mut found = checks::prefixes_agree(&nodes);
        found.extend(checks::no_ack_lost(&nodes, &acks));
        found.extend(checks::one_leader_per_term(&nodes));
        found.extend(checks::roles_well_formed(&nodes));
        if let Some(longest) = nodes.iter().max_by_key(|n| n.applied) {
            match self.replay.advance(&longest.archive) {
                Ok(()) => {
                    let switches = self.replay.switches();
                    found.extend(checks::switches_authorised(switches, ADMIN_ACTOR));
                    found.extend(checks::authority_moved_only_by_switches(self.replay.moves()));
                    let window = REACH_WINDOW_MS;
                    let epoch_ms = EPOCH_UNIX_S * 1000;
                    found.extend(checks::no_switch_while_master_reachable(
                        switches,
                        &self.timeline,
                        &self.hosts,
                        window,
                        epoch_ms,
                    ));
                    let lines: Vec<String> = switches[self.switches_traced..]
                        .iter()
                        .map(|s| {
                            format!(
                                "switch at {}: {} from node {} to node {} ({:?}, by {})",
                                s.index, s.service, s.before.master, s.to, s.cause, s.actor
                            )
                        })
                        .collect();
                    self.switches_traced = switches.len();
                    for line in lines {
                        self.trace(line);
                    }
                }
                Err(e) => found.push(format!("archive: {} cannot be replayed: {e}", longest.host)),
            }
        }
        // The first violations end the run: later checks would only repeat them.
        if !found.is_empty() {
            self.broken = true;
        }
        for v in found {
            self.violation(v);
        }
        let leaders: Vec<(String, u64)> =
            nodes.iter().filter(|n| n.is_leader).map(|n| (n.host.clone(), n.term)).collect();
        if leaders != self.leaders {
            self.trace(format!("leaders {leaders:?}"));
            self.leaders = leaders;
        }
    }

    fn run_until(&mut self, end: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        while self.sim.elapsed() < end {
            if !self.step() {
                return false;
            }
            if done(self) {
                return true;
            }
        }
        false
    }

    /// Runs for `d` of simulated time; false once the run cannot go on.
    pub(crate) fn run_for(&mut self, d: Duration) -> bool {
        let end = self.sim.elapsed() + d;
        while self.sim.elapsed() < end {
            if !self.step() {
                return false;
            }
        }
        true
    }

    /// Whether the log converged and every service is served by its master alone.
    fn all_converged(&self) -> Result<(), String> {
        let nodes = self.light_snapshots();
        checks::converged(&nodes, self.params.nodes)?;
        checks::services_converged(&nodes, self.params.services)
    }

    fn formation(&mut self) -> bool {
        let end = self.sim.elapsed() + self.params.formation;
        let expected = self.params.nodes;
        let mut probe = Duration::ZERO;
        let formed = self.run_until(end, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            checks::converged(&d.light_snapshots(), expected).is_ok()
        });
        if !formed {
            if !self.broken {
                let why = checks::converged(&self.snapshots(), expected).err().unwrap_or_default();
                self.violation(format!(
                    "formation: the cluster did not form within {:?}: {why}",
                    self.params.formation
                ));
            }
            return false;
        }
        self.trace("formed".into());
        // The admin creates the services through node 1 (`coyote service create`).
        for i in 1..=self.params.services {
            self.admin(&self.names[0].clone(), Admin::CreateService(service_spec(i, self.params.nodes)));
        }
        let mut probe = Duration::ZERO;
        let served = self.run_until(end + self.params.formation, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            d.all_converged().is_ok()
        });
        if served {
            self.trace("services served".into());
        } else if !self.broken {
            let why = self.all_converged().err().unwrap_or_default();
            self.violation(format!("formation: the services were not served in time: {why}"));
        }
        served
    }

    /// Asks the node of `host`, on its own runtime, to confirm its leadership with a quorum, as a
    /// master's fence does before it serves on (`LogNode::confirm_quorum`); the answer (the read index,
    /// or why not) lands in the returned cell. None if the host is not running.
    pub(crate) fn confirm_on(&self, host: &str, timeout: Duration) -> Option<Answer> {
        let running = self.world.running.lock().expect("running lock");
        let sim_node = running.get(host)?;
        let answer: Answer = Arc::default();
        let (node, cell) = (sim_node.node.clone(), answer.clone());
        sim_node.rt.spawn(async move {
            let result = node.confirm_quorum(timeout).await.map_err(|e| e.to_string());
            *cell.lock().expect("answer lock") = Some(result);
        });
        Some(answer)
    }

    /// Proposes `event` as `actor` through the node of `host`, on its own runtime, as that node's
    /// monitor or reconciler would; the answer lands in the returned cell. None if the host is not
    /// running.
    pub(crate) fn propose_on(&mut self, host: &str, event: Event, actor: String) -> Option<ProposalAnswer> {
        self.trace(format!("proposing through {host} as {actor}: {event:?}"));
        let running = self.world.running.lock().expect("running lock");
        let sim_node = running.get(host)?;
        let answer: ProposalAnswer = Arc::default();
        let (node, cell) = (sim_node.node.clone(), answer.clone());
        sim_node.rt.spawn(async move {
            let result = node.propose(event, actor).await.map(|p| p.outcome).map_err(|e| e.to_string());
            *cell.lock().expect("answer lock") = Some(result);
        });
        Some(answer)
    }

    pub(crate) fn admin(&mut self, host: &str, command: Admin) {
        self.trace(format!("admin via {host}: {command:?}"));
        self.world.admin.lock().expect("admin lock").entry(host.to_string()).or_default().push_back(command);
    }

    fn pick_side(&mut self) -> (Vec<String>, Vec<String>) {
        let mut names = self.names.clone();
        names.shuffle(&mut self.rng);
        let size = self.rng.gen_range(1..=self.names.len() / 2);
        let rest = names.split_off(size);
        (names, rest)
    }

    pub(crate) fn leader_id(&self) -> Option<u64> {
        self.light_snapshots().into_iter().find(|n| n.is_leader).map(|n| n.node_id)
    }

    pub(crate) fn leader_host(&self) -> Option<String> {
        self.light_snapshots().into_iter().find(|n| n.is_leader).map(|n| n.host)
    }

    /// The placement of `service` in the leader's state (else the most advanced node's).
    pub(crate) fn placement(&self, service: &str) -> Option<Placement> {
        let nodes = self.light_snapshots();
        let node = nodes.iter().find(|n| n.is_leader).or_else(|| nodes.iter().max_by_key(|n| n.applied))?;
        node.placements.get(service).cloned().flatten()
    }

    /// The host of node `id`.
    pub(crate) fn host_of(&self, id: u64) -> Option<String> {
        let running = self.world.running.lock().expect("running lock");
        running
            .iter()
            .find(|(_, n)| n.node.id() == id)
            .map(|(h, _)| h.clone())
            .or_else(|| self.hosts.get(&id).cloned())
    }

    /// The node id of `host`.
    pub(crate) fn id_of(&self, host: &str) -> Option<u64> {
        let running = self.world.running.lock().expect("running lock");
        running
            .get(host)
            .map(|n| n.node.id())
            .or_else(|| self.hosts.iter().find(|(_, h)| *h == host).map(|(id, _)| *id))
    }

    pub(crate) fn running_hosts(&self) -> Vec<String> {
        self.world.running.lock().expect("running lock").keys().cloned().collect()
    }

    fn record_links(&mut self) {
        let ms = self.sim.elapsed().as_millis() as u64;
        self.timeline.record(ms, self.links.clone());
    }

    /// Masters that `fault` cuts off from the majority: their services start a failover clock.
    fn note_losses(&mut self, lost_hosts: &[String]) {
        let now = self.sim.elapsed();
        for service in self.world_services() {
            let Some(p) = self.placement(&service) else { continue };
            let Some(master) = self.host_of(p.master) else { continue };
            if lost_hosts.contains(&master) && !self.losses.contains_key(&service) {
                self.losses.insert(service, Loss { at: now, master, healed: false });
            }
        }
    }

    pub(crate) fn start(&mut self, fault: Fault) -> Fault {
        self.faults += 1;
        match &fault {
            Fault::Partition { side, rest } => {
                self.partition(side, rest, true);
                let lost = side.clone();
                self.note_losses(&lost);
            }
            Fault::OneWay { from, to } => {
                for a in from {
                    for b in to {
                        self.sim.partition_oneway(a.as_str(), b.as_str());
                        self.links.cut.insert((a.clone(), b.clone()));
                    }
                }
                // A host none of whose messages get out is lost as surely as an isolated one.
                if from.len() == 1 && to.len() + 1 == self.names.len() {
                    let lost = from.clone();
                    self.note_losses(&lost);
                }
            }
            Fault::Hold { side, rest } => {
                for a in side {
                    for b in rest {
                        self.sim.hold(a.as_str(), b.as_str());
                        self.links.cut.insert((a.clone(), b.clone()));
                        self.links.cut.insert((b.clone(), a.clone()));
                    }
                }
                let lost = side.clone();
                self.note_losses(&lost);
            }
            Fault::Crash { host } => {
                self.note_losses(std::slice::from_ref(host));
                // Dropped after the crash, when its runtime is gone: dropping it earlier, from outside
                // that runtime, would wake its tasks from here.
                let node = self.world.running.lock().expect("running lock").remove(host);
                self.sim.crash(host.as_str());
                drop(node);
                self.links.down.insert(host.clone());
            }
            Fault::Latency => {
                let ms = self.rng.gen_range(50..1000);
                self.sim.set_max_message_latency(Duration::from_millis(ms));
                self.links.slow = ms > SLOW_LATENCY_MS;
                self.trace(format!("fault: latency up to {ms} ms"));
            }
            Fault::SlowStarts => {
                let ms = self.rng.gen_range(1000..3000);
                self.world.slow_start_ms.store(ms, Ordering::SeqCst);
                self.trace(format!("fault: container starts take {ms} ms more"));
            }
            Fault::Instructed => {}
        }
        self.record_links();
        if !matches!(fault, Fault::Latency | Fault::SlowStarts) {
            self.trace(format!("fault: {fault:?}"));
        }
        fault
    }

    fn random_fault(&mut self) -> Fault {
        match self.rng.gen_range(0..10) {
            0 => {
                let (side, rest) = self.pick_side();
                Fault::Partition { side, rest }
            }
            1 => {
                let (side, rest) = match self.leader_host() {
                    Some(leader) => self.isolate(&leader),
                    None => self.pick_side(),
                };
                Fault::Partition { side, rest }
            }
            2 if self.params.crashes => {
                let host = self.names.choose(&mut self.rng).expect("nodes").clone();
                Fault::Crash { host }
            }
            2 | 3 => {
                let (side, rest) = self.pick_side();
                Fault::Hold { side, rest }
            }
            4 => Fault::Latency,
            5 => {
                let (from, to) = self.pick_side();
                Fault::OneWay { from, to }
            }
            6 | 7 => {
                // Isolate the master of a service (in one of two ways).
                let service = format!("svc{}", self.rng.gen_range(1..=self.params.services.max(1)));
                let master = self.placement(&service).and_then(|p| self.host_of(p.master));
                let (side, rest) = match master {
                    Some(master) => self.isolate(&master),
                    None => self.pick_side(),
                };
                if self.rng.gen_bool(0.5) {
                    Fault::Partition { side, rest }
                } else {
                    // Only the master's outgoing messages are lost.
                    Fault::OneWay { from: side, to: rest }
                }
            }
            8 => Fault::SlowStarts,
            _ => {
                // The admin switches a service to one of its backups or its failover.
                let service = format!("svc{}", self.rng.gen_range(1..=self.params.services.max(1)));
                let candidates: Vec<u64> =
                    self.placement(&service).map(|p| p.nodes().skip(1).collect()).unwrap_or_default();
                let via = self.running_hosts();
                if let (Some(to), Some(via)) = (candidates.choose(&mut self.rng), via.choose(&mut self.rng)) {
                    let (to, via) = (*to, via.clone());
                    self.admin(&via, Admin::Switch { service, to });
                }
                Fault::Instructed
            }
        }
    }

    pub(crate) fn isolate(&self, host: &str) -> (Vec<String>, Vec<String>) {
        let rest = self.names.iter().filter(|n| *n != host).cloned().collect();
        (vec![host.to_string()], rest)
    }

    fn partition(&mut self, side: &[String], rest: &[String], cut: bool) {
        for a in side {
            for b in rest {
                if cut {
                    self.sim.partition(a.as_str(), b.as_str());
                    self.links.cut.insert((a.clone(), b.clone()));
                    self.links.cut.insert((b.clone(), a.clone()));
                } else {
                    self.sim.repair(a.as_str(), b.as_str());
                    self.links.cut.remove(&(a.clone(), b.clone()));
                    self.links.cut.remove(&(b.clone(), a.clone()));
                }
            }
        }
    }

    pub(crate) fn end(&mut self, fault: Fault) {
        self.trace(format!("heal: {fault:?}"));
        match fault {
            Fault::Partition { side, rest } => self.partition(&side, &rest, false),
            Fault::OneWay { from, to } => {
                for a in &from {
                    for b in &to {
                        self.sim.repair_oneway(a.as_str(), b.as_str());
                        self.links.cut.remove(&(a.clone(), b.clone()));
                    }
                }
            }
            Fault::Hold { side, rest } => {
                for a in &side {
                    for b in &rest {
                        self.sim.release(a.as_str(), b.as_str());
                        self.links.cut.remove(&(a.clone(), b.clone()));
                        self.links.cut.remove(&(b.clone(), a.clone()));
                    }
                }
            }
            Fault::Crash { host } => {
                self.sim.bounce(host.as_str());
                self.links.down.remove(&host);
            }
            Fault::Latency => {
                self.sim.set_max_message_latency(self.params.latency_max);
                self.links.slow = false;
            }
            Fault::SlowStarts => self.world.slow_start_ms.store(0, Ordering::SeqCst),
            Fault::Instructed => {}
        }
        for loss in self.losses.values_mut() {
            loss.healed = true;
        }
        self.record_links();
    }

    fn faults(&mut self) -> bool {
        let end = self.sim.elapsed() + self.params.faults;
        let mut active: Option<(Fault, Duration)> = None;
        let mut next_fault = self.sim.elapsed() + Duration::from_millis(self.rng.gen_range(200..2000));
        while self.sim.elapsed() < end {
            let now = self.sim.elapsed();
            match active.take() {
                Some((fault, until)) if now >= until => {
                    self.end(fault);
                    next_fault = now + Duration::from_millis(self.rng.gen_range(200..3000));
                }
                Some(still) => active = Some(still),
                None if now >= next_fault => {
                    let fault = self.random_fault();
                    let fault = self.start(fault);
                    let until = now + Duration::from_millis(self.rng.gen_range(500..6000));
                    active = Some((fault, until));
                }
                None => {}
            }
            if !self.step() {
                return false;
            }
        }
        if let Some((fault, _)) = active {
            self.end(fault);
        }
        true
    }

    /// Formation, faults (or a scenario), liveness.
    fn play(&mut self) {
        if !self.formation() {
            return;
        }
        let ok = match self.params.scenario {
            Some(scenario) => scenario.run(self),
            None => self.faults(),
        };
        if !ok {
            return;
        }
        self.liveness();
        if let Some(scenario) = self.params.scenario {
            if !self.broken {
                self.check();
                for v in scenario.expect(self) {
                    self.violation(v);
                }
            }
        }
    }

    /// Once the cluster has converged, every on-demand service answers a visitor before `end`: its
    /// master holds the first connection while it starts the container, then serves it.
    fn visited_after_convergence(&mut self, end: Duration) {
        let since = self.sim.elapsed();
        let on_demand: Vec<String> = (1..=self.params.services)
            .map(|i| service_spec(i, self.params.nodes))
            .filter(|spec| spec.on_demand)
            .map(|spec| spec.name)
            .collect();
        let answered = |d: &mut Self| {
            let visits = d.world.visits.lock().expect("visits lock");
            on_demand.iter().all(|s| visits.get(s).is_some_and(|at| *at >= since))
        };
        if !self.run_until(end.max(since + VISIT_TIMEOUT * 2), answered) && !self.broken {
            let visits = self.world.visits.lock().expect("visits lock").clone();
            let silent: Vec<&String> =
                on_demand.iter().filter(|s| visits.get(*s).is_none_or(|at| *at < since)).collect();
            self.violation(format!(
                "liveness: on-demand services {silent:?} answered no visitor after the cluster converged at {} ms",
                since.as_millis()
            ));
        }
    }

    fn liveness(&mut self) {
        self.world.workload.store(false, Ordering::SeqCst);
        self.trace("faults over; workload stopped".into());
        let end = self.sim.elapsed() + self.params.liveness;
        let mut probe = Duration::ZERO;
        let converged = self.run_until(end, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            d.all_converged().is_ok()
        });
        if self.broken {
            return;
        }
        if !converged {
            let why = self.all_converged().err().unwrap_or_default();
            self.violation(format!(
                "liveness: no convergence within {:?} after healing: {why}",
                self.params.liveness
            ));
            return;
        }
        self.trace("converged".into());
        self.check();
        self.visited_after_convergence(end);
        if self.broken {
            return;
        }
        let nodes = self.snapshots();
        let acked_max = self.world.acks.lock().expect("acks lock").iter().map(|a| a.index).max();
        let applied = nodes.iter().map(|n| n.applied).min().unwrap_or(0);
        if let Some(acked) = acked_max.filter(|a| *a > applied) {
            self.violation(format!(
                "lost ack: index {acked} was acknowledged, the cluster converged at {applied}"
            ));
        }
        for node in &nodes {
            let mut hash = Sha256::new();
            for record in node.archive.iter() {
                hash.update(coyote_state_machine::encode(record));
            }
            let line = format!(
                "final {} applied {} archive {}",
                node.host,
                node.applied,
                hex::encode(hash.finalize())
            );
            self.trace(line);
        }
    }
}

/// tokio numbers every task from one counter per process, and a current-thread runtime keeps its
/// tasks in [`TASK_ID_ALIGN`] or fewer lists chosen by that number, which it empties list by list
/// when it is dropped, as turmoil drops a crashed host's runtime. So the order in which a crashed
/// node's tasks were dropped (and its connections sent their last segments, each drawing turmoil's
/// random latency) depended on how many tasks the process had made before the seed: a seed with a
/// crash gave another trace after other seeds than alone. Each seed now starts with the counter at a
/// multiple of [`TASK_ID_ALIGN`], spending the numbers up to it on empty tasks.
fn align_task_ids() {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else { return };
    for _ in 0..TASK_ID_ALIGN {
        let id: u64 = rt.spawn(async {}).id().to_string().parse().unwrap_or(0);
        if (id + 1).is_multiple_of(TASK_ID_ALIGN) {
            return;
        }
    }
}

/// A multiple of the number of task lists of a current-thread tokio runtime (4 in tokio 1.54).
const TASK_ID_ALIGN: u64 = 64;

/// Runs one seed to the end and reports.
pub fn run_seed(seed: u64, params: &Params) -> SeedReport {
    assert!(
        (1..=NODES_MAX).contains(&params.nodes),
        "a simulation has between 1 and {NODES_MAX} nodes, not {}",
        params.nodes
    );
    assert!(!params.tick.is_zero(), "a simulation step must last at least 1 ms (a step of 0 never ends)");
    let wall = Instant::now();
    let material = material();
    coyote_log::runtime::seed_thread_rng(seed);
    align_task_ids();
    let guard = panics::Capture::start();
    let token = JoinToken {
        addr: format!("n1:{PORT}"),
        ca_pin: material.ca().pin(),
        id: "simtoken".into(),
        secret: TOKEN_SECRET.into(),
    };
    let slow_start_ms = Arc::new(AtomicU64::new(0));
    let world = Arc::new(World {
        seed,
        nodes_expected: params.nodes,
        trace: Mutex::new(Vec::new()),
        acks: Mutex::new(Vec::new()),
        running: Mutex::new(BTreeMap::new()),
        workload: AtomicBool::new(true),
        token,
        admin: Mutex::new(BTreeMap::new()),
        slow_start_ms: slow_start_ms.clone(),
        clock_ms: Arc::new(AtomicU64::new(EPOCH_UNIX_S * 1000)),
        visits: Mutex::new(BTreeMap::new()),
    });
    let sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(24 * 3600))
        .tick_duration(params.tick)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_UNIX_S))
        .max_message_latency(params.latency_max)
        .rng_seed(seed)
        // Held links release everything at once: dozens of reconnection attempts (pings, probes,
        // Raft) can reach one listener in a step, beyond turmoil's default backlog of 64, on which
        // turmoil panics.
        .tcp_capacity(1024)
        .build();
    let names: Vec<String> = (1..=params.nodes).map(|i| format!("n{i}")).collect();
    let mut driver = Driver {
        sim,
        world: world.clone(),
        names: names.clone(),
        params: params.clone(),
        rng: StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED),
        violations: Vec::new(),
        leaders: Vec::new(),
        next_check: Duration::ZERO,
        faults: 0,
        broken: false,
        links: Links::default(),
        timeline: Timeline::default(),
        hosts: BTreeMap::new(),
        serving: BTreeMap::new(),
        serving_by_host: BTreeMap::new(),
        archives: Default::default(),
        losses: BTreeMap::new(),
        failover_ms: Vec::new(),
        switches_traced: 0,
        replay: checks::Replay::default(),
        focus: String::new(),
        spliced: 0,
        served_until: BTreeMap::new(),
    };
    driver.record_links();
    for (index, name) in names.iter().enumerate() {
        let container_seed = seed ^ ((index as u64 + 1) << 48) ^ 0xC0_0C;
        let host = Arc::new(HostState {
            name: name.clone(),
            index,
            disk: MemoryDisk::new().expect("an in-memory store"),
            identity: Mutex::new(None),
            initialized: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            containers: Arc::new(Containers::new(container_seed, slow_start_ms.clone(), name)),
        });
        let world = world.clone();
        driver.sim.host(name.as_str(), move || host_main(world.clone(), host.clone()));
    }
    let played = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.play()));
    if played.is_err() {
        let panics = panics::take();
        driver.violation(format!("panic in the driver or a checker: {}", panics.join("; ")));
    }
    let simulated = driver.sim.elapsed();
    let faults = driver.faults;
    let spliced = driver.spliced;
    let violations = std::mem::take(&mut driver.violations);
    let failover_ms = std::mem::take(&mut driver.failover_ms);
    let switches = (
        driver.switches().iter().filter(|s| s.cause == SwitchCause::Failover).count(),
        driver.switches().iter().filter(|s| s.cause.instructed()).count(),
    );
    world.running.lock().expect("running lock").clear();
    drop(driver);
    drop(guard);
    coyote_log::runtime::unseed_thread_rng();
    let trace = std::mem::take(&mut *world.trace.lock().expect("trace lock"));
    let acks = world.acks.lock().expect("acks lock").len();
    let mut hash = Sha256::new();
    for line in &trace {
        hash.update(line.as_bytes());
        hash.update(b"\n");
    }
    let trace_hash = hex::encode(hash.finalize());
    SeedReport {
        seed,
        violations,
        trace,
        trace_hash,
        simulated,
        wall: wall.elapsed(),
        acks,
        faults,
        failover_ms,
        switches,
        spliced,
    }
}
