//! The activator: on-demand services start when a connection arrives, and stop when idle.
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
//! After [`ActivatorConfig::idle_stop`] without connections, the container is stopped again. Traffic
//! counts (connections, bytes each way, cold starts and their latency, time running) are kept here,
//! locally, never in the log: `coyote stats` and the Prometheus text at `/metrics` of the local API.
//!
//! # Left out, for now
//! - The spec's dump command before an idle stop, and the alarm when it fails.
//! - Stopping idle on-demand containers, least recently used first, under memory pressure.
//! - The proxy waking a service through this code path (the proxy does not exist yet).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_log::LogNode;
use coyote_state_machine::{PortMap, Role};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::monitor::Fence;
use crate::runtime::{ContainerRuntime, RunState};

/// Connections held at once per service, at most; more are refused until some end.
pub const CONNECTIONS_MAX: usize = 1024;
/// Cold-start latencies kept for percentiles, per service (the most recent ones).
pub const LATENCY_SAMPLES_MAX: usize = 1024;

#[derive(Clone, Debug)]
pub struct ActivatorConfig {
    /// Stop an on-demand container after this long without connections.
    pub idle_stop: Duration,
    /// Give up on a start when the container's port does not accept connections within this.
    pub ready_timeout: Duration,
    /// Address the host ports are bound on.
    pub bind_ip: std::net::IpAddr,
}

impl Default for ActivatorConfig {
    fn default() -> Self {
        ActivatorConfig {
            idle_stop: Duration::from_secs(300),
            ready_timeout: Duration::from_secs(30),
            bind_ip: std::net::IpAddr::from([0, 0, 0, 0]),
        }
    }
}

/// Traffic of one service, as shown by `coyote stats`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServiceStats {
    pub service: String,
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub cold_starts: u64,
    pub cold_start_ms_p50: Option<u64>,
    pub cold_start_ms_p99: Option<u64>,
    pub running_ms: u64,
    pub running: bool,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// One on-demand service's gate: its listeners, its container's state, its counters.
struct Gate {
    service: String,
    ports: Vec<PortMap>,
    listeners: Vec<JoinHandle<()>>,
    counters: Counters,
    /// Held while starting or stopping, so concurrent first connections wait for one start.
    run: tokio::sync::Mutex<RunInfo>,
    /// Connections open now, and when the last one ended (std mutex: never held across an await).
    activity: Mutex<(usize, Instant)>,
    cold_start_ms: Mutex<Vec<u64>>,
}

#[derive(Default)]
struct RunInfo {
    /// Container id and address while it runs.
    running: Option<(String, std::net::IpAddr)>,
    since: Option<Instant>,
    total: Duration,
    cold_starts: u64,
}

/// An on-demand service to listen for, with its ports.
type Wanted = (String, Vec<PortMap>);
/// A metric's name, type, and how to read it from a service's stats.
type Metric = (&'static str, &'static str, fn(&ServiceStats) -> u64);

pub struct Activator {
    node: LogNode,
    runtime: Arc<dyn ContainerRuntime>,
    fence: Fence,
    config: ActivatorConfig,
    gates: Mutex<BTreeMap<String, Arc<Gate>>>,
}

impl Activator {
    pub fn new(
        node: LogNode,
        runtime: Arc<dyn ContainerRuntime>,
        fence: Fence,
        config: ActivatorConfig,
    ) -> Self {
        Activator { node, runtime, fence, config, gates: Mutex::new(BTreeMap::new()) }
    }

