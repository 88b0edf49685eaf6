"""Starting a server: the base model and adapters it loads, and the socket it listens on.

``sharelora serve`` (cli/serve.py) and the serving benchmark (bench.py) both start one this way.
"""

from __future__ import annotations

import socket


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
