#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian machine, then runs every check
# and test of the workspace. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests need the Rust toolchain (cargo, rustfmt, clippy) and a running Docker Engine. They build
# their own test data; they start real coyote processes on 127.0.0.1. The reconciler tests run tiny
# images built FROM scratch with a static busybox (installed from apt if missing); the pull test pushes
# one into a registry of its own, Debian's docker-registry (installed from apt if missing).
# A clean clone builds everything once: incremental caches only cost disk, and full debug info
# triples the size of the target directory (several test binaries link all of tokio, tonic and
# openraft). Line tables keep backtraces readable.
export CARGO_INCREMENTAL=0
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
echo "==> free disk space where the build goes"
df -h . | tail -1

echo "==> test images"
./scripts/test-images.sh
if ! command -v docker-registry >/dev/null 2>&1; then
  echo "==> installing docker-registry (for the image pull test)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry >/dev/null; }
  install || { $sudo apt-get update -q >/dev/null && install; }
  # The package starts a system registry on port 5000; the test starts its own.
  $sudo systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

if ! command -v dnsmasq >/dev/null 2>&1 && [ ! -x /usr/sbin/dnsmasq ]; then
  echo "==> installing dnsmasq-base (a real nameserver for the monitor's zone checks)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dnsmasq-base >/dev/null; }
  install || { $sudo apt-get update -q >/dev/null && install; }
fi

if ! command -v pebble >/dev/null 2>&1 || ! command -v pebble-challtestsrv >/dev/null 2>&1; then
  echo "==> installing pebble (Let's Encrypt's test CA, for the certificate tests)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q pebble >/dev/null; }
  install || { $sudo apt-get update -q >/dev/null && install; }
fi

if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing chromium and chromium-driver (for the CRM's browser tests)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver fonts-dejavu-core >/dev/null; }
  install || { $sudo apt-get update -q >/dev/null && install; }
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> building the coyote binary"
cargo build --locked -p coyote-nodes --bin coyote
export COYOTE_BIN="$PWD/target/debug/coyote"

echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

echo "==> planted bugs: the simulator's checkers must catch each one"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked -p coyote-sim --features planted-bugs -E 'binary(planted)'
else
  cargo test --locked -p coyote-sim --features planted-bugs --test planted
fi

echo "==> deterministic simulation: 256 seeds of a 5-node cluster with faults"
cargo run --locked --profile sim -p coyote-sim -- --seeds 0..256

echo "==> deterministic simulation: the hand-written scenarios, 4 seeds each"
cargo run --locked --profile sim -p coyote-sim -- --scenario all --seeds 0..4
