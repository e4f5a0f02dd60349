//! The executor: acts on a [`ContainerRuntime`]. It runs each service's planned actions in order,
//! remembers failures between passes (the backoff of a failing service, the restarts that make a
//! crash loop) and reports what it found. It knows nothing of the log, so the simulator and the unit
//! tests here drive it with their own runtimes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use coyote_state_machine::ContainerGoal;
use tokio::time::Instant;

use super::alarms::{docker_key, PassReport, ProblemKind};
use super::plan::{plan, Action, Desired};
use super::pull::Pulls;
use super::Settings;
use crate::runtime::{
    ContainerConfig, ContainerRuntime, ObservedContainer, RunState, RuntimeError, Scope, LABEL_CLUSTER,
    LABEL_NODE, LABEL_SERVICE, LABEL_SPEC, NETWORK,
};

/// Backoff of a service whose actions failed: doubles from the minimum up to the maximum.
pub const BACKOFF_MIN: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(120);
/// More restarts than this within the window is a crash loop.
pub const CRASH_RESTARTS_MAX: usize = 3;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// Exponential backoff of one service.
#[derive(Clone, Debug)]
struct Backoff {
    failures: u32,
    retry_at: Instant,
    /// What the service should be when it failed: when that changes (its spec changed, it was
    /// removed, its goal moved) the new plan is tried at once.
    target: Target,
}

/// What a service should be: its spec and goal, or nothing (its container should go).
type Target = Option<(String, ContainerGoal)>;

fn target(want: Option<&Desired>) -> Target {
    want.map(|d| (d.spec_hash.clone(), d.goal))
}

pub(super) fn backoff_delay(failures: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    min.saturating_mul(factor).min(max)
}

/// What a pass remembers between passes (lost on restart, on purpose: a restart retries at once).
#[derive(Default)]
struct Memory {
    backoff: HashMap<String, Backoff>,
    restarts: HashMap<String, VecDeque<Instant>>,
    crash_backoff: HashMap<String, CrashBackoff>,
    network_ready: bool,
}

#[derive(Clone, Debug)]
struct CrashBackoff {
    failures: u32,
    retry_at: Instant,
}

/// Acts on a container runtime: runs each service's planned actions, remembers failures (backoff,
/// restarts, pulls) between passes, and reports what it found. It knows nothing of the log, so the
/// simulator and the unit tests drive it with their own runtimes.
pub struct Executor {
    pub(super) runtime: Arc<dyn ContainerRuntime>,
    pub(super) scope: Scope,
    pub(super) settings: Settings,
    /// Held for a whole pass, so passes never overlap.
    memory: tokio::sync::Mutex<Memory>,
    /// Missing images being pulled, or whose pull failed.
    pub(super) pulls: Pulls,
}

impl Executor {
    pub fn new(runtime: Arc<dyn ContainerRuntime>, scope: Scope, settings: Settings) -> Self {
        let pulls = Pulls::new(runtime.clone(), settings.pull);
        Executor { runtime, scope, settings, memory: Default::default(), pulls }
    }

    /// Converges the runtime toward `desired`, as far as it can now.
    pub async fn converge(&self, desired: &[Desired]) -> PassReport {
        let node = self.scope.node_id;
        let mut report = PassReport::default();
        let mut memory = self.memory.lock().await;
        let observed = match self.runtime.list().await {
            Ok(o) => o,
            Err(e) => {
                memory.network_ready = false;
                report.problem(docker_key(node), None, e.to_string());
                return report;
            }
        };
        report.heal(docker_key(node));
        report.complete = true;
        let actions = plan(desired, &observed);
        let mut services: BTreeSet<String> = desired.iter().map(|d| d.service.clone()).collect();
        services.extend(observed.iter().map(|o| o.service.clone()));
        report.seen = services.clone();
        // Forget services that are gone, so memory stays bounded by what this node holds.
        memory.backoff.retain(|s, _| services.contains(s));
        memory.restarts.retain(|s, _| services.contains(s));
        memory.crash_backoff.retain(|s, _| services.contains(s));
        let now = Instant::now();
        for service in &services {
            let group: Vec<&Action> = actions.iter().filter(|a| a.service() == service).collect();
            let want = desired.iter().find(|d| d.service == *service);
            if group.is_empty() {
                memory.backoff.remove(service);
                let restarts = memory.restarts.entry(service.clone()).or_default();
                restarts.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
                let mut kinds =
                    vec![ProblemKind::ImageMissing, ProblemKind::PortTaken, ProblemKind::Container];
                if restarts.is_empty() {
                    memory.restarts.remove(service);
                    memory.crash_backoff.remove(service);
                    kinds.push(ProblemKind::CrashLoop);
                }
                report.heal_service(node, service, &kinds);
                continue;
            }
            match self.converge_service(&mut memory, &mut report, service, want, &group, &observed, now).await
            {
                Ok(()) => {}
                Err(e) => {
                    // Docker went away in the middle of the pass: the rest can wait.
                    memory.network_ready = false;
                    report.problem(docker_key(node), None, e.to_string());
                    report.complete = false;
                    return report;
                }
            }
        }
        report
    }

