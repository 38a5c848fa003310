"""Backend choice by compute capability, the public entry points, and the launchers' operand checks."""

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kernel_testing import assert_close_to, linear_operands

import vramlite.kernels
from vramlite.kernels import dispatch
from vramlite.kernels._common import Backend, interpreting
from vramlite.kernels.w8a8 import w8a8_linear_ref, w8a8_linear_triton
from vramlite.kernels.w8a16 import w8a16_linear_ref, w8a16_linear_triton

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fresh_dispatch(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Uncached backend choice and warnings, uncached again afterwards; yields `monkeypatch`."""
    caches = (dispatch.backend_for, dispatch._warn_once)
    for cached in caches:
        cached.cache_clear()
    yield monkeypatch
    for cached in caches:
        cached.cache_clear()


@pytest.mark.parametrize(
    "capability,backend",
    [
        ((9, 0), Backend.TENSORCORE),
        ((8, 0), Backend.TENSORCORE),
        ((7, 5), Backend.PASCAL),
        ((7, 0), Backend.PASCAL),
        ((6, 1), Backend.PASCAL),
        ((6, 0), Backend.REFERENCE),
        ((5, 2), Backend.REFERENCE),
    ],
)
def test_backend_by_compute_capability(capability: tuple[int, int], backend: Backend, fresh_dispatch) -> None:
    fresh_dispatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert dispatch.backend_for(CUDA0) is backend


def test_too_old_gpu_warns_once(fresh_dispatch, caplog: pytest.LogCaptureFixture) -> None:
    fresh_dispatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (5, 2))
    with caplog.at_level(logging.WARNING, logger="vramlite.kernels.dispatch"):
        for index in range(3):
            assert dispatch.backend_for(torch.device("cuda", index)) is Backend.REFERENCE
    assert [r.getMessage() for r in caplog.records] == [
        "vramlite kernels: compute capability 5.2 is below 6.1 (no dp4a), too old for the Triton kernels; "
        "using the torch reference kernels (slow)"
    ]


def test_no_triton_means_reference(fresh_dispatch, caplog: pytest.LogCaptureFixture) -> None:
    fresh_dispatch.setattr(dispatch, "HAS_TRITON", False)
    with caplog.at_level(logging.WARNING, logger="vramlite.kernels.dispatch"):
        assert dispatch.backend_for(CUDA0) is Backend.REFERENCE
    assert "triton is not installed" in caplog.text


def test_cpu_is_reference_without_warning(fresh_dispatch, caplog: pytest.LogCaptureFixture) -> None:
    assert dispatch.backend_for(torch.device("cpu")) is Backend.REFERENCE
    assert not caplog.records


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_entry_points_are_the_references(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_cpu_has_bf16_math", lambda: False)  # else fp32 rows multiply in bf16 (below)
    x, qweight, scale, bias, _ = linear_operands(40, 37, 45, dtype, "cpu", with_bias=True)
    x = x.reshape(2, 20, 45)  # 40 rows: W8A8 on a GPU, but the reference backend keeps W8A16
    for entry, ref in [
        (vramlite.kernels.w8a16_linear, w8a16_linear_ref),
        (vramlite.kernels.w8a8_linear, w8a8_linear_ref),
        (vramlite.kernels.int8_linear, w8a16_linear_ref),
    ]:
        y = entry(x, qweight, scale, bias)
        assert y.shape == (2, 20, 37) and y.dtype == dtype
        torch.testing.assert_close(y, ref(x, qweight, scale, bias), rtol=0, atol=0)
    q, s = vramlite.kernels.quantize_activation_per_token(x)
    assert q.shape == x.shape and q.dtype == torch.int8 and s.shape == (2, 20)


@pytest.mark.parametrize("rows,expected", [(1, "w8a16"), (16, "w8a16"), (17, "w8a8"), (512, "w8a8")])
def test_int8_linear_switches_on_rows(rows: int, expected: str, fresh_dispatch) -> None:
    calls = []
    fresh_dispatch.setattr(dispatch, "backend_for", lambda device: Backend.TENSORCORE)
    for name in ("w8a16", "w8a8"):
        fresh_dispatch.setattr(
            dispatch, f"{name}_linear_triton", lambda x, w, s, b, backend, name=name: calls.append(name) or x
        )
    vramlite.kernels.int8_linear(torch.zeros(rows, 45), torch.zeros(45, 45, dtype=torch.int8), torch.ones(45))
    assert calls == [expected]


@pytest.mark.parametrize("entry", [vramlite.kernels.w8a16_linear, vramlite.kernels.w8a8_linear], ids=["w8a16", "w8a8"])
def test_pascal_gets_bf16_upcast(entry, fresh_dispatch, device: str) -> None:
    """On Pascal/Turing the kernels run in fp32 on bf16 input; the result comes back in bf16."""
    fresh_dispatch.setattr(dispatch, "backend_for", lambda device: Backend.PASCAL)
    x, qweight, scale, bias, _ = linear_operands(3, 37, 45, torch.bfloat16, device, with_bias=True)
    y = entry(x.reshape(1, 3, 45), qweight, scale, bias)
    ref = {vramlite.kernels.w8a16_linear: w8a16_linear_ref, vramlite.kernels.w8a8_linear: w8a8_linear_ref}[entry]
    assert_close_to(y.reshape(3, 37), ref(x.double(), qweight, scale.double(), bias.double()), torch.bfloat16)


def _operands(**changes: object) -> dict[str, object]:
    x, qweight, scale, bias, _ = linear_operands(3, 37, 45, torch.float32, "cpu", with_bias=True)
    return {"x": x, "qweight": qweight, "scale": scale, "bias": bias, **changes}


BAD = [
    ({"x": torch.zeros(3, 45, dtype=torch.int32)}, "x must be float16, bfloat16 or float32"),
    ({"x": torch.zeros(3, 44)}, "K=45"),
    ({"qweight": torch.zeros(37, 45)}, "qweight must be a non-empty 2-D int8"),
    ({"scale": torch.ones(37, dtype=torch.float16)}, "scale must be float32"),
    ({"scale": torch.ones(36)}, r"scale must be float32 \[N\]=\[37\]"),
    ({"bias": torch.ones(36)}, "bias must be a float tensor"),
    ({"x": torch.zeros(3, 1, 45)}, "x must be 2-D"),
    ({"x": torch.zeros(45, 3).t()}, "x must be contiguous"),
    ({"qweight": torch.zeros(45, 37, dtype=torch.int8).t()}, "qweight must be contiguous"),
    ({"x": torch.zeros(3, 45, dtype=torch.bfloat16), "backend": Backend.PASCAL}, "bfloat16 needs"),
    ({"backend": Backend.REFERENCE}, "reference backend"),
]


@pytest.mark.parametrize("launcher", [w8a16_linear_triton, w8a8_linear_triton], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("changes,message", BAD, ids=[m for _, m in BAD])
def test_launchers_reject_bad_operands(launcher, changes: dict, message: str) -> None:
    pytest.importorskip("triton")
    operands = _operands(**changes)
    backend = operands.pop("backend", Backend.TENSORCORE)
    with pytest.raises(ValueError, match=message):
        launcher(**operands, backend=backend)


def test_entry_points_check_devices() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    operands = _operands()
    operands["x"] = operands["x"].cuda()
    with pytest.raises(ValueError, match="different devices"):
        vramlite.kernels.w8a16_linear(**operands)


def test_interpreter_switch_read_without_triton_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """triton before 3.4 (3.3 comes with torch 2.7, the Docker image's) has no `triton.knobs`: its jit reads
    TRITON_INTERPRET itself, and so must the tuner, which asks before every tuned launch."""
    triton = pytest.importorskip("triton")
    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not interpreting()


def test_imports_and_runs_without_triton() -> None:
    code = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
import vramlite.kernels
from vramlite.kernels import dispatch
qweight, scale = vramlite.kernels.quantize_weight(torch.randn(8, 16))
y = vramlite.kernels.int8_linear(torch.randn(40, 16), qweight, scale)
print(dispatch.HAS_TRITON, tuple(y.shape), dispatch.backend_for(torch.device("cuda", 0)).value)
"""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "(40,", "8)", "reference"]
    assert "triton is not installed; using the torch reference kernels" in proc.stderr


@pytest.mark.parametrize(
    "dtype,rows,k,taken",
    [
        (torch.float32, 2, 128, True),  # activations rounded to bf16
        (torch.float32, 17, 688, True),
        (torch.bfloat16, 1, 128, True),
        (torch.bfloat16, 32, 128, True),
        (torch.bfloat16, 1, 688, True),
        (torch.bfloat16, 33, 128, False),
        (torch.bfloat16, 1, 130, False),  # K % 16: the reference
        (torch.float16, 1, 128, False),
    ],
)
def test_cpu_int8_weight_kernel_for_few_rows(
    dtype: torch.dtype, rows: int, k: int, taken: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where torch's int8-weight CPU kernel takes over from the reference, it agrees with it."""
    calls = []
    original = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or original(*a))
    x, qweight, scale, bias, _ = linear_operands(rows, 37, k, dtype, "cpu", with_bias=True)
    y = vramlite.kernels.w8a16_linear(x, qweight, scale, bias)
    assert bool(calls) is taken and y.dtype == dtype
    expected = w8a16_linear_ref(x.double(), qweight, scale.double(), bias.double())
    if taken and dtype == torch.float32:  # x rounded to bf16 (relative error 2**-9 per element), then as bf16 x
        assert ((y.double() - expected).norm() / expected.norm()).item() < 4e-3
    else:
        assert_close_to(y, expected, dtype)


@pytest.mark.parametrize("rows,k", [(33, 128), (40, 45), (300, 688)])
@pytest.mark.parametrize("bf16_math", [True, False])
def test_cpu_prefill_rows_of_fp32_multiply_in_bf16(
    rows: int, k: int, bf16_math: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More rows than torch's int8-weight kernel takes, fp32 on a CPU with bf16 math: x and the weight in bf16,
    the scale and bias after in fp32, within the error of the decode rows' bf16 rounding; without bf16 math,
    the fp32 reference."""
    monkeypatch.setattr(dispatch, "_cpu_has_bf16_math", lambda: bf16_math)
    x, qweight, scale, bias, _ = linear_operands(rows, 37, k, torch.float32, "cpu", with_bias=True)
    y = vramlite.kernels.int8_linear(x.reshape(1, rows, k), qweight, scale, bias).reshape(rows, 37)
    in_bf16 = torch.nn.functional.linear(x.bfloat16(), qweight.bfloat16()).float() * scale + bias
    reference = w8a16_linear_ref(x, qweight, scale, bias)
    torch.testing.assert_close(y, in_bf16 if bf16_math else reference, rtol=0, atol=0)
    expected = w8a16_linear_ref(x.double(), qweight, scale.double(), bias.double())
    assert ((y.double() - expected).norm() / expected.norm()).item() < 4e-3


def test_tuner_takes_the_fastest_config_that_runs_and_remembers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from vramlite.kernels import _common

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter takes the first config untimed
    monkeypatch.setattr(_common, "_tuned", {})
    ms = {"a": 3.0, "b": None, "c": 1.0, "d": 2.0}  # b does not compile for this GPU
    timed = []

    def run(config: str) -> None:
        if ms[config] is None:
            raise RuntimeError("out of resource: shared memory")

    def timer(call) -> float:
        call()
        timed.append(call.args[0])
        return ms[call.args[0]]

    assert _common.tuned_config(("k", 1), list(ms), run, timer) == "c"
    assert timed == ["a", "c", "d"]
    assert _common.tuned_config(("k", 1), list(ms), run, timer) == "c" and len(timed) == 3  # cached
    with pytest.raises(RuntimeError, match=r"no kernel config runs on this GPU.*shared memory"):
        _common.tuned_config(("k", 2), ["b", "b"], run, timer)


@pytest.mark.parametrize("name", ["w8a16", "w8a8"])
@pytest.mark.parametrize("max_offset", [8 * 45 * 5, 45 * 10], ids=["row-blocks", "weight-blocks"])
def test_products_past_32_bit_offsets_run_in_blocks(name: str, max_offset: int, fresh_dispatch, device: str) -> None:
    """With the offset limit lowered so that 40 rows of x (or 37 weight rows) pass it: the same result (but for
    the order of fp32 sums, which other tiles change), from launches that each stay under it."""
    fresh_dispatch.setattr(dispatch, "backend_for", lambda device: Backend.PASCAL)
    entry, launcher = getattr(dispatch, f"{name}_linear"), getattr(dispatch, f"{name}_linear_triton")
    x, qweight, scale, bias, _ = linear_operands(40, 37, 45, torch.float32, device, with_bias=True)
    whole = entry(x, qweight, scale, bias)
    shapes = []

    def recorded(rows: torch.Tensor, qw: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shapes.append((*qw.shape, len(rows)))
        return launcher(rows, qw, *args, **kwargs)

    fresh_dispatch.setattr(dispatch, f"{name}_linear_triton", recorded)
    fresh_dispatch.setattr(dispatch, "MAX_OFFSET", max_offset)
    torch.testing.assert_close(entry(x, qweight, scale, bias), whole, rtol=1e-5, atol=1e-5)
    assert len(shapes) > 1
    assert all(n * k <= max_offset and m * 8 * max(n, k) <= max_offset for n, k, m in shapes)
