#!/usr/bin/env bash
# Runs every check and test of NowConnect. On a fresh Debian machine, run as
# root: it installs the system packages the end-to-end tests need.
#   bash scripts/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Real redis-server, slapd and the OpenLDAP clients are used by the tests.
need_cmds=(redis-server slapd ldapsearch ldapwhoami)
missing=()
for c in "${need_cmds[@]}"; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing+=("$c")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "==> installing system packages for: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server slapd ldap-utils >/dev/null
  else
    echo "error: missing ${missing[*]}; run this script as root, or install them with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y redis-server slapd ldap-utils" >&2
    exit 1
  fi
fi
export PATH="$PATH:/usr/sbin"

echo "==> rustfmt"
cargo fmt --all --check
echo "==> clippy (-D warnings)"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "==> building the binaries under test (tokio and async-std runtimes)"
cargo build --release -p nowconnect-tokio --bin nowconnect --target-dir target/e2e
cargo build --release -p nowconnect-async-std --bin nowconnect-async-std --target-dir target/e2e
export NOWCONNECT_BIN="$PWD/target/e2e/release/nowconnect"
export NOWCONNECT_ASYNC_STD_BIN="$PWD/target/e2e/release/nowconnect-async-std"
echo "==> tests"
cargo test --workspace --release -- --skip ci_seed_budget
echo "==> simulation seed budget (prints what it exercised)"
cargo test --release -p nowconnect-sim --test world -- ci_seed_budget --nocapture
