//! Shipping a change of a service's data to another server: coyote's snapshot store against rsync
//! (over ssh to 127.0.0.1) and restic (to a local repository), in one run on one machine.
//!
//! The fixture, made here: a 512 MiB database-like file (4 KiB pages, half random, half zeros) and
//! 20,000 mail-like files of text (512 MiB). Each tool first copies it whole (not compared), then
//! ships two changes, each about 1% of the data:
//! - (A) contiguous: four runs of 1.25 MiB rewritten in the database file, and 200 new mail files;
//! - (B) scattered: 1,280 random 4 KiB pages of the database file, and a 4 KiB change in the middle
//!   of 200 mail files.
//!
//! coyote's side is what a master and its failover do: a snapshot (capture: walk, `stat`, read and
//! cut the changed files, as under `docker pause`; then commit: compress and store the new chunks),
//! then the chunks the other store lacks, read compressed from the first store and written to the
//! second, each re-hashed on the way in (`stage_compressed`) and made durable 4096 at a time, as a
//! node fetches them. Both stores are on this machine and the
//! copy is in-process: no TLS and no network stack, where rsync pays for ssh's encryption on the
//! loopback. The bytes "on the wire" are the compressed chunks copied.
//!
//! Settings (environment): BENCH_DIR (where the fixture and the copies go; default a temporary
//! directory under target/), BENCH_RSYNC_RSH (the ssh command rsync runs; set by run-data.sh),
//! BENCH_SMALL=1 (a fixture of 1/16 the size, to try the program quickly).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coyote_data::{ChunkStore, MetaCache};

const PAGE: usize = 4096;

/// A small xorshift generator: the fixture is the same in every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "bonjour",
    "merci",
    "réunion",
    "demain",
    "photos",
    "famille",
    "club",
    "site",
    "message",
    "the",
    "meeting",
    "tomorrow",
    "please",
    "find",
    "attached",
    "regards",
    "vacances",
    "école",
    "rendez-vous",
    "invoice",
    "garden",
    "football",
    "samedi",
    "dimanche",
    "agenda",
    "coyote",
    "serveur",
    "mail",
];

fn mail(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut text = Vec::with_capacity(size + 64);
    write!(text, "From: user{}@example.org\nSubject: message {}\n\n", rng.below(500), rng.next()).ok();
    while text.len() < size {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize];
        text.extend_from_slice(w.as_bytes());
        text.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    text.truncate(size);
    text
}

fn db_page(rng: &mut Rng, page: &mut [u8]) {
    let half = page.len() / 2;
    rng.fill(&mut page[..half]);
    page[half..].fill(0);
}

struct Sizes {
    db_bytes: usize,
    mails: usize,
    mail_avg: usize,
}

fn make_fixture(src: &Path, sizes: &Sizes) -> Result<()> {
    std::fs::create_dir_all(src.join("mail"))?;
    let mut rng = Rng(0x5eed_c0de_1234_5678);
    let mut db = std::io::BufWriter::new(std::fs::File::create(src.join("db.bin"))?);
    let mut page = vec![0u8; PAGE];
    for _ in 0..sizes.db_bytes / PAGE {
        db_page(&mut rng, &mut page);
        db.write_all(&page)?;
    }
    db.flush()?;
    for i in 0..sizes.mails {
        let size = sizes.mail_avg / 2 + rng.below(sizes.mail_avg as u64) as usize;
        std::fs::write(src.join("mail").join(format!("{i:05}.eml")), mail(&mut rng, size))?;
    }
    Ok(())
}

