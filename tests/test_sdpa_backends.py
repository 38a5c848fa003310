"""Which SDPA kernels a forward pass lets torch choose (`sdpa_backends`); the GPU check is in test_gpu_paths.py."""

from __future__ import annotations

import torch

from vramlite.engine.layers.attention import sdpa_backends

FLAGS = {
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}


def flags() -> dict[str, bool]:
    return {name: enabled() for name, enabled in FLAGS.items()}


def test_a_cuda_pass_never_lets_sdpa_pick_cudnn_and_restores_the_flags_after():
    before = flags()
    assert before["cudnn"], "torch's default: cuDNN's attention enabled"
    with sdpa_backends(torch.device("cuda")):
        assert flags() == {"cudnn": False, "flash": True, "efficient": True, "math": True}
    assert flags() == before


def test_a_cpu_pass_leaves_the_flags_alone():
    before = flags()
    with sdpa_backends(torch.device("cpu")):
        assert flags() == before
