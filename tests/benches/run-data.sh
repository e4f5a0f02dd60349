#!/usr/bin/env bash
# Runs the data benchmark (coyote's snapshot store against rsync over ssh and restic, shipping a 1%
# change of a 1 GiB fixture; see README.md beside this file): installs rsync, openssh and restic from
# Debian if they are missing, starts a private sshd on 127.0.0.1 with throwaway keys, then runs the
# bench program. Needs root (the private sshd logs in as root) and about 5 GiB free under BENCH_DIR
# (default: target/bench-data). BENCH_SMALL=1 runs it on a fixture of 1/16 the size.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run-data.sh needs root (a private sshd on 127.0.0.1 for rsync)" >&2
  exit 1
fi
missing=()
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v restic >/dev/null 2>&1 || missing+=(restic)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
  # The package starts the system's sshd; this script runs its own.
  systemctl disable --now ssh >/dev/null 2>&1 || true
fi

dir=$(mktemp -d)
sshd_pid=""
cleanup() {
  [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
cp "$dir/client_key.pub" "$dir/authorized_keys"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$dir/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
PidFile $dir/sshd.pid
CONF
mkdir -p /run/sshd
/usr/sbin/sshd -f "$dir/sshd_config"
for _ in $(seq 50); do [ -s "$dir/sshd.pid" ] && break; sleep 0.1; done
sshd_pid=$(cat "$dir/sshd.pid")
export BENCH_RSYNC_RSH="ssh -p $port -i $dir/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

echo "==> cargo bench -p coyote-tests --bench data_vs_rsync_restic"
cargo bench --locked -p coyote-tests --bench data_vs_rsync_restic
