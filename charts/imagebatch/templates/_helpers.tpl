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
The operator's permissions in the namespaces it watches. Every rule says who needs it and why.
The operator makes a least-privilege Role for each job's workers; Kubernetes only lets it grant
permissions it holds itself (RBAC escalation check), which is why it holds the workers' ones too.
*/}}
{{- define "imagebatch.namespacedRules" -}}
# ImageBatchJobs: the operator (kopf) watches them, reconciles them, and patches them for its
# finalizer and its handler-progress annotations; delete lets it clean up with ttlSecondsAfterFinished.
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchjobs"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
# ImageBatchJob status: the operator writes progress and conditions (kubectl wait reads them).
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchjobs/status"]
  verbs: ["get", "patch", "update"]
# ImageBatchShards: the operator plans them (create), counts them (list/watch), requeues expired
# claims (patch/update) and removes them with their job (delete, deletecollection); the workers'
# Role grants get/list/watch/create/patch/update on them, so the operator must hold those verbs.
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchshards"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete", "deletecollection"]
# ImageBatchShard status: the operator requeues or fails shards; the workers' Role grants the same
# verbs (to claim, renew and complete a shard).
- apiGroups: ["imagebatch.dev"]
  resources: ["imagebatchshards/status"]
  verbs: ["get", "patch", "update"]
# Worker Jobs (batch/v1): the operator creates one per ImageBatchJob, scales its parallelism,
# suspends it and deletes it.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Pods: the operator reads the workers' pods to count active replicas and to free the claims of
# pods that are gone.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# ServiceAccounts: the operator makes one per job for its workers (unless the job names one).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Roles and RoleBindings: the operator makes the least-privilege Role of each job's workers and
# binds it to their ServiceAccount.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# ConfigMaps: the operator reads prompts from spec.promptsFrom.configMapKeyRef to plan shards; the
# workers' Role grants get on that ConfigMap.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
# Events (core API): the operator (and kopf) report what they do on the ImageBatchJob.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# Events (events.k8s.io): the same, for clients that use the newer Events API.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
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
- --interval={{ .Values.reconcileInterval }}
- --scale-down-cool-down={{ .Values.scaleDownCoolDown }}
{{- if eq .Values.logLevel "debug" }}
- --verbose
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
