//! The routing table: each service's domains lead to its current master. Derived from the applied
//! state alone, so every node computes the same table from the same log.

use std::collections::HashMap;
use std::sync::Arc;

use coyote_state_machine::{NodeId, State};

/// Where requests for one name go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    /// The service's master (`None`: not placed yet).
    pub master: Option<NodeId>,
    /// The container port web traffic goes to.
    pub port: u16,
    /// TLS connections go to the container undecrypted.
    pub passthrough: bool,
    /// The node's own pages (the CRM at the cluster's admin domain): served by every node itself,
    /// never forwarded, through [`crate::Proxy::set_local`].
    pub local: bool,
}

/// Host name (lowercase, no trailing dot) → route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    routes: HashMap<String, Arc<Route>>,
}

impl Table {
    /// The table the applied state `state` implies. Services are visited by name, so a domain that
    /// two services claim (a log written before names were unique) goes to the first, everywhere.
    pub fn from_state(state: &State) -> Table {
        let mut routes = HashMap::new();
        for (name, svc) in &state.services {
            let route = Arc::new(Route {
                service: name.clone(),
                master: svc.placement.as_ref().map(|p| p.master),
                port: svc.spec.web_port(),
                passthrough: svc.spec.tls_passthrough,
                local: false,
            });
            for domain in &svc.spec.domains {
                routes.entry(normalize(domain)).or_insert_with(|| route.clone());
            }
        }
        // The CRM at the admin domain, unless a service has taken that name.
        if let Some(domain) = &state.accounts.settings.admin_domain {
            let route =
                Route { service: String::new(), master: None, port: 0, passthrough: false, local: true };
            routes.entry(normalize(domain)).or_insert_with(|| Arc::new(route));
        }
        Table { routes }
    }

    /// The route for a request's host (a `Host` header or an SNI name: any case, with or without a
    /// port or a trailing dot).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        self.routes.get(&normalize(strip_port(host)))
    }

    /// Every name routed (lowercase).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// `example.org:8443` → `example.org`; `[::1]:443` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coyote_state_machine::{ServiceSpec, State};

    fn spec(name: &str, domains: &[&str], http_port: Option<u16>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            image: "img:1".into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            ports: vec![],
            memory_bytes: None,
            on_demand: false,
            dump: None,
            http_check: None,
            zone: None,
            http_port,
            tls_passthrough: false,
            keep: None,
        }
    }

    #[test]
    fn names_lead_to_the_master_whatever_their_spelling() {
        let mut state = State::default();
        let blog = spec("blog", &["Blog.Example.org", "www.example.org"], Some(8080));
        state.services.insert(
            "blog".into(),
            coyote_state_machine::Service {
                spec: blog,
                placement: Some(coyote_state_machine::Placement {
                    master: 2,
                    failover: Some(1),
                    backups: vec![],
                }),
                created_at_ms: 0,
                serve_from_ms: 0,
            },
        );
        let table = Table::from_state(&state);
        for host in ["blog.example.org", "BLOG.example.org.", "blog.example.org:443", "www.example.org"] {
            let route = table.lookup(host).unwrap_or_else(|| panic!("{host} not routed"));
            assert_eq!((route.service.as_str(), route.master, route.port), ("blog", Some(2), 8080));
        }
        assert!(table.lookup("example.org").is_none());
        assert!(table.lookup("").is_none());
        assert!(table.lookup("[::1]:443").is_none());
    }

    #[test]
    fn ports_are_stripped_only_when_they_are_ports() {
        assert_eq!(strip_port("a.example:80"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("a.example:x"), "a.example:x");
    }
}
