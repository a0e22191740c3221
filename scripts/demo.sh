#!/usr/bin/env bash
# `make demo`: builds Weft, brings up the local one-cluster sandbox and shows it working.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
weftctl=target/debug/weftctl

step "Building Weft (the first build takes a few minutes)"
cargo build -q --workspace --bins

step "Validating policies offline, as the API server would (weftctl validate)"
$weftctl validate -f docs/examples/valid | tail -n 1
for example in docs/examples/invalid/endport-less-than-port.yaml docs/examples/invalid/typo-fromendpoint.yaml; do
  $weftctl validate -f "$example" | grep -E '^  - ' || true
done

step "Bringing up the sandbox: 2 nodes, 4 pods, real agents and CNI (examples/sandbox/one-cluster.yaml)"
$weftctl sandbox down --name demo >/dev/null
$weftctl sandbox up --config examples/sandbox/one-cluster.yaml | grep -v -E '^(sandbox demo is up|  weftctl|Try:)'

ip_of() { $weftctl sandbox status --name demo -o json | python3 -c "import json,sys; print([p['ip'] for c in json.load(sys.stdin)['clusters'] for p in c['pods'] if p['name']=='$1'][0])"; }

step "Pods talking: trainer-0 (node-a) -> trainer-1 (node-b), through the VXLAN tunnel"
$weftctl sandbox exec trainer-0 -n training -- curl -s -m 3 "http://$(ip_of trainer-1):8080"; echo
step "gateway (node-b) -> model-server (node-a)"
$weftctl sandbox exec gateway -n inference -- curl -s -m 3 "http://$(ip_of model-server):8000"; echo
step "Throughput between the trainers (iperf3, 3 s)"
$weftctl sandbox exec trainer-1 -n training -- iperf3 -s -1 -p 5201 >/dev/null &
sleep 0.5
$weftctl sandbox exec trainer-0 -n training -- iperf3 -c "$(ip_of trainer-1)" -p 5201 -t 3 | grep -E 'sender|receiver'
wait

step "Their flows, as the datapath saw them (weftctl observe)"
$weftctl observe --sandbox demo --namespace training --protocol TCP --last 8

cat <<MSG

The sandbox "demo" is still up. Explore it:
  $weftctl sandbox status                       clusters, nodes, pods (-o json for more)
  $weftctl observe --follow                     flows as they happen (--pod, -n, -l, --port, -o json)
  $weftctl sandbox exec trainer-0 -n training -- bash     a shell inside a pod
  $weftctl sandbox apply -f FILE                add pods from Kubernetes YAML
  $weftctl validate -f my-policy.yaml           check your own policies
Tear it down:
  $weftctl sandbox down

Coming next (README, "Features"): identity-based policy with explainable verdicts,
Maglev service load balancing, and the cluster mesh.
MSG