    /// Runs one service's actions. An `Err` means Docker itself is unreachable.
    #[allow(clippy::too_many_arguments)]
    async fn converge_service(
        &self,
        memory: &mut Memory,
        report: &mut PassReport,
        service: &str,
        want: Option<&Desired>,
        group: &[&Action],
        observed: &[ObservedContainer],
        now: Instant,
    ) -> Result<(), RuntimeError> {
        let node = self.scope.node_id;
        let creates = group.iter().any(|a| matches!(a, Action::Create { .. }));
        if let (true, Some(want)) = (creates, want) {
            if !self.runtime.image_present(&want.spec.image).await? {
                if let Some(message) = self.pulls.image_missing(&want.spec.image, now) {
                    report.problem(ProblemKind::ImageMissing.key(node, service), Some(service), message);
                }
                return Ok(());
            }
        }
        report.heal(ProblemKind::ImageMissing.key(node, service));
        if let Some(b) = memory.backoff.get(service) {
            if now < b.retry_at && b.target == target(want) {
                return Ok(());
            }
        }
        // A start of a container that ran and stopped is a restart: count them.
        let restarting = group.iter().any(|a| match a {
            Action::Start { id, .. } => observed.iter().any(|o| o.id == *id && o.state == RunState::Exited),
            _ => false,
        });
        if restarting {
            let restarts = memory.restarts.entry(service.to_string()).or_default();
            restarts.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
            if restarts.len() >= CRASH_RESTARTS_MAX {
                let status = observed
                    .iter()
                    .find(|o| o.service == service)
                    .map(|o| o.status.clone())
                    .unwrap_or_default();
                let message = format!(
                    "{service} was restarted {} times within {} s and stopped again ({status}); retrying with backoff",
                    restarts.len(),
                    CRASH_WINDOW.as_secs()
                );
                report.problem(ProblemKind::CrashLoop.key(node, service), Some(service), message);
                // The first time: wait. Then one more start each time the (doubling) backoff runs out.
                let due = match memory.crash_backoff.get_mut(service) {
                    None => {
                        let retry_at = now + backoff_delay(1, BACKOFF_MIN, BACKOFF_MAX);
                        memory
                            .crash_backoff
                            .insert(service.to_string(), CrashBackoff { failures: 1, retry_at });
                        false
                    }
                    Some(b) if now < b.retry_at => false,
                    Some(b) => {
                        b.failures += 1;
                        b.retry_at = now + backoff_delay(b.failures, BACKOFF_MIN, BACKOFF_MAX);
                        true
                    }
                };
                if !due {
                    return Ok(());
                }
            }
            let restarts = memory.restarts.entry(service.to_string()).or_default();
            restarts.push_back(now);
        }
        for action in group {
            if let Err(e) = self.execute(memory, action, want).await {
                let kind = match e {
                    RuntimeError::Unavailable(_) => return Err(e),
                    RuntimeError::ImageMissing(_) => ProblemKind::ImageMissing,
                    RuntimeError::PortTaken(_) => ProblemKind::PortTaken,
                    // The container vanished under us: the next pass sees the new picture.
                    RuntimeError::NotFound(_) => return Ok(()),
                    RuntimeError::Failed(_) => ProblemKind::Container,
                };
                tracing::warn!(service, "{}: {e}", action.describe());
                let message = format!("{}: {e}", action.describe());
                report.problem(kind.key(node, service), Some(service), message);
                Self::fail(memory, service, want, now);
                return Ok(());
            }
            tracing::info!(service, "{}", action.describe());
        }
        memory.backoff.remove(service);
        report.heal_service(node, service, &[ProblemKind::PortTaken, ProblemKind::Container]);
        Ok(())
    }

