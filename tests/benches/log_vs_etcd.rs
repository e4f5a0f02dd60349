//! Committed writes per second and latency: coyote's replicated log against etcd 3.4, both as 3-node
//! clusters on 127.0.0.1, in the same run on the same machine. See `tests/benches/README.md`.
//!
//! Not a test: run it with `tests/benches/run.sh`, or `cargo bench -p coyote-tests --bench log_vs_etcd`
//! with `etcd` on the PATH (or `$ETCD_BIN`) and a release `coyote` (`$COYOTE_BIN`, else built).
//!
//! Settings, from the environment:
//! - `BENCH_WARMUP_SECS` (2) and `BENCH_SECS` (10): warm-up and measured time of each phase;
//! - `BENCH_WRITERS` (`1,64`): the phases, as numbers of concurrent writers;
//! - `BENCH_VALUE_BYTES` (256): the payload of each write;
//! - `BENCH_SYSTEMS` (`coyote,etcd`): which sides to run, in that order;
//! - `BENCH_KEEP` (unset): if set, the data directory (with the nodes' logs) is kept, not removed;
//! - `COYOTE_NODE_LOG` (`info,openraft=warn`): the nodes' `RUST_LOG`; `...,coyote_path=debug` logs
//!   the timestamps of each write's steps (see the README).
//!
//! Each writer has one keep-alive HTTP/1.1 connection to the leader and sends one request at a time.
//! coyote: `POST /v1/alarms` on the leader's API socket, then `POST /v1/alarms/ID/clear`, and so on
//! (at most 4096 alarms may be open); each answered request is one committed write. etcd: `POST
//! /v3/kv/put` on the leader's client URL (etcd's JSON gateway onto its gRPC API).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use coyote_tests::cpu::{
    of_cmdline as cpu_seconds_of, of_machine as cpu_seconds_machine, of_process as cpu_seconds,
};
use coyote_tests::{cluster, free_port, leader_index, wait_until, Node};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

/// No single request may take longer than this; one that does counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

struct Config {
    warmup: Duration,
    measure: Duration,
    writers: Vec<usize>,
    value_bytes: usize,
    systems: Vec<System>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum System {
    Coyote,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Coyote => "coyote",
            System::Etcd => "etcd",
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| anyhow!("{name}={v:?} is not valid")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Self> {
        let writers = std::env::var("BENCH_WRITERS").unwrap_or_else(|_| "1,64".into());
        let writers = writers
            .split(',')
            .map(|w| w.trim().parse::<usize>().ok().filter(|w| *w > 0))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("BENCH_WRITERS={writers:?} is not a list like 1,64"))?;
        let systems = std::env::var("BENCH_SYSTEMS").unwrap_or_else(|_| "coyote,etcd".into());
        let systems = systems
            .split(',')
            .map(|s| match s.trim() {
                "coyote" => Ok(System::Coyote),
                "etcd" => Ok(System::Etcd),
                other => Err(anyhow!("BENCH_SYSTEMS: unknown system {other:?} (coyote, etcd)")),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Config {
            warmup: Duration::from_secs_f64(env_or("BENCH_WARMUP_SECS", 2.0)?),
            measure: Duration::from_secs_f64(env_or("BENCH_SECS", 10.0)?),
            writers,
            value_bytes: env_or("BENCH_VALUE_BYTES", 256)?,
            systems,
        })
    }
}

// ---------------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one request at a time on a keep-alive connection, the same code for both
// sides, so neither pays for a heavier client than the other.

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct HttpConn {
    io: BufReader<Box<dyn Io>>,
    host: &'static str,
    request: Vec<u8>,
    line: String,
    /// The server said `Connection: close`: the next request needs a new connection.
    closed: bool,
}

impl HttpConn {
    fn new(io: Box<dyn Io>, host: &'static str) -> Self {
        HttpConn { io: BufReader::new(io), host, request: Vec::new(), line: String::new(), closed: false }
    }

    /// Sends one request and reads the whole answer: status code and body.
    async fn call(&mut self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )?;
        self.request.extend_from_slice(body);
        self.io.get_mut().write_all(&self.request).await?;

