#!/usr/bin/env bash
# Build gitops-check (main.go: kstatus from sigs.k8s.io/cli-utils and Argo CD's Lua interpreter,
# gopher-lua) from this Go module, cached outside the repository like the cluster binaries:
#     ${IMAGEBATCH_CACHE:-$HOME/.cache/imagebatch}/bin/gitops-check-<hash of go.mod, go.sum, main.go>
# Only a missing binary is built (a few seconds with a warm Go build cache; under a minute cold:
# apimachinery is the largest part). On success prints one line: the binary's path.
# Environment: IMAGEBATCH_CACHE (cache root), GO (go command; default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail

main() {
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    bindir="${IMAGEBATCH_CACHE:-${HOME}/.cache/imagebatch}/bin"
    key="$(cat "${here}/go.mod" "${here}/go.sum" "${here}/main.go" | sha256sum | cut -c1-12)"
    binary="${bindir}/gitops-check-${key}"
    if [[ -x "${binary}" ]]; then
        echo "${binary}"
        exit 0
    fi
    GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
    if [[ ! -x "${GO}" ]]; then echo "build.sh: no go command (set GO=...)" >&2; exit 1; fi
    mkdir -p "${bindir}"
    exec 9>"${bindir}/.build-gitops.lock"
    flock 9
    if [[ -x "${binary}" ]]; then # another build finished it while this one waited
        echo "${binary}"
        exit 0
    fi
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOFLAGS=-mod=mod CGO_ENABLED=0
    tmp="$(mktemp "${bindir}/.build-gitops.XXXXXX")"
    trap 'rm -f "${tmp}"' EXIT
    (cd "${here}" && "${GO}" build -trimpath -ldflags "-s -w" -o "${tmp}" .)
    mv "${tmp}" "${binary}"
    echo "${binary}"
}

main "$@"
