//! What a run is: its parameters ([`Params`]), and the constants of the simulated world that the
//! hosts, the driver and the scenarios share.

use std::time::Duration;

use coyote_log::RaftSettings;
use coyote_state_machine::{spec::NAMESERVERS_MAX, PortMap, ServiceSpec, ZoneCheck};

use crate::model::image_listening_on;

use crate::scenario::Scenario;

/// The port every simulated node serves Raft and the cluster API on.
pub const PORT: u16 = 7100;
/// The cluster id every simulation uses (its CA is made once per process).
pub const CLUSTER_ID: &str = "sim";
/// Most nodes a simulation may have (keys for joiners are made up front).
pub const NODES_MAX: usize = 9;
/// The simulated wall clock starts here (2026-06-01), so `at_ms` is the same in every run.
pub const EPOCH_UNIX_S: u64 = 1_780_272_000;
/// How long a joiner waits before trying again.
pub(crate) const JOIN_RETRY: Duration = Duration::from_millis(500);
/// The secret of the join token the simulated cluster issues.
pub(crate) const TOKEN_SECRET: &str = "simulated-join-secret";
/// The actor of every instructed switch: the simulated admin.
pub const ADMIN_ACTOR: &str = "admin@sim";
/// The CRM's admin, created with the cluster with a fixed password hash (so that the log is the same
/// bytes in every run of a seed: a hash made here would draw a random salt), and her API key.
pub(crate) const CRM_ADMIN: &str = "admin";
pub(crate) const CRM_KEY_ID: &str = "simadmin";
pub(crate) const CRM_KEY_SECRET: &str = "simulated-key-secret";
pub(crate) const CRM_PASSWORD_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$5kWx6g6+yN4GoZNrXDnNZQ$Da4MXZY82jLKC0PoEdkBaY3loVc87HscN+VrtfOgF7g";
/// Services are named `svc1`, `svc2`, ... and listen on ports from here.
pub(crate) const SERVICE_PORT_BASE: u16 = 8000;
/// The containers of on-demand services listen on ports from here (the activator dials them).
pub const ON_DEMAND_PORT_BASE: u16 = 9000;
/// How long an on-demand container may be idle before the activator stops it.
pub(crate) const IDLE_STOP: Duration = Duration::from_secs(3);

/// How often a master snapshots each service's volume (the production default is a minute; a
/// simulated run lasts about that long, so snapshots, their shipping and restores happen in it).
pub(crate) const BACKUP_EVERY: Duration = Duration::from_secs(5);

/// The documented loss window of a failover in the simulation, which the data checker holds it to:
/// a snapshot interval, the time to ship it, and as much again for a snapshot under way when the
/// master was lost.
pub(crate) const DATA_WINDOW_MS: u64 = 2 * BACKUP_EVERY.as_millis() as u64 + 2_000;
/// How many steps a splice may lag behind the end of its node's serving ([`Driver::check_splices`]).
pub(crate) const SPLICE_LAG_STEPS: u32 = 4;
/// How long a visitor waits for an on-demand service's answer (a cold start included).
pub(crate) const VISIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The checker of switches by failover looks this far back: a host that could reach the master
/// during all of it should have told the log so. Reachability in the log lags the network: a gRPC
/// connection that lost data in a partition hangs until HTTP/2 keep-alive gives up on it (1 s + 1 s)
/// after the partition heals, then 2 good probes (250 ms apart) and a commit (which needs a leader)
/// are needed to report the master reachable again.
pub const REACH_WINDOW_MS: u64 = 8_000;
/// Latency above this makes a link too slow for probes (400 ms timeouts, round trips, handshakes).
pub(crate) const SLOW_LATENCY_MS: u64 = 100;

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
    /// boundaries; timers fire at their own instants, so a coarser step lengthens the failover
    /// time's tail a little.
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
pub(crate) fn raft_settings() -> RaftSettings {
    RaftSettings { snapshot_every: 40, keep_logs: 10, ..RaftSettings::default() }
}

/// The spec of the `i`th simulated service (from 1).
/// Services are checked each in another way: `svc1` (and 5, 7, ...) over TCP, `svc2` by an HTTP
/// check, `svc3` by TCP and its DNS zone, whose nameservers are every host that may become its
/// master (only a running container of the service answers). Every fourth (`svc4`, `svc8`, ...) is
/// on demand: the activator listens on its host port and starts its container on the first
/// connection (the monitor's probes and the visitors' requests), which listens on its container
/// port ([`ON_DEMAND_PORT_BASE`] + `i`). Each has the domain `svcI.web.test`, which the proxies route
/// to the port its model container listens on.
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
        domains: vec![web_domain(i)],
        ports: vec![PortMap { host: port, container }],
        memory_bytes: None,
        on_demand,
        dump: None,
        http_check: (i % 3 == 2).then(|| "/health".to_string()),
        zone,
        // A model container listens on its published host port, or (dialled) on the port its image
        // names.
        http_port: Some(if on_demand { container } else { port }),
        tls_passthrough: false,
        keep: None,
    }
}

/// The web domain of the `i`th simulated service.
pub fn web_domain(i: usize) -> String {
    format!("svc{i}.web.test")
}

/// Where every simulated node's proxy takes plain HTTP.
pub const HTTP_PORT: u16 = 80;
