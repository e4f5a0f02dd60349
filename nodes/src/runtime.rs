//! The container runtime the reconciler drives: a narrow trait, and its Docker implementation.
//!
//! # How it works
//!
//! [`ContainerRuntime`] is everything the reconciler needs from a container engine: list the
//! containers this node manages, check and pull images, make sure the `coyote` network exists, and
//! create, start, stop and remove containers; and, for the activator, run a command inside a running
//! container (a dump before a stop: Docker's exec API, with a deadline, keeping its exit code and the
//! end of its output). Its types ([`ObservedContainer`], [`ContainerConfig`],
//! [`RuntimeError`]) are ours, not bollard's, so the planner never sees Docker and the simulator can
//! put a model of containers (with start and stop delays) behind the same trait.
//!
//! [`DockerRuntime`] talks to the Docker Engine over its unix socket with bollard (no TLS involved).
//! It connects lazily and again after any transport error, so a daemon that is down, restarting, or a
//! socket path that is wrong is an [`RuntimeError::Unavailable`] at each call, never a crash; the
//! reconciler turns it into an alarm. The API version is negotiated down to the engine's (Debian's
//! Docker 20.10 speaks 1.41).
//!
//! Every container carries labels: `coyote.cluster=ID`, `coyote.node=N`, `coyote.service=NAME` and
//! `coyote.spec=HASH`. Listing filters on the cluster and node labels, so two nodes of one cluster on
//! one host (as in the tests), other clusters and the developer's own containers are never touched.
//! Names are `coyote-SERVICE-nN-CLUSTER`, unique per host for the same reason.
//!
//! Containers get no Docker restart policy: the reconciler is their supervisor. A policy would let
//! Docker restart a container behind coyote's back, after a reboot for instance, on a server that is
//! no longer the service's master; fencing needs that only coyote starts containers.
//!
//! # Left out
//!
//! - Registry credentials: pulls are anonymous.
//! - CPU limits, environment variables, commands: the spec does not carry them yet.
//! - Docker volumes: a service's data is a bind mount of `DATA/volumes/NAME`, which backups can read
//!   as plain files.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use coyote_state_machine::{NodeId, PortMap};
use serde::{Deserialize, Serialize};

pub const LABEL_CLUSTER: &str = "coyote.cluster";
pub const LABEL_NODE: &str = "coyote.node";
pub const LABEL_SERVICE: &str = "coyote.service";
pub const LABEL_SPEC: &str = "coyote.spec";
/// The bridge network every service container joins.
pub const NETWORK: &str = "coyote";
/// Where a service's volume appears inside its container.
pub const VOLUME_TARGET: &str = "/data";
/// Deadline of one request to the Docker daemon.
pub const DOCKER_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period between SIGTERM and SIGKILL when a container is stopped.
pub const STOP_GRACE_S: i32 = 10;
/// Bytes kept of each output stream of a command run in a container (the end of it).
pub const EXEC_OUTPUT_TAIL: usize = 2048;
/// Deadline of one image pull.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Pull progress is logged at most this often.
pub const PULL_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Which containers a runtime manages: those of one node of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub cluster_id: String,
    pub node_id: NodeId,
}

impl Scope {
    /// The container name for `service`: unique per host across nodes and clusters.
    pub fn container_name(&self, service: &str) -> String {
        format!("coyote-{service}-n{}-{}", self.node_id, self.cluster_id)
    }
}

/// What a container is doing, as far as the reconciler cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created, never started.
    Created,
    Running,
    /// Ran and stopped (by hand, by us, or by crashing).
    Exited,
    /// Paused, restarting, being removed, dead: the engine is busy with it.
    Other,
}

impl RunState {
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

/// One container of ours, as the runtime reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedContainer {
    pub id: String,
    pub name: String,
    pub service: String,
    pub spec_hash: String,
    pub image: String,
    pub state: RunState,
    /// The engine's own words (`Exited (3) 2 seconds ago`).
    pub status: String,
}

/// Everything needed to create one service's container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerConfig {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortMap>,
    pub memory_bytes: Option<u64>,
    /// Host directory bound to [`VOLUME_TARGET`].
    pub volume: PathBuf,
    pub network: String,
}

/// What a command run inside a container did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// `None` if the engine did not report one.
    pub exit_code: Option<i64>,
    /// The last [`EXEC_OUTPUT_TAIL`] bytes of each stream (lossy UTF-8).
    pub stdout_tail: String,
    pub stderr_tail: String,
}

