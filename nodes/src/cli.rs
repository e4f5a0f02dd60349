//! The client commands of `coyote` (all but `up`, `init`, `node` and `join`, which run a node: see
//! `daemon.rs`): their arguments, what each asks of the node's local API, and how its answer is
//! printed (text, or JSON with `--json`).

use anyhow::{bail, Result};
use clap::Subcommand;
use coyote_nodes::wire;
use coyote_state_machine::data::Retention;
use coyote_state_machine::spec::human_bytes;
use coyote_state_machine::spec::{parse_bytes, parse_port};
use coyote_state_machine::{format_ms, PortMap, ServiceSpec, ZoneCheck};
use hyper::Method;
use serde::Serialize;

use crate::client::Client;

/// The client commands, flattened into `coyote`'s list of commands after the daemon's.
#[derive(Subcommand)]
pub enum Command {
    /// Show the cluster as this node sees it
    Status,
    /// Join tokens
    #[command(subcommand)]
    Token(TokenCmd),
    /// The CRM (web pages): activation URLs and users
    #[command(subcommand)]
    Crm(CrmCmd),
    /// The event log
    #[command(subcommand)]
    Events(EventsCmd),
    /// Hosted services
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Open alarms
    #[command(subcommand)]
    Alarm(AlarmCmd),
    /// Show what this node would do to its containers now, without doing it
    Plan,
    /// Traffic of the on-demand services this node serves (kept locally, not in the log)
    Stats {
        /// The web traffic through this node's proxy instead, per domain
        #[arg(long)]
        web: bool,
    },
    /// Snapshots of services' data
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Certificates of the services' domains
    #[command(subcommand)]
    Cert(CertCmd),
}

/// What `coyote node` does besides running the node.
#[derive(Subcommand)]
pub enum NodeCmd {
    /// Retire this server: hand every service it is master of over to another server, leave the
    /// cluster (its other roles are refilled elsewhere), remove its containers and stop. The data
    /// directory stays unless --purge
    Leave {
        /// Delete the data directory once the node has stopped (the services' volumes with it)
        #[arg(long)]
        purge: bool,
    },
    /// Take a server that is gone for good out of the cluster, from any other server, once its
    /// failovers have taken its services over: its other roles are refilled and the membership
    /// shrinks. Refused while a majority of the members still reaches it, unless --force
    Remove {
        /// The node's id (see `coyote status`)
        id: u64,
        /// How long to wait for the members to see it gone and its failovers to take over (s, m)
        #[arg(long, default_value = "30s")]
        wait: String,
        /// Remove it even though a majority still reaches it (it is then refused if it calls again)
        #[arg(long)]
        force: bool,
        /// Why, recorded with the event
        #[arg(long)]
        reason: Option<String>,
    },
}

/// How long `coyote node leave` waits for the handovers, and then for the node to stop.
const LEAVE_HANDOVER_WAIT: std::time::Duration =
    std::time::Duration::from_millis(coyote_state_machine::HANDOVER_WAIT_MS + 30_000);
const LEAVE_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// One step of `coyote node leave`: a line on stderr, or a JSON object on stdout with `--json`.
fn step(json: bool, step: &str, detail: String) {
    if json {
        print_json(&serde_json::json!({ "step": step, "detail": detail }));
    } else {
        eprintln!("{detail}");
    }
}

