#!/usr/bin/env bash
# Runs the failover loss-window benchmark (see README.md beside this file): builds the test images
# and coyote in release, then the bench program. Settings come from the environment: BENCH_TRIALS,
# BENCH_FIRST_KILL_SECS, BENCH_KILL_STEP_SECS (see the top of failover_rpo.rs). CARGO_TARGET_DIR is
# respected. Needs a Docker Engine.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "==> building the test images"
scripts/test-images.sh

echo "==> building coyote (release)"
cargo build --release --locked -p coyote-nodes --bin coyote
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export COYOTE_BIN="$target_dir/release/coyote"

echo "==> running the bench"
cargo bench --locked -p coyote-tests --bench failover_rpo
