//! What the hosts, the driver and the scenarios share: the [`World`] (traces, the oracle's
//! acknowledgements, the running nodes), what survives a host's crash ([`HostState`]), and the
//! simulated admin's commands ([`Admin`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coyote_log::store::MemoryDisk;
use coyote_log::{JoinToken, LogNode};
use coyote_nodes::fence::Fence;
use coyote_state_machine::{Outcome, ServiceSpec};

use crate::checks::Ack;
use crate::model::Containers;

/// What the hosts and the driver share. Everything runs on one thread; the locks are only there
/// because the log's types need `Send`.
pub(crate) struct World {
    pub(crate) seed: u64,
    pub(crate) nodes_expected: usize,
    pub(crate) trace: Mutex<Vec<String>>,
    pub(crate) acks: Mutex<Vec<Ack>>,
    /// The running nodes, by host name.
    pub(crate) running: Mutex<BTreeMap<String, SimNode>>,
    pub(crate) workload: AtomicBool,
    pub(crate) token: JoinToken,
    /// Commands for the simulated admin, by the host whose node proposes them.
    pub(crate) admin: Mutex<BTreeMap<String, VecDeque<Admin>>>,
    /// Extra delay of container starts while a slow-start fault is in force, in ms.
    pub(crate) slow_start_ms: Arc<AtomicU64>,
    /// Simulated time since the epoch after the last step, in ms (the clock outside hosts).
    pub(crate) clock_ms: Arc<AtomicU64>,
    /// The last answer each on-demand service gave a visitor, in simulated time since the start.
    pub(crate) visits: Mutex<BTreeMap<String, Duration>>,
    /// Requests sent to the nodes' proxies by web visitors: answered 200, answered otherwise or not.
    pub(crate) web: Mutex<(usize, usize)>,
    /// What model containers did to their data.
    pub(crate) data: crate::model::DataLog,
    /// Hosts whose node is no longer a member, with why, once each stopped.
    pub(crate) departed: Mutex<BTreeMap<String, String>>,
}

/// One running node: its log, its fence, its runtime (to read the fence's clock from outside) and
/// its host's containers.
#[derive(Clone)]
pub(crate) struct SimNode {
    pub(crate) node: LogNode,
    pub(crate) fence: Fence,
    pub(crate) rt: tokio::runtime::Handle,
    pub(crate) containers: Arc<Containers>,
}

impl SimNode {
    /// The services this node's fence lets it serve now, read on its own runtime's clock.
    pub(crate) fn serving(&self) -> Vec<String> {
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
    /// The same, through the CRM's API door with the admin's key.
    CreateServiceInCrm(ServiceSpec),
    Switch {
        service: String,
        to: u64,
    },
    /// `coyote node leave` on the host the command is queued for.
    Leave,
    /// `coyote node remove NODE [--force]`.
    Remove {
        node: u64,
        force: bool,
    },
}

impl World {
    pub(crate) fn trace(&self, line: String) {
        let ms = turmoil::sim_elapsed().map(|d| d.as_millis()).unwrap_or(0);
        self.trace.lock().expect("trace lock").push(format!("{ms:>7} {line}"));
    }
}

/// What survives a crash of one host: its disk, its identity, and whether it created the cluster.
pub(crate) struct HostState {
    pub(crate) name: String,
    pub(crate) index: usize,
    pub(crate) disk: MemoryDisk,
    /// `(node id, certificate, key)` once admitted.
    pub(crate) identity: Mutex<Option<(u64, String, String)>>,
    pub(crate) initialized: AtomicBool,
    pub(crate) starts: AtomicU64,
    pub(crate) containers: Arc<Containers>,
    /// The host's real directory for what the node keeps in files: services' volumes and the
    /// backup store (removed at the end of the run).
    pub(crate) dir: tempfile::TempDir,
    /// Why its node is no longer a member, once it was told (the data directory's `departed` file).
    pub(crate) departed: Mutex<Option<String>>,
}