        self.read_line().await?;
        let code: u16 = self
            .line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {:?}", self.line))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            self.read_line().await?;
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else { bail!("bad header {header:?}") };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().context("bad Content-Length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                self.closed = value.eq_ignore_ascii_case("close");
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                self.read_line().await?;
                let size = self.line.trim_end().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size, 16).context("bad chunk size")?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        self.read_line().await?;
                        if self.line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = out.len();
                out.resize(start + size, 0);
                self.io.read_exact(&mut out[start..]).await?;
                self.read_line().await?; // the CRLF after the chunk
            }
        } else if let Some(n) = length {
            out.resize(n, 0);
            self.io.read_exact(&mut out).await?;
        } else {
            self.io.read_to_end(&mut out).await?;
            self.closed = true;
        }
        Ok((code, out))
    }

    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        if self.io.read_line(&mut self.line).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------
// What the writers write to.

enum Target {
    /// The leader's API socket.
    Coyote(PathBuf),
    /// The leader's client URL.
    Etcd(SocketAddr),
}

impl Target {
    async fn connect(&self) -> Result<HttpConn> {
        Ok(match self {
            Target::Coyote(socket) => {
                let s = UnixStream::connect(socket).await.with_context(|| format!("{}", socket.display()))?;
                HttpConn::new(Box::new(s), "coyote")
            }
            Target::Etcd(addr) => {
                let s = TcpStream::connect(addr).await.with_context(|| format!("{addr}"))?;
                s.set_nodelay(true)?;
                HttpConn::new(Box::new(s), "etcd")
            }
        })
    }
}

/// One writer's state between writes.
struct Writer {
    id: usize,
    seq: u64,
    /// coyote: the alarm this writer raised and has not cleared yet.
    open_alarm: Option<u64>,
}

