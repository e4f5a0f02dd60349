#!/usr/bin/env bash
# Runs the activator benchmark (cold starts through the activator against a bare `docker start`, warm
# throughput through the activator against direct connections; see README.md beside this file):
# installs wrk from Debian if it is missing, builds the test images and coyote in release, then runs
# the bench program. Settings come from the environment: BENCH_COLD_RUNS, BENCH_SECS,
# BENCH_WARMUP_SECS, BENCH_ROUNDS, BENCH_CONNECTIONS, BENCH_THREADS (see the top of
# activator_vs_direct.rs) and BENCH_IMAGES (default: busybox httpd, then caddy). CARGO_TARGET_DIR is
# respected. Needs a Docker Engine.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v wrk >/dev/null 2>&1; then
  echo "==> installing wrk (Debian)"
  if [ "$(id -u)" -ne 0 ]; then
    echo "wrk is missing and this is not root: install wrk" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
fi

echo "==> building the test images"
scripts/test-images.sh
tests/benches/bench-images.sh

echo "==> building coyote (release)"
cargo build --release --locked -p coyote-nodes --bin coyote
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export COYOTE_BIN="$target_dir/release/coyote"

# BENCH_IMAGES: the images to run it with, one run each (see activator_vs_direct.rs).
for image in ${BENCH_IMAGES:-coyote-test/httpd:1 coyote-bench/caddy:1}; do
  echo "==> cargo bench -p coyote-tests --bench activator_vs_direct, image $image"
  BENCH_IMAGE=$image cargo bench --locked -p coyote-tests --bench activator_vs_direct
done
