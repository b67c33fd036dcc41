# Tests start their own redis-server processes on free ports.
command -v redis-server >/dev/null || apt_install redis-server
