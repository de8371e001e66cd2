#!/usr/bin/env bash
# Build the Kueue controller of the local test cluster from its Go module (no container engine)
# and keep the manifests that go with it: the CRDs and the webhook configurations.
#
# The version comes from the wrapper module next to this script (go.mod). Everything is cached
# outside the repository, keyed by version:
#     ${IMAGEBATCH_CACHE:-$HOME/.cache/imagebatch}/bin/kueue-<version>          the controller
#     ${IMAGEBATCH_CACHE:-$HOME/.cache/imagebatch}/kueue-<version>/             what tests use:
#         kueue -> ../bin/kueue-<version>, crds/*.yaml (config/components/crd/bases),
#         webhook-manifests.yaml (config/components/webhook/manifests.yaml)
# and only what is missing is built or copied. On success the script prints one line: that folder.
#
# Options: --print-version  print "kueue <version>" and exit (builds nothing).
# Environment: IMAGEBATCH_CACHE (cache root), GO (go command; default: go on PATH, else
# /usr/local/go/bin/go). Build logs go to stderr.
set -euo pipefail

# Everything is in a function so that bash has read the whole script before it runs any of it.
main() {

    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    cache="${IMAGEBATCH_CACHE:-${HOME}/.cache/imagebatch}"
    bindir="${cache}/bin"

    version="$(awk '$1 == "sigs.k8s.io/kueue" && $2 ~ /^v/ {print $2; exit}
                    $1 == "require" && $2 == "sigs.k8s.io/kueue" {print $3; exit}' "${here}/go.mod")"
    if [[ -z "${version}" ]]; then echo "build.sh: cannot read the sigs.k8s.io/kueue version from ${here}/go.mod" >&2; exit 1; fi

    if [[ "${1:-}" == "--print-version" ]]; then
        echo "kueue ${version}"
        exit 0
    fi

    binary="${bindir}/kueue-${version}"
    setdir="${cache}/kueue-${version}"

    complete() { # the binary, the link, the CRDs and the webhook manifest are all there
        [[ -x "${binary}" && -L "${setdir}/kueue" && -s "${setdir}/webhook-manifests.yaml" ]] \
            && compgen -G "${setdir}/crds/*.yaml" >/dev/null
    }

    if complete; then
        echo "${setdir}"
        exit 0
    fi

    GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
    if [[ ! -x "${GO}" ]]; then echo "build.sh: no go command (set GO=...)" >&2; exit 1; fi

    mkdir -p "${bindir}"
    # Two builds at once (a test fixture and a make target) must not fight over the cache.
    exec 9>"${bindir}/.build-kueue.lock"
    flock 9
    if complete; then # the other build finished it while this one waited
        echo "${setdir}"
        exit 0
    fi

    # GOTOOLCHAIN=local: use the installed Go (>= 1.26); set GOTOOLCHAIN=auto to let an older one fetch it.
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOFLAGS=-mod=mod CGO_ENABLED=0
    tmp="$(mktemp -d "${bindir}/.build-kueue.XXXXXX")"
    trap 'rm -rf "${tmp}"' EXIT
    start=${SECONDS}

    if [[ ! -x "${binary}" ]]; then
        echo "build.sh: building kueue ${version}" >&2
        ld="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=${version}"
        ld+=" -X sigs.k8s.io/kueue/pkg/version.BuildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        (cd "${here}" && "${GO}" build -trimpath -ldflags "${ld}" -o "${tmp}/kueue" sigs.k8s.io/kueue/cmd/kueue)
        mv "${tmp}/kueue" "${binary}"
    fi

    # The manifests come from the same module source that the binary was built from.
    src="$(cd "${here}" && "${GO}" mod download -json "sigs.k8s.io/kueue@${version}" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    if [[ ! -d "${src}/config/components/crd/bases" ]]; then
        echo "build.sh: no config/components/crd/bases in the kueue module source (${src:-not found})" >&2
        exit 1
    fi
    mkdir -p "${tmp}/set/crds"
    cp "${src}"/config/components/crd/bases/*.yaml "${tmp}/set/crds/"
    cp "${src}/config/components/webhook/manifests.yaml" "${tmp}/set/webhook-manifests.yaml"
    chmod -R u+w "${tmp}/set" # the module cache is read-only
    ln -s "../bin/kueue-${version}" "${tmp}/set/kueue"
    rm -rf "${setdir}"
    mv "${tmp}/set" "${setdir}"

    echo "build.sh: kueue ${version} ready in $((SECONDS - start)) s" >&2
    echo "${setdir}"
}

main "$@"
