"""The layout of each CPU linear weight, float or int8, chosen at load by timing the candidates on this machine.

A decode step multiplies a few rows by every weight, and which way of doing it is fastest depends on the CPU,
not only on the shape. Measured on 2 cores, fp32, one row: on an AMD EPYC, `split_gemv` (row blocks of the
weight in one bmm, on all threads) ran 2-3x faster than `F.linear`; on an Intel Xeon with AMX, 2-3x slower,
and oneDNN's packed fp32 weight lost to `F.linear` too, while at 8 rows it won by 1.5-3x on both for weights
of a million elements and more. So no fixed rule holds; the engine times them.

Candidates per `Linear` that owns a contiguous CPU weight:
- "dense": the row-major weight, `F.linear`;
- "rows": the same weight, inputs of a few rows as `split_gemv` (fp32, when the rows split over the threads);
- "packed": oneDNN's packed copy (fp32, and bf16 where the CPU has it), when the module alone owns the weight:
  a tied LM head or a view into an offload slot keeps its place.

Per `QuantizedLinear` (int8 weights):
- "dense": the row-major int8 weight, `vramlite.kernels.int8_linear` (torch's int8-weight kernel, W8A16);
- "packed": oneDNN's packed int8 copy, x quantized per token and multiplied in int8 (W8A8, exact int32 sums),
  on CPUs with VNNI only: without it, oneDNN adds u8·s8 products in pairs in int16, which can saturate.
  Measured on 2 Intel Xeon cores (AMX), a 130M LLaMA's int8 weights streamed from memory: 1.4x faster than
  W8A16 at one row and 3.8x at 8 rows; but weights of 256x256 and the like fall to oneDNN's reference code,
  50x slower. On 2 AMD EPYC cores (VNNI, no AMX) every shape ran the reference code, so a probe at start
  (`_onednn_int8_runs_fast`) keeps int8 weights dense there. W8A8 has more error than W8A16 (activations
  rounded to 8 bits, not to bf16).

Linears of one shape, dtype and set of candidates form a group and get one layout. Each timing pass runs
every sampled weight of the model once in one layout, as a decode step does, so weights come from wherever
a step would find them (cache or DRAM); a group's time is its best pass. The score of a layout sums its times
at one row and, for an engine that batches, at `batch_hint` rows; a layout other than "dense" must score
MARGIN better.
"""

from __future__ import annotations

import functools
import logging
import platform
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vramlite.engine.layers.linear import (
    SPLIT_GEMV_ROWS,
    Linear,
    QuantizedLinear,
    onednn_int8_matmul,
    onednn_int8_sums,
)

log = logging.getLogger(__name__)

LAYOUTS = ("dense", "rows", "packed")
CHOICES = ("auto", *LAYOUTS)
"""What a user may ask for: "auto" times the candidates; a layout name gives every linear that layout where it
is a candidate, else "dense", untimed (the same layout on every load)."""
SAMPLE_BYTES = 256 * 2**20
"""Weights timed per layout at most (the packed candidates double it while timing): the whole of a small
model, the first layers of a large one."""
PASSES = 5
MARGIN = 0.1
"""How much faster than "dense" another layout must time to be chosen: where two tie, loads agree on dense
rather than flip with the noise, which for int8 weights would change the arithmetic (W8A8 or W8A16)."""

Timer = Callable[["Group", str, int], float]
"""(group, layout, rows) → seconds for one pass over the group's sampled weights in that layout."""


@dataclass
class Group:
    """Linears that share a shape, a weight dtype and their candidate layouts."""

    shape: tuple[int, int]
    dtype: torch.dtype
    x_dtype: torch.dtype  # the activations'
    layouts: tuple[str, ...]
    parts: int  # row blocks for "rows"
    members: list[Linear | QuantizedLinear] = field(default_factory=list)
    sampled: list[Linear | QuantizedLinear] = field(default_factory=list)
    trial_packs: dict[int, torch.Tensor] = field(default_factory=dict)  # id(member) → its packed weight

    def describe(self) -> str:
        out, inp = self.shape
        return f"{len(self.members)}x {out}x{inp} {str(self.dtype).removeprefix('torch.')}"


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear on x86 (what torch.compile uses on the CPU)."""
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def onednn_int8_available() -> bool:
    """Whether oneDNN's int8 linear is there and exact: x86 with VNNI (see the module's docstring), and a torch
    whose op takes signed int8 activations and gives their exact sums (torch 2.6's wants uint8: tried once)."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if not (onednn_available() and hasattr(torch.ops.onednn, "qlinear_prepack") and is_vnni is not None
            and is_vnni()):
        return False
    xq = torch.tensor([[127, -128, 127, -128] * 16, [-1, 2, -3, 4] * 16], dtype=torch.int8)
    wq = torch.tensor([[127] * 64, [-127, 127] * 32, [1, -2, 3, -4] * 16], dtype=torch.int8)
    try:
        with torch.inference_mode():
            sums = onednn_int8_sums(xq, torch.ops.onednn.qlinear_prepack(wq, [2, 64]))
    except RuntimeError as e:
        log.info("oneDNN's int8 linear is not usable with torch %s (%s): int8 weights stay dense",
                 torch.__version__, str(e).splitlines()[0])
        return False
    if not torch.equal(sums, (xq.long() @ wq.long().T).float()):
        return False
    return _onednn_int8_runs_fast()


