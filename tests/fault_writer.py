"""Writers that tests/test_fault_injection_writes.py kills with SIGKILL, and the versions they write.

Run as a script it is a fork server: it imports torch and sharelora once (~2 s) and then forks
one writer per kill point (~ms), so a test can kill dozens of writers in a few seconds. Each
writer saves *versions* of one kind of file; version k is known exactly on both sides:

* ``adapter``: ``ShareLoraModel.save_pretrained`` of a ShareA adapter whose tensors are
  ``base + k`` and whose config has ``alpha = 8 + k`` (so weights and config of different
  versions cannot pass for one adapter);
* ``checkpoint``: the training loop's pair, ``save_weights(best.safetensors)`` then
  ``save_checkpoint(checkpoint.safetensors)`` with state ``{"step": k}``, parameters ``base + k``.

Protocol, one line each (stdin: commands; stdout: os.write lines, atomic in a pipe):

    -> loop <kind> <dir> <first>       fork a writer saving first, first + 1, ... until it is killed
    -> step <kind> <dir> <version> <n> fork a writer saving ``version`` once, that SIGKILLs itself
                                       just before its n-th file-system call (0: never)
    <- pid <pid>                       the writer is running
    <- done <k> [<seconds>]            (from the writer) version k is completely saved (in a loop: how long
                                       that save took)
    <- dead <signal>                   the writer is gone (9: killed)
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

D, LAYERS, RANK = 256, 3, 64
KINDS = ("adapter", "checkpoint")
BEST, CHECKPOINT = "best.safetensors", "checkpoint.safetensors"
# The calls through which the writers touch files (tempfile.mkstemp opens through os.open too).
FS_CALLS = ("open", "write", "lseek", "fsync", "close", "replace", "unlink")


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.q(x)) * self.v(x)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(D) for _ in range(LAYERS)])


def adapter_config(k: int):
    from sharelora import ShareLoraConfig

    return ShareLoraConfig(rank=RANK, alpha=8.0 + k, share="A", target_modules=["q", "v"], init_lora_weights=False)


def _bases(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=g) for name, shape in sorted(shapes.items())}


class Versions:
    """The exact tensors of every version of both kinds, and writers of them."""

    def __init__(self):
        from sharelora import get_sharelora_model
        from sharelora.training import state

        self.state = state
        self.adapter = get_sharelora_model(base_model(), adapter_config(0))
        self.adapter_base = _bases({k: v.shape for k, v in self.adapter.adapter_state_dict().items()})
        self.model = base_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.model_base = _bases({k: p.shape for k, p in self.model.named_parameters()})

    def adapter_tensors(self, k: int) -> dict[str, torch.Tensor]:
        return {name: t + k for name, t in self.adapter_base.items()}

    def parameters(self, k: int) -> dict[str, torch.Tensor]:
        return {name: t + k for name, t in self.model_base.items()}

    def save(self, kind: str, directory: Path, k: int) -> None:
        if kind == "adapter":
            self.adapter.load_adapter_state_dict(self.adapter_tensors(k))
            self.adapter.sharelora_config.alpha = 8.0 + k
            self.adapter.save_pretrained(directory)
        else:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(self.model_base[name] + k)
            self.state.save_weights(directory / BEST, self.model)
            self.state.save_checkpoint(directory / CHECKPOINT, self.model, self.optimizer, {"step": k})


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _kill_self_at(n: int) -> None:
    """SIGKILL this process just before its n-th call of one of ``FS_CALLS``."""
    count = [0]

    def wrap(real):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    for name in FS_CALLS:
        setattr(os, name, wrap(getattr(os, name)))


def _writer(versions: Versions, command: list[str], server: int) -> None:
    mode, kind, directory = command[0], command[1], Path(command[2])
    if mode == "step":
        version, n = int(command[3]), int(command[4])
        if n:
            _kill_self_at(n)
        versions.save(kind, directory, version)
        _say(f"done {version}")
        return
    k, deadline = int(command[3]), time.monotonic() + 60
    while os.getppid() == server and time.monotonic() < deadline:  # never outlives the test
        t0 = time.perf_counter()
        versions.save(kind, directory, k)
        _say(f"done {k} {time.perf_counter() - t0:.4f}")
        k += 1


def serve() -> None:
    torch.set_num_threads(1)  # no thread pool in the server: forked writers stay safe
    versions = Versions()
    with tempfile.TemporaryDirectory() as scratch:  # a first save of each kind: lazy imports done here, once
        for kind in KINDS:
            versions.save(kind, Path(scratch), 0)
    _say("ready")
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _writer(versions, command, os.getppid())
            except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
                _say(f"error {type(e).__name__}: {e}".replace("\n", " "))
                code = 1
            finally:
                os._exit(code)
        _say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        _say(f"dead {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)}")


if __name__ == "__main__":
    serve()
