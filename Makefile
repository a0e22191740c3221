# Weft: two commands on a fresh machine — `make demo` and `make test` (see README.md).

SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 iptables iperf3 iputils-ping ethtool curl python3-venv
TOOLS_VENV := .tools/venv
# Pinned: Helm v4's engine as a library (no helm binary needed) and Kubernetes' schemas.
PY_TOOLS := helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3

.PHONY: help deps build crds demo test bench fmt-check clippy unit-test e2e-test clean image

help:
	@echo "make demo   build Weft and show what works today"
	@echo "make test   everything CI runs: format, clippy, unit and e2e tests"
	@echo "make deps   install the system and Python tools the build and tests need"
	@echo "make crds   regenerate crds/manifests and the chart's CRDs from the Rust types"
	@echo "make bench  datapath benchmarks against a no-BPF baseline (root)"
	@echo "make image  build the container image (Docker with BuildKit, or buildah)"

# Installs only what is missing, so repeated runs are quick and offline.
deps:
	@missing=""; for pkg in $(APT_PACKAGES); do \
		dpkg -s "$$pkg" >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" -ne 0 ]; then echo "installing packages needs root: run make as root" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@if ! $(TOOLS_VENV)/bin/python -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then \
		echo "installing Python tools into $(TOOLS_VENV): $(PY_TOOLS)"; \
		python3 -m venv $(TOOLS_VENV) && $(TOOLS_VENV)/bin/pip install -q --disable-pip-version-check $(PY_TOOLS); \
	fi

build: deps
	$(CARGO) build --workspace --all-targets

crds: deps
	$(CARGO) run -q -p weftctl -- crds --out-dir crds/manifests
	rm -f charts/weft/crds/*.yaml && mkdir -p charts/weft/crds && cp crds/manifests/*.yaml charts/weft/crds/

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every target selects the whole workspace: per-package selections unify features differently
# and rebuild much of the dependency tree.
unit-test: deps
	$(CARGO) test --workspace --lib --bins

# Needs root: creates network namespaces and loads eBPF programs; cleans up after itself.
# The sandbox tests run the real binaries (weft-agent, weft-cni, weftctl), so build them first.
e2e-test: deps
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --test '*'

test: fmt-check clippy unit-test e2e-test

# Needs root, like the e2e tests. Prints Weft against a baseline measured in the same run.
bench: deps
	$(CARGO) build --release --workspace --bins
	WEFT_BIN_DIR=$(CURDIR)/target/release $(CARGO) bench --workspace --bench datapath --bench policy_compile --bench policy_wire --bench services --bench control_plane

demo: deps
	@scripts/demo.sh

clean:
	$(CARGO) clean

# The container image (Dockerfile; docs/install.md, "Building the image"). Not part of `make test`.
#   make image IMAGE=registry.example.com/weft IMAGE_TAG=dev
#   make image IMAGE_BINARIES=prebuilt   # package host-built release binaries (Debian 12 host only)
IMAGE ?= ghcr.io/weft-io/weft
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' charts/weft/Chart.yaml)
IMAGE_BINARIES ?= source
IMAGE_PLATFORM ?= linux/amd64
IMAGE_BUILD_ARGS ?=
image:
	@set -e; \
	revision=$$(git rev-parse HEAD 2>/dev/null || echo unknown); \
	args="--platform $(IMAGE_PLATFORM)"; \
	args="$$args --build-arg WEFT_VERSION=$(IMAGE_TAG) --build-arg WEFT_REVISION=$$revision"; \
	case "$(IMAGE_BINARIES)" in \
		source) ;; \
		prebuilt) $(CARGO) build --release --workspace --bins; \
			args="$$args --target weft-prebuilt --build-context weft-bin=$(CURDIR)/target/release";; \
		*) echo "IMAGE_BINARIES must be source or prebuilt (got $(IMAGE_BINARIES))" >&2; exit 1;; \
	esac; \
	if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
		set -x; DOCKER_BUILDKIT=1 docker build $$args $(IMAGE_BUILD_ARGS) -t $(IMAGE):$(IMAGE_TAG) .; \
	elif command -v buildah >/dev/null 2>&1; then \
		set -x; buildah build --layers $$args $(IMAGE_BUILD_ARGS) -t $(IMAGE):$(IMAGE_TAG) .; \
	else \
		echo "make image needs a container builder: start a Docker daemon (Docker 23+ or Docker with BuildKit/buildx)," >&2; \
		echo "or install buildah (Debian/Ubuntu: apt-get install buildah; Fedora: dnf install buildah)." >&2; \
		echo "No daemon answered 'docker info' and no buildah is on PATH." >&2; \
		exit 1; \
	fi
