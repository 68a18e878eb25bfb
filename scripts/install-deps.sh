#!/usr/bin/env bash
# Installs what building and testing Wharf needs on a fresh Debian machine with Rust:
# Debian packages (protoc for etcd-client, cmake, mosquitto clients and broker, etcd) and a
# Python venv with SecantusDB (a MongoDB-wire server), paho-mqtt and PyYAML. Idempotent: skips what
# is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# --build: only what compiling needs (scripts/run.sh); no argument: everything the tests need.
build_only=false
[ "${1:-}" = "--build" ] && build_only=true

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v cc >/dev/null || need_apt+=(build-essential)
if ! $build_only; then
  command -v mosquitto_sub >/dev/null || need_apt+=(mosquitto-clients)
  command -v mosquitto >/dev/null || need_apt+=(mosquitto)
  command -v etcd >/dev/null || need_apt+=(etcd-server)
  command -v etcdctl >/dev/null || need_apt+=(etcd-client)
  command -v stdbuf >/dev/null || need_apt+=(coreutils)
  command -v systemd-analyze >/dev/null || need_apt+=(systemd)
  command -v openssl >/dev/null || need_apt+=(openssl)
  command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
  # The browser tests: headless Chromium, driven from Node.js by Playwright.
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v node >/dev/null || need_apt+=(nodejs)
  command -v npm >/dev/null || need_apt+=(npm)
fi
if ((${#need_apt[@]})); then
  echo "install-deps: apt-get install ${need_apt[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

$build_only && exit 0

venv="${WHARF_VENV:-$PWD/.venv}"
if [ ! -x "$venv/bin/secantusd-py" ] || ! "$venv/bin/python" -c 'import paho.mqtt, yaml' 2>/dev/null; then
  echo "install-deps: python venv at $venv (SecantusDB, paho-mqtt, PyYAML)"
  python3 -m venv "$venv" || {
    # Debian's python3 needs python3-venv for ensurepip.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q --disable-pip-version-check 'SecantusDB==0.7.0b3' 'paho-mqtt>=2,<3' 'PyYAML>=6,<7'
fi

# The browser tests' npm packages (MQTT.js, playwright-core), as locked.
browser=tests/browser
if [ ! -d "$browser/node_modules/playwright-core" ] || [ ! -d "$browser/node_modules/mqtt" ] \
  || [ "$browser/package-lock.json" -nt "$browser/node_modules/.package-lock.json" ]; then
  echo "install-deps: npm packages of $browser"
  (cd "$browser" && npm ci --no-audit --no-fund --loglevel=error)
fi
