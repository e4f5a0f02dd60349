//! coyote's proxy against nginx (and Caddy when it is installed) in front of one upstream, under the
//! same load, on this machine, in one run.
//!
//! The upstream is an nginx that answers every request with a short body. Each front terminates TLS
//! with the same ECDSA P-256 certificate (made by `openssl` here) for `localhost` and proxies to it
//! over keep-alive HTTP/1.1: nginx with 2 workers (this machine's cores), a shared session cache
//! and tickets; Caddy with its defaults; coyote's proxy (`coyote-proxy`, the crate every node runs)
//! in a process of its own (this program, run again with `--serve-proxy`), with a table routing
//! `localhost` to the upstream. Measured, front by front:
//!
//! - HTTPS keep-alive requests/s and p99 latency (`wrk -t2 -c64 --latency`);
//! - new connections, each a full handshake, per second (`wrk` with `Connection: close`);
//! - HTTP/2 requests/s (`h2load -c64 -m10`);
//! - full and resumed TLS 1.3 handshakes per second, one client with one request per connection
//!   (a rustls client in this program);
//! - resident memory idle and at the end of the keep-alive load (the front's processes).
//!
//! Run it with `tests/benches/run-proxy.sh` (installs nginx, wrk and h2load from Debian; Caddy if
//! asked, `BENCH_CADDY=1`). `BENCH_SECS` sets each load's length (default 10).

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Resident memory of `pids` and their children, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut pids = vec![pid];
    while let Some(p) = pids.pop() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            if let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) {
                total += line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    total
}

struct Front {
    name: &'static str,
    port: u16,
    child: Child,
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx(dir: &Path, name: &str, config: &str) -> Result<Child> {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::create_dir_all(dir.join(name))?;
    std::fs::write(&conf, config)?;
    Command::new("nginx")
        .args(["-p"])
        .arg(dir.join(name))
        .args(["-c"])
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")
}

#[derive(Default, Clone, Debug)]
struct Figures {
    keepalive_rps: f64,
    keepalive_p99_ms: f64,
    handshakes_rps: f64,
    h2_rps: f64,
    full_per_s: f64,
    resumed_per_s: f64,
    rss_idle_kib: u64,
    rss_load_kib: u64,
}

/// wrk's requests/s and its 99th percentile latency in ms.
fn wrk(port: u16, secs: u64, extra: &[&str]) -> Result<(f64, f64)> {
    let out = run(Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{secs}s"), "--latency"])
        .args(extra)
        .arg(format!("https://localhost:{port}/")))?;
    if out.contains("Non-2xx or 3xx responses") || out.contains("Socket errors: connect") {
        bail!("wrk saw errors: {out}");
    }
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context(format!("no Requests/sec in wrk's output: {out}"))?;
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| parse_duration_ms(v.trim()))
        .context(format!("no 99% line in wrk's output: {out}"))?;
    Ok((rps, p99))
}

fn parse_duration_ms(text: &str) -> f64 {
    let (num, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// h2load's requests/s over HTTP/2.
fn h2load(port: u16, secs: u64) -> Result<f64> {
    let out = run(Command::new("h2load")
        .args(["-t2", "-c64", "-m10", "-D", &secs.to_string()])
        .arg(format!("https://localhost:{port}/")))?;
    if !out.contains("h2") {
        bail!("h2load did not speak HTTP/2: {out}");
    }
    out.lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().strip_suffix("req/s"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context(format!("no req/s in h2load's output: {out}"))
}

/// Accepts any server certificate: the bench's client only measures handshakes.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One client, one request per connection over TLS 1.3 to `localhost`: connections per second,
/// each with a full handshake, or resuming the session of the one before (`resume`). Returns also
/// the share of connections that did resume.
fn handshakes(port: u16, resume: bool, secs: u64) -> Result<(f64, f64)> {
    use std::io::Read;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    let config = Arc::new(config);
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let (started, mut done, mut resumed) = (Instant::now(), 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(secs) {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_nodelay(true)?;
        let mut conn = rustls::ClientConnection::new(config.clone(), name.clone())?;
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut answer = Vec::new();
        match tls.read_to_end(&mut answer) {
            Ok(_) => {}
            // A peer that closes without close_notify: the answer is in already.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e.into()),
        }
        if !answer.starts_with(b"HTTP/1.1 200") {
            bail!("answer without 200: {}", String::from_utf8_lossy(&answer));
        }
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            resumed += 1;
        }
        done += 1;
    }
    Ok((done as f64 / started.elapsed().as_secs_f64(), resumed as f64 / done.max(1) as f64))
}

fn measure(front: &Front, secs: u64) -> Result<Figures> {
    let pid = front.child.id();
    let mut f = Figures { rss_idle_kib: rss_kib(pid), ..Default::default() };
    // A short warm-up, then the keep-alive load with a memory reading near its end.
    let _ = wrk(front.port, 2, &[])?;
    let sampler = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs.saturating_sub(1).max(1)));
        rss_kib(pid)
    });
    (f.keepalive_rps, f.keepalive_p99_ms) = wrk(front.port, secs, &[])?;
    f.rss_load_kib = sampler.join().unwrap_or(0);
    (f.handshakes_rps, _) = wrk(front.port, secs, &["-H", "Connection: close"])?;
    f.h2_rps = h2load(front.port, secs)?;
    (f.full_per_s, _) = handshakes(front.port, false, secs.min(5))?;
    let share;
    (f.resumed_per_s, share) = handshakes(front.port, true, secs.min(5))?;
    if share < 0.9 {
        bail!("{}: only {:.0}% of the connections resumed their session", front.name, share * 100.0);
    }
    eprintln!("{}: {f:?}", front.name);
    Ok(f)
}

