# Kubernetes proof (tests/k8s, docs/testing.md).
#   Level 1 (test-k8s-level1): k8s.io/apiserver's own KMS client code (v0.31.x and v0.37.x) against the plugin.
#   Level 2 (test-k8s-e2e, `make e2e`): kube-apiserver built from source + etcd + kubectl against the plugin.
# Go builds are cached: binaries under $(CACHE_DIR)/k8s, compiled packages in Go's own build cache.

K8S_DIR := tests/k8s
K8S_L1_DIR := $(K8S_DIR)/level1
K8S_PLUGIN_BIN ?= $(CURDIR)/target/debug/kms-plugin

APT_PACKAGES += openssl
DEPS += deps-k8s
TESTS += test-k8s-level1 test-k8s-e2e

.PHONY: deps-k8s k8s-plugin-bin test-k8s-level1 test-k8s-e2e e2e

deps-k8s:
	@if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",k8s,"* ]]; then echo "deps-k8s: skipped (KMS_TEST_OPT_OUT)"; exit 0; fi; \
	command -v go >/dev/null || { echo "deps-k8s: go is required for tests/k8s" >&2; exit 1; }; \
	start=$$SECONDS; bash $(K8S_DIR)/e2e/build.sh >/dev/null; \
	echo "deps-k8s: kube-apiserver + e2ehelper ready in $$((SECONDS - start))s"; \
	cd $(K8S_L1_DIR); go mod download; go mod download -modfile=go.v031.mod

# The plugin binary the Kubernetes tests run (debug build, as cargo test builds it).
k8s-plugin-bin:
	cargo build --locked --bin kms-plugin

test-k8s-level1: k8s-plugin-bin
	@if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",k8s,"* ]]; then echo "test-k8s-level1: skipped (KMS_TEST_OPT_OUT)"; exit 0; fi; \
	cd $(K8S_L1_DIR) && \
	for mf in go.v031.mod go.mod; do \
	  echo "== level 1 against $$(awk '$$1 == "k8s.io/apiserver" {print $$1 " " $$2}' $$mf)"; \
	  KMS_PLUGIN_BIN=$(K8S_PLUGIN_BIN) KMS_L1_MODFILE=$$mf go test -modfile=$$mf -count=1 -timeout 10m -v . || exit 1; \
	done

test-k8s-e2e: k8s-plugin-bin
	KMS_PLUGIN_BIN=$(K8S_PLUGIN_BIN) bash $(K8S_DIR)/e2e/run.sh

# Everything the e2e run needs (builds are cached), then the run.
e2e: deps-k8s
	$(MAKE) test-k8s-e2e
