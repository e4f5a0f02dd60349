//! Certificates from an ACME CA, for real: Debian's `pebble` (Let's Encrypt's test CA, which
//! rejects 5% of good nonces on purpose and waits a random time before it validates), with
//! `pebble-challtestsrv` as its DNS, and three `coyote` processes whose proxies answer its HTTP-01
//! challenges. The node that claimed the order is killed while the order is under way; another node
//! resumes the same order by its URL; pebble's log shows exactly one order and one finalization;
//! every node serves the certificate (the killed one too, once back), and the restart orders nothing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use coyote_tests::{free_port_on, node_id, wait_until, Node};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);
const IPS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];

/// pebble and its DNS, stopped when dropped.
struct Pebble {
    children: Vec<Child>,
    log: PathBuf,
    directory: String,
    /// pebble's own HTTPS root (to trust its directory), and the management address.
    tls_root: PathBuf,
    management: String,
    dns_management: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` of whatever address its DNS gives (`ip`).
    /// TLS-ALPN-01 on `tls_port`.
    fn start(dir: &Path, http_port: u16, tls_port: u16, ip: &str) -> Result<Pebble> {
        for tool in ["pebble", "pebble-challtestsrv"] {
            if Command::new("which").arg(tool).output().map(|o| !o.status.success()).unwrap_or(true) {
                bail!("{tool} is needed by this test: apt-get install pebble (scripts/test.sh does)");
            }
        }
        // pebble's own TLS certificate, from a CA of the test's.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "pebble test root");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer)?;
        let tls_root = dir.join("pebble-root.pem");
        std::fs::write(&tls_root, ca_cert.pem())?;
        std::fs::write(dir.join("pebble-cert.pem"), cert.pem())?;
        std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem())?;

        let port = || free_port_on("127.0.0.1");
        let (listen, management, dns, dns_management) = (port(), port(), port(), port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("pebble-cert.pem"),
            "privateKey": dir.join("pebble-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string())?;
        let log = dir.join("pebble.log");
        let mut children = Vec::new();
        let dns_log = std::fs::File::create(dir.join("challtestsrv.log"))?;
        children.push(
            Command::new("pebble-challtestsrv")
                .args([
                    "-dns01",
                    &format!("127.0.0.1:{dns}"),
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                ])
                .args(["-management", &format!("127.0.0.1:{dns_management}")])
                .args(["-defaultIPv4", ip, "-defaultIPv6", ""])
                .stdout(dns_log.try_clone()?)
                .stderr(dns_log)
                .spawn()?,
        );
        let out = std::fs::File::create(&log)?;
        children.push(
            Command::new("pebble")
                .arg("-config")
                .arg(dir.join("pebble.json"))
                .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
                .env("PEBBLE_VA_SLEEPTIME", "3")
                .stdout(out.try_clone()?)
                .stderr(out)
                .stdin(Stdio::null())
                .spawn()?,
        );
        let pebble = Pebble {
            children,
            log,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            tls_root,
            management: format!("127.0.0.1:{management}"),
            dns_management: format!("127.0.0.1:{dns_management}"),
        };
        wait_until("pebble to serve its directory", Duration::from_secs(30), || {
            let out = Command::new("curl")
                .args(["-sS", "--cacert"])
                .arg(&pebble.tls_root)
                .arg(&pebble.directory)
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).contains("newOrder").then_some(()))
        })?;
        Ok(pebble)
    }

    /// How many lines of pebble's log contain `needle`.
    fn count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
    }

    /// The root pebble issues certificates under (it makes a new one at every start).
    fn issuing_root(&self, to: &Path) -> Result<()> {
        let out = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&self.tls_root)
            .arg(format!("https://{}/roots/0", self.management))
            .output()?;
        if !out.status.success() || !out.stdout.starts_with(b"-----BEGIN CERTIFICATE-----") {
            bail!("pebble's root: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::write(to, out.stdout)?;
        Ok(())
    }

    /// Points every name at `ip` from now on.
    fn point_at(&self, ip: &str) -> Result<()> {
        let out = Command::new("curl")
            .args(["-sS", "-X", "POST", "-d", &format!("{{\"ip\":\"{ip}\"}}")])
            .arg(format!("http://{}/set-default-ipv4", self.dns_management))
            .output()?;
        if !out.status.success() {
            bail!("pebble-challtestsrv: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

/// A port free on every test address, for the HTTP listeners pebble validates on.
fn port_free_on_all() -> u16 {
    loop {
        let port = free_port_on(IPS[0]);
        if IPS.iter().all(|ip| TcpListener::bind((*ip, port)).is_ok()) {
            return port;
        }
    }
}

/// The events of one kind, as `coyote events tail --json` shows them.
fn events_of(node: &Node, kind: &str) -> Result<Vec<Value>> {
    Ok(node.events()?.into_iter().filter(|e| e["kind"] == kind && e["outcome"] == "applied").collect())
}

/// curl of `https://name/` through the proxy at `ip:port`, trusting only `root`: its exit status
/// and the HTTP status (the service has no container: 502 is what a verified connection gets).
fn fetch(ip: &str, port: u16, name: &str, root: &Path) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{name}:{port}:{ip}")])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_certificate_is_ordered_once_and_survives_the_death_of_the_node_ordering_it() -> Result<()> {
    let root = tempfile::tempdir()?;
    let http_port = port_free_on_all();
    // The CA reaches the last node first (the first one, the leader, is the likely claimant).
    let pebble = Pebble::start(root.path(), http_port, 5001, IPS[2])?;
    let mut nodes: Vec<Node> = Vec::new();
    let mut https = Vec::new();
    for (i, ip) in IPS.iter().enumerate() {
        let mut n = Node::on_ip(root.path(), &format!("n{}", i + 1), ip);
        let port = free_port_on(ip);
        n.front = Some((format!("{ip}:{http_port}"), format!("{ip}:{port}")));
        n.flags = vec![
            "--acme-ca".into(),
            pebble.directory.clone(),
            "--acme-ca-root".into(),
            pebble.tls_root.display().to_string(),
            "--acme-email".into(),
            "admin@example.org".into(),
        ];
        if i == 0 {
            n.up()?;
        } else {
            let token = nodes[0].token(&[])?;
            n.join(&token)?;
        }
        nodes.push(n);
        https.push(port);
    }
    let ids: Vec<u64> = nodes.iter().map(node_id).collect::<Result<_>>()?;
    let name = format!("blog-{}.example.org", std::process::id());
    // Before there is a certificate, the name is served with a placeholder: TLS is up, but not trusted.
    nodes[0].cli_json(&["service", "create", "blog", "--image", "blog:1", "--domain", &name])?;

