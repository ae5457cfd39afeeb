# Everyday targets. CI runs .ci/run, which runs the same checks as `make ci`.
CARGO ?= cargo
JOBS ?= 2

.PHONY: build release test lint fmt demo bench ci clean

build:
	$(CARGO) build -j$(JOBS) --locked

release:
	$(CARGO) build -j$(JOBS) --locked --release

test:
	$(CARGO) test -j$(JOBS) --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy -j$(JOBS) --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

demo:
	$(CARGO) run -j$(JOBS) --locked --release -- demo

bench: release
	bench/run.sh

ci:
	.ci/run

clean:
	$(CARGO) clean
