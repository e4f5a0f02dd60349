//! The chunk store: content addressing, damage detection, and refusal of bad chunks from peers.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use common::{flip_byte, Rng};
use coyote_data::{Batch, ChunkId, ChunkStore, Error, MAX_CHUNK_BYTES, MAX_OBJECT_BYTES};

#[test]
fn chunk_ids_print_and_parse_as_hex() {
    let id = ChunkId::of(b"abc");
    let hex = id.to_string();
    assert_eq!(hex, "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
    assert_eq!(hex.parse::<ChunkId>().unwrap(), id);
    assert_eq!(hex.to_uppercase().parse::<ChunkId>().unwrap(), id);
    for bad in ["", "00", &hex[1..], &format!("{}g", &hex[1..]), &format!("{hex}0"), "é"] {
        assert!(matches!(bad.parse::<ChunkId>(), Err(Error::InvalidChunkId { .. })), "{bad:?}");
    }
    let encoded = bincode::serde::encode_to_vec(id, bincode::config::standard()).unwrap();
    assert_eq!(encoded.len(), 32);
    let (back, _): (ChunkId, usize) =
        bincode::serde::decode_from_slice(&encoded, bincode::config::standard()).unwrap();
    assert_eq!(back, id);
}

#[test]
fn put_get_list_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    let data = Rng::new(1).bytes(100_000);
    let put = store.put(&data).unwrap();
    assert!(put.new);
    assert_eq!(put.id, ChunkId::of(&data));
    assert!(put.stored_bytes > 0);
    let hex = put.id.to_string();
    assert_eq!(store.chunk_path(&put.id), tmp.path().join("chunks").join(&hex[..2]).join(&hex));
    assert!(store.contains(&put.id));
    assert_eq!(store.get(&put.id).unwrap(), data);

    // Compressible data is stored compressed.
    let zeros = vec![0u8; 200_000];
    let z = store.put(&zeros).unwrap();
    assert!(z.stored_bytes < 1000, "{} bytes stored for 200 kB of zeros", z.stored_bytes);
    assert_eq!(store.get(&z.id).unwrap(), zeros);

    // A chunk already present is not written again.
    let before = fs::metadata(store.chunk_path(&put.id)).unwrap();
    let again = store.put(&data).unwrap();
    assert!(!again.new);
    assert_eq!(again.stored_bytes, 0);
    let after = fs::metadata(store.chunk_path(&put.id)).unwrap();
    assert_eq!((before.ino(), before.mtime_nsec()), (after.ino(), after.mtime_nsec()));

    let mut expected = vec![put.id, z.id];
    expected.sort();
    assert_eq!(store.list().unwrap(), expected);
    assert!(store.remove(&put.id).unwrap());
    assert!(!store.remove(&put.id).unwrap());
    assert!(matches!(store.get(&put.id), Err(Error::MissingChunk { .. })));
    assert_eq!(store.list().unwrap(), vec![z.id]);
    assert_eq!(common::tmp_files(tmp.path()), 0);
    assert!(store.free_bytes().unwrap() > 0);
}

#[test]
fn a_batch_is_invisible_until_published_and_leaves_nothing_when_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    let present = store.put(b"already here").unwrap().id;
    let datas: Vec<Vec<u8>> = (0..20).map(|i| Rng::new(i).bytes(5_000 + i as usize)).collect();

    // Dropped: nothing stored, no temporary file left.
    let mut batch = Batch::default();
    for data in &datas {
        assert!(store.stage(&mut batch, data).unwrap().new);
    }
    assert_eq!(batch.len(), 20);
    assert_eq!(common::tmp_files(tmp.path()), 20);
    assert!(datas.iter().all(|d| !store.contains(&ChunkId::of(d))));
    drop(batch);
    assert_eq!(common::tmp_files(tmp.path()), 0);
    assert_eq!(store.list().unwrap(), vec![present]);

    // Published: every chunk readable under its name; a chunk staged twice or already present is
    // written once.
    let mut batch = Batch::default();
    for data in &datas {
        store.stage(&mut batch, data).unwrap();
    }
    assert!(!store.stage(&mut batch, &datas[3]).unwrap().new);
    assert!(!store.stage(&mut batch, b"already here").unwrap().new);
    let compressed = store.get_compressed(&present).unwrap();
    assert!(!store.stage_compressed(&mut batch, &present, &compressed).unwrap().new);
    assert_eq!(batch.len(), 20);
    // A received chunk that does not hash to its id is refused and leaves the batch as it was.
    let wrong = ChunkId::of(b"something else");
    assert!(matches!(
        store.stage_compressed(&mut batch, &wrong, &compressed),
        Err(Error::HashMismatch { .. })
    ));
    store.publish(batch).unwrap();
    assert_eq!(common::tmp_files(tmp.path()), 0);
    for data in &datas {
        assert_eq!(&store.get(&ChunkId::of(data)).unwrap(), data);
    }
    assert_eq!(store.list().unwrap().len(), 21);
}

#[test]
fn opening_removes_stale_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    let id = store.put(b"kept").unwrap().id;
    drop(store);
    fs::write(tmp.path().join("tmp/half-written"), b"partial").unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    assert_eq!(common::tmp_files(tmp.path()), 0);
    assert_eq!(store.get(&id).unwrap(), b"kept");
}

