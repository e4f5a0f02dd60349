//! The activator's cost: cold-start latency through the activator against a bare `docker start` plus
//! waiting for the port, for the same container; and warm throughput through the activator against
//! direct connections to the container, under the same `wrk` load. Both sides run in the same run,
//! interleaved. See `tests/benches/README.md`.
//!
//! Not a test: run it with `tests/benches/run-activator.sh`, or `cargo bench -p coyote-tests --bench
//! activator_vs_direct` with `wrk` on the PATH, the test images built (`scripts/test-images.sh`) and a
//! release `coyote` (`$COYOTE_BIN`, else built).
//!
//! Settings, from the environment:
//! - `BENCH_COLD_RUNS` (20): cold starts measured on each side;
//! - `BENCH_SECS` (10): length of each `wrk` run; `BENCH_WARMUP_SECS` (2): one run through the
//!   activator before the measured ones;
//! - `BENCH_ROUNDS` (2): `wrk` runs on each side, alternating direct and activator;
//! - `BENCH_CONNECTIONS` (8; busybox httpd listens with a backlog of 9), `BENCH_THREADS` (2): `wrk -c` and `-t`;
//! - `BENCH_IMAGE` (`coyote-test/httpd:1`, busybox httpd, which closes every connection after one
//!   answer): the service's image, serving HTTP on port 80. `run-activator.sh` also runs it with
//!   `coyote-bench/caddy:1` (Debian's caddy, which keeps connections open, as most web servers do);
//! - `BENCH_DRAIN_SECS` (75): before each measured `wrk` run, wait up to this long for the
//!   container's sockets in `TIME_WAIT` to expire (0: do not wait). The two sides reach the container
//!   from the same address (the host's bridge address; the activator side is masqueraded from
//!   127.0.0.1) but with TCP timestamps from two different clocks, so one side's new connection that
//!   reuses a port the other side left in `TIME_WAIT` in the container is refused by the PAWS check
//!   and waits a second for its SYN to be sent again. Without the wait, whichever side runs second
//!   pays for the first one; with it, each side is measured as it runs alone;
//! - `BENCH_FORWARD` (`kernel`): the node's `--forward` mode. In kernel mode the "activator" side
//!   connects to the same published port, `127.0.0.1:PORT`, which nftables forwards to the container
//!   (the `output` hook); the bench checks that it did: the node's stats must show kernel forwarding
//!   on, and the activator's splice counter must not move during the warm runs.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use coyote_tests::cpu::{of_cmdline as cpu_of_cmdline, of_machine as cpu_machine, of_process as cpu_of_stat};
use coyote_tests::{api_call, docker, free_port, test_images, wait_until, DockerGuard, Node};
use serde_json::Value;

const DOCKER_SOCKET: &str = "/var/run/docker.sock";
const SERVICE: &str = "bench-httpd";
const IMAGE: &str = "coyote-test/httpd:1";

struct Config {
    cold_runs: usize,
    secs: u64,
    warmup_secs: u64,
    rounds: usize,
    drain_secs: u64,
    connections: usize,
    threads: usize,
    image: String,
    forward: String,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| anyhow!("{name}={v:?} is not valid")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Self> {
        let cfg = Config {
            cold_runs: env_or("BENCH_COLD_RUNS", 20)?,
            secs: env_or("BENCH_SECS", 10)?,
            warmup_secs: env_or("BENCH_WARMUP_SECS", 2)?,
            rounds: env_or("BENCH_ROUNDS", 2)?,
            drain_secs: env_or("BENCH_DRAIN_SECS", 75)?,
            connections: env_or("BENCH_CONNECTIONS", 8)?,
            threads: env_or("BENCH_THREADS", 2)?,
            image: std::env::var("BENCH_IMAGE").unwrap_or_else(|_| IMAGE.to_string()),
            forward: std::env::var("BENCH_FORWARD").unwrap_or_else(|_| "kernel".to_string()),
        };
        if !["kernel", "userspace"].contains(&cfg.forward.as_str()) {
            bail!("BENCH_FORWARD={:?}: kernel or userspace", cfg.forward);
        }
        if cfg.cold_runs == 0 || cfg.secs == 0 || cfg.rounds == 0 || cfg.connections == 0 || cfg.threads == 0
        {
            bail!(
                "BENCH_COLD_RUNS, BENCH_SECS, BENCH_ROUNDS, BENCH_CONNECTIONS and BENCH_THREADS must be > 0"
            );
        }
        Ok(cfg)
    }
}

