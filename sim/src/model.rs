//! The world outside a node, simulated: a container engine behind the reconciler's
//! [`ContainerRuntime`] trait, and the probe the monitor checks services with.
//!
//! A running model container listens on its service's host ports in turmoil's network, so the
//! monitor's probe (a turmoil TCP connection to the master's host and the service's port) finds it
//! only if the container runs on the master *and* the network path is not cut. Starting and stopping
//! take a seeded random delay; a fault can make starts slow. Containers belong to their host and
//! survive a crash of the node software as entries, but a crash is a reboot: every container is
//! found exited afterwards (no restart policy, as in production).
//!
//! An on-demand service's container publishes no port: the activator listens on the service's host
//! ports and dials the container. A model container then listens on the port its image names
//! ([`image_listening_on`]) at its host's address, and records every connection through which a
//! client's bytes came, with whether its node was serving the service when it accepted the
//! connection ([`Containers::take_splices`]): the activator's checker. (The activator's readiness
//! probes connect and close without a byte, and are not splices.)
//!
//! A running model container also writes data: every [`WRITE_EVERY`] it appends the next sequence
//! number to `seq` in its volume (a real directory, which the node snapshots, ships and restores),
//! starting after the last number the file holds when it starts, as the `coyote-test/seq:1` image
//! does. Each start (with the last number found, and whether the file was a clean sequence) and each
//! write is recorded in the run's [`DataLog`]: the data checker's material.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use coyote_nodes::probe::{self, Check, ServiceProbe};
use coyote_nodes::runtime::{
    ContainerConfig, ContainerRuntime, ObservedContainer, RunState, RuntimeError, LABEL_SERVICE, LABEL_SPEC,
};
use coyote_state_machine::ZoneCheck;
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How often a running model container appends a sequence number to its volume.
pub const WRITE_EVERY: Duration = Duration::from_millis(200);

/// What model containers did to their data, in the order it happened (shared by every host).
pub type DataLog = Arc<Mutex<Vec<DataRecord>>>;

#[derive(Clone, Debug)]
pub enum DataRecord {
    /// A container of `service` started on `host` and found `last` as the last number of its data
    /// (0: none); `clean` is whether the file held exactly 1, 2, ..., `last`.
    Start { host: String, service: String, at_ms: u64, last: u64, clean: bool },
    /// It wrote `n`.
    Write { host: String, service: String, at_ms: u64, n: u64 },
}

