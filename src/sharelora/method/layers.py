"""ShareLoraLayer: a frozen linear map plus a low-rank update whose A and B may be shared."""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel
from .plan import Target, _conv1d_class, linear_shape
from .quantized import quantization_of, to_float_linear


def bank_name(key: str) -> str:
    """Name of a tensor key inside an ``nn.ParameterDict`` (parameter names cannot contain '.')."""
    return key.replace(".", "/")


# --- the fused kernel -------------------------------------------------------------------------------
# On CPU the adapter's arithmetic is tiny, but every pass over an activation-sized (N, d) tensor
# costs about as much as one of its small matmuls (they are memory bound too). Written as
# separate autograd ops, LoRA with dropout makes ~20 such passes per module, and torch's
# dropout alone draws one random number per element (bernoulli_, ~7 ns each, single threaded,
# ~7 ms for a 2048 x 384 input). The functions below make ~10 (docs/BENCHMARKS.md has the profile):
#   * dropout's mask is drawn cheaply (``_draw_mask``, below) and backward reuses it;
#   * 1/(1-p) and alpha/r scale the small (N, r) product u, not an (N, d) tensor;
#   * B's product is accumulated into the base layer's output (addmm_), and in backward the base
#     layer's x-gradient is accumulated into the adapter's (addmm_), so neither the update nor the
#     adapter's share of x's gradient exists as a separate tensor that autograd must add.
#
# Three ways to draw the mask, all from torch's default generator (so torch.manual_seed and the RNG
# state that gradient checkpointing restores reproduce it), the first that serves:
#   * "kernel" (CPU, float32, when the compiled kernel could be built: ``cpu_kernel``): one 64-bit
#     seed; each element's keep bit is a hash of its index and the seed, computed and applied in
#     one parallel pass, recomputed in backward (nothing saved for the mask).
#   * "positions" (CPU, p <= 0.25): draw M ~ Poisson(lambda) with lambda = -n ln(1 - p), then M
#     uniform positions in [0, n), and drop every position drawn at least once. By Poissonisation
#     each element is hit a Poisson(lambda / n) number of times, independently of the others, so
#     it is dropped independently with probability 1 - exp(-lambda / n) = p. That is ~0.1 n draws
#     instead of n. With one torch thread the dropped input is a copy of x with those positions
#     zeroed (index_fill_) and backward zeroes them in x's gradient: no (N, d) mask is made or
#     saved. With more threads the positions are zeroed in a 1-byte keep mask instead (n bytes,
#     one core's cache holds them), which forward and backward multiply by as a float mask on every
#     thread: scattered writes into an (N, d) tensor that several cores just wrote each fetch a
#     line from another core (0.2 ms a block slower with two threads; docs/BENCHMARKS.md). Same
#     draws, same mask. (torch.randint maps a 32-bit draw to [0, n) by modulo, so each position's
#     hit rate is uniform to within n / 2^32, i.e. p to within ~1e-5 for activations of a few 100k
#     elements.)
#   * "bits" (CUDA, or larger p): 16 random bits per element (one 64-bit draw serves four), made a
#     0/1 float mask by two vectorised kernels; the keep probability is (65536 - round(65536 p)) /
#     65536 (p = 0.1 -> 0.1000061) and 1/(1-p) uses that same value, so E[dropout(x)] = x exactly.
_BITS = 16
_POSITIONS_MAX_P = 0.25


def _drop_threshold(p: float) -> tuple[int, float]:
    """(threshold on a signed 16-bit draw, keep probability): keep iff draw >= threshold."""
    dropped = round(p * (1 << _BITS))
    return -(1 << (_BITS - 1)) + dropped, 1.0 - dropped / (1 << _BITS)


