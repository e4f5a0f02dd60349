//! The library half of the `coyote` binary: the parts other crates (the simulator, the tests) reuse.
//!
//! - [`runtime`]: the [`runtime::ContainerRuntime`] trait and its Docker implementation.
//! - [`reconciler`]: brings this server's containers to what the log asks, or raises alarms.
//! - [`activator`]: starts on-demand containers when a connection arrives, stops them when idle.
//! - [`forward`]: kernel forwarding (nftables DNAT) of warm connections to on-demand containers.
//! - [`monitor`]: probes peers and services, reports transitions, fails over; the fence (leases).
//! - [`probe`]: the service checks the monitor runs (TCP, HTTP, DNS SOA).

pub mod activator;
pub mod forward;
pub mod monitor;
pub mod probe;
pub mod reconciler;
pub mod runtime;
