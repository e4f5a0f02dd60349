//! The activator: on-demand services start when a connection arrives, and stop when idle or when the
//! host runs short of memory, after their dump command.
//!
//! # How it works
//! For every on-demand service this server masters and may serve (it holds the lease, see
//! [`crate::monitor`]), the activator owns the service's published host ports: it listens on them
//! itself. The reconciler creates the container without publishing those ports, and leaves its run
//! state to the activator. When a connection arrives and the container is stopped, the activator starts
//! it, waits until the container's port accepts connections on the coyote network, and then splices
//! the held connection through. The first connection is held, not refused or answered with an error,
//! so this works for any TCP protocol (HTTP, SMTP, XMPP). Concurrent first connections all wait for
//! the one start: starting happens under the service's lock.
//!
//! # Stopping: idle, memory pressure, and the dump before
//! A running container is stopped in two cases, checked every [`CHECK_INTERVAL`]:
//! - **idle**: no connection open and none ended for [`ActivatorConfig::idle_stop`];
//! - **memory pressure**: with [`ActivatorConfig::memory_min_available`] set, when the host's
//!   available memory ([`MemorySource`]: `MemAvailable` of `/proc/meminfo`) is below it, containers
//!   with no connection open are stopped one at a time, least recently used first (by the end of
//!   their last connection), reading the memory again after each stop, until it is back above the
//!   threshold or no candidate is left. Only on-demand containers are ever stopped for this: an
//!   always-on service's container is not the activator's.
//!
//! Before either stop, the spec's dump command (`ServiceSpec::dump`) runs inside the container
//! (Docker exec, bounded by [`ActivatorConfig::dump_timeout`]). If it fails (an exit code other than
//! 0, a timeout, an engine error), the container keeps running and the alarm
//! `dump-failed/NODE/SERVICE` is raised in the log, naming the exit code and the end of the command's
//! stderr; the dump is tried again at an idle check after a backoff ([`DUMP_RETRY_MIN`], doubling up
//! to [`DUMP_RETRY_MAX`]), and the alarm is cleared when a dump succeeds. The dump runs outside the
//! service's lock, so connections keep flowing meanwhile; a connection that arrives during the dump
//! cancels the stop. Stops run in tasks of their own, so a slow dump never delays the activator's loop
//! (which also closes the gates of services this server lost the lease for).
//!
//! Traffic counts (connections, bytes each way, cold starts and their latency, time running, stops
//! and failed dumps) are kept here, locally, never in the log: `coyote stats` and the Prometheus text
//! at `/metrics` of the local API.
//!
//! # Warm connections: kernel or userspace
//! In kernel mode (`--forward kernel`, the default as root with `nft`), once a container runs and
//! its port accepts, new connections are forwarded by nftables DNAT straight to it
//! ([`crate::forward`]); only connections that arrive while it is stopped or starting reach the
//! listener and are spliced here. Every stop removes the forwarding first. Activity then comes from
//! the kernel, read every [`CHECK_INTERVAL`]: a service is active while conntrack holds an open
//! connection of it, and whenever its nft counters moved since the last look; an open connection
//! (spliced or forwarded) keeps a container from being stopped, as before. The stats add the kernel's
//! counts (connections, and bytes each way, counted at the IP layer) to the splice's;
//! `spliced_connections` says how many went through userspace. In userspace mode every connection is
//! spliced, as the only path. In both modes `ensure_started` (start the container, wait for its
//! port, install the forwarding) stays the one code path that starts a container on traffic.
//!
//! # Left out, for now
//! - A container stopped because this server no longer serves the service (its lease lapsed, it is
//!   no longer master, its ports changed) is stopped at once, without its dump: fencing must not wait
//!   for a command in the container. (The dump before a graceful handover is the reconciler's.)
//! - The proxy waking a service through this code path (the proxy does not exist yet).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_log::{pb, LogNode};
use coyote_state_machine::spec::format_argv;
use coyote_state_machine::{Event, PortMap, Role};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::fence::Fence;
use crate::forward::{mark_of, open_connections, Forwarder, KernelCounters};
use crate::runtime::{ContainerRuntime, RunState};
use crate::sockets::{BoxStream, Sockets, TcpSockets};

/// Connections held at once per service, at most; more are refused until some end.
pub const CONNECTIONS_MAX: usize = 1024;
/// Cold-start latencies kept for percentiles, per service (the most recent ones).
pub const LATENCY_SAMPLES_MAX: usize = 1024;
/// How often a starting container's port is probed.
pub const READY_POLL: Duration = Duration::from_millis(2);
/// How often idle containers and memory are checked (and the kernel's counters read, in kernel mode).
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// A failed dump is tried again after this, doubling up to [`DUMP_RETRY_MAX`].
pub const DUMP_RETRY_MIN: Duration = Duration::from_secs(5);
pub const DUMP_RETRY_MAX: Duration = Duration::from_secs(300);
/// Deadline of one alarm proposal.
pub const PROPOSE_ALARM_TIMEOUT: Duration = Duration::from_secs(20);
/// Characters of a failed dump's stderr quoted in its alarm (the end of it).
pub const ALARM_STDERR_CHARS: usize = 400;
/// "Memory is short but nothing can be stopped" is logged at most this often.
const PRESSURE_WARN_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct ActivatorConfig {
    /// Stop an on-demand container after this long without connections.
    pub idle_stop: Duration,
    /// Give up on a start when the container's port does not accept connections within this.
    pub ready_timeout: Duration,
    /// Address the host ports are bound on.
    pub bind_ip: std::net::IpAddr,
    /// Deadline of a service's dump command.
    pub dump_timeout: Duration,
    /// Stop idle on-demand containers while the host's available memory is below this (bytes).
    pub memory_min_available: Option<u64>,
}

impl Default for ActivatorConfig {
    fn default() -> Self {
        ActivatorConfig {
            idle_stop: Duration::from_secs(300),
            ready_timeout: Duration::from_secs(30),
            bind_ip: std::net::IpAddr::from([0, 0, 0, 0]),
            dump_timeout: Duration::from_secs(120),
            memory_min_available: None,
        }
    }
}

