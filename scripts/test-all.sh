#!/usr/bin/env bash
# Runs every check and test of NowConnect. On a fresh Debian machine, run as
# root: it installs the system packages the end-to-end tests need.
#   bash scripts/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Real redis-server, slapd and the OpenLDAP clients are used by the tests;
# promtool (Debian's prometheus package) checks the shipped alert rules;
# nginx (nginx-light: its http_ssl module has ssl_verify_client and
# $ssl_client_escaped_cert) terminates mesh mTLS in tests/tests/mesh_ingress.rs.
# nft and iptables make the faults of the chaos run (scripts/chaos.sh).
need_cmds=(redis-server slapd ldapsearch ldapwhoami promtool nginx nft iptables ss)
pkg_of() {
  case "$1" in
    redis-server) echo redis-server ;;
    slapd) echo slapd ;;
    ldapsearch|ldapwhoami) echo ldap-utils ;;
    promtool) echo prometheus ;;
    nginx) echo nginx-light ;;
    nft) echo nftables ;;
    iptables) echo iptables ;;
    ss) echo iproute2 ;;
    python3-venv) echo python3-venv ;;
  esac
}
missing=()
for c in "${need_cmds[@]}"; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing+=("$c")
done
# Python's venv (with pip) holds kubernetes-validate, below.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=$(for c in "${missing[@]}"; do pkg_of "$c"; done | sort -u | tr '\n' ' ')
  if [ "$(id -u)" -eq 0 ]; then
    echo "==> installing system packages for: ${missing[*]} ($pkgs)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    base=$(echo "$pkgs" | tr ' ' '\n' | { grep -vx prometheus || true; } | tr '\n' ' ')
    # shellcheck disable=SC2086
    if [ -n "${base// /}" ]; then apt-get install -y -qq $base >/dev/null; fi
    # prometheus only for promtool: its recommends (exporters, a web UI) are not needed.
    if echo "$pkgs" | grep -qw prometheus; then
      apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
  else
    echo "error: missing ${missing[*]}; run this script as root, or install them with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y $pkgs" >&2
    exit 1
  fi
fi
export PATH="$PATH:/usr/sbin"

# kubernetes-validate (PyPI, with the Kubernetes JSON schemas bundled) checks
# deploy/kubernetes/ in tests/tests/deploy.rs. It lives in a virtualenv
# outside the repository, made once and reused while it has this version.
k8s_validate_version=1.37.0
k8s_venv="${XDG_CACHE_HOME:-$HOME/.cache}/nowconnect/k8s-venv"
if [ "$("$k8s_venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$k8s_validate_version" ]; then
  echo "==> installing kubernetes-validate $k8s_validate_version into $k8s_venv"
  python3 -m venv "$k8s_venv"
  "$k8s_venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$k8s_validate_version"
fi
export NOWCONNECT_K8S_VALIDATE="$k8s_venv/bin/kubernetes-validate"

echo "==> rustfmt"
cargo fmt --all --check
echo "==> clippy (-D warnings)"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "==> building the binaries under test (tokio and async-std runtimes)"
cargo build --release -p nowconnect-tokio --bin nowconnect --target-dir target/e2e
cargo build --release -p nowconnect-async-std --bin nowconnect-async-std --target-dir target/e2e
export NOWCONNECT_BIN="$PWD/target/e2e/release/nowconnect"
export NOWCONNECT_ASYNC_STD_BIN="$PWD/target/e2e/release/nowconnect-async-std"
# Every cargo test below selects the whole workspace (then --test picks the
# suites): another package selection resolves other features and rebuilds
# most of the workspace (about 4 minutes on 2 cores).
echo "==> tests"
cargo test --workspace --release -- --skip ci_seed_budget
echo "==> the hub suites again, every hub on the async-std runtime"
NOWCONNECT_HUB_RUNTIME=async-std cargo test --workspace --release \
  --test single_hub --test ha_mesh --test ha_registry --test mesh_fencing \
  --test mesh_ingress --test limits --test observability --test perf --test trust --test redis_tls \
  --test http_edge --test multihome
echo "==> simulation seed budget (prints what it exercised)"
cargo test --workspace --release --test world -- ci_seed_budget --nocapture
echo "==> chaos on a real network: namespaces, partitions, kills, pauses, delay, loss, Redis losses"
# The chaos binary was built by the tests above (same features: no rebuild).
# Bounded: 75 s of faults, the cluster's start and the last flows take about
# 90 s; a harness that hangs is stopped after 10 minutes.
CHAOS_BIN="$PWD/target/release/chaos" timeout 600 bash scripts/chaos.sh \
  --duration "${CHAOS_DURATION:-75s}" --seed "${CHAOS_SEED:-20261207}" --runtimes tokio,async-std
