#!/usr/bin/env bash
# Stand-ins for the stack's base images, made from Debian's packages on a Docker engine that cannot
# pull from an image registry (the official images stay the defaults; see docs/deployment.md).
#
#   docker/local-images.sh              builds what is missing, then prints the variables to use
#   eval "$(docker/local-images.sh)"    ... and sets them, for `make build` and `make up`
#
# Needs root (debootstrap), a reachable Debian package mirror (DEBIAN_MIRROR), and a Rust toolchain
# on this machine (`rustc --print sysroot`), which is copied into the builder stand-in. Images that
# exist already are kept, so a second run only prints. Progress goes to stderr, the variables to
# stdout.
#
#   sse-standin/debian:bookworm-*  debootstrap --variant=minbase, plus this machine's CA bundle
#                                  (RUNTIME_IMAGE, and the base of the others)
#   sse-standin/rust:<version>-*   + gcc, libc6-dev, make and the local toolchain (RUST_IMAGE)
#   sse-standin/redis:bookworm-*   + Debian's redis-server; `redis-cli ping` works (REDIS_IMAGE)
#   sse-standin/nginx:bookworm-*   + Debian's nginx and wget (NGINX_IMAGE)
set -euo pipefail

prefix="${STANDIN_PREFIX:-sse-standin}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
ca=/etc/ssl/certs/ca-certificates.crt

say() { echo "local-images: $*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

for tool in docker debootstrap rustc tar; do
  command -v "$tool" >/dev/null || { say "needs $tool on PATH"; exit 1; }
done
[ -r "$ca" ] || { say "needs the CA bundle $ca (Debian: ca-certificates)"; exit 1; }

# The tags carry a digest of this script: a changed recipe builds new stand-ins instead of reusing
# the old ones, which are then removed.
recipe="$(sha256sum "$0" | cut -c1-12)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# `docker build` of $1 from the build context (a tar) on stdin; its output only if it fails.
build() {
  say "building $1 from Debian packages"
  docker build --build-arg "BASE=$base" -t "$1" - >"$work/build.log" 2>&1 || {
    tail -n 30 "$work/build.log" >&2
    exit 1
  }
}

# A stand-in from a Dockerfile on stdin, without a context.
build_dockerfile() {
  cat >"$work/Dockerfile"
  tar -c -C "$work" Dockerfile | build "$1"
}

base="$prefix/debian:$suite-$recipe"
if ! have "$base"; then
  say "making $base with debootstrap (about two minutes, 200 MB)"
  debootstrap --variant=minbase "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
  }
  # Containers reach the package registries over HTTPS only when they trust what this machine
  # trusts. The bundle also goes where update-ca-certificates finds it, so that installing Debian's
  # ca-certificates in an image (docker/Dockerfile's runtime stage does) keeps it.
  install -D -m 0644 "$ca" "$work/root$ca"
  install -D -m 0644 "$ca" "$work/root/usr/local/share/ca-certificates/host-bundle.crt"
  # Like the official Debian images: packages installed in a build never start their services.
  printf '#!/bin/sh\nexit 101\n' >"$work/root/usr/sbin/policy-rc.d"
  chmod 0755 "$work/root/usr/sbin/policy-rc.d"
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  tar -C "$work/root" -c . | docker import --change 'CMD ["bash"]' - "$base" >/dev/null
  rm -rf "$work/root"
fi

# The toolchain that builds the project here builds it in the container too (no Rust image can be
# pulled, and Debian's own Rust is older than the project needs). Its docs are left out.
sysroot="$(rustc --print sysroot)"
version="$(rustc --version | cut -d' ' -f2)"
rust="$prefix/rust:$version-$recipe"
if ! have "$rust"; then
  cat >"$work/Dockerfile" <<'EOF'
ARG BASE
FROM $BASE
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:$PATH CARGO_HOME=/usr/local/cargo
EOF
  say "with the toolchain of $sysroot"
  parts=()
  for part in bin lib libexec etc; do
    [ -e "$sysroot/$part" ] && parts+=("$part")
  done
  tar -c -C "$work" Dockerfile -C "$sysroot" --transform 's,^,toolchain/,;s,^toolchain/Dockerfile$,Dockerfile,' \
    "${parts[@]}" | build "$rust"
fi

# Official images run redis-server with protected mode off (the stack's Redis is reachable only on
# its internal network); Debian's binary defaults to on, which refuses the gateways' connections.
redis="$prefix/redis:$suite-$recipe"
have "$redis" || build_dockerfile "$redis" <<'EOF'
ARG BASE
FROM $BASE
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis /data \
    && printf '#!/bin/sh\nif [ "$1" = redis-server ]; then shift; exec redis-server --protected-mode no "$@"; fi\nexec "$@"\n' \
        >/usr/local/bin/entrypoint \
    && chmod 0755 /usr/local/bin/entrypoint
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/entrypoint"]
CMD ["redis-server"]
EOF

# wget: the compose health check calls it, as it calls busybox's in the official alpine image.
nginx="$prefix/nginx:$suite-$recipe"
have "$nginx" || build_dockerfile "$nginx" <<'EOF'
ARG BASE
FROM $BASE
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx wget \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
EOF

for old in $(docker image ls --format '{{.Repository}}:{{.Tag}}' | grep "^$prefix/" | grep -v -- "-$recipe\$"); do
  say "removing $old (an older recipe)"
  docker image rm "$old" >/dev/null || true
done

say "stand-ins built from Debian packages (no image registry used): $base, $rust, $redis, $nginx"
cat <<EOF
export RUST_IMAGE=$rust
export RUNTIME_IMAGE=$base
export REDIS_IMAGE=$redis
export NGINX_IMAGE=$nginx
EOF
