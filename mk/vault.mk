# HashiCorp Vault (Transit) backend: tests/vault_server.rs runs against a real Vault dev server.
# The server is built from the Go module proxy by ../shared/servers/build-vault.sh (Vault 1.21.0;
# ~12 min on 2 cores cold) and cached under $(CACHE_DIR)/vault; tests find it through
# KMS_TEST_VAULT_BIN. Opt out with KMS_TEST_OPT_OUT=vault.
VAULT_VERSION := v1.21.0
VAULT_BIN := $(CACHE_DIR)/vault/$(VAULT_VERSION)/vault
VAULT_BUILD := $(abspath $(CURDIR)/../shared/servers/build-vault.sh)
export KMS_TEST_VAULT_BIN := $(VAULT_BIN)
DEPS += deps-vault

.PHONY: deps-vault test-vault

deps-vault:
	@if [[ ",$${KMS_TEST_OPT_OUT:-}," == *",vault,"* ]]; then echo "deps-vault: skipped (KMS_TEST_OPT_OUT)"; exit 0; fi; \
	if [ -x "$(VAULT_BIN)" ] && "$(VAULT_BIN)" version >/dev/null 2>&1; then echo "deps-vault: cached $$("$(VAULT_BIN)" version)"; exit 0; fi; \
	[ -f "$(VAULT_BUILD)" ] || { echo "deps-vault: $(VAULT_BUILD) not found (it is in the shared/ folder beside the repo)" >&2; exit 1; }; \
	start=$$SECONDS; rm -rf "$(dir $(VAULT_BIN))"; \
	bash "$(VAULT_BUILD)" "$(dir $(VAULT_BIN))" >/dev/null; \
	echo "deps-vault: built $$("$(VAULT_BIN)" version) in $$((SECONDS - start))s"

## Only the Vault backend tests.
test-vault: deps-vault
	cargo test --locked --test vault_server
