#!/usr/bin/env bash
# baton on kind, with real reboots of the node containers (for users with Docker; it
# cannot run on machines without a Docker engine, where `cargo run -p e2e -- test`
# covers the same scenarios on a local control plane with kwok nodes).
#
# 1. creates a kind cluster (1 control plane, 3 workers: e2e/kind/cluster.yaml);
# 2. builds the operator and agent images and loads them into kind;
# 3. installs the chart with the sentinel backend (kured-compatible) and SIGRTMIN+5
#    reboots (systemd in the node container reboots it);
# 4. touches /run/baton/reboot-required (the chart's default sentinel file, in a directory
#    of its own) on every worker;
# 5. watches every node each second, and fails if more than one is cordoned or NotReady
#    at any moment, or if a worker has not rebooted (new boot id) within the timeout.
#
# Needs docker, kind, kubectl and helm on PATH. Env: CLUSTER (baton), TAG (e2e),
# TIMEOUT seconds (1800), KEEP=1 to keep the cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-baton}
TAG=${TAG:-e2e}
TIMEOUT=${TIMEOUT:-1800}
CTX="kind-${CLUSTER}"
k() { kubectl --context "$CTX" "$@"; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "run.sh needs $tool on PATH" >&2; exit 2; }
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --wait 180s
fi
cleanup() {
  [ -n "${monitor_pid:-}" ] && kill "$monitor_pid" 2>/dev/null || true
  [ "${KEEP:-}" = 1 ] || kind delete cluster --name "$CLUSTER"
}
trap cleanup EXIT

docker build --target operator -t "baton-operator:${TAG}" .
docker build --target agent -t "baton-agent:${TAG}" .
kind load docker-image --name "$CLUSTER" "baton-operator:${TAG}" "baton-agent:${TAG}"

helm upgrade --install baton charts/baton \
  --kube-context "$CTX" --namespace baton-system --create-namespace \
  --set image.operatorRepository=baton-operator --set image.agentRepository=baton-agent \
  --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set agent.backend=sentinel --set agent.rebootMethod=signal \
  --set agent.bootIdFile=/run/baton/boot_id \
  --set defaultPolicy.enabled=true --set defaultPolicy.maxUnavailable=1 \
  --wait --timeout 5m

workers=$(k get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}')
# kind's node containers share the host's kernel, so the kernel boot id never changes
# when one "reboots". The agent uses a boot id kept on the node container's /run tmpfs
# (agent.bootIdFile), which a container restart clears; it publishes it as
# baton.dev/boot-id.
boot_id() { k get node "$1" -o jsonpath='{.metadata.annotations.baton\.dev/boot-id}' 2>/dev/null || true; }
k wait --for=jsonpath='{.metadata.annotations.baton\.dev/state}'=Idle nodes --all --timeout=180s
declare -A boot_before
for node in $workers; do
  boot_before[$node]=$(boot_id "$node")
done

# The monitor: one line per second with the number of disrupted nodes; it records the
# maximum in a file and exits non-zero the moment it exceeds 1.
max_file=$(mktemp)
echo 0 > "$max_file"
(
  while true; do
    disrupted=$(k get nodes -o jsonpath='{range .items[*]}{.spec.unschedulable}{" "}{range .status.conditions[?(@.type=="Ready")]}{.status}{end}{"\n"}{end}' 2>/dev/null \
      | awk '$1 == "true" || $NF != "True" { n++ } END { print n + 0 }')
    if [ "$disrupted" -gt "$(cat "$max_file")" ]; then echo "$disrupted" > "$max_file"; fi
    if [ "$disrupted" -gt 1 ]; then
      echo "FAIL: $disrupted nodes cordoned or NotReady at once" >&2
      k get nodes >&2
      exit 1
    fi
    sleep 1
  done
) &
monitor_pid=$!

for node in $workers; do
  docker exec "$node" sh -c 'mkdir -p /run/baton && touch /run/baton/reboot-required'
done
echo "reboot-required set on: $workers"

# A reboot stops the node container; power it back on, as a machine would come back.
deadline=$((SECONDS + TIMEOUT))
while :; do
  for node in $workers; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$node")" != true ]; then
      echo "powering $node back on"
      docker start "$node" >/dev/null
    fi
  done
  done_count=0
  for node in $workers; do
    boot=$(boot_id "$node")
    unschedulable=$(k get node "$node" -o jsonpath='{.spec.unschedulable}' 2>/dev/null || true)
    if [ -n "$boot" ] && [ "$boot" != "${boot_before[$node]}" ] && [ "$unschedulable" != true ] \
      && ! docker exec "$node" test -e /run/baton/reboot-required; then
      done_count=$((done_count + 1))
    fi
  done
  kill -0 "$monitor_pid" 2>/dev/null || { echo "FAIL: the one-at-a-time invariant broke" >&2; exit 1; }
  [ "$done_count" -eq "$(echo "$workers" | wc -w)" ] && break
  [ "$SECONDS" -lt "$deadline" ] || { echo "FAIL: not every worker rebooted within ${TIMEOUT}s" >&2; k get nodes >&2; exit 1; }
  sleep 5
done

echo "PASS: every worker rebooted once; at most $(cat "$max_file") node(s) disrupted at any moment"