def _random_int16(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform signed 16-bit integers of ``shape`` from torch's default generator (4 per 64-bit draw)."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # the full 64-bit range
    return words.view(torch.int16)[:n].view(shape)


def _keep(bits: torch.Tensor, threshold: int, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 keep mask of ``bits`` as a ``dtype`` tensor.

    Cast, then compare in place: both are vectorised kernels, whereas comparing into a bool
    tensor and converting bool to float is a slow scalar loop (~5x slower on this CPU).
    """
    return bits.to(dtype).ge_(threshold)


def _uses_positions(p: float, device: torch.device) -> bool:
    return device.type == "cpu" and p <= _POSITIONS_MAX_P


@functools.lru_cache(maxsize=64)
def _poisson_rate(n: int, p: float) -> torch.Tensor:
    """lambda = -n ln(1 - p) as the tensor torch.poisson takes (read only; cached per input size)."""
    return torch.tensor(-n * math.log1p(-p), dtype=torch.float64)


def _drop_positions(n: int, p: float) -> torch.Tensor:
    """Flat positions to drop (with repeats) so that each of ``n`` elements is dropped w.p. ``p``."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.randint(n, (int(torch.poisson(_poisson_rate(n, p))),))


def _draw_mask(shape: torch.Size, p: float, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor | cpu_kernel.KernelMask, float]:
    """(mask, keep probability). The mask is one of four forms of a 0/1 keep mask:

    a ``cpu_kernel.KernelMask`` (its seed), int64 flat positions to drop (CPU, p <= 0.25, one torch
    thread), the uint8 keep mask of those positions (the same, more threads), or a ``dtype`` keep
    mask (bits).
    """
    if cpu_kernel.serves(shape.numel(), device, dtype):
        mask = cpu_kernel.draw(p)
        return mask, mask.keep_prob
    if _uses_positions(p, device):
        positions = _drop_positions(shape.numel(), p)
        if torch.get_num_threads() == 1:
            return positions, 1.0 - p
        return torch.ones(shape.numel(), dtype=torch.uint8).index_fill_(0, positions, 0).view(shape), 1.0 - p
    threshold, keep_prob = _drop_threshold(p)
    return _keep(_random_int16(shape, device), threshold, dtype), keep_prob


def _apply_mask(x: torch.Tensor, mask: torch.Tensor | cpu_kernel.KernelMask) -> torch.Tensor:
    """x with the mask's dropped elements zeroed, as a new contiguous tensor."""
    if isinstance(mask, cpu_kernel.KernelMask):
        return cpu_kernel.apply(x, mask)
    if mask.dtype == torch.int64:
        return _apply_mask_(x.clone(memory_format=torch.contiguous_format), mask)
    return _float_mask(mask, x.dtype) * x


def _apply_mask_(t: torch.Tensor, mask: torch.Tensor | cpu_kernel.KernelMask) -> torch.Tensor:
    """Zero ``t``'s dropped elements in place (``t`` contiguous, the shape the mask was drawn for)."""
    if isinstance(mask, cpu_kernel.KernelMask):
        cpu_kernel.apply(t, mask, out=t)
    elif mask.dtype == torch.int64:
        t.view(-1).index_fill_(0, mask, 0.0)
    else:
        t.mul_(_float_mask(mask, t.dtype))
    return t


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A float x uint8 product is a slow scalar loop with one thread: convert first (vectorised).
    return mask if mask.dtype == dtype else mask.to(dtype)


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """The 0/1 keep mask the fused kernel draws next for an input of ``shape``, and its keep probability.

    Consumes the same random numbers as the kernel, so after the same ``torch.manual_seed`` it is the
    kernel's mask: tests compare the kernel with plain ops on it.
    """
    device = torch.device(device)
    mask, keep_prob = _draw_mask(torch.Size(shape), p, device, dtype)
    return _apply_mask(torch.ones(shape, dtype=dtype, device=device), mask), keep_prob


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _base_forward(x2: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x W^T + b for nn.Linear (W: d_out x d_in) or x W + b for Conv1D (W: d_in x d_out), as they do."""
    Wt = W if transposed else W.t()
    return torch.addmm(bias, x2, Wt) if bias is not None else torch.mm(x2, Wt)


def _weight_grad(grad_out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """grad_out^T u, (d_out, r), computed as (u^T grad_out)^T: on CPU the (r, N) x (N, d_out) product
    is 2-4x faster than the (d_out, N) x (N, r) one. Both small operands are made contiguous: a
    transposed gradient costs autograd more than the copy (docs/BENCHMARKS.md)."""
    return torch.mm(u.t().contiguous(), grad_out).t().contiguous()


class _LoraLinear(torch.autograd.Function):
    """(h, u) with u = c * (x ⊙ keep) A^T and h = base(x) + u[:, cols] B^T; c = scaling / P(keep).

    x: (N, d_in), A: (k r, d_in), B: (d_out, r) -> h: (N, d_out), u: (N, k r). A may stack the
    A's of k sibling modules that read the same x (cols = start, the r columns of u that belong to
    this module); u is returned so that the siblings can reuse it (``_LinearPlusLowRank``), and
    their gradients of u arrive here and are added to this module's own. The base weights are
    frozen.
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scaling, p, transposed, start=0):
        out = _base_forward(x, W, bias, transposed)
        if p > 0.0:
            keep, keep_prob = _draw_mask(x.shape, p, x.device, x.dtype)
            dropped = _apply_mask(x, keep)
        else:
            keep_prob, keep, dropped = 1.0, None, x
        c = scaling / keep_prob
        u = torch.mm(dropped, A.t()).mul_(c)
        cols = slice(start, start + B.shape[1])
        out.addmm_(u[:, cols] if u.shape[1] != B.shape[1] else u, B.t())
        kernel_mask = isinstance(keep, cpu_kernel.KernelMask)
        ctx.save_for_backward(dropped, None if kernel_mask else keep, u, W, A, B)
        ctx.kernel_mask = keep if kernel_mask else None
        ctx.c, ctx.transposed, ctx.cols = c, transposed, cols
        ctx.set_materialize_grads(False)
        return out, u

    @staticmethod
    def backward(ctx, grad_out, grad_u):
        dropped, keep, u, W, A, B = ctx.saved_tensors
        keep = ctx.kernel_mask or keep
        grad_x = grad_A = grad_B = None
        own = u.shape[1] == B.shape[1]  # u holds only this module's columns
        u_own = u if own else u[:, ctx.cols]
        if grad_out is not None and own:  # dL/du
            g_u = torch.mm(grad_out, B)
            if grad_u is not None:
                g_u += grad_u
        else:  # the siblings' gradient of u, plus this module's in its columns
            g_u = grad_u.clone() if grad_u is not None else torch.zeros_like(u)
            if grad_out is not None:
                g_u[:, ctx.cols].addmm_(grad_out, B)
        if grad_out is not None and ctx.needs_input_grad[4]:
            grad_B = _weight_grad(grad_out, u_own)
        g_u *= ctx.c  # now the gradient of (x ⊙ keep) A^T: scale the (N, r) tensor, not an (N, d) one
        if ctx.needs_input_grad[3]:
            grad_A = torch.mm(g_u.t(), dropped)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g_u, A)
            if keep is not None:
                _apply_mask_(grad_x, keep)
            if grad_out is not None:  # the base layer's share, accumulated in place
                grad_x.addmm_(grad_out, W if not ctx.transposed else W.t())
        return grad_x, None, None, grad_A, grad_B, None, None, None, None


