#!/usr/bin/env bash
# Runs the log benchmark (coyote's replicated log against etcd 3.4, see README.md beside this file):
# installs etcd from Debian if it is missing, builds coyote in release, then runs the bench program.
# Settings come from the environment: BENCH_SECS, BENCH_WARMUP_SECS, BENCH_WRITERS, BENCH_VALUE_BYTES,
# BENCH_SYSTEMS (see the top of log_vs_etcd.rs). CARGO_TARGET_DIR is respected.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v etcd >/dev/null 2>&1; then
  echo "==> installing etcd (Debian's etcd-server and etcd-client)"
  if [ "$(id -u)" -ne 0 ]; then
    echo "etcd is missing and this is not root: install etcd-server and etcd-client" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq etcd-server etcd-client >/dev/null
  # The package may start a system etcd on the default ports; the benchmark starts its own.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl stop etcd >/dev/null 2>&1 || true
  fi
fi

echo "==> building coyote (release)"
cargo build --release --locked -p coyote-nodes --bin coyote
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export COYOTE_BIN="$target_dir/release/coyote"

echo "==> cargo bench -p coyote-tests --bench log_vs_etcd"
cargo bench --locked -p coyote-tests --bench log_vs_etcd
