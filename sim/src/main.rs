//! `coyote-sim --seeds A..B [--nodes 5]`: runs seeds A (inclusive) to B (exclusive), prints a summary,
//! exits non-zero if any seed found a violation. A failing seed's trace goes to a file and its replay
//! command is printed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use coyote_sim::{run_seed, Params, Scenario, SeedReport};

/// Turns transparent huge pages off for this process. Each simulated node opens an in-memory store
/// whose page table is megabytes of zeroed memory of which it touches a few entries; with huge pages
/// (which mimalloc asks for) the kernel clears whole 2 MiB pages at first touch. A failure costs only
/// that time.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// mimalloc: the simulated nodes allocate and free many small buffers (HTTP/2 frames, TLS records,
/// futures, log entries) all the time. Only this binary: `coyote` itself keeps the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a coyote cluster's log")]
struct Args {
    /// Seeds to run: `A..B` (A inclusive, B exclusive) or one seed `A`.
    #[arg(long, default_value = "0..8")]
    seeds: String,
    /// Nodes in the cluster (1 to 9).
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=coyote_sim::params::NODES_MAX as u64))]
    nodes: usize,
    /// Simulated seconds of faults.
    #[arg(long, default_value_t = 15)]
    fault_secs: u64,
    /// Simulated seconds the cluster has to converge after the faults.
    #[arg(long, default_value_t = 30)]
    liveness_secs: u64,
    /// Leave crashes (and restarts) out of the fault schedule.
    #[arg(long)]
    no_crashes: bool,
    /// Simulated milliseconds per turmoil step, 1 to 50 (the Raft heartbeat): messages are delivered
    /// only at step boundaries (timers still fire at their own instants, the hosts' clocks being
    /// paused tokio clocks).
    #[arg(long, default_value_t = coyote_sim::params::DEFAULT_TICK_MS, value_parser = clap::value_parser!(u64).range(1..=50))]
    tick_ms: u64,
    /// Services created after formation (0 to 100).
    /// Every fourth (svc4, svc8, ...) is on demand, started by the activator on its first connection.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100))]
    services: usize,
    /// Run a hand-written scenario (or `all` of them) for each seed instead of the random schedule:
    /// master-cut-off, failover-cut-from-master, leader-crash-mid-switch, old-master-returns,
    /// manual-switch, backup-master-gone, leader-and-one-crash, leader-writes-lost,
    /// isolated-leader-confirms, answers-lost, stale-placement, node-leaves, crashed-node-removed,
    /// removed-node-returns, replacement.
    #[arg(long)]
    scenario: Option<String>,
    /// Switch on a deliberate bug to see the checkers catch it: `keep-conflicting-entries`,
    /// `backup-takes-over`, `failover-ignores-votes`, `stale-leader-confirms`, `placement-moves-master` or
    /// `activator-ignores-fence`, `proxy-ignores-fence`, `skips-restore` (needs `--features planted-bugs`).
    #[arg(long)]
    plant: Option<String>,
    /// Seeds run in parallel, in that many worker processes; default: the number of CPUs.
    #[arg(long)]
    jobs: Option<usize>,
    /// Internal: run as worker K of J (`K/J`) and print a JSON line per seed.
    #[arg(long, hide = true)]
    worker: Option<String>,
    /// Where the traces of failing seeds are written.
    #[arg(long, default_value = "sim-traces")]
    trace_dir: PathBuf,
    /// Print a line per seed, with its trace hash.
    #[arg(long)]
    verbose: bool,
    /// Write the trace of every seed to the trace directory, not only of failing ones.
    #[arg(long)]
    keep_traces: bool,
    /// Print the summary as one JSON object (with every run under `per_run` if `--verbose`)
    /// instead of text. Progress and failures as they happen still go to stderr.
    #[arg(long)]
    json: bool,
}

fn parse_seeds(text: &str) -> Result<std::ops::Range<u64>> {
    let range = match text.split_once("..") {
        Some((a, b)) => {
            let a: u64 = a.trim().parse().with_context(|| format!("seed range start {a:?}"))?;
            let b: u64 = b.trim().parse().with_context(|| format!("seed range end {b:?}"))?;
            a..b
        }
        None => {
            let a: u64 = text.trim().parse().with_context(|| format!("seed {text:?}"))?;
            a..a + 1
        }
    };
    if range.is_empty() {
        bail!("the seed range {text:?} is empty (A..B runs A up to B-1)");
    }
    Ok(range)
}

fn trace_path(dir: &std::path::Path, scenario: Option<&str>, seed: u64) -> PathBuf {
    match scenario {
        Some(name) => dir.join(format!("{name}-seed-{seed}.trace")),
        None => dir.join(format!("seed-{seed}.trace")),
    }
}