    fn fail(memory: &mut Memory, service: &str, want: Option<&Desired>, now: Instant) {
        let target = target(want);
        let failures = match memory.backoff.get(service) {
            Some(b) if b.target == target => b.failures + 1,
            _ => 1,
        };
        let retry_at = now + backoff_delay(failures, BACKOFF_MIN, BACKOFF_MAX);
        memory.backoff.insert(service.to_string(), Backoff { failures, retry_at, target });
    }

    async fn execute(
        &self,
        memory: &mut Memory,
        action: &Action,
        want: Option<&Desired>,
    ) -> Result<(), RuntimeError> {
        match action {
            Action::Create { service, start, .. } => {
                let Some(want) = want else {
                    return Err(RuntimeError::Failed(format!("{service} is not desired here")));
                };
                if !memory.network_ready {
                    self.runtime.ensure_network(NETWORK).await?;
                    memory.network_ready = true;
                }
                let config = self.container_config(want)?;
                let id = self.runtime.create(&config).await?;
                if *start {
                    self.runtime.start(&id).await?;
                }
                Ok(())
            }
            Action::Start { id, .. } => self.runtime.start(id).await,
            Action::Stop { id, .. } => self.runtime.stop(id).await,
            Action::Remove { id, .. } => self.runtime.remove(id).await,
        }
    }

