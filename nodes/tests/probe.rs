//! The monitor's service checks against real servers on 127.0.0.1: busybox's HTTP server (with a CGI
//! script that fails) and dnsmasq as an authoritative nameserver. `scripts/test.sh` installs both
//! (Debian's `busybox-static` and `dnsmasq-base`).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coyote_nodes::probe::{Check, NetProbe, ServiceProbe};
use coyote_state_machine::ZoneCheck;

const TIMEOUT: Duration = Duration::from_millis(500);

/// A child process killed when the test ends, whatever happens.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn need(program: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = format!("{dir}/{program}");
        if Path::new(&path).exists() {
            return path;
        }
    }
    panic!("{program} is missing: scripts/test.sh installs it (busybox-static, dnsmasq-base)");
}

async fn eventually(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn http_checks_pass_below_500_and_fail_on_errors_and_silence() {
    let busybox = need("busybox");
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("index.html"), "ok\n").unwrap();
    let cgi = root.path().join("cgi-bin");
    std::fs::create_dir(&cgi).unwrap();
    let script = cgi.join("fail");
    std::fs::write(&script, "#!/bin/sh\necho 'Status: 500 Internal Server Error'\necho\necho broken\n")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Killed(
        Command::new(&busybox)
            .args(["httpd", "-f", "-p", &addr, "-h"])
            .arg(root.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http =
        |path: &str| Check::Http { addr: addr.clone(), host: "blog.example.org".into(), path: path.into() };
    eventually("busybox httpd answers", async || {
        NetProbe.probe(Check::Tcp { addr: addr.clone() }, TIMEOUT).await
    })
    .await;

    assert!(NetProbe.probe(http("/index.html"), TIMEOUT).await, "200 passes");
    assert!(NetProbe.probe(http("/missing"), TIMEOUT).await, "404 passes: the server answers");
    assert!(!NetProbe.probe(http("/cgi-bin/fail"), TIMEOUT).await, "500 fails");

    // A port where nothing listens fails both checks.
    let closed = format!("127.0.0.1:{}", free_port());
    assert!(!NetProbe.probe(Check::Tcp { addr: closed.clone() }, TIMEOUT).await);
    let check = Check::Http { addr: closed, host: "x".into(), path: "/".into() };
    assert!(!NetProbe.probe(check, TIMEOUT).await);

    // A server that accepts but never answers fails the HTTP check within the timeout (the TCP
    // check passes: it only needs the handshake).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    assert!(NetProbe.probe(Check::Tcp { addr: silent_addr.clone() }, TIMEOUT).await);
    let started = Instant::now();
    let check = Check::Http { addr: silent_addr, host: "x".into(), path: "/".into() };
    assert!(!NetProbe.probe(check, TIMEOUT).await);
    assert!(started.elapsed() < TIMEOUT * 4, "the check gives up at its timeout");
}

#[tokio::test]
async fn zone_checks_need_an_soa_answer_from_a_nameserver() {
    let dnsmasq = need("dnsmasq");
    let port = {
        // A port free for UDP on 127.0.0.1.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let _server = Killed(
        Command::new(&dnsmasq)
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--auth-server=ns1.example.org,127.0.0.1",
                "--auth-zone=example.org",
                "--auth-soa=1,hostmaster.example.org",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ns = format!("127.0.0.1:{port}");
    let zone = |name: &str, nameservers: Vec<String>| ZoneCheck { zone: name.into(), nameservers };
    eventually("dnsmasq answers", async || {
        NetProbe.zone(zone("example.org", vec![ns.clone()]), TIMEOUT).await
    })
    .await;

    // Case and a trailing dot do not matter.
    assert!(NetProbe.zone(zone("Example.ORG.", vec![ns.clone()]), TIMEOUT).await);
    // A zone the server does not serve is refused: not reachable.
    assert!(!NetProbe.zone(zone("example.net", vec![ns.clone()]), TIMEOUT).await);
    // Nobody at the address: not reachable, within the timeout.
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", s.local_addr().unwrap().port())
    };
    let started = Instant::now();
    assert!(!NetProbe.zone(zone("example.org", vec![dead.clone()]), TIMEOUT).await);
    assert!(started.elapsed() < TIMEOUT * 4);
    // One nameserver answering is enough; a name that does not resolve counts as silent.
    assert!(
        NetProbe
            .zone(zone("example.org", vec![dead, "no-such-host.invalid".into(), ns.clone()]), TIMEOUT)
            .await
    );
    // The first answer decides: a nameserver that stays silent does not hold the check (and the
    // monitor's round of probes) up to its timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let long = Duration::from_secs(5);
    let started = Instant::now();
    assert!(NetProbe.zone(zone("example.org", vec![silent_addr, ns]), long).await);
    assert!(started.elapsed() < long / 2, "answered after {:?}", started.elapsed());
}
