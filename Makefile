# lmforge: the two commands are `make demo` and `make test`.
#
# Postgres and NATS JetStream come from `make services` (scripts/services.sh): it uses
# LMFORGE_DATABASE_URL / LMFORGE_NATS_URL when they answer, otherwise starts private
# instances under .lmforge/, installing Debian's postgresql and nats-server if missing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
SERVICES := scripts/services.sh
# Exports LMFORGE_DATABASE_URL, DATABASE_URL and LMFORGE_NATS_URL for the command after it.
WITH_SERVICES = service_env="$$($(SERVICES) env)" && eval "$$service_env" &&

.PHONY: all build services services-down services-status test lint fmt demo up bench bench-serve clean help gateway-venv

all: build

help:
	@echo "make demo           build, start Postgres+NATS, run the lmforge journey"
	@echo "make test           start Postgres+NATS if needed, run every test"
	@echo "make lint           cargo fmt --check, clippy -D warnings, deploy/ checks (k8s, compose)"
	@echo "make services       make Postgres and NATS reachable, print their URLs"
	@echo "make services-down  stop the private Postgres and NATS under .lmforge/"
	@echo "make up             run the whole stack in one process (lmforge up)"
	@echo "make bench          run the benchmarks and print their tables (gateway's included)"
	@echo "make gateway-venv   .venv-gateway with the openai package (for the gateway's SDK test)"
	@echo "make bench-serve    lmforge bench serve on the tiny and small shapes (in-process stack)"

build:
	$(CARGO) build --workspace --bins

services:
	@$(SERVICES) up

services-down:
	@$(SERVICES) down

services-status:
	@$(SERVICES) status

test: gateway-venv
	$(WITH_SERVICES) $(CARGO) test --workspace --no-fail-fast

# The official `openai` package that drives the gateway in services/gateway/tests/openai_sdk.rs.
GATEWAY_VENV := .venv-gateway
gateway-venv: $(GATEWAY_VENV)/.installed
$(GATEWAY_VENV)/.installed:
	@$(SERVICES) python
	python3 -m venv $(GATEWAY_VENV)
	$(GATEWAY_VENV)/bin/pip install --quiet --disable-pip-version-check openai
	touch $@

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test -p lmforge-deploy-check
	scripts/compose-config.sh deploy/docker-compose.yml

fmt:
	$(CARGO) fmt --all

demo: build
	$(WITH_SERVICES) $(CARGO) run --quiet --bin lmforge -- demo

up: build
	$(WITH_SERVICES) $(CARGO) run --quiet --bin lmforge -- up

bench:
	$(WITH_SERVICES) $(CARGO) bench --workspace --benches
	$(MAKE) bench-serve

# Inference serving under load beside transformers (issue 7's benchmark), release build.
bench-serve:
	$(WITH_SERVICES) $(CARGO) run --release --bin lmforge -- bench serve --shape tiny --json target/bench-serve-tiny.json
	$(WITH_SERVICES) $(CARGO) run --release --bin lmforge -- bench serve --shape small --json target/bench-serve-small.json
	$(WITH_SERVICES) $(CARGO) run --release --bin lmforge -- bench serve --shape small --weights q8_0 --json target/bench-serve-small-q8_0.json

clean: services-down
	$(CARGO) clean
