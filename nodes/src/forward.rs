//! Kernel forwarding for warm on-demand services: nftables DNAT from a service's published host
//! ports to its running container, so that warm connections never pass through the activator.
//!
//! # Why
//! The activator owns an on-demand service's host ports: it holds the first connection while the
//! container starts. Splicing every later connection through userspace as well costs a hop per
//! connection (two more sockets, a task, copies). Once the container runs and its port accepts, the
//! activator hands the port to the kernel instead: new connections are rewritten (DNAT) to the
//! container's address and never reach the activator's listener. Before the container is stopped
//! (idle, memory pressure, fencing, service removed, node shutdown) the rule is removed first, so new
//! connections fall back to the listener again, which holds them and starts the container as before.
//!
//! # The table
//! Each node process has a table of its own, `table ip coyote_PID` (several nodes may run on one
//! host, e.g. in tests), and never changes Docker's `ip nat`/`ip filter` tables, except for one
//! documented rule in `DOCKER-USER` (below). Everything is applied atomically with `nft -f -`.
//!
//! ```text
//! table ip coyote_PID {
//!   map ports    { type inet_service : verdict }   # host port -> jump svc_P
//!   map counting { type mark : verdict }           # ct mark   -> jump cnt_P
//!   counter conns_P, in_P, out_P                   # per service (P: its first host port)
//!   chain svc_P { tcp dport HOST counter name conns_P ct mark set MARK dnat to IP:PORT }   # only while it runs
//!   chain cnt_P { ct direction original counter name in_P; ct direction reply counter name out_P }
//!   chain output      { type nat hook output priority -110;       fib daddr type local tcp dport vmap @ports }
//!   chain prerouting  { type nat hook prerouting priority dstnat - 10; fib daddr type local tcp dport vmap @ports }
//!   chain postrouting { type nat hook postrouting priority srcnat - 10; ip saddr 127.0.0.0/8 ct mark and 0xffff0000 == 0xc0e70000 masquerade }
//!   chain count_post  { type filter hook postrouting priority 100; ct mark vmap @counting }
//!   chain count_in    { type filter hook input priority 100;       ct mark vmap @counting }
//! }
//! ```
//!
//! A service's chain `svc_P` exists from the moment the activator listens for it, empty while the
//! container is stopped (the jump returns, the packet goes on to the activator's listener); installing
//! and removing the forward is one flush-and-fill of that chain. Each forwarded connection gets the
//! conntrack mark `0xc0e70000 | P` (P is the service's first host port: unique on the host while the
//! activator listens on it), which the counting chains, the masquerade and the forward accept match.
//!
//! # Local and remote clients
//! - **Local clients** (connecting to 127.0.0.1 or one of the host's own addresses) are seen by the
//!   `output` hook. A DNAT of 127.0.0.1 to a bridge address needs `route_localnet=1` on the coyote
//!   bridge: without it the kernel refuses to route a packet with a loopback source out of a
//!   non-loopback interface, and drops the container's answers to it as martians. The activator sets
//!   it on the bridge that holds the container's address (found in `/proc/net/route`), never on
//!   `all`. A connection from a loopback address is then masqueraded on the way out (the container
//!   could not answer 127.0.0.1), so the container sees the bridge's address, as it does with the
//!   userspace splice. A local client that connects to one of the host's other addresses keeps that
//!   address as its source: the container's answer is routed back to the host as it is.
//! - **Remote clients** are seen by `prerouting`. Their connections are forwarded, and Docker's
//!   `FORWARD` chain drops (policy drop) new connections to a container port Docker did not publish
//!   itself; an accept in a table of our own cannot override a drop in Docker's table. So coyote
//!   inserts one rule into `DOCKER-USER`, the chain Docker keeps for its users: accept connections
//!   whose conntrack mark is in coyote's range (`iptables -I DOCKER-USER -m connmark --mark
//!   0xc0e70000/0xffff0000 -j ACCEPT`). It matches nothing else. If that rule cannot be added (no
//!   iptables, no DOCKER-USER chain), the `prerouting` hook is left out and remote clients keep going
//!   through the activator's listener (the log says so). Remote connections are not masqueraded:
//!   the container sees each client's own address (the userspace splice, on a cold start, shows it
//!   the bridge's). Masquerading them would merge every client into one source address, and then
//!   a new connection that reuses a port still in `TIME_WAIT` in the container is refused whenever
//!   its TCP timestamp comes from another client's clock (RFC 7323's PAWS check on a reused
//!   tuple): the container answers the SYN with an ACK of the old connection, and the client waits
//!   a second to send it again.
//! - IPv6 clients are not forwarded (the table is `ip`): they go through the listener.
//!
//! # Counting and activity
//! Nothing of a forwarded connection reaches the activator, so the kernel is asked:
//! - **connections**: the counter on the DNAT rule. NAT chains see only the first packet of a
//!   connection, so it counts connections;
//! - **bytes in** (client to container) and **bytes out**: the counting chains match the mark per
//!   direction (`original` at `postrouting`; `reply` at `postrouting` for remote clients and at `input`
//!   for local ones). These are IP bytes, headers included, while the userspace splice counts payload;
//! - **open connections**: conntrack entries with the service's mark (`/proc/net/nf_conntrack`) in
//!   any TCP state but `TIME_WAIT` and `CLOSE`.
//!
//! A service counts as active whenever its counters moved since the last look (every check interval
//! of the activator; one `nft -j list counters`), so a stream of short connections that are all over
//! between two looks keeps it running, and while it has an open connection, even a silent one.
//! `/proc/net/nf_conntrack` lists every connection of the host (TIME_WAIT included: after a burst of
//! short connections, over a hundred thousand lines), so it is read only when it matters: for a
//! service whose counters did not move and that could be stopped now (quiet for the idle time,
//! memory short, or a stop about to happen). Under steady traffic it is never read. Counters stay in
//! place while the activator listens for the service, also across stops, so the totals never go back.
//!
//! # Start-up, shutdown, crashes
//! At start-up a node deletes every `coyote_PID` table whose process is gone (not running, or not a
//! `coyote` process), then creates its own afresh; at shutdown it deletes its own, and the
//! `DOCKER-USER` rule when no other coyote table is left. A node killed with -9 leaves its table
//! behind until a node starts on the host again: its rules may point at a container that is stopped
//! meanwhile (connections to that port then fail) until then.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use coyote_state_machine::PortMap;
use tokio::io::AsyncWriteExt;

