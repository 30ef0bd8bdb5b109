# make test   installs what the tests need, lints, and runs every test
# make bench  benchmarks, with the tools users would pick instead
SHELL := /bin/bash
GOBIN := $(shell go env GOPATH)/bin
export PATH := $(GOBIN):$(PATH)

.PHONY: all build deps lint test bench clean

all: build

build:
	go build -o bin/nbdvault ./cmd/nbdvault

deps:
	scripts/deps.sh

lint: deps
	scripts/lint.sh

# NBDVAULT_REQUIRE_TOOLS turns a missing MinIO (or any other test tool)
# into a failure instead of a skip.
test: deps lint
	NBDVAULT_REQUIRE_TOOLS=1 go test -race -timeout 20m ./...

bench: deps build
	scripts/bench.sh

clean:
	rm -rf bin