impl ExecOutcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The end of a stream: at most [`EXEC_OUTPUT_TAIL`] bytes.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > EXEC_OUTPUT_TAIL {
            let cut = self.0.len() - EXEC_OUTPUT_TAIL;
            self.0.drain(..cut);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The engine cannot be reached: socket missing, daemon down, timeout.
    #[error("{0}")]
    Unavailable(String),
    #[error("image {0} is not present")]
    ImageMissing(String),
    /// A published host port is used by something else.
    #[error("{0}")]
    PortTaken(String),
    /// The container (or network) does not exist (any more).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// What the reconciler needs from a container engine. Implementations manage only the containers of
/// their [`Scope`].
#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// This node's containers (running or not).
    async fn list(&self) -> Result<Vec<ObservedContainer>>;
    async fn image_present(&self, image: &str) -> Result<bool>;
    /// Pulls an image, reporting progress in the log; bounded by [`PULL_TIMEOUT`].
    async fn pull(&self, image: &str) -> Result<()>;
    /// Creates the bridge network `name` if it does not exist.
    async fn ensure_network(&self, name: &str) -> Result<()>;
    /// Creates a container, stopped; returns its id.
    async fn create(&self, config: &ContainerConfig) -> Result<String>;
    async fn start(&self, id: &str) -> Result<()>;
    async fn stop(&self, id: &str) -> Result<()>;
    async fn remove(&self, id: &str) -> Result<()>;
    /// The container's address on the coyote network, if it is running and has one.
    async fn address(&self, id: &str) -> Result<Option<std::net::IpAddr>>;
    /// Runs `argv` inside the running container and waits for it, at most `timeout` (then it is an
    /// error; the command may still be running in the container). A command that ran and failed is
    /// an `Ok` with its exit code.
    async fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecOutcome> {
        let _ = (id, timeout);
        Err(RuntimeError::Failed(format!("this runtime cannot run {argv:?} in a container")))
    }
    /// Freezes every process of the running container (`docker pause`), so that its files can be
    /// read as a power cut would leave them.
    async fn pause(&self, id: &str) -> Result<()> {
        Err(RuntimeError::Failed(format!("this runtime cannot pause container {id}")))
    }
    async fn unpause(&self, id: &str) -> Result<()> {
        Err(RuntimeError::Failed(format!("this runtime cannot unpause container {id}")))
    }
}

/// The Docker Engine over its unix socket.
pub struct DockerRuntime {
    socket: PathBuf,
    scope: Scope,
    /// The connection, made on first use and dropped after a transport error. A std mutex: it is held
    /// only to clone or replace the handle, never across an await.
    client: Mutex<Option<bollard::Docker>>,
}

impl DockerRuntime {
    pub fn new(socket: PathBuf, scope: Scope) -> Self {
        DockerRuntime { socket, scope, client: Mutex::new(None) }
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Keeps one network named `name`, the one with the lowest id (every node picks the same), and
    /// removes the others; one that is in use stays, with a warning.
    async fn remove_duplicate_networks(&self, name: &str) -> Result<()> {
        let docker = self.client().await?;
        let filters = HashMap::from([("name".to_string(), vec![name.to_string()])]);
        let options = bollard::query_parameters::ListNetworksOptions { filters: Some(filters) };
        let listed = docker
            .list_networks(Some(options))
            .await
            .map_err(|e| self.error(&format!("listing networks named {name}"), e))?;
        // The filter matches substrings.
        let mut ids: Vec<String> =
            listed.into_iter().filter(|n| n.name.as_deref() == Some(name)).filter_map(|n| n.id).collect();
        ids.sort();
        for id in ids.iter().skip(1) {
            match docker.remove_network(id).await {
                Ok(()) => tracing::info!(network = name, id = %id, "removed a duplicate Docker network"),
                Err(e) => {
                    tracing::warn!(network = name, id = %id, error = %e, "cannot remove a duplicate Docker network")
                }
            }
        }
        Ok(())
    }

    async fn client(&self) -> Result<bollard::Docker> {
        if let Some(c) = self.client.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(c);
        }
        let path = self.socket.to_string_lossy().into_owned();
        let unavailable = |e: String| {
            RuntimeError::Unavailable(format!("Docker is not reachable at {}: {e}", self.socket.display()))
        };
        let docker = bollard::Docker::connect_with_unix(
            &path,
            DOCKER_REQUEST_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| match e {
            bollard::errors::Error::SocketNotFoundError(_) => unavailable("no such socket".into()),
            other => unavailable(other.to_string()),
        })?;
        let docker = docker.negotiate_version().await.map_err(|e| unavailable(e.to_string()))?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(docker.clone());
        Ok(docker)
    }

