"""Offline compile checks: each variant compiles, for the GPUs dispatch gives it, on a machine with no GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline down to a cubin with
the ptxas shipped in the triton wheel (the same API in triton 3.6 and 3.9). sm_61 (GTX 10xx) and sm_75 (Turing)
get the Pascal variants, sm_80 and sm_90 the tensor-core ones (and fp32-math W8A16 for fp32 x).
"""

import re
from typing import Any

import pytest

from vramlite.kernels._common import FP_FUSION, Backend
from vramlite.kernels.attention import _config as decode_attention_config
from vramlite.kernels.attention import _decode_attention_kernel
from vramlite.kernels.quant import _config as quant_config
from vramlite.kernels.quant import _quantize_per_token_kernel
from vramlite.kernels.w8a8 import _configs as w8a8_configs
from vramlite.kernels.w8a8 import _w8a8_kernel
from vramlite.kernels.w8a16 import _configs as w8a16_configs
from vramlite.kernels.w8a16 import _w8a16_kernel

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

KIB = 1024
# Shared memory per block of the smallest GPU for which the variant must fit: GTX 1060, Turing.
PASCAL_SHARED = {61: 48 * KIB, 75: 64 * KIB}
TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@pytest.fixture(autouse=True)
def _triton_interpreter_without_gpu() -> None:
    """Overrides conftest's: compiling needs triton's own jit functions as they are."""
    from triton.runtime.jit import JITFunction

    if not isinstance(tl.sum, JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its own jit functions cannot compile")


def _divisible_by_16(params: list[int]) -> Any:
    """ASTSource's attributes saying that these parameters are multiples of 16, as each triton spells them."""
    try:
        from triton.backends.compiler import AttrsDescriptor  # triton 3.2 (torch 2.6)
    except ImportError:
        return {(i,): [["tt.divisibility", 16]] for i in params}
    return AttrsDescriptor.from_dict({"arg_properties": {"tt.divisibility": params}, "cls": "AttrsDescriptor"})


def _compile(kernel: Any, cc: int, config: Any, pointers: dict[str, str], **constexprs: Any) -> Any:
    """Compile `kernel` with `config` for sm_<cc>; parameters neither constexpr nor in `pointers` are i32.

    Pointers, strides, N and K get the divisibility-by-16 hint a launch gives them on model shapes: without it
    Triton cannot vectorize loads nor pipeline them through shared memory, and compiles another kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32") for p in kernel.params}
    aligned = [i for i, p in enumerate(kernel.params)
               if p.name in pointers or p.name.startswith("stride_") or p.name in ("N", "K")]
    source = ASTSource(kernel, signature, {**config.kwargs, **constexprs}, _divisible_by_16(aligned))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": FP_FUSION}
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
    except RuntimeError as e:
        if str(e).startswith("Cannot find"):  # no ptxas in the wheel, nor on TRITON_PTXAS_PATH
            pytest.skip(f"this triton cannot compile for CUDA without a GPU: {e}")
        raise
    assert compiled.asm["cubin"]
    return compiled


@pytest.mark.parametrize("cc,dtype", [(61, "fp32"), (75, "fp16"), (80, "bf16"), (90, "fp16")])
def test_activation_quant(cc: int, dtype: str) -> None:
    pointers = {"x_ptr": TYPES[dtype], "q_ptr": "*i8", "scale_ptr": "*fp32"}
    compiled = _compile(_quantize_per_token_kernel, cc, quant_config(4096), pointers)
    assert compiled.metadata.shared <= 48 * KIB
    # correctly rounded division, as torch's (triton 3.3 flushes denormals: .ftz); `/` compiles to div.full.f32
    # (2 ulp off), and the codes would differ
    ptx = compiled.asm["ptx"]
    assert re.search(r"\bdiv\.rn(\.ftz)?\.f32\b", ptx) and not re.search(r"\bdiv\.(full|approx)", ptx)


@pytest.mark.parametrize("cc,dtype,head_dim,split", [(61, "fp32", 128, False), (61, "fp16", 256, True),
                                                       (61, "bf16", 128, False), (75, "fp16", 64, False),
                                                       (80, "bf16", 128, True), (90, "fp16", 128, False)])
def test_decode_attention(cc: int, dtype: str, head_dim: int, split: bool) -> None:
    pointers = {"q_ptr": TYPES[dtype], "k_ptr": TYPES[dtype], "v_ptr": TYPES[dtype],
                "o_ptr": "*fp32" if split else TYPES[dtype], "m_ptr": "*fp32", "l_ptr": "*fp32",
                "slots_ptr": "*i64", "positions_ptr": "*i64", "scale": "fp32"}
    compiled = _compile(_decode_attention_kernel, cc, decode_attention_config(head_dim), pointers, GROUP=4,
                        HEAD_DIM=head_dim, SPLIT=split)
    assert compiled.metadata.shared <= PASCAL_SHARED.get(cc, 99 * KIB)
    assert "mma" not in compiled.asm["ptx"]


def _w8a16_pointers(dtype: str, config: Any) -> dict[str, str]:
    out = "*fp32" if config.kwargs["SPLIT_K"] > 1 else TYPES[dtype]  # split-K writes fp32 partials
    return {"x_ptr": TYPES[dtype], "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": out}


def _pascal_cases(configs: tuple, cc: int, dtype: str) -> tuple:
    """Every config for sm_61 with fp32 x (GTX 1060: the tightest registers and shared memory), else the first."""
    return configs if (cc, dtype) == (61, "fp32") else configs[:1]


@pytest.mark.parametrize("block_m", [1, 16])
@pytest.mark.parametrize("cc,dtype", [(61, "fp32"), (61, "fp16"), (75, "fp32")])
def test_w8a16_fp32_math(cc: int, dtype: str, block_m: int) -> None:
    for config in _pascal_cases(w8a16_configs(False, block_m), cc, dtype):
        compiled = _compile(_w8a16_kernel, cc, config, _w8a16_pointers(dtype, config), HAS_BIAS=True)
        assert compiled.metadata.shared <= PASCAL_SHARED[cc]
        assert "mma" not in compiled.asm["ptx"]


def test_w8a16_fp32_math_on_tensor_core_gpus() -> None:
    config = w8a16_configs(False, 1)[0]
    _compile(_w8a16_kernel, 80, config, _w8a16_pointers("fp32", config), HAS_BIAS=True)


@pytest.mark.parametrize("cc,dtype", [(80, "fp16"), (80, "bf16"), (90, "bf16")])
def test_w8a16_tensor_cores(cc: int, dtype: str) -> None:
    config = w8a16_configs(True, 16)[0]
    compiled = _compile(_w8a16_kernel, cc, config, _w8a16_pointers(dtype, config), HAS_BIAS=True)
    assert "mma" in compiled.asm["ptx"]
    assert cc != 80 or "cp.async" in compiled.asm["ptx"]  # loads pipelined through shared memory


def _w8a8_pointers(dtype: str) -> dict[str, str]:
    return {"xq_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
            "y_ptr": TYPES[dtype]}


@pytest.mark.parametrize("cc,dtype", [(61, "fp32"), (61, "fp16"), (75, "fp32")])
def test_w8a8_dp4a(cc: int, dtype: str) -> None:
    for config in _pascal_cases(w8a8_configs(Backend.PASCAL), cc, dtype):
        compiled = _compile(_w8a8_kernel, cc, config, _w8a8_pointers(dtype), HAS_BIAS=True, DOT="dp4a")
        assert "dp4a.s32.s32" in compiled.asm["ptx"]
        assert compiled.metadata.shared <= PASCAL_SHARED[cc]


@pytest.mark.parametrize("cc,dtype", [(80, "fp16"), (80, "bf16"), (90, "bf16")])
def test_w8a8_int8_tensor_cores(cc: int, dtype: str) -> None:
    """The largest config fits an H100 (the tuner skips what a smaller GPU cannot hold), the smallest one an
    RTX 30xx/40xx (sm_86/89: 99 KiB)."""
    configs = w8a8_configs(Backend.TENSORCORE)
    for config, limit in ((configs[0], 227 * KIB), (_smallest(configs), 99 * KIB)):
        compiled = _compile(_w8a8_kernel, cc, config, _w8a8_pointers(dtype), HAS_BIAS=True, DOT="mma")
        ptx = compiled.asm["ptx"]
        assert "mma" in ptx and ".s8" in ptx
        assert cc != 80 or "cp.async" in ptx  # loads pipelined through shared memory
        assert compiled.metadata.shared <= limit


def _smallest(configs: tuple) -> Any:
    """The config with the smallest int8 operand tiles across pipeline stages."""
    return min(configs, key=lambda c: (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * c.num_stages)
