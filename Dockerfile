# syntax=docker/dockerfile:1
#
# The Weft image: weft-operator, weft-agent, weft-cni, weft-clustermesh-apiserver and weftctl in
# /usr/local/bin on Debian 12 (bookworm), plus the shell tools the chart's init containers run
# (sh, grep, mount, cp, chmod, mv). One image serves every component of charts/weft.
#
#   docker build -t ghcr.io/weft-io/weft:0.1.0 .       # or: make image
#
# Needs BuildKit (the default builder since Docker 23) or buildah. linux/amd64 only: node-bpf's
# build.rs compiles the eBPF programs for x86. The build reads the build machine's kernel BTF
# (/sys/kernel/btf/vmlinux) to generate vmlinux.h; CO-RE makes the objects portable to the nodes'
# kernels. See docs/install.md, "Building the image".
#
# Targets:
#   weft (the default, last stage)  compiles the workspace in the builder stage
#   weft-prebuilt                   packages binaries built on a Debian 12 host by
#                                   `cargo build --release --workspace --bins`, given as the build
#                                   context weft-bin:
#       docker build --target weft-prebuilt --build-context weft-bin=target/release .
# Build arguments:
#   RUST_IMAGE     builder image (default rust:1.95-bookworm, the workspace's toolchain)
#   BASE_IMAGE     runtime base  (default debian:bookworm-slim; the binaries need bookworm's glibc)
#   WEFT_VERSION, WEFT_REVISION  image labels (make image fills them in)

ARG RUST_IMAGE=rust:1.95-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

# ---- builder: the workspace's release binaries in /out -------------------------------------------
FROM ${RUST_IMAGE} AS build
# node-bpf's build.rs runs bpftool (vmlinux.h) and clang -target bpf (needs libbpf's headers):
# the Makefile's `deps` packages that the build needs.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      clang llvm libbpf-dev bpftool \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the compiled crates between builds: after a
# source change only the Weft crates it affects recompile. target/ lives in the cache, so the
# binaries are copied out to /out in the same step.
# Cargo judges freshness by mtime, and COPY keeps the context's mtimes: a file edited after an
# earlier build had copied it, but before that build compiled it, would look up to date. So each
# file whose content differs from what the last successful build compiled (all of them when there
# is no record) gets a new mtime first.
RUN --mount=type=cache,id=weft-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=weft-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=weft-target-release,target=/src/target,sharing=locked \
    set -eu; \
    record=target/.weft-sources.sha256; \
    find . -path ./target -prune -o -type f -print | xargs -r -d '\n' sha256sum \
      | LC_ALL=C sort >/tmp/sources.sha256; \
    if [ -f "$record" ]; then \
      LC_ALL=C comm -13 "$record" /tmp/sources.sha256 | cut -c67- | xargs -r -d '\n' touch; \
    else \
      cut -c67- /tmp/sources.sha256 | xargs -r -d '\n' touch; \
    fi; \
    cargo build --release --locked --workspace --bins; \
    cp /tmp/sources.sha256 "$record"; \
    mkdir -p /out; \
    cp target/release/weft-operator target/release/weft-agent target/release/weft-cni \
       target/release/weft-clustermesh-apiserver target/release/weftctl /out/

# ---- runtime base: what the chart's containers run, labels ---------------------------------------
FROM ${BASE_IMAGE} AS runtime
# sh, grep, cp, chmod and mv come with the base (dash, grep, coreutils); mount is named
# explicitly. ca-certificates: the Kubernetes client may load the system roots (weftctl against
# a cluster whose kubeconfig carries no CA).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates mount \
 && rm -rf /var/lib/apt/lists/*
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="weft" \
      org.opencontainers.image.description="Weft, Kubernetes networking on eBPF: weft-operator, weft-agent, weft-cni, weft-clustermesh-apiserver and weftctl" \
      org.opencontainers.image.url="https://github.com/weft-io/weft" \
      org.opencontainers.image.source="https://github.com/weft-io/weft" \
      org.opencontainers.image.documentation="https://github.com/weft-io/weft/blob/main/docs/install.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Weft maintainers" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# Root by default: the agent and its init containers mount filesystems and load eBPF programs.
# The chart runs the operator and the clustermesh-apiserver as 65532 (securityContext).
# The chart sets each container's command; without one, list weftctl's commands.
CMD ["weftctl", "--help"]

# ---- target weft-prebuilt: binaries built on the host --------------------------------------------
FROM runtime AS weft-prebuilt
COPY --from=weft-bin weft-operator weft-agent weft-cni weft-clustermesh-apiserver weftctl /usr/local/bin/
# The version ARGs come before the RUN, whose cache key includes their values: buildah (1.28)
# would otherwise reuse a cached LABEL step with the previous build's values.
ARG WEFT_VERSION=0.1.0
ARG WEFT_REVISION=unknown
# Fail the build, not the pods, when a binary cannot run on this base (e.g. built against a newer
# glibc than bookworm's) or a tool the chart's containers run is missing. Same steps below.
RUN set -e; \
    for bin in weft-operator weft-agent weft-clustermesh-apiserver weftctl; do "$bin" --version; done; \
    echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION weft-cni; \
    for tool in sh grep mount cp chmod mv; do command -v "$tool" >/dev/null; done
LABEL org.opencontainers.image.version="${WEFT_VERSION}" \
      org.opencontainers.image.revision="${WEFT_REVISION}"

# ---- target weft (default): binaries from the builder stage --------------------------------------
FROM runtime AS weft
COPY --from=build /out/ /usr/local/bin/
ARG WEFT_VERSION=0.1.0
ARG WEFT_REVISION=unknown
RUN set -e; \
    for bin in weft-operator weft-agent weft-clustermesh-apiserver weftctl; do "$bin" --version; done; \
    echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION weft-cni; \
    for tool in sh grep mount cp chmod mv; do command -v "$tool" >/dev/null; done
LABEL org.opencontainers.image.version="${WEFT_VERSION}" \
      org.opencontainers.image.revision="${WEFT_REVISION}"