// ---------------------------------------------------------------------------------------------------
// The Docker Engine API, called directly (no CLI process in the measured path): one request per
// connection, as small as it gets.

fn docker_api(method: &str, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut s =
        UnixStream::connect(DOCKER_SOCKET).with_context(|| format!("connecting to {DOCKER_SOCKET}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no HTTP answer"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let code =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("bad status"))?;
    let mut body = raw[head_end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((code, body))
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..eol]).trim(), 16).unwrap_or(0);
        body = &body[eol + 2..];
        if size == 0 || body.len() < size {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
    out
}

fn docker_start(id: &str) -> Result<()> {
    match docker_api("POST", &format!("/containers/{id}/start"))? {
        (204 | 304, _) => Ok(()),
        (code, body) => bail!("docker start: HTTP {code}: {}", String::from_utf8_lossy(&body)),
    }
}

fn docker_stop(id: &str) -> Result<()> {
    match docker_api("POST", &format!("/containers/{id}/stop?t=10"))? {
        (204 | 304, _) => Ok(()),
        (code, body) => bail!("docker stop: HTTP {code}: {}", String::from_utf8_lossy(&body)),
    }
}

/// The container's address on the coyote network, if it has one (it runs).
fn docker_address(id: &str) -> Result<Option<IpAddr>> {
    let (code, body) = docker_api("GET", &format!("/containers/{id}/json"))?;
    if code != 200 {
        bail!("docker inspect: HTTP {code}");
    }
    let v: Value = serde_json::from_slice(&body)?;
    let ip = v["NetworkSettings"]["Networks"]["coyote"]["IPAddress"].as_str().unwrap_or("");
    Ok(ip.parse().ok())
}

fn docker_running(id: &str) -> Result<bool> {
    let (_, body) = docker_api("GET", &format!("/containers/{id}/json"))?;
    let v: Value = serde_json::from_slice(&body)?;
    Ok(v["State"]["Running"] == true)
}

// ---------------------------------------------------------------------------------------------------

/// One HTTP/1.0 GET on an open connection; the whole answer must be a 200.
fn get_on(mut s: TcpStream) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    if !out.starts_with(b"HTTP/1.") || !out.windows(5).any(|w| w == b" 200 ") {
        bail!("unexpected answer: {}", String::from_utf8_lossy(&out[..out.len().min(200)]));
    }
    Ok(())
}

/// A bare cold start: `docker start` through the API, the address, then connect every millisecond
/// until the port accepts, then the first request on that connection. Returns (until the port
/// accepted, until the answer was read).
fn bare_cold_start(id: &str) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    docker_start(id)?;
    let ip = loop {
        if let Some(ip) = docker_address(id)? {
            break ip;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the container got no address");
        }
    };
    let conn = loop {
        match TcpStream::connect_timeout(&SocketAddr::new(ip, 80), Duration::from_millis(200)) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => bail!("the container's port never accepted: {e}"),
        }
    };
    let port_ready = t0.elapsed();
    get_on(conn)?;
    Ok((port_ready, t0.elapsed()))
}

/// A cold start through the activator: connect to the published port, request, read the answer.
fn activator_cold_start(port: u16) -> Result<Duration> {
    let t0 = Instant::now();
    let conn = TcpStream::connect(("127.0.0.1", port))?;
    get_on(conn)?;
    Ok(t0.elapsed())
}

/// The service's entry in the node's stats.
fn own_stats(node: &Node) -> Result<Value> {
    let (code, stats) = api_call(&node.dir.join("coyote.sock"), "GET", "/v1/stats", "")?;
    if code != 200 {
        bail!("stats: HTTP {code}: {stats}");
    }
    stats
        .as_array()
        .and_then(|a| a.iter().find(|s| s["service"] == SERVICE))
        .cloned()
        .ok_or_else(|| anyhow!("no stats for {SERVICE}"))
}

fn activator_running(node: &Node) -> Result<bool> {
    let (code, stats) = api_call(&node.dir.join("coyote.sock"), "GET", "/v1/stats", "")?;
    if code != 200 {
        bail!("stats: HTTP {code}: {stats}");
    }
    let s = stats.as_array().and_then(|a| a.iter().find(|s| s["service"] == SERVICE)).cloned();
    Ok(s.is_some_and(|s| s["running"] == true))
}

