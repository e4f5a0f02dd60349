//! `coyote`: the node daemon and the command line. This file is the entry point: it parses the
//! arguments, sets up logging, and hands `up`, `init`, `node` and `join` to [`daemon`] and every
//! other command to [`cli`].

mod cli;
mod client;
mod daemon;
mod datadir;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use coyote_log::RaftSettings;
use coyote_nodes::forward::ForwardMode;
use coyote_state_machine::spec::parse_bytes;

use crate::client::Client;
use crate::daemon::{Addresses, ContainerOptions};
use crate::datadir::DataDir;

#[derive(Parser)]
#[command(name = "coyote", version, about = "A few servers, one self-hosting cluster")]
struct Cli {
    /// Data directory of the node [default: $COYOTE_DATA, else /var/lib/coyote for root, else
    /// ~/.local/share/coyote]
    #[arg(long, global = true, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Print JSON instead of text (one object per line for streams)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: creates a single-node cluster first if the data directory is empty
    Up {
        #[command(flatten)]
        addrs: AddrArgs,
        #[command(flatten)]
        raft: RaftArgs,
        #[command(flatten)]
        containers: ContainerArgs,
        #[command(flatten)]
        front: FrontArgs,
    },
    /// Create a single-node cluster in an empty data directory (then run it with `coyote node`)
    Init {
        #[command(flatten)]
        addrs: AddrArgs,
        #[command(flatten)]
        raft: RaftArgs,
    },
    /// Run the node held in the data directory, in the foreground (or, with `leave` or `remove`,
    /// take a server out of the cluster)
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        action: Option<cli::NodeCmd>,
        #[command(flatten)]
        raft: RaftArgs,
        #[command(flatten)]
        containers: ContainerArgs,
        #[command(flatten)]
        front: FrontArgs,
    },
    /// Join a cluster with a token from `coyote token create`, then run the node in the foreground
    Join {
        token: String,
        #[command(flatten)]
        addrs: AddrArgs,
        #[command(flatten)]
        raft: RaftArgs,
        #[command(flatten)]
        containers: ContainerArgs,
        #[command(flatten)]
        front: FrontArgs,
    },
    #[command(flatten)]
    Client(cli::Command),
}

#[derive(Args)]
struct FrontArgs {
    /// Where the proxy takes plain HTTP (requests for the services' domains are redirected to
    /// HTTPS, except ACME challenges)
    #[arg(long, default_value = "0.0.0.0:80", value_name = "HOST:PORT")]
    http: String,
    /// Where the proxy takes HTTPS (certificates by name, from the cluster's CA)
    #[arg(long, default_value = "0.0.0.0:443", value_name = "HOST:PORT")]
    https: String,
    /// Run no proxy on this server (its services' domains are then reached through other nodes)
    #[arg(long)]
    no_proxy: bool,
    /// Where the CRM (the web pages) is served
    #[arg(long, default_value = "127.0.0.1:7180", value_name = "HOST:PORT")]
    crm: String,
    /// Serve no CRM on this server
    #[arg(long)]
    no_crm: bool,
    /// Serve the Prometheus text of /metrics over TCP here too (it is always on the API's unix
    /// socket) [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Certificates for the services' domains: `on` orders them from the ACME CA (--acme-ca), `off`
    /// issues them from the cluster's own CA (for a LAN or a test: browsers trust them only where
    /// that CA is installed)
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = ["on", "off"])]
    acme: String,
    /// The ACME CA's directory URL
    #[arg(long, default_value = coyote_nodes::acme::LETS_ENCRYPT, value_name = "URL")]
    acme_ca: String,
    /// A contact address for the cluster's ACME account
    #[arg(long, value_name = "ADDRESS")]
    acme_email: Option<String>,
    /// A PEM file with the root the ACME CA's own HTTPS chains to (a test or private CA)
    #[arg(long, value_name = "FILE")]
    acme_ca_root: Option<PathBuf>,
    /// How the ACME CA checks that the cluster serves a name: an HTTP request to port 80, or a TLS
    /// handshake on port 443 (every node's proxy answers either)
    #[arg(long, default_value = "http-01", value_name = "http-01|tls-alpn-01", value_parser = ["http-01", "tls-alpn-01"])]
    acme_challenge: String,
    /// The largest request headers the proxy takes (431 beyond)
    #[arg(long, default_value = "64K", value_name = "SIZE", value_parser = parse_bytes_arg)]
    proxy_max_header: u64,
    /// The largest request body the proxy passes on (413 beyond)
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_bytes_arg)]
    proxy_max_body: u64,
    /// How long a client may take to send its request headers, or its TLS handshake
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration_arg)]
    proxy_client_timeout: std::time::Duration,
    /// How long a container may take to start answering a request (504 beyond)
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration_arg)]
    proxy_upstream_timeout: std::time::Duration,
    /// Connections the proxy holds open at most (more are closed at once)
    #[arg(long, default_value = "10000", value_name = "N")]
    proxy_max_connections: usize,
}

