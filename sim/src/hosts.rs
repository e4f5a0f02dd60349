//! The simulated hosts: what they share with the driver ([`World`]), what survives a crash
//! ([`HostState`]), and the software each runs: the node `coyote node` runs, assembled by
//! `coyote_nodes::node::Node::start` from the simulation's parts, with the simulated admin, the
//! workload and the visitors beside it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coyote_log::store::{self};
use coyote_log::tls::Identity;
use coyote_log::{Clock, Environment, LogNodeConfig};
use coyote_nodes::activator::ActivatorConfig;
use coyote_nodes::backups::BackupSettings;
use coyote_nodes::front::FrontParts;
use coyote_nodes::monitor::MonitorConfig;
use coyote_nodes::node::{ContainerParts, CrmParts, Node, Parts};
use coyote_nodes::reconciler;
use coyote_nodes::sockets::Sockets as _;

use crate::material::material;
use crate::model::{ModelRuntime, TurmoilProbe};
use crate::net;
use crate::params::{raft_settings, BACKUP_EVERY, CLUSTER_ID, HTTP_PORT, IDLE_STOP, PORT};
use crate::workload::{admin, create_crm_admin, issue_token, join, visitors, web_visitors, workload};
use crate::world::{HostState, SimNode, World};

/// The wall clock of a simulated node: turmoil's simulated time since the epoch. Outside a host (the
/// driver reading a fence between steps) turmoil has no current host; then the time the driver
/// recorded after its last step.
pub(crate) fn sim_clock(outside: Arc<AtomicU64>) -> Clock {
    Clock::new(move || {
        turmoil::since_epoch().map(|d| d.as_millis() as u64).unwrap_or_else(|| outside.load(Ordering::SeqCst))
    })
}

pub(crate) type HostResult = turmoil::Result;

/// A host's software. Everything runs in runtime tasks (`tokio::spawn`), none on turmoil's `LocalSet`:
/// a crash drops the runtime's tasks inside the runtime's context, but the `LocalSet`'s outside of it.
pub(crate) async fn host_main(world: Arc<World>, host: Arc<HostState>) -> HostResult {
    match tokio::spawn(host_software(world, host)).await {
        Ok(result) => result.map_err(|e| e.to_string().into()),
        Err(e) => Err(format!("the host's software failed: {e}").into()),
    }
}

pub(crate) type SendResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub(crate) async fn host_software(world: Arc<World>, host: Arc<HostState>) -> SendResult {
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
    // As `coyote node` refuses to run a node that is no longer a member: the host stays down.
    let recorded = store.2.with_state(|s| s.departed.contains(&node_id));
    let departed = host.departed.lock().expect("departed lock").clone();
    if let Some(why) = departed.or(recorded.then(|| format!("node {node_id} left or was removed"))) {
        world.trace(format!("{} refuses to start node {node_id}: no longer a member ({why})", host.name));
        return std::future::pending().await;
    }
    let config =
        LogNodeConfig { node_id, cluster_id: CLUSTER_ID.into(), addr: addr.clone(), raft: raft_settings() };
    host.containers.reboot();
    let http = net::Sockets.listen(std::net::SocketAddr::from(([0, 0, 0, 0], HTTP_PORT))).await?;
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
                volumes: host.dir.path().join("volumes"),
                pull: false,
                dump_timeout: Duration::from_secs(10),
            },
            activator: ActivatorConfig { idle_stop: IDLE_STOP, ..ActivatorConfig::default() },
            forwarder: None,
            sockets: Some(Arc::new(net::Sockets)),
            backups: Some(BackupSettings {
                every: BACKUP_EVERY,
                inline: true,
                reserve_bytes: 0,
                ..BackupSettings::new(host.dir.path().join("backups"), host.dir.path().join("volumes"))
            }),
        }),
        front: Some(FrontParts { http: Some(http), https: None, settings: Default::default(), acme: None }),
        crm: Some(CrmParts { settings: Default::default(), url: None }),
    })
    .await?;
    {
        let fence = node.fence.clone();
        host.containers.set_serving(Arc::new(move |service: &str| fence.serving(service)));
    }
    if host.index == 0 && !host.initialized.load(Ordering::SeqCst) {
        node.log.initialize(material.ca().pin()).await?;
        issue_token(&world, &node.log).await;
        create_crm_admin(&world, &node.log).await;
        host.initialized.store(true, Ordering::SeqCst);
    }
    {
        let (world, host, api, crm) = (world.clone(), host.clone(), node.api.clone(), node.crm.clone());
        tokio::spawn(async move { admin(&world, &host, api, crm).await });
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
    {
        let (world, host, log) = (world.clone(), host.clone(), node.log.clone());
        tokio::spawn(async move { web_visitors(&world, &host, &log, incarnation).await });
    }
    let departed = tokio::select! {
        () = workload(&world, &host, &node.log, incarnation) => None,
        why = node.departed() => Some(why),
    };
    if let Some(why) = departed {
        // As `coyote node` does: recorded first, then every part stops and the containers go.
        *host.departed.lock().expect("departed lock") = Some(why.clone());
        world.trace(format!("{}: node {node_id} is no longer a member ({why}); it stops", host.name));
        world.running.lock().expect("running lock").remove(&host.name);
        let removed = node.retire().await;
        world.trace(format!("{}: node {node_id} stopped, containers removed: {removed}", host.name));
        world.departed.lock().expect("departed lock").insert(host.name.clone(), why);
        return std::future::pending().await;
    }
    Ok(())
}