    fn container_config(&self, want: &Desired) -> Result<ContainerConfig, RuntimeError> {
        let volume = self.settings.volumes.join(&want.service);
        std::fs::create_dir_all(&volume).map_err(|e| {
            RuntimeError::Failed(format!("cannot create the volume directory {}: {e}", volume.display()))
        })?;
        let labels = BTreeMap::from([
            (LABEL_CLUSTER.to_string(), self.scope.cluster_id.clone()),
            (LABEL_NODE.to_string(), self.scope.node_id.to_string()),
            (LABEL_SERVICE.to_string(), want.service.clone()),
            (LABEL_SPEC.to_string(), want.spec_hash.clone()),
        ]);
        Ok(ContainerConfig {
            name: self.scope.container_name(&want.service),
            image: want.spec.image.clone(),
            labels,
            // An on-demand service's host ports belong to the activator, which forwards to the
            // container's address on the coyote network.
            ports: if want.spec.on_demand { Vec::new() } else { want.spec.ports.clone() },
            memory_bytes: want.spec.memory_bytes,
            volume,
            network: NETWORK.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconciler::test_support::spec;
    use coyote_state_machine::ServiceSpec;
    use std::sync::Mutex;
    use ContainerGoal::Running;
    use RunState::{Created, Running as Up};

    /// A model runtime: containers in a map; images, taken ports, crashing images and an engine that
    /// is down are switches the test flips.
    #[derive(Default)]
    struct Fake(Mutex<FakeState>);

    #[derive(Default)]
    struct FakeState {
        down: bool,
        images: BTreeSet<String>,
        taken_ports: BTreeSet<u16>,
        /// Containers of these images exit right after they start.
        crashing: BTreeSet<String>,
        containers: BTreeMap<String, (ObservedContainer, Vec<u16>)>,
        next_id: u64,
        starts: usize,
    }

    impl Fake {
        fn with(&self, f: impl FnOnce(&mut FakeState)) {
            f(&mut self.0.lock().unwrap())
        }
        fn up(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, RuntimeError> {
            let state = self.0.lock().unwrap();
            if state.down {
                return Err(RuntimeError::Unavailable("Docker is not reachable at /fake.sock".into()));
            }
            Ok(state)
        }
        fn observed(&self) -> Vec<ObservedContainer> {
            self.0.lock().unwrap().containers.values().map(|c| c.0.clone()).collect()
        }
    }

    #[async_trait::async_trait]
    impl ContainerRuntime for Fake {
        async fn list(&self) -> Result<Vec<ObservedContainer>, RuntimeError> {
            let mut state = self.up()?;
            let crashing = state.crashing.clone();
            for (c, _) in state.containers.values_mut() {
                if c.state == RunState::Running && crashing.contains(&c.image) {
                    c.state = RunState::Exited;
                    c.status = "Exited (3) 1 second ago".into();
                }
            }
            Ok(state.containers.values().map(|c| c.0.clone()).collect())
        }
        async fn address(&self, _id: &str) -> Result<Option<std::net::IpAddr>, RuntimeError> {
            Ok(Some(std::net::IpAddr::from([127, 0, 0, 1])))
        }
        async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
            Ok(self.up()?.images.contains(image))
        }
        async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
            Err(RuntimeError::Failed(format!("no registry for {image}")))
        }
        async fn ensure_network(&self, _name: &str) -> Result<(), RuntimeError> {
            self.up().map(|_| ())
        }
        async fn create(&self, config: &ContainerConfig) -> Result<String, RuntimeError> {
            let mut state = self.up()?;
            if !state.images.contains(&config.image) {
                return Err(RuntimeError::ImageMissing(config.image.clone()));
            }
            if state.containers.values().any(|c| c.0.name == config.name) {
                return Err(RuntimeError::Failed(format!("name {} in use", config.name)));
            }
            state.next_id += 1;
            let id = format!("c{}", state.next_id);
            let observed = ObservedContainer {
                id: id.clone(),
                name: config.name.clone(),
                service: config.labels[LABEL_SERVICE].clone(),
                spec_hash: config.labels[LABEL_SPEC].clone(),
                image: config.image.clone(),
                state: RunState::Created,
                status: "Created".into(),
            };
            let ports = config.ports.iter().map(|p| p.host).collect();
            state.containers.insert(id.clone(), (observed, ports));
            Ok(id)
        }
        async fn start(&self, id: &str) -> Result<(), RuntimeError> {
            let mut state = self.up()?;
            let taken = state.taken_ports.clone();
            let Some((c, ports)) = state.containers.get_mut(id) else {
                return Err(RuntimeError::NotFound(format!("no container {id}")));
            };
            if let Some(p) = ports.iter().find(|p| taken.contains(p)) {
                return Err(RuntimeError::PortTaken(format!("0.0.0.0:{p}: address already in use")));
            }
            c.state = RunState::Running;
            state.starts += 1;
            Ok(())
        }
        async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
            let mut state = self.up()?;
            if let Some((c, _)) = state.containers.get_mut(id) {
                c.state = RunState::Exited;
            }
            Ok(())
        }
        async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.up()?.containers.remove(id);
            Ok(())
        }
    }

    struct Rig {
        fake: Arc<Fake>,
        executor: Executor,
        _volumes: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let volumes = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        fake.with(|s| {
            s.images.insert("img:1".into());
        });
        let scope = Scope { cluster_id: "c0".into(), node_id: 1 };
        let settings = Settings {
            volumes: volumes.path().to_path_buf(),
            pull: false,
            dump_timeout: Duration::from_secs(10),
        };
        let executor = Executor::new(fake.clone(), scope, settings);
        Rig { fake, executor, _volumes: volumes }
    }

    fn running(services: &[(&str, &str)]) -> Vec<Desired> {
        services
            .iter()
            .map(|(name, image)| {
                let spec = ServiceSpec { image: image.to_string(), ..spec(name) };
                Desired { service: name.to_string(), spec_hash: spec.hash(), goal: Running, spec }
            })
            .collect()
    }