/// The conntrack marks coyote gives to forwarded connections: `MARK_BASE | port`.
pub const MARK_BASE: u32 = 0xc0e7_0000;
pub const MARK_MASK: u32 = 0xffff_0000;
/// The prefix of every coyote table's name (`coyote_PID`).
pub const TABLE_PREFIX: &str = "coyote_";
const DOCKER_USER_COMMENT: &str = "coyote: kernel forwarding to on-demand containers";

/// How warm connections of on-demand services reach their containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// nftables DNAT from the host port to the container, installed while the container runs.
    Kernel,
    /// Every connection spliced through the activator.
    Userspace,
}

impl std::str::FromStr for ForwardMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "kernel" => Ok(ForwardMode::Kernel),
            "userspace" => Ok(ForwardMode::Userspace),
            other => Err(format!("{other:?}: the forwarding mode is `kernel` or `userspace`")),
        }
    }
}

/// The kernel's counts of one service's forwarded traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The conntrack mark of a service whose first host port is `port`.
pub fn mark_of(port: u16) -> u32 {
    MARK_BASE | u32::from(port)
}

/// This node's nftables table, and how to change it.
pub struct Forwarder {
    nft: PathBuf,
    table: String,
    /// Whether remote clients are forwarded too (the `DOCKER-USER` accept is in place).
    remote: bool,
}

