#!/usr/bin/env bash
# Level 2 of the Kubernetes proof: a real kube-apiserver (built from source, see build.sh) with a real etcd,
# the kms-plugin binary as its KMS provider, and kubectl. Everything listens on 127.0.0.1 only, on free
# ports picked at start. See docs/testing.md for what is checked and how long it takes.
#
# Environment:
#   KMS_PLUGIN_BIN      plugin binary (default <repo>/target/debug/kms-plugin)
#   KMS_E2E_VERSIONS    kube-apiserver releases to run, each VERSION or VERSION=flow,flow (default
#                       "default v1.31.14=local:v2": the release pinned in build/go.mod with all flows, and
#                       the newest 1.31 the module proxy serves with the local:v2 flow only, for CI time).
#                       "default" names the pinned release; other releases need apiserver/<version>/go.mod
#                       (gen-apiserver-mod.sh). `make e2e-matrix` adds v1.28.15 (v2 with --status-version v2beta1).
#   KMS_E2E_FLOWS       flows for a release listed without "=flows", as backend:api pairs (default "local:v2
#                       local:v1 ha:v2", plus "akeyless:v2 akeyless-swap:v1 migrate:v2" when tests/fakes/akeyless_fake.py
#                       exists (migrate:v2 = local key file -> Akeyless on the running plugin, run_migrate_flow),
#                       then "vault:v2"; each backend needs backend_<name>_* below; akeyless-swap:v1 (run_swap_flow)
#                       and ha:v2 / ha-akeyless:v2 (run_ha_flow; the latter in `make e2e-matrix`) are their own flows
#   KMS_E2E_KEEP=1      keep the work directory (logs, certs, etcd data) after the run
#   KMS_TEST_OPT_OUT    contains "k8s" -> skip
#   KMS_E2E_BUILD_KUBECTL=1  use a kubectl built from the same release even if the machine has one
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"

if [[ ",${KMS_TEST_OPT_OUT:-}," == *",k8s,"* ]]; then
  echo "SKIP: k8s e2e opted out via KMS_TEST_OPT_OUT"
  exit 0
fi

PLUGIN_BIN="${KMS_PLUGIN_BIN:-$repo/target/debug/kms-plugin}"
if [[ ! -x "$PLUGIN_BIN" ]]; then
  echo "FAIL: kms-plugin binary not found at $PLUGIN_BIN (cargo build, or set KMS_PLUGIN_BIN)" >&2
  exit 1
fi
command -v openssl >/dev/null || { echo "FAIL: openssl not found" >&2; exit 1; }

t0=$SECONDS
DEFAULT_VERSION="$(bash "$here/build.sh" --default-version)"
BIN="" K8S_MINOR=""
ORIG_PATH="$PATH"
# use_version VERSION: build or take from the cache the binaries of that kube-apiserver release.
use_version() {
  local start=$SECONDS
  BIN="$(bash "$here/build.sh" "$1")" || fail "build.sh $1"
  # build.sh puts a kubectl there when the machine has none (or KMS_E2E_BUILD_KUBECTL=1); it is then preferred.
  PATH="$ORIG_PATH"
  if [[ -x "$BIN/kubectl" ]]; then export PATH="$BIN:$PATH"; fi
  K8S_MINOR="${1#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"
  log "binaries: $BIN ($("$BIN/kube-apiserver" --version), built/reused in $((SECONDS - start))s); kubectl: $(command -v kubectl)"
}

# Short path: the plugin's UNIX socket lives here (sun_path is limited to 107 bytes).
WORK="$(mktemp -d /tmp/kms-e2e.XXXXXX)"
PASSED=0
ETCD_PID="" PLUGIN_PID="" APISERVER_PID="" STANDIN_PID=""
NODE=""  # suffix of kubeconfig/encryption-config/apiserver log names (the ha flow runs three nodes)

log() { echo "[$(date +%H:%M:%S) +$((SECONDS - t0))s] $*"; }
ok() { PASSED=$((PASSED + 1)); echo "  ok: $*"; }

