//! One seed of the simulation: a turmoil `Sim` with one host per node, the cluster formed through the
//! real join path, services created and placed, a workload and its oracle, a seeded fault schedule
//! (or a hand-written scenario), then a liveness phase.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use coyote_log::store::MemoryDisk;
use coyote_log::JoinToken;
use coyote_state_machine::SwitchCause;
use rand::rngs::StdRng;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::checks::{self, Links, Timeline};
use crate::driver::Driver;
use crate::hosts::host_main;
use crate::material::material;
use crate::model::Containers;
use crate::panics;
use crate::params::{Params, EPOCH_UNIX_S, NODES_MAX, PORT, TOKEN_SECRET};
use crate::world::{HostState, World};

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
    /// Snapshots taken and stored, and restores, applied in the log.
    pub data: crate::checks::DataCounts,
    /// Web requests through the proxies: answered with 200, not.
    pub web: (usize, usize),
}

/// Formation, faults (or a scenario), liveness.
fn play(d: &mut Driver) {
    if !d.formation() {
        return;
    }
    let ok = match d.params.scenario {
        Some(scenario) => scenario.run(d),
        None => d.faults(),
    };
    if !ok {
        return;
    }
    d.liveness();
    if let Some(scenario) = d.params.scenario {
        if !d.broken {
            d.check();
            for v in scenario.expect(d) {
                d.violation(v);
            }
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
pub(crate) const TASK_ID_ALIGN: u64 = 64;

/// Adds host `name` to the simulation, the `index`th (its containers' randomness comes from the seed
/// and the index); it starts at the next step, and joins the cluster unless it is the first.
pub(crate) fn add_host(driver: &mut Driver, index: usize, name: &str) {
    let world = driver.world.clone();
    let container_seed = world.seed ^ ((index as u64 + 1) << 48) ^ 0xC0_0C;
    let host = Arc::new(HostState {
        name: name.to_string(),
        index,
        disk: MemoryDisk::new().expect("an in-memory store"),
        identity: Mutex::new(None),
        initialized: AtomicBool::new(false),
        starts: AtomicU64::new(0),
        containers: Arc::new(Containers::new(
            container_seed,
            world.slow_start_ms.clone(),
            name,
            world.data.clone(),
        )),
        dir: tempfile::Builder::new().prefix("coyote-sim-").tempdir().expect("a temporary directory"),
        departed: Mutex::new(None),
    });
    driver.sim.host(name, move || host_main(world.clone(), host.clone()));
}

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
        web: Mutex::new((0, 0)),
        data: Default::default(),
        departed: Mutex::new(BTreeMap::new()),
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
        focus_master: String::new(),
        spliced: 0,
        data_checked: 0,
        served_until: BTreeMap::new(),
        expected_nodes: params.nodes,
        departed_seen: BTreeMap::new(),
    };
    driver.record_links();
    for (index, name) in names.iter().enumerate() {
        add_host(&mut driver, index, name);
    }
    let played = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| play(&mut driver)));
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
    let data = driver.data_counts();
    world.running.lock().expect("running lock").clear();
    drop(driver);
    drop(guard);
    coyote_log::runtime::unseed_thread_rng();
    let trace = std::mem::take(&mut *world.trace.lock().expect("trace lock"));
    let acks = world.acks.lock().expect("acks lock").len();
    let web = *world.web.lock().expect("web lock");
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
        data,
        web,
    }
}
