//! The manifest: the description of one snapshot of a directory tree.
//!
//! A manifest holds the attributes of the snapshot's top directory and one [`Entry`] per file,
//! directory and symbolic link below it, sorted by path (byte order, so a directory comes before
//! everything inside it). A regular file lists its content as chunks, each with its length, so the
//! file's size can be checked against its chunks without reading them.
//!
//! Encoded, a manifest is one format-version byte followed by its bincode form. It is stored in the
//! [`ChunkStore`] cut into parts by content-defined chunking ([`PART_MIN`]/[`PART_AVG`]/
//! [`PART_MAX`]), each part a chunk, and an index object listing the parts ([`INDEX_VERSION`] and
//! the bincode form of the parts' [`ChunkRef`]s); the snapshot's id is the index's [`ChunkId`].
//! Entries are sorted by path, so two snapshots of a tree share every part but those around what
//! changed, and shipping a snapshot ships only those parts and a small index. A manifest of at most
//! [`WHOLE_MAX`] bytes is stored whole, as one object holding its encoded form, and its id is the
//! snapshot's.
//!
//! A manifest may come from another node, so [`Manifest::decode`] trusts nothing: it refuses
//! absolute paths, `.`/`..` and empty components, NUL bytes, unsorted or repeated paths, an entry
//! whose parent is not a directory of the manifest (a path through a symbolic link could otherwise
//! lead a restore outside its target), a file whose size is not the sum of its chunk lengths, and
//! chunk lengths beyond [`MAX_CHUNK_BYTES`].

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chunks::{Batch, ChunkId, ChunkStore, Put, MAX_CHUNK_BYTES, MAX_OBJECT_BYTES};
use crate::error::{Error, Result};
use fastcdc::v2020::FastCDC;

/// The format version written as the first byte of an encoded manifest.
pub const FORMAT_VERSION: u8 = 1;

/// The first byte of a snapshot's index object, which lists the parts of its encoded manifest.
pub const INDEX_VERSION: u8 = 2;

/// The smallest part an encoded manifest is cut into (except its last).
pub const PART_MIN: usize = 2 * 1024;
/// The average size of a manifest's parts.
pub const PART_AVG: usize = 8 * 1024;
/// The largest part of a manifest.
pub const PART_MAX: usize = 32 * 1024;

/// A manifest that encodes to at most this many bytes is stored whole, as one object: cutting it
/// would save little, and would cost a node that fetches the snapshot one more round trip.
pub const WHOLE_MAX: usize = 64 * 1024;

/// The longest path (in bytes) a manifest may hold, as Linux's `PATH_MAX` less its NUL.
pub const MAX_PATH_BYTES: usize = 4095;

/// The longest name of one path component, as Linux's `NAME_MAX`.
pub const MAX_NAME_BYTES: usize = 255;

/// Permission bits, with set-user-id, set-group-id and sticky: what a manifest's `mode` may hold.
pub const MODE_MASK: u32 = 0o7777;

/// A point in time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds (negative before 1970).
    pub secs: i64,
    /// Nanoseconds, below 1,000,000,000.
    pub nanos: u32,
}

/// Ownership, permissions and modification time of a file, directory or link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Attrs {
    /// Permission bits, with set-id and sticky bits (at most [`MODE_MASK`]); no file type bits.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
}

/// One chunk of a file's content: its id and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The chunk.
    pub id: ChunkId,
    /// Its uncompressed length (1 to [`MAX_CHUNK_BYTES`]).
    pub len: u32,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file: its size and its content as chunks, in order.
    File {
        /// The size in bytes, which equals the sum of the chunk lengths.
        size: u64,
        /// The content.
        chunks: Vec<ChunkRef>,
    },
    /// A directory.
    Dir,
    /// A symbolic link and the bytes it points to (never followed by this crate).
    Symlink {
        /// The link's target as stored in the link.
        target: Vec<u8>,
    },
}

/// One file, directory or symbolic link of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The path relative to the snapshot's top directory, as bytes (`a/b/c`).
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// Mode, owner and modification time.
    pub attrs: Attrs,
}

impl Entry {
    /// The relative path as a [`Path`].
    pub fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.path))
    }
}

/// The description of one snapshot. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    root: Attrs,
    entries: Vec<Entry>,
}

