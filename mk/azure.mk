# Azure Key Vault / Managed HSM backend: the Key Vault stand-in (tests/fakes/azure_keyvault_fake.py,
# with Entra ID and IMDS stand-ins) and its proof against the official Python client
# azure-keyvault-keys + azure-identity. The Rust tests on the stand-in (tests/azure_keyvault.rs) run
# in test-rust. KMS_TEST_OPT_OUT=azure-fake skips both.
TESTS += test-azure-sdk

.PHONY: test-azure-sdk test-azure fake-azure

test-azure-sdk: deps-python
	$(PYTHON) -m pytest -q tests/python/test_azure_keyvault_fake_sdk.py

# Everything Azure Key Vault, for working on this backend alone.
test-azure: test-azure-sdk
	cargo test --locked --lib backend::azure_keyvault
	cargo test --locked --test azure_keyvault

# A Key Vault stand-in on https://127.0.0.1:8768 (IMDS on http://127.0.0.1:8769) for manual
# experiments; CA, client secret, federated token and IDs in ./target/azure-fake (Ctrl-C to stop).
fake-azure: deps-python
	$(PYTHON) tests/fakes/azure_keyvault_fake.py --port 8768 --imds-port 8769 --dir target/azure-fake \
	  --verbose --key kek