fn busy_cores_elsewhere(window: Duration) -> f64 {
    let read = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> =
            stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let idle = cpu.get(3)? + cpu.get(4).unwrap_or(&0);
        Some((cpu.iter().sum(), idle))
    };
    let (Some((t0, i0)), _) = (read(), std::thread::sleep(window)) else { return f64::NAN };
    let Some((t1, i1)) = read() else { return f64::NAN };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    (1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64) * cores
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-proxy") {
        let upstream: u16 = args[i + 1].parse()?;
        let port: u16 = args[i + 2].parse()?;
        let dir = PathBuf::from(&args[i + 3]);
        return serve_proxy(upstream, port, &dir);
    }
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-days", "2"])
        .arg("-keyout")
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem")))?;

    let upstream_port = free_port();
    let upstream = nginx(
        d,
        "upstream",
        &format!(
            "worker_processes 1;\nerror_log stderr crit;\npid upstream.pid;\nevents {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n  server {{ listen 127.0.0.1:{upstream_port};\n    \
             location / {{ return 200 \"hello from the upstream\\n\"; }} }} }}\n"
        ),
    )?;
    let _upstream = Front { name: "upstream", port: upstream_port, child: upstream };
    wait_port(upstream_port)?;

    let nginx_port = free_port();
    let cert = d.join("cert.pem").display().to_string();
    let key = d.join("key.pem").display().to_string();
    let front_nginx = nginx(
        d,
        "front",
        &format!(
            "worker_processes 2;\nerror_log stderr crit;\npid front.pid;\nevents {{ worker_connections 8192; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}\n  \
             ssl_session_cache shared:SSL:10m; ssl_session_tickets on; ssl_protocols TLSv1.2 TLSv1.3;\n  \
             server {{ listen 127.0.0.1:{nginx_port} ssl http2; server_name localhost;\n    \
             ssl_certificate {cert}; ssl_certificate_key {key};\n    \
             location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";\n      \
             proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
             proxy_set_header X-Forwarded-Proto https; }} }} }}\n"
        ),
    )?;
    let nginx_front = Front { name: "nginx", port: nginx_port, child: front_nginx };
    wait_port(nginx_port)?;

    let coyote_port = free_port();
    let me = std::env::current_exe()?;
    let child = Command::new(me)
        .args(["--serve-proxy", &upstream_port.to_string(), &coyote_port.to_string()])
        .arg(d)
        .stdout(Stdio::null())
        .spawn()?;
    let coyote_front = Front { name: "coyote", port: coyote_port, child };
    wait_port(coyote_port)?;

    let caddy_front = if std::env::var_os("BENCH_CADDY").is_some() {
        let port = free_port();
        let caddyfile = d.join("Caddyfile");
        std::fs::write(
            &caddyfile,
            format!(
                "{{\n  admin off\n  auto_https disable_redirects\n}}\nhttps://localhost:{port} {{\n  tls {cert} {key}\n  \
                 reverse_proxy 127.0.0.1:{upstream_port}\n  log {{\n    output discard\n  }}\n}}\n"
            ),
        )?;
        let child = Command::new("caddy")
            .args(["run", "--config"])
            .arg(&caddyfile)
            .args(["--adapter", "caddyfile"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting caddy (apt-get install caddy)")?;
        wait_port(port)?;
        Some(Front { name: "caddy", port, child })
    } else {
        None
    };

    let busy = busy_cores_elsewhere(Duration::from_secs(2));
    let mut results = Vec::new();
    for front in [Some(&coyote_front), Some(&nginx_front), caddy_front.as_ref()].into_iter().flatten() {
        results.push((front.name, measure(front, secs)?));
    }
    let ours = &results[0].1;
    println!("proxy_vs_nginx: {secs} s per load, 64 connections, 2 client threads; other processes used {busy:.2} cores before");
    println!("{:<44} {:>12} {:>12} {:>8}", "what", "coyote", "alternative", "ratio");
    for (name, theirs) in &results[1..] {
        let rows: [(&str, f64, f64); 8] = [
            ("HTTPS keep-alive requests/s", ours.keepalive_rps, theirs.keepalive_rps),
            ("HTTPS keep-alive p99 latency (ms)", ours.keepalive_p99_ms, theirs.keepalive_p99_ms),
            ("new connections (full handshakes)/s", ours.handshakes_rps, theirs.handshakes_rps),
            ("HTTP/2 requests/s (h2load -m10)", ours.h2_rps, theirs.h2_rps),
            ("full handshakes/s, one client", ours.full_per_s, theirs.full_per_s),
            ("resumed handshakes/s, one client", ours.resumed_per_s, theirs.resumed_per_s),
            ("RSS idle (MiB)", ours.rss_idle_kib as f64 / 1024.0, theirs.rss_idle_kib as f64 / 1024.0),
            (
                "RSS at the end of the load (MiB)",
                ours.rss_load_kib as f64 / 1024.0,
                theirs.rss_load_kib as f64 / 1024.0,
            ),
        ];
        for (what, a, b) in rows {
            println!("{:<44} {:>12.1} {:>12.1} {:>7.2}x   ({name})", what, a, b, a / b);
        }
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// The proxy side: coyote's proxy routing `localhost` to the upstream, with the bench's certificate.
fn serve_proxy(upstream: u16, port: u16, dir: &Path) -> Result<()> {
    use coyote_proxy::{Backend, Body, BoxStream, Opened, Proxy, Refusal};
    use futures::future::BoxFuture;

    struct Fixed(SocketAddr);
    impl Backend for Fixed {
        fn node_id(&self) -> u64 {
            1
        }
        fn open(&self, _: &str, _: u16) -> BoxFuture<'_, Result<Opened, Refusal>> {
            Box::pin(async move { Ok(Opened { addr: self.0, guard: None }) })
        }
        fn forward(
            &self,
            _: u64,
            _: hyper::Request<Body>,
        ) -> BoxFuture<'static, Result<hyper::Response<Body>, String>> {
            Box::pin(async { Err("one node only".to_string()) })
        }
        fn dial(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<BoxStream>> {
            Box::pin(async move {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Box::new(s) as BoxStream)
            })
        }
    }
    struct Loaded(Arc<rustls::sign::CertifiedKey>);
    impl coyote_proxy::Issuer for Loaded {
        fn issue(&self, _: &str) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
            Ok(self.0.clone())
        }
    }
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("cert.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("key.pem"))?;
    let key = rustls::sign::CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())?;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let backend = Arc::new(Fixed(SocketAddr::from(([127, 0, 0, 1], upstream))));
        let proxy = Proxy::new(backend, Arc::new(Loaded(Arc::new(key))), coyote_proxy::Settings::default());
        let mut state = coyote_state_machine::State::default();
        state.services.insert(
            "bench".into(),
            coyote_state_machine::Service {
                spec: coyote_state_machine::ServiceSpec {
                    name: "bench".into(),
                    image: "bench".into(),
                    domains: vec!["localhost".into()],
                    ports: vec![],
                    memory_bytes: None,
                    on_demand: false,
                    dump: None,
                    http_check: None,
                    zone: None,
                    http_port: Some(upstream),
                    tls_passthrough: false,
                    keep: None,
                },
                placement: Some(coyote_state_machine::Placement {
                    master: 1,
                    failover: None,
                    backups: vec![],
                }),
                created_at_ms: 0,
                serve_from_ms: 0,
            },
        );
        proxy.set_table(coyote_proxy::Table::from_state(&state));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(proxy.clone().serve_https(Box::new(stream), peer));
        }
    })
}