/// Simulated wall-clock time, ms since the Unix epoch (the nodes' clock).
fn now_ms() -> u64 {
    turmoil::since_epoch().map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The last number of a `seq` file, and whether it holds exactly 1, 2, ..., last.
fn read_seq(path: &std::path::Path) -> (u64, bool) {
    let Ok(text) = std::fs::read_to_string(path) else { return (0, true) };
    let mut last = 0;
    for line in text.lines() {
        match line.parse::<u64>() {
            Ok(n) if n == last + 1 => last = n,
            _ => return (last, false),
        }
    }
    (last, text.is_empty() || text.ends_with('\n'))
}

/// Appends the next numbers to `volume/seq` every [`WRITE_EVERY`] until aborted. The file's and the
/// directory's modification times are set from the simulated clock, so that a seed's snapshots are
/// the same bytes in every run.
async fn write_data(volume: std::path::PathBuf, host: String, service: String, log: DataLog) {
    use std::io::Write as _;
    let path = volume.join("seq");
    let (mut n, clean) = read_seq(&path);
    log.lock().expect("data log lock").push(DataRecord::Start {
        host: host.clone(),
        service: service.clone(),
        at_ms: now_ms(),
        last: n,
        clean,
    });
    loop {
        tokio::time::sleep(WRITE_EVERY).await;
        n += 1;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{n}\n").as_bytes()));
        if written.is_err() {
            // The directory was moved aside (a restore) under a container that no longer runs.
            return;
        }
        let at_ms = now_ms();
        let when = std::time::UNIX_EPOCH + Duration::from_millis(at_ms);
        for p in [&path, &volume] {
            if let Ok(f) = std::fs::File::open(p) {
                let _ = f.set_modified(when);
            }
        }
        log.lock().expect("data log lock").push(DataRecord::Write {
            host: host.clone(),
            service: service.clone(),
            at_ms,
            n,
        });
    }
}

/// Delay of a container start outside slow-start faults, in ms.
const START_MS: std::ops::Range<u64> = 20..300;
/// Delay of a container stop, in ms.
const STOP_MS: std::ops::Range<u64> = 10..100;

/// The containers of one simulated host (they outlive the node software's incarnations).
pub struct Containers {
    inner: Mutex<Inner>,
    /// Extra start delay while a slow-start fault is in force, in ms (shared by all hosts).
    slow_start_ms: Arc<AtomicU64>,
    /// The host's name in turmoil's network.
    host: String,
    /// Whether the host's node serves a service now (its fence), once the node runs.
    serving: Mutex<Option<ServingCheck>>,
    /// Connections on-demand containers accepted since the driver last looked.
    splices: Mutex<Vec<Splice>>,
    /// Where containers' data starts and writes are recorded.
    data: DataLog,
}

/// Whether a node serves a service now.
pub type ServingCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A connection through which a container received a client's bytes from its node: spliced by the
/// activator (an on-demand container's), or a request from the proxy (it carries
/// `X-Forwarded-For`), as of when the container accepted it.
#[derive(Clone, Debug)]
pub struct Splice {
    pub service: String,
    /// Simulated time since the start.
    pub at: Duration,
    /// Whether the host's node served the service when the container accepted the connection.
    pub serving: bool,
}

/// The image of a model container that listens on `port` when its ports are not published (an
/// on-demand service's: the activator dials it there).
pub fn image_listening_on(port: u16) -> String {
    format!("{IMAGE_LISTENING_ON}{port}:1")
}

const IMAGE_LISTENING_ON: &str = "sim/listens-on-";

fn port_of_image(image: &str) -> Option<u16> {
    image.strip_prefix(IMAGE_LISTENING_ON)?.split(':').next()?.parse().ok()
}

struct Inner {
    containers: BTreeMap<String, Model>,
    rng: StdRng,
    next_id: u64,
}

struct Model {
    observed: ObservedContainer,
    /// The ports it listens on: the published host ports, or the one its image names.
    ports: Vec<u16>,
    /// Its ports are not published: the activator dials it (an on-demand service).
    dialled: bool,
    /// The task that listens on the container's ports while it runs.
    listening: Option<tokio::task::AbortHandle>,
    /// Its volume, and the task that writes to it while it runs.
    volume: std::path::PathBuf,
    writing: Option<tokio::task::AbortHandle>,
}

impl Containers {
    pub fn new(seed: u64, slow_start_ms: Arc<AtomicU64>, host: &str, data: DataLog) -> Self {
        Containers {
            inner: Mutex::new(Inner {
                containers: BTreeMap::new(),
                rng: StdRng::seed_from_u64(seed),
                next_id: 0,
            }),
            slow_start_ms,
            host: host.to_string(),
            serving: Mutex::new(None),
            splices: Mutex::new(Vec::new()),
            data,
        }
    }

    /// Tells the containers how to ask the host's node (a new incarnation) what it serves.
    pub fn set_serving(&self, check: ServingCheck) {
        *self.serving.lock().expect("serving lock") = Some(check);
    }

    /// The connections on-demand containers accepted since the last call.
    pub fn take_splices(&self) -> Vec<Splice> {
        std::mem::take(&mut *self.splices.lock().expect("splices lock"))
    }

    /// A connection of `service` accepted now, with whether the node serves the service now.
    fn splice_at(&self, service: &str) -> Splice {
        let check = self.serving.lock().expect("serving lock").clone();
        let serving = check.is_some_and(|c| c(service));
        let at = turmoil::sim_elapsed().unwrap_or_default();
        Splice { service: service.to_string(), at, serving }
    }

    /// The host rebooted: its containers are all exited (their listeners died with the old runtime).
    pub fn reboot(&self) {
        let mut inner = self.inner.lock().expect("containers lock");
        for c in inner.containers.values_mut() {
            c.listening = None;
            c.writing = None;
            if c.observed.state == RunState::Running {
                c.observed.state = RunState::Exited;
                c.observed.status = "Exited (137) host rebooted".into();
            }
        }
    }

    /// Services whose container runs here now.
    pub fn running(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("containers lock");
        inner
            .containers
            .values()
            .filter(|c| c.observed.state == RunState::Running)
            .map(|c| c.observed.service.clone())
            .collect()
    }

    fn delay(&self, range: std::ops::Range<u64>, slow: bool) -> Duration {
        let mut inner = self.inner.lock().expect("containers lock");
        let extra = if slow { self.slow_start_ms.load(Ordering::SeqCst) } else { 0 };
        Duration::from_millis(inner.rng.gen_range(range) + extra)
    }
}

/// Listens on `port` in turmoil until aborted: TCP connections get an HTTP `200` to whatever they
/// send (a TCP probe only needs the handshake, an HTTP check reads the status line), and SOA queries
/// on the same port number over UDP get an authoritative answer (the service's zone, served by its
/// master). Retries the binds while an earlier incarnation still holds the port. A container records
/// each connection through which its node handed it a client's bytes: every one of a dialled
/// container's, and the proxy's requests to any container.
async fn listen(ports: Vec<u16>, recorder: (Arc<Containers>, String, bool)) {
    let mut tasks = Vec::new();
    for port in ports {
        let recorder = recorder.clone();
        tasks.push(Box::pin(async move {
            let listener = loop {
                match turmoil::net::TcpListener::bind(("0.0.0.0", port)).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            loop {
                if let Ok((mut stream, _)) = listener.accept().await {
                    // Whether the node serves the service as the container accepts: what a splice
                    // is checked against.
                    let (containers, service, dialled) = recorder.clone();
                    let splice = containers.splice_at(&service);
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = [0u8; 512];
                        if let Ok(n) = stream.read(&mut buf).await {
                            // A client's bytes came through the activator (the readiness probes
                            // connect and close without a byte) or the proxy.
                            let proxied =
                                buf[..n].windows(16).any(|w| w.eq_ignore_ascii_case(b"x-forwarded-for:"));
                            if n > 0 && (dialled || proxied) {
                                containers.splices.lock().expect("splices lock").push(splice);
                            }
                            if n > 0 {
                                let _ = stream
                                    .write_all(
                                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                                    )
                                    .await;
                            }
                        }
                    });
                }
            }
        }) as futures::future::BoxFuture<'static, ()>);
        tasks.push(Box::pin(async move {
            let socket = loop {
                match turmoil::net::UdpSocket::bind(("0.0.0.0", port)).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            let mut buf = [0u8; 512];
            loop {
                if let Ok((n, from)) = socket.recv_from(&mut buf).await {
                    if let Some(answer) = soa_answer(&buf[..n]) {
                        let _ = socket.send_to(&answer, from).await;
                    }
                }
            }
        }));
    }
    futures::future::join_all(tasks).await;
}

/// An authoritative answer to a one-question SOA query, for whatever zone it asks about.
fn soa_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 17 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    let mut end = 12;
    loop {
        let len = *query.get(end)? as usize;
        end += 1 + len;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
    }
    if query.get(end..end + 4)? != [0, 6, 0, 1] {
        return None;
    }
    let mut m = query[..end + 4].to_vec();
    m[2] = 0x84; // an authoritative answer to a standard query
    m[3] = 0;
    m[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    // The zone's name (a pointer to the question), SOA, IN, TTL 60, then MNAME and RNAME (the root)
    // and the five counters.
    m.extend_from_slice(&[0xc0, 12, 0, 6, 0, 1, 0, 0, 0, 60, 0, 22, 0, 0]);
    m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 14, 16, 0, 0, 7, 8, 0, 9, 58, 128, 0, 0, 0, 60]);
    Some(m)
}

