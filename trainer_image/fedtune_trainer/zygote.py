"""A warm start for local mode's pods: import torch, transformers and peft once, then fork each pod.

Every pod of a local run is the same program on the same libraries, and importing them costs
seconds of CPU per process (on a 2-core machine, five pods importing at once take longer than a
round). `python -m fedtune_trainer zygote` imports them once and forks a pod per request: the
children share the imported code copy-on-write and start answering tickets at once.

Protocol, JSON lines. The runner writes requests on stdin:

    {"name": "default/alice", "argv": ["party", "--mailbox", DIR], "env": {...}, "log": PATH}

and reads, on stdout, one answer per request, in order, and an event per child that ends:

    {"name": "default/alice", "pid": 1234}       {"exited": 1234, "code": 0}

Each child gets exactly `env` as its environment (the zygote itself is started with the same
credential-free environment), its own session (the runner stops a pod with killpg), its log
file as stdout and stderr, and dies with the zygote, which dies with the runner. The zygote is
single-threaded (a fork copies only the calling thread, so no lock can be left held) and forks
only from that thread; if importing the libraries started threads it says so and refuses.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import threading
import traceback
from typing import Any

from fedtune.lifeline import die_with_parent


def preload(config_path: str | None = None) -> None:
    """Import what every pod imports.

    With the job's trainer config, also load the base model and the initial adapter the way a
    party does (fedtune_trainer.party.PRELOADED): every forked party then starts with them, and
    they share the base weights' memory copy-on-write (training never writes frozen weights).
    Best effort: whatever fails here, a pod does again and reports in its receipt.
    """
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import fedtune_trainer.adapters
    import fedtune_trainer.aggregator
    import fedtune_trainer.compression
    import fedtune_trainer.data
    import fedtune_trainer.evaluate
    import fedtune_trainer.models
    import fedtune_trainer.party
    import fedtune_trainer.train  # noqa: F401

    if config_path:
        from fedtune.api.protocol import TrainerConfig
        from transformers.utils import logging as hf_logging

        from fedtune_trainer import party

        torch.set_num_threads(1)  # no OpenMP pool before fork: each pod sizes its own
        hf_logging.disable_progress_bar()  # a progress bar would start tqdm's monitor thread
        try:
            import tqdm

            tqdm.tqdm.monitor_interval = 0  # and so would the bars GGUF loading draws itself
        except ImportError:
            pass
        try:
            cfg = TrainerConfig.model_validate_json(open(config_path).read())
            rt = party.PartyRuntime()
            rt.ensure(cfg, place=False)  # on the CPU: each pod moves it to its device after the fork
        except Exception as exc:  # noqa: BLE001 - the pods load it themselves and report what fails
            print(f"zygote: not preloading the model: {exc}", file=sys.stderr)
            return
        party.PRELOADED = rt


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _become_pod(req: dict[str, Any], keep: tuple[int, ...], zygote: int) -> None:
    """In the forked child: turn into the requested pod, run it, exit. Never returns."""
    code = 1
    try:
        os.setsid()
        die_with_parent()
        if os.getppid() != zygote:  # the zygote died before the lifeline was set: nobody to answer to
            os._exit(1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in keep:
            os.close(fd)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.environ.clear()
        os.environ.update(req["env"])
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            import torch

            torch.set_num_threads(int(threads))
        from fedtune_trainer.__main__ import main

        code = main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the pod's log is where a crash is read
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _say(out, doc: dict[str, Any]) -> None:
    out.write(json.dumps(doc) + "\n")
    out.flush()


def serve(config_path: str | None = None) -> int:
    """Preload, then fork pods on request until stdin closes; returns 0."""
    # The protocol gets a descriptor of its own; whatever a library prints goes to the log instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    preload(config_path)
    import torch

    if _threads() > 1 or torch.cuda.is_initialized():  # a fork copies one thread and no CUDA context
        print(f"zygote: {_threads()} threads (or CUDA) after preloading: forking would be unsafe", file=sys.stderr)
        return 3
    _say(out, {"ready": True})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD reaches the wakeup fd
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "request")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    buf = b""
    while True:
        for key, _ in sel.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                _reap(out)
                continue
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:  # the runner closed the pipe: it is done (or gone); skip the slow interpreter teardown
                sys.stderr.flush()
                os._exit(0)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                me = os.getpid()
                pid = os.fork()
                if pid == 0:
                    _become_pod(req, keep=(wake_r, wake_w, out.fileno()), zygote=me)
                _say(out, {"name": req["name"], "pid": pid})


def _reap(out) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say(out, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})