/// Waits until the container is stopped and the activator knows it (its idle stop).
fn wait_activator_stopped(node: &Node, id: &str) -> Result<()> {
    wait_until("the activator's idle stop", Duration::from_secs(60), || {
        Ok((!activator_running(node)? && !docker_running(id)?).then_some(()))
    })
}

// ---------------------------------------------------------------------------------------------------
// CPU accounting, to report the load that is not ours.

fn cpu_of_engine() -> f64 {
    const ENGINE: [&str; 6] =
        ["dockerd", "containerd", "containerd-shim", "runc", "docker-proxy", "fuse-overlayfs"];
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0.0 };
    procs
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            std::fs::read_to_string(p.path().join("comm"))
                .is_ok_and(|c| ENGINE.iter().any(|e| c.trim().starts_with(e)))
        })
        .map(|p| cpu_of_stat(&p.path().join("stat")))
        .sum()
}

/// `TcpExt: ListenOverflows` of the network namespace `netstat` belongs to (`/proc/net/netstat`, or
/// `/proc/PID/net/netstat` for a container's): SYNs dropped because a listen queue was full, each one
/// a client retransmitting after a second.
fn listen_overflows(netstat: &Path) -> Option<u64> {
    tcp_ext(netstat, "ListenOverflows")
}

/// A `TcpExt` counter from a `netstat` file of `/proc`.
fn tcp_ext(netstat: &Path, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(netstat).ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Sockets in TIME_WAIT in the network namespace of `pid` (this process's own when `None`).
fn time_wait(pid: Option<u32>) -> Option<usize> {
    let base = match pid {
        Some(p) => format!("/proc/{p}/net"),
        None => "/proc/net".to_string(),
    };
    let mut n = 0;
    for file in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("{base}/{file}")) else { continue };
        // The fourth column is the state; 06 is TIME_WAIT.
        n += text.lines().skip(1).filter(|l| l.split_whitespace().nth(3) == Some("06")).count();
    }
    Some(n)
}

/// Waits (up to `BENCH_DRAIN_SECS`) until the container has no more than a few sockets in
/// `TIME_WAIT` left, and says how long that took (see `BENCH_DRAIN_SECS` at the top).
fn drain_time_wait(cfg: &Config, container: &str) {
    if cfg.drain_secs == 0 {
        return;
    }
    let start = Instant::now();
    let pid = container_pid(container);
    let first = time_wait(pid);
    let mut left = first;
    while left.is_some_and(|n| n > 16) && start.elapsed() < Duration::from_secs(cfg.drain_secs) {
        std::thread::sleep(Duration::from_millis(500));
        left = time_wait(pid);
    }
    if first.is_some_and(|n| n > 16) {
        eprintln!(
            "      waited {:.0} s for the container's TIME_WAIT sockets to expire: {} -> {}",
            start.elapsed().as_secs_f64(),
            opt(first.map(|n| n as u64)),
            opt(left.map(|n| n as u64))
        );
    }
}

/// The host's connection-tracking table: entries now, and the sums over all CPUs of the counters of
/// failed inserts, drops and early drops (`/proc/net/stat/nf_conntrack`, hexadecimal columns).
fn conntrack() -> (Option<u64>, Option<u64>) {
    let count = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let failures = (|| {
        let text = std::fs::read_to_string("/proc/net/stat/nf_conntrack").ok()?;
        let mut lines = text.lines();
        let names: Vec<&str> = lines.next()?.split_whitespace().collect();
        let columns: Vec<usize> = ["insert_failed", "drop", "early_drop"]
            .iter()
            .filter_map(|c| names.iter().position(|n| n == c))
            .collect();
        let mut sum = 0;
        for line in lines {
            let values: Vec<&str> = line.split_whitespace().collect();
            for &c in &columns {
                sum += u64::from_str_radix(values.get(c)?, 16).ok()?;
            }
        }
        Some(sum)
    })();
    (count, failures)
}

fn container_pid(id: &str) -> Option<u32> {
    let (_, body) = docker_api("GET", &format!("/containers/{id}/json")).ok()?;
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["State"]["Pid"].as_u64().filter(|p| *p > 0).map(|p| p as u32)
}

