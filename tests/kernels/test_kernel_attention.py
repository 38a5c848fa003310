"""The decode attention kernel against its torch reference, and the reference against plain attention."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.kernel_testing import HAS_CUDA
from vramlite.kernels.attention import decode_attention_ref, decode_attention_triton

pytest.importorskip("triton")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cache_operands(heads: int, kv_heads: int, d: int, positions: list[int], slots: list[int], dtype: torch.dtype,
                   device: str) -> tuple[torch.Tensor, ...]:
    """q [B, heads, D] and random caches of 6 slots × 70 positions (what lies past a sequence must not count)."""
    gen = torch.Generator().manual_seed(len(positions) * 100 + heads + d)
    q = torch.randn(len(positions), heads, d, generator=gen).to(dtype)
    cache_k = torch.randn(6, kv_heads, 70, d, generator=gen).to(dtype)
    cache_v = torch.randn(6, kv_heads, 70, d, generator=gen).to(dtype)
    index = (torch.tensor(slots), torch.tensor(positions))
    return tuple(t.to(device) for t in (q, cache_k, cache_v, *index))


@pytest.mark.parametrize("pieces", [1, 3], ids=["whole", "in-pieces"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 16), (6, 2, 24), (8, 1, 64), (4, 2, 256)])
def test_kernel_matches_the_reference(heads: int, kv_heads: int, d: int, dtype: torch.dtype, pieces: int,
                                      device: str) -> None:
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("Triton's interpreter mishandles bf16")
    # lengths 1, across a block edge and up to the whole cache; slots out of order, one reused. In pieces: three of
    # one 32-key block at D = 256 (some past a short sequence's end, empty), one of 128 keys at smaller D
    positions, slots = [0, 16, 69, 40, 5], [3, 0, 5, 1, 3]
    q, k, v, slots_t, positions_t = cache_operands(heads, kv_heads, d, positions, slots, dtype, device)
    q = torch.cat((q, q), dim=-1)[..., :d]  # rows with a stride other than heads × D, as a split qkv gives
    out = decode_attention_triton(q, k, v, slots_t, positions_t, 0.3, max_length=70, pieces=pieces)
    expected = decode_attention_ref(q, k, v, slots_t, positions_t, 0.3)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    assert out.dtype == dtype and out.shape == (5, heads, d)


def test_long_sequences_split_into_pieces_that_merge(monkeypatch, device: str) -> None:
    import vramlite.kernels.attention as module

    merge, merged = module._merge_pieces, []

    def spy(acc: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor) -> torch.Tensor:
        merged.append(tuple(acc.shape))
        return merge(acc, m, l_sum)

    monkeypatch.setattr(module, "_merge_pieces", spy)
    q, k, v, slots, positions = cache_operands(4, 2, 256, [69, 3], [0, 1], torch.float32, device)
    out = decode_attention_triton(q, k, v, slots, positions, 0.1, max_length=70, pieces=3)
    assert merged == [(2, 4, 3, 256)]
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, slots, positions, 0.1), rtol=1e-5, atol=1e-5)
    assert module.pieces_for(programs=32, max_length=4096, block_n=64, multiprocessors=132) == 9
    assert module.pieces_for(programs=1024, max_length=4096, block_n=64, multiprocessors=132) == 1
    assert module.pieces_for(programs=32, max_length=300, block_n=64, multiprocessors=132) == 1


def test_the_reference_is_attention_over_each_sequence_s_own_keys() -> None:
    q, k, v, slots, positions = cache_operands(6, 2, 24, [0, 16, 69], [2, 0, 5], torch.float64, "cpu")
    out = decode_attention_ref(q, k, v, slots, positions, 0.25)
    for b, (slot, position) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        keys = k[slot, :, : position + 1].repeat_interleave(3, dim=0)
        values = v[slot, :, : position + 1].repeat_interleave(3, dim=0)
        expected = F.scaled_dot_product_attention(q[b, :, None], keys, values, scale=0.25)[:, 0]
        torch.testing.assert_close(out[b], expected)


def test_no_sequences_is_an_empty_result(device: str) -> None:
    q, k, v, slots, positions = cache_operands(4, 4, 16, [], [], torch.float32, device)
    assert decode_attention_triton(q, k, v, slots, positions, 1.0).shape == (0, 4, 16)


@pytest.mark.parametrize("change,message", [
    (dict(cache_v=torch.zeros(6, 2, 70, 24, dtype=torch.float16)), "share one float dtype"),
    (dict(q=torch.zeros(3, 5, 24)), "does not fit"),
    (dict(slots=torch.zeros(2, dtype=torch.long)), "must be \\[3\\]"),
    (dict(cache_k=torch.zeros(6, 2, 24, 70).transpose(2, 3)), "contiguous in their last"),
])
def test_unfit_operands_are_refused(change: dict, message: str) -> None:
    q, k, v, slots, positions = cache_operands(6, 2, 24, [0, 16, 69], [2, 0, 5], torch.float32, "cpu")
    operands = dict(q=q, cache_k=k, cache_v=v, slots=slots, positions=positions, scale=1.0) | change
    with pytest.raises(ValueError, match=message):
        decode_attention_triton(**operands)


def decode_logits(model_dir, device: str) -> list[torch.Tensor]:
    """A model's logits over three decode steps of three sequences of different lengths in slots out of order
    (2, 0, 3 of 4), a prefill of a fourth sequence mixed into the second step."""
    from vramlite.engine.loader import load_model
    from vramlite.engine.runner import Chunk, ModelRunner

    model, context = load_model(model_dir, torch.device(device), torch.float32)
    runner = ModelRunner(model, torch.device(device), torch.float32, num_slots=4, context=context)
    prompts = {2: [1, 5, 9, 13, 17], 0: [1, *range(20, 36)], 3: [1, 7, 7]}  # 16 keys: a block edge
    for slot, prompt in prompts.items():
        runner.forward([Chunk(slot, prompt, 0)])
    logits = []
    for step in range(3):
        chunks = [Chunk(slot, [40 + step], len(prompt) + step) for slot, prompt in prompts.items()]
        logits.append(runner.forward(chunks + ([Chunk(1, [1, 3, 5], 0)] if step == 1 else [])).cpu())
    return logits


def test_a_model_s_batched_decode_takes_the_kernel_and_matches_the_matmuls(monkeypatch, tmp_path, spm_tokenizer_dir,
                                                                           device: str) -> None:
    """The engine's path to the kernel (`vramlite.engine.layers.attention._cached_decode`): on a GPU, and here on
    the CPU with the Triton backend asked for, which runs the kernel in the interpreter."""
    import vramlite.engine.layers.attention as attention
    import vramlite.kernels.dispatch as dispatch
    from tests.conftest import save_tiny_model
    from tests.test_models import CASES
    from vramlite.kernels import Backend

    torch.manual_seed(0)
    model_dir = save_tiny_model(CASES["llama"](), tmp_path / "llama", spm_tokenizer_dir)  # 4 heads over 2
    reference = decode_logits(model_dir, "cpu")  # batched matmuls: the CPU's path
    calls = []
    monkeypatch.setattr(dispatch, "decode_attention_triton",
                        lambda *args: calls.append(args[0].shape) or decode_attention_triton(*args))
    if device == "cpu":
        for module in (attention, dispatch):
            monkeypatch.setattr(module, "backend_for", lambda _: Backend.TENSORCORE)
    for got, expected in zip(decode_logits(model_dir, device), reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert calls == [(3, 4, 16)] * 2 * 3  # every layer of every step, the prefill's tokens apart