    /// Keeps the gates in line with the log and the lease, and stops idle containers, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut applied = self.node.store().subscribe();
        let mut serving = self.fence.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                changed = applied.changed() => if changed.is_err() { break },
                Ok(()) = serving.changed() => {}
                _ = tick.tick() => {}
            }
            self.sync_gates().await;
            self.stop_idle().await;
        }
        let gates: Vec<Arc<Gate>> =
            std::mem::take(&mut *self.gates.lock().expect("gates lock")).into_values().collect();
        for gate in gates {
            gate.listeners.iter().for_each(JoinHandle::abort);
        }
    }

    /// On-demand services this server masters and may serve now, with their specs' ports.
    fn wanted(&self) -> BTreeMap<String, Vec<PortMap>> {
        let me = self.node.id();
        self.node.store().with_state(|s| {
            s.services
                .iter()
                .filter(|(name, svc)| svc.spec.on_demand && s.role(name, me) == Some(Role::Master))
                .filter(|(name, _)| self.fence.serving(name))
                .map(|(name, svc)| (name.clone(), svc.spec.ports.clone()))
                .collect()
        })
    }

    async fn sync_gates(self: &Arc<Self>) {
        let wanted = self.wanted();
        let (gone, missing): (Vec<Arc<Gate>>, Vec<Wanted>) = {
            let mut gates = self.gates.lock().expect("gates lock");
            let gone_names: Vec<String> = gates
                .iter()
                .filter(|(name, gate)| wanted.get(*name) != Some(&gate.ports))
                .map(|(name, _)| name.clone())
                .collect();
            let gone = gone_names.iter().filter_map(|n| gates.remove(n)).collect();
            let missing = wanted.into_iter().filter(|(name, _)| !gates.contains_key(name)).collect();
            (gone, missing)
        };
        for gate in gone {
            // No longer ours to serve (or its ports changed): close the ports, stop the container.
            gate.listeners.iter().for_each(JoinHandle::abort);
            self.stop(&gate, "no longer served here").await;
        }
        for (service, ports) in missing {
            match self.open_gate(&service, ports).await {
                Ok(gate) => {
                    self.gates.lock().expect("gates lock").insert(service, gate);
                }
                Err(e) => tracing::warn!(service, error = %e, "cannot listen for the on-demand service"),
            }
        }
    }

    async fn open_gate(self: &Arc<Self>, service: &str, ports: Vec<PortMap>) -> std::io::Result<Arc<Gate>> {
        let mut bound = Vec::new();
        for p in &ports {
            bound.push((TcpListener::bind(SocketAddr::new(self.config.bind_ip, p.host)).await?, p.container));
        }
        let mut gate = Gate {
            service: service.to_string(),
            ports,
            listeners: Vec::new(),
            counters: Counters::default(),
            run: tokio::sync::Mutex::new(RunInfo::default()),
            activity: Mutex::new((0, Instant::now())),
            cold_start_ms: Mutex::new(Vec::new()),
        };
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

    async fn handle(&self, gate: Arc<Gate>, mut client: TcpStream, container_port: u16) {
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
            let mut upstream = TcpStream::connect(SocketAddr::new(ip, container_port)).await?;
            let _ = upstream.set_nodelay(true);
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
        let port = gate.ports.first().map(|p| p.container).unwrap_or(80);
        let ip = loop {
            if let Ok(Some(ip)) = self.runtime.address(&container.id).await {
                let ready = tokio::time::timeout(
                    Duration::from_millis(200),
                    TcpStream::connect(SocketAddr::new(ip, port)),
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
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let took = begun.elapsed();
        run.running = Some((container.id.clone(), ip));
        run.since = Some(Instant::now());
        run.cold_starts += 1;
        let mut samples = gate.cold_start_ms.lock().expect("samples lock");
        if samples.len() >= LATENCY_SAMPLES_MAX {
            samples.remove(0);
        }
        samples.push(took.as_millis() as u64);
        tracing::info!(service = gate.service, ms = took.as_millis() as u64, "cold start");
        Ok(ip)
    }

    async fn stop_idle(&self) {
        let gates: Vec<Arc<Gate>> = self.gates.lock().expect("gates lock").values().cloned().collect();
        for gate in gates {
            let idle = {
                let activity = gate.activity.lock().expect("activity lock");
                activity.0 == 0 && activity.1.elapsed() >= self.config.idle_stop
            };
            if idle {
                self.stop(&gate, "idle").await;
            }
        }
    }

    async fn stop(&self, gate: &Gate, why: &str) {
        let mut run = gate.run.lock().await;
        let Some((id, _)) = run.running.take() else { return };
        if let Err(e) = self.runtime.stop(&id).await {
            tracing::warn!(service = gate.service, error = %e, "could not stop the on-demand container");
            return;
        }
        if let Some(since) = run.since.take() {
            run.total += since.elapsed();
        }
        tracing::info!(service = gate.service, why, "stopped the on-demand container");
    }

    /// Traffic of every on-demand service this server has gates for.
    pub async fn stats(&self) -> Vec<ServiceStats> {
        let gates: Vec<Arc<Gate>> = self.gates.lock().expect("gates lock").values().cloned().collect();
        let mut out = Vec::new();
        for gate in gates {
            let run = gate.run.lock().await;
            let mut samples = gate.cold_start_ms.lock().expect("samples lock").clone();
            samples.sort_unstable();
            let pct = |p: f64| {
                (!samples.is_empty()).then(|| samples[((samples.len() - 1) as f64 * p).round() as usize])
            };
            out.push(ServiceStats {
                service: gate.service.clone(),
                connections: gate.counters.connections.load(Ordering::Relaxed),
                bytes_in: gate.counters.bytes_in.load(Ordering::Relaxed),
                bytes_out: gate.counters.bytes_out.load(Ordering::Relaxed),
                cold_starts: run.cold_starts,
                cold_start_ms_p50: pct(0.5),
                cold_start_ms_p99: pct(0.99),
                running_ms: (run.total + run.since.map(|s| s.elapsed()).unwrap_or_default()).as_millis()
                    as u64,
                running: run.running.is_some(),
            });
        }
        out
    }
}

/// The stats in Prometheus' text exposition format.
pub fn prometheus(stats: &[ServiceStats]) -> String {
    let mut out = String::new();
    let metrics: [Metric; 6] = [
        ("coyote_service_connections_total", "counter", |s| s.connections),
        ("coyote_service_bytes_in_total", "counter", |s| s.bytes_in),
        ("coyote_service_bytes_out_total", "counter", |s| s.bytes_out),
        ("coyote_service_cold_starts_total", "counter", |s| s.cold_starts),
        ("coyote_service_running_seconds_total", "counter", |s| s.running_ms / 1000),
        ("coyote_service_running", "gauge", |s| u64::from(s.running)),
    ];
    for (name, kind, get) in metrics {
        out.push_str(&format!("# TYPE {name} {kind}\n"));
        for s in stats {
            out.push_str(&format!("{name}{{service=\"{}\"}} {}\n", s.service, get(s)));
        }
    }
    out
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
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 12);
    }
}