fn write_trace(dir: &std::path::Path, scenario: Option<Scenario>, report: &SeedReport) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = trace_path(dir, scenario.map(|s| s.name()), report.seed);
    let mut text = report.trace.join("\n");
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(feature = "planted-bugs")]
fn plant(bug: Option<&str>) -> Result<()> {
    match bug {
        None => Ok(()),
        Some("keep-conflicting-entries") => {
            coyote_log::store::planted::keep_conflicting_entries(true);
            eprintln!("planted bug: followers keep log entries that conflict with the leader's");
            Ok(())
        }
        Some("backup-takes-over") => {
            coyote_nodes::monitor::planted::backup_takes_over_by_itself(true);
            eprintln!("planted bug: a backup whose master is lost takes authority by itself");
            Ok(())
        }
        Some("failover-ignores-votes") => {
            coyote_state_machine::planted::failover_ignores_votes_on(true);
            eprintln!("planted bug: the failover rule does not ask for a majority");
            Ok(())
        }
        Some("stale-leader-confirms") => {
            coyote_log::store::planted::confirm_from_stale_acks(true);
            eprintln!("planted bug: a leader confirms its leadership from quorum acknowledgements older than the question");
            Ok(())
        }
        Some("placement-moves-master") => {
            coyote_state_machine::planted::placement_moves_master_on(true);
            eprintln!("planted bug: a placement may change a service's master without a switch");
            Ok(())
        }
        Some("activator-ignores-fence") => {
            coyote_nodes::activator::planted::ignore_fence(true);
            eprintln!("planted bug: the activator splices connections of services its fence does not let it serve");
            Ok(())
        }
        Some("proxy-ignores-fence") => {
            coyote_nodes::front::planted::ignore_fence(true);
            eprintln!("planted bug: the proxy hands requests to containers of services its fence does not let it serve");
            Ok(())
        }
        Some("skips-restore") => {
            coyote_nodes::backups::planted::skip_restore(true);
            eprintln!("planted bug: a new master records its restore without restoring the service's data");
            Ok(())
        }
        Some(other) => bail!(
            "no planted bug {other:?}; there are keep-conflicting-entries, backup-takes-over, failover-ignores-votes, \
             stale-leader-confirms, placement-moves-master, activator-ignores-fence, proxy-ignores-fence and \
             skips-restore"
        ),
    }
}

#[cfg(not(feature = "planted-bugs"))]
fn plant(bug: Option<&str>) -> Result<()> {
    match bug {
        None => Ok(()),
        Some(_) => bail!("planted bugs need a build with them: cargo run --profile sim -p coyote-sim --features planted-bugs -- ..."),
    }
}

/// What the summary needs of one seed; workers send it to the parent as a JSON line.
#[derive(serde::Serialize, serde::Deserialize)]
struct Summary {
    seed: u64,
    scenario: Option<String>,
    failover_ms: Vec<u64>,
    switches: (usize, usize),
    violations: Vec<String>,
    trace_hash: String,
    simulated_ms: u64,
    wall_ms: u64,
    acks: usize,
    faults: usize,
    spliced: usize,
    /// Snapshots taken, stored; restores from a snapshot, with none.
    data: [usize; 4],
    /// Web requests through the proxies: answered with 200, not.
    web: [usize; 2],
}

/// The runs asked for: each seed, with each scenario asked for (or the random schedule).
fn cases(seeds: &std::ops::Range<u64>, scenarios: &[Option<Scenario>]) -> Vec<(Option<Scenario>, u64)> {
    scenarios.iter().flat_map(|sc| seeds.clone().map(move |seed| (*sc, seed))).collect()
}

/// Runs the cases `offset, offset + stride, ...` one after the other in this process, writing traces
/// as asked.
fn run_here(
    args: &Args,
    cases: &[(Option<Scenario>, u64)],
    offset: u64,
    stride: u64,
    params: &Params,
    done: &mut dyn FnMut(&Summary) -> Result<()>,
) -> Result<Vec<Summary>> {
    let mut summaries = Vec::new();
    for (scenario, seed) in cases.iter().skip(offset as usize).step_by(stride as usize) {
        let (scenario, seed) = (*scenario, *seed);
        let params = Params { scenario, ..params.clone() };
        let report = run_seed(seed, &params);
        if args.keep_traces || !report.violations.is_empty() {
            write_trace(&args.trace_dir, scenario, &report)?;
        }
        summaries.push(Summary {
            seed,
            scenario: scenario.map(|s| s.name().to_string()),
            failover_ms: report.failover_ms,
            switches: report.switches,
            violations: report.violations,
            trace_hash: report.trace_hash,
            simulated_ms: report.simulated.as_millis() as u64,
            wall_ms: report.wall.as_millis() as u64,
            acks: report.acks,
            faults: report.faults,
            spliced: report.spliced,
            data: [
                report.data.snapshots_taken,
                report.data.snapshots_stored,
                report.data.restored,
                report.data.restored_empty,
            ],
            web: [report.web.0, report.web.1],
        });
        done(summaries.last().expect("just pushed"))?;
    }
    Ok(summaries)
}

