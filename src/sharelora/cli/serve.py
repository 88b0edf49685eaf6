"""``sharelora serve``: a base model and many adapters behind an OpenAI-compatible HTTP API.

Flags come from ``settings.Settings``. Heavy imports (torch, fastapi, uvicorn) happen in ``run``,
so ``sharelora --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..serve.settings import add_arguments as settings_arguments

    p.description = ("Serve a base model and many adapters over an OpenAI-compatible HTTP API; requests for "
                     "different adapters are decoded together in one batch (docs/SERVING.md).")
    settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from ..serve.app import create_app
    from ..serve.launch import bind, load
    from ..serve.settings import settings_from_args
    from .common import CliError

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        raise CliError(str(e)) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sharelora.serve").setLevel(settings.log_level.upper())
    served, scheduler = load(settings)
    try:
        app = create_app(served, scheduler, settings)
    except ValueError as e:  # the startup adapters do not fit --max-adapters / --adapter-memory
        raise CliError(str(e)) from None
    try:
        sock = bind(settings.host, settings.port)
    except OSError as e:
        raise CliError(f"cannot listen on {settings.host}:{settings.port}: {e}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    bounds = [f"at most {settings.max_adapters} resident"] if settings.max_adapters else []
    bounds += [f"{settings.adapter_memory:g} MiB of adapters"] if settings.adapter_memory else []
    print(f"sharelora serve: http://{shown}:{port}/v1 serves {', '.join(served.served_names())} "
          f"(max batch {settings.max_batch}, queue {settings.max_queue}"
          f"{', API key required' if settings.api_key else ''}"
          f"{f', adapters loaded on demand from {settings.adapter_root}' if settings.adapter_root else ''}"
          f"{'; ' + ', '.join(bounds) if bounds else ''})", flush=True)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print("sharelora serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def register(register_command) -> None:
    register_command("serve", "serve a base model and many adapters over an OpenAI-compatible HTTP API",
                     add_arguments, run)
