//! One fuzz target under AFL++: `coyote-afl TARGET` (see `README.md`). Built with
//! `cargo afl build -p coyote-fuzz --features afl --bin coyote-afl`.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = coyote_fuzz::target(&name) else {
        let names: Vec<&str> = coyote_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: coyote-afl TARGET, one of: {}", names.join(", "));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        target(data);
    });
}
