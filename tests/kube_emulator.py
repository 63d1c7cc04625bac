"""An in-memory Kubernetes API server for tests: kmock's KubernetesEmulator, completed.

kmock (by kopf's author) gives the HTTP plumbing, request parsing, discovery and object
storage. Its state handling is deliberately naive, and kopf and fedtune depend on the parts
it leaves out, so `ApiServer` replaces the mutating half and the list/watch views:

- create: uid, resourceVersion, creationTimestamp, generation, generateName, 201, 409;
- patch (merge, strategic treated as merge, JSON patch) and PUT: resourceVersion bump,
  generation bump on non-metadata/status changes, no-op patches change nothing,
  JSON-patch `test` failures answer 422 (kopf relies on it for its finalizer patches),
  `metadata.resourceVersion` preconditions answer 409, `/status` separation for resources
  that declare a status subresource;
- delete: deletionTimestamp while finalizers remain, then DELETED; owner-reference garbage
  collection of dependents (background propagation, done at once);
- list/watch: label and field selectors, a real list resourceVersion, watch resumption from
  `resourceVersion` (410 Gone when it is older than the kept history), `timeoutSeconds`;
- `/api/v1/namespaces` (kmock cannot parse it); optional bearer-token check (401).

Not emulated: schema validation, RBAC, admission, strategic-merge list semantics. Instead, an
optional request log (`ApiServer.request_log`, see `RecordedRequest`) lets tests compare what a
client asked for with the RBAC rules it would need.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import secrets
import uuid
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import apps, dicts, parsing, rendering
from kube_selectors import match_fields, match_labels

ACT = kmock.action
# What the server owns in metadata: writes cannot change these.
SERVER_FIELDS = "name namespace uid creationTimestamp generation resourceVersion".split()
SERVER_FIELDS += ["deletionTimestamp", "deletionGracePeriodSeconds"]


def api_error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """A Kubernetes `Status` failure, rendered by kmock with this HTTP status."""
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details or {"causes": []})


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _on_status(op: dict[str, Any]) -> bool:
    """Whether a JSON-patch operation touches the status (which has its own endpoint)."""
    path = op.get("path", "")
    return path == "/status" or path.startswith("/status/")


# --- kmock cannot parse the `namespaces` resource itself: teach its path parser ----------


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (len(parts) <= 4 or parts[4:] in (["status"], ["finalize"])):
        name = parts[3] if len(parts) > 3 else None
        sub = parts[4] if len(parts) > 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, sub)
    return _kmock_parse_path(path)


if not getattr(parsing.parse_path, "_fedtune", False):
    _kmock_parse_path = parsing.parse_path
    _parse_path._fedtune = True  # type: ignore[attr-defined]
    parsing.parse_path = _parse_path
else:  # re-imported under another name: reuse the original kept by the first import
    _kmock_parse_path = parsing.parse_path.__globals__["_kmock_parse_path"]


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with API-server semantics (see the module docstring)."""

    history_size: int = 10_000
    tokens: set[str] | None = None  # when set, every request needs `Authorization: Bearer <one of them>`
    request_log: list[RecordedRequest] | None = None  # when a list, every request is appended to it
    _rv: int = attrs.field(default=0, init=False)
    _history: collections.deque = attrs.field(init=False, factory=collections.deque)
    _history_floor: int = attrs.field(default=0, init=False)  # newest rv no longer in _history

    # --- request entry: every state change goes through here, under one lock ----------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        try:
            return await self._serve(request)
        finally:
            self._forget(request)

    def _forget(self, request: rendering.Request) -> None:
        """Drop a served request from kmock's history.

        kmock keeps every request and finds the reaction for a new one by scanning that history
        from the start (`request in view`), so each request cost grew with all before it: a few
        thousand requests in, the emulator, not the client under test, was the bottleneck.
        Nothing here asserts on kmock's history (`request_log` is ours), and a request is only
        looked up while it is being served, so served ones can go.
        """
        history = self._requests
        for i in range(len(history) - 1, -1, -1):
            if history[i] is request:
                del history[i]
                return

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if self.request_log is not None:
            self.request_log.append(RecordedRequest.of(request))
        if self.tokens is not None:
            auth = next((v for k, v in request.headers.items() if k.lower() == "authorization"), "")
            if not (auth.startswith("Bearer ") and auth[7:] in self.tokens):
                raise api_error(401, "Unauthorized", "Unauthorized")
        put = request.method == kmock.method.PUT and request.name is not None
        if request.resource is None or not (
            request.action == ACT.CREATE or put or (request.name and request.action in (ACT.UPDATE, ACT.DELETE))
        ):
            return await super()._handle(request)  # reads: kmock serves them from the stored state
        async with self._lock:
            events = self._mutate(request, put)
            for res, event in events:  # announced in resourceVersion order: watchers resume by it
                self._remember(res, event)
                await self._buses[res].put(event)
        if put:  # kmock has no route for PUT: answer with the stored state ourselves
            return aiohttp.web.json_response(self._objects[request.resource, request.namespace, request.name].last.raw)
        return await apps.RawHandler._handle(self, request)  # kmock's fallbacks render the new state

    def _mutate(self, request: rendering.Request, put: bool) -> list[tuple[kmock.resource, dict[str, Any]]]:
        res = request.resource
        info = self._info(res)
        if request.action == ACT.CREATE:
            return self._create(res, info, request.namespace, request.data)
        key = (res, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise api_error(404, "NotFound", f'{res.plural} "{request.name}" not found', name=request.name)
        if request.subresource not in (None, "status"):
            raise api_error(404, "NotFound", f"no such subresource: {request.subresource}")
        if request.action == ACT.DELETE:
            return self._delete(key)
        old = copy.deepcopy(self._objects[key].raw)
        to_status = request.subresource == "status" and "status" in info.subresources
        split = "status" in info.subresources and not to_status  # the main endpoint ignores status
        if put:
            return self._commit(key, old, self._replaced(old, request.data, to_status, split))
        patch = request.data
        if isinstance(patch, dict):
            self._precondition(old, patch)
            if to_status:
                patch = {"status": patch["status"]} if "status" in patch else {}
            elif split:
                patch = {k: v for k, v in patch.items() if k != "status"}
        elif isinstance(patch, list):
            keep_all = not split and not to_status
            patch = [op for op in patch if keep_all or op.get("op") == "test" or _on_status(op) == to_status]
        else:
            raise api_error(400, "BadRequest", "the patch must be a JSON object or a JSON-patch list")
        try:
            new = dict(dicts.patch_dict(copy.deepcopy(old), patch))
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, ValueError, TypeError) as exc:
            raise api_error(422, "Invalid", f"the patch cannot be applied: {exc}") from None
        return self._commit(key, old, new)

    # --- the individual verbs ----------------------------------------------------------

    def _create(self, res, info, namespace, body) -> list:
        if not isinstance(body, dict):
            raise api_error(400, "BadRequest", "the body must be a JSON object")
        meta = body.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise api_error(422, "Invalid", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if info.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise api_error(400, "BadRequest", "the namespace of the object does not match the URL")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        key = (res, meta.get("namespace"), meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise api_error(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists', name=meta["name"])
        body.setdefault("apiVersion", f"{res.group}/{res.version}".lstrip("/"))
        body.setdefault("kind", info.kind)
        for server_side in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(server_side, None)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=now_iso(), generation=1)
        if "status" in info.subresources:
            body.pop("status", None)
        if key in self._objects:
            self._objects[key].history.append(body)
        else:
            self._objects[key] = body
        return [(res, {"type": "ADDED", "object": self._objects[key].raw})]

    def _replaced(self, old: dict, body: Any, to_status: bool, split: bool) -> dict:
        if not isinstance(body, dict):
            raise api_error(400, "BadRequest", "the body must be a JSON object")
        self._precondition(old, body)
        new = dict(old, status=body.get("status")) if to_status else copy.deepcopy(body)
        if split:
            new["status"] = old.get("status")
        return {k: v for k, v in new.items() if v is not None or k != "status"}

    def _commit(self, key, old: dict, new: dict) -> list:
        meta = new["metadata"] = dict(new.get("metadata") or {})
        for field in SERVER_FIELDS:  # the server owns these: a patch cannot change them
            meta.pop(field, None)
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if new == old:
            return []  # a no-op write changes nothing and announces nothing, as on a real server
        body_part = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        if body_part(new) != body_part(old):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        meta["resourceVersion"] = self._next_rv()
        self._objects[key].history.append(new)
        events = [(key[0], {"type": "MODIFIED", "object": self._objects[key].raw})]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            events += self._finalize(key)
        return events

    def _delete(self, key) -> list:
        obj = self._objects[key]
        meta = obj.raw["metadata"]
        if meta.get("deletionTimestamp"):
            return []  # already terminating: waits for its finalizers
        if not meta.get("finalizers"):
            return self._finalize(key)
        new = copy.deepcopy(obj.raw)
        new["metadata"].update(deletionTimestamp=now_iso(), deletionGracePeriodSeconds=0)
        new["metadata"]["resourceVersion"] = self._next_rv()
        obj.history.append(new)
        return [(key[0], {"type": "MODIFIED", "object": obj.raw})]

    def _finalize(self, key) -> list:
        """Remove the object for good, then delete its dependents (the garbage collector's job)."""
        obj = self._objects[key]
        last = copy.deepcopy(obj.raw)
        last["metadata"]["resourceVersion"] = self._next_rv()
        obj.history.append(last)  # so the DELETE answer and the DELETED event carry the new rv
        obj.delete()
        events = [(key[0], {"type": "DELETED", "object": last})]
        uid = last["metadata"].get("uid")
        for dep_key, dep in list(self._objects.items()):
            refs = [] if dep.deleted else dep.raw.get("metadata", {}).get("ownerReferences") or []
            if uid and any(ref.get("uid") == uid for ref in refs):
                events += self._delete(dep_key)
        return events

    # --- reads: selectors and resourceVersion-aware watches ------------------------------

    async def _serve_list(self, request: rendering.Request) -> dict[str, Any]:
        info = self._info(request.resource)
        self._check_selectors(request)
        items = [
            o.raw
            for (res, _, _), o in self._objects.items()
            if res == request.resource and not o.deleted and self._visible(request, o.raw)
        ]
        return {
            "apiVersion": "v1",
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _serve_watch(self, request: rendering.Request):
        self._info(request.resource)
        self._check_selectors(request)
        since = request.params.get("resourceVersion") or "0"
        timeout = request.params.get("timeoutSeconds")
        if not since.isdigit() or (timeout is not None and not timeout.isdigit()):
            raise api_error(400, "BadRequest", "resourceVersion and timeoutSeconds must be integers")
        return self._watch(request, int(since), float(timeout) if timeout else None)

    async def _watch(self, request: rendering.Request, since: int, timeout: float | None):
        yield b""  # send the headers now, as a real server does, even if nothing ever happens
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        bus = self._buses[request.resource]
        async with self._lock:  # one consistent cut: the backlog, then the live bus from here
            mark = await bus.mark()
            if since == 0:
                backlog = [
                    {"type": "ADDED", "object": o.raw}
                    for (res, _, _), o in self._objects.items()
                    if res == request.resource and not o.deleted
                ]
            elif since < self._history_floor:
                gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired"}
                backlog = [{"type": "ERROR", "object": dict(gone, message=f"too old resource version: {since}")}]
            else:
                backlog = [ev for rv, res, ev in self._history if res == request.resource and rv > since]
        try:
            for event in backlog:
                if event["type"] == "ERROR":
                    yield event
                    return
                if self._visible(request, event["object"]):
                    yield event
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return
                try:
                    event = await asyncio.wait_for(bus.get(since=mark), left)
                except TimeoutError:
                    return
                if self._visible(request, event["object"]):
                    yield event
        finally:
            await bus.unmark(mark)

    async def _serve_create(self, request: rendering.Request) -> rendering.Response:
        meta = request.data["metadata"]  # completed by _create (name from generateName, namespace)
        obj = self._objects[request.resource, meta.get("namespace"), meta["name"]]
        return rendering.Response(status=201, payload=obj.raw)

    # --- helpers -------------------------------------------------------------------------

    def _info(self, res: kmock.resource | None) -> kmock.ResourceInfo:
        if res is None or res.plural is None or res not in self.resources:
            raise api_error(404, "NotFound", f"the server could not find the requested resource ({res})")
        return self.resources[res]

    def _check_selectors(self, request: rendering.Request) -> None:
        """A malformed selector is the client's error (400), found before any answer starts."""
        try:
            match_labels(request.params.get("labelSelector"), {})
            match_fields(request.params.get("fieldSelector"), {})
        except ValueError as exc:
            raise api_error(400, "BadRequest", str(exc)) from None

    def _visible(self, request: rendering.Request, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (
            (request.namespace is None or meta.get("namespace") == request.namespace)
            and (request.name is None or meta.get("name") == request.name)
            and match_labels(request.params.get("labelSelector"), meta.get("labels") or {})
            and match_fields(request.params.get("fieldSelector"), obj)
        )

    def _precondition(self, old: dict, body: dict) -> None:
        want = (body.get("metadata") or {}).get("resourceVersion")
        if want is not None and want != old["metadata"]["resourceVersion"]:
            raise api_error(409, "Conflict", "the object has been modified; apply your changes to the latest version")

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _remember(self, res: kmock.resource, event: dict[str, Any]) -> None:
        if len(self._history) >= self.history_size:
            self._history_floor = self._history.popleft()[0]
        self._history.append((int(event["object"]["metadata"]["resourceVersion"]), res, event))


# --- request log: what each client asked for, in RBAC terms (observes only) ------------------


@attrs.frozen
class RecordedRequest:
    """One request as an RBAC authorizer sees it, and who sent it (bearer token, User-Agent).

    `verb` is the RBAC verb (get, list, watch, create, update, patch, delete, deletecollection);
    requests outside any resource (/api, /apis/<group>/<version>, /version: discovery, which
    every authenticated user may read) have `resource` None and the lowercase HTTP method.
    """

    verb: str
    group: str | None
    resource: str | None  # with "/<subresource>" when there is one, as RBAC rules name it
    namespace: str | None
    token: str | None
    user_agent: str
    path: str

    @classmethod
    def of(cls, request: rendering.Request) -> RecordedRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        res = request.resource
        method = request.method.value  # "GET", "POST", … (kmock's enum)
        common = dict(namespace=request.namespace, token=token, user_agent=headers.get("user-agent", ""))
        if res is None or not res.plural:
            return cls(verb=method.lower(), group=None, resource=None, path=request.url.path, **common)
        if method == "GET":
            verb = "watch" if request.params.get("watch") in ("true", "1") else "get" if request.name else "list"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)
            verb = verb or ("delete" if request.name else "deletecollection")
        plural = f"{res.plural}/{request.subresource}" if request.subresource else res.plural
        return cls(verb=verb, group=res.group or "", resource=plural, path=request.url.path, **common)
