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
.PHONY: k8s-deps image sidecar-images k8s-up k8s-down chart-lint chart-apply k8s-e2e e2e-images e2e-upstream

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
	@# The nested modules (Kubernetes suite, image builder) keep client-go and
	@# go-containerregistry out of the driver's go.mod.
	cd e2e/k8s && $(GO) vet ./... && $(TOOLS)/staticcheck ./...
	cd e2e/image && $(GO) vet ./... && $(TOOLS)/staticcheck ./...
	@# Kubernetes' e2e.test wrapper: vet only (staticcheck would load all of
	@# k8s.io/kubernetes' test tree from source for one small file).
	cd e2e/k8s/upstream && GOFLAGS=-mod=readonly $(GO) vet ./...
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
test: vet unit sanity integration k8s-e2e

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

# ---- Kubernetes: image, chart, a real single-node cluster, the e2e suite ----
IMAGE_TAG ?= $(VERSION)
K8S_CLUSTER := e2e/k8s/cluster.sh
HELM := $(TOOLS)/helm

# debootstrap and helm (K8S_GO_TOOLS), fetched afresh into bin/tools like tools.
k8s-deps:
	@e2e/install-deps.sh --k8s $(TOOLS)

# bin/rookzmq-image.tar (docker-save), tag rookzmq:$(IMAGE_TAG); no Docker needed.
image:
	@mkdir -p bin
	@e2e/image/build.sh rookzmq bin/rookzmq-image.tar rookzmq:$(IMAGE_TAG)

# bin/csi-provisioner-image.tar and bin/csi-resizer-image.tar, built from the Go module proxy.
sidecar-images:
	@mkdir -p bin
	@e2e/image/build.sh sidecars bin

# bin/e2e-{busybox,agnhost,nginx}-image.tar: what Kubernetes' storage e2e tests start.
e2e-images:
	@mkdir -p bin
	@e2e/image/build.sh e2e-images bin

k8s-up: k8s-deps
	@$(K8S_CLUSTER) up

k8s-down:
	@$(K8S_CLUSTER) down

chart-lint: k8s-deps
	$(HELM) lint --strict charts/rookzmq
	$(HELM) lint --strict charts/rookzmq --set 'clusters[0].clusterID=c1' --set 'clusters[0].monitors[0]=10.0.0.1:6789' \
		--set 'storageClasses[0].name=sc' --set 'storageClasses[0].clusterID=c1' --set 'storageClasses[0].pool=rbd' \
		--set 'storageClasses[0].secretName=s' --set controller.credentialsSecret=creds
	$(HELM) lint --strict charts/rookzmq --set 'clusters[0].clusterID=c1' --set 'clusters[0].monitors[0]=10.0.0.1:6789' \
		--set cephfs.enabled=true --set 'cephfs.storageClasses[0].name=fs' --set 'cephfs.storageClasses[0].clusterID=c1' \
		--set 'cephfs.storageClasses[0].fsName=cephfs' --set 'cephfs.storageClasses[0].secretName=s'

# The rendered chart, applied to the local cluster with a server-side dry run.
chart-apply: chart-lint k8s-up
	@set -o pipefail; eval "$$($(K8S_CLUSTER) env)" && $(HELM) template rookzmq charts/rookzmq --namespace default --kube-version v1.34.4 \
		--set 'clusters[0].clusterID=c1' --set 'clusters[0].monitors[0]=10.0.0.1:6789' \
		--set 'storageClasses[0].name=sc' --set 'storageClasses[0].clusterID=c1' --set 'storageClasses[0].pool=rbd' \
		--set 'storageClasses[0].secretName=s' --set controller.credentialsSecret=creds \
		--set cephfs.enabled=true --set 'cephfs.storageClasses[0].name=fs' --set 'cephfs.storageClasses[0].clusterID=c1' \
		--set 'cephfs.storageClasses[0].fsName=cephfs' --set 'cephfs.storageClasses[0].secretName=s' | \
		kubectl apply --server-side --force-conflicts --dry-run=server --field-manager=rookzmq-chart-check -f -

# The e2e suite on the real cluster (brings it up; the Ceph cluster serves it),
# with Kubernetes' own External Storage tests for the patterns that fit
# (TestUpstreamStorage, ROOKZMQ_UPSTREAM=quick); e2e.test is built once and
# cached (e2e/k8s/build-e2e-test.sh).
k8s-e2e: k8s-deps image sidecar-images e2e-images cluster-up chart-apply
	@e2e/k8s/build-e2e-test.sh >/dev/null
	cd e2e/k8s && PATH="$(TOOLS):$$PATH" ROOKZMQ_IMAGE_TAG=$(IMAGE_TAG) ROOKZMQ_E2E_TEST=$$(../../e2e/k8s/build-e2e-test.sh 2>/dev/null) \
		$(GO) test -count=1 -timeout 40m -v . 2>&1 | tee /tmp/rookzmq-k8s-e2e.log | \
		grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go|k8s-e2e:' ; exit $${PIPESTATUS[0]}

# Every External Storage spec of Kubernetes' e2e tests the driver file
# (e2e/k8s/upstream/rbd.rookzmq.io.yaml) does not declare unsupported.
e2e-upstream: k8s-deps image sidecar-images e2e-images cluster-up chart-apply
	@e2e/k8s/build-e2e-test.sh >/dev/null
	cd e2e/k8s && PATH="$(TOOLS):$$PATH" ROOKZMQ_IMAGE_TAG=$(IMAGE_TAG) ROOKZMQ_E2E_TEST=$$(../../e2e/k8s/build-e2e-test.sh 2>/dev/null) \
		ROOKZMQ_UPSTREAM=all $(GO) test -count=1 -timeout 70m -v -run 'TestUpstreamStorage' . 2>&1 | tee /tmp/rookzmq-e2e-upstream.log | \
		grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go|k8s-e2e:' ; exit $${PIPESTATUS[0]}

clean:
	rm -rf bin