impl Writer {
    /// One committed write; `Err` if it was not acknowledged as committed.
    async fn write(&mut self, target: &Target, conn: &mut HttpConn, value: &str) -> Result<()> {
        self.seq += 1;
        match target {
            Target::Coyote(_) => {
                if let Some(id) = self.open_alarm.take() {
                    let (code, body) = conn.call("POST", &format!("/v1/alarms/{id}/clear"), b"").await?;
                    check(code, &body)?;
                } else {
                    let body = format!(r#"{{"key":"bench-{}-{}","message":"{value}"}}"#, self.id, self.seq);
                    let (code, body) = conn.call("POST", "/v1/alarms", body.as_bytes()).await?;
                    check(code, &body)?;
                    let answer: Value = serde_json::from_slice(&body)?;
                    let id = answer["id"].as_u64().ok_or_else(|| anyhow!("no alarm id in {answer}"))?;
                    self.open_alarm = Some(id);
                }
            }
            Target::Etcd(_) => {
                let b64 = base64::engine::general_purpose::STANDARD;
                let key = b64.encode(format!("bench-{}-{}", self.id, self.seq));
                let body = format!(r#"{{"key":"{key}","value":"{}"}}"#, b64.encode(value));
                let (code, body) = conn.call("POST", "/v3/kv/put", body.as_bytes()).await?;
                check(code, &body)?;
            }
        }
        Ok(())
    }
}

fn check(code: u16, body: &[u8]) -> Result<()> {
    if code != 200 {
        let text = String::from_utf8_lossy(body);
        bail!("HTTP {code}: {}", text.chars().take(300).collect::<String>());
    }
    Ok(())
}

/// What one writer saw.
#[derive(Default)]
struct WriterStats {
    /// Latencies of the writes completed inside the measured window, in microseconds.
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

async fn run_writer(
    target: Arc<Target>,
    id: usize,
    value: Arc<String>,
    measure_from: Instant,
    end: Instant,
) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut writer = Writer { id, seq: 0, open_alarm: None };
    let mut conn: Option<HttpConn> = None;
    let fail = |stats: &mut WriterStats, e: anyhow::Error| {
        stats.errors += 1;
        stats.first_error.get_or_insert_with(|| format!("{e:#}"));
    };
    while Instant::now() < end {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, target.connect()).await {
                Ok(Ok(c)) => conn.insert(c),
                Ok(Err(e)) => {
                    fail(&mut stats, e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => {
                    fail(&mut stats, anyhow!("connecting timed out"));
                    continue;
                }
            },
        };
        let start = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, writer.write(&target, c, &value)).await;
        let done = Instant::now();
        match result {
            Ok(Ok(())) => {
                if done >= measure_from && done <= end {
                    let us = (done - start).as_micros().min(u32::MAX as u128) as u32;
                    stats.latencies_us.push(us);
                }
                if c.closed {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                fail(&mut stats, e);
                conn = None; // the connection may be in the middle of an answer
            }
            Err(_) => {
                fail(&mut stats, anyhow!("no answer within {REQUEST_TIMEOUT:?}"));
                conn = None;
            }
        }
    }
    stats
}

/// The figures of one phase: one system, one number of writers.
#[derive(Clone)]
struct Phase {
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    writes: usize,
    errors: u64,
    first_error: Option<String>,
    /// CPU time of the servers (all three members) and of this load generator per measured write.
    server_cpu_us_per_write: f64,
    client_cpu_us_per_write: f64,
    /// The servers' CPU use during the measured window, in cores.
    server_cores: f64,
    /// CPU used by everything else on the machine during the measured window, in cores: other load
    /// that skews the figures.
    other_cores: f64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn run_phase(
    rt: &tokio::runtime::Runtime,
    target: Target,
    writers: usize,
    cfg: &Config,
    servers: &Path,
) -> Phase {
    let target = Arc::new(target);
    let value = Arc::new(payload(cfg.value_bytes));
    let (stats, cpu) = rt.block_on(async {
        let measure_from = Instant::now() + cfg.warmup;
        let end = measure_from + cfg.measure;
        let tasks: Vec<_> = (0..writers)
            .map(|w| tokio::spawn(run_writer(target.clone(), w, value.clone(), measure_from, end)))
            .collect();
        // CPU used by the servers and by this process during the measured window.
        let servers = servers.to_path_buf();
        let cpu = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let (s0, c0, m0) = (cpu_seconds_of(&servers), cpu_seconds_self(), cpu_seconds_machine());
            tokio::time::sleep_until(end.into()).await;
            let (s, c) = (cpu_seconds_of(&servers) - s0, cpu_seconds_self() - c0);
            (s, c, cpu_seconds_machine() - m0 - s - c)
        });
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.expect("a writer task panicked"));
        }
        (all, cpu.await.expect("the CPU sampler panicked"))
    });
    let mut latencies: Vec<u32> = stats.iter().flat_map(|s| s.latencies_us.iter().copied()).collect();
    latencies.sort_unstable();
    let per_write = |secs: f64| secs * 1e6 / latencies.len().max(1) as f64;
    Phase {
        server_cpu_us_per_write: per_write(cpu.0),
        client_cpu_us_per_write: per_write(cpu.1),
        server_cores: cpu.0 / cfg.measure.as_secs_f64(),
        other_cores: (cpu.2 / cfg.measure.as_secs_f64()).max(0.0),
        writes_per_sec: latencies.len() as f64 / cfg.measure.as_secs_f64(),
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        writes: latencies.len(),
        errors: stats.iter().map(|s| s.errors).sum(),
        first_error: stats.iter().find_map(|s| s.first_error.clone()),
    }
}

fn cpu_seconds_self() -> f64 {
    cpu_seconds(Path::new("/proc/self/stat"))
}

