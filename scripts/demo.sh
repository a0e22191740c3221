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

service_ip() { $weftctl sandbox status --name demo -o json | python3 -c "import json,sys; print([s['clusterIP'] for c in json.load(sys.stdin)['clusters'] for s in c.get('services', []) if s['name']=='$1'][0])"; }

step "Services: the model-server Service got a cluster IP; its backends come from an EndpointSlice"
$weftctl sandbox status --name demo | sed -n '/SERVICE/,$p'
step "gateway (node-b) -> the Service's cluster IP: balanced at connect(), no NAT on the wire"
$weftctl sandbox exec gateway -n inference -- python3 -c "
import socket
s = socket.create_connection(('$(service_ip model-server)', 80), timeout=3)
print('connected; getpeername() says', '%s:%d' % s.getpeername(), '(the service, not the backend)')
s.sendall(b'GET / HTTP/1.1\\r\\nhost: demo\\r\\nconnection: close\\r\\n\\r\\n')
print(s.recv(4096).split(b'\\r\\n\\r\\n', 1)[1].decode())"

step "Policy: only the gateway may call the model server (a WeftNetworkPolicy)"
cat > "${TMPDIR:-/tmp}/weft-demo-policy.yaml" <<'POLICY'
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: gateway-only, namespace: inference}
spec:
  endpointSelector: {matchLabels: {app: model-server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: gateway}}]
    toPorts: [{ports: [{port: "8000", protocol: TCP}]}]
POLICY
$weftctl sandbox apply -f "${TMPDIR:-/tmp}/weft-demo-policy.yaml"
sleep 2
http_status() { # POD NAMESPACE: what the model server answers that pod
  local code
  code=$($weftctl sandbox exec "$1" -n "$2" -- curl -s -m 2 -o /dev/null -w '%{http_code}' "http://$(ip_of model-server):8000" || true)
  if [ "$code" = 000 ]; then echo "no answer (dropped)"; else echo "HTTP $code"; fi
}
echo "gateway   -> model-server: $(http_status gateway inference)"
echo "trainer-0 -> model-server: $(http_status trainer-0 training)"
step "Why was trainer-0 dropped? (weftctl policy explain)"
$weftctl policy explain --sandbox demo --from training/trainer-0 --to inference/model-server:8000/TCP || true

cat <<MSG

The sandbox "demo" is still up. Explore it:
  $weftctl sandbox status                       clusters, nodes, pods (-o json for more)
  $weftctl observe --follow                     flows as they happen (--pod, -n, -l, --port, -o json)
  $weftctl sandbox exec trainer-0 -n training -- bash     a shell inside a pod
  $weftctl sandbox apply -f FILE                add pods from Kubernetes YAML
  $weftctl validate -f my-policy.yaml           check your own policies
Tear it down:
  $weftctl sandbox down

What you saw runs the same agent, CNI plugin and policy engine as a cluster: the chart
(charts/weft, docs/install.md) installs them with the operator in Kubernetes mode, which is
tested against a mocked API server and has not yet run on a real cluster.
Not built yet (README, "Features"): the cluster mesh over mTLS, FQDN and L7 policy, bandwidth
classes.
MSG
