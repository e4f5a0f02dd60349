//! Creating, joining and running a node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use coyote_log::store;
use coyote_log::tls::{self, ClusterCa};
use coyote_log::{Environment, JoinToken, LogNode, LogNodeConfig, RaftSettings};
use tokio::net::{TcpListener, UnixListener};

use coyote_nodes::activator::ActivatorConfig;
use coyote_nodes::backups::BackupSettings;
use coyote_nodes::forward::{ForwardMode, Forwarder};
use coyote_nodes::front::FrontParts;
use coyote_nodes::monitor::MonitorConfig;
use coyote_nodes::node::{ContainerParts, CrmParts, Node, Parts, STOP_WAIT};
use coyote_nodes::reconciler;
use coyote_nodes::runtime::{ContainerRuntime, DockerRuntime, Scope};
use coyote_nodes::sockets::{Sockets, TcpSockets};

use crate::datadir::{check_store_cluster, DataDir, NodeFile, LAYOUT_VERSION};

/// Where a node listens and what it tells others.
pub struct Addresses {
    pub listen: String,
    pub advertise: Option<String>,
}

impl Addresses {
    fn resolve(&self) -> Result<(String, String)> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            anyhow!(
                "--listen {:?} is not HOST:PORT with an IP address (example: 127.0.0.1:7100)",
                self.listen
            )
        })?;
        let advertise = match &self.advertise {
            Some(a) => a.clone(),
            None if listen.ip().is_unspecified() => {
                bail!("--listen {listen} binds every address: say which one members should dial with --advertise HOST:PORT")
            }
            None => listen.to_string(),
        };
        if !advertise.contains(':') {
            bail!("--advertise {advertise:?} is not HOST:PORT");
        }
        Ok((listen.to_string(), advertise))
    }
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Creates a single-node cluster in an empty `dir`. Leaves nothing behind if it fails.
pub async fn init(dir: &DataDir, addrs: &Addresses, settings: &RaftSettings) -> Result<()> {
    let (listen, advertise) = addrs.resolve()?;
    dir.create()?;
    let result = init_inner(dir, listen, advertise, settings).await;
    if result.is_err() {
        dir.remove_partial();
    }
    result
}

async fn init_inner(dir: &DataDir, listen: String, advertise: String, settings: &RaftSettings) -> Result<()> {
    let cluster_id = random_hex(8);
    let node_id = 1;
    let ca = ClusterCa::generate(&cluster_id).context("creating the cluster CA")?;
    let (key_pem, csr_pem) = tls::generate_node_key().context("creating the node key")?;
    let cert_pem = ca.sign_node(&csr_pem, node_id).context("signing the node certificate")?;
    dir.write_identity(&ca, &cert_pem, &key_pem)?;
    let node_file =
        NodeFile { layout: LAYOUT_VERSION, cluster_id: cluster_id.clone(), node_id, listen, advertise };
    // If anything below fails, `init` removes the whole directory content again.
    let _lock = dir.lock()?;
    let (log, sm, handle) = store::open(&dir.store()).context("creating the store")?;
    check_store_cluster(&handle, dir, &cluster_id)?;
    let config = LogNodeConfig {
        node_id,
        cluster_id: cluster_id.clone(),
        addr: node_file.advertise.clone(),
        raft: settings.clone(),
    };
    dir.write_node_file(&node_file)?;
    let (identity, _) = dir.read_identity()?;
    let node = LogNode::start(config, log, sm, handle, &identity, Some(ca.clone())).await?;
    let proposed = node.initialize(ca.pin()).await.context("creating the cluster")?;
    node.shutdown().await;
    tracing::info!(cluster_id, index = proposed.index, "cluster created");
    eprintln!("created cluster {cluster_id} in {}: this is node 1", dir.path.display());
    Ok(())
}

