//! The front door, for real: three `coyote` processes, each with its proxy on its own loopback
//! address, running Docker containers. A website is reached by name over HTTPS (HTTP/1.1 and
//! HTTP/2, curl with `--resolve`) at its master and at any other node (forwarded over the cluster's
//! mutual TLS), a protocol switch too (tunnelled to the master); an on-demand site is started by its first request, which waits; when the master is
//! killed, the site is served again from its new master through the nodes that are left.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use coyote_tests::{form_cluster, free_port_on, node_id, test_images, wait_until, DockerGuard, Node};

const TIMEOUT: Duration = Duration::from_secs(90);

/// A node's loopback address and its proxy's HTTP and HTTPS ports.
struct Front {
    ip: String,
    http: u16,
    https: u16,
}

/// curl's exit status, output and stderr, with `name` resolved to `front`'s address; `path` is
/// asked for over HTTPS, or the URL among `extra` when `path` is empty.
fn curl(
    front: &Front,
    ca: &std::path::Path,
    name: &str,
    path: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--max-time", "40", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{}:{}", front.https, front.ip)])
        .args(["--resolve", &format!("{name}:{}:{}", front.http, front.ip)])
        .args(extra);
    if !path.is_empty() {
        command.arg(format!("https://{name}:{}{path}", front.https));
    }
    let out = command.output().expect("curl is needed by this test (apt-get install curl)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A protocol switch (`Upgrade: echo`) asked of `name` over HTTPS at `front`, then three messages
/// echoed back through it: `None` while the switch is not answered.
fn upgrade_echo(front: &Front, ca: &std::path::Path, name: &str) -> Result<Option<()>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = rustls::ClientConnection::new(config.into(), ServerName::try_from(name.to_string())?)?;
    let tcp = std::net::TcpStream::connect((front.ip.as_str(), front.https))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut s = rustls::StreamOwned::new(tls, tcp);
    write!(s, "GET /ws HTTP/1.1\r\nHost: {name}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if s.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Ok(None);
    }
    for round in 0..3 {
        let msg = format!("hello {round} through {}", front.ip);
        s.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        anyhow::ensure!(back == msg.as_bytes(), "{:?} came back for {msg:?}", String::from_utf8_lossy(&back));
    }
    Ok(Some(()))
}