/// CPU seconds of the container's cgroup (cgroup v1 with the cgroupfs driver, or v2), if found.
fn cpu_of_container(id: &str) -> Option<f64> {
    let v1 = format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage");
    if let Ok(ns) = std::fs::read_to_string(&v1) {
        return ns.trim().parse::<f64>().ok().map(|ns| ns / 1e9);
    }
    for v2 in [
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat"),
        format!("/sys/fs/cgroup/docker/{id}/cpu.stat"),
    ] {
        if let Ok(text) = std::fs::read_to_string(&v2) {
            let usec = text.lines().find_map(|l| l.strip_prefix("usage_usec "))?;
            return usec.trim().parse::<f64>().ok().map(|us| us / 1e6);
        }
    }
    None
}

/// CPU seconds of this process's waited-for children (wrk).
fn cpu_children() -> f64 {
    // SAFETY: getrusage writes into the struct we pass; no other preconditions.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

// ---------------------------------------------------------------------------------------------------
// wrk.

#[derive(Clone, Debug, Default)]
struct WrkRun {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Socket errors and non-2xx answers.
    errors: u64,
    /// Cores used during the run: coyote, the container, wrk, and everything else.
    coyote_cores: f64,
    container_cores: Option<f64>,
    wrk_cores: f64,
    other_cores: f64,
    /// SYNs dropped on full listen queues during the run: on the host (the activator's port), in the
    /// container (busybox httpd listens with a backlog of 9).
    overflows_host: Option<u64>,
    overflows_container: Option<u64>,
    /// SYNs the host retransmitted during the run (a client SYN dropped somewhere on its way: each
    /// costs the connection a second).
    syn_retrans_host: Option<u64>,
    /// Before the run: sockets in TIME_WAIT on the host (the client side) and in the container, and
    /// the host's connection-tracking entries; during it: failed conntrack inserts and drops.
    time_wait_host: Option<usize>,
    time_wait_container: Option<usize>,
    conntrack_entries: Option<u64>,
    conntrack_failures: Option<u64>,
}

fn parse_ms(text: &str) -> Option<f64> {
    let t = text.trim();
    if let Some(v) = t.strip_suffix("us") {
        return v.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    if let Some(v) = t.strip_suffix("ms") {
        return v.parse().ok();
    }
    if let Some(v) = t.strip_suffix('m') {
        return v.parse::<f64>().ok().map(|v| v * 60_000.0);
    }
    t.strip_suffix('s').and_then(|v| v.parse::<f64>().ok()).map(|v| v * 1000.0)
}

fn parse_wrk(out: &str) -> Result<WrkRun> {
    let mut run = WrkRun::default();
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            run.requests_per_sec = v.trim().parse()?;
        } else if let Some(v) = l.strip_prefix("50%") {
            run.p50_ms = parse_ms(v).ok_or_else(|| anyhow!("wrk p50 {v:?}"))?;
        } else if let Some(v) = l.strip_prefix("99%") {
            run.p99_ms = parse_ms(v).ok_or_else(|| anyhow!("wrk p99 {v:?}"))?;
        } else if l.contains("requests in") {
            run.requests = l.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            run.errors +=
                v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        }
    }
    if run.requests_per_sec == 0.0 {
        bail!("wrk reported no throughput:\n{out}");
    }
    Ok(run)
}

