# ctrl-exec build entry points. `make demo` and `make test` are the two
# commands in the README; everything else is for developers.
CARGO ?= cargo

.PHONY: all build release test lint demo bench prereqs clean

all: build

prereqs:
	@bash scripts/prereqs.sh

build: prereqs
	$(CARGO) build

release: prereqs
	$(CARGO) build --release

# Unit tests beside the code, end-to-end tests in tests/ (real binary, loopback).
test: prereqs
	$(CARGO) test

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# A throw-away CA, one agent on 127.0.0.1, a run, a refusal, the audit lines.
demo: prereqs
	bash scripts/demo.sh

# Figures, not pass/fail: RSS, run latency, fan-out wall time, binary size.
bench: prereqs
	bash scripts/bench.sh

clean:
	$(CARGO) clean