/// Joins the cluster a token points at, from an empty `dir`. Leaves nothing behind if it fails.
pub async fn join(dir: &DataDir, token_text: &str, addrs: &Addresses) -> Result<()> {
    let token = JoinToken::parse(token_text)?;
    let (listen, advertise) = addrs.resolve()?;
    dir.create()?;
    let result = async {
        let (key_pem, csr_pem) = tls::generate_node_key().context("creating the node key")?;
        eprintln!("joining the cluster through {} ...", token.addr);
        let reply = coyote_log::cluster::request_join(&token, &advertise, &csr_pem).await?;
        let ca = ClusterCa::from_pem(&reply.ca_cert_pem, &reply.ca_key_pem)
            .context("the cluster sent an unusable CA")?;
        if ca.pin() != token.ca_pin {
            bail!("the cluster's CA does not match the pin in the token");
        }
        dir.write_identity(&ca, &reply.node_cert_pem, &key_pem)?;
        dir.write_node_file(&NodeFile {
            layout: LAYOUT_VERSION,
            cluster_id: reply.cluster_id.clone(),
            node_id: reply.node_id,
            listen,
            advertise,
        })?;
        eprintln!("joined cluster {} as node {}", reply.cluster_id, reply.node_id);
        Ok(())
    }
    .await;
    if result.is_err() {
        dir.remove_partial();
    }
    result
}

/// How the node manages containers.
pub struct ContainerOptions {
    /// Manage containers at all (off: a node that only holds the log).
    pub reconcile: bool,
    pub docker_socket: std::path::PathBuf,
    /// Pull missing images.
    pub pull: bool,
    /// Stop an idle on-demand container after this long.
    pub idle_stop: Duration,
    /// Deadline of a dump command.
    pub dump_timeout: Duration,
    /// Stop idle on-demand containers while available memory is below this many bytes.
    pub memory_min_available: Option<u64>,
    /// How warm on-demand connections reach their containers (`None`: kernel if it can work here).
    pub forward: Option<ForwardMode>,
    /// Keep snapshots of services' data (`DIR/backups`).
    pub backups: bool,
    pub backup_every: Duration,
    pub pause_limit: Duration,
    pub backup_reserve: u64,
}

/// The node's front door.
pub struct FrontOptions {
    /// Run the proxy at all.
    pub proxy: bool,
    pub http: String,
    pub https: String,
    /// Where `/metrics` is served over TCP (`None`: only on the unix socket).
    pub metrics: Option<String>,
    /// Where certificates come from (`None`: the cluster's own CA).
    pub acme: Option<coyote_nodes::acme::AcmeOptions>,
    /// The proxy's limits.
    pub settings: coyote_proxy::Settings,
    /// Where the CRM is served (`None`: no CRM on this node).
    pub crm: Option<String>,
    /// Print an activation URL once the node runs, while the cluster has no admin (`coyote up`).
    pub activation: bool,
}

impl FrontOptions {
    /// Binds the proxy's listeners; an address that cannot be bound is an error that says what to do.
    async fn parts(&self) -> Result<Option<FrontParts>> {
        if !self.proxy {
            tracing::info!("no proxy on this server (--no-proxy)");
            return Ok(None);
        }
        let mut bound = Vec::new();
        for (flag, addr) in [("--http", &self.http), ("--https", &self.https)] {
            let parsed: SocketAddr = addr.parse().map_err(|_| {
                anyhow!("{flag} {addr:?} is not HOST:PORT with an IP address (example: 0.0.0.0:443)")
            })?;
            let listener = TcpSockets.listen(parsed).await.with_context(|| {
                format!(
                    "the proxy cannot listen on {parsed} ({flag}): another program may hold the port, or                      ports below 1024 need root; choose another with {flag}, or run no proxy with --no-proxy"
                )
            })?;
            bound.push(listener);
        }
        let https = bound.pop();
        let http = bound.pop();
        if let Some(root) = self.acme.as_ref().and_then(|a| a.root_pem.as_ref()) {
            std::fs::read(root)
                .with_context(|| format!("--acme-ca-root {} cannot be read", root.display()))?;
        }
        Ok(Some(FrontParts { http, https, settings: self.settings.clone(), acme: self.acme.clone() }))
    }
}

