# KMIP backend: tests/kmip_server.rs runs against a real PyKMIP server (`pykmip-server`, pykmip in
# tests/python/requirements.txt, found next to $KMS_TEST_PYTHON). The tests make their own CA and
# certificates and keep the server's SQLite database in a temporary directory. It is a plain cargo
# test (run by `make test-rust`). Opt out with KMS_TEST_OPT_OUT=pykmip.

.PHONY: test-kmip

## Only the KMIP backend tests.
test-kmip: deps-python
	cargo test --locked --test kmip_server
