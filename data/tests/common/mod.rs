//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::fs;
use std::path::Path;

/// A small deterministic generator (xorshift64*), enough for incompressible test content.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// The number of files in the store's `tmp/` directory.
pub fn tmp_files(store_root: &Path) -> usize {
    fs::read_dir(store_root.join("tmp")).unwrap().count()
}

/// Flips one bit in the middle of the file at `path`.
pub fn flip_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    // The chunk file is read-only to nobody but may be shared: write through a new file.
    let tmp = path.with_extension("flip");
    fs::write(&tmp, &bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}
