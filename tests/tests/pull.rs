//! A real image pull: a service whose image is not on this server comes up once the reconciler has
//! pulled it from a registry. The registry is Debian's `docker-registry` (the distribution registry
//! that Docker Hub runs), started by the test on 127.0.0.1 with its own storage, and the image is one
//! of the test images pushed into it; Docker treats registries on 127.0.0.0/8 as insecure by default,
//! so no TLS is needed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use coyote_tests::{docker, free_port, http_get, test_images, wait_until, DockerGuard, Node};

struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Result<Registry> {
        if Command::new("docker-registry").arg("--version").output().is_err() {
            bail!(
                "docker-registry is missing: ./scripts/test.sh installs it (Debian package docker-registry)"
            );
        }
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let registry = Registry { child, addr, _dir: dir };
        wait_until("the registry to listen", Duration::from_secs(20), || {
            Ok(std::net::TcpStream::connect(&registry.addr).ok().map(drop))
        })?;
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_missing_image_is_pulled_from_a_registry_and_the_service_comes_up() -> Result<()> {
    test_images()?;
    let registry = Registry::start()?;
    let mut guard = DockerGuard::default();
    let image = format!("{}/coyote-test/pulled{}:1", registry.addr, std::process::id());
    docker(&["tag", "coyote-test/httpd:1", &image])?;
    guard.image_tags.push(image.clone());
    docker(&["push", &image])?;
    // Gone from this server: only the registry has it now.
    docker(&["rmi", &image])?;
    assert!(docker(&["image", "inspect", &image]).is_err(), "the image must be missing before the pull");

    let root = tempfile::tempdir()?;
    let mut node = Node::new(root.path(), "n1");
    node.containers = true;
    node.up()?;
    guard.cluster_ids.push(node.cluster_id()?);
    let port = free_port();
    let service = format!("pulled{}", std::process::id());
    node.cli_json(&["service", "create", &service, "--image", &image, "--port", &format!("{port}:80")])?;
    let page = wait_until("the pulled service to answer", Duration::from_secs(90), || {
        // An empty answer is the engine's port forwarder before the server in the container listens.
        Ok(http_get(port).ok().filter(|p| p.contains("coyote test 1")))
    })?;
    assert!(page.contains(" 200 ") && page.contains("coyote test 1"), "{page}");
    docker(&["image", "inspect", &image]).context("the image is on this server after the pull")?;
    let log = node.log_text();
    assert!(log.contains("pulling image") && log.contains("image pulled"), "{log}");
    // No image alarm is left open.
    let alarms = node.cli_json_lines(&["alarm", "list"])?;
    assert!(
        alarms.iter().all(|a| !a["key"].as_str().unwrap_or("").starts_with("image-missing")),
        "{alarms:?}"
    );
    drop(node);
    guard.clean();
    Ok(())
}