    let claim = wait_until("a node to claim the order", TIMEOUT, || {
        Ok(events_of(&nodes[0], "cert_order_claimed")?.first().cloned())
    })?;
    let claimant = claim["event"]["CertOrderClaimed"]["node"].as_u64().context("claimant")?;
    let c = ids.iter().position(|i| *i == claimant).context("the claimant is a node")?;
    let other = (c + 1) % 3;
    if c == 2 {
        pebble.point_at(IPS[other])?;
    }
    // (Once the node has applied the service: before, the name is unknown there.)
    let (code, _, err) = wait_until("the placeholder certificate", TIMEOUT, || {
        let answer = fetch(IPS[other], https[other], &name, &pebble.tls_root);
        Ok((answer.0 != 35).then_some(answer))
    })?;
    assert_eq!(code, 60, "a placeholder is not trusted: {err}");
    // Killed once its order is placed at the CA, before the certificate is in the log.
    wait_until("the order to be placed", TIMEOUT, || {
        Ok((!events_of(&nodes[other], "cert_order_placed")?.is_empty()).then_some(()))
    })?;
    nodes[c].kill9();
    assert!(events_of(&nodes[other], "cert_issued")?.is_empty(), "the kill came before the certificate");

    // Another node takes the order over once the claim lapses, and finishes it.
    let issued = wait_until("the certificate to be issued", TIMEOUT, || {
        Ok(events_of(&nodes[other], "cert_issued")?.first().cloned())
    })?;
    let by = issued["event"]["CertIssued"]["node"].as_u64().context("issuer node")?;
    assert_ne!(by, claimant, "the certificate came through the node that took over");
    assert!(
        issued["event"]["CertIssued"]["key_sealed"].as_array().is_some_and(|k| k.is_empty()),
        "no key shown"
    );
    assert_eq!(pebble.count("Added order"), 1, "exactly one order reached the CA");
    assert_eq!(pebble.count("Processing finalization"), 1, "exactly one finalization reached the CA");
    let resumed = events_of(&nodes[other], "cert_order_placed")?;
    assert_eq!(resumed.len(), 1, "the order was placed once: {resumed:?}");

