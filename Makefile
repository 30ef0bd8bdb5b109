# make test   installs what the tests need, lints, and runs every test
# make bench  benchmarks, with the tools users would pick instead
# make fuzz   fuzzes the NBD server's negotiation and request parsing, the
#             client's reply parsing, the MD, LVM and bitmap parsers, the chunk
#             codec, checked objects, pack footers, frame reads, manifests,
#             index pages, journal delta tops and pages, write-log replay and
#             access rules files
SHELL := /bin/bash
GOBIN := $(shell go env GOPATH)/bin
export PATH := $(GOBIN):$(PATH)

.PHONY: all build deps lint test bench fuzz clean

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
	NBDVAULT_REQUIRE_TOOLS=1 go test -race -timeout 30m ./...

bench: deps build
	scripts/bench.sh

# Longer fuzzing than the seed runs of make test: FUZZTIME per target.
FUZZTIME ?= 60s
fuzz:
	go test -run '^$$' -fuzz FuzzNegotiate -fuzztime $(FUZZTIME) ./nbdserver/nbd/
	go test -run '^$$' -fuzz FuzzTransmit -fuzztime $(FUZZTIME) ./nbdserver/nbd/
	go test -run '^$$' -fuzz FuzzReply -fuzztime $(FUZZTIME) ./client/
	go test -run '^$$' -fuzz FuzzMDSuperblock -fuzztime $(FUZZTIME) ./client/leg/
	go test -run '^$$' -fuzz FuzzLVMLabel -fuzztime $(FUZZTIME) ./client/leg/
	go test -run '^$$' -fuzz FuzzLVMMetadata -fuzztime $(FUZZTIME) ./client/leg/
	go test -run '^$$' -fuzz FuzzBitmap -fuzztime $(FUZZTIME) ./client/mirror/
	go test -run '^$$' -fuzz FuzzCodecDecode -fuzztime $(FUZZTIME) ./chunkstore/
	go test -run '^$$' -fuzz FuzzFramed -fuzztime $(FUZZTIME) ./chunkstore/
	go test -run '^$$' -fuzz FuzzUnchecked -fuzztime $(FUZZTIME) ./chunkstore/
	go test -run '^$$' -fuzz FuzzPackFooter -fuzztime $(FUZZTIME) ./chunkstore/
	go test -run '^$$' -fuzz FuzzFrame -fuzztime $(FUZZTIME) ./chunkstore/
	go test -run '^$$' -fuzz FuzzSealed -fuzztime $(FUZZTIME) ./chunkstore/
	go test -run '^$$' -fuzz FuzzKeyFile -fuzztime $(FUZZTIME) ./chunkstore/
	go test -run '^$$' -fuzz FuzzManifest -fuzztime $(FUZZTIME) ./nbdserver/volume/
	go test -run '^$$' -fuzz FuzzLogReplay -fuzztime $(FUZZTIME) ./nbdserver/volume/
	go test -run '^$$' -fuzz FuzzSealedLogReplay -fuzztime $(FUZZTIME) ./nbdserver/volume/
	go test -run '^$$' -fuzz FuzzIndexPage -fuzztime $(FUZZTIME) ./nbdserver/volume/
	go test -run '^$$' -fuzz FuzzDeltaTop -fuzztime $(FUZZTIME) ./nbdserver/volume/
	go test -run '^$$' -fuzz FuzzDeltaPage -fuzztime $(FUZZTIME) ./nbdserver/volume/
	go test -run '^$$' -fuzz FuzzInventoryFiles -fuzztime $(FUZZTIME) ./nbdserver/volume/
	go test -run '^$$' -fuzz FuzzAccessRules -fuzztime $(FUZZTIME) ./nbdserver/

clean:
	rm -rf bin