/// How often a long run says how far it has got, on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Progress of a run of many seeds, on stderr: a line every [`PROGRESS_EVERY`], and at once for a
/// run that found a violation (its replay command follows in the summary).
struct Progress {
    total: usize,
    done: usize,
    failing: usize,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        let now = Instant::now();
        Progress { total, done: 0, failing: 0, started: now, last: now }
    }

    fn record(&mut self, summary: &Summary) {
        self.done += 1;
        if let Some(first) = summary.violations.first() {
            self.failing += 1;
            let scenario = summary.scenario.as_deref().map(|s| format!("{s} ")).unwrap_or_default();
            eprintln!("{scenario}seed {} failed: {first}", summary.seed);
        }
        if self.last.elapsed() >= PROGRESS_EVERY && self.done < self.total {
            self.last = Instant::now();
            let elapsed = self.started.elapsed().as_secs_f64();
            let left = elapsed / self.done as f64 * (self.total - self.done) as f64;
            eprintln!(
                "progress: {} of {} runs in {:.0} s, {} failing; about {:.0} s left",
                self.done, self.total, elapsed, self.failing, left
            );
        }
    }
}

/// A worker process: runs its share of the seeds and prints a JSON line per seed.
fn run_worker(args: &Args, worker: &str, cases: &[(Option<Scenario>, u64)], params: &Params) -> Result<()> {
    let (offset, stride) = worker
        .split_once('/')
        .and_then(|(k, j)| Some((k.parse::<u64>().ok()?, j.parse::<u64>().ok()?)))
        .filter(|(k, j)| k < j)
        .with_context(|| format!("--worker {worker:?} is not K/J with K < J"))?;
    // One line per run as it ends, so that the parent can tell how far the runs have got.
    let mut print = |summary: &Summary| -> Result<()> {
        println!("{}", serde_json::to_string(summary)?);
        Ok(())
    };
    run_here(args, cases, offset, stride, params, &mut print)?;
    Ok(())
}

/// Runs the seeds in `jobs` worker processes (this program again, with `--worker K/J`). Processes,
/// not threads: tokio numbers tasks from one process-wide counter, and seeds running side by side in
/// one process would see each other's numbering (see README.md on determinism).
fn run_workers(jobs: usize, progress: &mut Progress) -> Result<Vec<Summary>> {
    let exe = std::env::current_exe().context("cannot find this program to start workers")?;
    let forwarded: Vec<String> = std::env::args().skip(1).collect();
    let mut children: Vec<std::process::Child> = (0..jobs)
        .map(|k| {
            std::process::Command::new(&exe)
                .args(&forwarded)
                .args(["--worker", &format!("{k}/{jobs}")])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("cannot start a worker process")
        })
        .collect::<Result<_>>()?;
    // Each worker's lines are read by a thread of their own and reach this one as they come.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<std::thread::JoinHandle<()>> = children
        .iter_mut()
        .filter_map(|child| child.stdout.take())
        .map(|stdout| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut summaries = Vec::new();
    for line in rx.iter().filter(|l| !l.trim().is_empty()) {
        let summary: Summary =
            serde_json::from_str(&line).with_context(|| format!("worker output {line:?}"))?;
        progress.record(&summary);
        summaries.push(summary);
    }
    for reader in readers {
        let _ = reader.join();
    }
    for mut child in children {
        let status = child.wait().context("a worker process failed")?;
        if !status.success() {
            bail!("a worker process exited with {status}");
        }
    }
    Ok(summaries)
}

/// The `p`th percentile of sorted samples (nearest rank).
fn percentile(sorted: &[u64], p: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

/// Log lines carry the simulated time (seconds since the run began), which is what the traces'
/// timestamps count, so that a node's log and its seed's trace line up.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(at) => write!(w, "{:>9.3}s", at.as_secs_f64()),
            None => write!(w, "{:>10}", "-"),
        }
    }
}