    // Every node serves it; the killed node too, once it is back; and nothing is ordered again.
    let trusted = root.path().join("pebble-issuing-root.pem");
    pebble.issuing_root(&trusted)?;
    nodes[c].restart()?;
    for i in 0..3 {
        wait_until("every node to serve the certificate", TIMEOUT, || {
            let (code, status, err) = fetch(IPS[i], https[i], &name, &trusted);
            if code == 0 {
                assert_eq!(status, "502", "the service has no container");
                return Ok(Some(()));
            }
            bail!("curl exited {code}: {err}")
        })?;
    }
    let list = nodes[c].cli_json_lines(&["cert", "list"])?;
    let cert = list.iter().find(|v| v["name"] == name.as_str()).context("the name in cert list")?;
    assert_eq!(cert["state"], "valid", "{cert}");
    assert!(cert["issuer"].as_str().is_some_and(|i| i.contains("Pebble")), "{cert}");
    // Two of the orderers' passes (every 2 s) on every node, the restarted one included.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(pebble.count("Added order"), 1, "the restart ordered nothing");
    let issued_at = issued["index"].as_u64().context("index")?;
    let later = events_of(&nodes[c], "cert_order_claimed")?;
    assert!(later.iter().all(|e| e["index"].as_u64() < Some(issued_at)), "no claim after the certificate");
    for n in nodes.iter_mut() {
        n.kill9();
    }
    Ok(())
}

/// TLS-ALPN-01: the CA checks the name with a handshake on the HTTPS listener, which answers it
/// with the challenge's certificate; then the same listener serves the issued certificate.
#[test]
fn a_certificate_is_ordered_with_the_tls_alpn_challenge() -> Result<()> {
    let root = tempfile::tempdir()?;
    let ip = IPS[1];
    let (http, https) = (free_port_on(ip), free_port_on(ip));
    let pebble = Pebble::start(root.path(), free_port_on(IPS[0]), https, ip)?;
    let mut node = Node::on_ip(root.path(), "n1", ip);
    node.front = Some((format!("{ip}:{http}"), format!("{ip}:{https}")));
    node.flags = vec![
        "--acme-ca".into(),
        pebble.directory.clone(),
        "--acme-ca-root".into(),
        pebble.tls_root.display().to_string(),
        "--acme-challenge".into(),
        "tls-alpn-01".into(),
    ];
    node.up()?;
    let name = format!("alpn-{}.example.org", std::process::id());
    node.cli_json(&["service", "create", "site", "--image", "site:1", "--domain", &name])?;
    let issued = wait_until("the certificate to be issued", TIMEOUT, || {
        Ok(events_of(&node, "cert_issued")?.first().cloned())
    });
    if issued.is_err() {
        // What pebble and the node said, to tell a refused challenge from a node that never answered.
        eprintln!("pebble's log:\n{}", std::fs::read_to_string(&pebble.log).unwrap_or_default());
        eprintln!(
            "the node's log:\n{}",
            std::fs::read_to_string(root.path().join("n1.log")).unwrap_or_default()
        );
    }
    issued?;
    // pebble's HTTP-01 port has no listener: only the handshake could have proved the name.
    assert_eq!(pebble.count("Attempting to validate w/ HTTP"), 0, "not validated by HTTP-01");
    let trusted = root.path().join("pebble-issuing-root.pem");
    pebble.issuing_root(&trusted)?;
    let (code, status, err) = fetch(ip, https, &name, &trusted);
    assert_eq!((code, status.as_str()), (0, "502"), "{err}");
    node.kill9();
    Ok(())
}
