//! The data directory of a node: what is in it, and refusing one that is corrupt or foreign.
//!
//! ```text
//! DIR/node.json      which cluster, which node, where it listens (written once, at init or join)
//! DIR/tls/           ca.pem, ca.key (every member holds the CA), node.pem, node.key
//! DIR/store/         the store: snapshots and the event archive (sled), the Raft log and vote
//!                    (append-only segment files in DIR/store/raft-log/)
//! DIR/coyote.sock    the local API (only while the node runs)
//! DIR/lock           held while a node runs, so two nodes never share a directory
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use coyote_log::tls::{ClusterCa, Identity};
use serde::{Deserialize, Serialize};

/// Version of the data directory layout; a newer layout is refused rather than misread.
pub const LAYOUT_VERSION: u32 = 1;
const NODE_FILE: &str = "node.json";
const STORE_META_CLUSTER: &[u8] = b"cluster_id";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeFile {
    pub layout: u32,
    pub cluster_id: String,
    pub node_id: u64,
    /// Address the node binds.
    pub listen: String,
    /// Address other members dial.
    pub advertise: String,
}

pub struct DataDir {
    pub path: PathBuf,
}

impl DataDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DataDir { path: path.into() }
    }

    pub fn node_file(&self) -> PathBuf {
        self.path.join(NODE_FILE)
    }
    pub fn store(&self) -> PathBuf {
        self.path.join("store")
    }
    pub fn socket(&self) -> PathBuf {
        self.path.join("coyote.sock")
    }
    /// Written once this server is no longer a member: why. A node never starts from a directory
    /// that holds it.
    pub fn departed_file(&self) -> PathBuf {
        self.path.join("departed")
    }

    /// Records that this server is no longer a member, and why.
    pub fn write_departed(&self, why: &str) -> Result<()> {
        write_private(&self.departed_file(), &format!("{why}\n"))
    }

    /// Why this server is no longer a member, if it was told so.
    pub fn departed(&self) -> Option<String> {
        fs::read_to_string(self.departed_file()).ok().map(|s| s.trim().to_string())
    }
    fn tls(&self, name: &str) -> PathBuf {
        self.path.join("tls").join(name)
    }

    /// True if the directory does not exist or holds nothing.
    pub fn is_empty(&self) -> Result<bool> {
        match fs::read_dir(&self.path) {
            Ok(mut entries) => Ok(entries.next().is_none()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.path.display())),
        }
    }

    pub fn is_initialized(&self) -> bool {
        self.node_file().exists()
    }

    /// Creates an empty directory for a new node; refuses one that already holds something.
    pub fn create(&self) -> Result<()> {
        if !self.is_empty()? {
            bail!(
                "{} is not empty: refusing to create a node there (use `coyote node --data {}` to run the node it holds)",
                self.path.display(),
                self.path.display()
            );
        }
        fs::create_dir_all(self.path.join("tls"))
            .with_context(|| format!("cannot create {}", self.path.display()))?;
        restrict(&self.path)?;
        Ok(())
    }

    /// Removes what [`DataDir::create`] and a failed initialization wrote.
    pub fn remove_partial(&self) {
        for part in ["tls", "store", ".store.creating", NODE_FILE, "lock"] {
            let p = self.path.join(part);
            let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
    }

    pub fn write_identity(&self, ca: &ClusterCa, node_cert_pem: &str, node_key_pem: &str) -> Result<()> {
        write_private(&self.tls("ca.pem"), ca.cert_pem())?;
        write_private(&self.tls("ca.key"), ca.key_pem())?;
        write_private(&self.tls("node.pem"), node_cert_pem)?;
        write_private(&self.tls("node.key"), node_key_pem)?;
        Ok(())
    }

    pub fn write_node_file(&self, node: &NodeFile) -> Result<()> {
        let text = serde_json::to_string_pretty(node)?;
        write_private(&self.node_file(), &text)
    }

    /// Reads and checks `node.json`, with a message that says what is wrong with the directory.
    pub fn read_node_file(&self) -> Result<NodeFile> {
        let path = self.node_file();
        if !self.path.is_dir() {
            bail!("{} does not exist; create a node with `coyote init` or `coyote up`", self.path.display());
        }
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{} is not a coyote data directory: it has no {NODE_FILE}", self.path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let node: NodeFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt: refusing to start", path.display()))?;
        if node.layout != LAYOUT_VERSION {
            bail!(
                "{} has layout version {}, this coyote reads version {LAYOUT_VERSION}",
                path.display(),
                node.layout
            );
        }
        if node.node_id == 0 || node.cluster_id.is_empty() {
            bail!("{} is corrupt: node id or cluster id missing", path.display());
        }
        Ok(node)
    }

    pub fn read_identity(&self) -> Result<(Identity, Option<ClusterCa>)> {
        let read = |name: &str| {
            let p = self.tls(name);
            fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}: the data directory is incomplete", p.display()))
        };
        let identity = Identity::from_pem(&read("ca.pem")?, &read("node.pem")?, &read("node.key")?)
            .with_context(|| {
                format!("the certificates in {} are unusable", self.path.join("tls").display())
            })?;
        let ca = match self.tls("ca.key").exists() {
            true => Some(
                ClusterCa::from_pem(&read("ca.pem")?, &read("ca.key")?)
                    .with_context(|| format!("{} is unusable", self.tls("ca.key").display()))?,
            ),
            false => None,
        };
        Ok((identity, ca))
    }

    /// Takes the directory's lock for as long as the returned file lives.
    pub fn lock(&self) -> Result<File> {
        let path = self.path.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!("another coyote node is already running on {}", self.path.display())
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// Checks that the store belongs to the cluster `node.json` names, recording it on first use.
pub fn check_store_cluster(
    store: &coyote_log::store::StoreHandle,
    dir: &DataDir,
    cluster_id: &str,
) -> Result<()> {
    match store.meta_get(STORE_META_CLUSTER).context("cannot read the store's metadata")? {
        Some(found) if found == cluster_id.as_bytes() => Ok(()),
        Some(found) => bail!(
            "{} belongs to cluster {}, but {} names cluster {cluster_id}: refusing to mix them",
            dir.store().display(),
            String::from_utf8_lossy(&found),
            dir.node_file().display()
        ),
        None => store
            .meta_put(STORE_META_CLUSTER, cluster_id.as_bytes())
            .context("cannot write the store's metadata"),
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = private_file(&tmp)?;
        f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(unix)]
fn private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

#[cfg(unix)]
fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict permissions of {}", path.display()))
}

/// The default data directory: `$COYOTE_DATA`, else `/var/lib/coyote` for root, else
/// `$XDG_DATA_HOME/coyote` or `~/.local/share/coyote`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("COYOTE_DATA") {
        return PathBuf::from(d);
    }
    // SAFETY-free check for root: the home of root is /root on every system we target.
    let is_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/coyote");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("coyote");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/coyote")
}
