//! A snapshot as a tar stream, for copies outside the cluster and for inspection with common tools.
//!
//! [`export_tar`] writes GNU-format headers (long names and long link targets as GNU extensions)
//! with each entry's mode, owner ids and modification time (whole seconds: tar keeps no more). The
//! stream starts with `./`, the top directory, followed by every entry of the manifest in order.
//! File content is read chunk by chunk, each checked against its hash, so memory use stays at one
//! chunk whatever the file sizes.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tar::{EntryType, Header};

use crate::chunks::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::manifest::{show_path, Attrs, ChunkRef, EntryKind, Manifest};

/// Writes snapshot `snapshot_id` from `store` to `out` as a tar stream.
///
/// On error the stream is incomplete; the error is the store's (a missing or corrupt chunk) or an
/// I/O error on `out`.
pub fn export_tar<W: Write>(store: &ChunkStore, snapshot_id: &ChunkId, out: W) -> Result<()> {
    let manifest = Manifest::load(store, snapshot_id)?;
    let out_err = |e: io::Error| Error::io("<tar output>", e);
    let mut builder = tar::Builder::new(out);

    let mut top = header(EntryType::Directory, manifest.root(), 0);
    builder.append_data(&mut top, "./", io::empty()).map_err(out_err)?;

    for entry in manifest.entries() {
        let path = entry.path();
        let named = |e: io::Error| Error::io(format!("<tar output: {}>", show_path(&entry.path)), e);
        match &entry.kind {
            EntryKind::Dir => {
                let mut h = header(EntryType::Directory, &entry.attrs, 0);
                builder.append_data(&mut h, path, io::empty()).map_err(named)?;
            }
            EntryKind::Symlink { target } => {
                let mut h = header(EntryType::Symlink, &entry.attrs, 0);
                builder.append_link(&mut h, path, Path::new(OsStr::from_bytes(target))).map_err(named)?;
            }
            EntryKind::File { size, chunks } => {
                let mut h = header(EntryType::Regular, &entry.attrs, *size);
                let mut reader = ChunkReader { store, chunks, next: 0, buf: Vec::new(), pos: 0, error: None };
                let appended = builder.append_data(&mut h, path, &mut reader);
                if let Some(e) = reader.error.take() {
                    return Err(e);
                }
                appended.map_err(named)?;
            }
        }
    }
    let mut out = builder.into_inner().map_err(out_err)?;
    out.flush().map_err(out_err)
}

fn header(kind: EntryType, attrs: &Attrs, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(attrs.mode);
    h.set_uid(u64::from(attrs.uid));
    h.set_gid(u64::from(attrs.gid));
    h.set_mtime(u64::try_from(attrs.mtime.secs).unwrap_or(0));
    h.set_size(size);
    h
}

/// A file's content, read from the store one checked chunk at a time. A store error is kept in
/// `error` (the tar builder only passes `io::Error` through).
struct ChunkReader<'a> {
    store: &'a ChunkStore,
    chunks: &'a [ChunkRef],
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    error: Option<Error>,
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            let Some(c) = self.chunks.get(self.next) else { return Ok(0) };
            self.next += 1;
            let error = match self.store.get(&c.id) {
                Ok(data) if data.len() == c.len as usize => {
                    self.buf = data;
                    self.pos = 0;
                    continue;
                }
                Ok(data) => {
                    Error::corrupt(c.id, format!("{} bytes, the manifest says {}", data.len(), c.len))
                }
                Err(e) => e,
            };
            let message = error.to_string();
            self.error = Some(error);
            return Err(io::Error::other(message));
        }
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let n = rest.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), rest.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos += n;
        Ok(n)
    }
}
