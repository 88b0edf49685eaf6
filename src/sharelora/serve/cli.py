"""``sharelora serve``: registered with the command line through ``sharelora.cli.PLUGINS``.

Flags come from ``settings.Settings``. Heavy imports (torch, fastapi, uvicorn) happen in ``run``,
so ``sharelora --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .settings import add_arguments as settings_arguments

    p.description = ("Serve a base model and many adapters over an OpenAI-compatible HTTP API; requests for "
                     "different adapters are decoded together in one batch (docs/SERVING.md).")
    settings_arguments(p)


def load(settings, out=print):
    """(ServedModel, Scheduler) for ``settings``: the base model and every ``--adapter``, with a line each."""
    import time

    from .model import ServedModel
    from .scheduler import Scheduler

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    served = ServedModel.load(settings.model, cache_dir=settings.cache_dir, device=settings.device,
                              dtype=settings.dtype, context_length=settings.context_length)
    n_params = sum(p.numel() for p in served.base.parameters())
    out(f"sharelora serve: base model {served.name} ({type(served.base).__name__}, {n_params / 1e6:.1f}M parameters, "
        f"{served.device}, context {served.context_length}) loaded in {time.perf_counter() - t0:.1f} s")
    specs = settings.adapter_specs()
    for i, (name, path) in enumerate(specs, 1):
        t1 = time.perf_counter()
        infos = served.add_adapter(served.read_adapter(path, name))
        for info in infos:
            group = f", task group {info.task_group!r}" if info.task_group else ""
            out(f"  [{i}/{len(specs)}] adapter {info.name}: {info.format}{group}, {info.parameters:,} parameters "
                f"({info.bytes / 2**20:.2f} MiB) from {path} ({time.perf_counter() - t1:.1f} s)")
    return served, Scheduler(served, max_batch=settings.max_batch, max_queue=settings.max_queue)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from ..cli import CliError
    from .app import create_app
    from .settings import settings_from_args

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        raise CliError(str(e)) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sharelora.serve").setLevel(settings.log_level.upper())
    served, scheduler = load(settings)
    try:
        sock = bind(settings.host, settings.port)
    except OSError as e:
        raise CliError(f"cannot listen on {settings.host}:{settings.port}: {e}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"sharelora serve: http://{shown}:{port}/v1 serves {', '.join(served.served_names())} "
          f"(max batch {settings.max_batch}, queue {settings.max_queue}"
          f"{', API key required' if settings.api_key else ''}"
          f"{f', adapters loadable from {settings.adapter_root}' if settings.adapter_root else ''})", flush=True)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print("sharelora serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    app = create_app(served, scheduler, settings)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def register(register_command) -> None:
    register_command("serve", "serve a base model and many adapters over an OpenAI-compatible HTTP API",
                     add_arguments, run)
