# HTTP/2 front door: h2spec conformance of the plugin against the shim-less floor (tests/h2spec.rs,
# run by test-rust), and the hostile-client tests (tests/front_door.rs). h2spec is a Go program,
# installed into $(GOBIN) (default ~/go/bin) through the Go module proxy.
GOBIN ?= $(HOME)/go/bin
# Pinned: the newest version the module proxy serves (the v2.6.0 tag is not on it).
H2SPEC_VERSION ?= v2.2.1+incompatible
export KMS_TEST_H2SPEC ?= $(GOBIN)/h2spec
ifeq ($(findstring h2spec,$(KMS_TEST_OPT_OUT)),)
DEPS += h2spec-deps
endif

.PHONY: h2spec-deps h2spec test-front-door

h2spec-deps: $(GOBIN)/h2spec

$(GOBIN)/h2spec:
	GOBIN=$(GOBIN) go install github.com/summerwind/h2spec/cmd/h2spec@$(H2SPEC_VERSION)

h2spec: h2spec-deps
	cargo test --locked --test h2spec -- --nocapture

test-front-door:
	cargo test --locked --test front_door --test authority_shim --test h2spec
	cargo test --locked --lib protocol::
