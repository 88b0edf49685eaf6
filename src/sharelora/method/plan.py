"""The sharing plan: which modules are adapted and which A / B tensor each of them reads.

This is the one place that decides sharing. Everything else (creating the tensors, counting,
the parameter report, saving, exporting to PEFT, merging) reads a ``SharingPlan``.

Vocabulary:
    target       one adapted linear map: a module, or one output slice of a fused module
                 (GPT-2's ``c_attn`` computes [q | k | v]; target ``c_attn.q`` is its q slice).
    module type  the target's path with layer indices replaced by ``*``
                 (``bert.encoder.layer.*.attention.self.query``): what the paper shares across.
    tensor key   the name of one A or B tensor in the adapter, e.g.
                 ``bert.encoder.layer.3.attention.self.query.lora_B`` (per layer) or
                 ``bert.encoder.layer.*.attention.self.query.lora_A`` (shared by all layers).
                 That is the *local* key. In a model holding several adapters, the key a tensor
                 is stored under says who owns it: ``<adapter>/<local key>`` for an adapter's
                 own tensor (the adapter named ``default`` keeps the bare local key, as a
                 single-adapter model always has), ``@<task group>/<local key>`` for a tensor
                 that the adapters of a task group share (``task_share``).
    core         with ``task_share="AB"`` the adapters of a group read the same A and B and each
                 owns only a core per target (``<target>.lora_C``): an r x r matrix C or an
                 r-vector c, so the target's update is ``scaling * B C A`` (or ``B diag(c) A``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ShareLoraConfig
from .errors import ShareLoraError

# Leaf names of query / key / value projections across common architectures: the "qkv" scope
# shares one matrix among these (they read the same input x), never with o_proj or the MLP.
QKV_LEAVES = frozenset(
    {"query", "key", "value", "q", "k", "v", "q_proj", "k_proj", "v_proj", "q_lin", "k_lin", "v_lin",
     "wq", "wk", "wv", "to_q", "to_k", "to_v"}
)

# Projections that a block usually applies to one and the same input tensor: attention's q, k, v
# and a gated MLP's gate and up projections. Adapted siblings of one set, under one parent
# module, compute their down-projections together (see ``ShareLoraModel``); if at run time they
# turn out to read different tensors (cross-attention), each computes its own.
SAME_INPUT_LEAVES = (QKV_LEAVES, frozenset({"gate_proj", "up_proj", "w1", "w3"}))


def same_input_set(leaf: str) -> int | None:
    """Index of the set in ``SAME_INPUT_LEAVES`` holding ``leaf``, or None."""
    return next((i for i, names in enumerate(SAME_INPUT_LEAVES) if leaf in names), None)


_INDEX = re.compile(r"(?:(?<=\.)|^)\d+(?=\.|$)")


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return None
    return Conv1D


def plain_modules(model: nn.Module):
    """``named_modules()`` of the model as it was before any adapter was added.

    An injected ShareLoRA layer stands as its base layer and a modules_to_save wrapper as its
    original module (both are recognised by a marker attribute, so the plan needs no import of
    them), so a second adapter sees the same module paths as the first.
    """
    seen: set[int] = set()

    def unwrap(module: nn.Module) -> nn.Module:
        if getattr(module, "is_sharelora_layer", False):
            return module.base_layer
        if getattr(module, "is_sharelora_wrapper", False):
            return module.original_module
        return module

    def walk(module: nn.Module, prefix: str):
        module = unwrap(module)
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of an adaptable linear map, or None if the module is not one.

    ``nn.Linear`` stores W as (d_out, d_in); transformers' ``Conv1D`` (GPT-2) stores it
    transposed, (d_in, d_out).
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return None


DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"  # in ``adapter_names``: a row that runs the base model alone


def check_adapter_name(name: str) -> str:
    """Adapter names become key prefixes: non-empty, no '/' or '.', not '@...', not '__base__'."""
    if not isinstance(name, str) or not name or "/" in name or "." in name or name.startswith("@") \
            or name == BASE_ADAPTER:
        raise ShareLoraError(f"adapter name {name!r} is not allowed: use a non-empty name without '/', '.', a "
                             f"leading '@', and other than {BASE_ADAPTER!r} (which means 'no adapter')")
    return name


def storage_key(local_key: str, role: str, config: ShareLoraConfig, adapter_name: str) -> str:
    """Where a tensor of ``adapter_name`` lives: its task group's (task-shared role) or its own."""
    if role in config.task_shared_roles:
        return f"@{config.task_group}/{local_key}"
    return local_key if adapter_name == DEFAULT_ADAPTER else f"{adapter_name}/{local_key}"


