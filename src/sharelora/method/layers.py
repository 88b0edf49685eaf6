"""ShareLoraLayer: a frozen linear map plus a low-rank update whose A and B may be shared."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel
from .plan import Target, _conv1d_class


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
    """

    def __init__(self, a_keys: tuple[str, ...] = (), bank: nn.ParameterDict | None = None):
        self.a_keys = tuple(a_keys)
        self._bank = [bank]
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
        self.x, self.mode, self.u = x, mode, u


class ShareLoraLayer(nn.Module):
    """``h = W0 x + (alpha / r) * B A dropout(x)`` for one module, with A and B read by key.

    Args:
        base_layer: the frozen ``nn.Linear`` (W0: d_out x d_in) or GPT-2 ``Conv1D``
            (W0 stored as d_in x d_out).
        targets: the plan's targets hosted by this module: one covering all outputs, or one per
            adapted slice of a fused module (``c_attn.q`` adds to output columns [0, d)).
        bank: the model's ``ParameterDict`` of adapter tensors. A: (r, d_in), B: (d_out, r).
            Shared tensors live there once; the layer only looks them up, so a parameter
            listing, an optimizer and a checkpoint see each shared tensor once, and autograd
            sums its gradient over every layer that reads it.
        scaling: alpha / r.
        dropout: dropout probability on the adapter input.

    The update is computed as ``u = scaling * dropout(x) A^T`` (N, r), then ``u B^T``: scaling
    and dropout's 1/(1-p) act on the small (N, r) product. Slices of a fused module share one
    dropout mask and one product ``u`` per distinct A (their A's are stacked), and their B's
    form one block matrix, so a fused module costs one pair of products whatever its slices.
    """

    def __init__(self, base_layer: nn.Module, targets: list[Target], bank: nn.ParameterDict,
                 scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D keeps W as (d_in, d_out)
        self.targets = tuple(targets)
        self.keys = tuple((bank_name(t.a_key), bank_name(t.b_key)) for t in targets)
        self.whole = len(targets) == 1 and targets[0].slice_name is None
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A plain list keeps the bank out of this module's parameters: the bank belongs to the
        # ShareLoraModel, which registers it once.
        self._bank = [bank]
        self.merged = False
        self.disabled = False
        # Set by ShareLoraModel for sibling modules that read the same x (see SharedDownProjection).
        self.shared_down: SharedDownProjection | None = None
        self.reuse_shared_input = True
        # "module": no shared product (so no shared dropout mask) while dropout is active.
        self.dropout_mask = "input"
        # The fused kernel re-implements the base layer's forward: only for these exact types.
        self._plain_base = type(base_layer) is nn.Linear or type(base_layer) is _conv1d_class()
        if not self.whole:
            self._d_out_total = base_layer.weight.shape[1 if self.transposed else 0]
            # Distinct A keys in order; each slice reads the u columns of its A.
            self._a_keys = tuple(dict.fromkeys(a for a, _ in self.keys))

    @property
    def weight(self) -> torch.Tensor:  # so code that reads module.weight keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    # --- the update -------------------------------------------------------------------------
    def _down_and_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the whole module: A (k r, d_in) stacks the distinct A's; B (d_out, k r)."""
        bank = self._bank[0]
        if self.whole:
            a_key, b_key = self.keys[0]
            return bank[a_key], bank[b_key]
        r = bank[self._a_keys[0]].shape[0]
        A = torch.cat([bank[a] for a in self._a_keys]) if len(self._a_keys) > 1 else bank[self._a_keys[0]]
        cols = []
        for t, (a_key, b_key) in zip(self.targets, self.keys):
            cols.append((self._a_keys.index(a_key), t.out_start, bank[b_key]))
        # B's block layout: slice t fills rows [out_start, out_start + d_out) of its A's r columns.
        blocks = []
        for i in range(len(self._a_keys)):
            col = None
            for j, start, B in cols:
                if j == i:
                    piece = F.pad(B, (0, 0, start, self._d_out_total - start - B.shape[0]))
                    col = piece if col is None else col + piece
            blocks.append(col if col is not None else A.new_zeros(self._d_out_total, r))
        return A, torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]

    def _dropout_p(self) -> float:
        d = self.lora_dropout
        return d.p if isinstance(d, nn.Dropout) and d.training else 0.0

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

    def _shared(self, p: float) -> SharedDownProjection | None:
        """The group's shared down-projection, if this module may use it now."""
        if self.shared_down is None or not self.reuse_shared_input:
            return None
        return self.shared_down if self.dropout_mask == "input" or p == 0.0 else None

    def _fused(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        p = self._dropout_p()
        shared = self._shared(p)
        mode = (p, torch.is_grad_enabled())
        u = shared.lookup(x, mode) if shared is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        W, bias = self.base_layer.weight, self.base_layer.bias
        if u is not None:
            u = u[:, shared.columns(self.keys[0][0], B.shape[1])]
            out = _LinearPlusLowRank.apply(x2, W, bias, u, B, self.transposed)
        elif shared is not None:
            start = shared.columns(self.keys[0][0], B.shape[1]).start
            out, u = _LoraLinear.apply(x2, W, bias, shared.down_weight(), B, self.scaling, p, self.transposed, start)
            shared.store(x, mode, u)
        else:
            out, _ = _LoraLinear.apply(x2, W, bias, A, B, self.scaling, p, self.transposed, 0)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """u = scaling * dropout(x) A^T, shape (..., r), with plain ops (computed once when shared)."""
        p = self._dropout_p()
        shared = self._shared(p)
        mode = (p, torch.is_grad_enabled())
        u = shared.lookup(x, mode) if shared is not None else None
        if u is None:
            down = shared.down_weight() if shared is not None else A
            dropped = F.dropout(x, p, training=True) if p > 0.0 else x
            u = F.linear(dropped if dropped.dtype == down.dtype else dropped.to(down.dtype), down) * self.scaling
            if shared is None:
                return u
            shared.store(x, mode, u.reshape(-1, u.shape[-1]))
        else:
            u = u.view(*x.shape[:-1], u.shape[-1])
        return u[..., shared.columns(self.keys[0][0], A.shape[0])]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x, *args, **kwargs)
        A, B = self._down_and_up()
        if not args and not kwargs and self._can_fuse(x, A, B):
            return self._fused(x, A, B)
        result = self.base_layer(x, *args, **kwargs)
        update = F.linear(self._down(x, A), B)
        return result + (update if update.dtype == result.dtype else update.to(result.dtype))

    # --- merging ------------------------------------------------------------------------------
    def delta_weight(self, target: Target) -> torch.Tensor:
        """scaling * B A for one target, shape (d_out, d_in)."""
        a_key, b_key = self.keys[self.targets.index(target)]
        bank = self._bank[0]
        return (bank[b_key].float() @ bank[a_key].float()) * self.scaling

    @torch.no_grad()
    def _apply_delta(self, sign: float) -> None:
        w = self.base_layer.weight
        for t in self.targets:
            d = self.delta_weight(t).to(w.device)
            rows = slice(t.out_start, t.out_start + t.d_out)
            if self.transposed:
                w[:, rows] += (sign * d.T).to(w.dtype)
            else:
                w[rows, :] += (sign * d).to(w.dtype)

    def merge(self) -> None:
        """W0 += scaling * B A, after which the layer costs what the base layer costs."""
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        parts = [f"{t.slice_name or 'all'}: A={t.a_key}, B={t.b_key}" for t in self.targets]
        return f"scaling={self.scaling:g}, " + "; ".join(parts)