/// The [`ContainerRuntime`] the simulated reconciler drives.
pub struct ModelRuntime(pub Arc<Containers>);

impl ModelRuntime {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.0.inner.lock().expect("containers lock"))
    }
}

/// The modification time of every model container's volume directory (seconds since the epoch).
const VOLUME_MTIME_S: u64 = 1_700_000_000;

#[async_trait]
impl ContainerRuntime for ModelRuntime {
    async fn list(&self) -> Result<Vec<ObservedContainer>, RuntimeError> {
        Ok(self.with(|i| i.containers.values().map(|c| c.observed.clone()).collect()))
    }

    async fn image_present(&self, _image: &str) -> Result<bool, RuntimeError> {
        Ok(true)
    }

    async fn pull(&self, _image: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn ensure_network(&self, _name: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn create(&self, config: &ContainerConfig) -> Result<String, RuntimeError> {
        // The volume directory is real (the node snapshots it); its modification time would be the
        // real clock's, and a snapshot records it. A fixed one keeps a seed's snapshots, and so its
        // run, the same from run to run.
        if let Ok(dir) = std::fs::File::open(&config.volume) {
            let _ = dir.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(VOLUME_MTIME_S));
        }
        self.with(|i| {
            if i.containers.values().any(|c| c.observed.name == config.name) {
                return Err(RuntimeError::Failed(format!("name {} in use", config.name)));
            }
            i.next_id += 1;
            let id = format!("c{}", i.next_id);
            let observed = ObservedContainer {
                id: id.clone(),
                name: config.name.clone(),
                service: config.labels.get(LABEL_SERVICE).cloned().unwrap_or_default(),
                spec_hash: config.labels.get(LABEL_SPEC).cloned().unwrap_or_default(),
                image: config.image.clone(),
                state: RunState::Created,
                status: "Created".into(),
            };
            let dialled = config.ports.is_empty();
            let ports = match port_of_image(&config.image) {
                Some(port) if dialled => vec![port],
                _ => config.ports.iter().map(|p| p.host).collect(),
            };
            let model = Model {
                observed,
                ports,
                dialled,
                listening: None,
                volume: config.volume.clone(),
                writing: None,
            };
            i.containers.insert(id.clone(), model);
            Ok(id)
        })
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        tokio::time::sleep(self.0.delay(START_MS, true)).await;
        let containers = self.0.clone();
        self.with(|i| {
            let Some(c) = i.containers.get_mut(id) else {
                return Err(RuntimeError::NotFound(format!("no container {id}")));
            };
            if c.observed.state != RunState::Running {
                c.observed.state = RunState::Running;
                c.observed.status = "Up".into();
                let recorder = (containers.clone(), c.observed.service.clone(), c.dialled);
                c.listening = Some(tokio::spawn(listen(c.ports.clone(), recorder)).abort_handle());
                let writer = write_data(
                    c.volume.clone(),
                    containers.host.clone(),
                    c.observed.service.clone(),
                    containers.data.clone(),
                );
                c.writing = Some(tokio::spawn(writer).abort_handle());
            }
            Ok(())
        })
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        tokio::time::sleep(self.0.delay(STOP_MS, false)).await;
        self.with(|i| {
            if let Some(c) = i.containers.get_mut(id) {
                if let Some(task) = c.listening.take() {
                    task.abort();
                }
                if let Some(task) = c.writing.take() {
                    task.abort();
                }
                if c.observed.state == RunState::Running {
                    c.observed.state = RunState::Exited;
                    c.observed.status = "Exited (0)".into();
                }
            }
            Ok(())
        })
    }

    /// A model container has no processes to freeze: pausing a running one succeeds.
    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|i| match i.containers.get(id) {
            Some(c) if c.observed.state == RunState::Running => Ok(()),
            Some(_) => Err(RuntimeError::Failed(format!("container {id} is not running"))),
            None => Err(RuntimeError::NotFound(format!("no container {id}"))),
        })
    }

    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|i| match i.containers.get(id) {
            Some(_) => Ok(()),
            None => Err(RuntimeError::NotFound(format!("no container {id}"))),
        })
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|i| {
            if let Some(mut c) = i.containers.remove(id) {
                if let Some(task) = c.listening.take() {
                    task.abort();
                }
                if let Some(task) = c.writing.take() {
                    task.abort();
                }
            }
            Ok(())
        })
    }

    /// A running container is reached at its host's address (turmoil treats a connection to the
    /// host's own address as loopback).
    async fn address(&self, id: &str) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        let running =
            self.with(|i| i.containers.get(id).is_some_and(|c| c.observed.state == RunState::Running));
        Ok(running.then(|| turmoil::lookup(self.0.host.as_str())))
    }
}