_PROBE_LOCK = threading.Lock()
PROBE_SLACK = 8.0
"""How much slower than an fp32 product of its shape oneDNN's int8 linear may be before it counts as its
reference code, which no layout choice could make up for."""


def _onednn_int8_runs_fast() -> bool:
    """Whether oneDNN multiplies int8 with its JIT kernels here, timed on one 16 x 1024 x 1024 product (~1 ms): on
    2 AMD EPYC cores with VNNI it ran its reference code at every shape, 1024x256 weights at 256 rows in 2 s
    against 4 ms in fp32, so a prompt of a few hundred tokens took minutes."""
    xq, wq = torch.ones(16, 1024, dtype=torch.int8), torch.ones(1024, 1024, dtype=torch.int8)
    with torch.inference_mode():
        packed = torch.ops.onednn.qlinear_prepack(wq, [16, 1024])
        x, w = xq.float(), wq.float()
        int8 = min(_seconds(lambda: onednn_int8_sums(xq, packed)) for _ in range(2))
        fp32 = min(_seconds(lambda: x @ w.T) for _ in range(3))
    if int8 > PROBE_SLACK * fp32:
        log.info("oneDNN's int8 linear runs its reference code on this CPU (%.1f ms for a 16x1024x1024 product, "
                 "fp32 %.1f ms): int8 weights stay dense", 1e3 * int8, 1e3 * fp32)
        return False
    return True


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def candidate_groups(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[Group]:
    """The model's CPU `Linear`s and `QuantizedLinear`s grouped by shape, dtype and candidate layouts, in model
    order; `dtype` is the activations'."""
    shared = Counter(id(t) for t in (*(p for _, p in model.named_parameters(remove_duplicate=False)),
                                     *(b for _, b in model.named_buffers(remove_duplicate=False))))
    onednn = onednn_available()
    onednn_bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    onednn_int8: bool | None = None  # probed at the first int8 weight (it takes up to a second)
    threads = torch.get_num_threads()
    groups: dict[tuple, Group] = {}
    for module in model.modules():
        if not isinstance(module, Linear | QuantizedLinear) or module.dense_weight is None:
            continue
        w = module.dense_weight
        if w.device.type != "cpu" or not w.is_contiguous():
            continue
        if isinstance(module, QuantizedLinear):
            if onednn_int8 is None:
                with _PROBE_LOCK:  # engines loading side by side probe once
                    onednn_int8 = onednn_int8_available()
            held, parts, packs, x_dtype = w, 1, onednn_int8, dtype
        else:
            fp32 = w.dtype == torch.float32
            parts = max(p for p in range(1, threads + 1) if module.out_features % p == 0) if fp32 else 1
            packs = onednn and (fp32 or (w.dtype == torch.bfloat16 and onednn_bf16))
            held, x_dtype = module.weight, w.dtype
        owned = shared[id(held)] == 1 and w.untyped_storage().nbytes() == w.nbytes  # held: as `shared` counts it
        layouts = ("dense",) + (("rows",) if parts > 1 else ()) + (("packed",) if owned and packs else ())
        key = (tuple(w.shape), w.dtype, layouts)
        groups.setdefault(key, Group(tuple(w.shape), w.dtype, x_dtype, layouts, parts)).members.append(module)
    return list(groups.values())


def prefer_cpu_layout(model: nn.Module, batch_hint: int, layout: str = "auto", timer: Timer | None = None,
                      dtype: torch.dtype = torch.float32, compiled: bool = False) -> dict[str, int]:
    """Give each CPU `Linear` and `QuantizedLinear` of `model` the fastest layout for decode steps of up to
    `batch_hint` rows of `dtype` activations on this machine, or the `layout` asked for (see CHOICES); returns
    how many linears got each layout. `compiled`: decode steps will run compiled, where the per-token
    quantization of a packed int8 linear's input fuses into the graph's loops, so it is timed without it.
    `timer` replaces the real timing (tests)."""
    if layout not in CHOICES:
        raise ValueError(f"cpu layout {layout!r} is not one of {', '.join(CHOICES)}")
    groups = [g for g in candidate_groups(model, dtype) if len(g.layouts) > 1]
    chosen: Counter[str] = Counter()
    if not groups:
        return dict(chosen)
    if layout != "auto":
        for g in groups:
            given = layout if layout in g.layouts else "dense"
            _apply(g, given, batch_hint)
            chosen[given] += len(g.members)
        log.info("cpu layout of the linear weights, as asked (%s): %s", layout, _counts(chosen))
        return dict(chosen)
    start = time.perf_counter()
    _sample(groups)
    rows = (1,) if batch_hint == 1 else (1, batch_hint)
    try:
        times = _time_layouts(groups, rows, batch_hint, timer or functools.partial(_time_pass, compiled=compiled))
    finally:
        for g in groups:
            _set_layout(g, "dense")
    for g in groups:
        scores = {lay: sum(times[id(g), _runs_as(lay, m), m] for m in rows) for lay in g.layouts}
        best = min(scores, key=lambda lay: scores[lay] * (1.0 if lay == "dense" else 1.0 + MARGIN))
        _apply(g, best, batch_hint)
        chosen[best] += len(g.members)
        log.debug("cpu layout: %s -> %s (%s per weight)", g.describe(), best, ", ".join(
            f"{lay} {1e6 * s / len(g.sampled):.0f} us" for lay, s in scores.items()))
    log.info("cpu layout of the linear weights, timed at %s rows in %.2f s: %s", "/".join(map(str, rows)),
             time.perf_counter() - start, _counts(chosen))
    return dict(chosen)


def _runs_as(layout: str, rows: int) -> str:
    """The layout that multiplies `rows` rows: "rows" changes inputs of up to SPLIT_GEMV_ROWS, more run as
    "dense"."""
    return "dense" if layout == "rows" and rows > SPLIT_GEMV_ROWS else layout


def _counts(chosen: Counter[str]) -> str:
    return ", ".join(f"{n} {lay}" for lay, n in sorted(chosen.items()))


def _sample(groups: list[Group]) -> None:
    """Pick the weights to time: every group's first, then more of each group in turn while SAMPLE_BYTES last."""
    budget = SAMPLE_BYTES
    for g in groups:
        g.sampled = g.members[:1]
        budget -= g.members[0].dense_weight.nbytes
    for g in groups:
        for module in g.members[1:]:
            if module.dense_weight.nbytes > budget:
                break
            g.sampled.append(module)
            budget -= module.dense_weight.nbytes


def _time_layouts(groups: list[Group], rows: tuple[int, ...], batch_hint: int, timer: Timer
                  ) -> dict[tuple[int, str, int], float]:
    """Best time of each (group, layout, rows) over PASSES passes, after one warm-up pass."""
    for g in groups:
        if "packed" in g.layouts:
            g.trial_packs = {id(m): m.onednn_pack(batch_hint) for m in g.sampled}
    best: dict[tuple[int, str, int], float] = defaultdict(lambda: float("inf"))
    for i in range(PASSES + 1):
        for layout in LAYOUTS:
            for m in rows:
                if _runs_as(layout, m) != layout:
                    continue
                for g in groups:
                    if layout in g.layouts:
                        seconds = timer(g, layout, m)
                        if i:
                            best[id(g), layout, m] = min(best[id(g), layout, m], seconds)
    return best


@torch.inference_mode()
def _time_pass(group: Group, layout: str, rows: int, compiled: bool = False) -> float:
    _set_layout(group, layout)
    x = torch.ones(rows, group.shape[1], dtype=group.x_dtype)  # not random: loading leaves torch's RNG alone
    if compiled and layout == "packed" and group.dtype == torch.int8:  # the product alone: see prefer_cpu_layout
        calls = [functools.partial(onednn_int8_matmul, x.to(torch.int8), m.packed) for m in group.sampled]
    else:
        calls = [functools.partial(m, x) for m in group.sampled]
    start = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - start


def _set_layout(group: Group, layout: str) -> None:
    """Switch the sampled modules between layouts while timing (their dense weight stays)."""
    for module in group.sampled:
        if "rows" in group.layouts:
            module.gemv_parts = group.parts if layout == "rows" else 1
        module.packed = group.trial_packs.get(id(module)) if layout == "packed" else None


def _apply(group: Group, layout: str, batch_hint: int) -> None:
    packs, group.trial_packs = group.trial_packs, {}
    for module in group.members:
        if layout == "rows":
            module.gemv_parts = group.parts
        elif layout == "packed":
            pack = packs.get(id(module))
            module.use_packed(module.onednn_pack(batch_hint) if pack is None else pack)
