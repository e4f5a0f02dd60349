//! The pure plan: what this node should run ([`desired`], from the replicated state) and the steps
//! from what the runtime reports to that ([`plan`], a function of its two lists, tested table by table
//! without Docker), and what `coyote plan` shows of both ([`PlanView`]).

use std::collections::BTreeSet;

use coyote_state_machine::{ContainerGoal, NodeId, ServiceSpec, State};
use serde::{Deserialize, Serialize};

use crate::runtime::{ObservedContainer, RunState};

/// A container this node should have, with the spec it is made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Desired {
    pub service: String,
    pub spec_hash: String,
    pub goal: ContainerGoal,
    pub spec: ServiceSpec,
}

/// The containers `node` should have, from the replicated state.
pub fn desired(state: &State, node: NodeId) -> Vec<Desired> {
    state
        .desired_containers(node)
        .into_iter()
        .filter_map(|d| {
            let spec = state.services.get(&d.service)?.spec.clone();
            Some(Desired { service: d.service, spec_hash: d.spec_hash, goal: d.goal, spec })
        })
        .collect()
}

/// One step toward the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Create the service's container from its current spec, and start it if `start`.
    Create {
        service: String,
        spec_hash: String,
        start: bool,
    },
    Start {
        service: String,
        id: String,
    },
    Stop {
        service: String,
        id: String,
    },
    Remove {
        service: String,
        id: String,
    },
}

impl Action {
    pub fn service(&self) -> &str {
        match self {
            Action::Create { service, .. }
            | Action::Start { service, .. }
            | Action::Stop { service, .. }
            | Action::Remove { service, .. } => service,
        }
    }

    pub fn describe(&self) -> String {
        let short = |id: &str| id.chars().take(12).collect::<String>();
        match self {
            Action::Create { service, spec_hash, start: true } => {
                format!("create and start {service} (spec {})", short(spec_hash))
            }
            Action::Create { service, spec_hash, start: false } => {
                format!("create {service}, stopped (spec {})", short(spec_hash))
            }
            Action::Start { service, id } => format!("start {service} (container {})", short(id)),
            Action::Stop { service, id } => format!("stop {service} (container {})", short(id)),
            Action::Remove { service, id } => format!("remove {service} (container {})", short(id)),
        }
    }
}

/// What to do to go from `observed` to `desired`. Containers of services this node no longer holds go
/// first (so their host ports are free for what follows), then each desired service in order.
pub fn plan(desired: &[Desired], observed: &[ObservedContainer]) -> Vec<Action> {
    let wanted: BTreeSet<&str> = desired.iter().map(|d| d.service.as_str()).collect();
    let mut actions = Vec::new();
    let retire = |o: &ObservedContainer, actions: &mut Vec<Action>| {
        if o.state.is_running() {
            actions.push(Action::Stop { service: o.service.clone(), id: o.id.clone() });
        }
        actions.push(Action::Remove { service: o.service.clone(), id: o.id.clone() });
    };
    for o in observed.iter().filter(|o| !wanted.contains(o.service.as_str())) {
        retire(o, &mut actions);
    }
    for d in desired {
        let mine: Vec<&ObservedContainer> = observed.iter().filter(|o| o.service == d.service).collect();
        // Keep one container with the current spec (a running one if there are several); the rest go.
        let keep = mine
            .iter()
            .filter(|o| o.spec_hash == d.spec_hash)
            .max_by_key(|o| o.state.is_running())
            .map(|o| o.id.clone());
        for o in mine.iter().filter(|o| Some(&o.id) != keep.as_ref()) {
            retire(o, &mut actions);
        }
        let Some(kept) = mine.iter().find(|o| Some(&o.id) == keep.as_ref()) else {
            let start = d.goal == ContainerGoal::Running;
            actions.push(Action::Create {
                service: d.service.clone(),
                spec_hash: d.spec_hash.clone(),
                start,
            });
            continue;
        };
        match (d.goal, kept.state) {
            (ContainerGoal::Running, RunState::Created | RunState::Exited) => {
                actions.push(Action::Start { service: d.service.clone(), id: kept.id.clone() })
            }
            (ContainerGoal::Standby, RunState::Running) => {
                actions.push(Action::Stop { service: d.service.clone(), id: kept.id.clone() })
            }
            // On demand: the activator starts and stops it; the engine's transitional states: wait.
            _ => {}
        }
    }
    actions
}