/// Runs the node in `dir` in the foreground until SIGINT or SIGTERM.
pub async fn run(
    dir: &DataDir,
    settings: &RaftSettings,
    containers: &ContainerOptions,
    front_options: &FrontOptions,
) -> Result<()> {
    let node_file = dir.read_node_file()?;
    let (identity, ca) = dir.read_identity()?;
    let id_in_cert = identity.node_id().context("reading the node certificate")?;
    if id_in_cert != node_file.node_id {
        bail!(
            "{} names node {}, but the certificate is for node {id_in_cert}: the data directory is inconsistent",
            dir.node_file().display(),
            node_file.node_id
        );
    }
    let _lock = dir.lock()?;
    let (log, sm, handle) = store::open(&dir.store())
        .with_context(|| format!("the store in {} cannot be opened", dir.store().display()))?;
    check_store_cluster(&handle, dir, &node_file.cluster_id)?;
    let me = node_file.node_id;
    let departed = dir.departed().or_else(|| {
        handle.with_state(|s| s.departed.contains(&me)).then(|| format!("node {me} left or was removed"))
    });
    if let Some(why) = departed {
        bail!("{}", departed_message(dir, &node_file, &why));
    }

    let listener = TcpListener::bind(&node_file.listen)
        .await
        .with_context(|| format!("cannot listen on {}", node_file.listen))?;
    let socket_path = dir.socket();
    let _ = std::fs::remove_file(&socket_path); // a stale socket from a killed node
    let api_listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("cannot create the API socket {}", socket_path.display()))?;

    let config = LogNodeConfig {
        node_id: node_file.node_id,
        cluster_id: node_file.cluster_id.clone(),
        addr: node_file.advertise.clone(),
        raft: settings.clone(),
    };
    let front = front_options.parts().await?;
    let metrics_listener = match &front_options.metrics {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot serve /metrics on {addr} (--metrics): another program may hold the port")
        })?),
        None => None,
    };
    let crm_listener = match &front_options.crm {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot serve the CRM on {addr} (--crm): another program may hold the port; choose another with --crm HOST:PORT, or --no-crm")
        })?),
        None => None,
    };
    let crm_url = crm_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| format!("http://{a}"));
    let crm =
        crm_url.clone().map(|url| CrmParts { settings: coyote_crm::Settings::default(), url: Some(url) });
    let containers = if containers.reconcile {
        Some(container_parts(dir, &node_file, containers).await?)
    } else {
        tracing::info!("container management is off (--no-reconcile)");
        None
    };
    let node = Node::start(Parts {
        config,
        store: (log, sm, handle),
        identity,
        ca,
        env: Environment::default(),
        listener,
        monitor: MonitorConfig::default(),
        probe: None,
        containers,
        front,
        crm,
    })
    .await?;
    let api = {
        let (router, shutdown) = (node.api.clone(), node.stopping());
        tokio::spawn(async move { axum::serve(api_listener, router).with_graceful_shutdown(shutdown).await })
    };
    if let (Some(listener), Some(router)) = (crm_listener, node.crm.clone()) {
        let shutdown = node.stopping();
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, service).with_graceful_shutdown(shutdown).await });
        if front_options.activation {
            tokio::spawn(print_activation(node.log.clone(), node.api.clone()));
        }
    }
    if let Some(listener) = metrics_listener {
        let (router, shutdown) = (node.metrics.clone(), node.stopping());
        if let Ok(addr) = listener.local_addr() {
            eprintln!("metrics: http://{addr}/metrics");
        }
        tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(shutdown).await });
    }
    tracing::info!(
        cluster_id = %node_file.cluster_id,
        node_id = node_file.node_id,
        listen = %node_file.listen,
        api = %socket_path.display(),
        "node running"
    );
    eprintln!(
        "node {} of cluster {} listening on {}, API on {}",
        node_file.node_id,
        node_file.cluster_id,
        node_file.listen,
        socket_path.display()
    );
    if front_options.proxy {
        eprintln!("proxy: http on {}, https on {}", front_options.http, front_options.https);
    }
    if let Some(url) = &crm_url {
        eprintln!("CRM: {url}");
    }

    let failure = tokio::select! {
        signal = wait_for_signal() => {
            signal?;
            None
        }
        reason = node.log.stopped() => Some(reason),
        why = node.departed() => {
            // Written first: a crash from here on must not let this server start again as a member.
            let recorded = dir.write_departed(&why);
            eprintln!("node {me} is no longer a member: {why}\nremoving its containers and stopping ...");
            // Its own replica records a leave; a removal may be known only from a member's refusal.
            let left = node.log.store().with_state(|s| s.departed.contains(&me));
            let removed = node.retire().await;
            let _ = tokio::time::timeout(STOP_WAIT, api).await;
            let _ = std::fs::remove_file(&socket_path);
            recorded?;
            if !removed {
                eprintln!("some of its containers could not be removed: see `docker ps -a --filter label=coyote.node={me}`");
            }
            eprintln!("{}", departed_message(dir, &node_file, &why));
            return if left { Ok(()) } else { Err(anyhow!("node {me} was removed from the cluster")) };
        }
    };
    if let Some(reason) = &failure {
        tracing::error!(%reason, "the log stopped");
        eprintln!(
            "node {}: the log stopped: {reason}\nEvery acknowledged event is on disk. If the disk is full, free \
             space under {} and start the node again.",
            node_file.node_id,
            dir.path.display()
        );
    } else {
        eprintln!("stopping node {}", node_file.node_id);
    }
    node.stop().await;
    let _ = tokio::time::timeout(STOP_WAIT, api).await;
    let _ = std::fs::remove_file(&socket_path);
    match failure {
        Some(reason) => bail!("node {} stopped: the log failed: {reason}", node_file.node_id),
        None => Ok(()),
    }
}