impl From<FrontArgs> for daemon::FrontOptions {
    fn from(f: FrontArgs) -> Self {
        let acme = (f.acme == "on").then_some(coyote_nodes::acme::AcmeOptions {
            directory: f.acme_ca,
            email: f.acme_email,
            root_pem: f.acme_ca_root,
            challenge: coyote_nodes::acme::Challenge::parse(&f.acme_challenge)
                .unwrap_or(coyote_nodes::acme::Challenge::Http01),
        });
        let settings = coyote_proxy::Settings {
            max_header_bytes: usize::try_from(f.proxy_max_header).unwrap_or(usize::MAX),
            max_body_bytes: f.proxy_max_body,
            header_timeout: f.proxy_client_timeout,
            handshake_timeout: f.proxy_client_timeout,
            upstream_timeout: f.proxy_upstream_timeout,
            max_connections: f.proxy_max_connections,
            ..coyote_proxy::Settings::default()
        };
        daemon::FrontOptions {
            proxy: !f.no_proxy,
            crm: (!f.no_crm).then_some(f.crm),
            activation: false,
            http: f.http,
            https: f.https,
            metrics: f.metrics,
            acme,
            settings,
        }
    }
}

#[derive(Args)]
struct ContainerArgs {
    /// The Docker Engine's API socket
    #[arg(long, default_value = "/var/run/docker.sock", value_name = "PATH")]
    docker_socket: PathBuf,
    /// Do not manage containers on this server (it only holds the log)
    #[arg(long)]
    no_reconcile: bool,
    /// Do not pull missing images (raise an alarm instead)
    #[arg(long)]
    no_pull: bool,
    /// Stop an on-demand service's container after this long without connections (s, m, h, d)
    #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
    idle_stop: std::time::Duration,
    /// Deadline of a service's dump command, run before its container is stopped (s, m, h, d)
    #[arg(long, default_value = "2m", value_parser = parse_duration_arg)]
    dump_timeout: std::time::Duration,
    /// Stop idle on-demand containers, least recently used first, while the host's available memory
    /// (MemAvailable) is below this (512M, 2G) [default: off]
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    memory_min_available: Option<u64>,
    /// How warm connections of on-demand services reach their containers: `kernel` (nftables DNAT
    /// while the container runs) or `userspace` (spliced by the activator) [default: kernel when
    /// nft is usable and this is root, else userspace]
    #[arg(long, value_name = "MODE")]
    forward: Option<ForwardMode>,
    /// Keep no snapshots of services' data on this server: it neither snapshots, stores nor
    /// restores them (a new master then starts on its own directory)
    #[arg(long)]
    no_backups: bool,
    /// How often the master snapshots each service's data (s, m, h; 0: only `coyote backup now`
    /// and handovers)
    #[arg(long, default_value = "60s", value_parser = parse_interval_arg)]
    backup_every: std::time::Duration,
    /// Pauses of a running container for a snapshot longer than this are reported (s, m)
    #[arg(long, default_value = "2s", value_parser = parse_duration_arg)]
    pause_limit: std::time::Duration,
    /// Free space the backup store leaves on its file system; below it, storing is refused (512M, 2G)
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_bytes)]
    backup_reserve: u64,
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    match parse_bytes(text)? {
        0 => Err(format!("{text:?}: a threshold of 0 bytes never triggers; leave the option out instead")),
        n => Ok(n),
    }
}

/// A duration, or `0` for never.
fn parse_interval_arg(text: &str) -> Result<std::time::Duration, String> {
    if text.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    parse_duration_arg(text)
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    cli::parse_duration_ms(text).map(std::time::Duration::from_millis).map_err(|e| e.to_string())
}

