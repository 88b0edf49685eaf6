"""How one run spreads over the processes of a launcher: accelerate and torch do the work.

    torchrun --nproc-per-node N -m sharelora train ...         # or: accelerate launch -m sharelora train ...

The launcher starts one process per device and sets the environment (RANK, WORLD_SIZE, MASTER_ADDR,
...); accelerate's ``Accelerator`` reads it, opens the process group (gloo on CPU, NCCL on CUDA),
puts the model on this process's device, wraps it in DDP (the gradients of every parameter, a
tensor shared across layers included, are averaged over the processes in the backward of a step's
last micro-batch) and applies mixed precision. Without a launcher there is one process, nothing is
wrapped and the run is the single-process run it always was.

``--fsdp`` shards the model with torch's FSDP2 (``fully_shard``) instead of DDP: one unit per
transformer block (the classes the model lists in ``_no_split_modules``) holding that block's base
weights, and the root unit (the ``ShareLoraModel``) holding everything outside the blocks. All adapter
tensors live in the model's ``sharelora_bank``, a child of the root, and the layers only look them up
in it, so a tensor shared by the layers of many blocks sits in the root unit, which is gathered for the
whole forward and backward; each block's unit holds only its own frozen weights. (Wrapping the layers
that *use* a shared tensor would give it to several units at once, each with its own shard of it.)
accelerate's FSDP plugin is not used because accelerate 1.15 turns FSDP on only on accelerators
(``state.py``: a MULTI_CPU run never becomes FSDP, its plugin is dropped), so FSDP2 directly is the
one code path that runs on CPU with gloo and on CUDA with NCCL alike.

What the training loop asks of this module: an ``Accelerator`` (``make_accelerator``), the wrapped
model (``wrap``), a context for micro-batches that accumulate without syncing (``gradient_sync``),
the model as evaluation and saving read it (``for_evaluation``, ``whole_trainable``), and rank 0's
outcome of a step that only rank 0 may take (``on_main``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def make_accelerator(device: str = "auto", fsdp: bool = False, find_unused_parameters: bool = False) -> Any:
    """The ``Accelerator`` of this process: the launcher's process group, or a single process.

    ``device``: "auto" (CUDA when there is one), "cpu", or "cuda[:i]" (one process only; under a
    launcher every process takes the device of its local rank). accelerate's state is a
    process-wide singleton; a single process that trains several runs one after another (tests,
    ``compare --in-process``) starts each from a fresh state, so one run's device or precision never
    leaks into the next. A launched process keeps its state: its process group lives as long as it.

    ``find_unused_parameters``: DDP looks for trainable tensors a step did not use (multi-task
    batches: a task with no row in a process's micro-batch leaves its own B's out of that forward).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if not PartialState._shared_state or PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    # accelerate opens a gloo group only when told the run is on CPU; on a machine without CUDA an
    # "auto" run is one.
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    handlers = []
    if find_unused_parameters:
        from accelerate.utils import DistributedDataParallelKwargs

        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"the accelerate config asks for {accelerator.distributed_type.value}; sharelora train does its own "
            "sharding: launch with a plain multi-process config (or torchrun) and pass --fsdp to shard the model"
        )
    if fsdp and accelerator.num_processes == 1:
        raise ValueError("--fsdp shards the model over the processes of a launcher; start the run with "
                         "torchrun --nproc-per-node N -m sharelora train ... (or accelerate launch), or drop --fsdp")
    if device.startswith("cuda:") and accelerator.num_processes > 1:
        raise ValueError(f"--device {device} names one GPU, but the launcher started {accelerator.num_processes} "
                         "processes (each takes the GPU of its local rank); use --device auto or cuda")
    return accelerator


def check_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """The micro-batch of one process: the global batch split over processes and accumulation steps."""
    per_step = grad_accum * world_size
    if batch_size % per_step:
        where = f"{world_size} processes x {grad_accum} micro-batches" if world_size > 1 else f"{grad_accum} micro-batches"
        raise ValueError(
            f"--batch-size {batch_size} is the global batch of a step and must divide into {where}; "
            f"use a multiple of {per_step} (e.g. {per_step * max(1, round(batch_size / per_step))})"
        )
    return batch_size // per_step


def wrap(accelerator: Any, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
         fsdp: bool = False, unused: bool = False) -> tuple[nn.Module, Any]:
    """(model, optimizer) ready to train: DDP through ``accelerator.prepare``, or FSDP2 units.

    The model is on the process's device before the optimizer is made (as a single process always
    did). A single task's step uses every trainable tensor (adapter, head) in every forward, and a
    rank without examples in a step still runs a zero-weighted micro-batch (see the engine), so each
    backward marks every parameter once; the graph is rebuilt each step, so no ``static_graph``.
    ``unused``: a process's forward may leave trainable tensors out (multi-task rows): DDP looks for
    them (``make_accelerator(find_unused_parameters=True)``), FSDP reduces a zero gradient for them.
    A stage that changes what is trainable (continual multitask) calls this again: DDP wraps the model
    anew (it syncs what is trainable when built); FSDP keeps its units, since FSDP2 reads each
    parameter's ``requires_grad`` whenever it gathers it. Either way the optimizer is new.
    """
    model = model.to(accelerator.device)
    if not fsdp:
        return accelerator.prepare(model, make_optimizer(model))
    if not is_sharded(model):  # a later stage keeps the units: FSDP2 follows requires_grad at every unshard
        model = shard(model, accelerator)
    if unused:
        model.set_reduce_scatter_unused_params(True)
    return model, accelerator.prepare(make_optimizer(model))


