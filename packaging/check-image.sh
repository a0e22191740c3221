#!/usr/bin/env bash
# Checks the image without a registry or a Docker daemon (docs/install.md, "Building the image"):
#
#  1. debootstraps a Debian 12 minbase root filesystem, a stand-in for debian:bookworm-slim,
#     and commits it with buildah as a local image;
#  2. builds the Dockerfile's weft-prebuilt target on it with buildah, from host-built release
#     binaries (the rust builder image is not needed);
#  3. runs in the image every binary (--version, --help; the operator and the
#     clustermesh-apiserver also as uid 65532, as the chart runs them), weft-cni's CNI VERSION
#     command, and the agent's init-container scripts read from the chart itself, with the
#     volumes and privileges the chart gives them.
#
# Needs root, a Debian 12 host (the binaries link against its glibc), buildah and debootstrap
# (apt-get install buildah debootstrap), the Debian mirror (MIRROR, default deb.debian.org) and
# `cargo build --release --workspace --bins` done (WEFT_BIN_DIR, default target/release).
# Takes about a minute, mostly debootstrap; removes everything it created when it exits.
# If `buildah run` fails with "cgroups in hybrid mode not supported" (crun on a host with cgroup v1
# and v2 mounted side by side), install runc and run with BUILDAH_RUNTIME=runc.
# shellcheck disable=SC2016 # the single-quoted scripts expand in the image's shell
set -euo pipefail
cd "$(dirname "$0")/.."

MIRROR=${MIRROR:-http://deb.debian.org/debian}
BIN_DIR=${WEFT_BIN_DIR:-$PWD/target/release}
BINARIES=(weft-operator weft-agent weft-cni weft-clustermesh-apiserver weftctl)
DAEMONSET=charts/weft/templates/agent/daemonset.yaml
BASE=localhost/weft-image-check/debian:bookworm-slim
IMAGE=localhost/weft-image-check/weft:check

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'check-image: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (debootstrap, and buildah mounting filesystems)"
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install buildah debootstrap"
done
for bin in "${BINARIES[@]}"; do
    [ -x "$BIN_DIR/$bin" ] || fail "$BIN_DIR/$bin is missing: cargo build --release --workspace --bins"
done

work=$(mktemp -d /tmp/weft-image-check.XXXXXX)
containers=()
cleanup() {
    local status=$?
    for ctr in "${containers[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
    buildah rmi "$IMAGE" >/dev/null 2>&1 || true
    # buildah keeps the image of each stage copied from ("--> <id>" in the build's output).
    if [ -f "$work/build.log" ]; then
        sed -n 's/^--> \([0-9a-f]\{12,\}\)$/\1/p' "$work/build.log" | xargs -r buildah rmi >/dev/null 2>&1 || true
    fi
    buildah rmi "$BASE" >/dev/null 2>&1 || true
    # A failed debootstrap may leave /proc or /sys mounted in the root filesystem.
    findmnt -rn -o TARGET | grep "^$work/" | sort -r | xargs -r umount -l || true
    rm -rf --one-file-system "$work"
    [ "$status" -eq 0 ] && echo "check-image: all checks passed" || echo "check-image: FAILED" >&2
}
trap cleanup EXIT
started=$SECONDS

step "debootstrap --variant=minbase bookworm ($MIRROR)"
debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
# Trim it like the official slim image: apt keeps no package caches, dpkg installs no
# documentation, manual pages or translations (the image's size then comes close to the real one).
root=$work/rootfs
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
DPKG
find "$root/usr/share/doc" -mindepth 1 -not -type d -not -name copyright -delete
rm -rf "$root"/usr/share/info/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
    "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin

step "commit the root filesystem as $BASE"
ctr=$(buildah from scratch)
containers+=("$ctr")
mnt=$(buildah mount "$ctr")
tar -C "$work/rootfs" --numeric-owner -c . | tar -C "$mnt" --numeric-owner -xp
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash "$ctr"
buildah commit --quiet "$ctr" "$BASE" >/dev/null
rm -rf "$work/rootfs"

step "buildah build --target weft-prebuilt (BASE_IMAGE=$BASE, binaries from $BIN_DIR)"
buildah build --platform linux/amd64 \
    --build-arg BASE_IMAGE="$BASE" \
    --target weft-prebuilt --build-context weft-bin="$BIN_DIR" \
    --build-arg WEFT_REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . 2>&1 | tee "$work/build.log"

step "image labels and size"
buildah inspect --format '{{range $k, $v := .OCIv1.Config.Labels}}{{$k}}={{$v}}{{"\n"}}{{end}}' "$IMAGE"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"

ctr=$(buildah from "$IMAGE")
containers+=("$ctr")
run() { buildah run "$@"; }

step "every binary runs: --version and --help"
for bin in "${BINARIES[@]}"; do
    [ "$bin" = weft-cni ] && continue # a CNI plugin: commands come in CNI_COMMAND (below)
    run "$ctr" -- "$bin" --version
    run "$ctr" -- "$bin" --help >/dev/null
done
out=$(run "$ctr" -- sh -c 'echo "{\"cniVersion\":\"1.0.0\"}" | CNI_COMMAND=VERSION weft-cni')
echo "weft-cni VERSION: $out"
case "$out" in *'"supportedVersions":["1.0.0"]'*) ;; *) fail "unexpected weft-cni VERSION output";; esac