impl Forwarder {
    /// Checks that kernel forwarding can work here (root, `nft`, an IPv4 bind address), removes the
    /// tables of coyote processes that are gone, and creates this process's table afresh. The error
    /// says why not.
    pub async fn setup(bind_ip: IpAddr) -> Result<Forwarder> {
        let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).context("reading /proc/self")?;
        if euid != 0 {
            bail!("nftables needs root, and this process runs as uid {euid}");
        }
        let bind = match bind_ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => {
                bail!("the ports are bound on the IPv6 address {v6}; kernel forwarding is IPv4 only")
            }
        };
        let nft =
            find_nft().ok_or_else(|| anyhow!("the `nft` program is not installed (Debian: nftables)"))?;
        let mut me = Forwarder { nft, table: format!("{TABLE_PREFIX}{}", std::process::id()), remote: false };
        me.remove_stale().await?;
        me.remote = match ensure_docker_user_accept().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "remote clients of on-demand services keep going through the activator (only local ones are forwarded by the kernel): {e:#}"
                );
                false
            }
        };
        me.apply(&me.base_script(bind)).await.context("creating coyote's nftables table")?;
        tracing::info!(table = me.table, remote = me.remote, "kernel forwarding for warm on-demand services");
        Ok(me)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Whether remote clients are forwarded by the kernel too.
    pub fn remote(&self) -> bool {
        self.remote
    }

    fn base_script(&self, bind: Ipv4Addr) -> String {
        let t = &self.table;
        let dest = if bind.is_unspecified() {
            "fib daddr type local".to_string()
        } else {
            format!("ip daddr {bind}")
        };
        let prerouting = if self.remote { format!("{dest} tcp dport vmap @ports;") } else { String::new() };
        format!(
            "add table ip {t}\n\
             delete table ip {t}\n\
             table ip {t} {{\n\
               map ports {{ type inet_service : verdict; }}\n\
               map counting {{ type mark : verdict; }}\n\
               chain output {{ type nat hook output priority -110; policy accept; {dest} tcp dport vmap @ports; }}\n\
               chain prerouting {{ type nat hook prerouting priority dstnat - 10; policy accept; {prerouting} }}\n\
               chain postrouting {{ type nat hook postrouting priority srcnat - 10; policy accept; ip saddr 127.0.0.0/8 ct mark and {MARK_MASK:#x} == {MARK_BASE:#x} masquerade; }}\n\
               chain count_post {{ type filter hook postrouting priority 100; policy accept; ct mark vmap @counting; }}\n\
               chain count_in {{ type filter hook input priority 100; policy accept; ct mark vmap @counting; }}\n\
             }}\n"
        )
    }

    /// Prepares a service whose ports the activator now listens on: its counters, its counting
    /// chain, and its (empty) forwarding chain, jumped to from its host ports.
    pub async fn open(&self, ports: &[PortMap]) -> Result<()> {
        let Some(key) = ports.first().map(|p| p.host) else { return Ok(()) };
        let (t, mark) = (&self.table, mark_of(key));
        let mut s = String::new();
        for c in ["conns", "in", "out"] {
            s.push_str(&format!("add counter ip {t} {c}_{key}\n"));
        }
        s.push_str(&format!(
            "add chain ip {t} svc_{key}\nflush chain ip {t} svc_{key}\n\
             add chain ip {t} cnt_{key}\nflush chain ip {t} cnt_{key}\n\
             add rule ip {t} cnt_{key} ct direction original counter name in_{key}\n\
             add rule ip {t} cnt_{key} ct direction reply counter name out_{key}\n\
             add element ip {t} counting {{ {mark:#x} : jump cnt_{key} }}\n"
        ));
        for p in ports {
            s.push_str(&format!("add element ip {t} ports {{ {} : jump svc_{key} }}\n", p.host));
        }
        self.apply(&s).await.with_context(|| format!("preparing the forwarding of port {key}"))
    }

    /// Forwards new connections on the service's host ports to the container at `ip`.
    pub async fn install(&self, ports: &[PortMap], ip: IpAddr) -> Result<()> {
        let Some(key) = ports.first().map(|p| p.host) else { return Ok(()) };
        let IpAddr::V4(ip) = ip else { bail!("the container's address {ip} is not IPv4") };
        if let Some(bridge) = interface_for(ip)? {
            let knob = Path::new("/proc/sys/net/ipv4/conf").join(&bridge).join("route_localnet");
            if std::fs::read_to_string(&knob).map(|v| v.trim() != "1").unwrap_or(true) {
                std::fs::write(&knob, "1").with_context(|| format!("setting {}", knob.display()))?;
                tracing::info!(bridge, "route_localnet set on the bridge, for local clients");
            }
        }
        let (t, mark) = (&self.table, mark_of(key));
        let mut s = format!("flush chain ip {t} svc_{key}\n");
        for p in ports {
            s.push_str(&format!(
                "add rule ip {t} svc_{key} tcp dport {} counter name conns_{key} ct mark set {mark:#x} dnat to {ip}:{}\n",
                p.host, p.container
            ));
        }
        self.apply(&s).await.with_context(|| format!("forwarding port {key} to {ip}"))
    }

    /// Stops forwarding new connections (open ones go on: their NAT is in conntrack); they reach the
    /// activator's listener again.
    pub async fn remove(&self, ports: &[PortMap]) -> Result<()> {
        let Some(key) = ports.first().map(|p| p.host) else { return Ok(()) };
        self.apply(&format!("flush chain ip {} svc_{key}\n", self.table))
            .await
            .with_context(|| format!("removing the forwarding of port {key}"))
    }

    /// Removes everything of a service the activator no longer listens for.
    pub async fn close(&self, ports: &[PortMap]) -> Result<()> {
        let Some(key) = ports.first().map(|p| p.host) else { return Ok(()) };
        let (t, mark) = (&self.table, mark_of(key));
        let mut s = String::new();
        for p in ports {
            s.push_str(&format!("delete element ip {t} ports {{ {} }}\n", p.host));
        }
        s.push_str(&format!(
            "delete element ip {t} counting {{ {mark:#x} }}\n\
             flush chain ip {t} svc_{key}\ndelete chain ip {t} svc_{key}\n\
             flush chain ip {t} cnt_{key}\ndelete chain ip {t} cnt_{key}\n\
             delete counter ip {t} conns_{key}\ndelete counter ip {t} in_{key}\ndelete counter ip {t} out_{key}\n"
        ));
        self.apply(&s).await.with_context(|| format!("removing the forwarding objects of port {key}"))
    }

    /// Every service's counters, by mark.
    pub async fn counters(&self) -> Result<BTreeMap<u32, KernelCounters>> {
        let out = self.run(&["-j", "list", "counters", "table", "ip", &self.table], None).await?;
        parse_counters(&out)
    }

    /// Deletes this process's table (and the `DOCKER-USER` rule when no other coyote table is left).
    pub async fn shutdown(&self) {
        if let Err(e) = self.apply(&format!("delete table ip {}\n", self.table)).await {
            tracing::warn!("could not delete the nftables table {}: {e:#}", self.table);
        }
        match self.coyote_tables().await {
            Ok(left) if left.is_empty() => {
                // Two nodes starting at once may both have added it.
                for _ in 0..4 {
                    if docker_user(&["-D"]).await.is_err() {
                        break;
                    }
                }
            }
            _ => {}
        }
    }

    async fn coyote_tables(&self) -> Result<Vec<String>> {
        let out = self.run(&["-j", "list", "tables", "ip"], None).await?;
        let v: serde_json::Value = serde_json::from_str(&out).context("nft's JSON")?;
        Ok(v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["table"]["name"].as_str())
            .filter(|n| n.starts_with(TABLE_PREFIX))
            .map(String::from)
            .collect())
    }

    /// Deletes the tables of coyote processes that are gone (and this process's, if any).
    async fn remove_stale(&self) -> Result<()> {
        for table in self.coyote_tables().await? {
            let pid: Option<u32> = table[TABLE_PREFIX.len()..].parse().ok();
            let alive = pid.is_some_and(|p| p != std::process::id() && is_coyote_process(p));
            if !alive {
                tracing::info!(table, "removing the nftables table of a coyote process that is gone");
                // Another node starting at the same moment may have removed it already.
                if let Err(e) = self.apply(&format!("delete table ip {table}\n")).await {
                    tracing::debug!(table, "not removed: {e:#}");
                }
            }
        }
        Ok(())
    }

    async fn apply(&self, script: &str) -> Result<()> {
        self.run(&["-f", "-"], Some(script)).await.map(drop)
    }

    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut child = tokio::process::Command::new(&self.nft)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.nft.display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn find_nft() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
}