    /// Classifies a bollard error; a transport error also drops the connection.
    fn error(&self, what: &str, e: bollard::errors::Error) -> RuntimeError {
        use bollard::errors::Error as E;
        match e {
            E::DockerResponseServerError { status_code, message } => {
                let lower = message.to_ascii_lowercase();
                if status_code == 404 && lower.contains("no such image") {
                    RuntimeError::ImageMissing(message)
                } else if status_code == 404 {
                    RuntimeError::NotFound(format!("{what}: {message}"))
                } else if lower.contains("port is already allocated")
                    || lower.contains("address already in use")
                {
                    RuntimeError::PortTaken(format!("{what}: {message}"))
                } else {
                    RuntimeError::Failed(format!("{what}: {message} (status {status_code})"))
                }
            }
            E::DockerStreamError { error } => RuntimeError::Failed(format!("{what}: {error}")),
            E::JsonDataError { .. } | E::JsonSerdeError { .. } => {
                RuntimeError::Failed(format!("{what}: unexpected answer from Docker: {e}"))
            }
            other => {
                *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
                RuntimeError::Unavailable(format!(
                    "Docker is not reachable at {}: {what}: {other}",
                    self.socket.display()
                ))
            }
        }
    }

    fn scope_filters(&self) -> HashMap<String, Vec<String>> {
        let labels = vec![
            format!("{LABEL_CLUSTER}={}", self.scope.cluster_id),
            format!("{LABEL_NODE}={}", self.scope.node_id),
        ];
        HashMap::from([("label".to_string(), labels)])
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn list(&self) -> Result<Vec<ObservedContainer>> {
        use bollard::models::ContainerSummaryStateEnum as S;
        let docker = self.client().await?;
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(self.scope_filters()),
            ..Default::default()
        };
        let list =
            docker.list_containers(Some(options)).await.map_err(|e| self.error("listing containers", e))?;
        let mut out = Vec::with_capacity(list.len());
        for c in list {
            let labels = c.labels.unwrap_or_default();
            let (Some(id), Some(service)) = (c.id, labels.get(LABEL_SERVICE)) else { continue };
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_else(|| id.clone());
            let state = match c.state {
                Some(S::CREATED) => RunState::Created,
                Some(S::RUNNING) => RunState::Running,
                Some(S::EXITED) => RunState::Exited,
                _ => RunState::Other,
            };
            out.push(ObservedContainer {
                id,
                name,
                service: service.clone(),
                spec_hash: labels.get(LABEL_SPEC).cloned().unwrap_or_default(),
                image: c.image.unwrap_or_default(),
                state,
                status: c.status.unwrap_or_default(),
            });
        }
        out.sort_by(|a, b| (&a.service, &a.name).cmp(&(&b.service, &b.name)));
        Ok(out)
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        let docker = self.client().await?;
        match docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match self.error(&format!("inspecting image {image}"), e) {
                RuntimeError::ImageMissing(_) | RuntimeError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn pull(&self, image: &str) -> Result<()> {
        use futures::StreamExt;
        let docker = self.client().await?;
        let options = bollard::query_parameters::CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        };
        tracing::info!(image, "pulling image");
        let pull = async {
            let mut stream = docker.create_image(Some(options), None, None);
            let mut last_report = tokio::time::Instant::now();
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| self.error(&format!("pulling {image}"), e))?;
                if last_report.elapsed() >= PULL_PROGRESS_INTERVAL {
                    last_report = tokio::time::Instant::now();
                    let detail = info.progress_detail.as_ref();
                    tracing::info!(
                        image,
                        status = info.status.as_deref().unwrap_or(""),
                        layer = info.id.as_deref().unwrap_or(""),
                        current = detail.and_then(|d| d.current).unwrap_or(0),
                        total = detail.and_then(|d| d.total).unwrap_or(0),
                        "pull progress"
                    );
                }
            }
            Ok(())
        };
        match tokio::time::timeout(PULL_TIMEOUT, pull).await {
            Ok(Ok(())) => {
                tracing::info!(image, "image pulled");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RuntimeError::Failed(format!(
                "pulling {image} did not finish within {} s",
                PULL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn ensure_network(&self, name: &str) -> Result<()> {
        let docker = self.client().await?;
        match docker.inspect_network(name, None).await {
            Ok(_) => return Ok(()),
            // Docker lets two networks have one name (two nodes on one host that created it at the same
            // moment); then it refuses to resolve the name.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 400, message })
                if message.contains("ambiguous") =>
            {
                return self.remove_duplicate_networks(name).await;
            }
            Err(e) => match self.error(&format!("inspecting network {name}"), e) {
                RuntimeError::NotFound(_) => {}
                other => return Err(other),
            },
        }
        let request = bollard::models::NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => {
                tracing::info!(network = name, "created the Docker network");
                // Another node may have created one of the same name at the same moment.
                self.remove_duplicate_networks(name).await
            }
            // Another node on this host created it in the meantime.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(self.error(&format!("creating network {name}"), e)),
        }
    }

    async fn create(&self, config: &ContainerConfig) -> Result<String> {
        use bollard::models::{
            ContainerCreateBody, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
        };
        let docker = self.client().await?;
        let exposed: Vec<String> = config.ports.iter().map(|p| format!("{}/tcp", p.container)).collect();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for p in &config.ports {
            bindings
                .entry(format!("{}/tcp", p.container))
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding { host_ip: None, host_port: Some(p.host.to_string()) });
        }
        let memory = match config.memory_bytes {
            Some(m) => Some(i64::try_from(m).map_err(|_| {
                RuntimeError::Failed(format!("memory limit {m} bytes is too large for Docker"))
            })?),
            None => None,
        };
        let body = ContainerCreateBody {
            image: Some(config.image.clone()),
            labels: Some(config.labels.clone().into_iter().collect()),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{}:{VOLUME_TARGET}", config.volume.display())]),
                memory,
                port_bindings: (!bindings.is_empty()).then_some(bindings),
                network_mode: Some(config.network.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = bollard::query_parameters::CreateContainerOptions {
            name: Some(config.name.clone()),
            ..Default::default()
        };
        let created = docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| self.error(&format!("creating container {}", config.name), e))?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<()> {
        let docker = self.client().await?;
        docker.start_container(id, None).await.map_err(|e| self.error("starting the container", e))
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let docker = self.client().await?;
        docker.pause_container(id).await.map_err(|e| self.error("pausing the container", e))
    }

    async fn unpause(&self, id: &str) -> Result<()> {
        let docker = self.client().await?;
        docker.unpause_container(id).await.map_err(|e| self.error("unpausing the container", e))
    }

    async fn stop(&self, id: &str) -> Result<()> {
        let docker = self.client().await?;
        let options = bollard::query_parameters::StopContainerOptions { t: Some(STOP_GRACE_S), signal: None };
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(self.error("stopping the container", e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let docker = self.client().await?;
        let options =
            bollard::query_parameters::RemoveContainerOptions { force: true, v: false, link: false };
        match docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => match self.error("removing the container", e) {
                RuntimeError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecOutcome> {
        use bollard::container::LogOutput;
        use bollard::exec::{CreateExecOptions, StartExecResults};
        use futures::StreamExt;
        let docker = self.client().await?;
        let run = async {
            let options = CreateExecOptions {
                cmd: Some(argv.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            };
            let created = docker
                .create_exec(id, options)
                .await
                .map_err(|e| self.error("creating a command in the container", e))?;
            let started = docker
                .start_exec(&created.id, None)
                .await
                .map_err(|e| self.error("starting a command in the container", e))?;
            let (mut stdout, mut stderr) = (Tail::default(), Tail::default());
            if let StartExecResults::Attached { mut output, .. } = started {
                while let Some(item) = output.next().await {
                    match item.map_err(|e| self.error("reading the command's output", e))? {
                        LogOutput::StdErr { message } => stderr.push(&message),
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            stdout.push(&message)
                        }
                        LogOutput::StdIn { .. } => {}
                    }
                }
            }
            // The output ends when the command does; the engine may record its exit a moment later.
            let mut exit_code = None;
            for _ in 0..100 {
                let inspected = docker
                    .inspect_exec(&created.id)
                    .await
                    .map_err(|e| self.error("inspecting a command in the container", e))?;
                if inspected.running != Some(true) {
                    exit_code = inspected.exit_code;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(ExecOutcome { exit_code, stdout_tail: stdout.text(), stderr_tail: stderr.text() })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(RuntimeError::Failed(format!(
                "the command did not finish within {} s (it may still run in the container)",
                timeout.as_secs_f64()
            ))),
        }
    }

    async fn address(&self, id: &str) -> Result<Option<std::net::IpAddr>> {
        let docker = self.client().await?;
        let inspected = docker
            .inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>)
            .await
            .map_err(|e| self.error("inspecting the container", e))?;
        let ip = inspected
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut nets| nets.remove(NETWORK))
            .and_then(|n| n.ip_address)
            .filter(|ip| !ip.is_empty());
        Ok(ip.and_then(|ip| ip.parse().ok()))
    }
}
