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