step "operator and clustermesh-apiserver as uid 65532 (the chart's securityContext)"
for bin in weft-operator weft-clustermesh-apiserver; do
    run --user 65532:65532 "$ctr" -- "$bin" --version
done

step "the tools the chart's containers run"
run "$ctr" -- sh -ec '
    for tool in sh grep mount cp chmod mv; do printf "%-6s %s\n" "$tool" "$(command -v "$tool")"; done
    mount --help >/dev/null
    grep --version | head -1
    cp --version | head -1'

# An init container's `sh -ec` script, as written in the chart.
script_of() {
    local script
    script=$(awk -v name="$1" '
        $0 ~ "^ *- name: " name "$" { found = 1; next }
        found && !inblock && /^ *- \|$/ { inblock = 1; next }
        inblock {
            match($0, /^ */)
            if (indent == "") indent = RLENGTH
            if (RLENGTH < indent && $0 !~ /^ *$/) exit
            print substr($0, indent + 1)
        }' "$DAEMONSET")
    [ -n "$script" ] || fail "no sh -ec script for init container $1 in $DAEMONSET"
    case "$script" in *'{{'*) fail "init container $1's script is templated; extend $0";; esac
    printf '%s\n' "$script"
}

# Runs a mount script twice in one container, in the image's own sh; the second run must find the
# filesystem mounted and leave it at one mount: twice NAME SCRIPT MOUNTS-LINE BUILDAH-RUN-FLAGS...
twice() {
    local name=$1 script=$2 line=$3
    shift 3
    mkdir -p "$work/$name"
    printf '%s\n' "$script" >"$work/$name/script"
    printf '%s\n' "$line" >"$work/$name/line"
    run "$@" -v "$work/$name:/check:ro" "$ctr" -- sh -ec '
        script=$(cat /check/script)
        line=$(cat /check/line)
        sh -ec "$script"
        sh -ec "$script"
        grep -F -- "$line" /proc/self/mounts
        [ "$(grep -cF -- "$line" /proc/self/mounts)" -eq 1 ]'
}

step "init container mount-cgroup (privileged in the chart: here CAP_SYS_ADMIN)"
script=$(script_of mount-cgroup)
printf '%s\n' "$script"
mkdir -p "$work/cgroup"
twice mount-cgroup "$script" " /run/weft/cgroupv2 cgroup2 " \
    --cap-add CAP_SYS_ADMIN -v "$work/cgroup:/run/weft/cgroupv2"

step "init container mount-bpf-fs (privileged in the chart: here CAP_SYS_ADMIN)"
script=$(script_of mount-bpf-fs)
printf '%s\n' "$script"
mkdir -p "$work/bpf"
twice mount-bpf-fs "$script" " /sys/fs/bpf bpf " \
    --cap-add CAP_SYS_ADMIN -v "$work/bpf:/sys/fs/bpf"

step "init container install-cni (uid 0, all capabilities dropped, as in the chart)"
script=$(script_of install-cni)
printf '%s\n' "$script"
mkdir -p "$work/cni-bin"
for _ in 1 2; do # the second time replaces the installed plugin
    run --user 0:0 --cap-drop ALL -v "$work/cni-bin:/host/opt/cni/bin" "$ctr" -- sh -ec "$script"
done
ls -l "$work/cni-bin"
cmp "$work/cni-bin/weft-cni" "$BIN_DIR/weft-cni" || fail "installed weft-cni differs from the build"
[ -x "$work/cni-bin/weft-cni" ] || fail "installed weft-cni is not executable"
[ ! -e "$work/cni-bin/.weft-cni.tmp" ] || fail "install-cni left its temporary file"

echo
echo "check-image: took $((SECONDS - started)) s"
