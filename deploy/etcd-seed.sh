#!/usr/bin/env bash
# Seeds etcd with Wharf's keys under a prefix (default /iot/mqtt), from the environment or the
# documented defaults. Needs etcdctl (Debian: etcd-client).
#   ETCD_ENDPOINTS=http://127.0.0.1:2379 WHARF_TLS=true WHARF_SERVER_CERT=/etc/wharf/server.pem \
#   WHARF_SERVER_KEY=/etc/wharf/server.key deploy/etcd-seed.sh
# Keys left empty are not written (the binaries then use their defaults).
set -euo pipefail
endpoints="${ETCD_ENDPOINTS:-http://127.0.0.1:2379}"
prefix="${WHARF_ETCD_PREFIX:-/iot/mqtt}"
put() { # key value
  [ -n "$2" ] || return 0
  ETCDCTL_API=3 etcdctl --endpoints="$endpoints" put "$prefix/$1" "$2" >/dev/null
  echo "$prefix/$1 = $2"
}
# The original design's keys.
put tls "${WHARF_TLS:-false}"
put cacert "${WHARF_CACERT:-}"
put serverCert "${WHARF_SERVER_CERT:-}"
put serverKey "${WHARF_SERVER_KEY:-}"
# Edge.
# Empty: 0.0.0.0:1883 once passwordFile or allowAnonymous is set, else 127.0.0.1:1883.
put listen "${WHARF_LISTEN:-}"
put tlsListen "${WHARF_TLS_LISTEN:-}"
put clientCerts "${WHARF_CLIENT_CERTS:-off}"
# Empty: off. wssListen uses serverCert/serverKey.
put wsListen "${WHARF_WS_LISTEN:-}"
put wssListen "${WHARF_WSS_LISTEN:-}"
put wsPath "${WHARF_WS_PATH:-/mqtt}"
put proxyProtocol "${WHARF_PROXY_PROTOCOL:-off}"
put certIdentity "${WHARF_CERT_IDENTITY:-false}"
# Authentication and authorization (re-read when they change).
put passwordFile "${WHARF_PASSWORD_FILE:-}"
put aclFile "${WHARF_ACL_FILE:-}"
put allowAnonymous "${WHARF_ALLOW_ANONYMOUS:-}"
put useIdentityAsUsername "${WHARF_USE_IDENTITY_AS_USERNAME:-false}"
put publishDenied "${WHARF_PUBLISH_DENIED:-drop}"
put maxPacketSize "${WHARF_MAX_PACKET_SIZE:-1048576}"
put maxInflight "${WHARF_MAX_INFLIGHT:-32}"
put maxQueued "${WHARF_MAX_QUEUED:-1000}"
put maxConnections "${WHARF_MAX_CONNECTIONS:-100000}"
put maxHeldPersists "${WHARF_MAX_HELD_PERSISTS:-10000}"
put connectTimeout "${WHARF_CONNECT_TIMEOUT:-10}"
put metricsListen "${WHARF_METRICS_LISTEN:-}"
# Empty: the admin API and console stay off.
put adminUser "${WHARF_ADMIN_USER:-admin}"
put adminPassword "${WHARF_ADMIN_PASSWORD:-}"
# Bridges to other brokers: a JSON file's path or the JSON list (docs/bridge.md); empty: none.
put bridges "${WHARF_BRIDGES:-}"
# Both.
put host "${WHARF_HOST:-}"
put workerSocket "${WHARF_WORKER_SOCKET:-/run/wharf/worker.sock}"
put shutdownGrace "${WHARF_SHUTDOWN_GRACE:-10}"
# Store-worker.
put mongoUri "${WHARF_MONGODB_URI:-}"
put mongoDatabase "${WHARF_MONGODB_DATABASE:-mqtt}"
put writeConcern "${WHARF_WRITE_CONCERN:-majority}"
put follow "${WHARF_FOLLOW:-auto}"
put dataDir "${WHARF_DATA_DIR:-}"
put socketMode "${WHARF_SOCKET_MODE:-600}"
put socketGroup "${WHARF_SOCKET_GROUP:-}"
put retryLimit "${WHARF_RETRY_LIMIT:-10}"
put commitDelayMs "${WHARF_COMMIT_DELAY_MS:-1}"
put maxQueuedBytes "${WHARF_MAX_QUEUED_BYTES:-64MiB}"
put workerMetricsListen "${WHARF_WORKER_METRICS_LISTEN:-}"
