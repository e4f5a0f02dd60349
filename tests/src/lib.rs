//! Helpers for driving real `coyote` processes: start, join, kill -9, restart, and call the CLI.

pub mod cpu;
pub mod web;
pub mod webdriver;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Raft timings that make elections quick on loopback.
pub const FAST_RAFT: &[&str] =
    &["--heartbeat-ms", "100", "--election-min-ms", "500", "--election-max-ms", "1000"];

/// The `coyote` binary: `$COYOTE_BIN`, else the one next to this test in the target directory,
/// built on first use.
pub fn coyote_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("COYOTE_BIN") {
            return PathBuf::from(b);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
        let bin = profile_dir.join("coyote");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "-p", "coyote-nodes", "--bin", "coyote"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building coyote failed");
        bin
    })
}

pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port that is free on `ip` right now (another process may take it before it is used).
pub fn free_port_on(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last error: {last_err:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One coyote node: a data directory, an address, and maybe a running process.
pub struct Node {
    pub dir: PathBuf,
    pub addr: String,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
    /// Extra flags for every start of the node (Raft settings).
    pub flags: Vec<String>,
    /// Let the node manage Docker containers. Off by default (`--no-reconcile`), so that tests about
    /// the log never touch the machine's Docker Engine; see [`DockerGuard`] for tests that do.
    pub containers: bool,
    /// Where the node's proxy listens (HTTP, HTTPS). `None` by default (`--no-proxy`): nodes of one
    /// test share the machine, and the default ports are the machine's.
    pub front: Option<(String, String)>,
    /// Where the node serves its CRM. `None` by default (`--no-crm`), for the same reason.
    pub crm: Option<String>,
}

impl Node {
    pub fn new(root: &Path, name: &str) -> Self {
        Self::on_ip(root, name, "127.0.0.1")
    }

    /// A node listening on another loopback address (127.0.0.2, ...), so that each node can have a
    /// host of its own for the services it masters.
    pub fn on_ip(root: &Path, name: &str, ip: &str) -> Self {
        Node {
            dir: root.join(name),
            addr: format!("{ip}:{}", free_port_on(ip)),
            child: None,
            log: root.join(format!("{name}.log")),
            starts: 0,
            flags: Vec::new(),
            containers: false,
            front: None,
            crm: None,
        }
    }

    fn spawn(&mut self, args: &[&str]) -> Result<()> {
        self.starts += 1;
        let front: Vec<String> = match &self.front {
            Some((http, https)) => vec!["--http".into(), http.clone(), "--https".into(), https.clone()],
            None => vec!["--no-proxy".into()],
        };
        let crm: Vec<String> = match &self.crm {
            Some(addr) => vec!["--crm".into(), addr.clone()],
            None => vec!["--no-crm".into()],
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(coyote_bin())
            .args(args)
            .args(FAST_RAFT)
            .args(&self.flags)
            .args(if self.containers { &[][..] } else { &["--no-reconcile"][..] })
            .args(&front)
            .args(&crm)
            .env("RUST_LOG", node_log_filter())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting coyote")?;
        self.child = Some(child);
        Ok(())
    }

    /// `coyote up`: creates a cluster if the directory is empty.
    pub fn up(&mut self) -> Result<()> {
        let dir = self.dir.display().to_string();
        let addr = self.addr.clone();
        self.spawn(&["up", "--data", &dir, "--listen", &addr])?;
        self.wait_ready()
    }

    pub fn join(&mut self, token: &str) -> Result<()> {
        let dir = self.dir.display().to_string();
        let addr = self.addr.clone();
        self.spawn(&["join", token, "--data", &dir, "--listen", &addr])?;
        self.wait_ready()
    }

    /// Runs `coyote join` that is expected to fail; returns its stderr. Errs if it keeps running.
    pub fn join_expect_failure(&self, token: &str) -> Result<String> {
        let mut child = Command::new(coyote_bin())
            .args(["join", token, "--data"])
            .arg(&self.dir)
            .args(["--listen", &self.addr])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("coyote join kept running: it was expected to be refused");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        if out.status.success() {
            bail!("coyote join exited 0: it was expected to be refused");
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `coyote node` on an existing directory, without waiting for it to be ready (for a node that
    /// is expected to stop by itself).
    pub fn start(&mut self) -> Result<()> {
        let dir = self.dir.display().to_string();
        self.spawn(&["node", "--data", &dir])
    }

    /// This node's id, from its data directory.
    pub fn id(&self) -> Result<u64> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("node.json"))?)?;
        v["node_id"].as_u64().ok_or_else(|| anyhow!("{} names no node id", self.dir.display()))
    }

    /// `coyote node` on an existing directory.
    pub fn restart(&mut self) -> Result<()> {
        let dir = self.dir.display().to_string();
        self.spawn(&["node", "--data", &dir])?;
        self.wait_ready()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// The process id of the running node.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM, then SIGKILL if the node has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until the running process exits by itself, and returns how it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().ok_or_else(|| anyhow!("the node is not running"))?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the node still runs after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the node answers `status` and knows a leader.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("coyote exited with {status}; log:\n{}", self.log_text());
                }
            }
            if let Ok(s) = self.status() {
                if !s["leader"].is_null() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("node in {} not ready after 30 s; log:\n{}", self.dir.display(), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `coyote --data DIR ARGS...` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(coyote_bin())
            .arg("--data")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("running the coyote CLI")
    }

    /// Runs a CLI command with `--json` that must succeed, and parses its single JSON object.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        if !out.status.success() {
            bail!("coyote {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("output of {args:?} is not JSON"))
    }

    /// Runs a CLI command with `--json` that prints one object per line.
    pub fn cli_json_lines(&self, args: &[&str]) -> Result<Vec<Value>> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        if !out.status.success() {
            bail!("coyote {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("line {l:?} is not JSON")))
            .collect()
    }

    pub fn status(&self) -> Result<Value> {
        self.cli_json(&["status"])
    }

    pub fn events(&self) -> Result<Vec<Value>> {
        self.cli_json_lines(&["events", "tail"])
    }

    pub fn token(&self, extra: &[&str]) -> Result<String> {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        let v = self.cli_json(&args)?;
        v["token"].as_str().map(String::from).ok_or_else(|| anyhow!("no token in {v}"))
    }

    /// The cluster id in the node's `node.json`.
    pub fn cluster_id(&self) -> Result<String> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("node.json"))?)?;
        v["cluster_id"].as_str().map(String::from).ok_or_else(|| anyhow!("no cluster id in node.json"))
    }

    /// The node id in the node's `node.json`.
    pub fn node_id(&self) -> Result<u64> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("node.json"))?)?;
        v["node_id"].as_u64().ok_or_else(|| anyhow!("no node id in node.json"))
    }

    /// Runs a CLI command that must fail; returns its stderr.
    pub fn cli_err(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args);
        if out.status.success() {
            bail!("coyote {args:?} succeeded: it was expected to fail");
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// One request to the node's API socket without the CLI (for tight write loops).
    pub fn api(&self, method: &str, path: &str, body: &str) -> Result<(u16, Value)> {
        api_call(&self.dir.join("coyote.sock"), method, path, body)
    }

    /// A GET of `path` on the node's API socket: the whole HTTP answer, as text (for `/metrics`).
    pub fn api_text(&self, path: &str) -> Result<String> {
        let mut s = UnixStream::connect(self.dir.join("coyote.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: coyote\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The passes this node's reconciler has completed: `passes` in `coyote plan`, or, when the plan
    /// cannot be made (Docker is down), `coyote_reconciler_passes_total` in `/metrics`.
    pub fn reconciler_passes(&self) -> Result<u64> {
        if let Ok(plan) = self.cli_json(&["plan"]) {
            return plan["passes"].as_u64().ok_or_else(|| anyhow!("no passes in {plan}"));
        }
        let metrics = self.api_text("/metrics")?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("coyote_reconciler_passes_total "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow!("no coyote_reconciler_passes_total in {metrics}"))
    }

    /// Waits until this node's reconciler has looked at everything as it is now: until it has
    /// completed 2 passes past this call (the first may have begun before it; the second began
    /// after). Whatever it would do about the present, it has done by then, so a test can assert
    /// that it did nothing. Every applied event wakes the reconciler, so each try also creates a join
    /// token (an event that touches no container): a few tenths of a second, not two resync periods.
    pub fn wait_two_reconciler_passes(&self) -> Result<()> {
        let target = self.reconciler_passes()? + 2;
        wait_until("2 passes of the reconciler", Duration::from_secs(60), || {
            if self.reconciler_passes()? >= target {
                return Ok(Some(()));
            }
            self.token(&[])?;
            Ok(None)
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.containers {
            // A node that manages containers removes its kernel forwarding (nftables) when it
            // stops: let it, so that no rule of a finished test outlives it.
            self.terminate(Duration::from_secs(10));
        } else {
            self.kill9();
        }
    }
}

/// HTTP/1.1 over the unix socket, `Connection: close`, JSON answer.
pub fn api_call(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, Value)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: coyote\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP response"))?;
    let code: u16 =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("bad status"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, serde_json::from_str(&body).with_context(|| format!("body {body:?}"))?))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A cluster of `n` nodes formed with join tokens; node 0 created it.
pub fn cluster(root: &Path, n: usize) -> Result<Vec<Node>> {
    cluster_with(root, n, |_| {})
}

/// [`cluster`], with `configure` applied to each node before it starts.
pub fn cluster_with(root: &Path, n: usize, configure: impl Fn(&mut Node)) -> Result<Vec<Node>> {
    let mut nodes = vec![Node::new(root, "n1")];
    configure(&mut nodes[0]);
    nodes[0].up()?;
    for i in 1..n {
        let token = nodes[0].token(&[])?;
        let mut node = Node::new(root, &format!("n{}", i + 1));
        configure(&mut node);
        node.join(&token)?;
        nodes.push(node);
    }
    wait_until("every node to be a voter", Duration::from_secs(30), || {
        let s = nodes[0].status()?;
        let voters =
            s["members"].as_array().map(|m| m.iter().filter(|m| m["role"] != "learner").count()).unwrap_or(0);
        Ok((voters == n).then_some(()))
    })?;
    Ok(nodes)
}

/// The node that is leader now, as seen by the running nodes.
pub fn leader_index(nodes: &[Node]) -> Result<usize> {
    for node in nodes {
        if let Ok(s) = node.status() {
            if let Some(leader) = s["leader"].as_u64() {
                if let Some(i) = node_index(nodes, leader)? {
                    return Ok(i);
                }
            }
        }
    }
    bail!("no node knows a leader")
}

fn node_index(nodes: &[Node], id: u64) -> Result<Option<usize>> {
    for (i, n) in nodes.iter().enumerate() {
        let text = std::fs::read_to_string(n.dir.join("node.json"))?;
        let v: Value = serde_json::from_str(&text)?;
        if v["node_id"].as_u64() == Some(id) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// `(index, kind, summary, outcome)` of each event: what must agree across nodes.
pub fn event_keys(events: &[Value]) -> Vec<(u64, String, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap_or(0),
                e["kind"].as_str().unwrap_or("").to_string(),
                e["summary"].as_str().unwrap_or("").to_string(),
                e["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Runs the `docker` CLI; its stdout, or an error with its stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output().context("running the docker CLI")?;
    if !out.status.success() {
        bail!("docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the reconciler tests' images once per test process (`scripts/test-images.sh`: idempotent,
/// quick when they are already built).
pub fn test_images() -> Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-images.sh");
            let out = Command::new("bash").arg(&script).output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr)));
            }
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The node id of `node` (see [`Node::node_id`]), for `map`.
pub fn node_id(node: &Node) -> Result<u64> {
    node.node_id()
}

/// Forms a cluster of `nodes`, configured by the caller: the first makes it (its id registered with
/// `guard`, so its containers go when the test ends), the others join it with a token from the first.
pub fn form_cluster(guard: &mut DockerGuard, nodes: Vec<Node>) -> Result<Vec<Node>> {
    let mut formed: Vec<Node> = Vec::with_capacity(nodes.len());
    for mut node in nodes {
        match formed.first() {
            None => {
                node.up()?;
                guard.cluster_ids.push(node.cluster_id()?);
            }
            Some(first) => {
                let token = first.token(&[])?;
                node.join(&token)?;
            }
        }
        formed.push(node);
    }
    Ok(formed)
}

/// Removes, when dropped (even after a failed assertion), every container labelled with one
/// cluster's id, and the image tags a test added. Each test cluster has a random id, so parallel tests
/// and the developer's own containers are never touched. Kill the cluster's nodes first (declare the
/// guard before the nodes, or call [`DockerGuard::clean`]) or their reconcilers recreate what it removes.
#[derive(Default)]
pub struct DockerGuard {
    pub cluster_ids: Vec<String>,
    pub image_tags: Vec<String>,
}

impl DockerGuard {
    pub fn clean(&mut self) {
        for id in &self.cluster_ids {
            let filter = format!("label=coyote.cluster={id}");
            if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = docker(&args);
                }
            }
        }
        for tag in self.image_tags.drain(..) {
            let _ = docker(&["rmi", &tag]);
        }
    }
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        self.clean();
    }
}

/// `GET /` over HTTP/1.0 on 127.0.0.1:`port`; the whole answer (status line, headers, body).
pub fn http_get(port: u16) -> Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The `RUST_LOG` filter of the nodes the tests start: `COYOTE_NODE_LOG` if set (e.g.
/// `info,openraft=warn,coyote_path=debug` for the write path's timestamps), else `info,openraft=warn`.
pub fn node_log_filter() -> String {
    std::env::var("COYOTE_NODE_LOG").unwrap_or_else(|_| "info,openraft=warn".to_string())
}

/// A tmpfs of `size`, unmounted on drop. Mounting needs root: without it, an error says how to
/// leave the tests that need it out.
pub struct SmallDisk {
    pub path: PathBuf,
}

impl SmallDisk {
    /// Mounts it at `root/disk`.
    pub fn mount(root: &Path, size: &str) -> Result<SmallDisk> {
        let path = root.join("disk");
        std::fs::create_dir(&path)?;
        SmallDisk::mount_at(&path, size)
    }

    /// Mounts it at `path`, an existing directory.
    pub fn mount_at(path: &Path, size: &str) -> Result<SmallDisk> {
        const NEEDS_ROOT: &str = "this test needs root; to run the rest of the suite without it: \
                                  cargo nextest run -E 'not (binary(full_disk) or test(/disk_full/))'";
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .with_context(|| format!("cannot run mount (util-linux) to mount a tmpfs ({NEEDS_ROOT})"))?;
        if !out.status.success() {
            bail!(
                "cannot mount a tmpfs at {} ({NEEDS_ROOT}): {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(SmallDisk { path: path.to_path_buf() })
    }

    pub fn free(&self) -> Result<u64> {
        let out = Command::new("df").args(["-B1", "--output=avail"]).arg(&self.path).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).and_then(|l| l.trim().parse().ok()).ok_or_else(|| anyhow!("df printed {text:?}"))
    }

    /// Writes a filler file until at most `leave` bytes are free (0: until the disk is full).
    pub fn fill(&self, leave: u64) -> Result<PathBuf> {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler)?;
        let chunk = vec![0u8; 64 << 10];
        loop {
            let free = self.free()?;
            if free <= leave {
                break;
            }
            let n = (free - leave).min(chunk.len() as u64) as usize;
            if let Err(e) = file.write_all(&chunk[..n]).and_then(|_| file.sync_data()) {
                if leave == 0 {
                    break; // full
                }
                return Err(e).context("filling the disk");
            }
        }
        Ok(filler)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The sequence numbers in a `seq` file: each line must be the next integer from 1 (nothing lost in
/// the middle, nothing torn, no restart from 1); returns the last.
pub fn check_sequence(text: &str, what: &str) -> Result<u64> {
    let mut last = 0;
    for (i, line) in text.lines().enumerate() {
        let n: u64 =
            line.parse().with_context(|| format!("{what}: line {} is {line:?}, not a number", i + 1))?;
        if n != last + 1 {
            bail!("{what}: line {} holds {n} after {last}", i + 1);
        }
        last = n;
    }
    Ok(last)
}
