# Shared by .ci/tools/*.sh: install Debian packages only when missing, `apt-get update` at most once.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${SSE_APT_UPDATED:-}" ]; then
    # Wait for another apt or dpkg (an unattended upgrade, a second `make test`) instead of failing.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    export SSE_APT_UPDATED=1
  fi
  echo "installing: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Installs Debian packages whose postinst would start a system service (nginx on port 80, dockerd,
# prometheus): the tests start their own or none, so service starts are forbidden during the install
# (policy-rc.d exit 101 = "action forbidden"), unless the machine already has a policy of its own
# (Docker-built images do).
sse_install_without_services() {
  local own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt_install "$@"
  if [ -n "$own_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
  fi
}
