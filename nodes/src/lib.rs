//! The library half of the `coyote` binary: the parts other crates (the simulator, the tests) reuse.
//!
//! - [`runtime`]: the [`runtime::ContainerRuntime`] trait and its Docker implementation.
//! - [`reconciler`]: brings this server's containers to what the log asks, or raises alarms.
//! - [`activator`]: starts on-demand containers when a connection arrives, stops them when idle.
//! - [`forward`]: kernel forwarding (nftables DNAT) of warm connections to on-demand containers.
//! - [`front`]: the node's proxy (`coyote-proxy`): HTTP and HTTPS by name, routed to each
//!   service's master.
//! - [`monitor`]: probes peers and services, reports transitions, fails over.
//! - [`fence`]: this server's lease: what it may serve, and the argument that at most one server
//!   serves a service at any instant.
//! - [`probe`]: the service checks the monitor runs (TCP, HTTP, DNS SOA).
//! - [`node`]: the one assembly of a node from the parts its caller gives (`coyote node` and the
//!   simulator both call it).
//! - [`api`]: the node's local API (the router the CLI, and later the proxy and the CRM, talk to).
//! - [`wire`]: the requests and answers of the API, shared by the API and its clients.
//! - [`sockets`]: the listening sockets and connections the activator opens (a trait, so the
//!   simulator hands in its own).

pub mod acme;
pub mod activator;
pub mod api;
pub mod backups;
pub mod fence;
pub mod forward;
pub mod front;
pub mod monitor;
pub mod node;
pub mod probe;
pub mod reconciler;
pub mod runtime;
pub mod sockets;
pub mod wire;
