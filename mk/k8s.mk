# Kubernetes proof (tests/k8s, docs/testing.md).
#   Level 1 (test-k8s-level1): k8s.io/apiserver's own KMS client code (v0.31.x and v0.37.x) against the plugin,
#   on the local key file, a real Vault dev server (KMS_TEST_VAULT_BIN, from deps-vault), a real PyKMIP server
#   the Cloud KMS stand-in (tests/fakes/gcp_kms_fake.py) and the Key Vault stand-in (tests/fakes/azure_keyvault_fake.py).
#   Level 2 (test-k8s-e2e, `make e2e`): kube-apiserver built from source + etcd + kubectl against the plugin,
#   on the pinned release (all flows) and K8S_MATRIX_131 (local:v2); `make e2e-matrix` adds K8S_MATRIX_128 and
#   the three-node flow on the Akeyless fake (ha-akeyless:v2).
# Go builds are cached: binaries under $(CACHE_DIR)/k8s, compiled packages in Go's own build cache.

K8S_DIR := tests/k8s
K8S_L1_DIR := $(K8S_DIR)/level1
K8S_PLUGIN_BIN ?= $(TARGET_DIR)/debug/kms-plugin
# Newest 1.31 the module proxy serves (v1.31.15+ answer 403 there): pre-1.32 v2 client, path :authority.
K8S_MATRIX_131 := v1.31.14
# 1.27-1.28: v2 with --status-version v2beta1 (run.sh passes it for minor <= 28).
K8S_MATRIX_128 := v1.28.15
K8S_E2E_VERSIONS ?= default $(K8S_MATRIX_131)=local:v2

APT_PACKAGES += openssl
DEPS += deps-k8s
TESTS += test-k8s-level1 test-k8s-e2e

.PHONY: deps-k8s deps-k8s-matrix k8s-plugin-bin test-k8s-level1 test-k8s-e2e e2e e2e-matrix bench-coldstart

deps-k8s:
	@if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",k8s,"* ]]; then echo "deps-k8s: skipped (KMS_TEST_OPT_OUT)"; exit 0; fi; \
	command -v go >/dev/null || { echo "deps-k8s: go is required for tests/k8s" >&2; exit 1; }; \
	for v in default $(K8S_MATRIX_131); do \
	  start=$$SECONDS; bash $(K8S_DIR)/e2e/build.sh $${v/default/} >/dev/null || exit 1; \
	  echo "deps-k8s: kube-apiserver $$v + e2ehelper + standin ready in $$((SECONDS - start))s"; \
	done; \
	cd $(K8S_L1_DIR); go mod download; go mod download -modfile=go.v031.mod

# The plugin binary the Kubernetes tests run (debug build, as cargo test builds it).
k8s-plugin-bin:
	cargo build --locked --bin kms-plugin

test-k8s-level1: k8s-plugin-bin
	@if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",k8s,"* ]]; then echo "test-k8s-level1: skipped (KMS_TEST_OPT_OUT)"; exit 0; fi; \
	backends=local; \
	if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",vault,"* ]]; then echo "test-k8s-level1: vault backend opted out (KMS_TEST_OPT_OUT)"; else backends="$$backends vault"; fi; \
	if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",pykmip,"* ]]; then echo "test-k8s-level1: kmip backend opted out (KMS_TEST_OPT_OUT)"; else backends="$$backends kmip"; fi; \
	if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",gcp-fake,"* ]]; then echo "test-k8s-level1: gcp backend opted out (KMS_TEST_OPT_OUT)"; else backends="$$backends gcp"; fi; \
	if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",azure-fake,"* ]]; then echo "test-k8s-level1: azure backend opted out (KMS_TEST_OPT_OUT)"; else backends="$$backends azure"; fi; \
	cd $(K8S_L1_DIR) && \
	for backend in $$backends; do for mf in go.v031.mod go.mod; do \
	  if [[ $$mf == go.v031.mod && $$backend != local ]]; then continue; fi; \
	  echo "== level 1 against $$(awk '$$1 == "k8s.io/apiserver" {print $$1 " " $$2}' $$mf), $$backend backend"; \
	  KMS_L1_BACKEND=$$backend KMS_PLUGIN_BIN=$(K8S_PLUGIN_BIN) KMS_L1_MODFILE=$$mf go test -modfile=$$mf -count=1 -timeout 10m -v . || exit 1; \
	done; done

test-k8s-e2e: k8s-plugin-bin
	KMS_PLUGIN_BIN=$(K8S_PLUGIN_BIN) KMS_E2E_VERSIONS="$${KMS_E2E_VERSIONS:-$(K8S_E2E_VERSIONS)}" bash $(K8S_DIR)/e2e/run.sh

# The third release (cold build ~30 min on 2 cores, cached) and ha-akeyless:v2 (~60 s), not in every CI run.
deps-k8s-matrix: deps-k8s
	@start=$$SECONDS; bash $(K8S_DIR)/e2e/build.sh $(K8S_MATRIX_128) >/dev/null && \
	echo "deps-k8s-matrix: kube-apiserver $(K8S_MATRIX_128) ready in $$((SECONDS - start))s"

e2e-matrix: deps-k8s-matrix
	$(MAKE) test-k8s-e2e KMS_E2E_VERSIONS="$(K8S_E2E_VERSIONS) default=ha-akeyless:v2 $(K8S_MATRIX_128)=local:v2,local:v1,status-mismatch:v2"

# Everything the e2e run needs (builds are cached), then the run.
e2e: deps-k8s
	$(MAKE) test-k8s-e2e


# Cold start with 10,000 Secrets (issue 17 §3; BENCHMARKS.md): a benchmark, never part of `make test`.
# Heavy (about an hour for all eight configurations on 2 cores): KMS_BENCH_CONFIGS / KMS_BENCH_COUNT pick less.
bench-coldstart: deps-k8s k8s-plugin-bin
	KMS_PLUGIN_BIN=$(K8S_PLUGIN_BIN) nice -n 10 bash $(K8S_DIR)/bench/coldstart.sh