impl From<ContainerArgs> for ContainerOptions {
    fn from(c: ContainerArgs) -> Self {
        ContainerOptions {
            reconcile: !c.no_reconcile,
            docker_socket: c.docker_socket,
            pull: !c.no_pull,
            idle_stop: c.idle_stop,
            dump_timeout: c.dump_timeout,
            memory_min_available: c.memory_min_available,
            forward: c.forward,
            backups: !c.no_backups,
            backup_every: c.backup_every,
            pause_limit: c.pause_limit,
            backup_reserve: c.backup_reserve,
        }
    }
}

#[derive(Args)]
struct AddrArgs {
    /// Address to listen on for other members
    #[arg(long, default_value = "127.0.0.1:7100", value_name = "HOST:PORT")]
    listen: String,
    /// Address other members dial [default: the --listen address]
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
}

#[derive(Args)]
struct RaftArgs {
    /// Leader heartbeat interval
    #[arg(long, default_value_t = RaftSettings::default().heartbeat_ms, value_name = "MS")]
    heartbeat_ms: u64,
    /// Election timeout, lower bound
    #[arg(long, default_value_t = RaftSettings::default().election_min_ms, value_name = "MS")]
    election_min_ms: u64,
    /// Election timeout, upper bound
    #[arg(long, default_value_t = RaftSettings::default().election_max_ms, value_name = "MS")]
    election_max_ms: u64,
    /// Snapshot (and compact the log) after this many entries
    #[arg(long, default_value_t = RaftSettings::default().snapshot_every, value_name = "N")]
    snapshot_every: u64,
    /// Entries kept behind a snapshot for lagging followers
    #[arg(long, default_value_t = RaftSettings::default().keep_logs, value_name = "N")]
    keep_logs: u64,
    /// Refuse new events while less than this is free on the disk holding DIR (0: off)
    #[arg(long, default_value = "64M", value_parser = parse_bytes_arg, value_name = "SIZE")]
    disk_reserve: u64,
}

impl RaftArgs {
    fn settings(&self) -> RaftSettings {
        RaftSettings {
            heartbeat_ms: self.heartbeat_ms,
            election_min_ms: self.election_min_ms,
            election_max_ms: self.election_max_ms,
            snapshot_every: self.snapshot_every,
            keep_logs: self.keep_logs,
            disk_reserve_bytes: self.disk_reserve,
        }
    }
}

fn parse_bytes_arg(text: &str) -> Result<u64, String> {
    parse_bytes(text)
}

fn main() -> ExitCode {
    // A panic anywhere (a broken state invariant, most of all) must stop the whole node: a replica
    // that carried on without one of its tasks would diverge from the others.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let cli = Cli::parse();
    let daemon = !matches!(cli.command, Command::Client(_) | Command::Node { action: Some(_), .. });
    let default_level = if daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!("{default_level},openraft=warn"))
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let data = cli.data.clone().unwrap_or_else(datadir::default_data_dir);
    let dir = DataDir::new(&data);
    let client = Client::new(&data);
    let json = cli.json;
    match cli.command {
        Command::Up { addrs, raft, containers, front } => {
            let settings = raft.settings();
            if !dir.is_initialized() {
                daemon::init(&dir, &addrs.into(), &settings).await?;
            }
            let mut front: daemon::FrontOptions = front.into();
            front.activation = true;
            daemon::run(&dir, &settings, &containers.into(), &front).await
        }
        Command::Init { addrs, raft } => daemon::init(&dir, &addrs.into(), &raft.settings()).await,
        Command::Node { action: Some(cmd), .. } => cli::node(cmd, &client, &data, json).await,
        Command::Node { action: None, raft, containers, front } => {
            daemon::run(&dir, &raft.settings(), &containers.into(), &front.into()).await
        }
        Command::Join { token, addrs, raft, containers, front } => {
            daemon::join(&dir, &token, &addrs.into()).await?;
            daemon::run(&dir, &raft.settings(), &containers.into(), &front.into()).await
        }
        Command::Client(command) => cli::run(command, &client, json).await,
    }
}

impl From<AddrArgs> for Addresses {
    fn from(a: AddrArgs) -> Self {
        Addresses { listen: a.listen, advertise: a.advertise }
    }
}
