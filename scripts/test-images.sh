#!/usr/bin/env bash
# Builds the tiny images the reconciler tests run, FROM scratch with Debian's static busybox: the
# test machine reaches no registry, so nothing can be pulled. Idempotent: an image whose recipe has
# not changed (same busybox, same script) is not built again, so a second run takes well under a second.
#
#   coyote-test/httpd:1   busybox httpd on port 80 serving /www/index.html ("coyote test 1")
#   coyote-test/httpd:2   the same, serving "coyote test 2" (a spec change)
#   coyote-test/upgrade-echo:1   answers every request on port 80 with a protocol switch, then echoes
#   coyote-test/crash:1   exits with status 3 a moment after it starts (a crash loop)
#   coyote-test/seq:1     appends the next sequence number to /data/seq every 50 ms, synced, starting
#                         after the last number already there (the backup tests)
set -euo pipefail

# Test processes run in parallel and may each call this script: one at a time.
exec 9>"${TMPDIR:-/tmp}/coyote-test-images.lock"
flock 9

BUSYBOX=/bin/busybox
# Debian's `busybox` package is dynamically linked and useless FROM scratch: insist on busybox-static.
if ! dpkg -s busybox-static >/dev/null 2>&1; then
  echo "==> installing busybox-static"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null; }
  apt_install || { $sudo apt-get update -q >/dev/null && apt_install; }
fi
if ! command -v docker >/dev/null 2>&1; then
  echo "error: the docker CLI is missing: the reconciler tests need a Docker Engine" >&2
  exit 1
fi

script_sum=$(sha256sum "$0" | cut -c1-16)
busybox_sum=$(sha256sum "$BUSYBOX" | cut -c1-16)
recipe="$script_sum-$busybox_sum"

# build TAG DOCKERFILE-BODY [FILE CONTENT]...
build() {
  local tag=$1 body=$2
  shift 2
  local have
  have=$(docker image inspect --format '{{ index .Config.Labels "coyote.test.recipe" }}' "$tag" 2>/dev/null || true)
  if [ "$have" = "$recipe" ]; then
    return
  fi
  local ctx
  ctx=$(mktemp -d)
  cp "$BUSYBOX" "$ctx/busybox"
  while [ $# -gt 0 ]; do
    mkdir -p "$ctx/$(dirname "$1")"
    printf '%s\n' "$2" >"$ctx/$1"
    shift 2
  done
  printf 'FROM scratch\nCOPY busybox /bin/busybox\n%s\nLABEL coyote.test.recipe=%s\n' "$body" "$recipe" >"$ctx/Dockerfile"
  echo "==> building $tag"
  DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null 2>"$ctx/err" || {
    cat "$ctx/err" >&2
    rm -rf "$ctx"
    exit 1
  }
  rm -rf "$ctx"
  # The previous build of this tag is left dangling: remove it (unless a container still uses it).
  local old
  old=$(docker images -q --filter dangling=true --filter "label=coyote.test.recipe" 2>/dev/null || true)
  [ -z "$old" ] || docker rmi $old >/dev/null 2>&1 || true
}

# A shell as PID 1 that exits on SIGTERM, so `docker stop` is quick (PID 1 ignores signals it has no
# handler for, and busybox httpd installs none).
httpd='COPY www /www
EXPOSE 80
CMD ["/bin/busybox", "sh", "-c", "trap \"exit 0\" TERM; /bin/busybox httpd -f -p 80 -h /www & wait"]'
build coyote-test/httpd:1 "$httpd" www/index.html "coyote test 1"
build coyote-test/httpd:2 "$httpd" www/index.html "coyote test 2"
# Answers any request with a protocol switch (`Upgrade: echo`), then echoes what it receives.
upgrade_echo='cr=$(printf "\\r")
while read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
done
printf "HTTP/1.1 101 Switching Protocols\\r\\nConnection: Upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n"
exec /bin/busybox cat'
build coyote-test/upgrade-echo:1 'COPY up.sh /up.sh
EXPOSE 80
CMD ["/bin/busybox", "sh", "-c", "trap \"exit 0\" TERM; /bin/busybox nc -ll -p 80 -e /bin/busybox sh /up.sh & wait"]' up.sh "$upgrade_echo"
build coyote-test/crash:1 'CMD ["/bin/busybox", "sh", "-c", "sleep 1; exit 3"]'
build coyote-test/seq:1 'CMD ["/bin/busybox", "sh", "-c", "trap \"exit 0\" TERM; i=$(/bin/busybox tail -n 1 /data/seq 2>/dev/null); i=${i:-0}; while true; do i=$((i+1)); echo $i >> /data/seq; /bin/busybox sync /data/seq; /bin/busybox sleep 0.05; done"]'