@dataclass(frozen=True)
class Target:
    """One adapted linear map and the keys of the A and B it reads.

    The update is ``delta = scaling * B A x`` with A: (rank, d_in), B: (d_out, rank); for a slice
    it is added to output columns ``[out_start, out_start + d_out)`` of the module. With K router
    heads (HydraLoRA) B is (d_out, K rank), the K heads side by side, and ``r_key`` names the
    router R: (K, d_in). With a task core (``task_core``) ``c_key`` names the core, C: (rank, rank)
    or c: (rank,), and the update is ``scaling * B C A x`` (or ``B diag(c) A x``). With basis growth
    (``grow_keys``: blocks A_j (g_j, d_in), B_j (d_out, g_j)) A and B are read as [A; A_1; ...] and
    [B, B_1, ...], and C is (r + G) x (r + G), G = sum_j g_j.
    """

    name: str  # module path, plus ".<slice>" for a fused slice
    module_name: str
    slice_name: str | None
    module_type: str
    layer: int | None
    d_in: int
    d_out: int
    out_start: int
    a_key: str
    b_key: str
    r_key: str | None = None
    c_key: str | None = None
    grow_keys: tuple[tuple[str, str], ...] = ()  # (A_g, B_g) of each basis growth block it reads, in order


@dataclass
class TensorSpec:
    """One trainable tensor of the adapter and the targets that read it."""

    key: str
    role: str  # "A", "B", "R" (router) or "C" (task core)
    shape: tuple[int, ...]
    users: list[str] = field(default_factory=list)
    local_key: str = ""
    grown_by: str | None = None  # basis growth: the adapter that added this task-shared block and alone trains it

    def __post_init__(self) -> None:
        self.local_key = self.local_key or self.key

    @property
    def task_shared(self) -> bool:
        return self.key.startswith("@")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def shared(self) -> bool:
        return len(self.users) > 1