/// Applies change A or B; returns the bytes changed (uncompressed, concatenated), the change itself.
fn change(src: &Path, sizes: &Sizes, contiguous: bool, seed: u64) -> Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut rng = Rng(seed);
    let mut changed = Vec::new();
    let mut db = std::fs::OpenOptions::new().write(true).open(src.join("db.bin"))?;
    let pages = sizes.db_bytes / PAGE;
    let one_percent_pages = (pages / 100).max(4);
    let mut page = vec![0u8; PAGE];
    if contiguous {
        let run = one_percent_pages / 4;
        for _ in 0..4 {
            let start = rng.below((pages - run) as u64) as usize;
            db.seek(SeekFrom::Start((start * PAGE) as u64))?;
            for _ in 0..run {
                db_page(&mut rng, &mut page);
                db.write_all(&page)?;
                changed.extend_from_slice(&page);
            }
        }
    } else {
        for _ in 0..one_percent_pages {
            let at = rng.below(pages as u64) as usize;
            db.seek(SeekFrom::Start((at * PAGE) as u64))?;
            db_page(&mut rng, &mut page);
            db.write_all(&page)?;
            changed.extend_from_slice(&page);
        }
    }
    db.sync_all()?;
    let files = (sizes.mails / 100).max(2);
    for i in 0..files {
        if contiguous {
            let size = sizes.mail_avg / 2 + rng.below(sizes.mail_avg as u64) as usize;
            let text = mail(&mut rng, size);
            std::fs::write(src.join("mail").join(format!("new-{seed}-{i:05}.eml")), &text)?;
            changed.extend_from_slice(&text);
        } else {
            let name = src.join("mail").join(format!("{:05}.eml", rng.below(sizes.mails as u64)));
            let mut text = std::fs::read(&name)?;
            let at = text.len() / 2;
            let end = (at + PAGE).min(text.len());
            let new = mail(&mut rng, end - at);
            text[at..end].copy_from_slice(&new);
            std::fs::write(&name, &text)?;
            changed.extend_from_slice(&new);
        }
    }
    Ok(changed)
}

struct Coyote {
    src: PathBuf,
    a: ChunkStore,
    b: ChunkStore,
    cache: MetaCache,
}

struct Shipped {
    wall: Duration,
    capture: Duration,
    wire_bytes: u64,
}

impl Coyote {
    fn ship(&mut self) -> Result<Shipped> {
        let started = Instant::now();
        let capture = coyote_data::capture(&self.src, &self.cache, &self.a)?;
        let capture_elapsed = capture.elapsed();
        let report = capture.commit(&self.a, &mut self.cache)?;
        let mut wire = 0u64;
        let manifest_raw = self.a.get_compressed(&report.id)?;
        wire += manifest_raw.len() as u64;
        self.b.put_compressed(&report.id, &manifest_raw)?;
        let parts: Vec<_> = coyote_data::Manifest::parts(&self.b, &report.id)?
            .into_iter()
            .filter(|p| !self.b.contains(p))
            .collect();
        let mut batch = coyote_data::Batch::default();
        for id in &parts {
            let raw = self.a.get_compressed(id)?;
            wire += raw.len() as u64;
            self.b.stage_compressed(&mut batch, id, &raw)?;
        }
        self.b.publish(batch)?;
        let manifest = coyote_data::Manifest::load(&self.b, &report.id)?;
        // As a node fetches: made durable 4096 chunks at a time.
        for ids in coyote_data::missing(&self.b, &manifest).chunks(4096) {
            let mut batch = coyote_data::Batch::default();
            for id in ids {
                let raw = self.a.get_compressed(id)?;
                wire += raw.len() as u64;
                self.b.stage_compressed(&mut batch, id, &raw)?;
            }
            self.b.publish(batch)?;
        }
        Ok(Shipped { wall: started.elapsed(), capture: capture_elapsed, wire_bytes: wire })
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// rsync of `src/` to `dst/` over ssh to 127.0.0.1; returns (wall, bytes sent).
fn rsync(src: &Path, dst: &Path, rsh: &str) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let out = run(Command::new("rsync")
        .args(["-a", "--delete", "--stats", "-e", rsh])
        .arg(format!("{}/", src.display()))
        .arg(format!("root@127.0.0.1:{}/", dst.display())))?;
    let wall = started.elapsed();
    let sent = out
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|v| v.replace(',', "").trim().parse::<u64>().unwrap_or(0))
        .context("rsync printed no byte count")?;
    Ok((wall, sent))
}

