//! The CRM under load: how long the overview and the events page take to render and how big they
//! are, with 100 services and 10,000 events in the log; and the live event log's fan-out, with 200
//! browsers (HTTP clients) following it while events are written at 500 per second.
//!
//! One `coyote` process (`COYOTE_BIN`, the runner builds it in release) on 127.0.0.1, with its CRM.
//! Page times are measured at the client, over loopback, one request at a time. For the fan-out,
//! the writers run in a child process (this program, started again with `CRM_BENCH_WRITER`) that
//! proposes alarms through the node's unix socket, so that its CPU time can be set against the
//! node's: every client must receive every event in order, and the node should spend less CPU than
//! the writers.
//!
//! Settings from the environment: `BENCH_SERVICES` (100), `BENCH_EVENTS` (10000), `BENCH_PAGES`
//! (200 requests of each page), `BENCH_CLIENTS` (200), `BENCH_RATE` (500 events/s),
//! `BENCH_SECONDS` (10).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use coyote_tests::web::Web;
use coyote_tests::{api_call, free_port, Node};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU time (user + system) of a process so far, from `/proc/PID/stat`.
fn cpu_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz.max(1)))
}

/// The CPU this process has used so far.
fn own_cpu() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t =
        |tv: libc::timeval| Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64);
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// Writer mode: proposes alarms (raised, then cleared) at `rate` events/s for `seconds` through
/// `socket`, from 8 threads; prints the events written and the CPU this process used.
fn writer(socket: PathBuf, rate: u64, seconds: u64) -> Result<()> {
    let threads = 8;
    let written = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (socket, written) = (socket.clone(), written.clone());
            std::thread::spawn(move || -> Result<()> {
                let pairs = rate * seconds / 2 / threads;
                let every = Duration::from_secs_f64(2.0 * threads as f64 / rate as f64);
                for i in 0..pairs {
                    let due = start + every.mul_f64(i as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let body =
                        format!(r#"{{"key":"bench/{t}/{i}","message":"load","node":null,"service":null}}"#);
                    let (code, raised) = api_call(&socket, "POST", "/v1/alarms", &body)?;
                    ensure!(code == 200, "raising an alarm answered {code}: {raised}");
                    let id = raised["id"].as_u64().context("alarm id")?;
                    let (code, cleared) = api_call(&socket, "POST", &format!("/v1/alarms/{id}/clear"), "")?;
                    ensure!(code == 200, "clearing an alarm answered {code}: {cleared}");
                    written.fetch_add(2, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread")?;
    }
    println!("{} {}", written.load(Ordering::Relaxed), own_cpu().as_micros());
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// `n` GETs of `path`: p50, p99 and the page's size.
fn page_times(web: &mut Web, path: &str, n: u64) -> Result<(Duration, Duration, usize)> {
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..n {
        let t = Instant::now();
        let page = web.get(path)?;
        times.push(t.elapsed());
        ensure!(page.status == 200, "{path} answered {}", page.status);
        bytes = page.body.len();
    }
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.99), bytes))
}

fn main() -> Result<()> {
    if let Ok(spec) = std::env::var("CRM_BENCH_WRITER") {
        let mut parts = spec.split(',');
        let socket = PathBuf::from(parts.next().context("socket")?);
        let rate = parts.next().context("rate")?.parse()?;
        let seconds = parts.next().context("seconds")?.parse()?;
        return writer(socket, rate, seconds);
    }
    let services = env_u64("BENCH_SERVICES", 100);
    let events = env_u64("BENCH_EVENTS", 10_000);
    let pages = env_u64("BENCH_PAGES", 200);
    let clients = env_u64("BENCH_CLIENTS", 200);
    let rate = env_u64("BENCH_RATE", 500);
    let seconds = env_u64("BENCH_SECONDS", 10);

    let root = tempfile::tempdir()?;
    let mut node = Node::new(root.path(), "n1");
    let addr = format!("127.0.0.1:{}", free_port());
    node.crm = Some(addr.clone());
    node.up()?;
    let socket = node.dir.join("coyote.sock");
    eprintln!("filling the log: {services} services, then alarms up to {events} events");
    for i in 0..services {
        let spec = format!(
            r#"{{"name":"site{i}","image":"busybox:latest","domains":["site{i}.example.org"],"ports":[],"memory_bytes":null,"on_demand":false}}"#
        );
        let (code, answer) = api_call(&socket, "POST", "/v1/services", &spec)?;
        ensure!(code == 200, "creating a service answered {code}: {answer}");
    }
    let fill = |from: u64, to: u64| -> Result<()> {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let socket = socket.clone();
                std::thread::spawn(move || -> Result<()> {
                    for i in (from..to).filter(|i| i % 4 == t) {
                        let body =
                            format!(r#"{{"key":"fill/{i}","message":"fill","node":null,"service":null}}"#);
                        let (_, raised) = api_call(&socket, "POST", "/v1/alarms", &body)?;
                        let id = raised["id"].as_u64().context("alarm id")?;
                        api_call(&socket, "POST", &format!("/v1/alarms/{id}/clear"), "")?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("fill thread")?;
        }
        Ok(())
    };
    let have = node.status()?["last_event"].as_u64().unwrap_or(0);
    fill(0, events.saturating_sub(have) / 2)?;
    let last = node.status()?["last_event"].as_u64().unwrap_or(0);

    // Log in as the admin.
    let code = node.cli_json(&["crm", "activate"])?["code"].as_str().context("code")?.to_string();
    let mut web = Web::new(&addr);
    let path = format!("/activate/{code}");
    let csrf = web.get(&path)?.input("csrf").context("csrf")?;
    let password = "bench-password-1";
    let done = web.post(
        &path,
        &[("csrf", &csrf), ("name", "admin"), ("password", password), ("password2", password)],
    )?;
    ensure!(done.status == 303, "activation answered {}", done.status);

    let (o50, o99, obytes) = page_times(&mut web, "/", pages)?;
    let (e50, e99, ebytes) = page_times(&mut web, "/events", pages)?;
    println!("pages, with {services} services and {last} events in the log ({pages} requests each, at the client):");
    println!("  overview  p50 {:>7.2} ms  p99 {:>7.2} ms  {:>7} bytes", ms(o50), ms(o99), obytes);
    println!(
        "  events    p50 {:>7.2} ms  p99 {:>7.2} ms  {:>7} bytes (the last 200 events)",
        ms(e50),
        ms(e99),
        ebytes
    );

    // The fan-out.
    let start_index = node.status()?["last_event"].as_u64().unwrap_or(0) + 1;
    let cookie = web.cookie.clone();
    let received = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let goal = Arc::new(AtomicU64::new(u64::MAX));
    let mut followers = Vec::new();
    for _ in 0..clients {
        let mut client = Web::new(&addr);
        client.cookie = cookie.clone();
        let mut stream = client.stream(&format!("/events/stream?from={start_index}"), None)?;
        let (received, out_of_order, goal) = (received.clone(), out_of_order.clone(), goal.clone());
        followers.push(std::thread::spawn(move || -> Result<u64> {
            // Until the last event written (the goal, known once the writers are done); an event
            // past it (the sentinel) ends a client that had caught up before the goal was known.
            let mut next = start_index;
            let mut count = 0;
            loop {
                let event = stream.next_event()?;
                let id = event.id.context("an event without id")?;
                let goal = goal.load(Ordering::SeqCst);
                if id > goal {
                    return Ok(count);
                }
                if id != next {
                    out_of_order.fetch_add(1, Ordering::Relaxed);
                }
                next = id + 1;
                count += 1;
                received.fetch_add(1, Ordering::Relaxed);
                if id == goal {
                    return Ok(count);
                }
            }
        }));
    }
    eprintln!("{clients} clients follow the event log; writing {rate} events/s for {seconds} s");
    let pid = node.pid().context("the node's pid")?;
    let node_cpu_before = cpu_of(pid)?;
    let wall = Instant::now();
    let out = std::process::Command::new(std::env::current_exe()?)
        .env("CRM_BENCH_WRITER", format!("{},{rate},{seconds}", socket.display()))
        .output()?;
    if !out.status.success() {
        bail!("the writers failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let written: u64 = words.next().context("written")?.parse()?;
    let writer_cpu = Duration::from_micros(words.next().context("cpu")?.parse()?);
    let end_index = node.status()?["last_event"].as_u64().unwrap_or(0);
    goal.store(end_index, Ordering::SeqCst);
    let sentinel = r#"{"key":"bench/sentinel","message":"the end","node":null,"service":null}"#;
    api_call(&socket, "POST", "/v1/alarms", sentinel)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let expected = end_index + 1 - start_index;
    while received.load(Ordering::Relaxed) < expected * clients && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = wall.elapsed();
    let node_cpu = cpu_of(pid)? - node_cpu_before;
    let mut complete = 0;
    for f in followers {
        if f.join().expect("follower thread").is_ok_and(|n| n == expected) {
            complete += 1;
        }
    }
    println!(
        "fan-out: {clients} clients, {written} events written in {:.1} s ({:.0}/s):",
        elapsed.as_secs_f64(),
        written as f64 / seconds as f64
    );
    println!(
        "  clients that received every event, in order: {complete} of {clients} ({} out of order)",
        out_of_order.load(Ordering::Relaxed)
    );
    println!(
        "  CPU: node {:.2} s, writers {:.2} s: node/writers {:.2}×",
        node_cpu.as_secs_f64(),
        writer_cpu.as_secs_f64(),
        node_cpu.as_secs_f64() / writer_cpu.as_secs_f64().max(1e-9)
    );
    ensure!(complete == clients, "{} clients missed events", clients - complete);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