impl Manifest {
    /// A manifest of a top directory with attributes `root` and `entries` below it, which must be
    /// valid (see [`Manifest::validate`]); entries are sorted here.
    pub fn new(root: Attrs, mut entries: Vec<Entry>) -> Result<Manifest> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Manifest { root, entries };
        manifest.validate()?;
        Ok(manifest)
    }

    /// The attributes of the snapshot's top directory.
    pub fn root(&self) -> &Attrs {
        &self.root
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The distinct chunks the files of this snapshot use, in id order.
    pub fn chunks(&self) -> Vec<ChunkId> {
        let mut ids = BTreeSet::new();
        for entry in &self.entries {
            if let EntryKind::File { chunks, .. } = &entry.kind {
                ids.extend(chunks.iter().map(|c| c.id));
            }
        }
        ids.into_iter().collect()
    }

    /// The total size of the files (logical bytes, counting a chunk each time it is used).
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File { size, .. } => *size,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add)
    }

    /// The encoded manifest: [`FORMAT_VERSION`] and the bincode form.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| Error::manifest(format!("cannot encode: {e}")))?;
        let mut out = Vec::with_capacity(body.len() + 1);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&body);
        if out.len() > MAX_OBJECT_BYTES {
            return Err(Error::manifest(format!(
                "encodes to {} bytes, more than the limit of {MAX_OBJECT_BYTES}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Decodes and validates a manifest from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MAX_OBJECT_BYTES {
            return Err(Error::manifest(format!(
                "{} bytes, more than the limit of {MAX_OBJECT_BYTES}",
                bytes.len()
            )));
        }
        let Some((&version, body)) = bytes.split_first() else {
            return Err(Error::manifest("empty"));
        };
        if version != FORMAT_VERSION {
            return Err(Error::manifest(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        let config = bincode::config::standard().with_limit::<MAX_OBJECT_BYTES>();
        let (manifest, read): (Manifest, usize) = bincode::serde::decode_from_slice(body, config)
            .map_err(|e| Error::manifest(format!("cannot decode: {e}")))?;
        if read != body.len() {
            return Err(Error::manifest(format!("{} trailing bytes", body.len().saturating_sub(read))));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Reads snapshot `id` from `store` (its index and parts, or a manifest stored whole) and
    /// decodes it.
    pub fn load(store: &ChunkStore, id: &ChunkId) -> Result<Manifest> {
        let object = store.get_with_limit(id, MAX_OBJECT_BYTES)?;
        let Some(parts) = decode_index(&object)? else {
            return Manifest::decode(&object);
        };
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len as usize).sum());
        for part in &parts {
            let data = store.get_with_limit(&part.id, part.len as usize)?;
            if data.len() != part.len as usize {
                return Err(Error::manifest(format!(
                    "part {} has {} bytes, the index says {}",
                    part.id,
                    data.len(),
                    part.len
                )));
            }
            bytes.extend_from_slice(&data);
        }
        Manifest::decode(&bytes)
    }

    /// Encodes this manifest and stores its parts and its index in `store` (or, up to
    /// [`WHOLE_MAX`] bytes, the manifest whole); the returned id is the snapshot's id (the
    /// index's), and its stored bytes count the new parts too.
    pub fn store(&self, store: &ChunkStore) -> Result<Put> {
        let encoded = self.encode()?;
        if encoded.len() <= WHOLE_MAX {
            return store.put(&encoded);
        }
        let mut batch = Batch::default();
        let mut parts = Vec::new();
        let mut stored_bytes = 0;
        for cut in FastCDC::new(&encoded, PART_MIN, PART_AVG, PART_MAX) {
            let data = encoded.get(cut.offset..cut.offset + cut.length).unwrap_or_default();
            let put = store.stage(&mut batch, data)?;
            stored_bytes += put.stored_bytes;
            parts.push(ChunkRef { id: put.id, len: cut.length as u32 });
        }
        // The parts are durable under their names before the index that names them is.
        store.publish(batch)?;
        let mut index = vec![INDEX_VERSION];
        bincode::serde::encode_into_std_write(&parts, &mut index, bincode::config::standard())
            .map_err(|e| Error::manifest(format!("cannot encode the index: {e}")))?;
        let put = store.put(&index)?;
        Ok(Put { stored_bytes: put.stored_bytes + stored_bytes, ..put })
    }

    /// The parts of snapshot `id`'s manifest, as its index in `store` lists them (none for a
    /// manifest stored whole). A node that receives a snapshot fetches its index, then these, then
    /// the chunks the manifest names.
    pub fn parts(store: &ChunkStore, id: &ChunkId) -> Result<Vec<ChunkId>> {
        let object = store.get_with_limit(id, MAX_OBJECT_BYTES)?;
        Ok(decode_index(&object)?.unwrap_or_default().into_iter().map(|p| p.id).collect())
    }

    /// Checks everything [`Manifest::decode`] promises (see the [module documentation](self)).
    pub fn validate(&self) -> Result<()> {
        check_attrs(&self.root).map_err(|r| Error::manifest(format!("top directory: {r}")))?;
        let mut dirs: HashSet<&[u8]> = HashSet::new();
        let mut previous: Option<&[u8]> = None;
        for entry in &self.entries {
            let path = entry.path.as_slice();
            let fail = |reason: String| Error::manifest(format!("{}: {reason}", show_path(path)));
            check_path(path).map_err(|r| fail(r.to_string()))?;
            if let Some(prev) = previous {
                if prev >= path {
                    return Err(fail(format!(
                        "not after {} (paths must be sorted and unique)",
                        show_path(prev)
                    )));
                }
            }
            previous = Some(path);
            if let Some(parent) = parent_of(path) {
                if !dirs.contains(parent) {
                    return Err(fail("its parent is not a directory of this snapshot".into()));
                }
            }
            check_attrs(&entry.attrs).map_err(|r| fail(r.to_string()))?;
            match &entry.kind {
                EntryKind::Dir => {
                    dirs.insert(path);
                }
                EntryKind::Symlink { target } => {
                    if target.is_empty() || target.len() > MAX_PATH_BYTES || target.contains(&0) {
                        return Err(fail("symbolic link target empty, too long or with a NUL byte".into()));
                    }
                }
                EntryKind::File { size, chunks } => {
                    let mut sum = 0u64;
                    for c in chunks {
                        if c.len == 0 || c.len as usize > MAX_CHUNK_BYTES {
                            return Err(fail(format!(
                                "chunk {} has length {}, outside 1..={MAX_CHUNK_BYTES}",
                                c.id, c.len
                            )));
                        }
                        sum = sum.saturating_add(u64::from(c.len));
                    }
                    if sum != *size {
                        return Err(fail(format!("size {size} is not the sum of its chunk lengths ({sum})")));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The path with non-UTF-8 bytes replaced, cut short for an error message.
pub(crate) fn show_path(path: &[u8]) -> String {
    let cut = path.get(..200).unwrap_or(path);
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < path.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// The parent of a relative path, `None` for a top-level name.
fn parent_of(path: &[u8]) -> Option<&[u8]> {
    let slash = path.iter().rposition(|&b| b == b'/')?;
    path.get(..slash)
}

/// Checks that `path` is relative, with only normal components, within the length limits.
pub(crate) fn check_path(path: &[u8]) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty path");
    }
    if path.len() > MAX_PATH_BYTES {
        return Err("path too long");
    }
    if path.contains(&0) {
        return Err("NUL byte in path");
    }
    if path.first() == Some(&b'/') {
        return Err("absolute path");
    }
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" => return Err("empty path component"),
            b"." => return Err("`.` component"),
            b".." => return Err("`..` component"),
            c if c.len() > MAX_NAME_BYTES => return Err("path component too long"),
            _ => {}
        }
    }
    Ok(())
}

/// The parts an index object lists, or `None` when `object` is not an index (a manifest stored
/// whole). Refuses an index that does not decode, names a part of 0 bytes or more than
/// [`PART_MAX`], or adds up to more than [`MAX_OBJECT_BYTES`].
fn decode_index(object: &[u8]) -> Result<Option<Vec<ChunkRef>>> {
    let Some((&INDEX_VERSION, body)) = object.split_first() else {
        return Ok(None);
    };
    let config = bincode::config::standard().with_limit::<MAX_OBJECT_BYTES>();
    let (parts, read): (Vec<ChunkRef>, usize) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| Error::manifest(format!("cannot decode the index: {e}")))?;
    if read != body.len() {
        return Err(Error::manifest(format!(
            "{} trailing bytes after the index",
            body.len().saturating_sub(read)
        )));
    }
    let mut total = 0usize;
    for part in &parts {
        if part.len == 0 || part.len as usize > PART_MAX {
            return Err(Error::manifest(format!(
                "index names part {} of {} bytes, outside 1..={PART_MAX}",
                part.id, part.len
            )));
        }
        total = total.saturating_add(part.len as usize);
    }
    if total > MAX_OBJECT_BYTES {
        return Err(Error::manifest(format!("index adds up to {total} bytes, more than {MAX_OBJECT_BYTES}")));
    }
    Ok(Some(parts))
}

fn check_attrs(attrs: &Attrs) -> Result<(), &'static str> {
    if attrs.mode & !MODE_MASK != 0 {
        return Err("mode has bits beyond the permission bits");
    }
    if attrs.uid == u32::MAX || attrs.gid == u32::MAX {
        return Err("owner id -1");
    }
    if attrs.mtime.nanos >= 1_000_000_000 {
        return Err("mtime nanoseconds out of range");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs() -> Attrs {
        Attrs { mode: 0o755, uid: 0, gid: 0, mtime: Timestamp { secs: 1, nanos: 2 } }
    }

    fn file(path: &str, lens: &[u32]) -> Entry {
        let chunks: Vec<ChunkRef> =
            lens.iter().map(|&len| ChunkRef { id: ChunkId::of(&len.to_le_bytes()), len }).collect();
        let size = lens.iter().map(|&l| u64::from(l)).sum();
        Entry { path: path.as_bytes().to_vec(), kind: EntryKind::File { size, chunks }, attrs: attrs() }
    }

    fn dir(path: &str) -> Entry {
        Entry { path: path.as_bytes().to_vec(), kind: EntryKind::Dir, attrs: attrs() }
    }

    /// Encodes a manifest without validating it, as a hostile peer would.
    fn raw(entries: Vec<Entry>) -> Vec<u8> {
        let m = Manifest { root: attrs(), entries };
        let mut out = vec![FORMAT_VERSION];
        out.extend(bincode::serde::encode_to_vec(&m, bincode::config::standard()).unwrap());
        out
    }

    #[test]
    fn a_valid_manifest_round_trips() {
        let m = Manifest::new(attrs(), vec![file("a/x", &[5, 7]), dir("a"), file("b", &[])]).unwrap();
        assert_eq!(m.entries()[0].path, b"a");
        assert_eq!(Manifest::decode(&m.encode().unwrap()).unwrap(), m);
        assert_eq!(m.total_bytes(), 12);
        assert_eq!(m.chunks().len(), 2);
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("parent", raw(vec![file("../x", &[1])])),
            ("absolute", raw(vec![file("/etc/passwd", &[1])])),
            ("empty component", raw(vec![dir("a"), file("a//x", &[1])])),
            ("dot", raw(vec![file("./x", &[1])])),
            ("empty", raw(vec![file("", &[1])])),
            ("unsorted", raw(vec![file("b", &[1]), file("a", &[1])])),
            ("duplicate", raw(vec![file("a", &[1]), file("a", &[1])])),
            ("no parent", raw(vec![file("a/x", &[1])])),
            ("parent is a file", raw(vec![file("a", &[1]), file("a/x", &[1])])),
            (
                "parent is a link",
                raw(vec![
                    Entry {
                        path: b"a".to_vec(),
                        kind: EntryKind::Symlink { target: b"/etc".to_vec() },
                        attrs: attrs(),
                    },
                    file("a/passwd", &[1]),
                ]),
            ),
            (
                "huge size",
                raw(vec![Entry {
                    path: b"a".to_vec(),
                    kind: EntryKind::File {
                        size: u64::MAX,
                        chunks: vec![ChunkRef { id: ChunkId([0; 32]), len: 1 }],
                    },
                    attrs: attrs(),
                }]),
            ),
            ("huge chunk", raw(vec![file("a", &[u32::MAX])])),
            ("zero chunk", raw(vec![file("a", &[0])])),
            (
                "mode",
                raw(vec![Entry {
                    path: b"a".to_vec(),
                    kind: EntryKind::Dir,
                    attrs: Attrs { mode: 0o40755, ..attrs() },
                }]),
            ),
            ("truncated", {
                let mut b = raw(vec![file("a", &[1, 2, 3])]);
                b.truncate(b.len() - 3);
                b
            }),
            ("trailing", {
                let mut b = raw(vec![file("a", &[1])]);
                b.push(0);
                b
            }),
            ("version", {
                let mut b = raw(vec![]);
                b[0] = 9;
                b
            }),
            ("nothing", vec![]),
        ];
        let reasons = [
            ("parent", "`..` component"),
            ("absolute", "absolute path"),
            ("empty component", "empty path component"),
            ("dot", "`.` component"),
            ("empty", "empty path"),
            ("unsorted", "sorted and unique"),
            ("duplicate", "sorted and unique"),
            ("no parent", "parent is not a directory"),
            ("parent is a file", "parent is not a directory"),
            ("parent is a link", "parent is not a directory"),
            ("huge size", "not the sum of its chunk lengths"),
            ("huge chunk", "outside 1..="),
            ("zero chunk", "outside 1..="),
            ("mode", "beyond the permission bits"),
            ("truncated", "cannot decode"),
            ("trailing", "trailing bytes"),
            ("version", "format version 9"),
            ("nothing", "empty"),
        ];
        assert_eq!(cases.len(), reasons.len());
        for ((name, bytes), (name2, reason)) in cases.into_iter().zip(reasons) {
            assert_eq!(name, name2);
            match Manifest::decode(&bytes) {
                Err(e @ Error::InvalidManifest { .. }) => {
                    assert!(e.to_string().contains(reason), "{name}: {e} does not say {reason:?}")
                }
                other => panic!("{name}: expected InvalidManifest, got {other:?}"),
            }
        }
    }

    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0), 1..12)
            .prop_filter("not . or ..", |n| n != b"." && n != b"..")
    }

    fn arb_attrs() -> impl Strategy<Value = Attrs> {
        (0..=MODE_MASK, 0..u32::MAX, 0..u32::MAX, any::<i64>(), 0..1_000_000_000u32).prop_map(
            |(mode, uid, gid, secs, nanos)| Attrs { mode, uid, gid, mtime: Timestamp { secs, nanos } },
        )
    }

    fn arb_kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            Just(EntryKind::Dir),
            proptest::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..40)
                .prop_map(|target| EntryKind::Symlink { target }),
            proptest::collection::vec((any::<[u8; 32]>(), 1..=MAX_CHUNK_BYTES as u32), 0..5).prop_map(|cs| {
                let chunks: Vec<ChunkRef> =
                    cs.into_iter().map(|(id, len)| ChunkRef { id: ChunkId(id), len }).collect();
                EntryKind::File { size: chunks.iter().map(|c| u64::from(c.len)).sum(), chunks }
            }),
        ]
    }

    /// Valid manifests: each entry's parent is a directory entry made for it.
    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let entry = (proptest::collection::vec(arb_name(), 1..4), arb_kind(), arb_attrs());
        (arb_attrs(), proptest::collection::vec(entry, 0..20)).prop_map(|(root, specs)| {
            let mut entries: Vec<Entry> = Vec::new();
            let mut seen = HashSet::new();
            for (names, kind, attrs) in specs {
                let mut path = Vec::new();
                for (i, name) in names.iter().enumerate() {
                    if i > 0 {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name);
                    let last = i + 1 == names.len();
                    if !seen.insert(path.clone()) {
                        continue;
                    }
                    let kind = if last { kind.clone() } else { EntryKind::Dir };
                    entries.push(Entry { path: path.clone(), kind, attrs });
                }
            }
            // A path taken earlier as a file or link cannot be a parent: keep only entries whose
            // ancestors are all directories.
            let kinds: std::collections::HashMap<Vec<u8>, bool> =
                entries.iter().map(|e| (e.path.clone(), e.kind == EntryKind::Dir)).collect();
            entries.retain(|e| {
                let mut p = e.path.as_slice();
                while let Some(parent) = parent_of(p) {
                    if kinds.get(parent) != Some(&true) {
                        return false;
                    }
                    p = parent;
                }
                true
            });
            Manifest::new(root, entries).expect("generated manifest is valid")
        })
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Manifest::decode(&bytes);
            let mut versioned = vec![FORMAT_VERSION];
            versioned.extend_from_slice(&bytes);
            let _ = Manifest::decode(&versioned);
        }

        #[test]
        fn valid_manifests_round_trip(m in arb_manifest()) {
            let bytes = m.encode().unwrap();
            prop_assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn damaged_encodings_never_panic(m in arb_manifest(), cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), bit in 0..8u8) {
            let bytes = m.encode().unwrap();
            let _ = Manifest::decode(&bytes[..cut.index(bytes.len())]);
            let mut flipped = bytes.clone();
            let i = flip.index(flipped.len());
            flipped[i] ^= 1 << bit;
            let _ = Manifest::decode(&flipped);
        }
    }
}