fn main() -> Result<()> {
    no_huge_pages();
    let args = Args::parse();
    // Logs of the nodes' software, for debugging one seed: `RUST_LOG=coyote_nodes=debug`.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_timer(SimTime)
            .with_ansi(false)
            .init();
    }
    let seeds = parse_seeds(&args.seeds)?;
    plant(args.plant.as_deref())?;
    let scenarios: Vec<Option<Scenario>> = match args.scenario.as_deref() {
        None => vec![None],
        Some("all") => Scenario::ALL.into_iter().map(Some).collect(),
        Some(name) => {
            let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
            let scenario = Scenario::parse(name)
                .with_context(|| format!("no scenario {name:?}; there are: all, {}", names.join(", ")))?;
            vec![Some(scenario)]
        }
    };
    let params = Params {
        nodes: args.nodes,
        faults: Duration::from_secs(args.fault_secs),
        liveness: Duration::from_secs(args.liveness_secs),
        crashes: !args.no_crashes,
        services: args.services,
        tick: Duration::from_millis(args.tick_ms),
        ..Params::default()
    };
    let cases = cases(&seeds, &scenarios);
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        .clamp(1, cases.len().min(64));
    let wall = Instant::now();
    let mut progress = Progress::new(cases.len());
    let mut reports = match args.worker.as_deref() {
        Some(worker) => return run_worker(&args, worker, &cases, &params),
        None if jobs <= 1 => run_here(&args, &cases, 0, 1, &params, &mut |s| {
            progress.record(s);
            Ok(())
        })?,
        None => run_workers(jobs, &mut progress)?,
    };
    reports.sort_by_key(|r| (r.scenario.clone(), r.seed));
    let wall = wall.elapsed();
    let planted = match &args.plant {
        Some(bug) => format!(" --features planted-bugs -- --plant {bug}"),
        None => " --".to_string(),
    };
    let failing: Vec<Failing> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| {
            let params =
                Params { scenario: r.scenario.as_deref().and_then(Scenario::parse), ..params.clone() };
            Failing {
                seed: r.seed,
                scenario: r.scenario.clone(),
                violations: r.violations.clone(),
                trace: trace_path(&args.trace_dir, r.scenario.as_deref(), r.seed),
                replay: format!(
                    "cargo run --profile sim -p coyote-sim{planted} --seeds {} {}",
                    r.seed,
                    params.flags()
                ),
            }
        })
        .collect();
    let mut failover: Vec<u64> = reports.iter().flat_map(|r| r.failover_ms.iter().copied()).collect();
    failover.sort_unstable();
    let simulated_s = reports.iter().map(|r| r.simulated_ms).sum::<u64>() as f64 / 1000.0;
    let run_wall_s = reports.iter().map(|r| r.wall_ms).sum::<u64>() as f64 / 1000.0;
    let totals = Totals {
        seeds: [seeds.start, seeds.end],
        scenario: args.scenario.clone(),
        runs: reports.len(),
        nodes: params.nodes,
        services: params.services,
        processes: jobs,
        acknowledged_proposals: reports.iter().map(|r| r.acks).sum(),
        faults_injected: reports.iter().map(|r| r.faults).sum(),
        switches_by_failover: reports.iter().map(|r| r.switches.0).sum(),
        switches_instructed: reports.iter().map(|r| r.switches.1).sum(),
        spliced_connections: reports.iter().map(|r| r.spliced).sum(),
        snapshots_taken: reports.iter().map(|r| r.data[0]).sum(),
        snapshots_stored: reports.iter().map(|r| r.data[1]).sum(),
        restores: reports.iter().map(|r| r.data[2]).sum(),
        restores_empty: reports.iter().map(|r| r.data[3]).sum(),
        web_answered: reports.iter().map(|r| r.web[0]).sum(),
        web_unanswered: reports.iter().map(|r| r.web[1]).sum(),
        failovers: failover.len(),
        failover_p50_ms: percentile(&failover, 50),
        failover_p99_ms: percentile(&failover, 99),
        simulated_s,
        wall_s: wall.as_secs_f64(),
        speed: simulated_s / wall.as_secs_f64().max(1e-9),
        speed_per_run: simulated_s / run_wall_s.max(1e-3),
        violations: reports.iter().map(|r| r.violations.len()).sum(),
        failing,
        per_run: args.verbose.then_some(reports),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&totals)?);
    } else {
        print_totals(&totals);
    }
    if totals.violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// A run that found violations, with where its trace went and the command that replays it.
#[derive(serde::Serialize)]
struct Failing {
    seed: u64,
    scenario: Option<String>,
    violations: Vec<String>,
    trace: PathBuf,
    replay: String,
}

