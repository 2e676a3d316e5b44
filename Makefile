# rookzmq — see README.md. Everything a target needs is installed by e2e/install-deps.sh:
# `make build` and `make demo` only the Debian packages; `make test` also the
# pinned Go tools, fetched afresh into bin/tools on every run (see tools).
SHELL := /bin/bash
GO ?= go
export GOFLAGS := -tags=pacific
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
CLUSTER := e2e/ceph/cluster.sh
FUZZTIME ?= 10s
TOOLS := $(CURDIR)/bin/tools

.PHONY: all deps tools build demo test unit sanity integration fuzz bench cluster-up cluster-down vet clean

all: build

deps:
	@e2e/install-deps.sh --apt-only

# The pinned linters and csi-sanity, installed from a throwaway module cache so
# that a pin the module proxy refuses fails here, not on a newcomer's machine.
tools:
	@e2e/install-deps.sh --tools $(TOOLS)

build: deps
	@mkdir -p bin
	@t=$$(date +%s%N); $(GO) build -ldflags '$(LDFLAGS)' -o bin/rookzmq ./cmd/rookzmq && \
		echo "[build] bin/rookzmq ($(VERSION)) in $$(( ($$(date +%s%N) - t) / 1000000 )) ms"

cluster-up: deps
	@$(CLUSTER) up

cluster-down:
	@$(CLUSTER) down

# The README's main command: a real volume's whole life on a throwaway cluster.
demo: build cluster-up
	@e2e/demo.sh

vet: tools
	@e2e/check-install.sh
	$(GO) vet ./...
	$(TOOLS)/staticcheck ./...
	@test -z "$$(gofmt -l cmd pkg e2e)" || { gofmt -l cmd pkg e2e; echo 'gofmt needed'; exit 1; }

unit: deps
	$(GO) test -count=1 -race ./pkg/... ./cmd/... ./examples/...
	@$(MAKE) --no-print-directory fuzz FUZZTIME=3s

sanity: build cluster-up
	@test -x $(TOOLS)/csi-sanity || $(MAKE) --no-print-directory tools
	@CSI_SANITY=$(TOOLS)/csi-sanity e2e/sanity.sh mount
	@CSI_SANITY=$(TOOLS)/csi-sanity e2e/sanity.sh block
	@CSI_SANITY=$(TOOLS)/csi-sanity e2e/sanity-cephfs.sh

integration: build cluster-up
	$(GO) test -count=1 -timeout 20m -v ./e2e/... 2>&1 | tee /tmp/rookzmq-integration.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go' ; exit $${PIPESTATUS[0]}

# The README's test command (and all that .ci/run does).
test: vet unit sanity integration

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseVolumeID$$' -fuzztime $(FUZZTIME) ./pkg/csi
	$(GO) test -run '^$$' -fuzz '^FuzzParseCephCSIVolumeID$$' -fuzztime $(FUZZTIME) ./pkg/csi
	$(GO) test -run '^$$' -fuzz '^FuzzParseParams$$' -fuzztime $(FUZZTIME) ./pkg/rbd
	$(GO) test -run '^$$' -fuzz '^FuzzParseParams$$' -fuzztime $(FUZZTIME) ./pkg/cephfs
	$(GO) test -run '^$$' -fuzz '^FuzzParseRequest$$' -fuzztime $(FUZZTIME) ./pkg/zmqbridge
	$(GO) test -run '^$$' -fuzz '^FuzzJournalRecover$$' -fuzztime $(FUZZTIME) ./pkg/zmqbridge
	$(GO) test -run '^$$' -fuzz '^FuzzAppendJSON$$' -fuzztime $(FUZZTIME) ./pkg/zmqbridge

# Performance beside the floors Ceph (raw go-ceph) and ZeroMQ (raw PUB/SUB) set, in the same run.
# The bridge comparison runs first: it needs no Ceph, and a cluster's
# background I/O would show in its fsync floor.
bench: build
	$(GO) test -count=1 -run '^$$' -bench 'BridgeVsRaw' -benchtime 1x -timeout 10m ./pkg/zmqbridge/
	$(MAKE) cluster-up
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x -timeout 30m ./e2e/

clean:
	rm -rf bin