dump_logs() {
  for f in "$WORK"/*.log; do
    [[ -f "$f" ]] || continue
    echo "----- last lines of $f"
    tail -n 40 "$f"
  done
}

fail() {
  echo "FAIL: $*" >&2
  dump_logs >&2
  echo "k8s-e2e: $PASSED passed, 1 failed"
  exit 1
}

# stop_pid PID: SIGTERM, wait up to 15s, then SIGKILL. Only for processes this script started.
stop_pid() {
  local pid="$1"
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  local deadline=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "  (pid $pid ignored SIGTERM for 15s: SIGKILL)" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  touch "$WORK/ha-stop" 2>/dev/null || true  # ends the ha flow's loops, should it have failed mid-way
  stop_pid "$APISERVER_PID"; stop_pid "$PLUGIN_PID"; stop_pid "$STANDIN_PID"
  local p
  for p in "${HA_API_PIDS[@]}" "${HA_PLUGIN_PIDS[@]}"; do stop_pid "$p"; done
  stop_pid "$ETCD_PID"; stop_pid "$FAKE_PID"; stop_pid "$VAULT_PID"
  if [[ "${KMS_E2E_KEEP:-}" == 1 || $rc -ne 0 ]]; then
    echo "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# wait_for SECONDS DESCRIPTION CMD...: poll CMD (every 0.5s) until it succeeds or the deadline passes.
wait_for() {
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after ${timeout}s waiting for: $what"
    sleep 0.5
  done
}

# free_port: a loopback port that binds now, picked below the kernel's ephemeral range. A port from bind(0)
# comes from that range, where any outgoing connection (kubectl, etcd clients) may take it before the
# server that was handed it binds; CI once lost kube-apiserver's port that way.
free_port() {
  python3 - <<'PY'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
for _ in range(500):
    port = random.randint(10000, max(10001, low - 1))
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
else:
    raise SystemExit("no free loopback port below the ephemeral range")
PY
}

# ---------------------------------------------------------------------------------------------- certificates
make_certs() {
  local d="$WORK/pki"
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj "/CN=kms-e2e-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 1 \
      -extfile apiserver.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=kms-e2e-admin" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >admin.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 1 -extfile admin.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() {
  cat >"$WORK/kubeconfig$NODE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $WORK/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $WORK/pki/admin.crt
    client-key: $WORK/pki/admin.key
contexts:
- name: e2e
  context: {cluster: e2e, user: admin}
current-context: e2e
EOF
}

k() { kubectl --kubeconfig "$WORK/kubeconfig$NODE" --request-timeout=30s "$@"; }

# ---------------------------------------------------------------------------------------------- etcd
start_etcd() {
  ETCD_PORT="$(free_port)"
  local peer; peer="$(free_port)"
  ETCD_URL="http://127.0.0.1:$ETCD_PORT"
  "$BIN/e2ehelper" serve --data-dir "$WORK/etcd" --client-url "$ETCD_URL" --peer-url "http://127.0.0.1:$peer" \
    >>"$WORK/etcd.log" 2>&1 &
  ETCD_PID=$!
  wait_for 60 "etcd on $ETCD_URL" "$BIN/e2ehelper" keys --endpoint "$ETCD_URL" /
}

etcd_raw() { "$BIN/e2ehelper" get --endpoint "$ETCD_URL" "$1"; }

# ---------------------------------------------------------------------------------------------- backends
# Each backend provides: backend_<name>_init (per-flow setup in $WORK, sets PLUGIN_BACKEND_ARGS),
# backend_<name>_rotate (makes the backend's current key a new one) and backend_<name>_stop.
# To add a backend, write these three and name it in KMS_E2E_FLOWS (or in default_flows).
backend_local_init() {
  "$PLUGIN_BIN" keygen "$WORK/local-keys" >>"$WORK/plugin.log" 2>&1 || fail "kms-plugin keygen"
  PLUGIN_BACKEND_ARGS=(--backend local --local-key-file "$WORK/local-keys")
}
backend_local_rotate() {
  "$PLUGIN_BIN" keygen --add "$WORK/local-keys" >>"$WORK/plugin.log" 2>&1 || fail "kms-plugin keygen --add"
}
backend_local_stop() { :; }

# Akeyless: the plugin's akeyless backend against the fake Akeyless API (tests/fakes/akeyless_fake.py),
# access_key authentication, rotation through the fake's control API.
AKEYLESS_FAKE="${KMS_E2E_AKEYLESS_FAKE:-$repo/tests/fakes/akeyless_fake.py}"
FAKE_PID="" FAKE_URL=""
backend_akeyless_init() {
  local py="${KMS_TEST_PYTHON:-python3}"
  [[ -x "$py" ]] || py=python3
  rm -f "$WORK/akeyless.port"
  head -c 24 /dev/urandom | base64 >"$WORK/akeyless.access-key"
  FAKE_AKEYLESS_ACCESS_KEY="$(cat "$WORK/akeyless.access-key")" "$py" "$AKEYLESS_FAKE" --port 0 \
    --port-file "$WORK/akeyless.port" --access-id p-e2e --key e2e-kek >>"$WORK/akeyless-fake.log" 2>&1 &
  FAKE_PID=$!
  wait_for 30 "Akeyless fake to listen" test -s "$WORK/akeyless.port"
  FAKE_URL="http://127.0.0.1:$(cat "$WORK/akeyless.port")"
  PLUGIN_BACKEND_ARGS=(--backend akeyless --akeyless-url "$FAKE_URL" --akeyless-access-id p-e2e
    --akeyless-access-key-file "$WORK/akeyless.access-key" --akeyless-key-name e2e-kek)
}
backend_akeyless_rotate() {
  curl -sf -X POST -H 'Content-Type: application/json' -d '{"name": "e2e-kek", "action": "rotate"}' \
    "$FAKE_URL/__control/key" >>"$WORK/akeyless-fake.log" || fail "rotate the key in the Akeyless fake"
}
backend_akeyless_stop() { stop_pid "$FAKE_PID"; FAKE_PID=""; }

# Vault: the plugin's vault backend against a real `vault server -dev` (KMS_TEST_VAULT_BIN, which
# `make deps-vault` builds), Transit key e2e-kek, token auth from a file; rotation = Transit's rotate.
VAULT_PID="" VAULT_URL=""
vault_api() { curl -sf -H "X-Vault-Token: root" -H 'Content-Type: application/json' "$@"; }
backend_vault_init() {
  local bin="${KMS_TEST_VAULT_BIN:-}"
  [[ -x "$bin" ]] || fail "the vault flow needs a Vault server binary: set KMS_TEST_VAULT_BIN (make deps-vault) or KMS_TEST_OPT_OUT=vault"
  local port; port="$(free_port)"
  VAULT_DISABLE_MLOCK=true "$bin" server -dev -dev-root-token-id=root -dev-no-store-token \
    "-dev-listen-address=127.0.0.1:$port" >>"$WORK/vault.log" 2>&1 &
  VAULT_PID=$!
  VAULT_URL="http://127.0.0.1:$port"
  wait_for 60 "Vault dev server to answer" vault_api "$VAULT_URL/v1/sys/health"
  vault_api -X POST -d '{"type":"transit"}' "$VAULT_URL/v1/sys/mounts/transit" >/dev/null || fail "mount transit"
  vault_api -X POST -d '{"type":"aes256-gcm96"}' "$VAULT_URL/v1/transit/keys/e2e-kek" >/dev/null || fail "create the transit key"
  printf root >"$WORK/vault.token"
  PLUGIN_BACKEND_ARGS=(--backend vault --vault-addr "$VAULT_URL" --vault-transit-key e2e-kek
    --vault-token-file "$WORK/vault.token")
}
backend_vault_rotate() {
  vault_api -X POST "$VAULT_URL/v1/transit/keys/e2e-kek/rotate" >/dev/null || fail "rotate the transit key"
}
backend_vault_stop() { stop_pid "$VAULT_PID"; VAULT_PID=""; }

# backend_<name>_extra (optional): run at the end of run_flow, apiserver and plugin up, data under kid2.
# Vault: switch the plugin to Kubernetes auth against this flow's kube-apiserver (TokenReview through a
# service account bound to system:auth-delegator), with the Transit token from the login as its only
# credential: it must keep serving, and Vault must hold a token issued by auth/kubernetes/login to the
# plugin's service account.
backend_vault_extra() {
  log "vault: Kubernetes auth against this kube-apiserver"
  k create serviceaccount kms-plugin -n kube-system >/dev/null || fail "create service account kms-plugin"
  k create clusterrolebinding kms-plugin-tokenreview --clusterrole=system:auth-delegator \
    --serviceaccount=kube-system:kms-plugin >/dev/null || fail "bind kms-plugin to system:auth-delegator"
  k create token kms-plugin -n kube-system --duration=1h >"$WORK/sa.token" || fail "kubectl create token kms-plugin"
  local policy='path "transit/encrypt/e2e-kek" { capabilities = ["update"] }
path "transit/decrypt/e2e-kek" { capabilities = ["update"] }
path "transit/keys/e2e-kek" { capabilities = ["read"] }'
  vault_api -X PUT -d "$(jq -n --arg p "$policy" '{policy: $p}')" "$VAULT_URL/v1/sys/policies/acl/kms-plugin" >/dev/null ||
    fail "write the kms-plugin policy"
  vault_api -X POST -d '{"type":"kubernetes"}' "$VAULT_URL/v1/sys/auth/kubernetes" >/dev/null || fail "enable kubernetes auth"
  vault_api -X POST -d "$(jq -n --arg host "https://127.0.0.1:$API_PORT" --rawfile ca "$WORK/pki/ca.crt" \
    '{kubernetes_host: $host, kubernetes_ca_cert: $ca}')" "$VAULT_URL/v1/auth/kubernetes/config" >/dev/null ||
    fail "configure kubernetes auth"
  vault_api -X POST -d '{"bound_service_account_names":["kms-plugin"],"bound_service_account_namespaces":["kube-system"],"token_policies":["kms-plugin"],"token_ttl":"1h"}' \
    "$VAULT_URL/v1/auth/kubernetes/role/kms-plugin" >/dev/null || fail "create the kubernetes auth role"
  local kid; kid="$(plugin_key_id)"
  stop_plugin
  PLUGIN_BACKEND_ARGS=(--backend vault --vault-addr "$VAULT_URL" --vault-transit-key e2e-kek
    --vault-auth kubernetes --vault-role kms-plugin --vault-jwt-file "$WORK/sa.token")
  start_plugin
  [[ "$(plugin_key_id)" == "$kid" ]] || fail "key_id changed after the switch to Kubernetes auth: $(plugin_key_id) != $kid"
  ok "plugin on Kubernetes auth (service-account token, no Vault token) reports the same key_id $kid"
  local accessor found=""
  for accessor in $(vault_api -X LIST "$VAULT_URL/v1/auth/token/accessors" | jq -r '.data.keys[]'); do
    if vault_api -X POST -d "{\"accessor\":\"$accessor\"}" "$VAULT_URL/v1/auth/token/lookup-accessor" |
      jq -e '.data.path == "auth/kubernetes/login" and .data.meta.service_account_name == "kms-plugin"
             and .data.meta.service_account_namespace == "kube-system"' >/dev/null; then
      found=1
    fi
  done
  [[ -n "$found" ]] || fail "Vault holds no token issued by auth/kubernetes/login to kube-system/kms-plugin"
  ok "Vault issued the plugin's token through auth/kubernetes/login to kube-system/kms-plugin (TokenReview by this apiserver)"
  stop_apiserver
  start_apiserver
  check_all_read "on Kubernetes auth after an apiserver restart (cold DEK cache: Decrypt through the plugin)"
  create_secret k8sauth1
  if [[ "$API" == v2 ]]; then check_stored k8sauth1 "$kid"; else check_stored k8sauth1; fi
  ok "write on Kubernetes auth"
}

# Default flows: local always; akeyless once its fake is in the tree and the plugin has the --akeyless-* flags
# (KMS v2 flow only, to bound CI time). ha:v2 takes ~60 s; ha-akeyless:v2 (as long) runs in `make e2e-matrix`.
default_flows() {
  echo "local:v2 local:v1 ha:v2 inventory-mix:v2"
  if [[ ",${KMS_TEST_OPT_OUT:-}," == *",akeyless-fake,"* ]]; then
    echo "SKIP: akeyless:v2 flow opted out via KMS_TEST_OPT_OUT" >&2
  elif [[ -f "$AKEYLESS_FAKE" ]] && "$PLUGIN_BIN" serve --help 2>/dev/null | grep -q -- --akeyless-url; then
    echo "akeyless:v2 akeyless-swap:v1 migrate:v2 escrow:v2"
  fi
  if [[ ",${KMS_TEST_OPT_OUT:-}," == *",vault,"* ]]; then
    echo "SKIP: vault:v2 flow opted out via KMS_TEST_OPT_OUT" >&2
  else
    echo "vault:v2"
  fi
}

# ---------------------------------------------------------------------------------------------- plugin
SOCK_ENDPOINT=""
start_plugin() {
  # 1.27-1.28 check StatusResponse.version == "v2beta1" (docs/troubleshooting.md).
  local status=()
  [[ "$API" == v2 && "$K8S_MINOR" -le 28 ]] && status=(--status-version v2beta1)
  "$PLUGIN_BIN" serve --listen "$SOCK_ENDPOINT" "${PLUGIN_BACKEND_ARGS[@]}" --probe-interval 1s "${status[@]}" \
    >>"$WORK/plugin.log" 2>&1 &
  PLUGIN_PID=$!
  wait_for 30 "kms-plugin Status on $SOCK_ENDPOINT" "$BIN/e2ehelper" kms-status "$SOCK_ENDPOINT"
}
stop_plugin() { stop_pid "$PLUGIN_PID"; PLUGIN_PID=""; }
plugin_key_id() { "$BIN/e2ehelper" kms-status "$SOCK_ENDPOINT" | awk '{print $3}'; }

# ---------------------------------------------------------------------------------------------- apiserver
write_encryption_config() {
  cat >"$WORK/encryption-config$NODE.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: $API
          name: $KMS_NAME
          endpoint: $SOCK_ENDPOINT
          timeout: 3s
      - identity: {}
EOF
}

start_apiserver() {
  local gates=()
  [[ "$API" == v1 || -n "${KMSV1_GATE:-}" ]] && gates=(--feature-gates=KMSv1=true)
  # --service-cluster-ip-range is only an allocation range for Service objects; nothing connects to it.
  # --endpoint-reconciler-type=none: the reconciler would try to publish 127.0.0.1, which Endpoints reject.
  "$BIN/kube-apiserver" \
    --etcd-servers="$ETCD_URL" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --tls-cert-file="$WORK/pki/apiserver.crt" --tls-private-key-file="$WORK/pki/apiserver.key" \
    --client-ca-file="$WORK/pki/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$WORK/pki/sa.pub" --service-account-signing-key-file="$WORK/pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
    --authorization-mode=RBAC \
    --encryption-provider-config="$WORK/encryption-config$NODE.yaml" \
    --encryption-provider-config-automatic-reload=true \
    "${gates[@]}" \
    --profiling=false --v=2 \
    >>"$WORK/apiserver$NODE.log" 2>&1 &
  APISERVER_PID=$!
  [[ "${1:-}" == --no-wait ]] && return 0
  local start=$SECONDS
  until k get --raw "${READYZ:-/readyz}" >/dev/null 2>&1; do
    if ! kill -0 "$APISERVER_PID" 2>/dev/null; then
      wait "$APISERVER_PID" 2>/dev/null || true
      APISERVER_PID=""
      # Another process took the port between free_port and the bind: one more try on a new port.
      if [[ -z "${_APISERVER_RETRY:-}" ]] && tail -n 3 "$WORK/apiserver$NODE.log" | grep -q "address already in use"; then
        echo "  (port $API_PORT was taken before kube-apiserver bound it: retrying on another port)"
        API_PORT="$(free_port)"
        write_kubeconfig
        [[ -n "$NODE" ]] && HA_PORTS[${NODE#-}]=$API_PORT
        _APISERVER_RETRY=1 start_apiserver "$@"
        return
      fi
      fail "kube-apiserver exited during start-up (its log below)"
    fi
    ((SECONDS - start < 240)) || fail "timed out after 240s waiting for: kube-apiserver /readyz"
    sleep 0.5
  done
  ok "kube-apiserver ready in $((SECONDS - start))s"
}
stop_apiserver() { stop_pid "$APISERVER_PID"; APISERVER_PID=""; }

kms_ready() { k get --raw /readyz/kms-providers; }
kms_not_ready() { ! k get --raw /readyz/kms-providers; }

# ---------------------------------------------------------------------------------------------- checks
NS=e2e
declare -A MARKER=()

create_secret() {
  local name="$1"
  MARKER[$name]="e2e-plaintext-marker-$name-$RANDOM$RANDOM"
  k -n "$NS" create secret generic "$name" --from-literal=password="${MARKER[$name]}" >/dev/null ||
    fail "create secret $name"
}

# check_stored NAME [KEY_ID]: raw etcd value has the kms prefix, no plaintext (raw or base64), and (v2) KEY_ID.
check_stored() {
  local name="$1" want_key_id="${2:-}" raw="$WORK/raw-$1"
  etcd_raw "/registry/secrets/$NS/$name" >"$raw" || fail "read /registry/secrets/$NS/$name from etcd"
  local prefix="k8s:enc:kms:$API:$KMS_NAME:"
  [[ "$(head -c ${#prefix} "$raw")" == "$prefix" ]] ||
    fail "secret $name in etcd does not start with $prefix: $(head -c 40 "$raw" | od -c | head -3)"
  if grep -aqF "${MARKER[$name]}" "$raw" || grep -aqF "$(printf %s "${MARKER[$name]}" | base64 -w0)" "$raw"; then
    fail "plaintext of secret $name visible in etcd"
  fi
  if [[ "$API" == v2 ]]; then
    local kid; kid="$("$BIN/e2ehelper" keyid "$prefix" <"$raw")" || fail "decode EncryptedObject of $name"
    [[ -z "$want_key_id" || "$kid" == "$want_key_id" ]] ||
      fail "secret $name stored under key_id '$kid', want '$want_key_id'"
  elif [[ -z "${SKIP_KEYREF:-}" ]]; then
    # v1 has no key_id; the plugin's ciphertext names the backend key that wrapped its local KEK.
    # (SKIP_KEYREF=1: data written by another plugin, the swap flow.)
    local ref; ref="$("$BIN/e2ehelper" keyref "$prefix" <"$raw")" || fail "decode the v1 encrypted DEK of $name"
    [[ -z "$want_key_id" || "$ref" == "$want_key_id" ]] ||
      fail "secret $name wrapped under backend key '$ref', want '$want_key_id'"
  fi
}

# stored_key_ref NAME: backend key reference inside a stored kms v1 value.
stored_key_ref() {
  etcd_raw "/registry/secrets/$NS/$1" >"$WORK/raw-$1" && "$BIN/e2ehelper" keyref "k8s:enc:kms:$API:$KMS_NAME:" <"$WORK/raw-$1"
}

# stored_key_id NAME: key_id inside the stored kms v2 value (binary data goes through a file, not a variable).
stored_key_id() {
  etcd_raw "/registry/secrets/$NS/$1" >"$WORK/raw-$1" && "$BIN/e2ehelper" keyid "k8s:enc:kms:$API:$KMS_NAME:" <"$WORK/raw-$1"
}

check_read() {
  local name="$1" got
  got="$(k -n "$NS" get secret "$name" -o jsonpath='{.data.password}' | base64 -d)" || fail "read secret $name"
  [[ "$got" == "${MARKER[$name]}" ]] || fail "secret $name read back wrong"
}

check_all_read() {
  local n
  for n in "${!MARKER[@]}"; do check_read "$n"; done
  ok "$1: all ${#MARKER[@]} secrets read back through the API"
}

sha256_of() { printf 'sha256:%s' "$(printf %s "$1" | sha256sum | cut -d' ' -f1)"; }

# metric_has NAME KEY_ID_HASH: /metrics has a sample of NAME for our provider with that key_id_hash.
metric_has() {
  k get --raw /metrics | grep "^$1{" | grep "provider_name=\"$KMS_NAME\"" | grep -qF "key_id_hash=\"$2\""
}

KID_BEFORE="" KID_AFTER=""
plugin_key_changed() { [[ "$(plugin_key_id)" != "$KID_BEFORE" ]]; }
# Each /readyz request lets the apiserver re-ask Status once its cached result (20s) is stale.
apiserver_has_new_key_id() {
  k get --raw /readyz/kms-providers >/dev/null || true
  metric_has apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds "$(sha256_of "$KID_AFTER")"
}

# Every YAML under deploy/: Kubernetes objects go through `kubectl apply --dry-run=server` (full server-side
# validation and admission, nothing stored); EncryptionConfiguration files (apiserver config, not API objects)
# through the apiserver's own decoder and validation; anything else is listed as not checked.
validate_deploy_manifests() {
  local found=0 f rel kind ns
  shopt -s nullglob globstar
  # What a real cluster already has and this bare apiserver lacks (no controller-manager): the namespaces the
  # manifests name, each with its "default" ServiceAccount (Pod admission looks it up).
  for ns in kube-system $(cat "$repo"/deploy/**/*.yaml "$repo"/deploy/**/*.yml 2>/dev/null |
    awk '$1 == "namespace:" { print $2 }' | tr -d '"'"'" | sort -u); do
    k get namespace "$ns" >/dev/null 2>&1 || k create namespace "$ns" >/dev/null || fail "create namespace $ns"
    k -n "$ns" get serviceaccount default >/dev/null 2>&1 || k -n "$ns" create serviceaccount default >/dev/null ||
      fail "create serviceaccount $ns/default"
  done
  for f in "$repo"/deploy/**/*.yaml "$repo"/deploy/**/*.yml; do
    found=1
    rel="${f#"$repo"/}"
    kind="$(awk '/^kind:/ { print $2; exit }' "$f")"
    case "$kind" in
      "")
        echo "  (not a Kubernetes object, not checked: $rel)"
        ;;
      EncryptionConfiguration)
        "$BIN/e2ehelper" validate-encryption-config "$f" >"$WORK/validate.out" 2>&1 ||
          fail "$rel is not a valid EncryptionConfiguration: $(cat "$WORK/validate.out")"
        ok "$rel: valid EncryptionConfiguration ($(head -1 "$WORK/validate.out"))"
        ;;
      *)
        k apply --dry-run=server -f "$f" >"$WORK/dry-run.out" 2>&1 ||
          fail "kubectl apply --dry-run=server -f $rel: $(cat "$WORK/dry-run.out")"
        ok "$rel accepted by the apiserver (kubectl apply --dry-run=server): $(tr '\n' ' ' <"$WORK/dry-run.out")"
        ;;
    esac
  done
  shopt -u nullglob globstar
  ((found)) || echo "  (no deploy/*.yaml manifests yet: nothing to validate)"
}