def shard(model: nn.Module, accelerator: Any) -> nn.Module:
    """FSDP2 units: one per transformer block, and the root holding the adapter bank (see the module doc)."""
    from accelerate.utils import broadcast
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # fully_shard keeps each process's own values; DDP would broadcast rank 0's. The frozen weights
    # come from the same checkpoint everywhere, the trainable ones (new head, adapter) from the same
    # seed; copying rank 0's makes that a fact rather than an assumption.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                broadcast(p.data, from_process=0)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    policy = MixedPrecisionPolicy(param_dtype=dtypes.get(accelerator.mixed_precision), reduce_dtype=torch.float32)
    base = getattr(model, "base_model", model)
    block_types = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_types and m is not model]
    if not blocks:
        raise ValueError(f"--fsdp: {type(base).__name__} names no transformer blocks (_no_split_modules) to shard; "
                         "train it without --fsdp")
    for block in reversed(blocks):  # inner units before the ones around them, as fully_shard wants
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    bank = getattr(model, "sharelora_bank", None)
    if bank is not None:  # the property the sharing depends on, checked rather than assumed
        root = set(map(id, _managed_parameters(model)))
        stray = [name for name, p in bank.named_parameters() if id(p) not in root]
        if stray:
            raise RuntimeError(f"--fsdp: adapter tensors {stray[:3]} are not in the root unit; "
                               "a tensor shared across layers must be in a unit every layer can reach")
    return model


def _fsdp_module_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _managed_parameters(unit: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters an FSDP unit holds itself: its own and its children's, minus those of nested units."""
    yield from unit.parameters(recurse=False)
    for child in unit.children():
        if not isinstance(child, _fsdp_module_type()):
            yield from _managed_parameters(child)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, _fsdp_module_type())


@contextlib.contextmanager
def gradient_sync(accelerator: Any, model: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch: ``sync=False`` accumulates its gradients locally (all but a step's last)."""
    if sync:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


@contextlib.contextmanager
def for_evaluation(accelerator: Any, model: nn.Module) -> Iterator[nn.Module]:
    """The model as evaluation calls it: without DDP's wrapper; under FSDP with the units that hold
    trainable tensors (the root) gathered, so that entry points other than the root's forward
    (``generate``) read whole adapter tensors. Every process enters it together (gathering is
    collective); units of frozen weights only gather themselves in their forward, as in training.
    """
    if not is_sharded(model):
        yield accelerator.unwrap_model(model)
        return
    units = [m for m in model.modules()
             if isinstance(m, _fsdp_module_type()) and any(p.requires_grad for p in _managed_parameters(m))]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


@contextlib.contextmanager
def whole_trainable(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every sharded trainable or adapter parameter (the bank, modules_to_save: frozen ones
    too, as a continual run's earlier tasks) replaced by a plain whole copy, for saving.

    ``save_pretrained`` then writes what a single process writes. Every process enters it together
    (each copy is gathered from all shards, in the same order everywhere); on exit the shards are
    put back. FSDP's own gathered parameters are views into its communication buffers, which
    safetensors refuses to read, hence copies. Without FSDP: the model as it is.
    """
    swapped, copies = [], {}
    for path, module in model.named_modules():
        saved = "sharelora_bank" in path or "modules_to_save" in path
        for name, p in list(module._parameters.items()):
            if p is not None and (p.requires_grad or saved) and is_dtensor(p):
                if id(p) not in copies:  # one copy of a parameter two modules share
                    copies[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
                module._parameters[name] = copies[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP shard). No DTensor exists before torch.distributed.tensor is
    imported, so a single process never pays for importing it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into the whole tensor (collective: every process calls it); any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor read from a checkpoint) laid out as ``target``: this process's shard of it
    if ``target`` is a DTensor (sliced locally, no communication), else ``full`` on target's device."""
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
    return full.to(target.device, target.dtype)


def on_main(accelerator: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` run by rank 0 alone; every process returns its result, or raises its exception.

    For the steps only rank 0 may take (the output directory's lock, deleting a previous run): the
    others must not go on to a collective that rank 0, having failed, will never join.
    """
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [(True, fn())]
        except Exception as e:  # noqa: BLE001 - re-raised on every process, rank 0 included
            outcome = [(False, e)]
    broadcast_object_list(outcome, from_process=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def from_main(accelerator: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every process (one process: ``value``)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather_list(accelerator: Any, items: list) -> list:
    """Every process's ``items``, concatenated in rank order (one process: ``items``)."""
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


class Processes:
    """The run's processes as a task's evaluation sees them (``tasks.base.Processes``)."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def gather(self, items: list) -> list:
        return gather_list(self.accelerator, items)

    def from_main(self, value: Any) -> Any:
        return from_main(self.accelerator, value)