class _LinearPlusLowRank(torch.autograd.Function):
    """h = base(x) + u B^T for a module whose u another module computed (shared A, same x)."""

    @staticmethod
    def forward(ctx, x, W, bias, u, B, transposed):
        out = _base_forward(x, W, bias, transposed)
        out.addmm_(u, B.t())
        ctx.save_for_backward(u, W, B)
        ctx.transposed = transposed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, W, B = ctx.saved_tensors
        grad_x = grad_u = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_out, W if not ctx.transposed else W.t())
        if ctx.needs_input_grad[3]:
            grad_u = torch.mm(grad_out, B)
        if ctx.needs_input_grad[4]:
            grad_B = _weight_grad(grad_out, u)
        return grad_x, None, None, grad_u, grad_B, None


class SharedDownProjection:
    """Lets sibling modules that read the same input compute their down-projections once.

    The q, k and v projections of an attention block (or gate and up of a gated MLP) read the same
    x. The first of them to run computes ``u = dropout(x) [A_1; ...; A_k]^T`` for the distinct A's
    of the group (one dropout mask, one pass over x; under scope "qkv" there is a single A), the
    others take their r columns of it, and autograd sums A's and x's gradients over them. A module
    whose input is another tensor (cross-attention's k and v) finds no entry for it and computes
    its own. The entry lives only during one forward of the block that calls them (``clear`` runs
    before and after it), so gradient checkpointing recomputes it exactly like the first forward
    did, and a reused input tensor never sees a stale product from an earlier step.

    Args:
        a_keys: the bank names of the group's distinct A's, in the order of u's column blocks.
        bank: the model's ParameterDict holding them.
        live: a list shared by the down-projections of one parent module: each that holds a product
            adds itself, and the parent's hooks clear just those (``clear_live``), so a forward costs
            the same whether the model holds one adapter or a thousand.
    """

    def __init__(self, a_keys: tuple[str, ...] = (), bank: nn.ParameterDict | None = None,
                 live: list | None = None):
        self.a_keys = tuple(a_keys)
        self._bank = [bank]
        self._live = live
        self.clear()

    def columns(self, a_key: str, rank: int) -> slice:
        """The columns of u that hold ``dropout(x) A^T`` for the A named ``a_key``."""
        start = self.a_keys.index(a_key) * rank
        return slice(start, start + rank)

    def down_weight(self) -> torch.Tensor:
        """[A_1; ...; A_k]: (k r, d_in)."""
        bank = self._bank[0]
        if len(self.a_keys) == 1:
            return bank[self.a_keys[0]]
        return torch.cat([bank[k] for k in self.a_keys])

    def clear(self, *_args) -> None:
        self.x = self.u = None
        self.mode = None

    def lookup(self, x: torch.Tensor, mode: tuple) -> torch.Tensor | None:
        return self.u if self.x is x and self.mode == mode else None

    def store(self, x: torch.Tensor, mode: tuple, u: torch.Tensor) -> None:
        """Keep u, (N, k r) with N = x.numel() // d_in, for the siblings that read the same x."""
        if self._live is not None and self.x is None:
            self._live.append(self)
        self.x, self.mode, self.u = x, mode, u


def clear_live(live: list, *_args) -> None:
    """Clear the down-projections in ``live`` (those holding a product) and empty it (a parent's forward hook)."""
    for s in live:
        s.clear()
    live.clear()


