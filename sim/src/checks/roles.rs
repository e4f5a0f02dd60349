//! Roles are well formed: every placement names members, none twice, and a master.

use std::collections::BTreeSet;

use super::*;

/// Roles are well formed on every node: each placement names distinct members, and a node serves a
/// service only if its own state names it master.
pub fn roles_well_formed(nodes: &[NodeSnapshot]) -> Vec<String> {
    let mut violations = Vec::new();
    for node in nodes {
        let members: BTreeSet<u64> = node.members.iter().copied().collect();
        for (service, placement) in &node.placements {
            let Some(p) = placement else { continue };
            let named: Vec<u64> = p.nodes().collect();
            let distinct: BTreeSet<u64> = named.iter().copied().collect();
            if distinct.len() != named.len() {
                violations.push(format!(
                    "roles: {} places {service} on {named:?}: a node holds two roles",
                    node.host
                ));
            }
            if let Some(n) = named.iter().find(|n| !members.contains(n)) {
                violations
                    .push(format!("roles: {} gives node {n}, not a member, a role for {service}", node.host));
            }
        }
        for service in &node.serving {
            let master = node.placements.get(service).and_then(|p| p.as_ref()).map(|p| p.master);
            if master != Some(node.node_id) {
                violations.push(format!(
                    "roles: {} serves {service}, whose master in its own state is {master:?}",
                    node.host
                ));
            }
        }
    }
    violations
}
