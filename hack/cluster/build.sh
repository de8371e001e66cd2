#!/usr/bin/env bash
# Build the binaries of the local test cluster from Go modules (no container engine needed):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and helm.
#
# The versions come from the wrapper modules next to this script (kube/, etcd/, helm/go.mod).
# Binaries are cached outside the repository, keyed by version:
#     ${IMAGEBATCH_CACHE:-$HOME/.cache/imagebatch}/bin/<name>-<version>
# and only the missing ones are built. On success the script prints one line: a folder holding
# links with the plain names (kube-apiserver, etcd, ...) to the binaries of exactly these versions,
# so `PATH="$(hack/cluster/build.sh):$PATH"` works.
#
# Options: --print-versions  print "name version" lines and exit (builds nothing).
# Environment: IMAGEBATCH_CACHE (cache root), GO (go command; default: go on PATH, else
# /usr/local/go/bin/go). Build logs go to stderr.
set -euo pipefail

# Everything is in a function so that bash has read the whole script before it runs any of it
# (editing the script while a build runs must not change what that build does).
main() {

    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    cache="${IMAGEBATCH_CACHE:-${HOME}/.cache/imagebatch}"
    bindir="${cache}/bin"

    modversion() { # modversion <go.mod> <module path> -> version required there
        awk -v m="$2" '$1 == m && $2 ~ /^v/ {print $2; exit} $1 == "require" && $2 == m {print $3; exit}' "$1"
    }

    kube_version="$(modversion "${here}/kube/go.mod" k8s.io/kubernetes)"
    etcd_version="$(modversion "${here}/etcd/go.mod" go.etcd.io/etcd/server/v3)"
    helm_version="$(modversion "${here}/helm/go.mod" helm.sh/helm/v3)"
    for v in kube_version etcd_version helm_version; do
        if [[ -z "${!v}" ]]; then echo "build.sh: cannot read ${v} from the go.mod files" >&2; exit 1; fi
    done

    declare -A version=(
        [etcd]="${etcd_version}"
        [kube-apiserver]="${kube_version}"
        [kube-controller-manager]="${kube_version}"
        [kube-scheduler]="${kube_version}"
        [kubectl]="${kube_version}"
        [helm]="${helm_version}"
    )
    names=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)

    if [[ "${1:-}" == "--print-versions" ]]; then
        for n in "${names[@]}"; do echo "${n} ${version[$n]}"; done
        exit 0
    fi

    linkdir="${cache}/bin/set-k${kube_version}-e${etcd_version}-h${helm_version}"

    missing() { # prints the names whose versioned binary is not in the cache
        for n in "$@"; do [[ -x "${bindir}/${n}-${version[$n]}" ]] || echo "${n}"; done
    }

    link_all() {
        mkdir -p "${linkdir}"
        for n in "${names[@]}"; do ln -sfn "${bindir}/${n}-${version[$n]}" "${linkdir}/${n}"; done
    }

    if [[ -z "$(missing "${names[@]}")" ]]; then
        link_all
        echo "${linkdir}"
        exit 0
    fi

    GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
    if [[ ! -x "${GO}" ]]; then echo "build.sh: no go command (set GO=...)" >&2; exit 1; fi

    mkdir -p "${bindir}"
    # Two builds at once (a test fixture and a make target) must not fight over the cache.
    exec 9>"${bindir}/.build.lock"
    flock 9

    # GOTOOLCHAIN=local: use the installed Go (>= 1.26); set GOTOOLCHAIN=auto to let an older one fetch it.
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOFLAGS=-mod=mod CGO_ENABLED=0
    tmp="$(mktemp -d "${bindir}/.build.XXXXXX")"
    trap 'rm -rf "${tmp}"' EXIT
    start=${SECONDS}

    build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

    # Kubernetes: one `go build` for all the commands so that they share the compilation.
    kube_missing=()
    for n in $(missing kube-apiserver kube-controller-manager kube-scheduler kubectl); do
        kube_missing+=("k8s.io/kubernetes/cmd/${n}")
    done
    if (( ${#kube_missing[@]} )); then
        minor="${kube_version#v1.}"; minor="${minor%%.*}"
        ld="-s -w"
        for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ld+=" -X ${pkg}.gitVersion=${kube_version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
            ld+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${build_date}"
        done
        echo "build.sh: building ${kube_missing[*]##*/} ${kube_version}" >&2
        (cd "${here}/kube" && "${GO}" build -trimpath -ldflags "${ld}" -o "${tmp}/" "${kube_missing[@]}")
        for p in "${kube_missing[@]}"; do n="${p##*/}"; mv "${tmp}/${n}" "${bindir}/${n}-${version[$n]}"; done
    fi

    if [[ -n "$(missing etcd)" ]]; then
        echo "build.sh: building etcd ${etcd_version}" >&2
        (cd "${here}/etcd" && "${GO}" build -trimpath -ldflags "-s -w" -o "${tmp}/etcd" go.etcd.io/etcd/server/v3)
        mv "${tmp}/etcd" "${bindir}/etcd-${etcd_version}"
    fi

    if [[ -n "$(missing helm)" ]]; then
        echo "build.sh: building helm ${helm_version}" >&2
        k8s_minor="$(cd "${here}/helm" && "${GO}" list -m -f '{{.Version}}' k8s.io/client-go)"
        k8s_minor="${k8s_minor#v0.}"; k8s_minor="${k8s_minor%%.*}"
        ld="-s -w -X helm.sh/helm/v3/internal/version.version=${helm_version}"
        ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
        ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
        ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${k8s_minor}"
        (cd "${here}/helm" && "${GO}" build -trimpath -ldflags "${ld}" -o "${tmp}/helm" helm.sh/helm/v3/cmd/helm)
        mv "${tmp}/helm" "${bindir}/helm-${helm_version}"
    fi

    echo "build.sh: built in $((SECONDS - start)) s" >&2
    link_all
    echo "${linkdir}"
}

main "$@"
