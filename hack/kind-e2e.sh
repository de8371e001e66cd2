#!/usr/bin/env bash
# End-to-end tests on a kind cluster, for machines with Docker (the default test cluster needs none:
# see docs/test-cluster.md). Builds both images from the Dockerfile, loads them into kind, installs
# the chart, and runs the e2e tests against that cluster through IMAGEBATCH_TEST_KUBECONFIG.
#
#   hack/kind-e2e.sh                      # create (or reuse) the cluster, build, install, test
#   hack/kind-e2e.sh tests/e2e -k quick   # arguments go to pytest (default: tests/e2e)
#
# Needs: docker, kind, kubectl, helm on PATH (or KUBECTL/HELM/KIND=...), and this repository's
# Python environment (PYTHON, default .venv/bin/python). kind nodes have no GPU: e2e jobs use
# model builtin:tiny with spec.workers.gpusPerWorker: 0.
#
# Environment: KIND_CLUSTER_NAME (default imagebatch-e2e), KIND_NODE_IMAGE (kindest/node image),
# IMAGE_TAG (default e2e), RELEASE_NAMESPACE (default imagebatch-system), KEEP_CLUSTER=1 (leave
# the cluster running afterwards; a cluster that existed before is always left), KEEP_OPERATOR=1
# (leave the chart's operator running during the tests), HELM_EXTRA_ARGS.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo}"

cluster="${KIND_CLUSTER_NAME:-imagebatch-e2e}"
tag="${IMAGE_TAG:-e2e}"
release_ns="${RELEASE_NAMESPACE:-imagebatch-system}"
python="${PYTHON:-${repo}/.venv/bin/python}"
kind="${KIND:-kind}"
kubectl="${KUBECTL:-kubectl}"
helm="${HELM:-helm}"
operator_image="imagebatch-operator:${tag}"
worker_image="imagebatch-worker:${tag}"
state_dir="${repo}/build/kind-e2e"
kubeconfig="${state_dir}/${cluster}.kubeconfig"

log() { printf '[kind-e2e] %s\n' "$*" >&2; }

for tool in docker "${kind}" "${kubectl}" "${helm}"; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        log "missing ${tool}: install it or set KIND/KUBECTL/HELM to its path"
        exit 1
    fi
done
if [[ ! -x "${python}" ]]; then
    log "missing ${python}: create the environment (make install) or set PYTHON"
    exit 1
fi

mkdir -p "${state_dir}"
created=0
if "${kind}" get clusters 2>/dev/null | grep -qx "${cluster}"; then
    log "reusing kind cluster ${cluster}"
else
    log "creating kind cluster ${cluster}"
    node_image_args=()
    if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then node_image_args=(--image "${KIND_NODE_IMAGE}"); fi
    "${kind}" create cluster --name "${cluster}" "${node_image_args[@]}" --wait 180s
    created=1
fi
"${kind}" get kubeconfig --name "${cluster}" >"${kubeconfig}"
export KUBECONFIG="${kubeconfig}"

cleanup() {
    local rc=$?
    if [[ "${rc}" -ne 0 ]]; then
        log "failed (exit ${rc}); operator log:"
        "${kubectl}" -n "${release_ns}" logs deployment/imagebatch --tail=100 >&2 || true
    fi
    if [[ "${created}" -eq 1 && "${KEEP_CLUSTER:-0}" != 1 ]]; then
        log "deleting kind cluster ${cluster} (KEEP_CLUSTER=1 keeps it)"
        "${kind}" delete cluster --name "${cluster}" || true
    fi
    exit "${rc}"
}
trap cleanup EXIT

# The e2e harness runs its own operator (a host process with the chart's ServiceAccount token), and
# that operator gives jobs without spec.workers.image its built-in default worker image: load the
# worker image under that name too.
default_worker_image="$("${python}" -P -c 'from imagebatch.operator.builders import DEFAULT_WORKER_IMAGE as i; print(i)')"

log "building ${operator_image} and ${worker_image} (also tagged ${default_worker_image})"
docker build --target operator --tag "${operator_image}" "${repo}"
docker build --target worker --tag "${worker_image}" --tag "${default_worker_image}" "${repo}"
log "loading the images into ${cluster}"
"${kind}" load docker-image --name "${cluster}" "${operator_image}" "${worker_image}" "${default_worker_image}"

log "installing the chart into ${release_ns}"
# shellcheck disable=SC2086  # HELM_EXTRA_ARGS is a list of words on purpose
"${helm}" upgrade --install imagebatch "${repo}/charts/imagebatch" \
    --namespace "${release_ns}" --create-namespace \
    --set image.repository=imagebatch-operator --set image.tag="${tag}" \
    --set image.pullPolicy=IfNotPresent \
    --set worker.image.repository=imagebatch-worker --set worker.image.tag="${tag}" \
    --set logLevel=debug \
    --wait --timeout 5m ${HELM_EXTRA_ARGS:-}
# The chart's operator runs in the cluster: image, probes, Pod Security and RBAC on a real kubelet.
"${kubectl}" -n "${release_ns}" rollout status deployment/imagebatch --timeout=180s
if [[ "${KEEP_OPERATOR:-0}" != 1 ]]; then
    # The e2e tests start, kill and restart their own operator; a second one would race it.
    log "scaling the chart's operator to 0 for the e2e tests (KEEP_OPERATOR=1 keeps it)"
    "${kubectl}" -n "${release_ns}" scale deployment/imagebatch --replicas=0
    "${kubectl}" -n "${release_ns}" wait --for=delete pod -l app.kubernetes.io/component=operator --timeout=120s
fi

# CRDs are not upgraded by `helm upgrade`: apply the current ones (server-side, like the tests).
"${kubectl}" apply --server-side --force-conflicts -f "${repo}/crds"

log "running the e2e tests"
if [[ $# -eq 0 ]]; then set -- tests/e2e; fi
# Run from the repository root with -P (no cwd on sys.path: operator/ would shadow Python's module).
IMAGEBATCH_TEST_KUBECONFIG="${kubeconfig}" "${python}" -P -m pytest "$@"