class AdapterSlot:
    """One adapter's part of a ``ShareLoraLayer``: its targets, tensor names, scaling and dropout.

    Args:
        targets: the plan's targets of this adapter hosted by the module: one covering all
            outputs, or one per adapted slice of a fused module.
        scaling: alpha / r. dropout: dropout probability on the adapter input.
        heads, top_k: K router heads (HydraLoRA; 1 = plain) and the router's top-k (None: all).
    """

    def __init__(self, targets: list[Target], scaling: float, dropout: float, heads: int = 1,
                 top_k: int | None = None, d_out_total: int | None = None):
        self.targets = tuple(targets)
        self.keys = tuple((bank_name(t.a_key), bank_name(t.b_key)) for t in targets)
        # Task cores (task_share="AB"): each target's own C (r x r) or c (r,) between the group's A and B.
        self.c_keys = tuple(bank_name(t.c_key) if t.c_key else None for t in targets)
        self.cored = targets[0].c_key is not None
        self.r_keys = tuple(bank_name(t.r_key) if t.r_key else None for t in targets)
        self.whole = len(targets) == 1 and targets[0].slice_name is None
        self.scaling = scaling
        self.p = float(dropout)
        self.heads = heads
        self.top_k = top_k
        # Set by ShareLoraModel for sibling modules that read the same x (see SharedDownProjection).
        self.shared_down: SharedDownProjection | None = None
        # "module": no shared product (so no shared dropout mask) while dropout is active.
        self.dropout_mask = "input"
        # Distinct A keys in order; each slice reads the u columns of its A.
        self.a_keys = tuple(dict.fromkeys(a for a, _ in self.keys))
        self.d_out_total = d_out_total
        # Basis growth (task cores): the blocks each A and B is extended by, [A; A_1; ...] and [B, B_1, ...].
        self.grow_a = {a: tuple(bank_name(ga) for ga, _ in t.grow_keys) for (a, _), t in zip(self.keys, targets)}
        self.grow_b = {b: tuple(bank_name(gb) for _, gb in t.grow_keys) for (_, b), t in zip(self.keys, targets)}
        self.grown = any(t.grow_keys for t in targets)
        # What identifies the basis this adapter reads: adapters with equal ids compute x A^T alike.
        self.basis_id = (self.a_keys, tuple(v for a in self.a_keys for v in self.grow_a[a]))

    def A(self, bank: nn.ParameterDict, a_key: str) -> torch.Tensor:
        """The A named ``a_key`` with its growth blocks stacked below it: (r + G, d_in)."""
        grow = self.grow_a[a_key]
        return torch.cat([bank[a_key]] + [bank[g] for g in grow]) if grow else bank[a_key]

    def B(self, bank: nn.ParameterDict, i: int) -> torch.Tensor:
        """Target i's B with its growth blocks beside it: (d_out, r + G)."""
        b_key = self.keys[i][1]
        grow = self.grow_b[b_key]
        return torch.cat([bank[b_key]] + [bank[g] for g in grow], dim=1) if grow else bank[b_key]

    def up(self, bank: nn.ParameterDict, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The up-projection of target i, (d_out, r): B, or B C with a task core (B diag(c) for a vector c);
        with basis growth [B, B_1, ...] C, (d_out, r + G).

        B C is a (d_out, r) x (r, r) product, tiny next to any product with the input, and autograd
        carries its gradient to both B and C; in ``dtype`` if given (merging computes in float32).
        """
        B = self.B(bank, i)
        B = B if dtype is None else B.to(dtype)
        if self.c_keys[i] is None:
            return B
        C = bank[self.c_keys[i]]
        C = C if dtype is None else C.to(dtype)
        return B @ C if C.dim() == 2 else B * C

    def basis(self, bank: nn.ParameterDict) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, ...]]:
        """(A, B, cols) without the cores: what every adapter of a task group reads alike.

        A (k r, d_in) stacks the distinct A's; B (d_out, S r) holds target s's B in its output rows
        and column block s; ``cols[s]`` are the columns of ``u = x A^T`` that target s reads. The
        update of one row is then ``[u_{cols[0]} C_0^T, ..., u_{cols[S-1]} C_{S-1}^T] B^T``.
        """
        As = [self.A(bank, a) for a in self.a_keys]
        r = As[0].shape[0]
        A = torch.cat(As) if len(As) > 1 else As[0]
        cols = tuple(slice(self.a_keys.index(a) * r, (self.a_keys.index(a) + 1) * r) for a, _ in self.keys)
        if self.whole:
            return A, self.B(bank, 0), cols
        blocks = []
        for i, t in enumerate(self.targets):
            B = self.B(bank, i)
            blocks.append(F.pad(B, (0, 0, t.out_start, self.d_out_total - t.out_start - B.shape[0])))
        return A, torch.cat(blocks, dim=1), cols

    def down_and_up(self, bank: nn.ParameterDict) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the whole module: A (k r, d_in) stacks the distinct A's; B (d_out, k r).

        With task cores B is each target's B C: the adapter as the plain LoRA it computes.
        """
        if self.whole:
            return self.A(bank, self.keys[0][0]), self.up(bank, 0)
        As = [self.A(bank, a) for a in self.a_keys]
        r = As[0].shape[0]
        A = torch.cat(As) if len(As) > 1 else As[0]
        cols = []
        for i, (t, (a_key, _)) in enumerate(zip(self.targets, self.keys)):
            cols.append((self.a_keys.index(a_key), t.out_start, self.up(bank, i)))
        # B's block layout: slice t fills rows [out_start, out_start + d_out) of its A's r columns.
        blocks = []
        for i in range(len(self.a_keys)):
            col = None
            for j, start, B in cols:
                if j == i:
                    piece = F.pad(B, (0, 0, start, self.d_out_total - start - B.shape[0]))
                    col = piece if col is None else col + piece
            blocks.append(col if col is not None else A.new_zeros(self.d_out_total, r))
        return A, torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]


class _CoreGroup:
    """Task-core adapters of one basis in one layer: their names, alpha / r each, and per target an
    ``itemgetter`` that reads their cores from the bank's dict in one C call (a tuple, in names' order)."""

    def __init__(self, names: tuple[str, ...], slots: list[AdapterSlot]):
        self.names = names
        self.first = slots[0]
        self.scalings = tuple(s.scaling for s in slots)
        self.cores = []
        for i in range(len(self.first.targets)):
            keys = [s.c_keys[i] for s in slots]
            get = operator.itemgetter(*keys)
            self.cores.append(get if len(keys) > 1 else (lambda d, get=get: (get(d),)))


