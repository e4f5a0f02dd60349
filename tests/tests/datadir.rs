//! A corrupt or foreign data directory is refused with a clear message, never a panic.

use std::process::Output;

use anyhow::Result;
use coyote_tests::Node;

fn refused(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "coyote accepted a bad data directory: {err}");
    assert!(!err.contains("panicked"), "coyote panicked: {err}");
    err
}

fn run_node(node: &Node) -> Output {
    std::process::Command::new(coyote_tests::coyote_bin())
        .args(["node", "--no-proxy", "--no-crm", "--data"])
        .arg(&node.dir)
        .output()
        .expect("running coyote")
}

#[test]
fn bad_data_directories_are_refused() -> Result<()> {
    let root = tempfile::tempdir()?;

    // Something else's directory.
    let stranger = Node::new(root.path(), "stranger");
    std::fs::create_dir_all(&stranger.dir)?;
    std::fs::write(stranger.dir.join("notes.txt"), "not coyote")?;
    let err = refused(&run_node(&stranger));
    assert!(err.contains("not a coyote data directory"), "{err}");
    let err = refused(&stranger.cli(&["init"]));
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(stranger.dir.join("notes.txt"))?, "not coyote");

    // A missing directory.
    let missing = Node::new(root.path(), "missing");
    let err = refused(&run_node(&missing));
    assert!(err.contains("does not exist"), "{err}");

    // Two real single-node clusters, stopped.
    let mut a = Node::new(root.path(), "a");
    a.up()?;
    a.kill9();
    let mut b = Node::new(root.path(), "b");
    b.up()?;
    b.kill9();

    // A store from another cluster.
    let foreign = Node::new(root.path(), "foreign");
    copy_dir(&a.dir, &foreign.dir)?;
    std::fs::remove_dir_all(foreign.dir.join("store"))?;
    copy_dir(&b.dir.join("store"), &foreign.dir.join("store"))?;
    let err = refused(&run_node(&foreign));
    assert!(err.contains("belongs to cluster"), "{err}");

    // node.json damaged.
    let damaged = Node::new(root.path(), "damaged");
    copy_dir(&a.dir, &damaged.dir)?;
    std::fs::write(damaged.dir.join("node.json"), "{ not json")?;
    let err = refused(&run_node(&damaged));
    assert!(err.contains("corrupt"), "{err}");

    // Certificates damaged.
    let certs = Node::new(root.path(), "certs");
    copy_dir(&a.dir, &certs.dir)?;
    std::fs::write(certs.dir.join("tls/node.pem"), "garbage")?;
    let err = refused(&run_node(&certs));
    assert!(err.contains("certificates"), "{err}");

    // Every file of the store overwritten with garbage.
    let store = Node::new(root.path(), "store");
    copy_dir(&a.dir, &store.dir)?;
    for entry in walk(&store.dir.join("store"))? {
        let len = std::fs::metadata(&entry)?.len().max(64) as usize;
        std::fs::write(&entry, (0..len).map(|i| (i * 7919 % 251) as u8).collect::<Vec<u8>>())?;
    }
    let err = refused(&run_node(&store));
    assert!(err.contains("store"), "{err}");

    // The untouched original still runs.
    a.restart()?;
    assert_eq!(a.events()?[0]["kind"], "cluster_created");
    Ok(())
}

fn walk(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else if e.file_name() != "coyote.sock" {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}