fn wrk(cfg: &Config, url: &str, secs: u64, node_dir: &Path, container: &str) -> Result<WrkRun> {
    let pid_netstat = container_pid(container).map(|p| PathBuf::from(format!("/proc/{p}/net/netstat")));
    let host_netstat = Path::new("/proc/net/netstat");
    let (o_host0, o_cont0) =
        (listen_overflows(host_netstat), pid_netstat.as_deref().and_then(listen_overflows));
    let syn0 = tcp_ext(host_netstat, "TCPSynRetrans");
    let (time_wait_host, time_wait_container) = (time_wait(None), time_wait(container_pid(container)));
    let (conntrack_entries, ct_failures0) = conntrack();
    let (m0, n0, c0, w0, e0) = (
        cpu_machine(),
        cpu_of_cmdline(node_dir),
        cpu_of_container(container),
        cpu_children(),
        cpu_of_engine(),
    );
    let out = Command::new("wrk")
        .args(["-t", &cfg.threads.to_string(), "-c", &cfg.connections.to_string()])
        .args(["-d", &format!("{secs}s"), "--latency", url])
        .output()
        .context("running wrk (install it: apt-get install wrk)")?;
    let (m, n, c, w, e) = (
        cpu_machine() - m0,
        cpu_of_cmdline(node_dir) - n0,
        cpu_of_container(container),
        cpu_children() - w0,
        cpu_of_engine() - e0,
    );
    let overflows_host = listen_overflows(host_netstat).zip(o_host0).map(|(a, b)| a - b);
    let overflows_container =
        pid_netstat.as_deref().and_then(listen_overflows).zip(o_cont0).map(|(a, b)| a - b);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {}{text}", String::from_utf8_lossy(&out.stderr));
    }
    let mut run = parse_wrk(&text)?;
    let container_secs = c.zip(c0).map(|(c, c0)| c - c0);
    let s = secs as f64;
    run.coyote_cores = n / s;
    run.container_cores = container_secs.map(|c| c / s);
    run.wrk_cores = w / s;
    run.other_cores = ((m - n - w - e - container_secs.unwrap_or(0.0)) / s).max(0.0);
    run.overflows_host = overflows_host;
    run.overflows_container = overflows_container;
    run.syn_retrans_host = tcp_ext(host_netstat, "TCPSynRetrans").zip(syn0).map(|(a, b)| a - b);
    run.time_wait_host = time_wait_host;
    run.time_wait_container = time_wait_container;
    run.conntrack_entries = conntrack_entries;
    run.conntrack_failures = conntrack().1.zip(ct_failures0).map(|(a, b)| a - b);
    Ok(run)
}

