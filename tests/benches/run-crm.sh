#!/usr/bin/env bash
# Runs the CRM benchmark (see README.md beside this file): builds coyote in release, then the bench
# program. Settings come from the environment: BENCH_SERVICES, BENCH_EVENTS, BENCH_PAGES,
# BENCH_CLIENTS, BENCH_RATE, BENCH_SECONDS (see the top of crm_pages.rs). CARGO_TARGET_DIR is
# respected.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "==> building coyote (release)"
cargo build --release --locked -p coyote-nodes --bin coyote
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export COYOTE_BIN="$target_dir/release/coyote"

echo "==> running the bench"
cargo bench --locked -p coyote-tests --bench crm_pages
