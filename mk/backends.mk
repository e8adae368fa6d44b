# PKCS#11 and AWS KMS backends. Their tests are plain cargo tests (run by `make test-rust`):
# - tests/pkcs11_softhsm.rs needs SoftHSM2 (libsofthsm2.so + softhsm2-util); it creates its own
#   token in a temporary directory (SOFTHSM2_CONF). Override the module with KMS_TEST_PKCS11_MODULE.
# - tests/aws_kms_moto.rs starts `moto_server` from the test venv (moto[server] in
#   tests/python/requirements.txt), found next to $KMS_TEST_PYTHON; tests/aws_credentials.rs runs
#   the binary once per AWS credential source against it (moto STS for assume-role and IRSA).
# Opt out with KMS_TEST_OPT_OUT=softhsm and/or moto (and botocore for the cloud-id signature check).
# opensc provides pkcs11-tool, used by the procedures in docs/backends.md.
APT_PACKAGES += softhsm2 opensc

.PHONY: test-backends
## Only the backend tests on their real servers (SoftHSM2, moto) and the cloud-identity fakes.
test-backends: deps-apt deps-python
	cargo test --locked --test pkcs11_softhsm --test pkcs11_serve --test aws_kms_moto --test aws_credentials --test lifecycle_aws --test cloud_id