# ---------------------------------------------------------------------------------------------- the flow
run_flow() {
  API="$1" BACKEND="$2"
  KMS_NAME="e2e-$BACKEND-$API"
  local flow_start=$SECONDS
  log "=== flow: kms $API provider, $BACKEND backend"
  rm -rf "$WORK/etcd" "$WORK/local-keys" "$WORK"/kms-*.sock
  MARKER=()
  SOCK_ENDPOINT="unix://$WORK/kms-$BACKEND-$API.sock"
  API_PORT="$(free_port)"
  write_kubeconfig
  "backend_${BACKEND}_init"
  write_encryption_config
  start_etcd
  start_plugin
  start_apiserver
  kms_ready >/dev/null || fail "/readyz/kms-providers not ok after start"
  ok "/readyz/kms-providers ok"

  log "secrets are stored encrypted"
  k create namespace "$NS" >/dev/null
  local i
  for i in 1 2 3 4 5; do create_secret "s$i"; done
  # kid1: what the stored values must name: the key_id (v2) or the backend key reference in the plugin's
  # ciphertext (v1).
  local kid1=""
  if [[ "$API" == v2 ]]; then kid1="$(plugin_key_id)"; else kid1="$(stored_key_ref s1)" || fail "key reference of s1"; fi
  for i in 1 2 3 4 5; do check_stored "s$i" "$kid1"; done
  if [[ "$API" == v2 ]]; then
    ok "5 secrets in etcd start with k8s:enc:kms:v2:$KMS_NAME:, hold no plaintext, key_id = the plugin's Status key_id"
  else
    ok "5 secrets in etcd start with k8s:enc:kms:v1:$KMS_NAME:, hold no plaintext, all wrapped under backend key $kid1"
  fi
  check_all_read "after create"

  log "restart the plugin, then the apiserver"
  stop_plugin
  start_plugin
  check_all_read "after plugin restart"
  create_secret s6
  check_stored s6 "$kid1"
  ok "write after plugin restart"
  stop_apiserver
  start_apiserver
  check_all_read "after apiserver restart (cold DEK cache: Decrypt through the plugin)"

  log "plugin outage"
  stop_plugin
  wait_for 90 "/readyz/kms-providers to report the plugin failure" kms_not_ready
  ok "/readyz/kms-providers reports failure while the plugin is down: $(k get --raw '/readyz/kms-providers?verbose' 2>&1 | grep -m1 -i 'kms' | cut -c1-160)"
  check_all_read "while the plugin is down (primed data)"
  if [[ "$API" == v2 ]]; then
    create_secret s7
    check_stored s7 "$kid1"
    ok "v2 write while the plugin is down (apiserver reuses its DEK seed for up to 3 minutes)"
  fi
  start_plugin
  wait_for 90 "/readyz/kms-providers to recover" kms_ready
  ok "/readyz/kms-providers healthy again after the plugin came back, apiserver untouched"

  log "rotate the backend key"
  local ref1="$kid1"
  kid1="$(plugin_key_id)"
  KID_BEFORE="$kid1"
  if [[ "$API" == v2 ]]; then
    wait_for 30 "status key_id hash metric of the current key" metric_has \
      apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds "$(sha256_of "$kid1")"
  fi
  "backend_${BACKEND}_rotate"
  local kid2="" ref2=""
  wait_for 30 "plugin Status to report a new key_id" plugin_key_changed
  kid2="$(plugin_key_id)"
  KID_AFTER="$kid2"
  ok "plugin reports a new key_id after rotation"
  if [[ "$API" == v2 ]]; then
    wait_for 120 "apiserver to see the new key_id (status key_id hash metric)" apiserver_has_new_key_id
    ok "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds has the new key_id hash"
    # The DEK seed rotation follows the Status that saw the new key_id; a new write proves it.
    local deadline=$((SECONDS + 60)) n=0
    while :; do
      n=$((n + 1))
      create_secret "new$n"
      [[ "$(stored_key_id "new$n")" == "$kid2" ]] && break
      ((SECONDS < deadline)) || fail "new secrets are not written under the new key_id"
      sleep 1
    done
    check_stored "new$n" "$kid2"
    ok "new secret new$n stored under the new key_id"
    metric_has apiserver_envelope_encryption_key_id_hash_last_timestamp_seconds "$(sha256_of "$kid2")" ||
      fail "key_id_hash_last_timestamp_seconds has no sample for the new key_id"
    ok "apiserver_envelope_encryption_key_id_hash_last_timestamp_seconds has the new key_id hash"
    [[ "$(stored_key_id s1)" == "$kid1" ]] || fail "s1 should still be under the old key_id before the rewrite"
  else
    create_secret new1
    ref2="$(stored_key_ref new1)" || fail "key reference of new1"
    [[ "$ref2" != "$ref1" ]] || fail "new secret still wrapped under the old backend key $ref1"
    check_stored new1 "$ref2"
    ok "new secret new1 wrapped under the new backend key $ref2"
    [[ "$(stored_key_ref s1)" == "$ref1" ]] || fail "s1 should still be under the old backend key before the rewrite"
    kid2="$ref2"
  fi
  k get secrets -A -o json | k replace -f - >"$WORK/replace.out" || fail "kubectl replace: $(cat "$WORK/replace.out")"
  ok "kubectl get secrets -A -o json | kubectl replace -f - ($(wc -l <"$WORK/replace.out") objects)"
  local n
  if [[ "$API" == v1 ]]; then
    # The apiserver skips an update whose object is unchanged unless the stored value is stale, and a kms v1
    # value can never be stale after a rotation inside the plugin (v1 has no key_id). So `replace` leaves v1
    # data where it was, and re-encrypting needs a real change to every object.
    local unchanged=0
    for n in "${!MARKER[@]}"; do
      [[ "$(stored_key_ref "$n")" == "$ref1" ]] && unchanged=$((unchanged + 1))
    done
    echo "  note: after kubectl replace, $unchanged of ${#MARKER[@]} kms v1 secrets are still under the old backend key" \
      "(unchanged objects are not rewritten; v1 cannot mark data stale)"
    k annotate secrets -A --all --overwrite "kms-plugin.test/reencrypted=$(date +%s)" >"$WORK/annotate.out" ||
      fail "kubectl annotate: $(cat "$WORK/annotate.out")"
    ok "kubectl annotate secrets -A --all (a real change, so every v1 secret is rewritten)"
  fi
  for n in "${!MARKER[@]}"; do check_stored "$n" "$kid2"; done
  if [[ "$API" == v2 ]]; then
    ok "all ${#MARKER[@]} secrets re-encrypted under the new key_id"
  else
    ok "all ${#MARKER[@]} secrets rewritten under the new backend key"
  fi
  check_all_read "after re-encryption"
  stop_apiserver
  start_apiserver
  check_all_read "after rotation and an apiserver restart"

  if [[ "$API" == v1 && "$BACKEND" == local ]]; then
    log "kms-plugin recover (kms v1 value, the key file, no plugin involved)"
    rm -f "$WORK/recovered-v1-s1"
    etcd_raw "/registry/secrets/$NS/s1" >"$WORK/v1-s1.value" || fail "export s1 from etcd"
    "$PLUGIN_BIN" recover --backend local --local-key-file "$WORK/local-keys" --etcd-value-file "$WORK/v1-s1.value" \
      --etcd-key "/registry/secrets/$NS/s1" --out "$WORK/recovered-v1-s1" 2>"$WORK/recover.err" || fail "recover: $(cat "$WORK/recover.err")"
    grep -aqF "${MARKER[s1]}" "$WORK/recovered-v1-s1" || fail "the recovered kms v1 object does not contain s1's value"
    ok "recover: a kms v1 value from etcd decrypted offline ($(tail -n 1 "$WORK/recover.err"))"
  fi
  if [[ "$API" == v2 && "$BACKEND" == local ]]; then
    log "deploy manifests"
    validate_deploy_manifests
  fi
  if declare -F "backend_${BACKEND}_extra" >/dev/null; then "backend_${BACKEND}_extra"; fi

  stop_apiserver; stop_plugin; stop_pid "$ETCD_PID"; ETCD_PID=""
  "backend_${BACKEND}_stop"
  log "=== flow kms $API / $BACKEND passed in $((SECONDS - flow_start))s"
}