// ---------------------------------------------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Cores the machine is busy with while this bench runs nothing: the other load.
fn idle_load(during: Duration) -> f64 {
    let m0 = cpu_machine();
    std::thread::sleep(during);
    (cpu_machine() - m0) / during.as_secs_f64()
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not on the PATH: run tests/benches/run-activator.sh, which installs it");
    }
    test_images()?;
    let tmp = tempfile::Builder::new().prefix("coyote-bench-activator-").tempdir()?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    eprintln!(
        "activator_vs_direct: {cores} cores, image {}, --forward {}, {} cold starts a side, wrk -t{} -c{} {} s x {} rounds a side; data in {}",
        cfg.image,
        cfg.forward,
        cfg.cold_runs,
        cfg.threads,
        cfg.connections,
        cfg.secs,
        cfg.rounds,
        tmp.path().display()
    );
    let other_before = idle_load(Duration::from_secs(3));
    let mut guard = DockerGuard::default();
    // Warm phase first, with an idle time that never fires during it.
    let mut node = Node::new(tmp.path(), "n1");
    node.containers = true;
    node.flags = vec!["--idle-stop".into(), "1h".into(), "--forward".into(), cfg.forward.clone()];
    node.up()?;
    let cluster = node.cluster_id()?;
    guard.cluster_ids.push(cluster.clone());
    let port = free_port();
    node.cli_json(&[
        "service",
        "create",
        SERVICE,
        "--image",
        &cfg.image,
        "--port",
        &format!("{port}:80"),
        "--on-demand",
    ])?;
    let filter = format!("label=coyote.cluster={cluster}");
    let id = wait_until("the container to be created", Duration::from_secs(60), || {
        let ids = docker(&["ps", "-aq", "--no-trunc", "--filter", &filter])?;
        Ok(ids.split_whitespace().next().map(String::from))
    })?;
    wait_until("the activator to listen", Duration::from_secs(30), || {
        let (code, stats) = api_call(&node.dir.join("coyote.sock"), "GET", "/v1/stats", "")?;
        Ok((code == 200 && stats.as_array().is_some_and(|a| a.iter().any(|s| s["service"] == SERVICE)))
            .then_some(()))
    })?;

    // Warm throughput: the container started once through the activator, then alternate runs.
    let via = format!("http://127.0.0.1:{port}/");
    activator_cold_start(port)?;
    let ip = docker_address(&id)?.ok_or_else(|| anyhow!("the running container has no address"))?;
    let direct = format!("http://{ip}:80/");
    if cfg.forward == "kernel" {
        wait_until("kernel forwarding", Duration::from_secs(10), || {
            Ok((own_stats(&node)?["kernel_forwarding"] == true).then_some(()))
        })?;
    }
    if cfg.warmup_secs > 0 {
        wrk(&cfg, &via, cfg.warmup_secs, &node.dir, &id)?;
    }
    let before = own_stats(&node)?;
    let (mut warm_direct, mut warm_activator) = (Vec::new(), Vec::new());
    for round in 0..cfg.rounds {
        for (side, url, runs) in
            [("direct", &direct, &mut warm_direct), ("activator", &via, &mut warm_activator)]
        {
            drain_time_wait(&cfg, &id);
            let r = wrk(&cfg, url, cfg.secs, &node.dir, &id)?;
            eprintln!(
                "warm {side:>9} round {}: {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {} errors; cores: coyote {:.2}, container {}, wrk {:.2}, other {:.2}; listen overflows host {}, container {}",
                round + 1,
                r.requests_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.errors,
                r.coyote_cores,
                r.container_cores.map(|c| format!("{c:.2}")).unwrap_or_else(|| "?".into()),
                r.wrk_cores,
                r.other_cores,
                opt(r.overflows_host),
                opt(r.overflows_container)
            );
            eprintln!(
                "      {side:>9} round {}: SYN retransmits on the host {}; before the run TIME_WAIT host {}, container {}, conntrack entries {}; conntrack insert failures and drops {}",
                round + 1,
                opt(r.syn_retrans_host),
                r.time_wait_host.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                r.time_wait_container.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                opt(r.conntrack_entries),
                opt(r.conntrack_failures)
            );
            runs.push(r);
        }
    }

    // Which path the "activator" side took: the splice, or the kernel.
    let after = own_stats(&node)?;
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let spliced = count(&after, "spliced_connections") - count(&before, "spliced_connections");
    let total = count(&after, "connections") - count(&before, "connections");
    let path = format!(
        "warm path: --forward {}; during the measured runs {total} connections to the published port, {spliced} of them \
         spliced by the activator (kernel forwarding on: {})",
        cfg.forward, after["kernel_forwarding"]
    );
    eprintln!("{path}");
    if cfg.forward == "kernel" && (spliced > 0 || after["kernel_forwarding"] != true) {
        bail!("kernel mode, but the warm runs did not all go through the kernel's forwarding: {path}");
    }

    // Cold starts: the same node with a 1 s idle time, so that the activator itself stops the
    // container between its cold starts.
    node.kill9();
    node.flags = vec!["--idle-stop".into(), "1s".into(), "--forward".into(), cfg.forward.clone()];
    node.restart()?;
    wait_until("the activator to listen again", Duration::from_secs(30), || {
        Ok(TcpStream::connect(("127.0.0.1", port)).ok().map(drop))
    })?;
    // That connection went through, and the activator adopted the running container: let it stop.
    wait_activator_stopped(&node, &id)?;
    let (mut bare_port, mut bare_answer, mut via_answer) = (Vec::new(), Vec::new(), Vec::new());
    let (m0, n0) = (cpu_machine(), cpu_of_cmdline(&node.dir));
    let cold_started = Instant::now();
    for i in 0..cfg.cold_runs {
        // Bare: the activator believes the container is stopped and leaves it alone.
        let (p, a) = bare_cold_start(&id)?;
        docker_stop(&id)?;
        let v = activator_cold_start(port)?;
        eprintln!(
            "cold {:>3}: bare start+port {:>7.1} ms, +answer {:>7.1} ms; activator {:>7.1} ms",
            i + 1,
            ms(p),
            ms(a),
            ms(v)
        );
        bare_port.push(ms(p));
        bare_answer.push(ms(a));
        via_answer.push(ms(v));
        wait_activator_stopped(&node, &id)?;
    }
    let cold_secs = cold_started.elapsed().as_secs_f64().max(1e-3);
    let coyote_secs = cpu_of_cmdline(&node.dir) - n0;
    let machine_secs = cpu_machine() - m0;
    let (code, stats) = api_call(&node.dir.join("coyote.sock"), "GET", "/v1/stats", "")?;
    let own = if code == 200 {
        stats
            .as_array()
            .and_then(|a| a.iter().find(|s| s["service"] == SERVICE))
            .cloned()
            .unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    // A graceful stop: the node removes its nftables table.
    node.terminate(Duration::from_secs(10));
    guard.clean();
    let other_after = idle_load(Duration::from_secs(3));

    let paired = sorted(via_answer.iter().zip(&bare_answer).map(|(v, b)| v - b).collect());
    let (bare_port, bare_answer, via_answer) = (sorted(bare_port), sorted(bare_answer), sorted(via_answer));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<40} {:>12} {:>12} {:>14}",
        "metric", "bare/direct", "activator", "activator/bare"
    );
    let row = |out: &mut String, label: &str, bare: f64, via: f64| {
        let _ = writeln!(out, "{label:<40} {bare:>12.2} {via:>12.2} {:>13.2}x", via / bare);
    };
    for (label, p) in [("p50", 50.0), ("p90", 90.0), ("max", 100.0)] {
        row(
            &mut out,
            &format!("cold start to first answer, {label} ms"),
            percentile(&bare_answer, p),
            percentile(&via_answer, p),
        );
    }
    let _ = writeln!(
        out,
        "{:<40} {:>12.2} {:>12}",
        "cold: bare start until the port, p50 ms",
        percentile(&bare_port, 50.0),
        "-"
    );
    let overhead = percentile(&via_answer, 50.0) - percentile(&bare_answer, 50.0);
    // Each activator start follows a bare one: the median of the pairs' differences is less exposed
    // to the load drifting over the run than the difference of the medians.
    let _ = writeln!(
        out,
        "{:<40} {:>12} {:>12.2}",
        "cold: activator - bare, median of pairs ms",
        "-",
        percentile(&paired, 50.0)
    );
    let _ = writeln!(
        out,
        "cold: activator's own measure (start to port ready): p50 {} ms, p99 {} ms; during the cold starts the \
         machine was busy {:.2} cores (coyote {:.2}; the rest is Docker starting and stopping, and other load)",
        own["cold_start_ms_p50"],
        own["cold_start_ms_p99"],
        machine_secs / cold_secs,
        coyote_secs / cold_secs
    );
    let _ = writeln!(
        out,
        "other load while this bench ran nothing (3 s samples): {other_before:.2} cores before, {other_after:.2} after"
    );
    let mean = |runs: &[WrkRun], f: fn(&WrkRun) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    row(
        &mut out,
        "warm req/s (mean of rounds)",
        mean(&warm_direct, |r| r.requests_per_sec),
        mean(&warm_activator, |r| r.requests_per_sec),
    );
    row(
        &mut out,
        "warm p50 ms (mean of rounds)",
        mean(&warm_direct, |r| r.p50_ms),
        mean(&warm_activator, |r| r.p50_ms),
    );
    row(
        &mut out,
        "warm p99 ms (mean of rounds)",
        mean(&warm_direct, |r| r.p99_ms),
        mean(&warm_activator, |r| r.p99_ms),
    );
    let errors: u64 = warm_direct.iter().chain(&warm_activator).map(|r| r.errors).sum();
    let other = warm_direct.iter().chain(&warm_activator).map(|r| r.other_cores).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "sanity: {errors} wrk errors; other processes used up to {other:.2} cores during the wrk runs"
    );
    let _ = writeln!(out, "{path}");
    let per_req = |runs: &[WrkRun], f: fn(&WrkRun) -> f64| {
        runs.iter().map(|r| f(r) / r.requests_per_sec * 1e6).sum::<f64>() / runs.len() as f64
    };
    let _ = writeln!(
        out,
        "warm CPU per request: the container {:.0} us direct and {:.0} us through the activator; coyote {:.0} us",
        per_req(&warm_direct, |r| r.container_cores.unwrap_or(f64::NAN)),
        per_req(&warm_activator, |r| r.container_cores.unwrap_or(f64::NAN)),
        per_req(&warm_activator, |r| r.coyote_cores)
    );
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let _ = writeln!(
        out,
        "goal: cold-start overhead at p50 <= 20 ms: {} ({overhead:+.1} ms)",
        verdict(overhead <= 20.0)
    );
    let ratio = mean(&warm_activator, |r| r.requests_per_sec) / mean(&warm_direct, |r| r.requests_per_sec);
    let _ = writeln!(out, "goal: warm throughput >= 0.9x direct: {} ({ratio:.2}x)", verdict(ratio >= 0.9));
    println!("{out}");
    if errors > 0 {
        bail!("{errors} requests failed under wrk: the figures above are not valid");
    }
    Ok(())
}
