{{/* Chart name, at most 63 characters. */}}
{{- define "imagebatch.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless the release name holds it. */}}
{{- define "imagebatch.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "imagebatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagebatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "imagebatch.labels" -}}
{{ include "imagebatch.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: imagebatch
{{- end }}

{{- define "imagebatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagebatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imagebatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "imagebatch.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) }}
{{- end }}

{{/*
The operator's permissions in the namespaces it watches: only verbs its code calls (operator/kube.py,
kopf) or grants to the workers. tests/unit/test_chart.py fails on a verb that nothing here uses.
The operator makes a least-privilege Role for each job's workers; Kubernetes only lets it grant
permissions it holds itself (RBAC escalation check), which is why it holds the workers' ones too
(marked "workers" below). It can neither read Secrets nor create pods, and has no bind/escalate.
*/}}
{{- define "imagebatch.namespacedRules" -}}
# ImageBatchJobs: kopf and the resync loop list and watch them; kopf patches them for its
# handler-progress annotations; delete for ttlSecondsAfterFinished; get: workers (their own job).
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# ImageBatchJob status: the operator writes progress and conditions (kubectl wait reads them).
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchjobs/status"]
  verbs: ["patch"]
# ImageBatchShards: the operator plans them (create), counts them (list) and reads the one whose
# name is taken (get: is it this job's?); get and patch: workers too (claims read a shard; the
# joining worker annotates shard 0). They go with their job
# through owner references (garbage collection), so no delete.
# watch: the operator's shard informer, and granted to workers, whose claims pick from a watch-fed
# cache (worker/shardcache.py).
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchshards"]
  verbs: ["get", "list", "watch", "create", "patch"]
# ImageBatchShard status: the operator requeues or fails shards, workers claim, renew and complete
# them, all by a conditional replace (update with the resourceVersion read).
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchshards/status"]
  verbs: ["update"]
# Worker Jobs (batch/v1): the operator creates one per ImageBatchJob, reads it, scales and
# suspends it (patch) and replaces a finished one (delete).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "patch", "delete"]
# Pods: the operator lists the workers' pods to count active replicas and to free the claims of
# pods that are gone.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# ServiceAccounts: the operator makes one per job for its workers (unless the job names one);
# get: to see that an existing one is the job's own before using it (it never adopts another).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create"]
# Roles and RoleBindings: the least-privilege Role of each job's workers, bound to their
# ServiceAccount; patch brings the Role's rules up to date; get: the ownership check.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles"]
  verbs: ["get", "create", "patch"]
# RoleBindings: the binding of that Role to the workers' ServiceAccount (never changed once made).
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["get", "create"]
# ConfigMaps: the operator reads prompts from spec.promptsFrom.configMapKeyRef to plan shards;
# workers: get on that one ConfigMap. The admission policy checks that the job's creator may read it.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# Events (core API): the operator and kopf report what they do on the ImageBatchJob (create only:
# every Event has a fresh name).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Kueue (spec.queueName): the operator says when the LocalQueue a job names does not exist.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["localqueues"]
  verbs: ["get"]
# Kueue Workloads: the operator finds its worker Job's (by the Job's UID label) to say what quota
# the job waits for, or that it can never fit its ClusterQueue.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list"]
{{- end }}

{{/* Cluster-scoped permissions kopf needs in every mode. */}}
{{- define "imagebatch.clusterRules" -}}
# CustomResourceDefinitions: kopf looks up the ImageBatchJob and ImageBatchShard resources at start
# and watches for their changes (read only; the chart installs the CRDs).
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
# Namespaces (read only): kopf lists and watches them to follow the watched namespaces being
# created or deleted (without it kopf logs 403 errors and assumes the listed namespaces exist);
# watching all namespaces, kopf and the operator do not need it, but the same role serves both modes.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Operator command-line arguments. */}}
{{- define "imagebatch.args" -}}
{{- if .Values.watch.allNamespaces }}
- --all-namespaces
{{- else }}
{{- range .Values.watch.namespaces }}
- --namespace={{ . }}
{{- end }}
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
- --metrics-port={{ if .Values.metrics.enabled }}{{ .Values.metrics.port }}{{ else }}0{{ end }}
- --worker-image={{ include "imagebatch.workerImage" . }}
- --worker-metrics-port={{ .Values.worker.metricsPort }}
{{- with .Values.worker.access }}
- --worker-local-paths={{ .localPaths }}
- {{ printf "--worker-uri-schemes=%s" (join "," .schemes) | quote }}
- {{ printf "--worker-http-hosts=%s" (join "," .httpHosts) | quote }}
- {{ printf "--worker-s3-endpoints=%s" (join "," .s3Endpoints) | quote }}
{{- end }}
- --interval={{ .Values.reconcileInterval }}
- --scale-down-cool-down={{ .Values.scaleDownCoolDown }}
{{- if eq .Values.logLevel "debug" }}
- --verbose
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Where the admission policies act: the namespaces the operator watches. */}}
{{- define "imagebatch.policyScope" -}}
{{- if not .Values.watch.allNamespaces }}
matchResources:
  namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values: {{ toJson .Values.watch.namespaces }}
{{- end }}
{{- end }}