# ---------------------------------------------------------------------------------------------- live migration
# migrate:v2 (issue 16): the running plugin moves from the local key file to Akeyless (the fake) with the key
# file as --previous-backend, one provider entry, the apiserver never restarted for it, while a reader and a
# writer loop run; `kms-plugin inventory` shows where the Secrets stand before, during and after the storage
# migration, and --require-key-id current exits 0 only once everything is under Akeyless.

# mig_loop KIND: until $WORK/mig-stop exists (at most 600 s), KIND=read reads m<n%8> and compares it with its
# marker, KIND=write creates mig-w<phase>-<n> (listed in $WORK/mig-written). Failures go to
# $WORK/mig-<KIND>.fail, the count to $WORK/mig-<KIND>.n.
mig_loop() {
  local kind="$1" until=$((SECONDS + 600)) n=0 name got
  : >"$WORK/mig-$kind.fail"
  while [[ ! -e "$WORK/mig-stop" ]] && ((SECONDS < until)); do
    n=$((n + 1))
    if [[ "$kind" == write ]]; then
      name="mig-w$MIG_PHASE-$n"
      if k -n "$NS" create secret generic "$name" --from-literal=password="$name" >/dev/null 2>>"$WORK/mig-$kind.fail"; then
        echo "$name" >>"$WORK/mig-written"
      else
        echo "write $name failed" >>"$WORK/mig-$kind.fail"
      fi
    else
      name="m$((n % 8 + 1))"
      got="$(k -n "$NS" get secret "$name" -o jsonpath='{.data.password}' 2>>"$WORK/mig-$kind.fail" | base64 -d)"
      [[ "$got" == "${MARKER[$name]}" ]] || echo "read $name: got '$got'" >>"$WORK/mig-$kind.fail"
    fi
    echo "$n" >"$WORK/mig-$kind.n.tmp" && mv "$WORK/mig-$kind.n.tmp" "$WORK/mig-$kind.n"
    sleep 0.2
  done
}
mig_loops_past() { (($(cat "$WORK/mig-write.n" 2>/dev/null || echo 0) > $1 && $(cat "$WORK/mig-read.n" 2>/dev/null || echo 0) > $2)); }
# mig_loops_run WHILE CMD...: runs CMD with both loops going, then stops them; fails on any failed call.
MIG_READS=0 MIG_WRITES=0 MIG_PHASE=0
mig_loops_run() {
  local what="$1"; shift
  MIG_PHASE=$((MIG_PHASE + 1))
  rm -f "$WORK/mig-stop" "$WORK"/mig-*.n
  mig_loop read & local rpid=$!
  mig_loop write & local wpid=$!
  wait_for 60 "the reader and writer loops to start" mig_loops_past 2 2
  "$@"
  local rn wn
  rn="$(cat "$WORK/mig-read.n")" wn="$(cat "$WORK/mig-write.n")"
  wait_for 60 "the loops to run past $what" mig_loops_past $((wn + 2)) $((rn + 2))
  touch "$WORK/mig-stop"
  wait "$rpid" "$wpid"
  local f
  for f in read write; do
    [[ ! -s "$WORK/mig-$f.fail" ]] || fail "the $f loop failed $what: $(head -5 "$WORK/mig-$f.fail")"
  done
  rn="$(cat "$WORK/mig-read.n")" wn="$(cat "$WORK/mig-write.n")"
  MIG_READS=$((MIG_READS + rn)) MIG_WRITES=$((MIG_WRITES + wn))
  ok "reader and writer loops $what: $rn reads, $wn writes, 0 failed"
}
inventory() { "$PLUGIN_BIN" inventory --etcd-endpoints "$ETCD_URL" --listen "$SOCK_ENDPOINT" "$@"; }
# inventory_count KEY_ID: how many secrets the inventory reports under KEY_ID; inventory_total: all secrets.
inventory_count() {
  inventory --output json | jq --arg k "$1" '[.resources.secrets.groups[] | select(.key_id == $k) | .objects] | add // 0'
}
inventory_total() { inventory --output json | jq '.resources.secrets.total'; }
require_current_rc() {
  local rc=0
  inventory --require-key-id current >"$WORK/inventory.out" 2>&1 || rc=$?
  echo "$rc"
}
mig_switch_plugin() {
  stop_plugin
  PLUGIN_BACKEND_ARGS=("${MIG_AKEYLESS_ARGS[@]}" --previous-backend local --local-key-file "$WORK/local-keys")
  start_plugin
  KID_AFTER="$(plugin_key_id)"
  [[ "$KID_AFTER" != "$KID_BEFORE" ]] || fail "key_id did not change after the switch to Akeyless: $KID_AFTER"
  wait_for 120 "apiserver to see the Akeyless key_id (status key_id hash metric)" apiserver_has_new_key_id
}
mig_rewrite() {
  k get secrets -A -o json | k replace -f - >"$WORK/replace.out" || fail "kubectl replace: $(cat "$WORK/replace.out")"
}

