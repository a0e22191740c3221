#!/usr/bin/env bash
# `make demo`: builds Weft and shows, on this machine, what works in this release.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building Weft (first build takes a few minutes)"
cargo build -q --workspace
weftctl=target/debug/weftctl

step "The CRDs, generated from the Rust types (weftctl crds)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$weftctl crds --out-dir "$tmp" >/dev/null
for file in "$tmp"/*.yaml; do
  kind=$(grep -m1 '^    kind:' "$file" | awk '{print $2}')
  short=$(grep -A1 'shortNames:' "$file" | tail -1 | tr -d ' -')
  printf '  %-30s short name %-6s %s\n' "$kind" "$short" "$(basename "$file")"
done
if diff -rq "$tmp" crds/manifests >/dev/null; then
  echo "  crds/manifests is current."
else
  echo "  crds/manifests differs from the types: run 'make crds'."
fi

step "Validating the example policies offline, as the API server would (weftctl validate)"
$weftctl validate -f docs/examples/valid | tail -n 6
echo "  ..."

step "Mistakes users make are caught before kubectl apply, naming the field"
for example in docs/examples/invalid/endport-less-than-port.yaml \
               docs/examples/invalid/typo-fromendpoint.yaml \
               docs/examples/invalid/entity-internet.yaml; do
  $weftctl validate -f "$example" | grep -E '^  - ' || true
done

step "The eBPF datapath: the pod programs load and pass this kernel's verifier"
cargo test -q -p weft-e2e --test datapath_counters 2>&1 | grep -E '^test |test result' || true

cat <<'MSG'

What you can do now:
  target/debug/weftctl validate -f my-policy.yaml   check your own policies (exit 1 if invalid)
  target/debug/weftctl crds | kubectl apply -f -    install the CRDs into a cluster
  make test                                         everything CI runs

Coming next (see README, "Features"): the local two-cluster sandbox (weftctl sandbox up),
pod networking, identity-based policy enforcement, Maglev service load balancing, and the mesh.
MSG