/// `restic backup`; returns (wall, bytes added to the repository).
fn restic(src: &Path, repo: &Path) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let out = run(Command::new("restic")
        .args(["backup", "--json", "--quiet", "-r"])
        .arg(repo)
        .arg(src)
        .env("RESTIC_PASSWORD", "bench"))?;
    let wall = started.elapsed();
    let added = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message_type"] == "summary")
        .and_then(|v| v["data_added"].as_u64())
        .context("restic printed no summary")?;
    Ok((wall, added))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() -> Result<()> {
    let small = std::env::var_os("BENCH_SMALL").is_some();
    let sizes = if small {
        Sizes { db_bytes: 32 << 20, mails: 1250, mail_avg: 26 * 1024 }
    } else {
        Sizes { db_bytes: 512 << 20, mails: 20_000, mail_avg: 26 * 1024 }
    };
    let rsh = std::env::var("BENCH_RSYNC_RSH")
        .context("BENCH_RSYNC_RSH is not set: run tests/benches/run-data.sh")?;
    let base = match std::env::var_os("BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data"),
    };
    if base.exists() {
        std::fs::remove_dir_all(&base)?;
    }
    let src = base.join("src");
    eprintln!("==> making the fixture in {}", src.display());
    make_fixture(&src, &sizes)?;
    let total: u64 = walkdir_size(&src)?;
    eprintln!("    {:.0} MiB", mib(total));

    let mut coyote = Coyote {
        src: src.clone(),
        a: ChunkStore::open(base.join("coyote-a"))?,
        b: ChunkStore::open(base.join("coyote-b"))?,
        cache: MetaCache::new(),
    };
    let dst = base.join("rsync-dst");
    std::fs::create_dir_all(&dst)?;
    let repo = base.join("restic-repo");
    run(Command::new("restic").args(["init", "--quiet", "-r"]).arg(&repo).env("RESTIC_PASSWORD", "bench"))?;

    eprintln!("==> first copies (not compared)");
    let first = coyote.ship()?;
    let (r_first, _) = rsync(&src, &dst, &rsh)?;
    let (s_first, _) = restic(&src, &repo)?;
    eprintln!(
        "    coyote {:.1} s, rsync {:.1} s, restic {:.1} s",
        first.wall.as_secs_f64(),
        r_first.as_secs_f64(),
        s_first.as_secs_f64()
    );
    // The next snapshot's cache only trusts files older than its racy window.
    std::thread::sleep(coyote_data::snapshot::RACY_WINDOW + Duration::from_millis(100));

    println!("change  tool    time (s)  on the wire / added (MiB)  vs coyote");
    for (name, contiguous, seed) in [("A", true, 11), ("B", false, 12)] {
        let changed = change(&src, &sizes, contiguous, seed)?;
        let compressed = zstd::bulk::compress(&changed, 3)?.len() as u64;
        std::thread::sleep(coyote_data::snapshot::RACY_WINDOW + Duration::from_millis(100));
        let c = coyote.ship()?;
        let (r_wall, r_bytes) = rsync(&src, &dst, &rsh)?;
        let (s_wall, s_bytes) = restic(&src, &repo)?;
        let ct = c.wall.as_secs_f64();
        println!(
            "{name}       coyote  {ct:>8.2}  {:>10.1}                 1.00×  (capture, the part under a pause: {:.2} s)",
            mib(c.wire_bytes),
            c.capture.as_secs_f64()
        );
        println!(
            "{name}       rsync   {:>8.2}  {:>10.1}                 {:.2}×",
            r_wall.as_secs_f64(),
            mib(r_bytes),
            r_wall.as_secs_f64() / ct
        );
        println!(
            "{name}       restic  {:>8.2}  {:>10.1}                 {:.2}×",
            s_wall.as_secs_f64(),
            mib(s_bytes),
            s_wall.as_secs_f64() / ct
        );
        println!(
            "{name}       change: {:.1} MiB, {:.1} MiB compressed (zstd 3); coyote shipped {:.2}× the compressed change",
            mib(changed.len() as u64),
            mib(compressed),
            c.wire_bytes as f64 / compressed as f64
        );
        println!(
            "{name}       coyote's time against rsync's: {:.2}×, against restic's: {:.2}×",
            ct / r_wall.as_secs_f64(),
            ct / s_wall.as_secs_f64()
        );
    }
    Ok(())
}

fn walkdir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { walkdir_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}