run_migrate_flow() {
  API=v2 BACKEND=migrate KMS_NAME="e2e-migrate-v2"
  local flow_start=$SECONDS i n
  log "=== flow: live migration, local key file -> Akeyless (fake) on the running plugin (kms v2)"
  rm -rf "$WORK/etcd" "$WORK/local-keys" "$WORK"/*.sock "$WORK"/mig-*
  MARKER=()
  SOCK_ENDPOINT="unix://$WORK/kms-migrate.sock"
  API_PORT="$(free_port)"
  write_kubeconfig
  backend_akeyless_init
  MIG_AKEYLESS_ARGS=("${PLUGIN_BACKEND_ARGS[@]}")
  backend_local_init
  write_encryption_config
  start_etcd
  start_plugin
  start_apiserver
  k create namespace "$NS" >/dev/null
  for i in 1 2 3 4 5 6 7 8; do create_secret "m$i"; done
  KID_BEFORE="$(plugin_key_id)"
  [[ "$KID_BEFORE" == local:* ]] || fail "the plugin should start on the local key file, key_id $KID_BEFORE"
  wait_for 30 "status key_id hash metric of the local key" metric_has \
    apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds "$(sha256_of "$KID_BEFORE")"
  n="$(inventory_count "$KID_BEFORE")"
  [[ "$n" == 8 && "$(inventory_total)" == 8 ]] || fail "inventory before: $n of $(inventory_total) secrets under $KID_BEFORE, want 8 of 8"
  [[ "$(require_current_rc)" == 0 ]] || fail "inventory --require-key-id current before the switch: $(cat "$WORK/inventory.out")"
  ok "inventory before: all 8 secrets under $KID_BEFORE, --require-key-id current exits 0"

  log "switch the running plugin to Akeyless, the key file as --previous-backend (loops running)"
  mig_loops_run "across the switch" mig_switch_plugin
  ok "the plugin reports Akeyless's key_id $KID_AFTER and the apiserver sees it (same provider, apiserver not restarted)"
  local rc; rc="$(require_current_rc)"
  [[ "$rc" == 3 ]] || fail "inventory --require-key-id current before the storage migration exited $rc, want 3: $(cat "$WORK/inventory.out")"
  n="$(inventory_count "$KID_BEFORE")"
  ((n >= 8)) || fail "inventory after the switch: only $n secrets under $KID_BEFORE"
  ok "before the storage migration: $n secrets still under $KID_BEFORE, --require-key-id current exits 3: $(tail -n 1 "$WORK/inventory.out")"
  stop_apiserver
  start_apiserver
  check_all_read "old data after an apiserver restart (cold DEK cache: unwrapped through --previous-backend)"

  log "storage migration (loops running)"
  mig_loops_run "across the storage migration" mig_rewrite
  # Writes that raced with the first replace may predate it; the loops are stopped, rewrite once more.
  mig_rewrite
  n="$(inventory_count "$KID_AFTER")"
  local total; total="$(inventory_total)"
  [[ "$n" == "$total" ]] || fail "inventory after the storage migration: $n of $total secrets under $KID_AFTER"
  [[ "$(require_current_rc)" == 0 ]] || fail "inventory --require-key-id current after the migration: $(cat "$WORK/inventory.out")"
  ok "inventory after: all $total secrets (loops' writes included) under $KID_AFTER, --require-key-id current exits 0"

  log "drop --previous-backend"
  stop_plugin
  PLUGIN_BACKEND_ARGS=("${MIG_AKEYLESS_ARGS[@]}")
  start_plugin
  stop_apiserver
  start_apiserver
  check_all_read "on Akeyless alone after an apiserver restart"
  local name written=0
  while read -r name; do
    [[ "$(k -n "$NS" get secret "$name" -o jsonpath='{.data.password}' 2>/dev/null | base64 -d)" == "$name" ]] ||
      fail "secret $name written by the loop does not read back on Akeyless alone"
    written=$((written + 1))
  done <"$WORK/mig-written"
  [[ "$written" == "$MIG_WRITES" ]] || fail "$written secrets listed as written by the loops, $MIG_WRITES writes counted"
  ok "the loops' $written writes read back on Akeyless alone; $MIG_READS reads and $MIG_WRITES writes in all, 0 failed"

  stop_apiserver; stop_plugin; stop_pid "$ETCD_PID"; ETCD_PID=""
  backend_akeyless_stop
  log "=== flow live migration passed in $((SECONDS - flow_start))s"
}

# ---------------------------------------------------------------------------------------------- inventory
# inventory-mix:v2 (issue 16 test (c)): one etcd holding Secrets stored as identity, aescbc, kms v1 and kms v2
# (this plugin on one socket serves both), written through a real kube-apiserver whose provider list grows
# step by step; `kms-plugin inventory` must count each exactly, and --require-key-id current must fail
# until a storage migration has moved everything under the v2 key_id.
mix_config() {
  local first="$1"
  {
    printf 'apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n'
    case "$first" in
      v2) printf '      - kms: {apiVersion: v2, name: e2e-mix-v2, endpoint: "%s", timeout: 3s}\n' "$SOCK_ENDPOINT" ;;
    esac
    case "$first" in
      v2 | v1) printf '      - kms: {apiVersion: v1, name: e2e-mix-v1, endpoint: "%s", timeout: 3s}\n' "$SOCK_ENDPOINT" ;;
    esac
    case "$first" in
      v2 | v1 | aescbc) printf '      - aescbc: {keys: [{name: key1, secret: "%s"}]}\n' "$(cat "$WORK/aescbc.key")" ;;
    esac
    printf '      - identity: {}\n'
  } >"$WORK/encryption-config.yaml"
}
inventory_group_count() {  # JQ_FILTER: objects in the groups it selects
  inventory --output json | jq "[.resources.secrets.groups[] | select($1) | .objects] | add // 0"
}
run_inventory_mix_flow() {
  API=v2 BACKEND=local KMS_NAME="e2e-mix-v2"
  local flow_start=$SECONDS i
  log "=== flow: inventory of a mixed etcd (identity, aescbc, kms v1, kms v2 through a real apiserver)"
  rm -rf "$WORK/etcd" "$WORK/local-keys" "$WORK"/*.sock "$WORK/aescbc.key"
  MARKER=()
  SOCK_ENDPOINT="unix://$WORK/kms-mix.sock"
  API_PORT="$(free_port)"
  write_kubeconfig
  backend_local_init
  head -c 32 /dev/urandom | base64 -w0 >"$WORK/aescbc.key"
  start_etcd
  start_plugin
  local step first
  for step in identity:2 aescbc:1 v1:2 v2:3; do
    first="${step%%:*}"
    mix_config "$first"
    [[ "$first" == v1 ]] && KMSV1_GATE=1
    start_apiserver
    [[ "$first" == identity ]] && k create namespace "$NS" >/dev/null
    for ((i = 1; i <= ${step#*:}; i++)); do create_secret "mix-$first-$i"; done
    stop_apiserver
  done
  start_apiserver
  check_all_read "mixed storage, all providers listed"
  local kid; kid="$(plugin_key_id)"
  local plain cbc v1 v2 total
  plain="$(inventory_group_count '.storage == "plaintext"')"
  cbc="$(inventory_group_count '.storage == "local-provider" and .provider == "aescbc" and .key_name == "key1"')"
  v1="$(inventory_group_count '.storage == "kms-v1" and .provider == "e2e-mix-v1"')"
  v2="$(inventory_group_count ".storage == \"kms-v2\" and .provider == \"e2e-mix-v2\" and .key_id == \"$kid\"")"
  total="$(inventory --output json | jq '.resources.secrets.total')"
  [[ "$plain/$cbc/$v1/$v2/$total" == 2/1/2/3/8 ]] ||
    fail "inventory counts plaintext/aescbc/kms-v1/kms-v2/total = $plain/$cbc/$v1/$v2/$total, want 2/1/2/3/8: $(inventory --output json | jq -c .)"
  ok "inventory counts each storage exactly: 2 identity, 1 aescbc key1, 2 kms v1 e2e-mix-v1, 3 kms v2 e2e-mix-v2 under $kid (8 in all)"
  [[ "$(require_current_rc)" == 3 ]] || fail "--require-key-id current should exit 3 before the storage migration: $(cat "$WORK/inventory.out")"
  mig_rewrite
  [[ "$(require_current_rc)" == 0 ]] || fail "--require-key-id current after the storage migration: $(cat "$WORK/inventory.out")"
  [[ "$(inventory_group_count ".key_id == \"$kid\"")" == 8 ]] || fail "not all 8 secrets under $kid after the storage migration"
  ok "--require-key-id current exits 3 on the mix and 0 once kubectl replace moved all 8 under $kid"
  check_all_read "after the storage migration"
  stop_apiserver; stop_plugin; stop_pid "$ETCD_PID"; ETCD_PID=""
  KMSV1_GATE=""
  log "=== flow inventory mix passed in $((SECONDS - flow_start))s"
}

# ---------------------------------------------------------------------------------------------- escrow
# escrow:v2 (issue 16 §1, test (a)): Akeyless (the fake) primary with a local key file as escrow backend.
# The key is deleted in the fake, plugin and apiserver restart (cold caches): every Secret reads back
# through the escrow, which the plugin reports (metric, audit line); `kms-plugin recover` decrypts a value
# exported from etcd with the escrow key file alone.
run_escrow_flow() {
  API=v2 BACKEND=escrow KMS_NAME="e2e-escrow-v2"
  local flow_start=$SECONDS i http
  log "=== flow: escrow, Akeyless (fake) primary + local key file escrow (kms v2)"
  rm -rf "$WORK/etcd" "$WORK"/escrow-* "$WORK"/*.sock "$WORK"/recovered-*
  MARKER=()
  SOCK_ENDPOINT="unix://$WORK/kms-escrow.sock"
  API_PORT="$(free_port)"
  write_kubeconfig
  backend_akeyless_init
  "$PLUGIN_BIN" keygen "$WORK/escrow-keys" >>"$WORK/plugin.log" 2>&1 || fail "kms-plugin keygen (escrow key)"
  http="$(free_port)"
  PLUGIN_BACKEND_ARGS+=(--escrow-backend local --local-key-file "$WORK/escrow-keys"
    --http "127.0.0.1:$http" --audit-log "$WORK/escrow-audit.log")
  write_encryption_config
  start_etcd
  start_plugin
  start_apiserver
  k create namespace "$NS" >/dev/null
  for i in 1 2 3 4 5 6; do create_secret "e$i"; done
  local kid; kid="$(plugin_key_id)"
  [[ "$kid" == akeyless:* ]] || fail "key_id should be the primary's (Akeyless), got $kid"
  for i in 1 2 3 4 5 6; do check_stored "e$i" "$kid"; done
  ok "6 secrets under the primary's key_id $kid (each local KEK also wrapped by the escrow key file)"
  [[ "$(curl -sf "http://127.0.0.1:$http/metrics" | awk '$1 ~ /^kms_plugin_escrow_wraps_total\{.*outcome="ok"/ {s += $2} END {print s + 0}')" -ge 1 ]] ||
    fail "kms_plugin_escrow_wraps_total{outcome=ok} is 0"
  ok "kms_plugin_escrow_wraps_total{outcome=\"ok\"} >= 1"
  curl -s "http://127.0.0.1:$http/readyz?verbose" | grep -qx "escrow local: ok" || fail "/readyz?verbose has no 'escrow local: ok': $(curl -s "http://127.0.0.1:$http/readyz?verbose")"
  "$PLUGIN_BIN" health -v --listen "$SOCK_ENDPOINT" | grep -qx "escrow local: ok" || fail "health -v has no 'escrow local: ok': $("$PLUGIN_BIN" health -v --listen "$SOCK_ENDPOINT" 2>&1)"
  ok "escrow health reported apart from Status: /readyz?verbose and kms-plugin health -v say 'escrow local: ok'"

  log "disaster: the key is deleted in the primary; plugin and apiserver restart"
  curl -sf -X POST -H 'Content-Type: application/json' -d '{"name": "e2e-kek", "action": "delete"}' \
    "$FAKE_URL/__control/key" >>"$WORK/akeyless-fake.log" || fail "delete the key in the Akeyless fake"
  stop_plugin
  start_plugin
  grep -q 'ESCROW TAKEOVER' "$WORK/plugin.log" || fail "the plugin did not report the escrow takeover"
  local kid_dr; kid_dr="$(plugin_key_id)"
  [[ "$kid_dr" == local:* ]] || fail "after the takeover the key_id should be the escrow's (local), got $kid_dr"
  ok "the plugin starts although the primary's key is gone: ESCROW TAKEOVER logged, Status key_id $kid_dr (the escrow's)"
  stop_apiserver
  start_apiserver
  kms_ready >/dev/null || fail "/readyz/kms-providers not ok under the escrow takeover"
  check_all_read "after the primary lost the key (cold caches: every local KEK unwrapped through the escrow)"
  local unwraps
  unwraps="$(curl -sf "http://127.0.0.1:$http/metrics" | awk '$1 ~ /^kms_plugin_escrow_unwraps_total\{.*outcome="ok"/ {s += $2} END {print s + 0}')"
  ((unwraps >= 1)) || fail "kms_plugin_escrow_unwraps_total{outcome=ok} is $unwraps"
  grep -q '"operation":"escrow_unwrap"' "$WORK/escrow-audit.log" || fail "no escrow_unwrap line in the audit log"
  grep -q 'decrypted through an ESCROW backend' "$WORK/plugin.log" || fail "no escrow warning in the plugin log"
  ok "the escrow unwrap is loud: kms_plugin_escrow_unwraps_total{outcome=\"ok\"} = $unwraps, an escrow_unwrap audit line, a warning"
  create_secret e7
  check_stored e7 "$kid_dr"
  check_all_read "with a new write under the escrow's key_id"

  log "kms-plugin recover: a value exported from etcd, the escrow key file alone"
  etcd_raw "/registry/secrets/$NS/e1" >"$WORK/escrow-e1.value" || fail "export e1 from etcd"
  "$PLUGIN_BIN" recover --backend local --local-key-file "$WORK/escrow-keys" --etcd-value-file "$WORK/escrow-e1.value" \
    --etcd-key "/registry/secrets/$NS/e1" --out "$WORK/recovered-e1" 2>"$WORK/recover.err" || fail "recover: $(cat "$WORK/recover.err")"
  grep -aqF "${MARKER[e1]}" "$WORK/recovered-e1" || fail "the recovered object does not contain e1's value"
  [[ "$(stat -c %a "$WORK/recovered-e1")" == 600 ]] || fail "recovered file mode is $(stat -c %a "$WORK/recovered-e1"), want 600"
  ok "recover: e1 decrypted offline with the escrow key file ($(cat "$WORK/recover.err"))"
  "$PLUGIN_BIN" keygen "$WORK/escrow-wrong-keys" >/dev/null 2>&1
  if "$PLUGIN_BIN" recover --backend local --local-key-file "$WORK/escrow-wrong-keys" --etcd-value-file "$WORK/escrow-e1.value" \
    --etcd-key "/registry/secrets/$NS/e1" --out "$WORK/recovered-wrong" 2>"$WORK/recover-wrong.err"; then
    fail "recover succeeded with a key file that never wrapped this data"
  fi
  [[ ! -e "$WORK/recovered-wrong" ]] || fail "recover with the wrong key wrote an output file"
  if "$PLUGIN_BIN" recover --backend local --local-key-file "$WORK/escrow-keys" --etcd-value-file "$WORK/escrow-e1.value" \
    --etcd-key "/registry/secrets/$NS/e2" --out "$WORK/recovered-e1-as-e2" 2>/dev/null; then
    fail "recover accepted the value under another etcd key"
  fi
  ok "recover refuses another key file ($(tail -n 1 "$WORK/recover-wrong.err" | cut -c1-200)) and another etcd key"

  stop_apiserver; stop_plugin; stop_pid "$ETCD_PID"; ETCD_PID=""
  backend_akeyless_stop
  log "=== flow escrow passed in $((SECONDS - flow_start))s"
}

# ---------------------------------------------------------------------------------------------- the image swap
# akeyless-swap:v1 (issue 12): data written by the original Akeyless plugin (stand-in: standin
# akeyless-original, the original's env and wire behaviour) reads back after its image is swapped for
# kms-plugin in drop-in mode (same env, same socket, `serve` with no flags), through a real kube-apiserver.

# v1_dek_first_byte NAME: first byte (hex) of the encrypted DEK in the stored value: PREFIX ‖ uint16 ‖ DEK.
v1_dek_first_byte() {
  local prefix="k8s:enc:kms:v1:$KMS_NAME:"
  etcd_raw "/registry/secrets/$NS/$1" >"$WORK/raw-$1" || return 1
  tail -c +$((${#prefix} + 3)) "$WORK/raw-$1" | head -c 1 | od -An -tx1 | tr -d ' \n'
}

# The original plugin's environment (shared by both images), for `env`: a plain command started with `&`
# so that $! is the process itself (stop_pid), not a subshell around it.
akeyless_original_env() {
  ORIG_ENV=(AKEYLESS_URL="$FAKE_URL" AKEYLESS_UNIX_SOCKET="$SWAP_SOCKET" AKEYLESS_KEY_ENCRYPTION_KEY=e2e-kek
    AKEYLESS_ACCESS_ID=p-e2e AKEYLESS_ACCESS_KEY="$(cat "$WORK/akeyless.access-key")")
}

plugin_metric() {
  curl -sf "http://127.0.0.1:$SWAP_HTTP_PORT/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

run_swap_flow() {
  API=v1 BACKEND=akeyless-swap
  KMS_NAME="e2e-akeyless-swap-v1"
  local flow_start=$SECONDS n
  log "=== flow: image swap, original Akeyless plugin -> kms-plugin drop-in (kms v1)"
  rm -rf "$WORK/etcd" "$WORK"/*.sock "$WORK/plugin-data"
  MARKER=()
  SWAP_SOCKET="$WORK/akeyless_kms_plugin.sock"
  SOCK_ENDPOINT="unix://$SWAP_SOCKET"
  API_PORT="$(free_port)"
  write_kubeconfig
  backend_akeyless_init
  write_encryption_config
  start_etcd
  akeyless_original_env
  env "${ORIG_ENV[@]}" "$BIN/standin" akeyless-original >>"$WORK/standin.log" 2>&1 &
  STANDIN_PID=$!
  wait_for 30 "the original plugin's stand-in on $SWAP_SOCKET" test -S "$SWAP_SOCKET"
  start_apiserver
  kms_ready >/dev/null || fail "/readyz/kms-providers not ok with the original plugin"
  ok "kube-apiserver ready with the original Akeyless plugin (stand-in) as its kms v1 provider"

  k create namespace "$NS" >/dev/null
  for n in 1 2 3 4 5; do create_secret "legacy$n"; done
  for n in 1 2 3 4 5; do
    SKIP_KEYREF=1 check_stored "legacy$n"
    [[ "$(v1_dek_first_byte "legacy$n")" != 4b ]] || fail "legacy$n is in kms-plugin's format, not the original's"
    "$BIN/e2ehelper" keyref "k8s:enc:kms:v1:$KMS_NAME:" <"$WORK/raw-legacy$n" >/dev/null 2>&1 &&
      fail "legacy$n decodes as a kms-plugin ciphertext"
  done
  ok "5 secrets stored by the original plugin: its format (an Akeyless /encrypt result), no plaintext in etcd"

  log "swap the image: stop the original, start kms-plugin in drop-in mode, restart the apiserver"
  stop_pid "$STANDIN_PID"; STANDIN_PID=""
  SWAP_HTTP_PORT="$(free_port)"
  mkdir -p "$WORK/plugin-data"
  env "${ORIG_ENV[@]}" KMS_PLUGIN_HTTP="127.0.0.1:$SWAP_HTTP_PORT" KMS_PLUGIN_DATA_DIR="$WORK/plugin-data" \
    "$PLUGIN_BIN" serve >>"$WORK/plugin.log" 2>&1 &
  PLUGIN_PID=$!
  wait_for 30 "kms-plugin (drop-in) Status on $SOCK_ENDPOINT" "$BIN/e2ehelper" kms-status "$SOCK_ENDPOINT"
  ok "kms-plugin serve (no flags, the original's AKEYLESS_* env) listens on the original's socket"
  stop_apiserver
  start_apiserver
  check_all_read "after the swap and an apiserver restart (cold DEK cache: legacy Decrypts through kms-plugin)"
  local legacy; legacy="$(plugin_metric kms_plugin_legacy_v1_decrypts_total)"
  ((${legacy%.*} > 0)) || fail "kms_plugin_legacy_v1_decrypts_total is $legacy after reading legacy data"
  ok "kms_plugin_legacy_v1_decrypts_total = $legacy before the re-encryption"
  create_secret fresh1
  [[ "$(v1_dek_first_byte fresh1)" == 4b ]] || fail "a secret written after the swap is not in kms-plugin's format"
  ok "a secret written after the swap is in kms-plugin's format"

  log "re-encrypt (docs/rotation.md: annotate every Secret)"
  k annotate secrets -A --all --overwrite "kms-plugin.test/reencrypted=$(date +%s)" >"$WORK/annotate.out" ||
    fail "kubectl annotate: $(cat "$WORK/annotate.out")"
  local left=0
  for n in "${!MARKER[@]}"; do
    check_stored "$n"
    if [[ "$(v1_dek_first_byte "$n")" != 4b ]] ||
      ! "$BIN/e2ehelper" keyref "k8s:enc:kms:v1:$KMS_NAME:" <"$WORK/raw-$n" >/dev/null 2>&1; then
      left=$((left + 1))
    fi
  done
  ((left == 0)) || fail "$left of ${#MARKER[@]} secrets still in the original plugin's format after the re-encryption"
  ok "after kubectl annotate: 0 of ${#MARKER[@]} secrets left in the original's format (etcd decoded)"
  stop_apiserver
  start_apiserver
  check_all_read "after the re-encryption and an apiserver restart"

  stop_apiserver; stop_plugin; stop_pid "$ETCD_PID"; ETCD_PID=""
  backend_akeyless_stop
  log "=== flow akeyless-swap:v1 passed in $((SECONDS - flow_start))s"
}

# ---------------------------------------------------------------------------------------------- three nodes
# ha:v2 and ha-akeyless:v2 (issue 17 §2): three kube-apiservers on one etcd, each with its own plugin (ha:v2:
# its own copy of the local key file; ha-akeyless:v2: all three on the Akeyless fake). A writer and a reader
# loop run across the nodes for the whole flow, through: a rotation (ha:v2: with node 3 left on the old file
# for a while, the lagging node), a SIGKILL+restart of plugin 2, a restart of apiserver 3 (taken out of the
# loops' rotation first, as a load balancer would), and a storage migration through node 1.
declare -a HA_API_PIDS=() HA_PLUGIN_PIDS=() HA_PORTS=() HA_HTTP=()

ha_start_plugin() {
  local i="$1" args=("${PLUGIN_BACKEND_ARGS[@]}")
  [[ "$BACKEND" == local ]] && args=(--backend local --local-key-file "$WORK/local-keys-$i")
  mkdir -p "$WORK/plugin-data-$i"
  "$PLUGIN_BIN" serve --listen "unix://$WORK/kms-ha$i.sock" "${args[@]}" --data-dir "$WORK/plugin-data-$i" \
    --http "127.0.0.1:${HA_HTTP[i]}" --probe-interval 1s >>"$WORK/plugin-$i.log" 2>&1 &
  HA_PLUGIN_PIDS[i]=$!
  wait_for 30 "plugin $i Status" "$BIN/e2ehelper" kms-status "unix://$WORK/kms-ha$i.sock"
}
ha_status() { "$BIN/e2ehelper" kms-status "unix://$WORK/kms-ha$1.sock"; }
ha_key_id() { ha_status "$1" | awk '{print $3}'; }
HA_KID1=""
ha_plugin_moved() { [[ "$(ha_key_id "$1")" != "$HA_KID1" ]]; }
# ha_metric NODE NAME: sum of the samples of NAME on plugin NODE's /metrics.
ha_metric() {
  curl -sf "http://127.0.0.1:${HA_HTTP[$1]}/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
ha_metric_is() { [[ "$(ha_metric "$1" "$2")" == "$3" ]]; }

ha_start_apiserver() {
  local i="$1"
  NODE="-$i" API_PORT="${HA_PORTS[i]}" SOCK_ENDPOINT="unix://$WORK/kms-ha$i.sock"
  write_kubeconfig; write_encryption_config; start_apiserver
  HA_API_PIDS[i]=$APISERVER_PID; APISERVER_PID=""; NODE=""
}

# ha_put NAME NODE VALUE / ha_get NAME NODE: one Secret through one node.
ha_put() { NODE="-$2" k -n "$NS" create secret generic "$1" --from-literal=password="$3" >/dev/null; }
ha_get() { NODE="-$2" k -n "$NS" get secret "$1" -o jsonpath='{.data.password}' | base64 -d; }
ha_reads_back() { [[ "$(ha_get "$1" "$2")" == "$3" ]]; }

# ha_loop KIND: until $WORK/ha-stop exists (at most 600 s), KIND=write creates ha-w<n> and KIND=read reads
# s-ha<n%5> (and compares), through node n%3 (the next one while $WORK/ha-down-<node> exists: the node is out
# of the load balancer). Each failure is one line in $WORK/ha-<KIND>.fail; the count in $WORK/ha-<KIND>.n.
ha_loop() {
  local kind="$1" until=$((SECONDS + 600)) n=0 node
  : >"$WORK/ha-$kind.fail"
  while [[ ! -e "$WORK/ha-stop" ]] && ((SECONDS < until)); do
    n=$((n + 1)); node=$((n % 3 + 1))
    [[ -e "$WORK/ha-down-$node" ]] && node=$((node % 3 + 1))
    if [[ "$kind" == write ]]; then
      ha_put "ha-w$n" "$node" "w$n" 2>>"$WORK/ha-$kind.fail" || echo "write ha-w$n via node $node failed" >>"$WORK/ha-$kind.fail"
    else
      local want="ha-marker-$((n % 5))" got
      got="$(ha_get "s-ha$((n % 5))" "$node" 2>>"$WORK/ha-$kind.fail")"
      [[ "$got" == "$want" ]] || echo "read s-ha$((n % 5)) via node $node: got '$got'" >>"$WORK/ha-$kind.fail"
    fi
    echo "$n" >"$WORK/ha-$kind.n"
    sleep 0.2
  done
}
ha_loops_past() { (($(cat "$WORK/ha-write.n") > $1 && $(cat "$WORK/ha-read.n") > $2)); }
ha_no_failures_yet() {
  local f
  for f in write read; do
    [[ ! -s "$WORK/ha-$f.fail" ]] || fail "the $f loop failed $1: $(head -5 "$WORK/ha-$f.fail")"
  done
}

# ha_all_moved KID: every plugin and every apiserver on KID.
ha_all_moved() {
  local i
  for i in 1 2 3; do wait_for 30 "plugin $i to report the new key" ha_plugin_moved "$i"; done
  for i in 1 2 3; do [[ "$(ha_key_id "$i")" == "$1" ]] || fail "plugin $i reports $(ha_key_id "$i"), want $1"; done
  KID_AFTER="$1"
  for i in 1 2 3; do NODE="-$i" wait_for 120 "apiserver $i to see the new key_id" apiserver_has_new_key_id; done
  NODE=""
}

# The lagging node (ha:v2 only): the new key file reaches nodes 1 and 2; node 3 stays on the old one.
ha_lagging_node() {
  local kid1="$1" i
  log "lagging node: new key file on nodes 1 and 2 only"
  for i in 1 2; do cp -p "$WORK/local-keys" "$WORK/local-keys-$i.new" && mv "$WORK/local-keys-$i.new" "$WORK/local-keys-$i"; done
  for i in 1 2; do wait_for 30 "plugin $i to report the new key" ha_plugin_moved "$i"; done
  local kid2; kid2="$(ha_key_id 1)"
  [[ "$(ha_key_id 2)" == "$kid2" ]] || fail "plugins 1 and 2 disagree on the new key_id"
  KID_AFTER="$kid2"
  for i in 1 2; do NODE="-$i" wait_for 120 "apiserver $i to see the new key_id" apiserver_has_new_key_id; done
  NODE=""
  [[ "$(ha_key_id 3)" == "$kid1" ]] || fail "plugin 3 left the old key_id without the new file"
  ok "nodes 1 and 2 on the new key_id, node 3 still on the old one"

  ha_put lag-new 1 lag-new-marker || fail "write lag-new through node 1"
  [[ "$(stored_key_id lag-new)" == "$kid2" ]] || fail "lag-new (node 1) is stored under $(stored_key_id lag-new), want the new key_id"
  ha_put lag-old 3 lag-old-marker || fail "write lag-old through node 3"
  [[ "$(stored_key_id lag-old)" == "$kid1" ]] || fail "lag-old (node 3) is stored under $(stored_key_id lag-old), want the old key_id"
  ok "etcd: a Secret written through node 1 is under the new key_id, one written through the lagging node under the old"
  for i in 1 2 3; do ha_reads_back lag-old "$i" lag-old-marker || fail "lag-old (old key) does not read back through node $i"; done
  ok "the lagging node's write (old key) reads back through all three nodes"

  # What happens, exactly: the lagging node cannot decrypt data under a key its file lacks. The read fails,
  # the plugin counts it, and nothing else changes (a key never seen is no revocation: Status stays ok).
  local err="$WORK/lag-read.err"
  if ha_get lag-new 3 >/dev/null 2>"$err"; then fail "lag-new (new key) read back through the lagging node before its file arrived"; fi
  local missing="${kid2#local:}"
  grep -qF "(InternalError)" "$err" && grep -qF "local key \"$missing\" is not in $WORK/local-keys-3" "$err" ||
    fail "reading lag-new through node 3: want InternalError naming local key $missing, got: $(cat "$err")"
  # A list through the lagging node fails as a whole as soon as one item is under the missing key.
  if NODE=-3 k -n "$NS" get secrets -o name >/dev/null 2>"$err"; then fail "listing secrets through the lagging node succeeded"; fi
  grep -qF "(StorageReadError)" "$err" && grep -qF "is not in $WORK/local-keys-3" "$err" ||
    fail "listing secrets through node 3: want StorageReadError naming the missing key, got: $(head -c 600 "$err")"
  grep -qF "a Decrypt needs a local key that this node's key file does not hold" "$WORK/plugin-3.log" ||
    fail "plugin 3 did not log the unknown-key warning"
  ha_metric_is 3 kms_plugin_local_keys_unknown 1 || fail "plugin 3: kms_plugin_local_keys_unknown = $(ha_metric 3 kms_plugin_local_keys_unknown), want 1"
  local refused; refused="$(ha_metric 3 kms_plugin_local_unknown_key_unwraps_total)"
  ((${refused%.*} >= 1)) || fail "plugin 3: kms_plugin_local_unknown_key_unwraps_total = $refused"
  [[ "$(ha_status 3 | awk '{print $2}')" == ok ]] || fail "plugin 3 Status not ok while lagging: $(ha_status 3)"
  NODE=-3 kms_ready >/dev/null || fail "apiserver 3 /readyz/kms-providers not ok while lagging"
  for i in 1 2; do ha_metric_is "$i" kms_plugin_local_keys_unknown 0 || fail "plugin $i reports unknown keys"; done
  ok "lagging node: GET of a Secret under the new key fails (InternalError naming the missing key), a LIST fails as a whole (StorageReadError), plugin 3 warns once and reports kms_plugin_local_keys_unknown 1 (unwraps refused: $refused); its Status and /readyz/kms-providers stay ok"
  ha_no_failures_yet "while node 3 was lagging"

  log "the key file reaches node 3"
  cp -p "$WORK/local-keys" "$WORK/local-keys-3.new" && mv "$WORK/local-keys-3.new" "$WORK/local-keys-3"
  wait_for 30 "lag-new to read back through node 3" ha_reads_back lag-new 3 lag-new-marker
  wait_for 30 "plugin 3's kms_plugin_local_keys_unknown to drop to 0" ha_metric_is 3 kms_plugin_local_keys_unknown 0
  ok "after the file arrived (no restart): lag-new reads back through node 3, kms_plugin_local_keys_unknown 0"
}

run_ha_flow() {
  API=v2 BACKEND="$1" KMS_NAME="e2e-ha-$1-v2"
  local flow_start=$SECONDS i
  log "=== flow: three kube-apiservers on one etcd, one plugin each (kms v2, $BACKEND backend)"
  rm -rf "$WORK/etcd" "$WORK"/local-keys* "$WORK"/*.sock "$WORK"/ha-* "$WORK"/plugin-data-*
  MARKER=()
  if [[ "$BACKEND" == local ]]; then
    "$PLUGIN_BIN" keygen "$WORK/local-keys" >>"$WORK/plugin.log" 2>&1 || fail "kms-plugin keygen"
    for i in 1 2 3; do cp -p "$WORK/local-keys" "$WORK/local-keys-$i"; done
  else
    "backend_${BACKEND}_init"
  fi
  start_etcd
  for i in 1 2 3; do
    HA_HTTP[i]="$(free_port)"; HA_PORTS[i]="$(free_port)"
    ha_start_plugin "$i"
    ha_start_apiserver "$i"
  done
  local kid1; kid1="$(ha_key_id 1)"
  [[ "$(ha_key_id 2)" == "$kid1" && "$(ha_key_id 3)" == "$kid1" ]] || fail "the three plugins report different key_ids"
  ok "3 apiservers ready, 3 plugins on the same key_id"
  NODE=-1 k create namespace "$NS" >/dev/null
  for i in 0 1 2 3 4; do ha_put "s-ha$i" $((i % 3 + 1)) "ha-marker-$i" || fail "create s-ha$i"; done
  ok "5 secrets written through the three nodes"

  ha_loop write & local wpid=$!
  ha_loop read & local rpid=$!
  HA_KID1="$kid1"

  log "rotate"
  local kid2
  if [[ "$BACKEND" == local ]]; then
    "$PLUGIN_BIN" keygen --add "$WORK/local-keys" >>"$WORK/plugin.log" 2>&1 || fail "keygen --add"
    ha_lagging_node "$kid1"
    kid2="$(ha_key_id 1)"
  else
    backend_akeyless_rotate
    wait_for 30 "plugin 1 to report the new key" ha_plugin_moved 1
    kid2="$(ha_key_id 1)"
  fi
  ha_all_moved "$kid2"
  ok "all three plugins and all three apiservers on the new key_id"
  for i in 1 2 3; do ha_put "x-$i" "$i" "x-marker-$i" || fail "write x-$i through node $i"; done
  for i in 1 2 3; do
    for n in 1 2 3; do ha_reads_back "x-$n" "$i" "x-marker-$n" || fail "x-$n (written through node $n) does not read back through node $i"; done
  done
  ok "after the rotation: a Secret written through each node reads back through every node"

  log "kill plugin 2 (SIGKILL) and restart it"
  kill -KILL "${HA_PLUGIN_PIDS[2]}"; wait "${HA_PLUGIN_PIDS[2]}" 2>/dev/null || true
  ha_start_plugin 2
  ok "plugin 2 killed and restarted"

  log "restart apiserver 3 (first out of the loops' rotation, as a load balancer drains it)"
  local wn rn
  touch "$WORK/ha-down-3"
  wn="$(cat "$WORK/ha-write.n")" rn="$(cat "$WORK/ha-read.n")"
  wait_for 60 "the loops to finish the requests they started before node 3 was drained" ha_loops_past $((wn + 1)) $((rn + 1))
  stop_pid "${HA_API_PIDS[3]}"
  ha_start_apiserver 3
  rm -f "$WORK/ha-down-3"
  for i in 0 1 2 3 4; do ha_reads_back "s-ha$i" 3 "ha-marker-$i" || fail "s-ha$i does not read back through the restarted apiserver 3"; done
  for n in 1 2 3; do ha_reads_back "x-$n" 3 "x-marker-$n" || fail "x-$n does not read back through the restarted apiserver 3"; done
  ok "apiserver 3 restarted while the loops ran; its cold DEK cache decrypts old- and new-key Secrets"
  wn="$(cat "$WORK/ha-write.n")" rn="$(cat "$WORK/ha-read.n")"
  wait_for 60 "the loops to use node 3 again" ha_loops_past $((wn + 3)) $((rn + 3))

  # kms-plugin inventory (docs/inventory.md) reads etcd: objects under the old key_id are left, so the
  # requirement fails (exit 3) before the migration and holds after it.
  local inv=0
  "$PLUGIN_BIN" inventory --etcd-endpoints "$ETCD_URL" --require-key-id "$kid2" >"$WORK/inventory.out" 2>&1 || inv=$?
  ((inv == 3)) || fail "kms-plugin inventory --require-key-id (new) before the migration: exit $inv, want 3: $(cat "$WORK/inventory.out")"
  ok "kms-plugin inventory before the migration: exit 3, objects left under the old key_id"

  log "storage migration through node 1"
  NODE=-1 k get secrets -A -o json | NODE=-1 k replace -f - >"$WORK/replace.out" 2>&1 || fail "replace: $(tail -3 "$WORK/replace.out")"
  touch "$WORK/ha-stop"
  wait "$wpid" "$rpid"
  # Anything written by the loops after the replace is already under the new key; rewrite once more.
  NODE=-1 k get secrets -A -o json | NODE=-1 k replace -f - >"$WORK/replace.out" 2>&1 || fail "replace: $(tail -3 "$WORK/replace.out")"
  local wf rf
  wn="$(cat "$WORK/ha-write.n")" rn="$(cat "$WORK/ha-read.n")"
  wf="$(grep -c . "$WORK/ha-write.fail" || true)" rf="$(grep -c . "$WORK/ha-read.fail" || true)"
  ((wf == 0)) || fail "$wf failed writes of $wn: $(head -5 "$WORK/ha-write.fail")"
  ((rf == 0)) || fail "$rf failed reads of $rn: $(head -5 "$WORK/ha-read.fail")"
  ok "writer and reader loops across the three nodes for $((SECONDS - flow_start))s: $wn writes, $rn reads, 0 failed"
  local name bad=0 total=0
  for name in $("$BIN/e2ehelper" keys --endpoint "$ETCD_URL" "/registry/secrets/$NS/"); do
    total=$((total + 1))
    etcd_raw "$name" >"$WORK/raw-ha" || fail "read $name"
    [[ "$("$BIN/e2ehelper" keyid "k8s:enc:kms:v2:$KMS_NAME:" <"$WORK/raw-ha")" == "$kid2" ]] || bad=$((bad + 1))
  done
  ((bad == 0)) || fail "$bad of $total secrets in etcd not under the new key_id after the migration"
  ok "etcd: all $total secrets under the new key_id after the migration through node 1"
  "$PLUGIN_BIN" inventory --etcd-endpoints "$ETCD_URL" --require-key-id "$kid2" >"$WORK/inventory.out" 2>&1 ||
    fail "kms-plugin inventory --require-key-id (new) after the migration: $(cat "$WORK/inventory.out")"
  local counted; counted="$(awk '$1 == "secrets" { n += $2 } END { print n + 0 }' "$WORK/inventory.out")"
  ((counted == total)) || fail "kms-plugin inventory counted $counted secrets, etcd has $total: $(cat "$WORK/inventory.out")"
  ok "kms-plugin inventory after the migration: exit 0, $counted secrets, all under the new key_id"
  for i in 1 2 3; do
    for name in 0 1 2 3 4; do ha_reads_back "s-ha$name" "$i" "ha-marker-$name" || fail "s-ha$name does not read back through node $i"; done
  done
  ok "every seeded secret reads back through every node"
  for i in 1 2 3; do
    NODE="-$i" k -n "$NS" get secrets -o name >"$WORK/ha-list-$i" || fail "list (decrypt) all secrets through node $i"
    [[ "$(wc -l <"$WORK/ha-list-$i")" -eq "$total" ]] || fail "node $i lists $(wc -l <"$WORK/ha-list-$i") secrets, etcd has $total"
  done
  ok "all $total secrets (the loops' writes from every node included) decrypt through each of the three nodes"

  for i in 1 2 3; do stop_pid "${HA_API_PIDS[i]}"; stop_pid "${HA_PLUGIN_PIDS[i]}"; done
  HA_API_PIDS=() HA_PLUGIN_PIDS=()
  stop_pid "$ETCD_PID"; ETCD_PID=""
  [[ "$BACKEND" == local ]] || "backend_${BACKEND}_stop"
  log "=== flow ha-$BACKEND:v2 passed in $((SECONDS - flow_start))s"
}

# ---------------------------------------------------------------------------------------------- status version
# status-mismatch:v2 (1.27-1.28 only, in `make e2e-matrix`): the plugin without --status-version v2beta1
# leaves the apiserver unready with exactly the message docs/troubleshooting.md names.
run_status_mismatch_flow() {
  API=v2 BACKEND=local KMS_NAME=e2e-status-mismatch
  local flow_start=$SECONDS want="expected KMSv2 API version v2beta1, got v2"
  log "=== flow: kms v2 on 1.$K8S_MINOR without --status-version v2beta1"
  ((K8S_MINOR <= 28)) || fail "status-mismatch:v2 is for kube-apiserver 1.27-1.28 (this is 1.$K8S_MINOR)"
  rm -rf "$WORK/etcd" "$WORK/local-keys" "$WORK"/*.sock "$WORK/apiserver.log"
  SOCK_ENDPOINT="unix://$WORK/kms-mismatch.sock"
  API_PORT="$(free_port)"
  write_kubeconfig
  backend_local_init
  write_encryption_config
  start_etcd
  local minor="$K8S_MINOR"
  K8S_MINOR=99 start_plugin
  K8S_MINOR="$minor"
  start_apiserver --no-wait
  wait_for 120 "the apiserver log to name the version mismatch" grep -qF "$want" "$WORK/apiserver.log"
  kms_not_ready || fail "/readyz/kms-providers is ok although the Status version is wrong"
  ok "apiserver 1.$K8S_MINOR logs '$want' and /readyz/kms-providers fails (docs/troubleshooting.md)"
  stop_apiserver; stop_plugin; stop_pid "$ETCD_PID"; ETCD_PID=""
  log "=== flow status-mismatch:v2 passed in $((SECONDS - flow_start))s"
}

# Sourced (tests/k8s/bench/coldstart.sh): the helpers above, no flows.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

make_certs
declare -a SUMMARY=()
versions="$(echo ${KMS_E2E_VERSIONS:-default v1.31.14=local:v2})"
echo "kube-apiserver releases (version[=flows]): $versions"
for entry in $versions; do
  version="${entry%%=*}"
  [[ "$version" == default ]] && version="$DEFAULT_VERSION"
  if [[ "$entry" == *=* ]]; then flows="${entry#*=}"; flows="${flows//,/ }"; else flows="$(echo ${KMS_E2E_FLOWS:-$(default_flows)})"; fi
  version_start=$SECONDS
  log "##### kube-apiserver $version: flows $flows"
  use_version "$version"
  for flow in $flows; do
    flow_start=$SECONDS
    case "$flow" in
      akeyless-swap:v1) run_swap_flow ;;
      ha:v2) run_ha_flow local ;;
      ha-akeyless:v2)
        if [[ ",${KMS_TEST_OPT_OUT:-}," == *",akeyless-fake,"* ]]; then echo "SKIP: ha-akeyless:v2 opted out via KMS_TEST_OPT_OUT"
        else run_ha_flow akeyless; fi ;;
      status-mismatch:v2) run_status_mismatch_flow ;;
      migrate:v2) run_migrate_flow ;;
      escrow:v2) run_escrow_flow ;;
      inventory-mix:v2) run_inventory_mix_flow ;;
      *) run_flow "${flow#*:}" "${flow%%:*}" ;;
    esac
    SUMMARY+=("$version $flow $((SECONDS - flow_start))s")
  done
  SUMMARY+=("$version total $((SECONDS - version_start))s")
done
log "all flows passed"
echo "per-step times (release flow seconds):"
printf '  %s\n' "${SUMMARY[@]}"
echo "k8s-e2e: $PASSED passed, 0 failed"
