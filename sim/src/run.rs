//! One seed of the simulation: a turmoil `Sim` with one host per node, the cluster formed through the
//! real join path, a workload and its oracle, a seeded fault schedule, then a liveness phase.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use coyote_log::store::{self, MemoryDisk};
use coyote_log::tls::{self, ClusterCa, Identity};
use coyote_log::{cluster, Clock, Environment, JoinToken, LogNode, LogNodeConfig, RaftSettings};
use coyote_state_machine::{Event, Outcome};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::checks::{self, Ack, NodeSnapshot};
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
    /// Simulated time per turmoil step.
    pub tick: Duration,
    /// How often the checkers run.
    pub check_every: Duration,
    /// Largest message latency outside latency faults.
    pub latency_max: Duration,
    /// Whether the fault schedule crashes and restarts nodes (see `sim/README.md` on determinism).
    pub crashes: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            nodes: 5,
            formation: Duration::from_secs(30),
            faults: Duration::from_secs(20),
            liveness: Duration::from_secs(30),
            tick: Duration::from_millis(1),
            check_every: Duration::from_millis(500),
            latency_max: Duration::from_millis(20),
            crashes: true,
        }
    }
}

impl Params {
    /// The flags that reproduce these parameters on the command line.
    pub fn flags(&self) -> String {
        let crashes = if self.crashes { "" } else { " --no-crashes" };
        format!(
            "--nodes {} --fault-secs {} --liveness-secs {}{crashes}",
            self.nodes,
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
    running: Mutex<BTreeMap<String, LogNode>>,
    workload: AtomicBool,
    token: JoinToken,
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
}

fn sim_clock() -> Clock {
    Clock::new(|| turmoil::since_epoch().map(|d| d.as_millis() as u64).unwrap_or(0))
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
    let (log, sm, handle) = store::open_memory(&host.disk)?;
    let config =
        LogNodeConfig { node_id, cluster_id: CLUSTER_ID.into(), addr: addr.clone(), raft: raft_settings() };
    let env = Environment { dial: net::dial(), clock: sim_clock() };
    let node =
        LogNode::start_in(config, log, sm, handle, &identity, Some(material.ca().clone()), env).await?;
    {
        let node = node.clone();
        let incoming = net::incoming(listener, node.server_tls());
        tokio::spawn(async move { node.serve(incoming, std::future::pending()).await });
    }
    {
        let node = node.clone();
        tokio::spawn(async move { node.run_membership(std::future::pending()).await });
    }
    if host.index == 0 && !host.initialized.load(Ordering::SeqCst) {
        node.initialize(material.ca().pin()).await?;
        issue_token(&world, &node).await;
        host.initialized.store(true, Ordering::SeqCst);
    }
    world.running.lock().expect("running lock").insert(host.name.clone(), node.clone());
    world.trace(format!("{} runs node {node_id}", host.name));
    workload(&world, &host, &node, incarnation).await;
    Ok(())
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
enum Fault {
    Partition { side: Vec<String>, rest: Vec<String> },
    Hold { side: Vec<String>, rest: Vec<String> },
    Crash { host: String },
    Latency,
}

/// Drives one seed.
struct Driver<'a> {
    sim: turmoil::Sim<'a>,
    world: Arc<World>,
    names: Vec<String>,
    params: Params,
    rng: StdRng,
    violations: Vec<String>,
    leaders: Vec<(String, u64)>,
    next_check: Duration,
    faults: usize,
    /// A host failed or panicked: the run stops.
    broken: bool,
}

impl Driver<'_> {
    fn trace(&self, line: String) {
        let ms = self.sim.elapsed().as_millis();
        self.world.trace.lock().expect("trace lock").push(format!("{ms:>7} {line}"));
    }

    fn violation(&mut self, v: String) {
        self.trace(format!("VIOLATION {v}"));
        self.violations.push(v);
    }

    /// One turmoil step, then the checkers if one is due. False once the run cannot go on.
    fn step(&mut self) -> bool {
        if let Err(e) = self.sim.step() {
            self.violation(format!("a host failed: {e}"));
            self.broken = true;
        }
        for panic in panics::take() {
            self.violation(format!("panic: {panic}"));
            self.broken = true;
        }
        if self.sim.elapsed() >= self.next_check {
            self.next_check = self.sim.elapsed() + self.params.check_every;
            self.check();
        }
        !self.broken
    }

    fn snapshots(&self) -> Vec<NodeSnapshot> {
        let running = self.world.running.lock().expect("running lock");
        running
            .iter()
            .map(|(host, node)| {
                let m = node.raft().metrics().borrow().clone();
                let store = node.store();
                let log_applied = store.last_applied();
                let applied = store.last_event();
                let archive = store.events(0, usize::MAX).expect("the archive reads");
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
                }
            })
            .collect()
    }

