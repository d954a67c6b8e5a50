#!/usr/bin/env bash
# Chaos with real processes on a real network, checked like Jepsen
# (docs/testing.md, "Chaos on a real network"). Run as root on Linux:
#   bash scripts/chaos.sh --duration 90s --seed 7     # CI profile
#   bash scripts/chaos.sh --duration 1h               # soak (random seed, printed)
# Other options go to the harness: --flows N, --runtimes tokio,async-std,
# --logs DIR (keep every process's log; kept anyway on a violation).
# It installs what it needs (iproute2, nftables, iptables, redis-server,
# slapd, ldap-utils) and builds the binaries unless NOWCONNECT_BIN and
# CHAOS_BIN name them. Exits non-zero on any violation; the last line
# starts with `chaos:`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "error: chaos.sh makes network namespaces and firewall rules: run it as root" >&2
  exit 2
fi

need=(ip nft iptables redis-server redis-cli slapd ldapsearch ldapwhoami timeout)
pkg_of() {
  case "$1" in
    ip) echo iproute2 ;;
    nft) echo nftables ;;
    iptables) echo iptables ;;
    redis-server|redis-cli) echo redis-server ;;
    slapd) echo slapd ;;
    ldapsearch|ldapwhoami) echo ldap-utils ;;
    timeout) echo coreutils ;;
  esac
}
missing=()
for c in "${need[@]}"; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing+=("$(pkg_of "$c")")
done
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "==> installing $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq $pkgs >/dev/null
fi
export PATH="$PATH:/usr/sbin"

if [ -z "${NOWCONNECT_BIN:-}" ]; then
  cargo build --release -p nowconnect-tokio --bin nowconnect --target-dir target/e2e
  export NOWCONNECT_BIN="$PWD/target/e2e/release/nowconnect"
fi
if [[ "$*" == *async-std* ]] && [ -z "${NOWCONNECT_ASYNC_STD_BIN:-}" ]; then
  cargo build --release -p nowconnect-async-std --bin nowconnect-async-std --target-dir target/e2e
  export NOWCONNECT_ASYNC_STD_BIN="$PWD/target/e2e/release/nowconnect-async-std"
fi
if [ -z "${CHAOS_BIN:-}" ]; then
  cargo build --release -p nowconnect-tests --bin chaos
  CHAOS_BIN="$PWD/target/release/chaos"
fi
exec "$CHAOS_BIN" run "$@"
