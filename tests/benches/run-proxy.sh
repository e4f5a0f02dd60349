#!/usr/bin/env bash
# Runs the proxy benchmark (coyote's proxy against nginx, and Caddy with BENCH_CADDY=1, in front of
# one upstream under the same wrk and h2load loads; see README.md beside this file): installs nginx,
# wrk, h2load (and caddy) from Debian if they are missing, then runs the bench program in release.
# BENCH_SECS sets each load's length (default 10). CARGO_TARGET_DIR is respected.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
if [ -n "${BENCH_CADDY:-}" ]; then command -v caddy >/dev/null 2>&1 || need+=(caddy); fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "==> installing ${need[*]} (Debian)"
  if [ "$(id -u)" -ne 0 ]; then
    echo "${need[*]} missing and this is not root: install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need[@]}" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }
  # The packages start system services on ports 80 and 443; the bench starts its own.
  systemctl disable --now nginx caddy >/dev/null 2>&1 || true
fi

echo "==> building and running the bench (release)"
cargo bench --locked -p coyote-tests --bench proxy_vs_nginx