/// Where the activator reads how much memory the host has available.
pub trait MemorySource: Send + Sync {
    /// Bytes available for new work without swapping (Linux: `MemAvailable`).
    fn available(&self) -> std::io::Result<u64>;
}

/// `MemAvailable` from a `/proc/meminfo`-formatted file.
pub struct ProcMeminfo {
    pub path: PathBuf,
}

impl Default for ProcMeminfo {
    fn default() -> Self {
        ProcMeminfo { path: PathBuf::from("/proc/meminfo") }
    }
}

impl MemorySource for ProcMeminfo {
    fn available(&self) -> std::io::Result<u64> {
        let text = std::fs::read_to_string(&self.path)?;
        parse_mem_available(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} has no readable MemAvailable line", self.path.display()),
            )
        })
    }
}

/// The `MemAvailable:  123456 kB` line of `/proc/meminfo`, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

pub use coyote_wire::ServiceStats;

#[derive(Default)]
struct Counters {
    /// Connections through the userspace splice.
    connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    idle_stops: AtomicU64,
    memory_stops: AtomicU64,
    dumps_failed: AtomicU64,
}

/// One on-demand service's gate: its listeners, its container's state, its counters.
struct Gate {
    service: String,
    ports: Vec<PortMap>,
    /// The container port the proxy sends web traffic to; probed for readiness when the service
    /// publishes no port.
    web_port: u16,
    listeners: Vec<JoinHandle<()>>,
    counters: Counters,
    /// Held while starting or stopping, so concurrent first connections wait for one start.
    run: tokio::sync::Mutex<RunInfo>,
    /// Connections open now, and when the last one ended (std mutex: never held across an await).
    activity: Mutex<(usize, Instant)>,
    cold_start_ms: Mutex<Vec<u64>>,
    /// Dumps and stops of this gate (std mutex: never held across an await).
    upkeep: Mutex<Upkeep>,
    /// What the kernel forwards and counts for this gate (std mutex: never held across an await).
    kernel: Mutex<KernelView>,
}

impl Gate {
    /// The conntrack mark of the gate's forwarded connections, if it has a port.
    fn mark(&self) -> Option<u32> {
        self.ports.first().map(|p| mark_of(p.host))
    }
}

/// The kernel's side of a gate, in kernel mode.
#[derive(Default)]
struct KernelView {
    /// The gate's counters and chains exist in coyote's table.
    prepared: bool,
    /// The forwarding rule is installed (the container runs).
    forwarding: bool,
    /// Open forwarded connections, and the counters, at the last look.
    open: usize,
    last: KernelCounters,
}

#[derive(Default)]
struct RunInfo {
    /// Container id and address while it runs.
    running: Option<(String, std::net::IpAddr)>,
    since: Option<Instant>,
    total: Duration,
    cold_starts: u64,
}

#[derive(Default)]
struct Upkeep {
    /// A dump and stop is under way (in a task of its own).
    busy: bool,
    /// Dumps failed in a row, and when the next may be tried.
    failures: u32,
    retry_at: Option<Instant>,
}

/// Why a container is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    Idle,
    Memory,
}

impl StopReason {
    fn describe(self) -> &'static str {
        match self {
            StopReason::Idle => "idle",
            StopReason::Memory => "memory pressure",
        }
    }
}

/// A running on-demand container that could be stopped: its service, whether it is idle, and when
/// its last connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub service: String,
    pub open_connections: usize,
    pub last_end: Instant,
}

/// The containers to stop under memory pressure, in order: those with no open connection, least
/// recently used (earliest last connection end) first.
pub fn pressure_order(mut candidates: Vec<Candidate>) -> Vec<String> {
    candidates.retain(|c| c.open_connections == 0);
    candidates.sort_by(|a, b| (a.last_end, &a.service).cmp(&(b.last_end, &b.service)));
    candidates.into_iter().map(|c| c.service).collect()
}

fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    DUMP_RETRY_MIN.saturating_mul(factor).min(DUMP_RETRY_MAX)
}

/// The alarm key of a failed dump.
pub fn dump_key(node: coyote_state_machine::NodeId, service: &str) -> String {
    format!("dump-failed/{node}/{service}")
}

