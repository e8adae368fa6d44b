# Security area: supply-chain policy (cargo-deny) and a bounded fuzz run (cargo-fuzz).
#
#   make deny          cargo-deny: licences, bans, sources (offline) + advisories (needs GitHub)
#   make fuzz-smoke    build the fuzz targets, run each for FUZZ_SMOKE_SECONDS from the committed corpus
#   make fuzz-long     the same for FUZZ_LONG_SECONDS per target (local use; findings go to docs/security.md)
#   make fuzz-corpus   regenerate the committed seed corpus (tests/fuzz_corpus.rs checks it)

CARGO_FUZZ_VERSION := 0.13.2
CARGO_DENY_VERSION := 0.20.2
FUZZ_TARGETS := ciphertext v2_request v1_request config authority akeyless_response vault_response etcd_value kmip_response
# Per target. 20 s x 10 targets keeps the CI share at ~3.5 min after the build; raise locally.
FUZZ_SMOKE_SECONDS ?= 20
FUZZ_LONG_SECONDS ?= 600
# auto: check advisories when the RustSec database can be fetched, otherwise say loudly that they were
# not checked. required: fail when it cannot be fetched (CI with GitHub access).
KMS_DENY_ADVISORIES ?= auto
# New inputs found by the fuzzer are kept here, not in the committed corpus.
FUZZ_WORK := $(CACHE_DIR)/fuzz
# The fuzz crate's build output (CI keeps it outside the clone, see .ci/run).
FUZZ_TARGET_DIR ?= $(CURDIR)/fuzz/target
# cargo fuzz needs nightly-only flags (-Zsanitizer); the stable toolchain accepts them with this.
FUZZ_ENV := RUSTC_BOOTSTRAP=1

DEPS += deps-security
TESTS += deny fuzz-smoke

.PHONY: deps-security deny fuzz-build fuzz-smoke fuzz-long fuzz-corpus

# cargo install is a no-op when the same version is already installed (cached across runs).
deps-security:
	@cargo deny --version 2>/dev/null | grep -qF "$(CARGO_DENY_VERSION)" || cargo install --locked cargo-deny@$(CARGO_DENY_VERSION)
	@cargo fuzz --version 2>/dev/null | grep -qF "$(CARGO_FUZZ_VERSION)" || cargo install --locked cargo-fuzz@$(CARGO_FUZZ_VERSION)

deny:
	cargo deny --locked check --hide-inclusion-graph bans licenses sources
	@if cargo deny fetch >/dev/null 2>&1; then \
	  cargo deny --locked check --disable-fetch advisories; \
	elif [ "$(KMS_DENY_ADVISORIES)" = required ]; then \
	  echo "cargo deny: the RustSec advisory database cannot be fetched (KMS_DENY_ADVISORIES=required)"; exit 1; \
	else \
	  echo "WARNING: advisories NOT checked: the RustSec advisory database (GitHub) is not reachable here."; \
	  echo "         licences, bans and sources were checked. Run with KMS_DENY_ADVISORIES=required where GitHub is reachable."; \
	fi

# The smoke run in `make test` fuzzes without AddressSanitizer: our crate forbids unsafe code, so a
# crash is a panic, which libFuzzer catches either way; the build is much quicker. Long runs keep ASan.
FUZZ_SANITIZER ?= address
fuzz-build:
	cd fuzz && $(FUZZ_ENV) cargo fuzz build -O --target-dir $(FUZZ_TARGET_DIR) --sanitizer $(FUZZ_SANITIZER)

fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz-build FUZZ_SANITIZER=none
	@$(MAKE) --no-print-directory fuzz-run FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS) FUZZ_SANITIZER=none

fuzz-long: fuzz-build
	@$(MAKE) --no-print-directory fuzz-run FUZZ_SECONDS=$(FUZZ_LONG_SECONDS)

# Each target from the committed corpus plus what earlier runs found; a crash fails the run and leaves
# the input in fuzz/artifacts/<target>/.
.PHONY: fuzz-run
fuzz-run:
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_WORK)/$$t; \
	  echo "fuzz $$t for $(FUZZ_SECONDS)s"; \
	  if ! (cd fuzz && $(FUZZ_ENV) cargo fuzz run -O --target-dir $(FUZZ_TARGET_DIR) --sanitizer $(FUZZ_SANITIZER) $$t $(FUZZ_WORK)/$$t corpus/$$t -- \
	        -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1) \
	        > $(FUZZ_WORK)/$$t.log 2>&1; then \
	    tail -n 60 $(FUZZ_WORK)/$$t.log; echo "fuzz target $$t FAILED (log: $(FUZZ_WORK)/$$t.log)"; exit 1; \
	  fi; \
	  grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)|DONE' $(FUZZ_WORK)/$$t.log || true; \
	done

fuzz-corpus:
	KMS_WRITE_FUZZ_CORPUS=1 cargo test --locked --test fuzz_corpus