#[test]
fn a_flipped_byte_is_detected_by_get_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    let mut rng = Rng::new(2);
    let ids: Vec<ChunkId> = (0..5).map(|_| store.put(&rng.bytes(50_000)).unwrap().id).collect();
    assert_eq!(store.verify().unwrap().corrupt, Vec::<ChunkId>::new());

    flip_byte(&store.chunk_path(&ids[3]));
    match store.get(&ids[3]) {
        Err(Error::Corrupt { id, reason }) => {
            assert_eq!(id, ids[3]);
            assert!(!reason.is_empty());
        }
        other => panic!("a damaged chunk read back: {other:?}"),
    }
    let report = store.verify().unwrap();
    assert_eq!(report.checked, 5);
    assert_eq!(report.corrupt, vec![ids[3]]);
    for id in [ids[0], ids[1], ids[2], ids[4]] {
        store.get(&id).unwrap();
    }

    // A chunk stored under another chunk's name is found too.
    fs::copy(store.chunk_path(&ids[0]), store.chunk_path(&ids[1])).unwrap();
    assert!(matches!(store.get(&ids[1]), Err(Error::Corrupt { .. })));
    let mut corrupt = store.verify().unwrap().corrupt;
    corrupt.sort();
    let mut expected = vec![ids[1], ids[3]];
    expected.sort();
    assert_eq!(corrupt, expected);
}

#[test]
fn put_compressed_checks_what_it_receives() {
    let tmp = tempfile::tempdir().unwrap();
    let sender = ChunkStore::open(tmp.path().join("sender")).unwrap();
    let receiver = ChunkStore::open(tmp.path().join("receiver")).unwrap();
    let mut rng = Rng::new(3);
    let a = sender.put(&rng.bytes(70_000)).unwrap().id;
    let b = sender.put(&rng.bytes(70_000)).unwrap().id;
    let a_bytes = sender.get_compressed(&a).unwrap();

    // The right bytes under the right id are stored.
    let put = receiver.put_compressed(&a, &a_bytes).unwrap();
    assert!(put.new);
    assert_eq!(receiver.get(&a).unwrap(), sender.get(&a).unwrap());

    // A's bytes under B's id are refused, and nothing is stored.
    match receiver.put_compressed(&b, &a_bytes) {
        Err(Error::HashMismatch { expected, actual }) => assert_eq!((expected, actual), (b, a)),
        other => panic!("a chunk under the wrong id was accepted: {other:?}"),
    }
    assert!(!receiver.contains(&b));

    // Damaged or non-zstd bytes are refused too.
    let mut damaged = sender.get_compressed(&b).unwrap();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 1;
    assert!(matches!(
        receiver.put_compressed(&b, &damaged),
        Err(Error::Corrupt { .. } | Error::HashMismatch { .. })
    ));
    assert!(matches!(receiver.put_compressed(&b, b"not zstd at all"), Err(Error::Corrupt { .. })));
    assert_eq!(receiver.list().unwrap(), vec![a]);
    assert_eq!(common::tmp_files(&tmp.path().join("receiver")), 0);
}

/// A zstd frame that decompresses to `n` zero bytes, made without holding them in memory.
fn bomb(n: usize) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(zeros.len());
        enc.write_all(&zeros[..k]).unwrap();
        left -= k;
    }
    enc.finish().unwrap()
}

#[test]
fn chunks_that_decompress_beyond_the_limits_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();

    // Received: more than any object may be.
    let big = bomb(MAX_OBJECT_BYTES + 1);
    assert!(big.len() < 1 << 20, "the bomb is small compressed: {}", big.len());
    let claimed = ChunkId([7; 32]);
    match store.put_compressed(&claimed, &big) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("more than"), "{reason}"),
        other => panic!("a decompression bomb was accepted: {other:?}"),
    }
    assert!(store.list().unwrap().is_empty());

    // On disk: a data chunk larger than the largest chunk is refused by `get` without
    // decompressing all of it.
    let small_bomb = bomb(MAX_CHUNK_BYTES + 1);
    let id = ChunkId::of(&vec![0u8; MAX_CHUNK_BYTES + 1]);
    let path = store.chunk_path(&id);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, &small_bomb).unwrap();
    match store.get(&id) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("more than"), "{reason}"),
        other => panic!("an oversized chunk was read: {other:?}"),
    }
    // Within the object limit it is a valid object (a manifest may be this large).
    assert_eq!(store.get_with_limit(&id, MAX_OBJECT_BYTES).unwrap().len(), MAX_CHUNK_BYTES + 1);
}

#[test]
fn the_disk_reserve_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path()).unwrap();
    let free = store.free_bytes().unwrap();
    let store = store.with_reserve(free + (1 << 30));
    match store.put(b"anything") {
        Err(Error::DiskReserve { free: f, reserve }) => {
            assert!(f > 0);
            assert_eq!(reserve, free + (1 << 30));
        }
        other => panic!("a write below the reserve was accepted: {other:?}"),
    }
    assert!(store.list().unwrap().is_empty());
    assert_eq!(common::tmp_files(tmp.path()), 0);
}
