//! The `coyote-sim` command line: its `--json` summary reports the runs it made.

use std::process::Command;
use std::time::Duration;

use coyote_sim::{run_seed, Params};

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coyote-sim"))
}

fn json_of(args: &[&str]) -> serde_json::Value {
    let out = sim().args(args).output().expect("coyote-sim runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "coyote-sim {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"))
}

#[test]
fn the_json_summary_reports_the_runs_made() {
    let traces = std::env::temp_dir().join(format!("coyote-sim-cli-{}", std::process::id()));
    let traces = traces.to_str().expect("a UTF-8 temporary directory");
    let flags = ["--nodes", "3", "--fault-secs", "4", "--no-crashes", "--trace-dir", traces, "--json"];

    let one = json_of(&[&["--seeds", "3", "--jobs", "1", "--verbose"], &flags[..]].concat());
    assert_eq!(one["seeds"], serde_json::json!([3, 4]));
    assert_eq!(one["runs"], 1);
    assert_eq!(one["nodes"], 3);
    assert_eq!(one["processes"], 1);
    assert_eq!(one["violations"], 0);
    assert_eq!(one["failing"], serde_json::json!([]));
    let run = &one["per_run"][0];
    assert_eq!(run["seed"], 3);
    // The run it reports is the run the library makes of that seed with those parameters.
    let params = Params { nodes: 3, faults: Duration::from_secs(4), crashes: false, ..Params::default() };
    let report = run_seed(3, &params);
    assert_eq!(run["trace_hash"], report.trace_hash.as_str());
    assert_eq!(run["simulated_ms"], report.simulated.as_millis() as u64);
    assert_eq!(one["acknowledged_proposals"], report.acks);
    let simulated = one["simulated_s"].as_f64().expect("simulated_s");
    assert!((simulated - report.simulated.as_secs_f64()).abs() < 0.002, "simulated_s {simulated}");
    let (wall, speed) = (one["wall_s"].as_f64().unwrap(), one["speed"].as_f64().unwrap());
    assert!(wall > 0.0 && (speed - simulated / wall).abs() < 1e-6 * speed.max(1.0), "{wall} {speed}");
    // Each run's speed in its process: simulated time over the runs' own wall time, which is part of
    // the whole command's.
    let run_wall = run["wall_ms"].as_f64().unwrap() / 1000.0;
    let per_run = one["speed_per_run"].as_f64().expect("speed_per_run");
    assert!(run_wall <= wall, "a run's wall time {run_wall} within the command's {wall}");
    assert!((per_run - simulated / run_wall.max(1e-3)).abs() < 1e-6 * per_run.max(1.0), "{per_run}");

    // Two worker processes, two seeds: both runs are counted, and without --verbose no per-run list.
    let two = json_of(&[&["--seeds", "3..5", "--jobs", "2"], &flags[..]].concat());
    assert_eq!(two["runs"], 2);
    assert_eq!(two["processes"], 2);
    assert!(two.get("per_run").is_none());
    assert!(
        two["acknowledged_proposals"].as_u64().unwrap() > one["acknowledged_proposals"].as_u64().unwrap()
    );
    let _ = std::fs::remove_dir_all(traces);
}

#[test]
fn out_of_range_options_are_clear_errors() {
    for (args, message) in [
        (["--nodes", "0"], "invalid value '0' for '--nodes <NODES>': 0 is not in 1..=9"),
        (["--nodes", "10"], "invalid value '10' for '--nodes <NODES>': 10 is not in 1..=9"),
        (["--tick-ms", "0"], "invalid value '0' for '--tick-ms <TICK_MS>': 0 is not in 1..=50"),
        (["--services", "101"], "invalid value '101' for '--services <SERVICES>': 101 is not in 0..=100"),
    ] {
        let out = sim().args(["--seeds", "0"]).args(args).output().expect("coyote-sim runs");
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn an_empty_seed_range_is_a_clear_error() {
    let out = sim().args(["--seeds", "5..5", "--json"]).output().expect("coyote-sim runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the seed range \"5..5\" is empty"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
}