#[test]
fn sites_are_served_by_name_from_any_node_and_follow_their_master() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let mut nodes: Vec<Node> = Vec::new();
    let mut fronts = Vec::new();
    for (i, ip) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let mut n = Node::on_ip(root.path(), &format!("n{}", i + 1), ip);
        n.containers = true;
        n.flags = ["--forward", "userspace", "--no-backups", "--acme", "off", "--proxy-max-body", "64K"]
            .map(String::from)
            .to_vec();
        n.flags.extend(["--metrics".into(), format!("{ip}:{}", free_port_on(ip))]);
        let front = Front { ip: ip.to_string(), http: free_port_on(ip), https: free_port_on(ip) };
        n.front = Some((format!("{ip}:{}", front.http), format!("{ip}:{}", front.https)));
        nodes.push(n);
        fronts.push(front);
    }
    let mut nodes = form_cluster(&mut guard, nodes)?;
    let ids: Vec<u64> = nodes.iter().map(node_id).collect::<Result<_>>()?;
    let ca = nodes[0].dir.join("tls").join("ca.pem");
    let suffix = format!("{}x{}", std::process::id(), nodes[0].cluster_id()?);
    let site = format!("www-{suffix}.test");
    let service = format!("web{}", std::process::id());
    let created = nodes[0].cli_json(&[
        "service",
        "create",
        &service,
        "--image",
        "coyote-test/httpd:1",
        "--domain",
        &site,
    ])?;
    let master = created["placement"]["master"].as_u64().context("a master")?;
    let m = ids.iter().position(|i| *i == master).context("master")?;
    let other = (m + 1) % 3;
    let metrics_addr = nodes[m].flags.last().cloned().context("--metrics")?;

    // At the master, by name, over HTTP/1.1 and HTTP/2, with a certificate from the cluster's CA.
    wait_until("the site to answer at its master", TIMEOUT, || {
        let (code, out, _) = curl(&fronts[m], &ca, &site, "/", &[]);
        Ok((code == 0 && out.contains("coyote test 1")).then_some(()))
    })?;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (code, out, err) =
            curl(&fronts[m], &ca, &site, "/", &[flag, "-w", "\n%{http_version} %{http_code}"]);
        assert_eq!(code, 0, "{flag}: {err}");
        assert!(out.contains("coyote test 1") && out.ends_with(&format!("{version} 200")), "{flag}: {out}");
    }
    // At another node: forwarded to the master over the cluster's mutual TLS.
    let (code, out, err) = curl(&fronts[other], &ca, &site, "/", &["-w", "\n%{http_code}"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("coyote test 1") && out.ends_with("200"), "through node {}: {out}", ids[other]);
    // A protocol switch (a websocket, say) at another node: tunnelled to the master's proxy over
    // the cluster's mutual TLS, both ways.
    let echo_site = format!("echo-{suffix}.test");
    let echo = format!("echo{}", std::process::id());
    let created = nodes[0].cli_json(&[
        "service",
        "create",
        &echo,
        "--image",
        "coyote-test/upgrade-echo:1",
        "--domain",
        &echo_site,
    ])?;
    let echo_master = created["placement"]["master"].as_u64().context("a master")?;
    let em = ids.iter().position(|i| *i == echo_master).context("master")?;
    wait_until("a protocol switch at the echo site's master", TIMEOUT, || {
        upgrade_echo(&fronts[em], &ca, &echo_site)
    })?;
    let not_master = (em + 1) % 3;
    upgrade_echo(&fronts[not_master], &ca, &echo_site)?
        .with_context(|| format!("no protocol switch through node {}", ids[not_master]))?;
    // The limits are flags: a body over --proxy-max-body gets 413.
    let body = root.path().join("body");
    std::fs::write(&body, vec![b'x'; 100 * 1024])?;
    let upload = format!("@{}", body.display());
    let (code, out, err) = curl(
        &fronts[other],
        &ca,
        &site,
        "/",
        // HTTP/1.1, waiting for the go-ahead before the body is sent: the refusal comes first. (Over
        // HTTP/2 the refusal resets the stream the upload is still on, which curl may report as a
        // framing error instead of the 413.)
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--http1.1",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &upload,
        ],
    );
    assert_eq!((code, out.as_str()), (0, "413"), "{err}");
    // Plain HTTP is sent to HTTPS; an unknown name gets a TLS alert, not another site's certificate.
    let plain = format!("http://{site}:{}/a?b=1", fronts[other].http);
    let (_, out, _) = curl(
        &fronts[other],
        &ca,
        &site,
        "",
        &["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", &plain],
    );
    assert_eq!(out, format!("308 https://{site}/a?b=1"));
    let (code, _, err) = curl(&fronts[m], &ca, &format!("nothing-{suffix}.test"), "/", &[]);
    assert_eq!(code, 35, "a TLS failure: {err}");

    // An on-demand site with no published port: its first request (through a node that is not its
    // master) waits while its container starts, and is answered.
    let lazy_site = format!("lazy-{suffix}.test");
    let lazy = format!("lazy{}", std::process::id());
    let created = nodes[0].cli_json(&[
        "service",
        "create",
        &lazy,
        "--image",
        "coyote-test/httpd:2",
        "--domain",
        &lazy_site,
        "--on-demand",
    ])?;
    let lazy_master = created["placement"]["master"].as_u64().context("a master")?;
    let lm = ids.iter().position(|i| *i == lazy_master).context("master")?;
    let through = (lm + 1) % 3;
    wait_until("the on-demand container to be created, stopped", TIMEOUT, || {
        let filter = format!("label=coyote.service={lazy}");
        let state = coyote_tests::docker(&["ps", "-a", "--filter", &filter, "--format", "{{.State}}"])?;
        let states: Vec<&str> = state.split_whitespace().collect();
        Ok((!states.is_empty() && !states.contains(&"running")).then_some(()))
    })?;
    let (code, out, err) = wait_until("the on-demand site's first answer", TIMEOUT, || {
        let answer = curl(&fronts[through], &ca, &lazy_site, "/", &["-w", "\n%{http_code}"]);
        // Until the lease of its new master is held, the proxy says 503 (moving); then it waits.
        Ok((answer.0 == 0 && !answer.1.ends_with("503")).then_some(answer))
    })?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("coyote test 2") && out.ends_with("200"), "{out}");
    let stats = nodes[lm].cli_json_lines(&["stats"])?;
    let cold =
        stats.iter().find(|s| s["service"] == lazy.as_str()).context("the on-demand service's stats")?;
    assert!(cold["cold_starts"].as_u64() >= Some(1), "{cold}");

    // Each node counts its proxy's traffic per domain, in `coyote stats --web` and in Prometheus
    // text served over TCP (`--metrics`).
    let web = nodes[m].cli_json(&["stats", "--web"])?;
    let domains = web["domains"].as_array().context("domains")?;
    let counted = domains.iter().find(|d| d["domain"] == site.as_str()).context("the site's counts")?;
    assert!(counted["requests_by_class"][1].as_u64() >= Some(3), "{web}");
    assert!(counted["bytes_out"].as_u64() > Some(0), "{web}");
    assert!(web["tls_handshakes"].as_u64() >= Some(3), "{web}");
    let metrics = Command::new("curl").args(["-sS", &format!("http://{metrics_addr}/metrics")]).output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(metrics.contains("coyote_proxy_requests_total{domain="), "{metrics}");

    // The master of the first site is killed: the site is served again, from its new master,
    // through the nodes that are left.
    nodes[m].kill9();
    let left: Vec<usize> = (0..3).filter(|i| *i != m).collect();
    for i in &left {
        let (code, out, err) =
            wait_until("the site to be served again after its master died", TIMEOUT, || {
                let answer = curl(&fronts[*i], &ca, &site, "/", &["-w", "\n%{http_code}"]);
                Ok((answer.0 == 0 && answer.1.ends_with("200")).then_some(answer))
            })?;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("coyote test 1"), "{out}");
    }
    let show = nodes[left[0]].cli_json(&["service", "show", &service])?;
    assert_ne!(show["placement"]["master"].as_u64(), Some(master), "a new master serves it");
    for n in nodes.iter_mut() {
        n.kill9();
    }
    guard.clean();
    Ok(())
}
