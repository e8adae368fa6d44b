# Akeyless backend: the fake Akeyless API server (tests/fakes/akeyless_fake.py) and its proof against the
# official Akeyless Python SDK. The Rust tests against the fake (tests/akeyless_backend.rs) run in
# test-rust; they find Python through KMS_TEST_PYTHON (exported by the Makefile).
TESTS += test-akeyless-sdk

.PHONY: test-akeyless-sdk test-akeyless fake-akeyless

test-akeyless-sdk: deps-python
	$(PYTHON) -m pytest -q tests/python/test_akeyless_fake_sdk.py

# Everything Akeyless, for working on this backend alone.
test-akeyless: test-akeyless-sdk
	cargo test --locked --lib backend::akeyless
	cargo test --locked --test akeyless_backend
	cargo test --locked --test uid

# A fake Akeyless on 127.0.0.1 for manual experiments (Ctrl-C to stop).
fake-akeyless: deps-python
	FAKE_AKEYLESS_ACCESS_KEY=dev-access-key $(PYTHON) tests/fakes/akeyless_fake.py --port 8765 \
	  --access-id p-dev --key /k8s/kms-kek --verbose
