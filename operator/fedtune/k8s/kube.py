"""A small async API helper: raw dicts in and out, 409 on create = already there, 404 on read = absent.

Blocking client calls run in a thread (`asyncio.to_thread`) so the kopf event loop never stalls.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import urlencode

from kubernetes import client, config
from kubernetes.client.rest import ApiException

JSON = dict[str, Any]


def path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    """REST path of a collection or object: v1 pods ns -> /api/v1/namespaces/ns/pods."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


PLURALS = {
    "Pod": "pods",
    "Secret": "secrets",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Event": "events",
}


def object_path(obj: JSON) -> str:
    meta = obj["metadata"]
    return path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"), meta["name"])


def api_client(server: str | None = None) -> client.ApiClient:
    """A client for `server` (tests and development), in-cluster config, or the local kubeconfig."""
    cfg = client.Configuration()
    if server:
        cfg.host, cfg.verify_ssl = server, False
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            # Read KUBECONFIG now: the client library only reads it once, when first imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
    return client.ApiClient(cfg)


class Kube:
    """Async CRUD over raw JSON objects."""

    def __init__(self, api: client.ApiClient):
        self.api = api

    def _call(
        self, method: str, url: str, body: Any = None, content_type: str = "application/json", query: list | None = None
    ) -> JSON:
        # rest_client.request(method, url, headers=, body=) has the same shape across client versions;
        # the generated call_api() does not.
        cfg = self.api.configuration
        headers = {"Accept": "application/json", "Content-Type": content_type}
        for auth in cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        full = cfg.host + url + (("?" + urlencode(query)) if query else "")
        resp = self.api.rest_client.request(method, full, headers=headers, body=body)
        data = resp.read() if hasattr(resp, "read") else resp.data
        if not 200 <= resp.status < 300:
            exc = ApiException(resp.status, getattr(resp, "reason", ""))
            exc.body = data
            raise exc
        return json.loads(data) if data else {}

    async def call(
        self, method: str, url: str, body: Any = None, content_type: str = "application/json", query: list | None = None
    ) -> JSON:
        return await asyncio.to_thread(self._call, method, url, body, content_type, query)

    async def get(self, url: str) -> JSON | None:
        try:
            return await self.call("GET", url)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: JSON) -> JSON:
        """Create, or return the existing object of that name (re-applying is a no-op)."""
        meta = obj["metadata"]
        collection = path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"))
        try:
            return await self.call("POST", collection, obj)
        except ApiException as exc:
            if exc.status == 409:
                return await self.get(object_path(obj)) or obj
            raise

    async def patch(self, url: str, body: JSON, content_type: str = "application/merge-patch+json") -> JSON:
        return await self.call("PATCH", url, body, content_type)

    async def delete(self, url: str) -> bool:
        """Delete; False if it was already gone."""
        try:
            await self.call("DELETE", url, {"propagationPolicy": "Background"})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    async def list(self, url: str, labels: dict[str, str] | None = None) -> list[JSON]:
        """List a collection, filtered by labels (also client-side: some servers ignore selectors)."""
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items()))] if labels else []
        items = (await self.call("GET", url, query=query)).get("items", [])
        if labels:
            items = [
                i for i in items if all((i["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
            ]
        return items
