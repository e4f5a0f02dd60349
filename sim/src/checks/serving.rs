//! At most one node serves a service at any instant, and an activator splices connections only where
//! its node serves.

use std::collections::BTreeMap;

/// At most one node serves a service at any instant: `serving` maps each host to the services its
/// fence lets it serve at this instant.
pub fn at_most_one_serving(serving: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut by_service: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (host, services) in serving {
        for s in services {
            by_service.entry(s).or_default().push(host);
        }
    }
    by_service
        .into_iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|(s, hosts)| format!("serving: {} all serve {s} at once", hosts.join(", ")))
        .collect()
}

/// The activator's checker (`Driver::check_splices` finds the case): a connection handed to an
/// on-demand container on a node that was not serving the service.
pub fn spliced_while_not_serving(host: &str, service: &str, at: std::time::Duration) -> String {
    format!(
        "activator or proxy: {host} handed a connection of {service} to its container at {} ms while not serving it",
        at.as_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_serving_one_service_is_a_violation() {
        let mut serving = BTreeMap::new();
        serving.insert("n1".to_string(), vec!["a".to_string()]);
        serving.insert("n2".to_string(), vec!["b".to_string()]);
        assert!(at_most_one_serving(&serving).is_empty());
        serving.insert("n3".to_string(), vec!["a".to_string()]);
        assert_eq!(at_most_one_serving(&serving).len(), 1);
    }
}