class ShareLoraLayer(nn.Module):
    """``h = W0 x + (alpha / r) * B A dropout(x)`` for one module, with A and B read by key.

    Args:
        base_layer: the frozen ``nn.Linear`` (W0: d_out x d_in) or GPT-2 ``Conv1D``
            (W0 stored as d_in x d_out), or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``
            (a quantized W0, see ``quantized.py``: the base computes from it, the adapter adds
            its update in its own dtype; merging needs ``dequantize_base`` first).
        targets: the plan's targets hosted by this module: one covering all outputs, or one per
            adapted slice of a fused module (``c_attn.q`` adds to output columns [0, d)).
        bank: the model's ``ParameterDict`` of adapter tensors. A: (r, d_in), B: (d_out, r).
            Shared tensors live there once; the layer only looks them up, so a parameter
            listing, an optimizer and a checkpoint see each shared tensor once, and autograd
            sums its gradient over every layer that reads it.
        scaling: alpha / r.
        dropout: dropout probability on the adapter input.
        adapter_name: the name of the adapter these targets belong to.

    The update is computed as ``u = scaling * dropout(x) A^T`` (N, r), then ``u B^T``: scaling
    and dropout's 1/(1-p) act on the small (N, r) product. Slices of a fused module share one
    dropout mask and one product ``u`` per distinct A (their A's are stacked), and their B's
    form one block matrix, so a fused module costs one pair of products whatever its slices.

    Several adapters: the layer holds one ``AdapterSlot`` per adapter that targets it
    (``add_slot``). With one active adapter and no per-row routing it runs the fused path above.
    Several active adapters add their updates. With ``adapter_names`` routing (see ``routing``),
    rows of adapters that read the same A (task-shared) compute ``dropout(x) A^T`` once for all of
    them, and the B products of all those rows are one batched product with each row's B
    (``scaling B`` gathered per row); ``"__base__"`` rows get no update. Task-core adapters
    (``task_share="AB"``) read B C A: a single adapter runs the paths above with B C as its B;
    in a mixed batch their rows share both products and only the r x r cores are per row.
    """

    is_sharelora_layer = True  # lets the plan see through an injected layer without importing it

    def __init__(self, base_layer: nn.Module, targets: list[Target], bank: nn.ParameterDict,
                 scaling: float, dropout: float, adapter_name: str = "default", heads: int = 1,
                 top_k: int | None = None, routing=None):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D keeps W as (d_in, d_out)
        # A plain list keeps the bank out of this module's parameters: the bank belongs to the
        # ShareLoraModel, which registers it once.
        self._bank = [bank]
        self._routing = [routing]
        self._d_out_total = linear_shape(base_layer)[1]  # a 4-bit weight's shape is its packed storage's
        self.slots: dict[str, AdapterSlot] = {}
        self.active: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.reuse_shared_input = True
        self._route_plans: dict[tuple, tuple] = {}  # adapter_names' set -> how this layer computes it (_route_plan)
        # The fused kernel re-implements the base layer's forward: only for these exact types.
        self._plain_base = type(base_layer) is nn.Linear or type(base_layer) is _conv1d_class()
        self.add_slot(adapter_name, targets, scaling, dropout, heads, top_k)
        self.set_active([adapter_name])

    # --- adapters -----------------------------------------------------------------------------
    def add_slot(self, adapter_name: str, targets: list[Target], scaling: float, dropout: float,
                 heads: int = 1, top_k: int | None = None) -> AdapterSlot:
        slot = AdapterSlot(targets, scaling, dropout, heads, top_k, self._d_out_total)
        if heads > 1 and not slot.whole:
            from .errors import ShareLoraError

            raise ShareLoraError(f"router heads (HydraLoRA) adapt whole modules; {targets[0].module_name!r} is "
                                 "targeted by slices: target the whole fused module instead")
        self.slots[adapter_name] = slot
        self._route_plans.clear()
        return slot

    def remove_slot(self, adapter_name: str) -> None:
        self.slots.pop(adapter_name, None)
        self._route_plans.clear()
        self.active = tuple(a for a in self.active if a != adapter_name)
        if adapter_name in self.merged_adapters:
            self.merged_adapters.remove(adapter_name)

    def set_active(self, adapter_names) -> None:
        """Activate the adapters among ``adapter_names`` that adapt this module (others: no update)."""
        self.active = tuple(a for a in adapter_names if a in self.slots)

    @property
    def _slot(self) -> AdapterSlot | None:
        """The single active slot (the fast path), or None."""
        return self.slots[self.active[0]] if len(self.active) == 1 else None

    def _view(self) -> AdapterSlot:
        """The slot a single-adapter reader means: the active one, else the first."""
        if self.active:
            return self.slots[self.active[0]]
        return next(iter(self.slots.values()))

    # Single-adapter views, as they were before a layer could hold several adapters.
    @property
    def targets(self) -> tuple[Target, ...]:
        return self._view().targets

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        return self._view().keys

    @property
    def whole(self) -> bool:
        return self._view().whole

    @property
    def scaling(self) -> float:
        return self._view().scaling

    @property
    def shared_down(self) -> SharedDownProjection | None:
        return self._view().shared_down

    @shared_down.setter
    def shared_down(self, value: SharedDownProjection | None) -> None:
        self._view().shared_down = value

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def quantized(self) -> str | None:
        """"4bit" / "8bit" when the base layer is a bitsandbytes quantized linear map, else None."""
        return quantization_of(self.base_layer)

    def dequantize_base(self, dtype: torch.dtype | None = None) -> None:
        """Replace a quantized base layer by the float ``nn.Linear`` it computes (see ``quantized.py``)."""
        if self.quantized is None:
            return
        self.base_layer = to_float_linear(self.base_layer, dtype)
        self._plain_base = True  # the fused kernel serves it from now on

    @property
    def weight(self) -> torch.Tensor:  # so code that reads module.weight keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    # --- the update -------------------------------------------------------------------------
    def _down_and_up(self, slot: AdapterSlot | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the whole module: A (k r, d_in) stacks the distinct A's; B (d_out, k r)."""
        return (slot or self._view()).down_and_up(self._bank[0])

    def _dropout_p(self, slot: AdapterSlot | None = None) -> float:
        return (slot or self._view()).p if self.training else 0.0

    def _can_fuse(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
        """Whether the fused kernel computes exactly what base_layer(x) + update would.

        It re-implements the base layer's forward, so only for a plain frozen nn.Linear / Conv1D
        (no hooks or replaced forward) with one dtype throughout, outside autocast,
        torch.compile and torch.func transforms.
        """
        base = self.base_layer
        if not self._plain_base:
            return False
        if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
            return False
        W, bias = base.weight, base.bias
        if W.requires_grad or (bias is not None and bias.requires_grad):
            return False
        if x.dtype != W.dtype or W.dtype != A.dtype or A.dtype != B.dtype:
            return False
        # autocast would cast inside the kernel; torch.compile and torch.func transforms trace the
        # plain ops (and compile fuses them by itself).
        return not (_autocast_enabled(x.device.type) or torch.compiler.is_compiling()
                    or torch._C._are_functorch_transforms_active())

    def _shared(self, slot: AdapterSlot, p: float) -> SharedDownProjection | None:
        """The group's shared down-projection, if this module may use it now."""
        if slot.shared_down is None or not self.reuse_shared_input:
            return None
        return slot.shared_down if slot.dropout_mask == "input" or p == 0.0 else None

    def _fused(self, slot: AdapterSlot, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        p = self._dropout_p(slot)
        shared = self._shared(slot, p)
        mode = (p, torch.is_grad_enabled())
        u = shared.lookup(x, mode) if shared is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        W, bias = self.base_layer.weight, self.base_layer.bias
        if u is not None:
            u = u[:, shared.columns(slot.keys[0][0], B.shape[1])]
            out = _LinearPlusLowRank.apply(x2, W, bias, u, B, self.transposed)
        elif shared is not None:
            start = shared.columns(slot.keys[0][0], B.shape[1]).start
            out, u = _LoraLinear.apply(x2, W, bias, shared.down_weight(), B, slot.scaling, p, self.transposed, start)
            shared.store(x, mode, u)
        else:
            out, _ = _LoraLinear.apply(x2, W, bias, A, B, slot.scaling, p, self.transposed, 0)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _down(self, slot: AdapterSlot, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """u = scaling * dropout(x) A^T, shape (..., r), with plain ops (computed once when shared)."""
        p = self._dropout_p(slot)
        shared = self._shared(slot, p)
        mode = (p, torch.is_grad_enabled())
        u = shared.lookup(x, mode) if shared is not None else None
        if u is None:
            down = shared.down_weight() if shared is not None else A
            dropped = F.dropout(x, p, training=True) if p > 0.0 else x
            u = F.linear(dropped if dropped.dtype == down.dtype else dropped.to(down.dtype), down) * slot.scaling
            if shared is None:
                return u
            shared.store(x, mode, u.reshape(-1, u.shape[-1]))
        else:
            u = u.view(*x.shape[:-1], u.shape[-1])
        return u[..., shared.columns(slot.keys[0][0], A.shape[0])]

    def _hydra(self, slot: AdapterSlot, x: torch.Tensor, dropped: torch.Tensor | None = None) -> torch.Tensor:
        """HydraLoRA's update ``scaling * sum_k w_k(x) B_k A dropout(x)``, w = softmax(R x) (top-k).

        B holds the K heads side by side, (d_out, K r), so the sum is one product of B with the
        (..., K r) tensor ``w_k u`` (u = dropout(x) A^T, (..., r)).
        """
        bank = self._bank[0]
        (a_key, b_key), r_key = slot.keys[0], slot.r_keys[0]
        A, B, R = bank[a_key], bank[b_key], bank[r_key]
        if dropped is None:
            p = self._dropout_p(slot)
            dropped = F.dropout(x, p, training=True) if p > 0.0 else x
        u = F.linear(dropped.to(A.dtype), A)
        weights = torch.softmax(F.linear(x.to(R.dtype), R).float(), dim=-1)
        if slot.top_k is not None and slot.top_k < slot.heads:
            top, idx = weights.topk(slot.top_k, dim=-1)
            weights = torch.zeros_like(weights).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        z = (weights.to(u.dtype).unsqueeze(-1) * u.unsqueeze(-2)).flatten(-2)  # (..., K r)
        return F.linear(z, B) * slot.scaling

    def _update(self, slot: AdapterSlot, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """One adapter's update of ``x`` with plain ops (several active adapters, unfusable inputs)."""
        if slot.heads > 1:
            return self._hydra(slot, x)
        A, B = self._down_and_up(slot)
        if cache is None:
            return F.linear(self._down(slot, x, A), B)
        key = (slot.basis_id, self._dropout_p(slot))
        if key not in cache:  # adapters that read the same A (task-shared) compute dropout(x) A^T once
            p = key[1]
            dropped = F.dropout(x, p, training=True) if p > 0.0 else x
            cache[key] = F.linear(dropped if dropped.dtype == A.dtype else dropped.to(A.dtype), A)
        return F.linear(cache[key], B) * slot.scaling

    def _routed(self, x: torch.Tensor, result: torch.Tensor, routing) -> torch.Tensor:
        """``result`` plus, for each row, the update of the adapter ``adapter_names`` gives it.

        The plain (non-Hydra) adapters of the batch are computed together when their A and B
        shapes and dropout agree (the usual case), with one row layout per call shared by every
        layer: if they all read one A (task-shared), ``u = dropout(x_rows) A^T`` is one product
        for all their rows; otherwise each row reads its adapter's A in one ``bmm``. The B
        products are one ``bmm`` with a per-row (d_out, r) matrix ``B_a``, and each row's
        ``scaling_a`` multiplies the small u. Adapters that do not fit that (other shapes or
        dropout, Hydra heads) are computed per group of rows. Task-core adapters of one group
        share A and B, so only their r x r cores are per row (``_batched_cores``).
        """
        n = x.shape[0]
        core_groups, names = self._route_plan(routing.unique)
        if not names and not core_groups:
            return result
        x3 = x.reshape(n, -1, x.shape[-1])
        out = result.reshape(n, -1, result.shape[-1])
        for group in core_groups:
            out = self._batched_cores(x3, out, routing, group)
        if not names:
            return out.view(result.shape)
        rows = routing.rows_by_adapter(n, x.device)
        plain = [a for a in names if self.slots[a].heads == 1]
        rest = [a for a in names if self.slots[a].heads > 1]
        if len(plain) > 1:
            weights = [self._down_and_up(self.slots[a]) for a in plain]
            if (len({(A.shape, B.shape, A.dtype) for A, B in weights}) > 1
                    or len({self._dropout_p(self.slots[a]) for a in plain}) > 1):
                rest, plain = names, []  # adapters that cannot be stacked: one group each below
            else:
                out = self._batched(x3, out, routing, tuple(plain), weights)
                plain = []
        for name in plain + rest:
            slot, idx = self.slots[name], rows[name]
            every_row = idx.numel() == n
            xg = x3 if every_row else x3.index_select(0, idx)
            if slot.heads > 1:
                delta = self._hydra(slot, xg)
            else:
                A, B = self._down_and_up(slot)
                p = self._dropout_p(slot)
                dropped = F.dropout(xg, p, training=True) if p > 0.0 else xg
                u = F.linear(dropped if dropped.dtype == A.dtype else dropped.to(A.dtype), A) * slot.scaling
                delta = F.linear(u, B)
            delta = delta if delta.dtype == out.dtype else delta.to(out.dtype)
            out = out + delta if every_row else out.index_add(0, idx, delta)
        return out.view(result.shape)

    def _batched(self, x3: torch.Tensor, out: torch.Tensor, routing, names: tuple[str, ...],
                 weights: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``out`` (n, T, d_out) plus the update of every row that uses one of ``names`` (same shapes)."""
        slots = [self.slots[a] for a in names]
        idx, local, scale = routing.layout(names, x3.shape[0], x3.device, tuple(s.scaling for s in slots))
        xg = x3 if idx is None else x3.index_select(0, idx)
        p = self._dropout_p(slots[0])
        dropped = F.dropout(xg, p, training=True) if p > 0.0 else xg
        A0 = weights[0][0]
        dropped = dropped if dropped.dtype == A0.dtype else dropped.to(A0.dtype)
        if len({s.basis_id for s in slots}) == 1:  # task-shared A: one down-projection for every row
            u = F.linear(dropped, A0)  # (n_g, T, k r)
        else:
            A_rows = torch.stack([A for A, _ in weights]).index_select(0, local)  # (n_g, k r, d_in)
            u = torch.bmm(dropped, A_rows.transpose(1, 2))
        u = u * (slots[0].scaling if scale is None else scale.to(u.dtype))
        B_rows = torch.stack([B for _, B in weights]).index_select(0, local)  # (n_g, d_out, k r)
        delta = torch.bmm(u, B_rows.transpose(1, 2))
        delta = delta if delta.dtype == out.dtype else delta.to(out.dtype)
        return out + delta if idx is None else out.index_add(0, idx, delta)

    def _route_plan(self, unique: tuple[str, ...]) -> tuple[list[_CoreGroup], list[str]]:
        """(task-core groups, other adapters) among ``unique`` (one call's adapter names) that this layer hosts.

        Task-core adapters with one basis (A and B keys) and dropout form one ``_CoreGroup``. Kept per
        set of names (the last 16 sets; cleared when a slot is added or removed), so a batch of N
        distinct tasks does its O(N) Python work once, not in every layer of every forward.
        """
        key = (unique, self.training)
        plan = self._route_plans.get(key)
        if plan is None:
            names = [a for a in unique if a in self.slots]  # "__base__" has no slot
            groups: dict[tuple, list[str]] = {}
            for a in names:
                slot = self.slots[a]
                if slot.cored:
                    groups.setdefault((slot.basis_id, tuple(b for _, b in slot.keys), self._dropout_p(slot)), []).append(a)
            cored = {a for g in groups.values() for a in g}
            plan = ([_CoreGroup(tuple(g), [self.slots[a] for a in g]) for g in groups.values()],
                    [a for a in names if a not in cored])
            if len(self._route_plans) >= 16:
                self._route_plans.pop(next(iter(self._route_plans)))
            self._route_plans[key] = plan
        return plan

    def _batched_cores(self, x3: torch.Tensor, out: torch.Tensor, routing, group: _CoreGroup) -> torch.Tensor:
        """``out`` (n, T, d_out) plus the update of every row whose adapter is one of ``names``.

        ``names`` are task-core adapters that read the same A and B (one task group), so the batch
        computes ``u = dropout(x) A^T`` once (one product, (n_g, T, k r)) and ``v B^T`` once; only
        the cores are per row: ``v_i = u_i C_{a(i)}^T`` (one ``bmm`` with each row's r x r core, or
        ``u_i * c_{a(i)}`` for diagonal cores), scaled by the row's alpha / r. With S fused slices
        each slice's core acts on the u columns of its A, and B is one (d_out, S r) block matrix
        with slice s's B in its output rows and column block s. The extra cost of N distinct tasks
        is gathering N small cores and the (n_g, T, r) x (r, r) products, independent of d.
        """
        bank = self._bank[0]
        first = group.first
        idx, local, scale = routing.layout(group.names, x3.shape[0], x3.device, group.scalings)
        xg = x3 if idx is None else x3.index_select(0, idx)
        p = self._dropout_p(first)
        dropped = F.dropout(xg, p, training=True) if p > 0.0 else xg
        A, B, cols = first.basis(bank)
        u = F.linear(dropped if dropped.dtype == A.dtype else dropped.to(A.dtype), A)  # one product for all rows
        u = u * (first.scaling if scale is None else scale.to(u.dtype))
        params = bank._parameters  # a plain dict, read in C by the group's itemgetters (ParameterDict's is slow)
        parts = []
        for i, c in enumerate(cols):
            rows = torch.stack(group.cores[i](params)).index_select(0, local)  # (n_g, r, r) / (n_g, r)
            ui = u[..., c]
            parts.append(torch.bmm(ui, rows.transpose(1, 2)) if rows.dim() == 3 else ui * rows.unsqueeze(1))
        v = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (n_g, T, S r)
        delta = F.linear(v, B)  # one up-projection for all rows
        delta = delta if delta.dtype == out.dtype else delta.to(out.dtype)
        return out + delta if idx is None else out.index_add(0, idx, delta)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        routing = self._routing[0]
        if routing is not None and routing.active:
            uniform = routing.uniform
            if uniform is None:
                if self.merged:
                    from .errors import ShareLoraError

                    raise ShareLoraError("adapter_names cannot route rows of a merged model; call unmerge() first")
                return self._routed(x, self.base_layer(x, *args, **kwargs), routing)
            slot = self.slots.get(uniform)  # every row uses one adapter: the single-adapter path
            if slot is None or uniform in self.merged_adapters:
                return self.base_layer(x, *args, **kwargs)
            if self.merged:
                from .errors import ShareLoraError

                raise ShareLoraError("adapter_names cannot route rows of a merged model; call unmerge() first")
            return self._single(slot, x, args, kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        slot = self._slot
        if slot is not None:
            return self._single(slot, x, args, kwargs)
        if not self.active:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        cache: dict = {}
        for name in self.active:  # several active adapters: their updates add up (as in PEFT)
            update = self._update(self.slots[name], x, cache)
            result = result + (update if update.dtype == result.dtype else update.to(result.dtype))
        return result

    def _single(self, slot: AdapterSlot, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        if slot.heads > 1:
            result = self.base_layer(x, *args, **kwargs)
            update = self._hydra(slot, x)
            return result + (update if update.dtype == result.dtype else update.to(result.dtype))
        A, B = self._down_and_up(slot)
        if not args and not kwargs and self._can_fuse(x, A, B):
            return self._fused(slot, x, A, B)
        result = self.base_layer(x, *args, **kwargs)
        update = F.linear(self._down(slot, x, A), B)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    # --- merging ------------------------------------------------------------------------------
    def delta_weight(self, target: Target, adapter_name: str | None = None) -> torch.Tensor:
        """scaling * B A (with a task core: scaling * B C A) for one target, shape (d_out, d_in)."""
        slot = self.slots[adapter_name] if adapter_name is not None else self._view()
        i = slot.targets.index(target)
        bank = self._bank[0]
        return (slot.up(bank, i, torch.float32) @ slot.A(bank, slot.keys[i][0]).float()) * slot.scaling

    @torch.no_grad()
    def _apply_delta(self, adapter_name: str, sign: float) -> None:
        w = self.base_layer.weight
        slot = self.slots[adapter_name]
        for t in slot.targets:
            d = self.delta_weight(t, adapter_name).to(w.device)
            rows = slice(t.out_start, t.out_start + t.d_out)
            if self.transposed:
                w[:, rows] += (sign * d.T).to(w.dtype)
            else:
                w[rows, :] += (sign * d).to(w.dtype)

    def merge(self, adapter_names=None) -> None:
        """W0 += scaling * B A for the active adapters (or ``adapter_names``); then base cost."""
        if self.quantized is not None:
            from .errors import ShareLoraError

            raise ShareLoraError(
                f"the base layer is a {self.quantized} bitsandbytes {type(self.base_layer).__name__}: W0 + B A "
                "would be rounded to its quantized codes again and the update lost in the rounding. Dequantize "
                "first: model.merge_and_unload(dequantize=True) writes a float model with the adapted model's "
                "outputs (or load the base in float / bf16 and merge there)"
            )
        for name in (self.active if adapter_names is None else [a for a in adapter_names if a in self.slots]):
            if name not in self.merged_adapters:
                if self.slots[name].heads > 1:
                    from .errors import ShareLoraError

                    raise ShareLoraError(f"adapter {name!r} routes B heads per token (HydraLoRA): its update "
                                         "depends on the input and cannot be merged into the weights")
                self._apply_delta(name, +1.0)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1.0)

    def extra_repr(self) -> str:
        rows = []
        for name, slot in self.slots.items():
            parts = [f"{t.slice_name or 'all'}: A={t.a_key}, B={t.b_key}" + (f", C={t.c_key}" if t.c_key else "")
                     for t in slot.targets]
            rows.append(f"{name}: scaling={slot.scaling:g}, " + "; ".join(parts))
        return " | ".join(rows)
