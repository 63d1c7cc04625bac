"""kopf operators in tests: run one in a thread, logged in to the test API server (tests/kube.py).

kopf gets its credentials through a pre-filled vault, so no login handler is needed and the
operator module's own login handlers (in-cluster ServiceAccount, say) are never consulted.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kopf
from kopf._cogs.structs.credentials import Vault  # kopf.operator(vault=) takes it; not re-exported

if TYPE_CHECKING:
    from kube import Kube


def fast_settings() -> kopf.OperatorSettings:
    """kopf settings for tests: short timeouts and backoffs (peering is off: standalone)."""
    s = kopf.OperatorSettings()
    s.watching.server_timeout = 10  # the server ends each watch; kopf resumes from its resourceVersion
    s.watching.client_timeout = 20
    s.watching.connect_timeout = 2
    s.watching.reconnect_backoff = 0.1
    s.networking.request_timeout = 10
    s.networking.error_backoffs = [0.1, 0.2, 0.5, 1]
    s.queueing.exit_timeout = 1
    return s


def load_handlers(module: str | os.PathLike[str]) -> None:
    """Import a handler module by dotted name or file path, once (handlers register at import)."""
    if isinstance(module, str) and not module.endswith(".py") and os.sep not in module:
        importlib.import_module(module)
        return
    path = Path(module).resolve()
    name = f"_kopf_handlers_{abs(hash(str(path)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)


class KopfRun:
    """A kopf operator in a thread with its own loop, logged in as the identity of a `Kube` client.

    `module`: handlers to import first (dotted name or .py path; imported once per process,
    into kopf's default registry). `registry`: use this registry instead of the default one
    (tests defining throw-away handlers should, so they do not leak into later tests).
    `namespaces`: serve these only; otherwise cluster-wide. `settings`: defaults to
    `fast_settings()`. Other keyword arguments go to `kopf.operator` (e.g. `memo`).
    """

    def __init__(
        self,
        kube: Kube,
        module: str | os.PathLike[str] | None = None,
        *,
        registry: Any = None,
        namespaces: list[str] | None = None,
        settings: Any = None,
        start_timeout: float = 10,
        stop_timeout: float = 15,
        **operator_kwargs: Any,
    ):
        self.kube, self.module, self.registry = kube, module, registry
        self.namespaces = namespaces
        self.settings = settings if settings is not None else fast_settings()
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.operator_kwargs = operator_kwargs
        self.error: BaseException | None = None
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._main, name="kopf-operator", daemon=True)

    def start(self) -> None:
        if self.module is not None:
            load_handlers(self.module)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._stop.set()
                raise RuntimeError(f"kopf did not start: {self.error!r}") from self.error

    def stop(self) -> None:
        """Stop the operator; re-raise what made it fail, if anything did."""
        self._stop.set()
        self._thread.join(self.stop_timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"kopf did not stop within {self.stop_timeout}s")
        if self.error is not None:
            raise RuntimeError("the kopf operator failed") from self.error

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._operate())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread by stop()
            self.error = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _operate(self) -> None:
        # The vault is made in the operator's loop: its asyncio primitives belong to that loop.
        await kopf.operator(
            registry=self.registry,
            settings=self.settings,
            standalone=True,
            clusterwide=not self.namespaces,
            namespaces=self.namespaces or (),
            stop_flag=self._stop,
            ready_flag=self._ready,
            vault=Vault({self.kube.identity.name: self.kube.connection_info()}),
            **self.operator_kwargs,
        )
