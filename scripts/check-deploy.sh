#!/usr/bin/env bash
# Checks deploy/: systemd units with systemd-analyze (ExecStart pointed at the built binaries),
# then YAML, Kubernetes, compose, dashboard and scripts with deploy/check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
units=$(mktemp -d)
trap 'rm -rf "$units"' EXIT
for unit in deploy/systemd/*.service; do
  sed "s#/usr/local/bin/#$PWD/target/debug/#" "$unit" > "$units/$(basename "$unit")"
done
out=$(systemd-analyze verify "$units"/*.service 2>&1 || true)
if [ -n "$out" ]; then
  echo "systemd-analyze verify:"; echo "$out"; exit 1
fi
echo "systemd units: ok"
"${WHARF_VENV:-$PWD/.venv}/bin/python" deploy/check.py
