#!/usr/bin/env bash
# Builds coyote-bench/caddy:1 for the activator benchmark: Debian's caddy (installed with apt if
# missing) FROM scratch with the three libraries it links, serving a static file on port 80 with
# keep-alive connections (busybox httpd, the tests' server, closes every connection). Idempotent: the
# image is rebuilt only when this script or the caddy binary changed.
set -euo pipefail

if ! command -v caddy >/dev/null 2>&1; then
  echo "==> installing caddy (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq caddy >/dev/null || { apt-get update -qq && apt-get install -y -qq caddy >/dev/null; }
  # The package starts a system caddy on port 80; the benchmark needs none.
  systemctl disable --now caddy >/dev/null 2>&1 || true
fi
caddy=$(command -v caddy)
tag=coyote-bench/caddy:1
recipe="$(sha256sum "$0" | cut -c1-16)-$(sha256sum "$caddy" | cut -c1-16)"
have=$(docker image inspect --format '{{ index .Config.Labels "coyote.bench.recipe" }}' "$tag" 2>/dev/null || true)
[ "$have" = "$recipe" ] && exit 0

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/www" "$ctx/tmp" "$ctx/root"
cp "$caddy" "$ctx/caddy"
# Every library caddy links, at the same path inside the image.
for lib in $(ldd "$caddy" | grep -o '/[^ ]*\.so[^ ]*'); do
  mkdir -p "$ctx/root$(dirname "$lib")"
  cp -L "$lib" "$ctx/root$lib"
done
echo "coyote bench" >"$ctx/www/index.html"
touch "$ctx/tmp/.keep"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY root /
COPY caddy /usr/bin/caddy
COPY www /www
COPY tmp /tmp
ENV HOME=/tmp XDG_CONFIG_HOME=/tmp XDG_DATA_HOME=/tmp
LABEL coyote.bench.recipe=$recipe
CMD ["/usr/bin/caddy", "file-server", "--listen", ":80", "--root", "/www"]
DOCKERFILE
echo "==> building $tag"
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null 2>"$ctx/err" || { cat "$ctx/err" >&2; exit 1; }
