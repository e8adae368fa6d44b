# kms-plugin build and test entry points. `make test` installs what the tests need, then runs them all.
# Each area of the test suite adds its own install and test steps in mk/<area>.mk.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
CACHE_DIR ?= $(HOME)/.cache/kms-plugin
# Cargo's output directory (CI keeps it outside the clone, see .ci/run).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
# Tests that need an external program find it through these; a missing one fails the test unless
# KMS_TEST_OPT_OUT names it (e.g. KMS_TEST_OPT_OUT=softhsm,moto).
export KMS_TEST_PYTHON := $(PYTHON)
export KMS_TEST_CACHE_DIR := $(CACHE_DIR)

APT_PACKAGES :=
PIP_REQUIREMENTS := tests/python/requirements.txt
DEPS := deps-apt deps-python
TESTS :=

include $(sort $(wildcard mk/*.mk))

.PHONY: help run build deps deps-apt deps-python test test-rust lint $(TESTS)

help:
	@echo "make run     - build and serve with a development key (serve --dev: local key under ./.kms-plugin, ./.kms-plugin/kms.sock)"
	@echo "make test    - install test dependencies and run every test"
	@echo "make lint    - cargo fmt --check and clippy -D warnings"

build:
	cargo build --release --locked

run: build
	$(TARGET_DIR)/release/kms-plugin serve --dev --listen unix://$(CURDIR)/.kms-plugin/kms.sock --data-dir $(CURDIR)/.kms-plugin

deps: $(DEPS)

deps-apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

deps-python: $(VENV)/.installed

$(VENV)/.installed: $(PIP_REQUIREMENTS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r $(PIP_REQUIREMENTS)
	touch $@

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings

test-rust:
	cargo test --locked --all-targets

test: deps
	$(MAKE) lint
	$(MAKE) test-rust $(TESTS)
