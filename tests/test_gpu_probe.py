"""The start-up device probe: arch-flag parsing, the capability checks and their messages, the bandwidth
arithmetic, the NVML mapping, and the plan's decode bound; the real probe runs with `-m gpu`."""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest
import torch

from vramlite.engine import gpu_probe
from vramlite.engine.gpu_probe import (
    GpuProbe,
    PcieLink,
    UnsupportedDeviceError,
    arch_runs_on,
    bandwidth,
    check_build,
    check_capability,
    parse_arch,
    probe_device,
)
from vramlite.engine.offload.planner import plan_offload, plan_table

MiB = 2**20
# torch.cuda.get_arch_list() of torch 2.7's CUDA 12.6 and 12.8 wheels: the first has sm_60 (runs on sm_61).
CU126_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU128_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


@pytest.mark.parametrize(("flag", "parsed"), [
    ("sm_61", ("sm", (6, 1))), ("sm_90a", ("sm", (9, 0))), ("compute_90", ("compute", (9, 0))),
    ("sm_120", ("sm", (12, 0))), ("sm_100f", ("sm", (10, 0))),
])
def test_parse_arch(flag, parsed):
    assert parse_arch(flag) == parsed


@pytest.mark.parametrize("flag", ["gfx90a", "sm_", "sm_6", "sm61", "lto_90", "sm_x1"])
def test_parse_arch_rejects(flag):
    with pytest.raises(ValueError, match="not a CUDA arch flag"):
        parse_arch(flag)


@pytest.mark.parametrize(("flag", "capability", "runs"), [
    ("sm_60", (6, 1), True),  # same major, lower minor: SASS is compatible
    ("sm_61", (6, 1), True),
    ("sm_61", (6, 0), False),
    ("sm_70", (6, 1), False),
    ("sm_50", (6, 1), False),  # another major needs PTX
    ("compute_50", (6, 1), True),  # PTX: the driver compiles it for newer GPUs
    ("compute_70", (6, 1), False),
    ("sm_90a", (9, 0), True),
    ("sm_90a", (10, 0), False),
])
def test_arch_runs_on(flag, capability, runs):
    assert arch_runs_on(flag, capability) is runs


@pytest.mark.parametrize("capability", [(6, 0), (5, 2), (3, 7)])
def test_too_old_gpu_names_its_capability_and_the_cpu_way_out(capability):
    cc = "{}.{}".format(*capability)
    with pytest.raises(UnsupportedDeviceError) as err:
        check_capability("Tesla P100", capability, CU126_ARCHS)
    message = str(err.value)
    assert f"compute capability {cc}" in message and "sm_{}{}".format(*capability) in message
    assert "Tesla P100" in message and "--device cpu" in message and "6.1" in message


def test_torch_build_without_code_for_the_gpu():
    check_capability("NVIDIA GeForce GTX 1060 6GB", (6, 1), CU126_ARCHS)
    check_capability("NVIDIA GeForce GTX 1060 6GB", (6, 1), ())  # unknown arch list: no complaint
    with pytest.raises(UnsupportedDeviceError, match=r"compute capability 6\.1 \(sm_61\).*cu126.*--device cpu"):
        check_capability("NVIDIA GeForce GTX 1060 6GB", (6, 1), CU128_ARCHS)
    check_capability("NVIDIA H100", (9, 0), CU128_ARCHS)


def test_check_build_wants_pascal_sass():
    check_build((6, 1), CU126_ARCHS)
    with pytest.raises(UnsupportedDeviceError, match="CPU-only"):
        check_build((6, 1), ())
    with pytest.raises(UnsupportedDeviceError, match="none of which runs on sm_61"):
        check_build((6, 1), CU128_ARCHS)
    with pytest.raises(UnsupportedDeviceError, match="none of which"):
        check_build((6, 1), ("compute_60", "sm_70"))  # PTX alone is not enough for the image


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")
def test_check_build_command_fails_on_a_cpu_torch(capsys):
    assert gpu_probe.main(["--check-build", "6.1"]) == 1
    assert "CPU-only" in capsys.readouterr().out


def test_probe_command_runs_as_a_module_of_its_own(tmp_path):
    """`python -m vramlite.engine.gpu_probe` (the Docker build runs it): the engine package loads nothing on
    import, so runpy does not find the probe module imported already and run a second copy of it."""
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "vramlite.engine.gpu_probe"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("event=gpu_probe device=")


