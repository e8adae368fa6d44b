# Benchmarks (issue 7, see BENCHMARKS.md). `make bench` is NOT part of `make test`: it needs a quiet
# machine and release builds. `test-bench` (in `make test`) is a few-second smoke run of the harness so
# it cannot rot; it checks invariants (no errors, backend calls = distinct local KEKs), never timings.
BENCH_OUT ?= bench/results/latest.json
BENCH_SVG ?= bench/results/latency.svg
BENCH_ARGS ?=
TESTS += test-bench

.PHONY: bench bench-load bench-engine bench-shim test-bench

bench: bench-load bench-engine bench-shim

bench-load:
	cargo build --release --locked --bin kms-plugin
	cargo build --release --locked -p kms-bench
	@echo "load before: $$(cat /proc/loadavg)"
	$(TARGET_DIR)/release/kms-bench run --plugin-bin $(TARGET_DIR)/release/kms-plugin \
	  --out $(BENCH_OUT) --svg $(BENCH_SVG) $(BENCH_ARGS)

bench-engine:
	cargo bench --locked --bench engine -- --noplot 2>&1 | tee bench/results/engine.txt

# What the :authority shim costs: raw Status calls with `localhost` and a socket path (BENCHMARKS.md).
bench-shim:
	cargo build --release --locked --bin kms-plugin
	cargo build --release --locked -p kms-bench
	$(TARGET_DIR)/release/kms-bench shim --plugin-bin $(TARGET_DIR)/release/kms-plugin | tee bench/results/shim.md

test-bench:
	cargo clippy --locked -p kms-bench --all-targets -- -D warnings
	cargo build --locked --bin kms-plugin
	cargo build --locked -p kms-bench
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(TARGET_DIR)/debug/kms-bench run --smoke --plugin-bin $(TARGET_DIR)/debug/kms-plugin \
	    --out "$$tmp/smoke.json" --svg "$$tmp/smoke.svg" && \
	  grep -q '"invariant_failures": \[\]' "$$tmp/smoke.json" && \
	  $(TARGET_DIR)/debug/kms-bench shim --plugin-bin $(TARGET_DIR)/debug/kms-plugin --duration 200ms --rounds 1 >/dev/null