@dataclass
class SharingPlan:
    """The targets of one adapter and the tensors they read (keys are storage keys, see above)."""

    rank: int
    share: str
    scope: str
    targets: list[Target]
    tensors: dict[str, TensorSpec]
    adapter_name: str = DEFAULT_ADAPTER
    task_share: str = "none"
    task_group: str = "default"
    heads: int = 1
    task_core: str = "none"

    def own_tensors(self) -> dict[str, TensorSpec]:
        """The tensors this adapter alone owns (not its task group's)."""
        return {k: s for k, s in self.tensors.items() if not s.task_shared}

    def shared_tensors(self) -> dict[str, TensorSpec]:
        """The tensors read from the task group (shared with the other adapters of the group)."""
        return {k: s for k, s in self.tensors.items() if s.task_shared}

    def grown_tensors(self) -> dict[str, TensorSpec]:
        """The basis growth blocks this adapter added to its group (stored with the group, trained by it alone)."""
        return {k: s for k, s in self.tensors.items() if s.grown_by == self.adapter_name}

    def added_tensors(self) -> dict[str, TensorSpec]:
        """What this adapter adds to the model: its own tensors and the basis directions it grew."""
        return {**self.own_tensors(), **self.grown_tensors()}

    def basis_tensors(self) -> dict[str, TensorSpec]:
        """The group's basis as it was before any growth: the task-shared tensors every adapter of it reads."""
        return {k: s for k, s in self.tensors.items() if s.task_shared and s.grown_by is None}

    def targets_by_module(self) -> dict[str, list[Target]]:
        """Targets grouped by the module that hosts them, slices in output order."""
        out: dict[str, list[Target]] = defaultdict(list)
        for t in self.targets:
            out[t.module_name].append(t)
        for ts in out.values():
            ts.sort(key=lambda t: t.out_start)
        return dict(out)

    def num_parameters(self) -> int:
        """Trainable adapter parameters, each shared tensor counted once."""
        return sum(s.numel for s in self.tensors.values())

    def lora_equivalent(self) -> int:
        """Parameters plain LoRA would train on the same targets: r (d_in + d_out) each."""
        return sum(self.rank * (t.d_in + t.d_out) for t in self.targets)

    def groups(self) -> list[dict]:
        """One row per module type: layers, shapes, tensors and parameters, for reports."""
        rows: dict[str, dict] = {}
        for t in self.targets:
            row = rows.setdefault(
                t.module_type,
                {"module_type": t.module_type, "targets": 0, "d_in": t.d_in, "d_out": t.d_out,
                 "A_keys": set(), "B_keys": set(), "R_keys": set(), "C_keys": set(), "lora_equivalent": 0},
            )
            row["targets"] += 1
            row["A_keys"].add(t.a_key)
            row["B_keys"].add(t.b_key)
            for ga, gb in t.grow_keys:  # basis growth blocks count with the A's and B's they extend
                row["A_keys"].add(ga)
                row["B_keys"].add(gb)
            if t.r_key is not None:
                row["R_keys"].add(t.r_key)
            if t.c_key is not None:
                row["C_keys"].add(t.c_key)
            row["lora_equivalent"] += self.rank * (t.d_in + t.d_out)
        out = []
        counted: set[str] = set()
        for row in rows.values():
            keys = row.pop("A_keys") | row.pop("B_keys") | row.pop("R_keys") | row.pop("C_keys")
            row["A_tensors"] = sum(1 for k in keys if self.tensors[k].role == "A")
            row["B_tensors"] = sum(1 for k in keys if self.tensors[k].role == "B")
            row["C_tensors"] = sum(1 for k in keys if self.tensors[k].role == "C")
            # A tensor shared across module types (scope "qkv") is counted in the first row only.
            row["parameters"] = sum(self.tensors[k].numel for k in keys if k not in counted)
            counted |= keys
            out.append(row)
        return out


def _layer_index(path: str) -> int | None:
    m = _INDEX.search(path)
    return int(m.group()) if m else None


def _module_type(path: str) -> str:
    return _INDEX.sub("*", path)


