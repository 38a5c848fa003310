"""Which attention a step takes: the SDPA kernels a forward pass lets torch choose (`sdpa_backends`; the GPU check
is in test_gpu_paths.py) and the decode tokens that the decode attention kernel may serve (its engine path is
tested in tests/kernels/test_kernel_attention.py)."""

from __future__ import annotations

import torch

from vramlite.engine.layers.attention import AttentionMetadata, sdpa_backends, windowed

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


def decode_meta(lengths: list[int]) -> AttentionMetadata:
    positions = torch.tensor([n - 1 for n in lengths])
    return AttentionMetadata(positions=positions, write_slots=torch.arange(len(lengths)), num_decode=len(lengths),
                             decode_slots=slice(0, len(lengths)), decode_kv_len=max(lengths), decode_mask=None,
                             prefills=[])


def test_decode_tokens_inside_their_window_attend_by_length_and_past_it_by_mask():
    assert decode_meta([3, 8]).decode_by_length
    assert windowed(decode_meta([3, 8]), window=8, cache_length=64).decode_by_length
    for cache_length in (64, 8):  # the window's band in a whole cache, a ring
        past = windowed(decode_meta([3, 9]), window=8, cache_length=cache_length)
        assert not past.decode_by_length and past.decode_mask is not None
