# ctrl-exec build entry points. `make demo` and `make test` are the two
# commands in the README; everything else is for developers.
CARGO ?= cargo

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
# Targets for `make cross` / `make ipk` (names from openwrt-feed/targets.txt).
TARGETS ?= x86_64 aarch64 armv7 arm mips mipsel
FEED_DIR ?= openwrt-feed/out

.PHONY: all build release test lint demo bench prereqs clean static cross cross-setup smoke ipk feed check-feed

all: build

prereqs:
	@bash scripts/prereqs.sh

build: prereqs
	$(CARGO) build

release: prereqs
	$(CARGO) build --release

# Unit tests beside the code, end-to-end tests in tests/ (real binary, loopback),
# then the OpenAPI document and the API responses the tests captured.
test: prereqs
	rm -rf target/tmp/api-captures
	$(CARGO) test
	python3 scripts/check-openapi.py docs/openapi.json target/tmp/api-captures

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# A throw-away CA, one agent on 127.0.0.1, a run, a refusal, the audit lines.
demo: prereqs
	bash scripts/demo.sh

# Figures, not pass/fail: RSS, run latency, fan-out wall time, binary size.
bench: prereqs
	bash scripts/bench.sh

# --- static and cross builds (see cross/README.md) -------------------------
cross-setup: prereqs
	@bash cross/setup.sh

# x86_64, fully static (musl), non-PIE.
static: cross-setup
	@bash cross/build.sh x86_64

# Every target in TARGETS: static musl binaries under target/<triple>/release/.
cross: cross-setup
	@for t in $(TARGETS); do echo "== $$t"; bash cross/build.sh $$t || exit 1; done

# A foreign agent under qemu serving the x86_64 CLI (SMOKE=mips by default).
smoke: cross-setup
	@bash cross/smoke.sh $(or $(SMOKE),mips)

# .ipk packages for TARGETS (built by `make cross` first) into $(FEED_DIR)/<arch>/.
ipk:
	@bash openwrt-feed/build.sh $(VERSION) $(FEED_DIR) $(TARGETS)

# Packages, Packages.gz and, with FEED_KEY=<signify secret key>, Packages.sig.
feed:
	@for d in $(FEED_DIR)/*/; do bash openwrt-feed/mkfeed.sh "$$d" $(FEED_KEY) || exit 1; done

# Verify every package and index in $(FEED_DIR) (FEED_PUB=<public key>).
check-feed:
	@for d in $(FEED_DIR)/*/; do bash openwrt-feed/check.sh "$$d" $(FEED_PUB) || exit 1; done

clean:
	$(CARGO) clean