def test_bandwidth_arithmetic():
    assert bandwidth(64 * MiB, [0.005] * 4) == pytest.approx(64 * MiB / 0.005)
    assert bandwidth(100, [1.0, 3.0]) == 50.0  # total bytes over total time, not a mean of rates
    assert bandwidth(100, []) == 0.0 and bandwidth(100, [0.0]) == 0.0


def test_cpu_probe():
    probe = probe_device(torch.device("cpu"))
    assert probe == GpuProbe.cpu() and probe.capability == "" and probe.h2d_bytes_per_second == 0
    assert probe.as_dict()["compute_capability"] is None
    line = probe.log_line()
    assert line.startswith("event=gpu_probe device=cpu") and "\n" not in line


def test_gpu_probe_fields():
    probe = GpuProbe("cuda:0", "NVIDIA GeForce GTX 1060 6GB", (6, 1), 6 * 2**30, 5 * 2**30,
                     PcieLink(1, 16, 3, 16), 12.3e9, True, CU126_ARCHS)
    info = probe.as_dict()
    assert info["compute_capability"] == "6.1" and info["pcie"]["max_generation"] == 3
    assert info["torch_archs"] == list(CU126_ARCHS)
    line = probe.log_line()
    assert 'name="NVIDIA GeForce GTX 1060 6GB"' in line and "pcie_gen=3 pcie_width=16 pcie_gen_now=1" in line
    assert "h2d_probe_gbps=12.30" in line


class FakeNvml(types.ModuleType):
    """pynvml's calls the probe makes, for a GPU linked at gen 1 now (idle) and gen 3 x16 at most."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail: bool = False) -> None:
        super().__init__("pynvml")
        self.fail = fail
        self.shut_down = False
        self.asked: list[str] = []

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked.append(uuid)
        if self.fail:
            raise self.NVMLError("not found")
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):
        self.asked.append(f"index {index}")
        return "handle"

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):
        return 1

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
        return 16

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle):
        return 3

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle):
        return 16


def test_pcie_link_from_nvml(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu_probe.pcie_link("1234-abcd", 0) == PcieLink(generation=1, width=16, max_generation=3, max_width=16)
    assert nvml.asked == ["GPU-1234-abcd"] and nvml.shut_down
    assert gpu_probe.pcie_link(None, 2) is not None and nvml.asked[-1] == "index 2"
    failing = FakeNvml(fail=True)
    monkeypatch.setitem(sys.modules, "pynvml", failing)
    assert gpu_probe.pcie_link("1234", 0) is None and failing.shut_down


def test_pcie_link_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert gpu_probe.pcie_link("1234", 0) is None


def test_plan_decode_bound_is_streamed_bytes_over_bandwidth():
    layers = [100 * MiB] * 8
    plan = plan_offload(layers, 10 * MiB, 0, 0, 500 * MiB, h2d_bytes_per_second=12e9)
    assert plan.streamed and plan.host_bytes == plan.streamed_bytes == 100 * MiB * len(plan.streamed)
    assert plan.decode_seconds == pytest.approx(plan.streamed_bytes / 12e9)
    assert plan.as_dict()["decode_seconds_bound"] == plan.decode_seconds
    text = "\n".join(plan.describe())
    assert f"expected decode time per token ≥ {plan.decode_seconds * 1e3:.1f} ms" in text and "12.00 GB/s" in text
    table = "\n".join(plan_table(plan, max_batch_size=4))
    assert f"{1 / plan.decode_seconds:.2f} tokens/s per sequence" in table
    assert f"{4 / plan.decode_seconds:.2f} tokens/s for a batch of 4" in table
    unknown = plan_offload(layers, 10 * MiB, 0, 0, 500 * MiB)
    assert unknown.decode_seconds is None and "unknown" in unknown.describe()[-1]
    assert plan_offload(layers, 0, 0, 0, 800 * MiB, h2d_bytes_per_second=12e9).decode_seconds == 0.0


@pytest.mark.gpu
def test_real_probe_on_the_gpu():
    start = time.perf_counter()
    probe = probe_device(torch.device("cuda"))
    took = time.perf_counter() - start
    assert probe.compute_capability >= (6, 1) and probe.name and probe.total_bytes >= probe.free_bytes > 0
    assert probe.h2d_pinned and probe.h2d_bytes_per_second > 1e9  # any PCIe link moves more than 1 GB/s pinned
    assert took < 5  # the copies stop after about a second; the rest is CUDA and NVML start-up
    if probe.pcie is not None:
        assert probe.pcie.max_generation >= 1 and probe.pcie.max_width >= 1