    fn check(&mut self) {
        let nodes = self.snapshots();
        let acks = self.world.acks.lock().expect("acks lock").clone();
        let mut found = checks::prefixes_agree(&nodes);
        found.extend(checks::no_ack_lost(&nodes, &acks));
        found.extend(checks::one_leader_per_term(&nodes));
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

    fn formation(&mut self) -> bool {
        let end = self.sim.elapsed() + self.params.formation;
        let expected = self.params.nodes;
        let mut probe = Duration::ZERO;
        let formed = self.run_until(end, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            checks::converged(&d.snapshots(), expected).is_ok()
        });
        if formed {
            self.trace("formed".into());
        } else if !self.broken {
            let why = checks::converged(&self.snapshots(), expected).err().unwrap_or_default();
            self.violation(format!(
                "formation: the cluster did not form within {:?}: {why}",
                self.params.formation
            ));
        }
        formed
    }

    fn pick_side(&mut self) -> (Vec<String>, Vec<String>) {
        let mut names = self.names.clone();
        names.shuffle(&mut self.rng);
        let size = self.rng.gen_range(1..=self.names.len() / 2);
        let rest = names.split_off(size);
        (names, rest)
    }

    fn leader_host(&self) -> Option<String> {
        self.snapshots().into_iter().find(|n| n.is_leader).map(|n| n.host)
    }

    fn start_fault(&mut self) -> Fault {
        self.faults += 1;
        let fault = match self.rng.gen_range(0..5) {
            0 => {
                let (side, rest) = self.pick_side();
                self.partition(&side, &rest, true);
                Fault::Partition { side, rest }
            }
            1 => {
                let leader = self.leader_host();
                let (side, rest) = match leader {
                    Some(leader) => {
                        let rest = self.names.iter().filter(|n| **n != leader).cloned().collect();
                        (vec![leader], rest)
                    }
                    None => self.pick_side(),
                };
                self.partition(&side, &rest, true);
                Fault::Partition { side, rest }
            }
            2 if self.params.crashes => {
                let host = self.names.choose(&mut self.rng).expect("nodes").clone();
                // Dropped after the crash, when its runtime is gone: dropping it earlier, from outside
                // that runtime, would wake its tasks from here.
                let node = self.world.running.lock().expect("running lock").remove(&host);
                self.sim.crash(host.as_str());
                drop(node);
                Fault::Crash { host }
            }
            2 | 3 => {
                let (side, rest) = self.pick_side();
                for a in &side {
                    for b in &rest {
                        self.sim.hold(a.as_str(), b.as_str());
                    }
                }
                Fault::Hold { side, rest }
            }
            _ => {
                let ms = self.rng.gen_range(50..1000);
                self.sim.set_max_message_latency(Duration::from_millis(ms));
                self.trace(format!("fault: latency up to {ms} ms"));
                return Fault::Latency;
            }
        };
        self.trace(format!("fault: {fault:?}"));
        fault
    }

    fn partition(&mut self, side: &[String], rest: &[String], cut: bool) {
        for a in side {
            for b in rest {
                if cut {
                    self.sim.partition(a.as_str(), b.as_str());
                } else {
                    self.sim.repair(a.as_str(), b.as_str());
                }
            }
        }
    }

    fn end_fault(&mut self, fault: Fault) {
        self.trace(format!("heal: {fault:?}"));
        match fault {
            Fault::Partition { side, rest } => self.partition(&side, &rest, false),
            Fault::Hold { side, rest } => {
                for a in &side {
                    for b in &rest {
                        self.sim.release(a.as_str(), b.as_str());
                    }
                }
            }
            Fault::Crash { host } => self.sim.bounce(host.as_str()),
            Fault::Latency => self.sim.set_max_message_latency(self.params.latency_max),
        }
    }