/// `n` printable ASCII bytes: valid JSON string content as it is, and the same bytes on both sides.
fn payload(n: usize) -> String {
    (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

// ---------------------------------------------------------------------------------------------------
// The clusters.

/// A running coyote cluster; the nodes are killed when it is dropped.
struct CoyoteCluster {
    nodes: Vec<Node>,
}

impl CoyoteCluster {
    fn start(root: &Path) -> Result<Self> {
        let nodes = cluster(root, 3).context("forming the coyote cluster")?;
        Ok(CoyoteCluster { nodes })
    }

    fn leader_socket(&self) -> Result<PathBuf> {
        let leader = leader_index(&self.nodes)?;
        Ok(self.nodes[leader].dir.join("coyote.sock"))
    }
}

/// A running etcd cluster; the members are killed when it is dropped.
struct EtcdCluster {
    children: Vec<Child>,
    /// Client addresses, in member order.
    clients: Vec<SocketAddr>,
    logs: Vec<PathBuf>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

impl EtcdCluster {
    fn start(root: &Path) -> Result<Self> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{}=http://127.0.0.1:{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("bench-{}-{}", std::process::id(), now_ms());
        let mut cluster = EtcdCluster { children: Vec::new(), clients: Vec::new(), logs: Vec::new() };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e{}", i + 1);
            let log_path = root.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(etcd_bin());
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(root.join(&name))
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdout(Stdio::null())
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; it only makes the kernel kill etcd if we die first.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().with_context(|| format!("starting {}", etcd_bin().display()))?;
            cluster.children.push(child);
            cluster.clients.push(format!("127.0.0.1:{client}").parse()?);
            cluster.logs.push(log_path);
        }
        Ok(cluster)
    }

    /// Waits until every member names the same leader, and returns the leader's client address.
    fn leader(&mut self, rt: &tokio::runtime::Runtime) -> Result<SocketAddr> {
        let clients = self.clients.clone();
        let result = wait_until("the etcd members to agree on a leader", Duration::from_secs(30), || {
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Some(status) = c.try_wait()? {
                    bail!("etcd member {} exited with {status}", i + 1);
                }
            }
            let statuses: Vec<(String, String)> = rt.block_on(async {
                let mut out = Vec::new();
                for addr in &clients {
                    let mut conn = Target::Etcd(*addr).connect().await?;
                    let (code, body) = conn.call("POST", "/v3/maintenance/status", b"{}").await?;
                    check(code, &body)?;
                    let v: Value = serde_json::from_slice(&body)?;
                    let id = v["header"]["member_id"].as_str().unwrap_or_default().to_string();
                    let leader = v["leader"].as_str().unwrap_or_default().to_string();
                    out.push((id, leader));
                }
                anyhow::Ok(out)
            })?;
            let leader = &statuses[0].1;
            if leader.is_empty() || leader == "0" || statuses.iter().any(|(_, l)| l != leader) {
                return Ok(None);
            }
            Ok(statuses.iter().position(|(id, _)| id == leader).map(|i| clients[i]))
        });
        result.map_err(|e| {
            let logs: String = self
                .logs
                .iter()
                .map(|l| {
                    let text = std::fs::read_to_string(l).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(10).collect();
                    format!(
                        "--- {}\n{}\n",
                        l.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            e.context(logs)
        })
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn etcd_version() -> String {
    Command::new(etcd_bin())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "etcd: version unknown".into())
}

// ---------------------------------------------------------------------------------------------------

fn run_system(
    system: System,
    root: &Path,
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
) -> Result<BTreeMap<usize, Phase>> {
    let dir = root.join(system.name());
    std::fs::create_dir_all(&dir)?;
    let mut phases = BTreeMap::new();
    let started = Instant::now();
    // Each side's cluster lives only while it is measured, so the other side's idle heartbeats do not
    // take CPU from it. Both are killed on every way out (Drop).
    let (coyote, mut etcd) = match system {
        System::Coyote => (Some(CoyoteCluster::start(&dir)?), None),
        System::Etcd => (None, Some(EtcdCluster::start(&dir)?)),
    };
    if let Some(e) = etcd.as_mut() {
        e.leader(rt)?;
    }
    eprintln!("{}: cluster of 3 ready after {:.1} s", system.name(), started.elapsed().as_secs_f64());
    for &writers in &cfg.writers {
        let target = match (&coyote, &mut etcd) {
            (Some(c), _) => Target::Coyote(c.leader_socket()?),
            (_, Some(e)) => Target::Etcd(e.leader(rt)?),
            _ => unreachable!("one cluster runs"),
        };
        let phase = run_phase(rt, target, writers, cfg, &dir);
        eprintln!(
            "{:>6} {:>3} writers: {:>8.0} writes/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} writes, {} errors{})",
            system.name(),
            writers,
            phase.writes_per_sec,
            phase.p50_ms,
            phase.p99_ms,
            phase.writes,
            phase.errors,
            phase.first_error.as_deref().map(|e| format!("; first: {e}")).unwrap_or_default()
        );
        eprintln!(
            "{:>6} {:>3} writers: servers used {:.2} cores, {:.0} us CPU per write; this client {:.0} us per \
             write; other processes {:.2} cores",
            system.name(),
            writers,
            phase.server_cores,
            phase.server_cpu_us_per_write,
            phase.client_cpu_us_per_write,
            phase.other_cores
        );
        phases.insert(writers, phase);
    }
    if let Some(c) = &coyote {
        // Snapshots (every 10 000 entries by default) carry the whole event archive: say how many
        // the run went through, since building them is part of what was measured.
        let leader = &c.nodes[leader_index(&c.nodes)?];
        let s = leader.status()?;
        eprintln!("coyote: last log index {}, last snapshot at {}", s["last_log_index"], s["snapshot_index"]);
    }
    Ok(phases)
}

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let tmp = tempfile::Builder::new().prefix("coyote-bench-").tempdir()?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    eprintln!(
        "log_vs_etcd: 3-node clusters on 127.0.0.1, {cores} cores, {} byte values, {:.0} s warm-up + {:.0} s \
         per phase, writers {:?}; data in {}",
        cfg.value_bytes,
        cfg.warmup.as_secs_f64(),
        cfg.measure.as_secs_f64(),
        cfg.writers,
        tmp.path().display()
    );
    if cfg.systems.contains(&System::Etcd) {
        eprintln!("{}", etcd_version());
    }

    let mut results: BTreeMap<System, BTreeMap<usize, Phase>> = BTreeMap::new();
    for &system in &cfg.systems {
        results.insert(system, run_system(system, tmp.path(), &rt, &cfg)?);
    }
    let table = report(&cfg, &results);
    println!("{table}");

    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!("BENCH_KEEP: keeping {}", tmp.keep().display());
    }
    let errors: u64 = results.values().flat_map(|p| p.values()).map(|p| p.errors).sum();
    if errors > 0 {
        bail!("{errors} writes failed: the figures above are not valid");
    }
    Ok(())
}

fn report(cfg: &Config, results: &BTreeMap<System, BTreeMap<usize, Phase>>) -> String {
    let get = |s: System, w: usize| results.get(&s).and_then(|p| p.get(&w));
    let mut out = String::new();
    let _ = writeln!(out, "\n{:<24} {:>12} {:>12} {:>12}", "metric", "coyote", "etcd", "coyote/etcd");
    let mut row = |label: String, f: &dyn Fn(&Phase) -> f64, w: usize| {
        let c = get(System::Coyote, w).map(f);
        let e = get(System::Etcd, w).map(f);
        let show = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let ratio = match (c, e) {
            (Some(c), Some(e)) if e > 0.0 => format!("{:.2}x", c / e),
            _ => "-".into(),
        };
        let _ = writeln!(out, "{label:<24} {:>12} {:>12} {:>12}", show(c), show(e), ratio);
    };
    for &w in &cfg.writers {
        row(format!("writes/s, {w} writer(s)"), &|p| p.writes_per_sec, w);
    }
    for &w in &cfg.writers {
        row(format!("p50 ms, {w} writer(s)"), &|p| p.p50_ms, w);
        row(format!("p99 ms, {w} writer(s)"), &|p| p.p99_ms, w);
    }
    for &w in &cfg.writers {
        row(format!("server CPU us/write, {w}"), &|p| p.server_cpu_us_per_write, w);
    }
    for (system, phases) in results {
        let errors: u64 = phases.values().map(|p| p.errors).sum();
        let writes: usize = phases.values().map(|p| p.writes).sum();
        let _ = writeln!(
            out,
            "sanity {:<8} {errors} errors, {writes} writes measured, other processes used up to {:.2} cores{}",
            system.name(),
            phases.values().map(|p| p.other_cores).fold(0.0, f64::max),
            phases
                .values()
                .find_map(|p| p.first_error.as_deref())
                .map(|e| format!("; first: {e}"))
                .unwrap_or_default()
        );
    }
    let ratio = |f: &dyn Fn(&Phase) -> f64, w: usize| {
        Some(f(get(System::Coyote, w)?) / f(get(System::Etcd, w)?)).filter(|r| r.is_finite())
    };
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    if let Some(r) = ratio(&|p| p.writes_per_sec, 64) {
        let _ = writeln!(out, "goal: writes/s at 64 writers >= 1.5x etcd: {} ({r:.2}x)", verdict(r >= 1.5));
    }
    if let Some(r) = ratio(&|p| p.p50_ms, 1) {
        let _ = writeln!(out, "goal: p50 at 1 writer <= etcd's: {} ({r:.2}x)", verdict(r <= 1.0));
    }
    out
}