/// The container parts of a node that manages containers: Docker through its socket, volumes under
/// the data directory, kernel forwarding when it works here (or as `--forward` says).
async fn container_parts(
    dir: &DataDir,
    node_file: &NodeFile,
    options: &ContainerOptions,
) -> Result<ContainerParts> {
    let scope = Scope { cluster_id: node_file.cluster_id.clone(), node_id: node_file.node_id };
    let runtime: Arc<dyn ContainerRuntime> =
        Arc::new(DockerRuntime::new(options.docker_socket.clone(), scope));
    let volumes = std::path::absolute(&dir.path)
        .with_context(|| format!("cannot resolve {}", dir.path.display()))?
        .join("volumes");
    let activator = ActivatorConfig {
        idle_stop: options.idle_stop,
        dump_timeout: options.dump_timeout,
        memory_min_available: options.memory_min_available,
        ..Default::default()
    };
    let forwarder = match options.forward {
        Some(ForwardMode::Userspace) => {
            tracing::info!("on-demand connections go through the activator (--forward userspace)");
            None
        }
        Some(ForwardMode::Kernel) => Some(Arc::new(
            Forwarder::setup(activator.bind_ip)
                .await
                .context("kernel forwarding (--forward kernel) cannot work here")?,
        )),
        None => match Forwarder::setup(activator.bind_ip).await {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!(
                    "kernel forwarding is off, on-demand connections go through the activator: {e:#}"
                );
                None
            }
        },
    };
    let backups = options.backups.then(|| {
        let mut settings = BackupSettings::new(volumes.with_file_name("backups"), volumes.clone());
        settings.every = options.backup_every;
        settings.pause_limit = options.pause_limit;
        settings.dump_timeout = options.dump_timeout;
        settings.reserve_bytes = options.backup_reserve;
        settings
    });
    Ok(ContainerParts {
        runtime,
        reconciler: reconciler::Settings { volumes, pull: options.pull, dump_timeout: options.dump_timeout },
        activator,
        forwarder,
        sockets: None,
        backups,
    })
}

/// What a server that is no longer a member says when asked to run.
fn departed_message(dir: &DataDir, node_file: &NodeFile, why: &str) -> String {
    format!(
        "node {} is no longer a member of cluster {} ({why}): this server cannot take part any more. \
         Its data directory {} is kept (with the services' volumes); to use this server in a cluster \
         again, move it away and join with a new token (coyote join)",
        node_file.node_id,
        node_file.cluster_id,
        dir.path.display()
    )
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Once the node can write, and while the cluster has no admin, issues an activation URL and prints
/// it: the way the first admin is created (`coyote up`). Gives up quietly after a minute.
async fn print_activation(log: LogNode, api: axum::Router) {
    use tower::ServiceExt;
    for _ in 0..60 {
        if log.store().with_state(|s| s.accounts.admins().next().is_some()) {
            return;
        }
        if log.status().await.leader.is_some() {
            let body = serde_json::to_vec(&coyote_nodes::wire::ActivationCreate { ttl_ms: None })
                .unwrap_or_default();
            let request = axum::http::Request::post("/v1/activations")
                .header("content-type", "application/json")
                .header(coyote_nodes::api::ACTOR_HEADER, format!("up@node:{}", log.id()))
                .body(axum::body::Body::from(body));
            if let Ok(request) = request {
                let Ok(response) = api.clone().oneshot(request).await;
                if response.status().is_success() {
                    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap_or_default();
                    if let Ok(created) =
                        serde_json::from_slice::<coyote_nodes::wire::ActivationCreated>(&bytes)
                    {
                        let url = created.url.unwrap_or(created.code);
                        eprintln!(
                            "activate this cluster: open {url}\n  (it works once, until {}; `coyote crm activate` prints another)",
                            coyote_state_machine::format_ms(created.expires_at_ms)
                        );
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::warn!("no activation URL was issued: the node could not write within a minute");
}
