-- Argo CD health check for fedtune.io FederatedJob and Party.
--
-- One script for both kinds: argocd-cm-patch.yaml installs it twice, under
-- resource.customizations.health.fedtune.io_FederatedJob and ..._Party (tests/test_gitops.py
-- checks the copies are this file, and runs it on statuses written by the operator's own code).
--
-- It reads the status the fedtune operator writes (kstatus conventions: observedGeneration,
-- phase, conditions Ready / Reconciling / Stalled and fedtune's own), and answers:
--   Healthy      FederatedJob succeeded (phase Succeeded, Ready=True); Party Ready=True
--   Progressing  no status yet; status older than the spec (observedGeneration < generation);
--                FederatedJob Pending or Running (Reconciling=True: waiting for parties,
--                nodes, or the next round); Party Pending
--   Degraded     FederatedJob Failed or Stalled=True (QuorumLost, InvalidSpec, ...), or a spec
--                change the operator refused (SpecChangeRejected=True: the job runs on its
--                accepted spec, not on what Git says); Party phase Error (bucket unreachable,
--                credentials Secret missing: the operator retries, a person has to fix it)
-- Argo CD itself reports Missing (no such object) and "Pending deletion" (Progressing, while the
-- operator's fedtune.io/cleanup finalizer removes the job's pods) before calling a script.
--
-- Argo CD runs custom scripts in Lua 5.1 with only the base and table libraries (and a reduced
-- os): no string or math library here, messages are built with `..` only.

local function find_condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(status, ctype)
  local c = find_condition(status, ctype)
  return c ~= nil and c.status == "True"
end

-- The first non-empty text among a condition's message and the fallbacks.
local function message_of(status, ctype, ...)
  local c = find_condition(status, ctype)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  -- select, not ipairs: a nil fallback (an unset field) must not hide the ones after it.
  for i = 1, select("#", ...) do
    local text = select(i, ...)
    if text ~= nil and text ~= "" then
      return text
    end
  end
  return ""
end

local function health(code, message)
  return {status = code, message = message}
end

local function job_health(status)
  local phase = status.phase or "Pending"
  if phase == "Failed" or is_true(status, "Stalled") then
    return health("Degraded", message_of(status, "Stalled", status.message, "the job failed"))
  end
  if is_true(status, "SpecChangeRejected") then
    return health("Degraded", "spec change rejected, the job continues on its accepted spec: "
      .. message_of(status, "SpecChangeRejected"))
  end
  if phase == "Succeeded" or is_true(status, "Ready") then
    return health("Healthy", message_of(status, "Ready", status.message, "succeeded"))
  end
  if phase == "Pending" or phase == "Running" then
    local message = phase .. ": " .. message_of(status, "Reconciling", status.message, "waiting for the operator")
    if is_true(status, "Degraded") then
      message = message .. " (" .. message_of(status, "Degraded") .. ")"
    end
    return health("Progressing", message)
  end
  return health("Unknown", "unexpected phase " .. phase)
end

local function party_health(status)
  if is_true(status, "Ready") then
    return health("Healthy", message_of(status, "Ready", "ready"))
  end
  if status.phase == "Error" or is_true(status, "Stalled") then
    return health("Degraded", message_of(status, "Ready", "the Party is in error"))
  end
  return health("Progressing", message_of(status, "Ready", "waiting for the operator to check the Party's storage"))
end

local status = obj.status
if status == nil then
  return health("Progressing", "no status yet: waiting for the fedtune operator")
end
local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  local seen = "an unknown generation"
  if observed ~= nil then
    seen = "generation " .. tostring(observed)
  end
  return health("Progressing", "the operator has not processed generation " .. tostring(generation)
    .. " yet (the status is for " .. seen .. ")")
end
if obj.kind == "FederatedJob" then
  return job_health(status)
end
if obj.kind == "Party" then
  return party_health(status)
end
return health("Unknown", "not a fedtune kind: " .. tostring(obj.kind))