/// The monitor's service probe over turmoil's network: a TCP connection (and an HTTP request, for
/// an HTTP check) to the master's host and the service's port, which a running model container
/// accepts; SOA queries over UDP to the zone's nameservers. The check code is the production code
/// (`coyote_nodes::probe`); only the sockets are turmoil's.
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilProbe;

impl ServiceProbe for TurmoilProbe {
    fn probe(&self, check: Check, timeout: Duration) -> BoxFuture<'static, bool> {
        Box::pin(async move {
            let addr = check.addr().to_string();
            let tcp_only = matches!(check, Check::Tcp { .. });
            let connect = async move {
                let mut stream = turmoil::net::TcpStream::connect(addr).await?;
                if tcp_only {
                    // turmoil completes a connection without a message back from the server: its
                    // SYN-ACK is not subject to partitions, so a connection would succeed through a
                    // cut from the master to the prober. A real one needs that answer to cross the
                    // network; a request and the first byte of its answer stand for it here.
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
                    let mut first = [0u8; 1];
                    if stream.read(&mut first).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Ok(stream)
            };
            probe::check_over(&check, timeout, connect).await
        })
    }

    fn zone(&self, zone: ZoneCheck, timeout: Duration) -> BoxFuture<'static, bool> {
        Box::pin(async move {
            probe::any_nameserver(&zone, timeout, |name, ns, i| async move {
                let id = 0x5a00 + i as u16;
                let answered = async {
                    let socket = turmoil::net::UdpSocket::bind(("0.0.0.0", 0)).await.ok()?;
                    socket.send_to(&probe::soa_query(id, &name)?, ns.as_str()).await.ok()?;
                    let mut buf = [0u8; 512];
                    loop {
                        let (n, _) = socket.recv_from(&mut buf).await.ok()?;
                        if probe::soa_answered(id, &name, &buf[..n]) {
                            return Some(());
                        }
                    }
                };
                answered.await.is_some()
            })
            .await
        })
    }
}