/// The summary of all runs: printed as text, or as one JSON object with `--json`.
#[derive(serde::Serialize)]
struct Totals {
    /// The seed range, start inclusive, end exclusive.
    seeds: [u64; 2],
    scenario: Option<String>,
    runs: usize,
    nodes: usize,
    services: usize,
    processes: usize,
    acknowledged_proposals: usize,
    faults_injected: usize,
    switches_by_failover: usize,
    switches_instructed: usize,
    /// Connections the activators spliced to on-demand containers, and requests the proxies sent
    /// to containers.
    spliced_connections: usize,
    /// Requests web visitors sent to a random node's proxy: answered with 200, not (the site was
    /// moving or its master unreachable).
    web_answered: usize,
    web_unanswered: usize,
    /// Snapshots of services' data taken by masters and stored by other nodes, and restores of new
    /// masters (from a snapshot, or with none recorded yet).
    snapshots_taken: usize,
    snapshots_stored: usize,
    restores: usize,
    restores_empty: usize,
    /// Failovers timed from the master's loss to the new master serving, in simulated time.
    failovers: usize,
    failover_p50_ms: Option<u64>,
    failover_p99_ms: Option<u64>,
    simulated_s: f64,
    wall_s: f64,
    /// Simulated time over wall time.
    speed: f64,
    /// Simulated time over the sum of the runs' own wall times: how fast one cluster went in its
    /// process (the processes running beside it share the machine). With one process, about `speed`.
    speed_per_run: f64,
    violations: usize,
    failing: Vec<Failing>,
    /// Every run, with `--verbose`.
    #[serde(skip_serializing_if = "Option::is_none")]
    per_run: Option<Vec<Summary>>,
}

fn print_totals(t: &Totals) {
    let label = |scenario: &Option<String>, seed: u64| match scenario {
        Some(name) => format!("{name} seed {seed}"),
        None => format!("seed {seed}"),
    };
    // Every run, with --verbose.
    for report in t.per_run.iter().flatten() {
        let status = if report.violations.is_empty() { "ok" } else { "VIOLATION" };
        println!(
            "{}: {status}, {} acks, {} faults, {} failovers, {} instructed switches, {:.1} s simulated in {:.2} s, trace {}",
            label(&report.scenario, report.seed),
            report.acks,
            report.faults,
            report.switches.0,
            report.switches.1,
            report.simulated_ms as f64 / 1000.0,
            report.wall_ms as f64 / 1000.0,
            &report.trace_hash[..16]
        );
    }
    for f in &t.failing {
        println!("{} failed:", label(&f.scenario, f.seed));
        for v in &f.violations {
            println!("  {v}");
        }
        println!("  trace: {}", f.trace.display());
        println!("  replay: {}", f.replay);
    }
    let scenario = match &t.scenario {
        Some(name) => format!(", scenario {name}"),
        None => String::new(),
    };
    println!(
        "seeds: {}..{} ({} runs, {} nodes, {} services, {} processes{scenario})",
        t.seeds[0], t.seeds[1], t.runs, t.nodes, t.services, t.processes
    );
    println!("acknowledged proposals: {}", t.acknowledged_proposals);
    println!("faults injected: {}", t.faults_injected);
    println!(
        "authority switches: {} by failover, {} instructed",
        t.switches_by_failover, t.switches_instructed
    );
    println!(
        "connections handed to containers by activators and proxies: {} (all checked against the fences)",
        t.spliced_connections
    );
    println!("web requests to a random node's proxy: {} answered, {} not", t.web_answered, t.web_unanswered);
    println!(
        "snapshots: {} taken, {} stored elsewhere; restores before serving: {} from a snapshot, {} with none yet",
        t.snapshots_taken, t.snapshots_stored, t.restores, t.restores_empty
    );
    match (t.failover_p50_ms, t.failover_p99_ms) {
        (Some(p50), Some(p99)) => println!(
            "failover time (master lost -> new master serving): p50 {:.2} s, p99 {:.2} s simulated ({} failovers)",
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            t.failovers
        ),
        _ => println!("failover time (master lost -> new master serving): no failover seen"),
    }
    println!(
        "simulated time: {:.1} s, wall time: {:.1} s ({:.1}x; each run in its process: {:.1}x)",
        t.simulated_s, t.wall_s, t.speed, t.speed_per_run
    );
    if !t.failing.is_empty() {
        let runs: Vec<String> = t.failing.iter().map(|f| label(&f.scenario, f.seed)).collect();
        println!("failing runs: {} of {}: {}", t.failing.len(), t.runs, runs.join(", "));
    }
    println!("violations: {}", t.violations);
}