def _matches_name(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _excluded_for_all_linear(model: nn.Module, config: ShareLoraConfig) -> set[str]:
    """Modules "all-linear" leaves alone: the output head (as PEFT does) and modules_to_save."""
    excluded: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    out_emb = getattr(out_emb, "original_module", out_emb)
    for name, module in plain_modules(model):
        if out_emb is not None and module is out_emb:
            excluded.add(name)
        if any(_matches_name(name, m) for m in config.modules_to_save):
            excluded.add(name)
            excluded.update(f"{name}.{sub}" for sub, _ in plain_modules(module) if sub)
    return excluded


def _find_targets(model: nn.Module, config: ShareLoraConfig) -> list[tuple[str, str | None, tuple[int, int]]]:
    """(module path, slice name or None, (d_in, d_out) of the module) for every target."""
    linears = {name: shape for name, module in plain_modules(model) if (shape := linear_shape(module))}
    found: list[tuple[str, str | None, tuple[int, int]]] = []
    tm = config.target_modules
    if isinstance(tm, str) and tm == "all-linear":
        excluded = _excluded_for_all_linear(model, config)
        found = [(n, None, s) for n, s in linears.items() if n not in excluded]
    elif isinstance(tm, str):
        try:
            pattern = re.compile(tm)
        except re.error as e:
            raise ShareLoraError(f"target_modules regex {tm!r} does not compile: {e}") from e
        found = [(n, None, s) for n, s in linears.items() if pattern.fullmatch(n)]
    else:
        used: set[str] = set()
        for n, s in linears.items():
            leaf = n.rsplit(".", 1)[-1]
            slices = config.fused_modules.get(leaf, [])
            whole = [t for t in tm if _matches_name(n, t)]
            parts = [sl for sl in slices if any(_matches_name(f"{n}.{sl}", t) for t in tm)]
            used.update(whole)
            used.update(t for t in tm for sl in parts if _matches_name(f"{n}.{sl}", t))
            if whole and parts:
                raise ShareLoraError(
                    f"module {n!r} is targeted both whole and by slices {parts}; target either {leaf!r} "
                    f"or its slices {[f'{leaf}.{sl}' for sl in slices]}"
                )
            if whole:
                found.append((n, None, s))
            for sl in parts:
                found.append((n, sl, s))
        unused = [t for t in tm if t not in used]
        if unused and found:
            raise ShareLoraError(f"target_modules {unused} matched no linear module; {_adaptable_hint(linears)}")
    if not found:
        raise ShareLoraError(f"target_modules {tm!r} matched no linear module; {_adaptable_hint(linears)}")
    return found


def _adaptable_hint(linears: dict[str, tuple[int, int]]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if not leaves:
        return "the model has no nn.Linear or Conv1D modules"
    return f"modules that look adaptable: {', '.join(leaves)}"


def _qkv_group(module_type: str, leaf: str, qkv_siblings: dict[str, set[str]]) -> str:
    parent = module_type.rsplit(".", 1)[0]
    names = ",".join(sorted(qkv_siblings[parent]))
    return f"{parent}.{{{names}}}"


def build_plan(model: nn.Module, config: ShareLoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> SharingPlan:
    """Decide the targets of ``config`` in ``model`` and the tensor each target reads.

    Shared tensors are keyed by (group, block, shape): a group is a module type (scope
    "layers") or the q/k/v projections of a block (scope "qkv"). Under scope "layers" a type
    whose layers differ in shape gets one shared tensor per shape; under scope "qkv" the user
    asked for one matrix across different projections, so shapes that disagree are an error.
    Keys are storage keys of ``adapter_name`` (``storage_key``): a task-shared role reads the
    task group's tensor, which ``check_task_group`` verifies the group's adapters agree on.
    """
    check_adapter_name(adapter_name)
    raw = _find_targets(model, config)
    entries = []
    for module_name, slice_name, (d_in, d_out) in raw:
        out_start = 0
        if slice_name is not None:
            slices = config.fused_modules[module_name.rsplit(".", 1)[-1]]
            if d_out % len(slices):
                raise ShareLoraError(
                    f"fused module {module_name!r} has d_out={d_out}, not divisible into slices {slices}"
                )
            d_out //= len(slices)
            out_start = slices.index(slice_name) * d_out
        name = module_name if slice_name is None else f"{module_name}.{slice_name}"
        layer = _layer_index(module_name)
        if config.layers_to_transform is not None and layer not in config.layers_to_transform:
            continue
        entries.append((name, module_name, slice_name, _module_type(name), layer, d_in, d_out, out_start))
    if not entries:
        raise ShareLoraError(
            f"layers_to_transform={config.layers_to_transform} left no target; layers found: "
            f"{sorted({_layer_index(m) for m, _, _ in raw} - {None})}"
        )
    if config.layers_to_transform is not None:
        found = {_layer_index(m) for m, _, _ in raw} - {None}
        absent = sorted(set(config.layers_to_transform) - found)
        if absent:
            raise ShareLoraError(f"layers_to_transform={config.layers_to_transform} names layers {absent} that no "
                                 f"target has; layers found: {sorted(found)}")

    qkv_siblings: dict[str, set[str]] = defaultdict(set)
    if config.scope == "qkv":
        for _, _, _, mtype, _, _, _, _ in entries:
            leaf = mtype.rsplit(".", 1)[-1]
            if leaf in QKV_LEAVES:
                qkv_siblings[mtype.rsplit(".", 1)[0]].add(leaf)
        if not qkv_siblings:
            raise ShareLoraError(
                f"scope='qkv' shares across query/key/value projections but no target is one "
                f"(known names: {sorted(QKV_LEAVES)}); use scope='layers' or target e.g. q_proj, k_proj, v_proj"
            )

    k = config.share_block_size
    shared_roles = set() if config.share == "none" else set(config.share)
    # basis growth (task cores): the earlier adapters' blocks it reads, then its own
    growth = [(n, g) for n, g in (config.basis_growth or [])] + (
        [(adapter_name, config.grow_basis)] if config.grow_basis else [])
    tensors: dict[str, TensorSpec] = {}
    targets: list[Target] = []
    shared_shapes: dict[tuple[str, str], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))

    for name, module_name, slice_name, mtype, layer, d_in, d_out, out_start in entries:
        leaf = mtype.rsplit(".", 1)[-1]
        in_qkv = config.scope == "qkv" and leaf in QKV_LEAVES
        group = _qkv_group(mtype, leaf, qkv_siblings) if in_qkv else mtype
        if k is not None:
            if layer is None:
                raise ShareLoraError(f"share_block_size needs a layer index in module paths; {name!r} has none")
            lo = layer - layer % k
            group = group.replace("*", f"{lo}-{lo + k - 1}", 1)
        keys = {}
        b_shape = (d_out, config.heads * config.rank)
        for role, dim, shape in (("A", d_in, (config.rank, d_in)), ("B", d_out, b_shape)):
            if role in shared_roles:
                dims = shared_shapes[(group, role)]
                dims[dim].append(f"{name} {d_in}->{d_out}")
                key = f"{group}.lora_{role}"
                if dim != next(iter(dims)):
                    if in_qkv:
                        listing = "; ".join(
                            f"dim {d}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for d, v in dims.items()
                        )
                        raise ShareLoraError(
                            f"cannot share {role} across {group}: its modules disagree in "
                            f"{'d_in' if role == 'A' else 'd_out'} ({listing}). Use share='A' "
                            f"(A needs equal d_in), scope='layers', or target projections of equal shape"
                        )
                    key = f"{group}@{dim}.lora_{role}"
            else:
                key = f"{name}.lora_{role}"
            stored = storage_key(key, role, config, adapter_name)
            spec = tensors.setdefault(stored, TensorSpec(key=stored, role=role, shape=shape, local_key=key))
            spec.users.append(name)
            keys[role] = stored
        grow: list[tuple[str, str]] = []
        for owner, g in growth:  # each block: g more rows of every A, g more columns of every B, keyed by its owner
            pair = []
            for role, base_key, shape in (("A", keys["A"], (g, d_in)), ("B", keys["B"], (d_out, g))):
                local = tensors[base_key].local_key
                local = f"{local[: -len('.lora_' + role)]}.grow_{owner}.lora_{role}"
                stored = storage_key(local, role, config, adapter_name)
                spec = tensors.setdefault(stored, TensorSpec(key=stored, role=role, shape=shape, local_key=local,
                                                             grown_by=owner))
                spec.users.append(name)
                pair.append(stored)
            grow.append((pair[0], pair[1]))
        r_key = c_key = None
        if config.router:  # HydraLoRA: one router per target, always the adapter's own
            r_key = storage_key(f"{name}.lora_router", "R", config, adapter_name)
            tensors[r_key] = TensorSpec(key=r_key, role="R", shape=(config.heads, d_in), users=[name],
                                        local_key=f"{name}.lora_router")
        if config.task_core != "none":  # the task's own core between the group's A and B, one per target
            c_key = storage_key(f"{name}.lora_C", "C", config, adapter_name)
            width = config.rank + sum(g for _, g in growth)
            shape = (width, width) if config.task_core == "matrix" else (width,)
            tensors[c_key] = TensorSpec(key=c_key, role="C", shape=shape, users=[name], local_key=f"{name}.lora_C")
        targets.append(Target(name, module_name, slice_name, mtype, layer, d_in, d_out, out_start,
                              keys["A"], keys["B"], r_key, c_key, tuple(grow)))
    return SharingPlan(rank=config.rank, share=config.share, scope=config.scope, targets=targets, tensors=tensors,
                       adapter_name=adapter_name, task_share=config.task_share, task_group=config.task_group,
                       heads=config.heads, task_core=config.task_core)


# Fields whose values decide the shape and meaning of a task-shared tensor: adapters that share one
# must agree on them (alpha, dropout and modules_to_save may differ per task).
_GROUP_FIELDS = ("task_share", "task_core", "rank", "share", "scope", "share_block_size", "layers_to_transform",
                 "fused_modules", "adapter_dtype")


def check_task_group(name: str, config: ShareLoraConfig, plan: SharingPlan,
                     others: dict[str, tuple[ShareLoraConfig, SharingPlan]]) -> None:
    """Refuse an adapter whose task-shared tensors disagree with those of its group's adapters.

    The group's adapters agree with each other (each was checked on joining), so comparing with
    one of them is comparing with all: adding the N-th adapter costs the same as adding the second.
    """
    if config.task_share == "none":
        return
    for other, (ocfg, oplan) in others.items():
        if ocfg.task_share == "none" or ocfg.task_group != config.task_group:
            continue
        fields = _GROUP_FIELDS + (("heads",) if "B" in config.task_shared_roles else ())
        for f in fields:
            if getattr(ocfg, f) != getattr(config, f):
                raise ShareLoraError(
                    f"adapter {name!r} cannot join task group {config.task_group!r}: its {f}="
                    f"{getattr(config, f)!r} differs from adapter {other!r}'s {f}={getattr(ocfg, f)!r}; "
                    f"adapters that share tensors across tasks need the same {f} (or use another task_group)"
                )
        mine, theirs = plan.basis_tensors(), oplan.basis_tensors()  # growth blocks differ by design
        if set(mine) != set(theirs):
            extra = sorted(set(mine) - set(theirs))[:2]
            lacking = sorted(set(theirs) - set(mine))[:2]
            raise ShareLoraError(
                f"adapter {name!r} cannot join task group {config.task_group!r}: its target_modules give other "
                f"shared tensors than adapter {other!r}'s (only {name!r}: {extra}; only {other!r}: {lacking}); "
                "adapters that share tensors across tasks need the same targets"
            )
        for k, spec in mine.items():
            if spec.shape != theirs[k].shape:
                raise ShareLoraError(
                    f"adapter {name!r} cannot join task group {config.task_group!r}: shared tensor {k} has shape "
                    f"{spec.shape} for {name!r} but {theirs[k].shape} for adapter {other!r}"
                )
        return


def init_tensor(spec: TensorSpec, init_lora_weights: bool, dtype: torch.dtype, device,
                task_core: str = "none", basis_init: str = "lora", trains_basis: bool = False) -> torch.Tensor:
    """LoRA's initialisation: A ~ Kaiming-uniform(a=sqrt(5)) (as nn.Linear), B = 0, so B A = 0.

    A router (HydraLoRA) is Kaiming-uniform too: random routing breaks the symmetry between heads
    that all start at B_k = 0 (uniform weights would give every head the same gradient forever).

    With a task core (``task_core`` "matrix" / "diagonal"; the update is s B C A x) and
    ``basis_init="lora"`` (default) the basis is LoRA's (A random, B = 0) and the core C is the
    identity I_r (diagonal: ones) for an adapter that trains the untrained basis
    (``trains_basis``: the one whose add_adapter creates it), else 0. B = 0 makes every adapter
    the base model at start; with C = I the basis-training adapter is exactly the ShareLoRA
    adapter B A (dL/dB = s g (A x)^T, dL/dA = s B^T g x^T: LoRA's gradients), and a zero core on
    the trained basis gets dL/dC = s B^T g (A x)^T. ``basis_init="random"``: B Kaiming-uniform
    like A (as VeRA's frozen A and B) and every core 0 (B = 0 and C = 0 together would give no
    gradient to anything). ``init_lora_weights=False`` (tests only) makes every tensor random.
    """
    t = torch.empty(spec.shape, dtype=torch.float32, device=device)
    random_basis = task_core != "none" and basis_init == "random"
    if spec.role == "C" and init_lora_weights:
        if trains_basis and basis_init == "lora":
            identity_core(t)
        else:
            nn.init.zeros_(t)
    elif spec.role in ("A", "R") or not init_lora_weights or (spec.role == "B" and random_basis):
        nn.init.kaiming_uniform_(t.view(1, -1) if t.dim() == 1 else t, a=5**0.5)
    else:
        nn.init.zeros_(t)
    return t.to(dtype)


@torch.no_grad()
def identity_core(core: torch.Tensor) -> torch.Tensor:
    """Set a task core to the identity in place: I_r for an (r, r) matrix core, ones for an (r,) diagonal one."""
    if core.dim() == 1:
        return core.fill_(1.0)
    core.zero_()
    core.diagonal().fill_(1.0)
    return core