/// Runs a service's dump command in its container (`id`); `Err` says how it failed: the exit code
/// and the end of stderr, or why it could not run. The activator (before an idle or memory stop)
/// and the reconciler (before a handover) both call this.
pub async fn run_dump(
    runtime: &dyn ContainerRuntime,
    id: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<(), String> {
    match runtime.exec(id, argv, timeout).await {
        Ok(outcome) if outcome.succeeded() => Ok(()),
        Ok(outcome) => {
            let code =
                outcome.exit_code.map(|c| format!("exit code {c}")).unwrap_or_else(|| "no exit code".into());
            let chars: Vec<char> = outcome.stderr_tail.trim().chars().collect();
            let tail: String = chars[chars.len().saturating_sub(ALARM_STDERR_CHARS)..].iter().collect();
            if tail.is_empty() {
                Err(format!("{code}, nothing on stderr"))
            } else {
                Err(format!("{code}, stderr ends with: {tail}"))
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The event that raises `dump-failed/NODE/SERVICE`, unless it is open already.
pub fn dump_alarm_raised(
    state: &coyote_state_machine::State,
    node: coyote_state_machine::NodeId,
    service: &str,
    message: String,
) -> Option<Event> {
    let key = dump_key(node, service);
    if state.open_alarms().any(|a| a.key == key) {
        return None;
    }
    Some(Event::AlarmRaised { key, node: Some(node), service: Some(service.to_string()), message })
}

/// The event that clears `dump-failed/NODE/SERVICE`, if it is open.
pub fn dump_alarm_cleared(
    state: &coyote_state_machine::State,
    node: coyote_state_machine::NodeId,
    service: &str,
    reason: &str,
) -> Option<Event> {
    let key = dump_key(node, service);
    let alarm_id = state.open_alarms().find(|a| a.key == key)?.id;
    Some(Event::AlarmCleared { alarm_id, reason: reason.to_string() })
}

/// An on-demand service to listen for, with its ports.
type Wanted = (String, (Vec<PortMap>, u16));
/// A metric's name, type, and how to read it from a service's stats.
type Metric = (&'static str, &'static str, fn(&ServiceStats) -> u64);

/// An open connection of an on-demand service that did not come through its ports (the proxy's): the
/// container is not stopped as idle while one is held.
pub struct Active(Arc<Gate>);

impl Drop for Active {
    fn drop(&mut self) {
        let mut activity = self.0.activity.lock().expect("activity lock");
        activity.0 -= 1;
        activity.1 = Instant::now();
    }
}

pub struct Activator {
    node: LogNode,
    runtime: Arc<dyn ContainerRuntime>,
    fence: Fence,
    config: ActivatorConfig,
    memory: Arc<dyn MemorySource>,
    gates: Mutex<BTreeMap<String, Arc<Gate>>>,
    /// A memory-pressure round is under way.
    relieving: AtomicBool,
    /// When "memory is short, nothing to stop" was last logged.
    pressure_warned: Mutex<Option<Instant>>,
    /// Kernel forwarding (nftables), when on.
    forwarder: Option<Arc<Forwarder>>,
    /// When the kernel's counters were last read.
    observed: Mutex<Option<Instant>>,
    /// Where the gates listen and containers are dialled.
    sockets: Arc<dyn Sockets>,
}

impl Activator {
    pub fn new(
        node: LogNode,
        runtime: Arc<dyn ContainerRuntime>,
        fence: Fence,
        config: ActivatorConfig,
    ) -> Self {
        Activator {
            node,
            runtime,
            fence,
            config,
            memory: Arc::new(ProcMeminfo::default()),
            gates: Mutex::new(BTreeMap::new()),
            relieving: AtomicBool::new(false),
            pressure_warned: Mutex::new(None),
            forwarder: None,
            observed: Mutex::new(None),
            sockets: Arc::new(TcpSockets),
        }
    }

    /// Listens and dials through `sockets` instead of the operating system's TCP.
    pub fn with_sockets(mut self, sockets: Arc<dyn Sockets>) -> Self {
        self.sockets = sockets;
        self
    }

    /// Forwards warm connections in the kernel (see [`crate::forward`]) instead of splicing them.
    pub fn with_forwarder(mut self, forwarder: Option<Arc<Forwarder>>) -> Self {
        self.forwarder = forwarder;
        self
    }

    /// Reads the host's available memory from `source` instead of `/proc/meminfo`.
    pub fn with_memory_source(mut self, source: Arc<dyn MemorySource>) -> Self {
        self.memory = source;
        self
    }

    /// Whether this node holds `service`'s gate with its listeners running: it serves the service
    /// on demand here, and a connection would be answered (starting the container if stopped).
    pub fn listening(&self, service: &str) -> bool {
        self.gates
            .lock()
            .expect("gates lock")
            .get(service)
            .is_some_and(|gate| gate.listeners.iter().all(|l| !l.is_finished()))
    }

    /// `routes` with the `Activation` gRPC service added: members ask it whether this node holds an
    /// on-demand service's listeners ([`Activator::listening`]).
    pub fn routes(self: &Arc<Self>, routes: tonic::service::Routes) -> tonic::service::Routes {
        routes.add_service(pb::activation_server::ActivationServer::new(ActivationService {
            activator: self.clone(),
        }))
    }

    /// Keeps the gates in line with the log and the lease, and stops idle containers, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut applied = self.node.store().subscribe();
        let mut serving = self.fence.subscribe();
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(min) = self.config.memory_min_available {
            match self.memory.available() {
                Ok(now) => tracing::info!(
                    min_available = min,
                    available = now,
                    "idle on-demand containers are stopped while available memory is below the threshold"
                ),
                Err(e) => {
                    tracing::warn!("cannot read the available memory (memory pressure stops are off): {e}")
                }
            }
        }
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                changed = applied.changed() => if changed.is_err() { break },
                Ok(()) = serving.changed() => {}
                _ = tick.tick() => {}
            }
            self.sync_gates().await;
            self.forget_vanished().await;
            self.observe_kernel().await;
            self.stop_idle();
            self.relieve_pressure();
        }
        let gates: Vec<Arc<Gate>> =
            std::mem::take(&mut *self.gates.lock().expect("gates lock")).into_values().collect();
        for gate in gates {
            gate.listeners.iter().for_each(JoinHandle::abort);
        }
        if let Some(forwarder) = &self.forwarder {
            forwarder.shutdown().await;
        }
    }

    /// On-demand services this server masters and may serve now, with their specs' ports and web port.
    fn wanted(&self) -> BTreeMap<String, (Vec<PortMap>, u16)> {
        let me = self.node.id();
        self.node.store().with_state(|s| {
            s.services
                .iter()
                .filter(|(name, svc)| svc.spec.on_demand && s.role(name, me) == Some(Role::Master))
                .filter(|(name, _)| self.fenced_in(name))
                .map(|(name, svc)| (name.clone(), (svc.spec.ports.clone(), svc.spec.web_port())))
                .collect()
        })
    }

    /// Whether this server's fence lets it serve `service` now.
    fn fenced_in(&self, service: &str) -> bool {
        #[cfg(feature = "planted-bugs")]
        if planted::ignores_fence() {
            return true;
        }
        self.fence.serving(service)
    }

    async fn sync_gates(self: &Arc<Self>) {
        let wanted = self.wanted();
        let (gone, missing): (Vec<Arc<Gate>>, Vec<Wanted>) = {
            let mut gates = self.gates.lock().expect("gates lock");
            let gone_names: Vec<String> = gates
                .iter()
                .filter(|(name, gate)| wanted.get(*name) != Some(&(gate.ports.clone(), gate.web_port)))
                .map(|(name, _)| name.clone())
                .collect();
            let gone = gone_names.iter().filter_map(|n| gates.remove(n)).collect();
            let missing = wanted.into_iter().filter(|(name, _)| !gates.contains_key(name)).collect();
            (gone, missing)
        };
        for gate in gone {
            // No longer ours to serve (or its ports changed): close the ports, stop the container at
            // once (fencing does not wait for a dump).
            gate.listeners.iter().for_each(JoinHandle::abort);
            self.stop_now(&gate, "no longer served here").await;
            self.close_kernel(&gate).await;
            self.clear_dump_alarm(&gate.service, "the container was stopped: no longer served here").await;
        }
        for (service, ports) in missing {
            match self.open_gate(&service, ports).await {
                Ok(gate) => {
                    self.gates.lock().expect("gates lock").insert(service, gate.clone());
                    self.adopt(&gate).await;
                }
                Err(e) => tracing::warn!(service, error = %e, "cannot listen for the on-demand service"),
            }
        }
    }

    /// Takes over a container of the gate's service that already runs (started by this node's previous
    /// run, or by hand): it counts as running from now, so it is stopped when idle (after its dump)
    /// or under memory pressure like one started here.
    async fn adopt(&self, gate: &Gate) {
        let mut run = gate.run.lock().await;
        if run.running.is_some() {
            return;
        }
        let Ok(containers) = self.runtime.list().await else { return };
        let Some(container) =
            containers.iter().find(|c| c.service == gate.service && c.state == RunState::Running)
        else {
            return;
        };
        let Ok(Some(ip)) = self.runtime.address(&container.id).await else { return };
        run.running = Some((container.id.clone(), ip));
        run.since = Some(Instant::now());
        gate.activity.lock().expect("activity lock").1 = Instant::now();
        tracing::info!(service = gate.service, "its container already runs: taken over, stopped when idle");
        self.forward(gate, ip).await;
    }

    async fn open_gate(
        self: &Arc<Self>,
        service: &str,
        (ports, web_port): (Vec<PortMap>, u16),
    ) -> std::io::Result<Arc<Gate>> {
        let mut bound = Vec::new();
        for p in &ports {
            bound.push((
                self.sockets.listen(SocketAddr::new(self.config.bind_ip, p.host)).await?,
                p.container,
            ));
        }
        let mut gate = Gate {
            service: service.to_string(),
            ports,
            web_port,
            listeners: Vec::new(),
            counters: Counters::default(),
            run: tokio::sync::Mutex::new(RunInfo::default()),
            activity: Mutex::new((0, Instant::now())),
            cold_start_ms: Mutex::new(Vec::new()),
            upkeep: Mutex::new(Upkeep::default()),
            kernel: Mutex::new(KernelView::default()),
        };
        if let Some(forwarder) = &self.forwarder {
            match forwarder.open(&gate.ports).await {
                Ok(()) => gate.kernel.lock().expect("kernel lock").prepared = true,
                Err(e) => tracing::warn!(
                    service,
                    "kernel forwarding is off for this service, its connections go through the activator: {e:#}"
                ),
            }
        }
        let gate_cell: Arc<std::sync::OnceLock<Arc<Gate>>> = Arc::default();
        for (listener, container_port) in bound {
            let (me, cell) = (self.clone(), gate_cell.clone());
            gate.listeners.push(tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        // Out of file descriptors, most likely: let some connections end first.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Some(gate) = cell.get().cloned() else { continue };
                    let me = me.clone();
                    tokio::spawn(async move { me.handle(gate, client, container_port).await });
                }
            }));
        }
        let gate = Arc::new(gate);
        let _ = gate_cell.set(gate.clone());
        tracing::info!(service, "listening for the on-demand service");
        Ok(gate)
    }

    async fn handle(&self, gate: Arc<Gate>, mut client: BoxStream, container_port: u16) {
        {
            let mut activity = gate.activity.lock().expect("activity lock");
            if activity.0 >= CONNECTIONS_MAX {
                return; // dropping the connection refuses it
            }
            activity.0 += 1;
        }
        gate.counters.connections.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let ip = self.ensure_started(&gate).await?;
            // The gate closes when the lease lapses, at the next look of the activator's loop; a
            // connection accepted in between (or held through a cold start meanwhile) is not
            // handed to the container.
            if !self.fenced_in(&gate.service) {
                return Err(std::io::Error::other("this server does not serve the service now"));
            }
            let mut upstream = self.sockets.connect(SocketAddr::new(ip, container_port)).await?;
            let (sent, received) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
            gate.counters.bytes_in.fetch_add(sent, Ordering::Relaxed);
            gate.counters.bytes_out.fetch_add(received, Ordering::Relaxed);
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(service = gate.service, error = %e, "connection ended with an error");
        }
        let mut activity = gate.activity.lock().expect("activity lock");
        activity.0 -= 1;
        activity.1 = Instant::now();
    }

    /// The proxy's way in, beside the gate's ports: starts the on-demand `service`'s container unless
    /// it runs (the request waits, as a first connection does), and counts an open connection until
    /// the returned guard is dropped, so the container is not stopped as idle meanwhile. Fails when
    /// this server does not serve the service now.
    pub async fn wake(&self, service: &str) -> std::io::Result<(std::net::IpAddr, Active)> {
        let gate = self.gates.lock().expect("gates lock").get(service).cloned();
        let Some(gate) = gate else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("{service} is not served here now"),
            ));
        };
        {
            let mut activity = gate.activity.lock().expect("activity lock");
            if activity.0 >= CONNECTIONS_MAX {
                return Err(std::io::Error::other(format!("{service} has too many open connections")));
            }
            activity.0 += 1;
        }
        let active = Active(gate.clone());
        let ip = self.ensure_started(&gate).await?;
        if !self.fenced_in(service) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("{service} is not served here now"),
            ));
        }
        Ok((ip, active))
    }

    /// Starts the service's container unless it runs; returns its address once its port accepts.
    async fn ensure_started(&self, gate: &Gate) -> std::io::Result<std::net::IpAddr> {
        let io = |m: String| std::io::Error::other(m);
        let mut run = gate.run.lock().await;
        if let Some((_, ip)) = &run.running {
            return Ok(*ip);
        }
        let begun = Instant::now();
        let containers = self.runtime.list().await.map_err(|e| io(e.to_string()))?;
        let container = containers
            .iter()
            .find(|c| c.service == gate.service)
            .ok_or_else(|| io(format!("the container of {} does not exist yet", gate.service)))?;
        if container.state != RunState::Running {
            self.runtime.start(&container.id).await.map_err(|e| io(e.to_string()))?;
        }
        let deadline = begun + self.config.ready_timeout;
        let port = gate.ports.first().map(|p| p.container).unwrap_or(gate.web_port);
        // The address is asked for until the engine has one (it does not change while the container
        // runs); then only the port is probed, every READY_POLL, so readiness is seen within a few ms.
        let mut address = None;
        let ip = loop {
            if address.is_none() {
                address = self.runtime.address(&container.id).await.ok().flatten();
            }
            if let Some(ip) = address {
                let ready = tokio::time::timeout(
                    Duration::from_millis(200),
                    self.sockets.connect(SocketAddr::new(ip, port)),
                )
                .await;
                if matches!(ready, Ok(Ok(_))) {
                    break ip;
                }
            }
            if Instant::now() > deadline {
                return Err(io(format!(
                    "{} did not accept connections within {:?}",
                    gate.service, self.config.ready_timeout
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        };
        let took = begun.elapsed();
        run.running = Some((container.id.clone(), ip));
        run.since = Some(Instant::now());
        run.cold_starts += 1;
        {
            let mut samples = gate.cold_start_ms.lock().expect("samples lock");
            if samples.len() >= LATENCY_SAMPLES_MAX {
                samples.remove(0);
            }
            samples.push(took.as_millis() as u64);
        }
        tracing::info!(service = gate.service, ms = took.as_millis() as u64, "cold start");
        self.forward(gate, ip).await;
        Ok(ip)
    }

    /// Kernel mode: forwards the gate's new connections to its running container at `ip`. On failure
    /// they keep going through the activator.
    async fn forward(&self, gate: &Gate, ip: std::net::IpAddr) {
        let Some(forwarder) = &self.forwarder else { return };
        if !gate.kernel.lock().expect("kernel lock").prepared {
            return;
        }
        match forwarder.install(&gate.ports, ip).await {
            Ok(()) => {
                gate.kernel.lock().expect("kernel lock").forwarding = true;
                tracing::info!(service = gate.service, %ip, "the kernel forwards its warm connections");
            }
            Err(e) => tracing::warn!(
                service = gate.service,
                "cannot forward in the kernel, connections go through the activator: {e:#}"
            ),
        }
    }

    /// Kernel mode: new connections go to the activator's listener again. Returns whether the rule
    /// is gone (or was not there).
    async fn unforward(&self, gate: &Gate) -> bool {
        let Some(forwarder) = &self.forwarder else { return true };
        if !gate.kernel.lock().expect("kernel lock").forwarding {
            return true;
        }
        match forwarder.remove(&gate.ports).await {
            Ok(()) => {
                gate.kernel.lock().expect("kernel lock").forwarding = false;
                true
            }
            Err(e) => {
                tracing::warn!(service = gate.service, "cannot remove the kernel forwarding: {e:#}");
                false
            }
        }
    }

    /// Kernel mode: removes the gate's counters and chains (its ports are closed).
    async fn close_kernel(&self, gate: &Gate) {
        let Some(forwarder) = &self.forwarder else { return };
        if !std::mem::take(&mut gate.kernel.lock().expect("kernel lock").prepared) {
            return;
        }
        if let Err(e) = forwarder.close(&gate.ports).await {
            tracing::warn!(service = gate.service, "{e:#}");
        }
    }

    /// Kernel mode: reads the kernel's counters and open connections of every gate; a gate whose
    /// counters moved, or with an open connection, was active just now. At most once per
    /// [`CHECK_INTERVAL`] (`force` reads anyway).
    async fn observe_kernel(&self) {
        self.observe_kernel_gates(None).await;
    }

    /// Like [`Self::observe_kernel`], now, for one gate (or all); returns whether any was active.
    async fn observe_kernel_gates(&self, only: Option<&Gate>) -> bool {
        let Some(forwarder) = &self.forwarder else { return false };
        if only.is_none() {
            let mut observed = self.observed.lock().expect("observed lock");
            if observed.is_some_and(|t| t.elapsed() < CHECK_INTERVAL / 2) {
                return false;
            }
            *observed = Some(Instant::now());
        }
        let gates: Vec<Arc<Gate>> = self
            .gate_list()
            .into_iter()
            .filter(|g| only.is_none_or(|o| std::ptr::eq(o, g.as_ref())))
            .filter(|g| g.kernel.lock().expect("kernel lock").prepared)
            .collect();
        if gates.is_empty() {
            return false;
        }
        let counters = match forwarder.counters().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot read the kernel's counters: {e:#}");
                return false;
            }
        };
        // Conntrack (`/proc/net/nf_conntrack`) lists every connection of the host, so it costs in
        // proportion to all of them, TIME_WAIT included: it is read only for gates whose counters did
        // not move and that could be stopped now (idle for the idle time, memory short, or a stop
        // under way). A gate whose counters moved is active anyway.
        let short = self
            .config
            .memory_min_available
            .is_some_and(|min| self.memory.available().is_ok_and(|a| a < min));
        let mut quiet = Vec::new();
        let mut any = false;
        for gate in gates {
            let Some(mark) = gate.mark() else { continue };
            let now = counters.get(&mark).copied().unwrap_or_default();
            let moved = {
                let mut k = gate.kernel.lock().expect("kernel lock");
                let moved = now != k.last;
                k.last = now;
                moved
            };
            if moved {
                gate.activity.lock().expect("activity lock").1 = Instant::now();
                any = true;
            } else if only.is_some()
                || short
                || gate.activity.lock().expect("activity lock").1.elapsed() >= self.config.idle_stop
            {
                quiet.push((gate, mark));
            }
        }
        if quiet.is_empty() {
            return any;
        }
        let open = open_connections().unwrap_or_else(|e| {
            tracing::warn!("cannot read the open connections: {e:#}");
            BTreeMap::new()
        });
        for (gate, mark) in quiet {
            let open = open.get(&mark).copied().unwrap_or(0);
            gate.kernel.lock().expect("kernel lock").open = open;
            if open > 0 {
                gate.activity.lock().expect("activity lock").1 = Instant::now();
                any = true;
            }
        }
        any
    }

    /// Open connections of the gate: spliced ones, and those the kernel forwards.
    fn open_connections(gate: &Gate) -> usize {
        gate.activity.lock().expect("activity lock").0 + gate.kernel.lock().expect("kernel lock").open
    }

    /// A snapshot of the gates.
    fn gate_list(&self) -> Vec<Arc<Gate>> {
        self.gates.lock().expect("gates lock").values().cloned().collect()
    }

    /// Whether the gate's container runs, as far as the activator knows; `None` while it is being
    /// started or stopped (its lock is held).
    fn is_running(gate: &Gate) -> Option<bool> {
        gate.run.try_lock().ok().map(|run| run.running.is_some())
    }

    /// Whether a dump and stop of this gate may begin now: none under way, no failed dump waiting
    /// for its retry.
    fn may_upkeep(gate: &Gate) -> bool {
        let upkeep = gate.upkeep.lock().expect("upkeep lock");
        !upkeep.busy && upkeep.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Marks a dump and stop of this gate as begun, if one may begin now (see [`Self::may_upkeep`]).
    fn begin_upkeep(gate: &Gate) -> bool {
        let mut upkeep = gate.upkeep.lock().expect("upkeep lock");
        let may = !upkeep.busy && upkeep.retry_at.is_none_or(|t| Instant::now() >= t);
        if may {
            upkeep.busy = true;
        }
        may
    }

    /// Starts a task that dumps and stops each container idle for the idle time.
    fn stop_idle(self: &Arc<Self>) {
        for gate in self.gate_list() {
            let idle = Self::open_connections(&gate) == 0
                && gate.activity.lock().expect("activity lock").1.elapsed() >= self.config.idle_stop;
            if !idle || Self::is_running(&gate) != Some(true) || !Self::begin_upkeep(&gate) {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                me.dump_and_stop(&gate, StopReason::Idle).await;
                gate.upkeep.lock().expect("upkeep lock").busy = false;
            });
        }
    }

    /// When memory is short, starts one task that stops containers with no open connection, least
    /// recently used first, one at a time, until memory is back above the threshold.
    fn relieve_pressure(self: &Arc<Self>) {
        let Some(min) = self.config.memory_min_available else { return };
        if self.relieving.load(Ordering::Acquire) {
            return;
        }
        match self.memory.available() {
            Ok(available) if available < min => {}
            Ok(_) => return,
            Err(e) => {
                self.warn_pressure(&format!("cannot read the available memory: {e}"));
                return;
            }
        }
        self.relieving.store(true, Ordering::Release);
        let me = self.clone();
        tokio::spawn(async move {
            me.relieve(min).await;
            me.relieving.store(false, Ordering::Release);
        });
    }

    async fn relieve(&self, min: u64) {
        // Each container is tried at most once per round, so a round always ends.
        let mut tried = BTreeSet::new();
        loop {
            let available = match self.memory.available() {
                Ok(a) if a < min => a,
                _ => return,
            };
            let gates = self.gate_list();
            let candidates: Vec<Candidate> = gates
                .iter()
                .filter(|g| !tried.contains(&g.service))
                .filter(|g| Self::is_running(g) == Some(true) && Self::may_upkeep(g))
                .map(|g| Candidate {
                    service: g.service.clone(),
                    open_connections: Self::open_connections(g),
                    last_end: g.activity.lock().expect("activity lock").1,
                })
                .collect();
            let Some(next) = pressure_order(candidates).into_iter().next() else {
                self.warn_pressure(&format!(
                    "available memory {available} B is below {min} B, and no idle on-demand container is left to stop"
                ));
                return;
            };
            tried.insert(next.clone());
            let Some(gate) = gates.into_iter().find(|g| g.service == next) else { continue };
            if !Self::begin_upkeep(&gate) {
                continue;
            }
            tracing::info!(
                service = gate.service,
                available,
                min,
                "memory is short: stopping the least recently used idle container"
            );
            self.dump_and_stop(&gate, StopReason::Memory).await;
            gate.upkeep.lock().expect("upkeep lock").busy = false;
        }
    }

    fn warn_pressure(&self, message: &str) {
        let mut last = self.pressure_warned.lock().expect("warn lock");
        if last.is_none_or(|t| t.elapsed() >= PRESSURE_WARN_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!("{message}");
        }
    }

    /// Runs the service's dump command, then stops its container if the dump succeeded and no
    /// connection came in meanwhile. Returns whether it stopped.
    async fn dump_and_stop(&self, gate: &Gate, reason: StopReason) -> bool {
        let began = Instant::now();
        let Some(id) = gate.run.lock().await.running.as_ref().map(|(id, _)| id.clone()) else { return false };
        let dump =
            self.node.store().with_state(|s| s.services.get(&gate.service).and_then(|s| s.spec.dump.clone()));
        if let Some(argv) = dump {
            if let Err(problem) = self.dump(gate, &id, &argv).await {
                gate.counters.dumps_failed.fetch_add(1, Ordering::Relaxed);
                let failures = {
                    let mut upkeep = gate.upkeep.lock().expect("upkeep lock");
                    upkeep.failures += 1;
                    let delay = retry_delay(upkeep.failures);
                    upkeep.retry_at = Some(Instant::now() + delay);
                    (upkeep.failures, delay)
                };
                let message = format!(
                    "the dump command `{}` of {} failed before a stop ({}): {problem}; the container keeps running, next try in {} s",
                    format_argv(&argv),
                    gate.service,
                    reason.describe(),
                    failures.1.as_secs()
                );
                tracing::warn!(service = gate.service, failures = failures.0, "{message}");
                self.raise_dump_alarm(&gate.service, message).await;
                return false;
            }
            {
                let mut upkeep = gate.upkeep.lock().expect("upkeep lock");
                upkeep.failures = 0;
                upkeep.retry_at = None;
            }
            tracing::info!(
                service = gate.service,
                ms = began.elapsed().as_millis() as u64,
                "dump command succeeded"
            );
            self.clear_dump_alarm(&gate.service, "the dump command succeeded").await;
        }
        let mut run = gate.run.lock().await;
        if run.running.as_ref().map(|(i, _)| i) != Some(&id) {
            return false; // stopped (or restarted) meanwhile
        }
        {
            let last = gate.activity.lock().expect("activity lock").1;
            if Self::open_connections(gate) > 0 || last > began {
                tracing::info!(service = gate.service, "not stopped: a connection came in during the dump");
                return false;
            }
        }
        // Kernel mode: new connections go to the listener from now on (they wait for the run lock);
        // then the kernel is asked once more whether a connection came in meanwhile.
        if gate.kernel.lock().expect("kernel lock").forwarding {
            if !self.unforward(gate).await {
                return false;
            }
            if self.observe_kernel_gates(Some(gate)).await {
                if let Some((_, ip)) = run.running.clone() {
                    self.forward(gate, ip).await;
                }
                tracing::info!(
                    service = gate.service,
                    "not stopped: the kernel forwarded a connection meanwhile"
                );
                return false;
            }
        }
        if !self.stop_locked(gate, &mut run, reason.describe()).await {
            return false;
        }
        let counter = match reason {
            StopReason::Idle => &gate.counters.idle_stops,
            StopReason::Memory => &gate.counters.memory_stops,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Runs the dump; `Err` says how it failed (exit code and the end of stderr).
    async fn dump(&self, gate: &Gate, id: &str, argv: &[String]) -> Result<(), String> {
        tracing::info!(service = gate.service, command = format_argv(argv), "running the dump command");
        run_dump(self.runtime.as_ref(), id, argv, self.config.dump_timeout).await
    }

    async fn raise_dump_alarm(&self, service: &str, message: String) {
        let event = self.node.store().with_state(|s| dump_alarm_raised(s, self.node.id(), service, message));
        if let Some(event) = event {
            self.propose(event).await;
        }
    }

    async fn clear_dump_alarm(&self, service: &str, reason: &str) {
        let event = self.node.store().with_state(|s| dump_alarm_cleared(s, self.node.id(), service, reason));
        if let Some(event) = event {
            self.propose(event).await;
        }
    }

    async fn propose(&self, event: Event) {
        let summary = event.summary();
        let actor = format!("activator@node:{}", self.node.id());
        match tokio::time::timeout(PROPOSE_ALARM_TIMEOUT, self.node.propose(event, actor)).await {
            Ok(Ok(_)) => tracing::info!("{summary}"),
            Ok(Err(e)) => tracing::warn!("could not record \"{summary}\": {e}"),
            Err(_) => tracing::warn!("could not record \"{summary}\": the log did not answer in time"),
        }
    }

    /// Stops the gate's container now, without a dump.
    async fn stop_now(&self, gate: &Gate, why: &str) {
        let mut run = gate.run.lock().await;
        self.stop_locked(gate, &mut run, why).await;
    }

    /// Stops the gate's container; in kernel mode, its forwarding goes first, so that new
    /// connections reach the listener (and wait for a new start) instead of a stopped container.
    /// A container the activator believes running that no longer runs (replaced by the reconciler
    /// after a spec change, removed or stopped by hand, crashed) is forgotten: its kernel forwarding is
    /// removed, so that the next connection reaches the activator and starts the service's current
    /// container, instead of being sent to an address that is gone or belongs to another container.
    async fn forget_vanished(&self) {
        let believed: Vec<Arc<Gate>> = self
            .gate_list()
            .into_iter()
            .filter(|g| g.run.try_lock().is_ok_and(|run| run.running.is_some()))
            .collect();
        if believed.is_empty() {
            return;
        }
        let Ok(containers) = self.runtime.list().await else { return };
        for gate in believed {
            // A start or stop in progress holds the lock: it knows better; look again next time.
            let Ok(mut run) = gate.run.try_lock() else { continue };
            let Some((id, _)) = run.running.clone() else { continue };
            if containers.iter().any(|c| c.id == id && c.state == RunState::Running) {
                continue;
            }
            if !self.unforward(&gate).await {
                continue;
            }
            run.running = None;
            if let Some(since) = run.since.take() {
                run.total += since.elapsed();
            }
            tracing::info!(
                service = gate.service,
                "its container no longer runs (replaced after a spec change, removed or stopped by hand): \
                 the next connection starts the current one"
            );
        }
    }

    async fn stop_locked(&self, gate: &Gate, run: &mut RunInfo, why: &str) -> bool {
        if run.running.is_none() {
            return false;
        }
        if !self.unforward(gate).await {
            return false;
        }
        let Some((id, ip)) = run.running.take() else { return false };
        if let Err(e) = self.runtime.stop(&id).await {
            tracing::warn!(service = gate.service, error = %e, "could not stop the on-demand container");
            run.running = Some((id, ip));
            self.forward(gate, ip).await;
            return false;
        }
        if let Some(since) = run.since.take() {
            run.total += since.elapsed();
        }
        tracing::info!(service = gate.service, why, "stopped the on-demand container");
        true
    }

    /// Traffic of every on-demand service this server has gates for.
    pub async fn stats(&self) -> Vec<ServiceStats> {
        let mut out = Vec::new();
        let kernel = match &self.forwarder {
            Some(f) => f.counters().await.unwrap_or_else(|e| {
                tracing::warn!("cannot read the kernel's counters: {e:#}");
                BTreeMap::new()
            }),
            None => BTreeMap::new(),
        };
        for gate in self.gate_list() {
            let k = gate.mark().and_then(|m| kernel.get(&m).copied()).unwrap_or_default();
            let kernel_forwarding = gate.kernel.lock().expect("kernel lock").forwarding;
            let run = gate.run.lock().await;
            let mut samples = gate.cold_start_ms.lock().expect("samples lock").clone();
            samples.sort_unstable();
            let pct = |p: f64| {
                (!samples.is_empty()).then(|| samples[((samples.len() - 1) as f64 * p).round() as usize])
            };
            let c = &gate.counters;
            let spliced = c.connections.load(Ordering::Relaxed);
            out.push(ServiceStats {
                service: gate.service.clone(),
                connections: spliced + k.connections,
                bytes_in: c.bytes_in.load(Ordering::Relaxed) + k.bytes_in,
                bytes_out: c.bytes_out.load(Ordering::Relaxed) + k.bytes_out,
                cold_starts: run.cold_starts,
                cold_start_ms_p50: pct(0.5),
                cold_start_ms_p99: pct(0.99),
                running_ms: (run.total + run.since.map(|s| s.elapsed()).unwrap_or_default()).as_millis()
                    as u64,
                running: run.running.is_some(),
                idle_stops: c.idle_stops.load(Ordering::Relaxed),
                memory_stops: c.memory_stops.load(Ordering::Relaxed),
                dumps_failed: c.dumps_failed.load(Ordering::Relaxed),
                spliced_connections: spliced,
                kernel_forwarding,
            });
        }
        out
    }
}

/// The stats in Prometheus' text exposition format.
pub fn prometheus(stats: &[ServiceStats]) -> String {
    let mut out = String::new();
    let metrics: [Metric; 11] = [
        ("coyote_service_connections_total", "counter", |s| s.connections),
        ("coyote_service_bytes_in_total", "counter", |s| s.bytes_in),
        ("coyote_service_bytes_out_total", "counter", |s| s.bytes_out),
        ("coyote_service_cold_starts_total", "counter", |s| s.cold_starts),
        ("coyote_service_running_seconds_total", "counter", |s| s.running_ms / 1000),
        ("coyote_service_running", "gauge", |s| u64::from(s.running)),
        ("coyote_service_idle_stops_total", "counter", |s| s.idle_stops),
        ("coyote_service_memory_stops_total", "counter", |s| s.memory_stops),
        ("coyote_service_dumps_failed_total", "counter", |s| s.dumps_failed),
        ("coyote_service_spliced_connections_total", "counter", |s| s.spliced_connections),
        ("coyote_service_kernel_forwarding", "gauge", |s| u64::from(s.kernel_forwarding)),
    ];
    for (name, kind, get) in metrics {
        out.push_str(&format!("# TYPE {name} {kind}\n"));
        for s in stats {
            out.push_str(&format!("{name}{{service=\"{}\"}} {}\n", s.service, get(s)));
        }
    }
    out
}

/// Deliberate bugs, for the simulator to show that its checkers catch them. Compiled only with the
/// `planted-bugs` feature, and off until switched on.
#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::{AtomicBool, Ordering};

    static IGNORES_FENCE: AtomicBool = AtomicBool::new(false);

    /// The activator listens for, and splices connections of, every on-demand service this server
    /// masters in its applied state, whether or not its fence lets it serve.
    pub fn ignore_fence(on: bool) {
        IGNORES_FENCE.store(on, Ordering::SeqCst);
    }

    pub(crate) fn ignores_fence() -> bool {
        IGNORES_FENCE.load(Ordering::SeqCst)
    }
}

/// The `Activation` gRPC service, to members only (a removed server's certificate still holds, so
/// it is refused by the log's record: `LogNode::refusal`).
struct ActivationService {
    activator: Arc<Activator>,
}

#[tonic::async_trait]
impl pb::activation_server::Activation for ActivationService {
    async fn listening(
        &self,
        request: tonic::Request<pb::ListeningRequest>,
    ) -> Result<tonic::Response<pb::ListeningReply>, tonic::Status> {
        let Some(peer) = coyote_log::tls::peer_node(&request) else {
            return Err(tonic::Status::unauthenticated("a certificate from this cluster's CA is required"));
        };
        if let Some(refused) = self.activator.node.refusal(peer) {
            return Err(refused);
        }
        let listening = self.activator.listening(&request.into_inner().service);
        Ok(tonic::Response::new(pb::ListeningReply { listening }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_one_line_per_service_and_metric() {
        let stats = vec![
            ServiceStats {
                service: "a".into(),
                connections: 3,
                bytes_in: 10,
                running: true,
                ..Default::default()
            },
            ServiceStats { service: "b".into(), cold_starts: 2, running_ms: 4500, ..Default::default() },
        ];
        let text = prometheus(&stats);
        assert!(text.contains("# TYPE coyote_service_connections_total counter\n"));
        assert!(text.contains("coyote_service_connections_total{service=\"a\"} 3\n"));
        assert!(text.contains("coyote_service_cold_starts_total{service=\"b\"} 2\n"));
        assert!(text.contains("coyote_service_running_seconds_total{service=\"b\"} 4\n"));
        assert!(text.contains("coyote_service_running{service=\"a\"} 1\n"));
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 22);
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo =
            "MemTotal:       24563472 kB\nMemFree:        20000000 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(22_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 5 MB\n"), None);
    }

    #[test]
    fn the_real_meminfo_is_readable() {
        let available = ProcMeminfo::default().available().expect("MemAvailable in /proc/meminfo");
        assert!(available > 0);
        let missing = ProcMeminfo { path: "/nonexistent/meminfo".into() };
        assert!(missing.available().is_err());
    }

    #[test]
    fn memory_pressure_stops_idle_containers_least_recently_used_first() {
        let t0 = Instant::now();
        let c = |service: &str, open: usize, ago_ms: u64| Candidate {
            service: service.into(),
            open_connections: open,
            last_end: t0 - Duration::from_millis(ago_ms),
        };
        let order = pressure_order(vec![c("b", 0, 100), c("busy", 2, 5000), c("a", 0, 300), c("c", 0, 0)]);
        assert_eq!(order, vec!["a", "b", "c"], "oldest last use first; never one with open connections");
        assert!(pressure_order(vec![c("busy", 1, 9000)]).is_empty());
    }

    #[test]
    fn failed_dumps_back_off() {
        assert_eq!(retry_delay(1), DUMP_RETRY_MIN);
        assert_eq!(retry_delay(2), DUMP_RETRY_MIN * 2);
        assert_eq!(retry_delay(30), DUMP_RETRY_MAX);
    }
}
