#!/usr/bin/env bash
# The Tally test command (CI runs this via .ci/run).
#
#   scripts/test.sh [ARGS...]
#
# Steps (fail fast): make sure PostgreSQL is reachable (scripts/pg-up.sh, unless
# TALLY_TEST_DATABASE_URL is already set), cargo fmt --check, clippy -D warnings,
# cargo doc with rustdoc warnings as errors,
# release build of the binaries (integration tests spawn target/release/{coordinator,worker}),
# then the tests with cargo-nextest (profile `ci`, see .config/nextest.toml) if
# installed, else cargo test. ARGS are forwarded to the test runner, e.g.
#   scripts/test.sh heavy_          # nextest/cargo test name filter
set -euo pipefail

cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> [test.sh] %s\n' "$*" >&2; }
die() {
    printf '[test.sh] error: %s\n' "$*" >&2
    exit 1
}

step "Rust toolchain"
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install the Rust toolchain (https://rustup.rs) and make sure ~/.cargo/bin is on PATH"
cargo --version >&2 || die "cargo --version failed: the Rust toolchain is not usable"

step "PostgreSQL"
if [ -z "${TALLY_TEST_DATABASE_URL:-}" ]; then
    url="$(scripts/pg-up.sh)" || die "no PostgreSQL server available (scripts/pg-up.sh failed, see above)"
    [ -n "$url" ] || die "scripts/pg-up.sh printed no database URL"
    export TALLY_TEST_DATABASE_URL="$url"
fi
# never print a password
printf '[test.sh] TALLY_TEST_DATABASE_URL=%s\n' \
    "$(printf '%s' "$TALLY_TEST_DATABASE_URL" | sed -E 's#(://[^:/@?]*:)[^@/?]*@#\1***@#; s#(password=)[^ &]*#\1***#g')" >&2

step "tools the tests use (scripts/tools.sh)"
# shellcheck source=scripts/tools.sh
. scripts/tools.sh
ensure_tools || die "could not install the tools the tests need (see above)"

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo doc --workspace --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

step "cargo build --release --bins"
cargo build --release --bins

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --workspace --profile ci $*"
    cargo nextest run --workspace --profile ci "$@"
else
    step "cargo test --workspace $* (cargo-nextest not installed)"
    cargo test --workspace "$@"
fi

step "all checks passed"
