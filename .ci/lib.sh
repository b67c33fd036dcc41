# Shared by .ci/tools/*.sh: install Debian packages only when missing, `apt-get update` at most once.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${SSE_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export SSE_APT_UPDATED=1
  fi
  echo "installing: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