    fn faults(&mut self) -> bool {
        let end = self.sim.elapsed() + self.params.faults;
        let mut active: Option<(Fault, Duration)> = None;
        let mut next_fault = self.sim.elapsed() + Duration::from_millis(self.rng.gen_range(200..2000));
        while self.sim.elapsed() < end {
            let now = self.sim.elapsed();
            match active.take() {
                Some((fault, until)) if now >= until => {
                    self.end_fault(fault);
                    next_fault = now + Duration::from_millis(self.rng.gen_range(200..3000));
                }
                Some(still) => active = Some(still),
                None if now >= next_fault => {
                    let fault = self.start_fault();
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
            self.end_fault(fault);
        }
        true
    }

    fn liveness(&mut self) {
        self.world.workload.store(false, Ordering::SeqCst);
        self.trace("faults over; workload stopped".into());
        let end = self.sim.elapsed() + self.params.liveness;
        let expected = self.params.nodes;
        let mut probe = Duration::ZERO;
        let converged = self.run_until(end, |d| {
            if d.sim.elapsed() < probe {
                return false;
            }
            probe = d.sim.elapsed() + Duration::from_millis(100);
            checks::converged(&d.snapshots(), expected).is_ok()
        });
        if self.broken {
            return;
        }
        let nodes = self.snapshots();
        if !converged {
            let why = checks::converged(&nodes, expected).err().unwrap_or_default();
            self.violation(format!(
                "liveness: no convergence within {:?} after healing: {why}",
                self.params.liveness
            ));
            return;
        }
        self.trace("converged".into());
        self.check();
        let acked_max = self.world.acks.lock().expect("acks lock").iter().map(|a| a.index).max();
        let applied = nodes.iter().map(|n| n.applied).min().unwrap_or(0);
        if let Some(acked) = acked_max.filter(|a| *a > applied) {
            self.violation(format!(
                "lost ack: index {acked} was acknowledged, the cluster converged at {applied}"
            ));
        }
        for node in &nodes {
            let mut hash = Sha256::new();
            for record in &node.archive {
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

/// Runs one seed to the end and reports.
pub fn run_seed(seed: u64, params: &Params) -> SeedReport {
    assert!(
        (1..=NODES_MAX).contains(&params.nodes),
        "a simulation has between 1 and {NODES_MAX} nodes, not {}",
        params.nodes
    );
    let wall = Instant::now();
    let material = material();
    coyote_log::runtime::seed_thread_rng(seed);
    let guard = panics::Capture::start();
    let token = JoinToken {
        addr: format!("n1:{PORT}"),
        ca_pin: material.ca().pin(),
        id: "simtoken".into(),
        secret: TOKEN_SECRET.into(),
    };
    let world = Arc::new(World {
        seed,
        nodes_expected: params.nodes,
        trace: Mutex::new(Vec::new()),
        acks: Mutex::new(Vec::new()),
        running: Mutex::new(BTreeMap::new()),
        workload: AtomicBool::new(true),
        token,
    });
    let sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(24 * 3600))
        .tick_duration(params.tick)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_UNIX_S))
        .max_message_latency(params.latency_max)
        .rng_seed(seed)
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
    };
    for (index, name) in names.iter().enumerate() {
        let host = Arc::new(HostState {
            name: name.clone(),
            index,
            disk: MemoryDisk::new().expect("an in-memory store"),
            identity: Mutex::new(None),
            initialized: AtomicBool::new(false),
            starts: AtomicU64::new(0),
        });
        let world = world.clone();
        driver.sim.host(name.as_str(), move || host_main(world.clone(), host.clone()));
    }
    if driver.formation() && driver.faults() {
        driver.liveness();
    }
    let simulated = driver.sim.elapsed();
    let faults = driver.faults;
    let violations = std::mem::take(&mut driver.violations);
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
    SeedReport { seed, violations, trace, trace_hash, simulated, wall: wall.elapsed(), acks, faults }
}