/// What `coyote plan` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanView {
    pub node: NodeId,
    pub desired: Vec<DesiredView>,
    pub observed: Vec<ObservedContainer>,
    pub actions: Vec<Action>,
    /// The passes the reconciler has completed since the node started (a counter: a test waits until
    /// it has grown by 2 past a moment to know that a whole pass looked after that moment).
    pub passes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DesiredView {
    pub service: String,
    pub goal: ContainerGoal,
    pub spec_hash: String,
    pub image: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconciler::test_support::{spec, state_with_service};

    fn want(service: &str, hash: &str, goal: ContainerGoal) -> Desired {
        Desired { service: service.into(), spec_hash: hash.into(), goal, spec: spec(service) }
    }

    fn seen(id: &str, service: &str, hash: &str, state: RunState) -> ObservedContainer {
        ObservedContainer {
            id: id.into(),
            name: format!("coyote-{service}"),
            service: service.into(),
            spec_hash: hash.into(),
            image: "img:1".into(),
            state,
            status: String::new(),
        }
    }

    fn create(service: &str, hash: &str, start: bool) -> Action {
        Action::Create { service: service.into(), spec_hash: hash.into(), start }
    }
    fn start(service: &str, id: &str) -> Action {
        Action::Start { service: service.into(), id: id.into() }
    }
    fn stop(service: &str, id: &str) -> Action {
        Action::Stop { service: service.into(), id: id.into() }
    }
    fn remove(service: &str, id: &str) -> Action {
        Action::Remove { service: service.into(), id: id.into() }
    }

    use ContainerGoal::{OnDemand, Running, Standby};
    use RunState::{Created, Exited, Other, Running as Up};

    #[test]
    fn plan_table() {
        /// Name, desired, observed, expected plan.
        type Case = (&'static str, Vec<Desired>, Vec<ObservedContainer>, Vec<Action>);
        let cases: Vec<Case> = vec![
            ("nothing wanted, nothing there", vec![], vec![], vec![]),
            (
                "missing and should run: create and start",
                vec![want("a", "h1", Running)],
                vec![],
                vec![create("a", "h1", true)],
            ),
            (
                "missing standby: create, stopped",
                vec![want("a", "h1", Standby)],
                vec![],
                vec![create("a", "h1", false)],
            ),
            (
                "missing on demand: create, stopped",
                vec![want("a", "h1", OnDemand)],
                vec![],
                vec![create("a", "h1", false)],
            ),
            (
                "stopped but should run: start",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![start("a", "c1")],
            ),
            (
                "created but should run: start",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Created)],
                vec![start("a", "c1")],
            ),
            (
                "running and should run: nothing",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Up)],
                vec![],
            ),
            (
                "running but standby: stop",
                vec![want("a", "h1", Standby)],
                vec![seen("c1", "a", "h1", Up)],
                vec![stop("a", "c1")],
            ),
            (
                "standby and stopped: nothing",
                vec![want("a", "h1", Standby)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![],
            ),
            (
                "spec differs, stopped: remove and create",
                vec![want("a", "h2", Running)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![remove("a", "c1"), create("a", "h2", true)],
            ),
            (
                "spec differs, running: stop, remove and create",
                vec![want("a", "h2", Running)],
                vec![seen("c1", "a", "h1", Up)],
                vec![stop("a", "c1"), remove("a", "c1"), create("a", "h2", true)],
            ),
            (
                "spec differs, standby: replaced, stopped",
                vec![want("a", "h2", Standby)],
                vec![seen("c1", "a", "h1", Created)],
                vec![remove("a", "c1"), create("a", "h2", false)],
            ),
            (
                "service no longer held, running: stop and remove",
                vec![],
                vec![seen("c1", "gone", "h1", Up)],
                vec![stop("gone", "c1"), remove("gone", "c1")],
            ),
            (
                "service no longer held, stopped: remove",
                vec![],
                vec![seen("c1", "gone", "h1", Exited)],
                vec![remove("gone", "c1")],
            ),
            (
                "on-demand master, exists and stopped: nothing",
                vec![want("a", "h1", OnDemand)],
                vec![seen("c1", "a", "h1", Exited)],
                vec![],
            ),
            (
                "on-demand master, started by the activator: nothing",
                vec![want("a", "h1", OnDemand)],
                vec![seen("c1", "a", "h1", Up)],
                vec![],
            ),
            (
                "busy container (paused, restarting, dead): wait",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Other)],
                vec![],
            ),
            (
                "duplicates: keep the running one with the current spec",
                vec![want("a", "h1", Running)],
                vec![seen("c1", "a", "h1", Exited), seen("c2", "a", "h1", Up), seen("c3", "a", "h0", Up)],
                vec![remove("a", "c1"), stop("a", "c3"), remove("a", "c3")],
            ),
            (
                "departing services go first, then the rest in order",
                vec![want("a", "h1", Running), want("b", "h1", Standby)],
                vec![seen("c9", "z", "h1", Up), seen("c2", "b", "h1", Up)],
                vec![stop("z", "c9"), remove("z", "c9"), create("a", "h1", true), stop("b", "c2")],
            ),
        ];
        for (name, desired, observed, expected) in cases {
            assert_eq!(plan(&desired, &observed), expected, "case: {name}");
        }
    }

    #[test]
    fn a_converged_node_plans_nothing_the_second_time() {
        let desired = vec![want("a", "h1", Running), want("b", "h2", Standby), want("c", "h3", OnDemand)];
        let observed =
            vec![seen("1", "a", "h1", Up), seen("2", "b", "h2", Created), seen("3", "c", "h3", Exited)];
        assert!(plan(&desired, &observed).is_empty());
    }

    #[test]
    fn desired_carries_the_spec() {
        let state = state_with_service(1);
        let d = desired(&state, 1);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].spec, spec("a"));
        assert_eq!(d[0].spec_hash, spec("a").hash());
        assert_eq!(d[0].goal, Running);
        assert!(desired(&state, 2).is_empty());
    }
}
