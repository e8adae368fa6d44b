# Google Cloud KMS backend: the Cloud KMS stand-in (tests/fakes/gcp_kms_fake.py) and its proof against
# the official Python client google-cloud-kms on both transports (REST and gRPC). The Rust tests on the
# stand-in (tests/gcp_kms.rs) run in test-rust. KMS_TEST_OPT_OUT=gcp-fake skips both.
TESTS += test-gcp-sdk

.PHONY: test-gcp-sdk test-gcp fake-gcp

test-gcp-sdk: deps-python
	$(PYTHON) -m pytest -q tests/python/test_gcp_kms_fake_sdk.py

# Everything Google Cloud KMS, for working on this backend alone.
test-gcp: test-gcp-sdk
	cargo test --locked --lib backend::gcp_kms
	cargo test --locked --test gcp_kms

# A Cloud KMS stand-in on 127.0.0.1:8766 (gRPC with TLS on 8767) for manual experiments; credentials
# files in ./target/gcp-fake (Ctrl-C to stop).
fake-gcp: deps-python
	$(PYTHON) tests/fakes/gcp_kms_fake.py --port 8766 --grpc-port 8767 --dir target/gcp-fake --verbose \
	  --key projects/kms-plugin-dev/locations/global/keyRings/k8s/cryptoKeys/kek
