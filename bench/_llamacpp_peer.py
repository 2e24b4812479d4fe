"""The llama.cpp peer of bench/quality_at_budget.py: the dense model quantized by llama.cpp's own
quantizer (``llama_model_quantize`` through ``llama_cpp``'s ctypes bindings, built from the
llama-cpp-python sdist) to the same bytes as our plans, loaded back by transformers' GGUF loader.

Procedure, per budget:

1. The dense model (the fp32 folder ``load_model(None)`` loads) is converted once to an f32 GGUF
   with the llama.cpp tree's ``convert_hf_to_gguf.py`` (``--llama-cpp-src``).
2. Every candidate, an ftype of :data:`FTYPES` with llama.cpp's own per-tensor mix or ``pure``
   (every tensor at the ftype's type), is quantized once and its tensor bytes are read from the
   file (576-wide rows make k- and IQ-types fall back to 32-blocks: sizes are measured, never
   assumed). Candidates that came out with the same tensor types are one.
3. Beside the weights, the footprint counts what our plans' footprint counts: the hardware
   model's KV cache at 4 bits in groups of the study's ``kv_cache_group`` (what our "new" rows
   deploy, "kv4") and its activation peak, at the study's context, for the layers kept. A
   candidate fits when its GGUF tensor bytes plus that are within the budget.
4. The fewest dropped layers with which some candidate fits (layers chosen by the angular
   distance our depth stage ranks with, ``depth.select_layers(..., "angular", 1)``, pruned by
   the quantizer's ``prune_layers``), then among the candidates that fit there, the one with the
   lowest token perplexity on the study's windows (how a study picks its best trial).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# llama.cpp ftypes tried, by name (llama_cpp.LLAMA_FTYPE_MOSTLY_<name>). Not tried: F16/BF16 (too
# big for 128 MB), IQ3_XXS/IQ2_*/IQ1_* and Q2_K_S (need an importance matrix), TQ1_0/TQ2_0 (for
# ternary-trained models), Q1_0/Q2_0/NVFP4 (this transformers' gguf package cannot read them back).
FTYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL",
          "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "Q2_K")


@dataclasses.dataclass(frozen=True)
class Candidate:
    ftype: str
    pure: bool

    def label(self) -> str:
        return self.ftype + (" pure" if self.pure else "")


@dataclasses.dataclass(frozen=True)
class Sized:
    """A candidate quantized with no layer dropped: total and per-block tensor bytes, its types."""

    candidate: Candidate
    tensor_bytes: int
    block_bytes: tuple[int, ...]
    types: tuple[tuple[str, str], ...]  # (tensor, ggml type)

    def type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t for _, t in self.types).items()))

    def predicted(self, dropped: tuple[int, ...]) -> int:
        return self.tensor_bytes - sum(self.block_bytes[i] for i in dropped)


def tensor_bytes(path: Path) -> tuple[int, tuple[int, ...], tuple[tuple[str, str], ...]]:
    """A GGUF file's tensor data bytes, those of each ``blk.N.`` block, and each tensor's type."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    blocks: Counter[int] = Counter()
    for t in reader.tensors:
        if t.name.startswith("blk."):
            blocks[int(t.name.split(".")[1])] += int(t.n_bytes)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    return total, tuple(blocks[i] for i in range(len(blocks))), tuple(sorted((t.name, t.tensor_type.name) for t in reader.tensors))


def convert_dense(folder: Path, src: Path, out: Path) -> Path:
    """The HF checkpoint ``folder`` as an f32 GGUF at ``out`` (llama.cpp's converter, its gguf-py)."""
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32", "--outfile", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-2000:]}")
    return out


_LOG_ERROR = 4  # ggml_log_level: GGML_LOG_LEVEL_ERROR


