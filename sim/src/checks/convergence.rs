//! Liveness: after the faults heal, the cluster and its services converge.

use super::*;

/// Liveness, after healing: all `expected` nodes are up, exactly one of them leads, all agree on who,
/// all know the same voters, and all applied the same index.
pub fn converged(nodes: &[NodeSnapshot], expected: usize) -> Result<(), String> {
    if nodes.len() != expected {
        return Err(format!("{} of {expected} nodes are running", nodes.len()));
    }
    let leaders: Vec<&NodeSnapshot> = nodes.iter().filter(|n| n.is_leader).collect();
    let [leader] = leaders.as_slice() else {
        return Err(format!("{} nodes consider themselves leader", leaders.len()));
    };
    if let Some(n) = nodes.iter().find(|n| n.leader != Some(leader.node_id)) {
        return Err(format!("{} follows {:?}, not {}", n.host, n.leader, leader.host));
    }
    if let Some(n) = nodes.iter().find(|n| n.voters != leader.voters) {
        return Err(format!("{} knows voters {:?}, the leader {:?}", n.host, n.voters, leader.voters));
    }
    if leader.voters.len() != expected {
        return Err(format!("the membership has {} voters, not {expected}", leader.voters.len()));
    }
    if let Some(n) = nodes.iter().find(|n| n.log_applied != leader.log_applied || n.applied != leader.applied)
    {
        return Err(format!(
            "{} applied log entry {} (event {}), the leader {} (event {})",
            n.host, n.log_applied, n.applied, leader.log_applied, leader.applied
        ));
    }
    Ok(())
}

/// Liveness of the services: every service is placed, its master (by the leader's state) serves it
/// and runs its container, and no other node serves it or runs its container.
pub fn services_converged(nodes: &[NodeSnapshot], services: usize) -> Result<(), String> {
    let leader = nodes.iter().find(|n| n.is_leader).ok_or("no leader")?;
    if leader.placements.len() != services {
        return Err(format!("the leader knows {} services, not {services}", leader.placements.len()));
    }
    for (service, placement) in &leader.placements {
        let Some(p) = placement else { return Err(format!("{service} is not placed")) };
        for n in nodes {
            let master = n.node_id == p.master;
            let serves = n.serving.contains(service);
            let runs = n.containers.contains(service);
            if master && !serves {
                return Err(format!("{service}: its master {} does not serve it", n.host));
            }
            if master && !runs {
                return Err(format!("{service}: its master {} does not run its container", n.host));
            }
            if !master && (serves || runs) {
                return Err(format!("{service}: {} serves it or runs its container, not its master", n.host));
            }
        }
        if !nodes.iter().any(|n| n.node_id == p.master) {
            return Err(format!("{service}: its master node {} is not running", p.master));
        }
    }
    Ok(())
}