fn is_coyote_process(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "coyote")
}

/// `iptables ACTION DOCKER-USER` with coyote's accept rule.
async fn docker_user(action: &[&str]) -> Result<()> {
    let mark = format!("{MARK_BASE:#x}/{MARK_MASK:#x}");
    let out = tokio::process::Command::new("iptables")
        .args(["-w", "5"])
        .args(action)
        .args(["DOCKER-USER", "-m", "connmark", "--mark", &mark, "-m", "comment", "--comment"])
        .args([DOCKER_USER_COMMENT, "-j", "ACCEPT"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running iptables")?;
    if !out.status.success() {
        bail!("iptables {}: {}", action.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

async fn ensure_docker_user_accept() -> Result<()> {
    if docker_user(&["-C"]).await.is_ok() {
        return Ok(());
    }
    docker_user(&["-I"]).await.context("adding the accept rule for forwarded connections to DOCKER-USER")
}

/// The interface whose IPv4 route holds `ip` (`/proc/net/route`), most specific first.
fn interface_for(ip: Ipv4Addr) -> Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    Ok(route_interface(&text, ip))
}

/// The interface of the most specific non-default route of `/proc/net/route` text that holds `ip`.
pub fn route_interface(text: &str, ip: Ipv4Addr) -> Option<String> {
    let addr = u32::from_ne_bytes(ip.octets());
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            (mask != 0 && addr & mask == dest).then(|| (u32::from_be(mask).count_ones(), f[0].to_string()))
        })
        .max()
        .map(|(_, iface)| iface)
}

/// `nft -j list counters` output, by mark (`conns_P`, `in_P`, `out_P` → `MARK_BASE | P`).
pub fn parse_counters(json: &str) -> Result<BTreeMap<u32, KernelCounters>> {
    let v: serde_json::Value = serde_json::from_str(json).context("nft's JSON")?;
    let mut out: BTreeMap<u32, KernelCounters> = BTreeMap::new();
    for c in v["nftables"].as_array().into_iter().flatten().filter_map(|o| o.get("counter")) {
        let Some((kind, port)) = c["name"].as_str().and_then(|n| n.rsplit_once('_')) else { continue };
        let Ok(port) = port.parse::<u16>() else { continue };
        let entry = out.entry(mark_of(port)).or_default();
        match kind {
            "conns" => entry.connections = c["packets"].as_u64().unwrap_or(0),
            "in" => entry.bytes_in = c["bytes"].as_u64().unwrap_or(0),
            "out" => entry.bytes_out = c["bytes"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    Ok(out)
}

/// Open connections per coyote mark, from the host's conntrack table.
pub fn open_connections() -> Result<BTreeMap<u32, usize>> {
    let text = std::fs::read_to_string("/proc/net/nf_conntrack").context("reading /proc/net/nf_conntrack")?;
    Ok(parse_conntrack(&text))
}

/// Counts the TCP entries of `/proc/net/nf_conntrack` text with a coyote mark, in any state but
/// `TIME_WAIT` and `CLOSE`.
pub fn parse_conntrack(text: &str) -> BTreeMap<u32, usize> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(mark) = line.split_whitespace().find_map(|w| w.strip_prefix("mark=")) else { continue };
        let Ok(mark) = mark.parse::<u32>() else { continue };
        if mark & MARK_MASK != MARK_BASE {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().take(6).collect();
        if words.get(2) != Some(&"tcp") || matches!(words.get(5), Some(&"TIME_WAIT") | Some(&"CLOSE")) {
            continue;
        }
        *out.entry(mark).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_counts_open_connections_by_coyote_mark() {
        let m = mark_of(18080);
        let text = format!(
            "ipv4     2 tcp      6 117 TIME_WAIT src=127.0.0.1 dst=127.0.0.1 sport=1 dport=18080 src=172.18.0.2 dst=172.18.0.1 sport=80 dport=1 [ASSURED] mark={m} zone=0 use=2\n\
             ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=2 dport=18080 src=172.18.0.2 dst=172.18.0.1 sport=80 dport=2 [ASSURED] mark={m} zone=0 use=2\n\
             ipv4     2 tcp      6 60 SYN_RECV src=127.0.0.1 dst=127.0.0.1 sport=3 dport=18080 src=172.18.0.2 dst=172.18.0.1 sport=80 dport=3 mark={m} zone=0 use=2\n\
             ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=4 dport=22 src=10.0.0.2 dst=10.0.0.1 sport=22 dport=4 [ASSURED] mark=0 zone=0 use=2\n\
             ipv4     2 udp      17 20 src=127.0.0.1 dst=127.0.0.1 sport=5 dport=18080 src=172.18.0.2 dst=172.18.0.1 sport=80 dport=5 mark={m} zone=0 use=2\n"
        );
        assert_eq!(parse_conntrack(&text), BTreeMap::from([(m, 2)]));
        assert!(parse_conntrack("").is_empty());
    }

    #[test]
    fn counters_are_read_by_mark() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "ip", "name": "conns_8080", "table": "t", "handle": 8, "packets": 5, "bytes": 300}},
            {"counter": {"family": "ip", "name": "in_8080", "table": "t", "handle": 9, "packets": 12, "bytes": 798}},
            {"counter": {"family": "ip", "name": "out_8080", "table": "t", "handle": 10, "packets": 12, "bytes": 1084}}]}"#;
        let c = parse_counters(json).unwrap();
        assert_eq!(c[&mark_of(8080)], KernelCounters { connections: 5, bytes_in: 798, bytes_out: 1084 });
        assert!(parse_counters("not json").is_err());
    }

    #[test]
    fn the_route_of_a_bridge_address_names_the_bridge() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    br-268c610e402b\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(route_interface(text, "172.18.0.2".parse().unwrap()).as_deref(), Some("br-268c610e402b"));
        assert_eq!(route_interface(text, "192.0.2.7".parse().unwrap()).as_deref(), Some("eth0"));
        assert_eq!(route_interface(text, "8.8.8.8".parse().unwrap()), None);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("kernel".parse(), Ok(ForwardMode::Kernel));
        assert_eq!("userspace".parse(), Ok(ForwardMode::Userspace));
        assert!("fast".parse::<ForwardMode>().unwrap_err().contains("kernel"));
    }
}