@functools.cache
def _quiet_llama() -> Any:
    """llama.cpp's log with errors only (its quantizer reports every tensor and fallback)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == _LOG_ERROR:
            sys.stderr.write(text.decode(errors="replace"))

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    return log  # kept alive by the cache


def quantize(src: Path, dst: Path, cand: Candidate, prune: tuple[int, ...] = (), threads: int = 2) -> Path:
    """``src`` quantized by llama.cpp to ``dst`` as ``cand``, the layers ``prune`` removed."""
    import llama_cpp

    _quiet_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{cand.ftype}")
    params.pure = cand.pure
    layers = (ctypes.c_int32 * (len(prune) + 1))(*sorted(prune), -1)  # -1 ends the list
    if prune:
        params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {cand.label()} (prune {list(prune)})")
    return dst


def size_candidates(f32: Path, work: Path) -> list[Sized]:
    """Every candidate quantized once (no layer dropped) and measured; same tensor types: one."""
    out: list[Sized] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for ftype in FTYPES:
        for pure in (False, True):
            cand = Candidate(ftype, pure)
            path = quantize(f32, work / "sizing.gguf", cand)
            total, blocks, types = tensor_bytes(path)
            path.unlink()
            if types in seen:  # e.g. Q4_K_S pure is Q4_K_M pure: every tensor at the same type
                continue
            seen.add(types)
            out.append(Sized(cand, total, blocks, types))
            print(f"  llama.cpp {cand.label():<12} {total / 1e6:7.2f} MB  {out[-1].type_counts()}", file=sys.stderr, flush=True)
    return out


def non_weight_bytes(base_shape: Any, dropped: tuple[int, ...], kv_group: int, context_len: int, prefill_len: int) -> int:
    """What the hardware model counts beside the weights for our "kv4" plans: the KV cache at 4
    bits (groups of ``kv_group``) and the activation peak, for ``base_shape`` less ``dropped``."""
    from slmsearch.hwmodel.estimate import footprint_bytes
    from slmsearch.hwmodel.memory import static_bytes

    shape = base_shape.drop_layers(dropped).with_kv_cache_bits(4, kv_group)
    return footprint_bytes(shape, context_len=context_len, prefill_len=prefill_len) - static_bytes(shape).static_total


def load_gguf(path: Path) -> Any:
    """The GGUF dequantized to a float32 transformers model, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Choice:
    """The peer at one budget: the candidate, the layers it drops, its file and figures."""

    candidate: Candidate
    dropped: tuple[int, ...]
    path: Path
    tensor_bytes: int
    footprint_bytes: int
    token_ppl: float
    fitting: int  # candidates that fit with as few layers dropped (the choice is the best of them)

    def plan(self) -> str:
        return self.candidate.label() + (f" drop{len(self.dropped)}" if self.dropped else "")


def choose(budget_bytes: float, sized: list[Sized], f32: Path, work: Path, *, ranking: Callable[[int], tuple[int, ...]],
           non_weight: Callable[[tuple[int, ...]], int], token_ppl: Callable[[Path], float],
           memo: dict[str, float]) -> Choice | None:
    """The fewest dropped layers (``ranking(n)``: which n) with which a candidate fits, then the
    fitting candidate of lowest ``token_ppl(path)`` (memoized by file name in ``memo``)."""
    n_layers = len(sized[0].block_bytes)
    for drop in range(n_layers):
        dropped = ranking(drop)
        extra = non_weight(dropped)
        tried: list[Choice] = []
        for s in sized:
            if s.predicted(dropped) + extra > budget_bytes:
                continue
            path = work / f"{s.candidate.label().replace(' ', '-')}-drop{drop}.gguf"
            if not path.is_file():
                quantize(f32, path, s.candidate, dropped)
            total = tensor_bytes(path)[0]
            if total + extra > budget_bytes:  # k-quant mixes depend on the layer count: measured
                continue
            if path.name not in memo:
                memo[path.name] = token_ppl(path)
                print(f"  llama.cpp {s.candidate.label():<12} drop{drop}: {(total + extra) / 1e6:.2f} MB, "
                      f"token ppl {memo[path.name]:.3f}", file=sys.stderr, flush=True)
            tried.append(Choice(s.candidate, dropped, path, total, total + extra, memo[path.name], 0))
        if tried:
            return dataclasses.replace(min(tried, key=lambda c: c.token_ppl), fitting=len(tried))
    return None
