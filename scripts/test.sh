#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
# The tests start their own services (edges, workers, SecantusDB, etcd) on loopback ports and
# temp directories, and stop them when they finish.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export WHARF_VENV="${WHARF_VENV:-$PWD/.venv}"
# Some tests run the real binaries as processes (to kill them): build those first.
cargo build --workspace --bins --locked
# Some tests hold a thousand sessions and more in one process (both ends of each socket).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo test --workspace --locked -- --test-threads="${WHARF_TEST_THREADS:-4}"
./scripts/check-deploy.sh
