"""A compiled CPU kernel that draws dropout's mask and applies it in one parallel pass (optional).

The layer's CPU dropout otherwise costs, per 512 x 576 input, ~31,000 draws from torch's
generator (one Mersenne-Twister stream, sequential by construction), their scattered zeroing, and
the mask's passes forward and backward: 0.3-0.4 ms a block that a second core cannot share
(docs/BENCHMARKS.md). Here each element's keep bit is a hash of its index and a 64-bit seed, so
any thread computes any element's bit, in SIMD lanes, in the same pass that copies x:

    h = fmix32(((i ^ s1) * 0x9E3779B1 + s2) mod 2^32)   (MurmurHash3's finaliser, a bijection)
    keep(i) = h >= t,  t = round(p 2^32),  so P(keep) = 1 - t / 2^32 exactly

with (s1, s2) the two halves of one 64-bit draw from torch's default generator: torch.manual_seed
and the RNG state that gradient checkpointing restores reproduce the mask, and backward
recomputes it from the seed instead of saving it (nothing of size (N, d) is kept for the mask).

It is built once per machine with torch.utils.cpp_extension (a C++ compiler and ninja are needed;
``ninja`` is a dependency) into torch's extension cache (``TORCH_EXTENSIONS_DIR``). If that is not
possible, or ``SHARELORA_CPU_KERNEL=0`` is set, the layer uses torch's operators instead, with the
same distribution of masks (not the same masks).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass

import torch

_NAME = "sharelora_cpu_dropout_v1"
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// out[i] = x[i] if fmix32(((i ^ s1) * golden + s2)) >= threshold else 0, for i in [0, n).
// out may be x (in place). x, out: contiguous float32 of the same size, n < 2^32.
void apply_mask(torch::Tensor x, torch::Tensor out, int64_t threshold, int64_t seed) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "sharelora kernel: tensors must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "sharelora kernel: float32 only");
  TORCH_CHECK(x.numel() == out.numel(), "sharelora kernel: sizes differ");
  TORCH_CHECK(x.numel() < (int64_t(1) << 32), "sharelora kernel: more than 2^32 elements");
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t s1 = static_cast<uint32_t>(s), s2 = static_cast<uint32_t>(s >> 32);
  const uint32_t t = static_cast<uint32_t>(threshold);
  at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
    const float* __restrict xs = xp + begin;
    float* __restrict os = op + begin;
    const uint32_t base = static_cast<uint32_t>(begin);
    const int32_t len = static_cast<int32_t>(end - begin);
    for (int32_t j = 0; j < len; ++j) {
      uint32_t h = ((base + static_cast<uint32_t>(j)) ^ s1) * 0x9E3779B1u + s2;
      h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
      os[j] = xs[j] * (h >= t ? 1.0f : 0.0f);
    }
  });
}
"""

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None}


@dataclass(frozen=True)
class KernelMask:
    """The kernel's dropout mask for one input: recomputed from these wherever it is applied."""

    seed: int  # 64 bits, two's complement
    threshold: int  # keep iff hash >= threshold, 0 <= threshold < 2^32

    @property
    def keep_prob(self) -> float:
        return 1.0 - self.threshold / 2 ** 32


def _cpu_tag() -> str | None:
    """A short hash of this CPU's instruction-set flags (Linux), None where they cannot be read.

    The kernel is compiled for the CPU it runs on (-march=native) and the build is cached under a
    name that includes this tag, so a home directory shared by different machines never loads a
    build made for instructions this CPU lacks.
    """
    import hashlib

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return hashlib.sha1(flags.encode()).hexdigest()[:10] if flags else None


def _build():
    from torch.utils.cpp_extension import load_inline

    if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    print("sharelora: loading the CPU dropout kernel (built once per machine: ~30 s the first time)",
          file=sys.stderr, flush=True)
    tag = _cpu_tag()
    arch = ["-march=native"] if tag else []  # otherwise a portable build (slower: no wide SIMD)
    return load_inline(f"{_NAME}_{tag or 'generic'}", cpp_sources=_SOURCE, functions=["apply_mask"],
                       extra_cflags=["-O3", "-fopenmp", *arch], extra_ldflags=["-fopenmp"])


def get():
    """The compiled module, building it on first use; None where it cannot be had (then: torch ops)."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get("SHARELORA_CPU_KERNEL", "1") != "0":
                try:
                    _state["module"] = _build()
                except Exception as e:  # no compiler, no ninja, no headers: fall back, say so once
                    warnings.warn(f"sharelora: the CPU dropout kernel could not be built ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using torch "
                                  f"operators instead (slower). Set SHARELORA_CPU_KERNEL=0 to skip the attempt.",
                                  RuntimeWarning, stacklevel=3)
            _state["tried"] = True
    return _state["module"]


def serves(numel: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel applies to such an input (CPU, float32, < 2^32 elements) and is available."""
    return device.type == "cpu" and dtype == torch.float32 and numel < 2 ** 32 and get() is not None


def draw(p: float) -> KernelMask:
    """A new mask for drop probability ``p``: one 64-bit draw from torch's default generator."""
    seed = int(torch.empty(1, dtype=torch.int64).random_(-(1 << 63), None))
    return KernelMask(seed, min(round(p * 2 ** 32), 2 ** 32 - 1))


def apply(x: torch.Tensor, mask: KernelMask, out: torch.Tensor | None = None) -> torch.Tensor:
    """x with the dropped elements zeroed: into ``out`` (may be x itself), or a new contiguous tensor."""
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    get().apply_mask(x, out, mask.threshold, mask.seed)
    return out