pub async fn node(cmd: NodeCmd, client: &Client, data: &std::path::Path, json: bool) -> Result<()> {
    match cmd {
        NodeCmd::Remove { id, wait, force, reason } => {
            let wait = if wait == "0" { 0 } else { parse_duration_ms(&wait)? };
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait);
            let body = wire::NodeRemove { force, reason };
            let path = format!("/v1/nodes/{id}/remove");
            let mut last = String::new();
            let c: wire::Committed = loop {
                match client.send_json(Method::POST, &path, &body).await {
                    Ok(c) => break c,
                    // What time settles: the members' reports, the failovers' takeovers.
                    Err(e)
                        if tokio::time::Instant::now() < deadline
                            && (e.to_string().contains("is not gone")
                                || e.to_string().contains("is still master of")) =>
                    {
                        let reason = e.to_string();
                        if reason != last {
                            step(json, "waiting", format!("waiting: {reason}"));
                            last = reason;
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            if json {
                print_json(&c);
            } else {
                println!(
                    "node {id} removed (event {}): its roles are refilled elsewhere, and the membership shrinks within seconds",
                    c.index
                );
            }
            Ok(())
        }
        NodeCmd::Leave { purge } => leave(client, data, purge, json).await,
    }
}

async fn leave(client: &Client, data: &std::path::Path, purge: bool, json: bool) -> Result<()> {
    let status: wire::Status = client.get("/v1/status").await?;
    let me = status.cluster.node_id;
    // 1. Every service this server is master of is handed over (its data goes with it), then the
    // log records the leave: the node's API does both, one step per call.
    let deadline = tokio::time::Instant::now() + LEAVE_HANDOVER_WAIT;
    let mut shown: std::collections::BTreeSet<String> = Default::default();
    let left_at = loop {
        let answer: wire::LeaveAnswer = client.act(Method::POST, "/v1/leave").await?;
        for h in &answer.handing_over {
            if shown.insert(h.service.clone()) {
                step(
                    json,
                    "handover",
                    format!("handing {} over to node {} (its data goes with it) ...", h.service, h.to),
                );
            }
        }
        for name in shown.iter().filter(|s| !answer.handing_over.iter().any(|h| h.service == **s)) {
            step(json, "handed_over", format!("{name}: handed over"));
        }
        shown.retain(|s| answer.handing_over.iter().any(|h| h.service == *s));
        if let Some(index) = answer.left_at {
            break index;
        }
        if tokio::time::Instant::now() >= deadline {
            let names: Vec<&String> = shown.iter().collect();
            bail!("the handover of {names:?} did not end in time; this server is still a member: run `coyote node leave` again");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    step(
        json,
        "left",
        format!("node {me} left the cluster (event {left_at}); its other roles are refilled elsewhere"),
    );
    step(json, "stopping", "removing its containers and stopping ...".into());
    let deadline = tokio::time::Instant::now() + LEAVE_STOP_WAIT;
    while client.get::<wire::Status>("/v1/status").await.is_ok() {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "node {me} left the cluster, but it has not stopped within {} s: stop it yourself",
                LEAVE_STOP_WAIT.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    step(json, "stopped", format!("node {me} stopped; its containers are removed"));
    // 3. The data directory, only on request, and only once it is known to be a departed node's.
    if purge {
        if !data.join("departed").exists() || !data.join("node.json").exists() {
            bail!(
                "{} does not look like the data directory of a node that left: not deleting it",
                data.display()
            );
        }
        std::fs::remove_dir_all(data)
            .map_err(|e| anyhow::anyhow!("cannot delete {}: {e}", data.display()))?;
        step(json, "purged", format!("deleted {}", data.display()));
    } else {
        step(
            json,
            "kept",
            format!(
                "its data directory {} is kept (delete it with --purge next time, or by hand)",
                data.display()
            ),
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Every domain with its certificate: issuer, expiry, state, the last error
    List,
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// A service's snapshots, newest first: when, why, how big, which nodes hold each
    List { service: String },
    /// Snapshot a service's data now (on its master)
    Now {
        service: String,
        /// Run the service's dump command first and snapshot without pausing the container
        #[arg(long)]
        dump: bool,
    },
    /// Re-hash every chunk this node holds; snapshots that lost one are fetched again from another
    /// node that holds them, and what was found is recorded in the log
    Verify { service: Option<String> },
    /// Roll a service's data back to a snapshot, in place: its master stops the container, moves
    /// the data aside (volumes/NAME.stale-EPOCH), restores the snapshot and starts it again. With
    /// --into, restore into a new directory on this server instead, leaving the service alone
    Restore {
        service: String,
        /// The snapshot (its id or the start of it) [default: the newest some node holds]
        #[arg(long)]
        snapshot: Option<String>,
        /// The directory to create; it must not exist
        #[arg(long)]
        into: Option<std::path::PathBuf>,
    },
    /// Write a snapshot of a service's data as a tar stream (to stdout, or --output FILE); it needs
    /// no cluster to be read back: `tar x`
    Export {
        service: String,
        /// The snapshot (its id or the start of it) [default: the newest some node holds]
        #[arg(long)]
        snapshot: Option<String>,
        /// Write the tar stream to this file instead of stdout
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Issue a join token
    Create {
        /// How long the token stays valid (s, m, h, d)
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many servers may join with it
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List tokens
    List,
    /// Revoke a token by id
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum CrmCmd {
    /// Print a one-time URL that creates an admin of the CRM (the first one, or another after a
    /// lost password)
    Activate {
        /// How long the URL stays valid (s, m, h; a day at most)
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// List the CRM's users
    Users,
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Print events, oldest first
    Tail {
        /// Keep printing new events as they are committed
        #[arg(long, short)]
        follow: bool,
        /// Start at this log index
        #[arg(long, value_name = "INDEX")]
        from: Option<u64>,
        /// Only events of this kind (node_joined, service_created, ...)
        #[arg(long)]
        kind: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a service; it is placed on a master, a failover and backups among the members
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
        /// HOST:CONTAINER, or PORT for the same on both sides
        #[arg(long = "port", value_name = "HOST:CONTAINER")]
        ports: Vec<String>,
        /// Memory limit (256M, 1G)
        #[arg(long)]
        memory: Option<String>,
        /// Keep the container stopped until a connection arrives
        #[arg(long)]
        on_demand: bool,
        /// Command run inside the container before coyote stops it (idle, memory pressure); split
        /// like a shell line, without a shell: --dump 'sh -c "pg_dumpall > /data/dump.sql"'
        #[arg(long, value_name = "COMMAND")]
        dump: Option<String>,
        /// Check the service with an HTTP GET of PATH on its first port (healthy below status 500)
        /// instead of a TCP connection
        #[arg(long, value_name = "PATH")]
        http_check: Option<String>,
        /// The service's DNS zone: the failover takes over only while the zone's nameservers do not
        /// answer an SOA query either (give them with --nameserver)
        #[arg(long, value_name = "ZONE", requires = "nameservers")]
        zone: Option<String>,
        /// A nameserver of the zone, HOST or HOST:PORT (repeat for several)
        #[arg(long = "nameserver", value_name = "HOST[:PORT]", requires = "zone")]
        nameservers: Vec<String>,
        /// The container port the proxy sends the service's web traffic to (default 80)
        #[arg(long, value_name = "PORT")]
        http_port: Option<u16>,
        /// The container terminates TLS for its domains itself: the proxy passes TLS connections
        /// through to its port 443 undecrypted
        #[arg(long)]
        tls_passthrough: bool,
        /// Which snapshots of the service's data to keep: last=N,hourly=N,daily=N,weekly=N (a count
        /// not given keeps its default: last=10,hourly=24,daily=7,weekly=4)
        #[arg(long, value_name = "RETENTION")]
        keep: Option<String>,
    },
    /// List services
    List,
    /// Instruct a switch of authority: NODE becomes master (the only way a backup takes over)
    /// Hand a service over to another node that holds a role for it. By default gracefully: the
    /// master runs the spec's dump command, stops the container, then switches; the new master
    /// serves a lease later. If the master does not within 30 s, or a majority reports it
    /// unreachable, the new master takes over by itself.
    Switch {
        name: String,
        /// Node id of the new master
        #[arg(long)]
        to: u64,
        /// Switch at once, without waiting for the master's dump and stop (for a master that is
        /// gone for good; it is fenced by its lease)
        #[arg(long)]
        now: bool,
    },
    /// Services this node may serve right now (it is master and holds its lease)
    Serving,
    /// Show one service
    Show { name: String },
    /// Change a service's spec: only the options given change; its containers are replaced
    Update {
        name: String,
        #[arg(long)]
        image: Option<String>,
        /// Replaces the service's domains (repeat for several)
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
        /// Replaces the service's published ports (repeat for several)
        #[arg(long = "port", value_name = "HOST:CONTAINER")]
        ports: Vec<String>,
        /// Publish no ports
        #[arg(long, conflicts_with = "ports")]
        no_ports: bool,
        /// Memory limit (256M, 1G), or `none`
        #[arg(long)]
        memory: Option<String>,
        /// Keep the container stopped until a connection arrives (true or false)
        #[arg(long, value_name = "BOOL")]
        on_demand: Option<bool>,
        /// Command run inside the container before coyote stops it, split like a shell line
        #[arg(long, value_name = "COMMAND")]
        dump: Option<String>,
        /// Remove the dump command
        #[arg(long, conflicts_with = "dump")]
        no_dump: bool,
        /// Check the service with an HTTP GET of PATH on its first port
        #[arg(long, value_name = "PATH")]
        http_check: Option<String>,
        /// Check the service with a TCP connection again (no HTTP check)
        #[arg(long, conflicts_with = "http_check")]
        tcp_check: bool,
        /// Sets the service's DNS zone check (with --nameserver)
        #[arg(long, value_name = "ZONE", requires = "nameservers")]
        zone: Option<String>,
        /// A nameserver of the zone, HOST or HOST:PORT (repeat for several)
        #[arg(long = "nameserver", value_name = "HOST[:PORT]", requires = "zone")]
        nameservers: Vec<String>,
        /// Remove the zone check
        #[arg(long, conflicts_with = "zone")]
        no_zone: bool,
        /// The container port the proxy sends web traffic to
        #[arg(long, value_name = "PORT")]
        http_port: Option<u16>,
        /// Pass TLS through to the container (true) or terminate it in the proxy (false)
        #[arg(long, value_name = "BOOL")]
        tls_passthrough: Option<bool>,
        /// Which snapshots to keep: last=N,hourly=N,daily=N,weekly=N, or `default`
        #[arg(long, value_name = "RETENTION")]
        keep: Option<String>,
    },
    /// Remove a service
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum AlarmCmd {
    /// List open alarms
    List,
    /// Clear an alarm by id
    Clear { id: u64 },
}

/// Runs one client command against the node whose API `client` reaches.
pub async fn run(command: Command, client: &Client, json: bool) -> Result<()> {
    match command {
        Command::Plan => {
            let plan: wire::PlanView = client.get("/v1/plan").await?;
            print_plan(&plan, json);
            Ok(())
        }
        Command::Status => {
            let status: wire::Status = client.get("/v1/status").await?;
            print_status(&status, json);
            Ok(())
        }
        Command::Token(cmd) => token(cmd, client, json).await,
        Command::Crm(cmd) => crm(cmd, client, json).await,
        Command::Events(EventsCmd::Tail { follow, from, kind }) => {
            let kind_query = kind.map(|k| format!("&kind={k}")).unwrap_or_default();
            if follow {
                let path = format!("/v1/events?follow=true&from={}{kind_query}", from.unwrap_or(0));
                return client.stream_events(&path, |e| print_event(&e, json)).await;
            }
            // The API answers in pages; ask for the next one until a page comes back empty.
            let mut next = from.unwrap_or(0);
            loop {
                let path = format!("/v1/events?from={next}{kind_query}");
                let page: wire::EventsPage = client.get(&path).await?;
                for e in &page.events {
                    print_event(e, json)?;
                }
                match page.next {
                    Some(n) => next = n,
                    None => return Ok(()),
                }
            }
        }
        Command::Service(cmd) => service(cmd, client, json).await,
        Command::Stats { web: true } => {
            let w: wire::WebStats = client.get("/v1/stats/web").await?;
            if json {
                print_json(&w);
                return Ok(());
            }
            println!(
                "proxy: {} connections open, {} in all; TLS handshakes: {} done, {} failed",
                w.open_connections, w.connections, w.tls_handshakes, w.tls_handshake_failures
            );
            for d in &w.domains {
                let at_most = |v: Option<u64>| v.map(|m| format!("<= {m} ms")).unwrap_or_else(|| "-".into());
                let [c1, c2, c3, c4, c5] = d.requests_by_class;
                println!(
                    "{:<32} {} requests (1xx {c1}, 2xx {c2}, 3xx {c3}, 4xx {c4}, 5xx {c5}), {} in, {} out, p50 {}, p99 {}",
                    d.domain,
                    c1 + c2 + c3 + c4 + c5,
                    coyote_state_machine::spec::human_bytes(d.bytes_in),
                    coyote_state_machine::spec::human_bytes(d.bytes_out),
                    at_most(d.latency_p50_ms_at_most),
                    at_most(d.latency_p99_ms_at_most),
                );
            }
            Ok(())
        }
        Command::Stats { web: false } => {
            let list: Vec<wire::ServiceStats> = client.get("/v1/stats").await?;
            if json {
                print_json_lines(&list);
            } else {
                for s in &list {
                    let ms = |v: Option<u64>| v.map(|m| format!("{m} ms")).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<24} {} connections, {} B in, {} B out, {} cold starts (p50 {}, p99 {}), running {} s{}",
                        s.service,
                        s.connections,
                        s.bytes_in,
                        s.bytes_out,
                        s.cold_starts,
                        ms(s.cold_start_ms_p50),
                        ms(s.cold_start_ms_p99),
                        s.running_ms / 1000,
                        if s.running { " (up)" } else { "" }
                    );
                }
                // Only a node that keeps backups answers this; the others have no pauses to show.
                if let Ok(b) = client.get::<wire::BackupsView>("/v1/backups").await {
                    let p = &b.pauses;
                    if p.count > 0 {
                        println!(
                            "snapshots paused running containers {} times: p50 {} ms, p99 {} ms, max {} ms",
                            p.count, p.p50_ms, p.p99_ms, p.max_ms
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Backup(cmd) => backup(cmd, client, json).await,
        Command::Alarm(AlarmCmd::List) => {
            let alarms: Vec<wire::Alarm> = client.get("/v1/alarms").await?;
            if json {
                print_json_lines(&alarms);
            } else {
                for a in &alarms {
                    println!("{:>6}  {}  {}  {}", a.id, format_ms(a.raised_at_ms), a.key, a.message);
                }
            }
            Ok(())
        }
        Command::Cert(CertCmd::List) => {
            let certs: Vec<wire::CertView> = client.get("/v1/certs").await?;
            if json {
                print_json_lines(&certs);
                return Ok(());
            }
            if certs.is_empty() {
                println!("no service has a domain whose TLS coyote terminates");
            }
            for c in &certs {
                let until =
                    c.not_after_ms.map(|t| format!("until {}", format_ms(t))).unwrap_or_else(|| "-".into());
                let issuer = c.issuer.as_deref().unwrap_or("-");
                let mut line = format!("{:<32} {:<10} {:<28} {until}", c.name, c.state, issuer);
                if let Some(node) = c.ordering_node {
                    line.push_str(&format!("; node {node} is ordering it"));
                }
                if let Some(e) = &c.last_error {
                    line.push_str(&format!("; {} failure(s), last: {e}", c.failures));
                }
                if let Some(t) = c.retry_at_ms {
                    line.push_str(&format!("; next try {}", format_ms(t)));
                }
                println!("{line}");
            }
            Ok(())
        }
        Command::Alarm(AlarmCmd::Clear { id }) => {
            let r: wire::Committed = client.act(Method::POST, &format!("/v1/alarms/{id}/clear")).await?;
            print_done(&r, r.index, json, &format!("alarm {id} cleared"));
            Ok(())
        }
    }
}

/// How long `backup restore` (in place) waits for the master to restore.
const ROLLBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

fn print_json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string(value).expect("API types encode"));
}

async fn backup(cmd: BackupCmd, client: &Client, json: bool) -> Result<()> {
    match cmd {
        BackupCmd::List { service } => {
            let list: wire::BackupList = client.get(&format!("/v1/backups/{service}")).await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            let node = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
            let age = match list.data_age_ms {
                Some(ms) => format!("{} s", ms / 1000),
                None => "no snapshot on the failover".into(),
            };
            println!(
                "{}: epoch {}, master {}, failover {}, data age {age}",
                list.service,
                list.epoch,
                node(list.master),
                node(list.failover)
            );
            if let Some(r) = &list.restored {
                let from = r
                    .snapshot
                    .as_deref()
                    .map(short_id)
                    .unwrap_or_else(|| "nothing (started on its own directory)".into());
                println!("restored by node {} at {} from {from}", r.node, format_ms(r.at_ms));
            }
            if list.snapshots.is_empty() {
                println!("no snapshots yet");
            }
            for s in &list.snapshots {
                let holders: Vec<String> = s.holders.iter().map(|n| n.to_string()).collect();
                let corrupt = if s.corrupt_on.is_empty() {
                    String::new()
                } else {
                    let nodes: Vec<String> = s.corrupt_on.iter().map(|n| n.to_string()).collect();
                    format!("  corrupt on [{}]", nodes.join(","))
                };
                println!(
                    "{}  {}  {:<8} {:<7} {:>9} {:>9} new  by node {}  held by [{}]{corrupt}",
                    short_id(&s.snapshot),
                    format_ms(s.taken_at_ms),
                    s.kind,
                    s.consistency,
                    human_bytes(s.bytes),
                    human_bytes(s.new_bytes),
                    s.taken_by,
                    holders.join(",")
                );
            }
            for f in &list.failures {
                println!("failure on node {} at {}: {}", f.node, format_ms(f.at_ms), f.reason);
            }
            Ok(())
        }
        BackupCmd::Now { service, dump } => {
            let body = wire::BackupNow { kind: dump.then(|| "dump".to_string()) };
            let taken: wire::TakenView =
                client.send_json(Method::POST, &format!("/v1/backups/{service}/now"), &body).await?;
            if json {
                print_json(&taken);
            } else {
                let what = if taken.recorded { "recorded" } else { "unchanged since the last snapshot" };
                println!(
                    "snapshot {} of {service} ({what}): {} files ({} changed), {}, {} new, {} written, {} ms paused",
                    short_id(&taken.snapshot),
                    taken.files,
                    taken.changed_files,
                    human_bytes(taken.bytes),
                    human_bytes(taken.new_bytes),
                    human_bytes(taken.stored_bytes),
                    taken.paused_ms
                );
            }
            Ok(())
        }
        BackupCmd::Verify { service } => {
            let body = wire::BackupVerify { service };
            let v: wire::VerifyView = client.send_json(Method::POST, "/v1/backups/verify", &body).await?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "{} chunks checked, {} corrupt; {} snapshots whole, {} fetched again, {} lost here",
                    v.checked_chunks,
                    v.corrupt_chunks,
                    v.whole,
                    v.repaired.len(),
                    v.lost.len()
                );
                for id in &v.repaired {
                    println!("fetched again: {}", short_id(id));
                }
                for id in &v.lost {
                    println!("LOST here (no other holder answered): {}", short_id(id));
                }
            }
            if !v.lost.is_empty() {
                bail!("{} snapshot(s) could not be repaired on this node", v.lost.len());
            }
            Ok(())
        }
        BackupCmd::Restore { service, snapshot, into: None } => {
            let body = wire::BackupRollback { snapshot };
            let asked: wire::RollbackAsked =
                client.send_json(Method::POST, &format!("/v1/backups/{service}/rollback"), &body).await?;
            if !json {
                eprintln!(
                    "rollback of {service} to snapshot {} asked (event {}); waiting for its master to restore it",
                    short_id(&asked.snapshot),
                    asked.index
                );
            }
            let started = std::time::Instant::now();
            let mut said = std::time::Instant::now();
            let list = loop {
                let list: wire::BackupList = client.get(&format!("/v1/backups/{service}")).await?;
                if list.epoch != asked.index {
                    anyhow::bail!(
                        "the rollback was overtaken: {service} has a new epoch ({}), see coyote events tail",
                        list.epoch
                    );
                }
                if list.restored.is_some() {
                    break list;
                }
                if started.elapsed() > ROLLBACK_WAIT {
                    anyhow::bail!(
                        "the master of {service} has not restored within {} s; it goes on trying (see coyote alarm list)",
                        ROLLBACK_WAIT.as_secs()
                    );
                }
                if !json && said.elapsed() >= std::time::Duration::from_secs(5) {
                    eprintln!("  still waiting ({} s)", started.elapsed().as_secs());
                    said = std::time::Instant::now();
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            };
            let restored = list.restored.as_ref().expect("checked above");
            if json {
                print_json(&list);
            } else if restored.snapshot.as_deref() == Some(asked.snapshot.as_str()) {
                println!(
                    "{service} rolled back to snapshot {} by node {}; the data it replaced is in volumes/{service}.stale-{} there",
                    short_id(&asked.snapshot),
                    restored.node,
                    asked.index
                );
            } else {
                anyhow::bail!(
                    "node {} could not roll {service} back; its data is as it was (see coyote alarm list)",
                    restored.node
                );
            }
            Ok(())
        }
        BackupCmd::Restore { service, snapshot, into: Some(into) } => {
            let into = std::path::absolute(&into)
                .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", into.display()))?;
            let body = wire::BackupRestore { snapshot, into: into.display().to_string() };
            let r: wire::RestoredCopy =
                client.send_json(Method::POST, &format!("/v1/backups/{service}/restore"), &body).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "restored snapshot {} of {service} into {}: {} files, {} directories, {} links, {}",
                    short_id(&r.snapshot),
                    r.into,
                    r.files,
                    r.dirs,
                    r.symlinks,
                    human_bytes(r.bytes)
                );
            }
            Ok(())
        }
        BackupCmd::Export { service, snapshot, output } => {
            let query = snapshot.map(|s| format!("?snapshot={s}")).unwrap_or_default();
            let path = format!("/v1/backups/{service}/export{query}");
            match output {
                Some(file) => {
                    let mut out = std::fs::File::create(&file)
                        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", file.display()))?;
                    let bytes = client.download(&path, &mut out).await?;
                    out.sync_all()?;
                    eprintln!("wrote {} to {}", human_bytes(bytes), file.display());
                }
                None => {
                    let mut out = std::io::stdout().lock();
                    client.download(&path, &mut out).await?;
                }
            }
            Ok(())
        }
    }
}

fn print_json_lines<T: Serialize>(list: &[T]) {
    for item in list {
        print_json(item);
    }
}

/// What an event did: the whole answer in JSON, else `text` with the event's index.
fn print_done<T: Serialize>(reply: &T, index: u64, json: bool, text: &str) {
    if json {
        print_json(reply);
    } else {
        println!("{text} (event {index})");
    }
}

/// A command line split into its argv like a POSIX shell would (quotes and backslashes), without
/// running a shell: no variables, no globs, no redirections.
fn parse_command(text: &str) -> Result<Vec<String>> {
    let Some(argv) = shlex::split(text) else {
        bail!("the command {text:?} has an unclosed quote or a trailing backslash");
    };
    coyote_state_machine::spec::validate_dump(&argv).map_err(|r| anyhow::anyhow!("{r}"))?;
    Ok(argv)
}

/// `1h`, `30m`, `90s`, `2d`, or plain seconds, into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = match digits.parse() {
        Ok(n) if n > 0 => n,
        _ => bail!("{text:?} is not a duration (examples: 90s, 30m, 1h, 2d)"),
    };
    let unit_ms = match unit {
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("{text:?} has an unknown unit (use s, m, h or d)"),
    };
    n.checked_mul(unit_ms).ok_or_else(|| anyhow::anyhow!("{text:?} is too long"))
}

async fn crm(cmd: CrmCmd, client: &Client, json: bool) -> Result<()> {
    match cmd {
        CrmCmd::Activate { ttl } => {
            let ttl_ms = parse_duration_ms(&ttl)?;
            let body = wire::ActivationCreate { ttl_ms: Some(ttl_ms) };
            let created: wire::ActivationCreated =
                client.send_json(Method::POST, "/v1/activations", &body).await?;
            if json {
                print_json(&created);
            } else {
                match &created.url {
                    Some(url) => println!("{url}"),
                    None => println!("/activate/{}", created.code),
                }
                eprintln!(
                    "open it in a browser to create an admin; it works once, until {}{}",
                    format_ms(created.expires_at_ms),
                    if created.url.is_none() {
                        " (this node serves no CRM: open the path on a node that does)"
                    } else {
                        ""
                    }
                );
            }
        }
        CrmCmd::Users => {
            let users: Vec<wire::UserView> = client.get("/v1/users").await?;
            if json {
                print_json_lines(&users);
            } else if users.is_empty() {
                eprintln!("no users yet: `coyote crm activate` prints a URL that creates the first admin");
            } else {
                for u in users {
                    println!("{:<32} {:<7} created {}", u.name, u.role.name(), format_ms(u.created_at_ms));
                }
            }
        }
    }
    Ok(())
}

async fn token(cmd: TokenCmd, client: &Client, json: bool) -> Result<()> {
    match cmd {
        TokenCmd::Create { ttl, uses } => {
            let ttl_ms = parse_duration_ms(&ttl)?;
            let created: wire::TokenCreated =
                client.send_json(Method::POST, "/v1/tokens", &wire::TokenCreate { ttl_ms, uses }).await?;
            let command = format!(
                "coyote join {} --data /var/lib/coyote --listen <THIS-SERVER-IP>:7100",
                created.token
            );
            if json {
                #[derive(Serialize)]
                struct WithCommand<'a> {
                    #[serde(flatten)]
                    created: &'a wire::TokenCreated,
                    command: &'a str,
                }
                print_json(&WithCommand { created: &created, command: &command });
            } else {
                println!("{}", created.token);
                eprintln!(
                    "token {} for {uses} server(s), valid until {}; on the new server run:\n  {command}",
                    created.id,
                    format_ms(created.expires_at_ms)
                );
            }
        }
        TokenCmd::List => {
            let list: Vec<wire::TokenView> = client.get("/v1/tokens").await?;
            if json {
                print_json_lines(&list);
            } else {
                for t in &list {
                    println!(
                        "{:<14} {:<8} uses left {}/{}  expires {}  used by {:?}",
                        t.id,
                        t.status.to_string(),
                        t.uses_left,
                        t.uses_total,
                        format_ms(t.expires_at_ms),
                        t.used_by
                    );
                }
            }
        }
        TokenCmd::Revoke { id } => {
            let r: wire::Committed = client.act(Method::DELETE, &format!("/v1/tokens/{id}")).await?;
            print_done(&r, r.index, json, &format!("token {id} revoked"));
        }
    }
    Ok(())
}

async fn service(cmd: ServiceCmd, client: &Client, json: bool) -> Result<()> {
    match cmd {
        ServiceCmd::Create {
            name,
            image,
            domains,
            ports,
            memory,
            on_demand,
            dump,
            http_check,
            zone,
            nameservers,
            http_port,
            tls_passthrough,
            keep,
        } => {
            let keep = keep
                .as_deref()
                .map(str::parse::<Retention>)
                .transpose()
                .map_err(|r| anyhow::anyhow!("{r}"))?;
            let ports: Vec<PortMap> =
                ports.iter().map(|p| parse_port(p)).collect::<Result<_, _>>().map_err(anyhow::Error::msg)?;
            let memory_bytes = memory.as_deref().map(parse_bytes).transpose().map_err(anyhow::Error::msg)?;
            let dump = dump.as_deref().map(parse_command).transpose()?;
            let zone = zone.map(|zone| ZoneCheck { zone, nameservers });
            let spec = ServiceSpec {
                name: name.clone(),
                image,
                domains,
                ports,
                memory_bytes,
                on_demand,
                dump,
                http_check,
                zone,
                http_port,
                tls_passthrough,
                keep,
            };
            if let Err(r) = spec.validate() {
                bail!("{r}");
            }
            let r: wire::ServiceCreated = client.send_json(Method::POST, "/v1/services", &spec).await?;
            if json {
                print_json(&r);
            } else {
                let placed = r.placement.map(|p| p.describe()).unwrap_or_else(|| "not placed yet".into());
                println!("service {name} created (event {}): {placed}", r.index);
            }
        }
        ServiceCmd::List => {
            let list: Vec<wire::ServiceView> = client.get("/v1/services").await?;
            if json {
                print_json_lines(&list);
            } else {
                for s in &list {
                    print_service_line(s);
                }
            }
        }
        ServiceCmd::Show { name } => {
            let s: wire::ServiceView = client.get(&format!("/v1/services/{name}")).await?;
            if json {
                print_json(&s);
            } else {
                print_service(&s);
            }
        }
        ServiceCmd::Update {
            name,
            image,
            domains,
            ports,
            no_ports,
            memory,
            on_demand,
            dump,
            no_dump,
            http_check,
            tcp_check,
            zone,
            nameservers,
            no_zone,
            http_port,
            tls_passthrough,
            keep,
        } => {
            let current: wire::ServiceView = client.get(&format!("/v1/services/{name}")).await?;
            let mut spec = current.spec;
            if let Some(image) = image {
                spec.image = image;
            }
            if !domains.is_empty() {
                spec.domains = domains;
            }
            if no_ports {
                spec.ports.clear();
            } else if !ports.is_empty() {
                spec.ports = ports
                    .iter()
                    .map(|p| parse_port(p))
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?;
            }
            match memory.as_deref() {
                None => {}
                Some("none") => spec.memory_bytes = None,
                Some(m) => spec.memory_bytes = Some(parse_bytes(m).map_err(anyhow::Error::msg)?),
            }
            if let Some(on_demand) = on_demand {
                spec.on_demand = on_demand;
            }
            if no_dump {
                spec.dump = None;
            } else if let Some(dump) = dump {
                spec.dump = Some(parse_command(&dump)?);
            }
            if tcp_check {
                spec.http_check = None;
            } else if let Some(path) = http_check {
                spec.http_check = Some(path);
            }
            if no_zone {
                spec.zone = None;
            } else if let Some(zone) = zone {
                spec.zone = Some(ZoneCheck { zone, nameservers });
            }
            if let Some(port) = http_port {
                spec.http_port = Some(port);
            }
            if let Some(on) = tls_passthrough {
                spec.tls_passthrough = on;
            }
            match keep.as_deref() {
                None => {}
                Some("default") => spec.keep = None,
                Some(text) => {
                    spec.keep = Some(text.parse::<Retention>().map_err(|r| anyhow::anyhow!("{r}"))?)
                }
            }
            if let Err(r) = spec.validate() {
                bail!("{r}");
            }
            let r: wire::ServiceUpdated =
                client.send_json(Method::PUT, &format!("/v1/services/{name}"), &spec).await?;
            print_done(&r, r.index, json, &format!("service {name} updated ({})", spec.describe()));
        }
        ServiceCmd::Rm { name } => {
            let r: wire::Committed = client.act(Method::DELETE, &format!("/v1/services/{name}")).await?;
            print_done(&r, r.index, json, &format!("service {name} removed"));
        }
        ServiceCmd::Switch { name, to, now } => {
            let request = wire::SwitchRequest { to, now };
            let r: wire::SwitchAnswer =
                client.send_json(Method::POST, &format!("/v1/services/{name}/switch"), &request).await?;
            let text = match &r.how {
                wire::SwitchHow::Handover { from, wait_ms } => {
                    let from = from.map(|n| format!("node {n}")).unwrap_or_else(|| "the master".into());
                    format!(
                        "service {name}: handover to node {to} asked for; {from} dumps and stops it, then node {to} serves (by itself after {} s if {from} does not); follow it with `coyote events tail --follow`",
                        wait_ms / 1000
                    )
                }
                wire::SwitchHow::Now { serve_from_ms } => {
                    format!(
                        "service {name}: node {to} becomes master, serving from {}",
                        format_ms(*serve_from_ms)
                    )
                }
            };
            print_done(&r, r.index, json, &text);
        }
        ServiceCmd::Serving => {
            let r: wire::Serving = client.get("/v1/serving").await?;
            if json {
                print_json(&r);
            } else {
                for s in &r.serving {
                    println!("{s}");
                }
            }
        }
    }
    Ok(())
}

fn print_plan(plan: &wire::PlanView, json: bool) {
    use coyote_nodes::reconciler::Action;
    if json {
        print_json(plan);
        return;
    }
    if plan.actions.is_empty() {
        println!(
            "nothing to do: node {} should have {} container(s) and has {} matching",
            plan.node,
            plan.desired.len(),
            plan.observed.len()
        );
        return;
    }
    for a in &plan.actions {
        let line = match a {
            Action::Create { service, start: true, .. } => format!("create and start {service}"),
            Action::Create { service, .. } => format!("create {service} (stopped)"),
            Action::Start { service, id } => format!("start {service} (container {})", short_id(id)),
            Action::Stop { service, id } => format!("stop {service} (container {})", short_id(id)),
            Action::Remove { service, id } => format!("remove {service} (container {})", short_id(id)),
        };
        println!("{line}");
    }
}

fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

fn print_service_line(s: &wire::ServiceView) {
    let placed = s.placement.as_ref().map(|p| p.describe()).unwrap_or_else(|| "not placed".into());
    println!("{:<24} {:<32} {placed}", s.name, s.spec.image);
}

fn print_service(s: &wire::ServiceView) {
    let placed = s.placement.as_ref().map(|p| p.describe()).unwrap_or_else(|| "not placed".into());
    println!("service   {}", s.name);
    println!("spec      {}", s.spec.describe());
    println!("spec hash {}", s.spec_hash);
    println!("placement {placed}");
    println!("created   {}", format_ms(s.created_at_ms));
    println!("serves    from {}", format_ms(s.serve_from_ms));
}

fn print_event(e: &wire::EventView, json: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let line = if json {
        serde_json::to_string(e).expect("API types encode")
    } else {
        let mut line =
            format!("{:>7}  {}  {:<16} {:<20} {}", e.index, format_ms(e.at_ms), e.actor, e.kind, e.summary);
        if let Some(reason) = &e.reason {
            line.push_str(&format!("  [rejected: {reason}]"));
        }
        line
    };
    // A closed pipe (`coyote events tail | head`) ends the command quietly.
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
    Ok(())
}

fn print_status(status: &wire::Status, json: bool) {
    if json {
        print_json(status);
        return;
    }
    let s_services = &status.services;
    let s = &status.cluster;
    let opt = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    println!("cluster   {}", s.cluster_id);
    println!("node      {} ({})", s.node_id, s.state);
    println!("leader    {}", opt(s.leader));
    println!("term      {}", s.term);
    println!("events    {}", s.last_event);
    println!(
        "log       last {}, applied {}, snapshot {}, purged {}",
        opt(s.last_log_index),
        opt(s.applied_index),
        opt(s.snapshot_index),
        opt(s.purged_index)
    );
    let t = &status.tolerance;
    let warning = if t.voters >= 2 && t.can_lose == 0 { ": one more failure stops every change" } else { "" };
    println!(
        "tolerance can lose {} of {} servers ({} reachable){warning}",
        t.can_lose, t.voters, t.reachable
    );
    println!("members");
    for m in &s.members {
        println!(
            "  {:<4} {:<24} {:<8} {}",
            m.id,
            m.addr,
            m.role,
            if m.reachable { "reachable" } else { "UNREACHABLE" }
        );
    }
    if !s_services.is_empty() {
        println!("data (age of the newest snapshot each failover holds)");
    }
    for d in s_services {
        let age = match (d.failover, d.data_age_ms) {
            (None, _) => "no failover".to_string(),
            (Some(f), None) => format!("node {f} holds no snapshot yet"),
            (Some(f), Some(ms)) => format!("{} s on node {f}", ms / 1000),
        };
        println!("  {:<24} {age} ({} snapshots)", d.service, d.snapshots);
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_command, parse_duration_ms};

    #[test]
    fn commands_split_like_a_shell_line() {
        assert_eq!(
            parse_command(r#"sh -c "pg_dumpall > /data/dump.sql""#).unwrap(),
            vec!["sh", "-c", "pg_dumpall > /data/dump.sql"]
        );
        assert_eq!(parse_command("a 'b c' d\\ e").unwrap(), vec!["a", "b c", "d e"]);
        for bad in ["", "   ", "sh -c 'unclosed", "''"] {
            assert!(parse_command(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("1h").unwrap(), 3_600_000);
        assert_eq!(parse_duration_ms("90s").unwrap(), 90_000);
        assert_eq!(parse_duration_ms("2d").unwrap(), 172_800_000);
        assert_eq!(parse_duration_ms("5").unwrap(), 5_000);
        for bad in ["", "0", "h", "1y", "-1h"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} accepted");
        }
    }
}