    #[tokio::test]
    async fn the_executor_converges_and_repairs_drift() {
        let rig = rig();
        let desired = running(&[("a", "img:1")]);
        let report = rig.executor.converge(&desired).await;
        assert!(report.problems.is_empty(), "{report:?}");
        assert!(report.healed.contains(&docker_key(1)));
        let seen = rig.fake.observed();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].state, seen[0].spec_hash.as_str()), (Up, desired[0].spec_hash.as_str()));
        assert!(rig._volumes.path().join("a").is_dir(), "the volume directory is created");

        // Converged: a second pass does nothing.
        rig.executor.converge(&desired).await;
        assert_eq!(rig.fake.0.lock().unwrap().starts, 1);

        // Removed by hand: it comes back.
        rig.fake.with(|s| s.containers.clear());
        rig.executor.converge(&desired).await;
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Up));

        // No longer desired: removed.
        let report = rig.executor.converge(&[]).await;
        assert!(rig.fake.observed().is_empty());
        assert!(report.healed.contains(&ProblemKind::Container.key(1, "a")));
    }

    #[tokio::test]
    async fn a_missing_image_is_reported_until_it_appears_and_keeps_the_old_container() {
        let rig = rig();
        let old = running(&[("a", "img:1")]);
        rig.executor.converge(&old).await;
        let new = running(&[("a", "img:2")]);
        let key = ProblemKind::ImageMissing.key(1, "a");
        let report = rig.executor.converge(&new).await;
        assert!(report.problems[&key].message.contains("img:2"), "{report:?}");
        // The old container still serves.
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Up && c.image == "img:1"));

        rig.fake.with(|s| {
            s.images.insert("img:2".into());
        });
        let report = rig.executor.converge(&new).await;
        assert!(report.healed.contains(&key) && report.problems.is_empty(), "{report:?}");
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Up && c.image == "img:2"));
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_then_backed_off() {
        let rig = rig();
        let mut desired = running(&[("a", "img:1")]);
        desired[0].spec.ports = vec![coyote_state_machine::PortMap { host: 8080, container: 80 }];
        desired[0].spec_hash = desired[0].spec.hash();
        rig.fake.with(|s| {
            s.taken_ports.insert(8080);
        });
        let key = ProblemKind::PortTaken.key(1, "a");
        let report = rig.executor.converge(&desired).await;
        assert!(report.problems[&key].message.contains("8080"), "{report:?}");
        // Within the backoff the same start is not tried again; the alarm is neither raised nor cleared.
        let report = rig.executor.converge(&desired).await;
        assert!(!report.problems.contains_key(&key) && !report.healed.contains(&key), "{report:?}");
        assert!(matches!(&rig.fake.observed()[..], [c] if c.state == Created));
    }

    #[tokio::test]
    async fn a_crash_loop_is_reported_after_repeated_restarts() {
        let rig = rig();
        rig.fake.with(|s| {
            s.images.insert("crash:1".into());
            s.crashing.insert("crash:1".into());
        });
        let desired = running(&[("a", "crash:1")]);
        let key = ProblemKind::CrashLoop.key(1, "a");
        // Created and started, then restarted CRASH_RESTARTS_MAX times: no alarm yet.
        for _ in 0..=CRASH_RESTARTS_MAX {
            let report = rig.executor.converge(&desired).await;
            assert!(report.problems.is_empty(), "{report:?}");
        }
        assert_eq!(rig.fake.0.lock().unwrap().starts, CRASH_RESTARTS_MAX + 1);
        // It stops once more: a crash loop, and no start until the backoff runs out.
        let report = rig.executor.converge(&desired).await;
        assert!(report.problems[&key].message.contains("Exited (3)"), "{report:?}");
        rig.executor.converge(&desired).await;
        assert_eq!(rig.fake.0.lock().unwrap().starts, CRASH_RESTARTS_MAX + 1);
    }

    #[tokio::test]
    async fn an_engine_that_is_down_is_one_problem_and_touches_nothing() {
        let rig = rig();
        rig.fake.with(|s| s.down = true);
        let report = rig.executor.converge(&running(&[("a", "img:1")])).await;
        assert_eq!(report.problems.keys().collect::<Vec<_>>(), vec!["docker/1"]);
        assert!(!report.complete);
        rig.fake.with(|s| s.down = false);
        let report = rig.executor.converge(&running(&[("a", "img:1")])).await;
        assert!(report.healed.contains("docker/1") && report.complete);
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        assert_eq!(backoff_delay(1, BACKOFF_MIN, BACKOFF_MAX), BACKOFF_MIN);
        assert_eq!(backoff_delay(2, BACKOFF_MIN, BACKOFF_MAX), BACKOFF_MIN * 2);
        assert_eq!(backoff_delay(40, BACKOFF_MIN, BACKOFF_MAX), BACKOFF_MAX);
    }
}
