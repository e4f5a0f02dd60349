//! The short run of every fuzz target, for CI: every corpus file, then a few thousand inputs per target
//! derived from the corpus by seeded mutations. A panic in a target fails the test, naming the target
//! and the input (also written under the target directory, to add to the corpus once fixed).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use coyote_fuzz::{seeds, TARGETS};

/// Mutated inputs per target.
const MUTATIONS: usize = 20_000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| {
            let f = f.expect("a directory entry");
            (f.file_name().to_string_lossy().into_owned(), std::fs::read(f.path()).expect("a corpus file"))
        })
        .collect();
    files.sort();
    files
}

/// Runs `input` through `target`; on a panic, saves the input and fails with it.
fn run(target: &str, f: coyote_fuzz::Target, what: &str, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("crash-{target}"));
        std::fs::write(&out, input).expect("save the crashing input");
        panic!("target {target} panicked on {what} (saved to {}): {input:02x?}", out.display());
    }
}

/// xorshift64*: a small seeded generator, so that a failure repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u64] =
    &[0, 1, 0x7f, 0x80, 0xff, 0xfb, 0xfc, 0xfd, 0xfe, u16::MAX as u64, u32::MAX as u64, u64::MAX];

/// One to four mutations of `input`: bit flips, byte sets, inserts, deletes, interesting values
/// (bincode's varint markers, maxima), truncation, and splices with `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.insert(at, rng.next() as u8),
            3 if at < b.len() => {
                let end = (at + 1 + rng.below(8)).min(b.len());
                b.drain(at..end);
            }
            4 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let n = [1, 2, 4, 8][rng.below(4)];
                let end = (at + n).min(b.len());
                b.splice(at..end, v[..n].iter().copied());
            }
            5 => b.truncate(at),
            _ => {
                let from = rng.below(other.len() + 1);
                let end = (from + rng.below(32)).min(other.len());
                b.splice(at..at, other[from..end].iter().copied());
            }
        }
    }
    b
}

#[test]
fn every_corpus_file_runs_through_its_target() {
    for &(target, f) in TARGETS {
        let files = corpus(target);
        assert!(!files.is_empty(), "corpus/{target}/ is empty");
        for (name, bytes) in files {
            run(target, f, &format!("corpus/{target}/{name}"), &bytes);
        }
    }
}

#[test]
fn a_short_mutation_run_of_every_target() {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for (n, &(target, f)) in TARGETS.iter().enumerate() {
        let inputs: Vec<Vec<u8>> = corpus(target).into_iter().map(|(_, b)| b).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (n as u64 + 1));
        for i in 0..MUTATIONS {
            let input = &inputs[rng.below(inputs.len())];
            let other = &inputs[rng.below(inputs.len())];
            let mutated = mutate(&mut rng, input, other);
            if catch_unwind(AssertUnwindSafe(|| f(&mutated))).is_err() {
                failure = Some((target, f, i, mutated));
                break;
            }
        }
        if failure.is_some() {
            break;
        }
    }
    std::panic::set_hook(quiet);
    if let Some((target, f, i, input)) = failure {
        // Again, with the panic message shown.
        run(target, f, &format!("mutation {i}"), &input);
        panic!("target {target} panicked on mutation {i} only once: {input:02x?}");
    }
}

#[test]
fn every_target_has_its_seeds_in_the_corpus() {
    for s in seeds::seeds() {
        let path = corpus_dir(s.target).join(&s.name);
        assert!(
            path.exists(),
            "{} is missing: run `cargo test -p coyote-fuzz -- --ignored write_seeds`",
            path.display()
        );
    }
}

/// Writes the seed inputs to `corpus/` (seeds embed fresh keys and certificates, so they are written
/// on request, not compared byte for byte).
#[test]
#[ignore]
fn write_seeds() {
    for s in seeds::seeds() {
        let dir = corpus_dir(s.target);
        std::fs::create_dir_all(&dir).expect("the corpus directory");
        std::fs::write(dir.join(&s.name), &s.bytes).expect("a seed file");
    }
}

/// The seeds reach past the decoders: the log, snapshot and store seeds are accepted whole.
#[test]
fn the_structured_seeds_are_accepted() {
    use coyote_log::fuzzing;
    for s in seeds::seeds() {
        let ok = match s.target {
            "snapshot" => fuzzing::snapshot(None, &s.bytes).map_err(|e| e.to_string()),
            "store_record" => {
                fuzzing::store_record(s.bytes[0], &s.bytes[1..9], &s.bytes[9..]).map_err(|e| e.to_string())
            }
            "file_log" if s.bytes[0] == 0 => {
                let segments = coyote_log::fuzzing::sample_segments(&seeds::sample_entries());
                fuzzing::open_file_log(segments).map(drop).map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
        assert!(ok.is_ok(), "seed {}/{}: {ok:?}", s.target, s.name);
    }
}
