-- Argo CD health of an ImageBatchJob (imagebatch.dev/v1alpha1), from the operator's conditions.
-- Install as the argocd-cm key resource.customizations.health.imagebatch.dev_ImageBatchJob
-- (docs/chart.md). Argo CD runs this with gopher-lua and no string library: only `..` here.
-- health_test.yaml and testdata/ are its cases, in the layout of argo-cd's resource_customizations.
local hs = {}

local function text(value)
  if value == nil then
    return ""
  end
  return tostring(value)
end

-- "Reason: message", or whichever of the two the condition has.
local function describe(condition, fallback)
  local reason, message = text(condition.reason), text(condition.message)
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if message ~= "" then
    return message
  end
  if reason ~= "" then
    return reason
  end
  return fallback
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Pending deletion"
  return hs
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

-- Conditions of an older spec say nothing about the current one (kstatus checks the same).
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. text(generation)
  return hs
end

local conditions = {}
for _, condition in ipairs(status.conditions) do
  if condition.type ~= nil then
    conditions[condition.type] = condition
  end
end

local function isTrue(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end

if isTrue("Failed") then
  hs.status = "Degraded"
  hs.message = describe(conditions["Failed"], "Failed")
elseif isTrue("Complete") then
  hs.status = "Healthy"
  hs.message = describe(conditions["Complete"], "Complete")
elseif isTrue("Suspended") then
  hs.status = "Suspended"
  hs.message = describe(conditions["Suspended"], "Suspended")
elseif isTrue("Queued") then
  -- Kueue has not admitted the workers: Argo CD's own check of a Kueue-suspended Job says Suspended.
  hs.status = "Suspended"
  hs.message = describe(conditions["Queued"], "Queued")
elseif conditions["WorkersHealthy"] ~= nil and conditions["WorkersHealthy"].status == "False"
  and conditions["WorkersHealthy"].reason ~= "Unschedulable" then
  -- Image pulls, out-of-memory kills and crashes need a change to the job; a pod that waits for
  -- a node may still be placed (an autoscaler), so Unschedulable stays Progressing below.
  hs.status = "Degraded"
  hs.message = describe(conditions["WorkersHealthy"], "worker pods are not healthy")
else
  hs.status = "Progressing"
  local ready = conditions["Ready"] or conditions["Reconciling"] or {}
  hs.message = describe(ready, "Running")
end
return hs
