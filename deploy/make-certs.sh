#!/usr/bin/env bash
# Makes a CA, a server certificate and a client certificate for Wharf's TLS listener with
# openssl. Usage: deploy/make-certs.sh OUT_DIR [SERVER_DNS_NAME] [CLIENT_ID]
# The client certificate's CN is CLIENT_ID, so that with `certIdentity` on it may only connect
# as that MQTT client id.
set -euo pipefail
out="${1:?usage: make-certs.sh OUT_DIR [SERVER_DNS_NAME] [CLIENT_ID]}"
server="${2:-localhost}"
client="${3:-device-1}"
days="${WHARF_CERT_DAYS:-825}"
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout ca.key -out ca.pem -days "$days" -subj "/CN=Wharf test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
issue() { # name cn extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out "$1.pem" -days "$days" -extfile <(printf '%s\n' "$3") 2>/dev/null
  rm -f "$1.csr"
}
issue server "$server" "subjectAltName=DNS:$server,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue client "$client" "subjectAltName=DNS:$client
extendedKeyUsage=clientAuth"
chmod 600 ./*.key
echo "wrote $out/{ca,server,client}.{pem,key}"
