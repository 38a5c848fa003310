"""Sampler: parameter validation, penalties, top-k/top-p masks, greedy, seeding and distribution sanity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vramlite.engine import sampler
from vramlite.engine.sampler import (
    Sampler,
    SamplerState,
    SamplingParams,
    apply_penalties_,
    inverse_cdf_pick,
    min_p_mask,
    top_k_mask,
    top_k_top_p_mask,
    top_p_mask,
)

FAST = settings(max_examples=40, deadline=None)


def random_logits(seed: int, rows: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# Small integer logits make ties common, which is where top-k and top-p boundaries are subtle.
tied_logits = (
    st.integers(1, 4)
    .flatmap(
        lambda rows: st.integers(1, 24).flatmap(
            lambda vocab: st.lists(
                st.lists(st.integers(-4, 4), min_size=vocab, max_size=vocab), min_size=rows, max_size=rows
            )
        )
    )
    .map(lambda rows: torch.tensor(rows, dtype=torch.float32))
)


# --- SamplingParams ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("top_k", 2.0),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", 3),
        ("presence_penalty", -3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("stop", ["x"] * 17),
        ("stop", [""]),
        ("stop", ["x" * 257]),
        ("stop", [3]),
        ("seed", 1.0),
        ("ignore_eos", 1),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_p", math.nan),
        ("min_tokens", -1),
        ("min_tokens", 129),  # more than max_tokens
        ("min_tokens", 1.0),
    ],
)
def test_bad_field_is_rejected_with_its_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_error_message_names_value_and_range() -> None:
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got 1\.5"):
        SamplingParams(top_p=1.5)


def test_edge_values_are_accepted() -> None:
    p = SamplingParams(
        max_tokens=0,
        temperature=0,
        top_p=1,
        top_k=0,
        frequency_penalty=-2,
        presence_penalty=2,
        repetition_penalty=0.01,
        stop=["a" * 256] * 16,
        seed=-5,
    )
    assert p.stop == ("a" * 256,) * 16


def test_stop_list_becomes_tuple_and_string_is_one_stop() -> None:
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop="bc").stop == ("bc",)
    hash(SamplingParams(stop=["a"]))  # frozen and hashable once stop is a tuple


def test_from_kwargs() -> None:
    assert SamplingParams.from_kwargs(top_n=5).top_k == 5
    assert SamplingParams.from_kwargs(top_k=3, temperature=None) == SamplingParams(top_k=3)
    with pytest.raises(ValueError, match="not both"):
        SamplingParams.from_kwargs(top_n=5, top_k=5)
    with pytest.raises(ValueError, match="beam_width, foo"):
        SamplingParams.from_kwargs(foo=1, beam_width=2, top_p=0.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams.from_kwargs(top_n=-1)


# --- penalties --------------------------------------------------------------------------------------


def reference_penalties(
    logits: list[float], prompt: list[int], output: list[int], p: SamplingParams
) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


penalty_params = st.builds(
    SamplingParams,
    temperature=st.just(0.0),
    repetition_penalty=st.floats(0.5, 2.0),
    frequency_penalty=st.floats(-2, 2),
    presence_penalty=st.floats(-2, 2),
)


@FAST
@given(
    rows=st.lists(
        st.tuples(
            penalty_params, st.lists(st.integers(0, 15), max_size=8), st.lists(st.integers(0, 15), max_size=8)
        ),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_penalties_match_per_token_reference(rows: list, seed: int) -> None:
    vocab = 16
    logits = random_logits(seed, len(rows), vocab)
    states = []
    for params, prompt, output in rows:
        state = SamplerState(params, prompt)
        for t in output:
            state.append(t)
        states.append(state)
    got = logits.clone()
    apply_penalties_(got, range(len(states)), states)
    want = torch.tensor(
        [reference_penalties(logits[i].tolist(), pr, out, p) for i, (p, pr, out) in enumerate(rows)]
    )
    torch.testing.assert_close(got, want)
    # Greedy sampling applies the same penalties before its argmax.
    assert Sampler()(logits, states).tolist() == want.argmax(-1).tolist()


def test_penalty_counts_follow_appends_incrementally() -> None:
    state = SamplerState(SamplingParams(frequency_penalty=1.0), [1, 1, 2, 99])  # 99 is outside the vocab
    seen, counts = state.penalty_tensors(8)
    assert seen.tolist() == [1, 2] and counts.tolist() == [0, 0]
    for t in (3, 3, 5, 2):
        state.append(t)
    seen, counts = state.penalty_tensors(8)
    assert seen.tolist() == [1, 2, 3, 5] and counts.tolist() == [0, 1, 2, 1]
    state.append(5)
    assert state.penalty_tensors(8)[1].tolist() == [0, 1, 2, 2]
    seen, counts = state.penalty_tensors(4)  # a new vocabulary size rebuilds
    assert seen.tolist() == [1, 2, 3] and counts.tolist() == [0, 1, 2]


def test_penalties_of_some_rows_leave_the_others_alone() -> None:
    logits = random_logits(1, 3, 12)
    state = SamplerState(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5), [4, 7])
    state.append(7)
    got = logits.clone()
    apply_penalties_(got, [1], [state])
    want = torch.tensor(reference_penalties(logits[1].tolist(), [4, 7], [7], state.params))
    torch.testing.assert_close(got[1], want)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])


def test_logit_bias_adds_to_its_tokens_after_the_penalties() -> None:
    logits = random_logits(2, 2, 12)
    params = SamplingParams(repetition_penalty=2.0, logit_bias={3: 5.0, 7: -100})
    state = SamplerState(params, [3])
    got = logits.clone()
    apply_penalties_(got, [1], [state])
    want = torch.tensor(reference_penalties(logits[1].tolist(), [3], [], params))
    want[3] += 5.0
    want[7] -= 100
    torch.testing.assert_close(got[1], want)
    assert torch.equal(got[0], logits[0])
    greedy = [SamplerState(SamplingParams(temperature=0, logit_bias={i: 100}), []) for i in (2, 9)]
    assert Sampler()(random_logits(3, 2, 12), greedy).tolist() == [2, 9]  # biased up: picked, greedy or not
    banned = int(logits[0].argmax())
    sampled = SamplerState(SamplingParams(temperature=1.0, seed=4, logit_bias={banned: -100}), [])
    assert all(Sampler()(logits[:1] * 10, [sampled]).item() != banned for _ in range(50))


@pytest.mark.parametrize("bias", [{1: 101}, {-1: 0}, {1.5: 1}, dict.fromkeys(range(301), 1)])
def test_bad_logit_bias_is_refused(bias) -> None:
    with pytest.raises(ValueError, match="logit_bias must be at most 300 token ids"):
        SamplingParams(logit_bias=bias)


def test_sampler_does_not_modify_the_callers_logits() -> None:
    logits = random_logits(0, 2, 10)
    before = logits.clone()
    states = [SamplerState(SamplingParams(repetition_penalty=2.0, top_k=3, seed=1), [1, 2]) for _ in range(2)]
    Sampler()(logits, states)
    assert torch.equal(logits, before)


# --- top-k / top-p ----------------------------------------------------------------------------------


@FAST
@given(logits=tied_logits, data=st.data())
def test_top_k_keeps_k_or_the_ties_at_the_boundary(logits: torch.Tensor, data: st.DataObject) -> None:
    rows, vocab = logits.shape
    k = torch.tensor(data.draw(st.lists(st.integers(0, vocab + 3), min_size=rows, max_size=rows)))
    keep = top_k_mask(logits, k)
    for row, mask, kk in zip(logits, keep, k.tolist(), strict=True):
        if kk == 0 or kk >= vocab:
            assert mask.all()
            continue
        kth = row.sort(descending=True).values[kk - 1]
        assert mask.tolist() == (row >= kth).tolist()
        assert mask.sum() >= kk  # exactly k unless tokens tie with the k-th largest
        if (row == kth).sum() == 1:
            assert mask.sum() == kk


@FAST
@given(logits=tied_logits, data=st.data())
def test_top_p_keeps_the_minimal_sorted_prefix_with_mass_p(logits: torch.Tensor, data: st.DataObject) -> None:
    rows, _ = logits.shape
    p = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=rows, max_size=rows)))
    keep = top_p_mask(logits, p)
    eps = 1e-5
    for row, mask, pp in zip(logits, keep, p.tolist(), strict=True):
        probs = row.double().softmax(-1)
        assert mask[row.argmax()]
        if pp == 1.0:
            assert mask.all()
            continue
        kept, dropped = probs[mask], probs[~mask]
        if dropped.numel():
            assert kept.min() >= dropped.max() - eps  # a prefix of the tokens sorted by probability
        assert kept.sum() >= pp - eps
        assert kept.sum() - kept.min() < pp + eps  # minimal: without its least likely token it falls short


@FAST
@given(logits=tied_logits, data=st.data())
def test_top_k_then_top_p_equals_the_two_masks_applied_in_turn(
    logits: torch.Tensor, data: st.DataObject
) -> None:
    rows, vocab = logits.shape
    k = torch.tensor(data.draw(st.lists(st.integers(0, vocab), min_size=rows, max_size=rows)))
    p = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=rows, max_size=rows)))
    after_k = logits.masked_fill(~top_k_mask(logits, k), -math.inf)
    both = top_k_top_p_mask(logits, k, p)
    assert both.any(-1).all()
    assert both.tolist() == (top_k_mask(logits, k) & top_p_mask(after_k, p)).tolist()


@FAST
@given(logits=tied_logits, data=st.data())
def test_top_p_among_the_most_likely_tokens_is_what_a_full_sort_keeps(
    logits: torch.Tensor, data: st.DataObject
) -> None:
    """However few candidates top-p looks among, ties and short masses included, it keeps what sorting whole
    rows keeps (these vocabularies are below TOP_P_CANDIDATES: unpatched, every row is sorted whole)."""
    rows, vocab = logits.shape
    k = torch.tensor(data.draw(st.lists(st.integers(0, vocab), min_size=rows, max_size=rows)))
    p = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=rows, max_size=rows)))
    full = top_k_top_p_mask(logits, k, p)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler, "TOP_P_CANDIDATES", data.draw(st.integers(1, vocab)))
        assert top_k_top_p_mask(logits, k, p).tolist() == full.tolist()


def test_top_p_sorts_whole_rows_only_where_the_candidates_fall_short(monkeypatch: pytest.MonkeyPatch) -> None:
    widths = []
    among = sampler._top_p_among
    monkeypatch.setattr(sampler, "_top_p_among", lambda x, *a: widths.append((len(x), a[-1])) or among(x, *a))
    peaked = torch.cat([torch.tensor([[12.0, 11.0, 10.0]]), torch.zeros(1, 997)], dim=-1)  # top 3: mass 0.9
    flat = random_logits(0, 1, 1000, scale=0.1)
    top_k_top_p_mask(torch.cat([peaked, flat]), torch.zeros(2, dtype=torch.long), torch.tensor([0.8, 0.8]))
    assert widths == [(2, sampler.TOP_P_CANDIDATES), (1, 1000)]  # the flat row, sorted whole
    widths.clear()
    top_k_top_p_mask(flat, torch.zeros(1, dtype=torch.long), torch.tensor([0.8]))
    assert widths == [(1, 1000)]  # no row's largest probability could make 256 tokens hold 0.8


def test_top_p_below_float32s_smallest_keeps_the_most_likely_token() -> None:
    logits = random_logits(3, 2, 40)
    keep = top_p_mask(logits, torch.tensor([5e-324, 1e-46], dtype=torch.float64).float())  # both 0 in float32
    assert keep.tolist() == torch.nn.functional.one_hot(logits.argmax(-1), 40).bool().tolist()


@FAST
@given(logits=tied_logits, data=st.data())
def test_min_p_keeps_what_hfs_min_p_warper_keeps(logits: torch.Tensor, data: st.DataObject) -> None:
    from transformers.generation.logits_process import MinPLogitsWarper

    min_p = data.draw(st.sampled_from([0.05, 0.3, 0.5, 1.0]))
    ours = min_p_mask(logits, torch.full((logits.size(0),), min_p))
    theirs = MinPLogitsWarper(min_p)(None, logits.clone()) != -math.inf
    assert torch.equal(ours, theirs)


def test_min_p_zero_keeps_everything_and_rows_take_their_own() -> None:
    logits = torch.tensor([[0.0, -1.0, -3.0], [0.0, -1.0, -3.0]])
    keep = min_p_mask(logits, torch.tensor([0.0, 0.3]))  # exp(-1) = 0.37 >= 0.3 > exp(-3)
    assert keep.tolist() == [[True, True, True], [True, True, False]]


def test_samples_stay_inside_min_p_after_temperature() -> None:
    """min-p compares probabilities after temperature: at temperature 2, exp(-2 / 2) = 0.37 passes 0.3."""
    logits = torch.tensor([[0.0, -2.0, -6.0, -50.0]])
    for temperature, allowed in ((1.0, {0}), (2.0, {0, 1})):
        picked = set()
        for seed in range(200):
            state = SamplerState(SamplingParams(temperature=temperature, min_p=0.3, seed=seed), [])
            picked.add(int(Sampler()(logits, [state])))
        assert picked == allowed


def test_min_tokens_bans_the_end_tokens_until_reached() -> None:
    logits = torch.tensor([[0.0, 9.0, 5.0, 1.0]])  # token 1 (EOS) is by far the most likely, then 2 (a stop)
    state = SamplerState(SamplingParams(temperature=0, min_tokens=2), [], end_ids=[1, 2])
    assert state.penalized
    picked = []
    for _ in range(3):
        picked.append(int(Sampler()(logits, [state])))
        state.append(picked[-1])
    assert picked == [3, 3, 1]
    assert logits.tolist() == [[0.0, 9.0, 5.0, 1.0]]  # on a copy


def test_inverse_cdf_pick_gives_a_vocabulary_id_for_nan_logits() -> None:
    assert 0 <= inverse_cdf_pick(torch.full((1, 5), math.nan), torch.tensor([0.3])).item() < 5


def test_inverse_cdf_pick_never_lands_on_a_masked_token() -> None:
    inf = math.inf
    logits = torch.tensor([[-inf, 0.0, 0.0, -inf], [-inf, 0.0, 0.0, -inf], [0.0, -inf, 5.0, -inf]])
    u = torch.tensor([0.0, 1 - 2**-24, 0.5])
    assert inverse_cdf_pick(logits, u).tolist() == [1, 2, 2]


def test_inverse_cdf_pick_never_returns_a_masked_token_a_rounded_scan_points_at(monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    logits = torch.tensor([[0.0, -math.inf, 2.0, -math.inf], [1.0, 0.0, -math.inf, 0.5]])
    search = torch.searchsorted
    # as if the CUDA scan had put the running sum at token 1 (row 0) and token 2 (row 1) a hair above the last
    monkeypatch.setattr(torch, "searchsorted", lambda cdf, v, **kw: torch.minimum(
        search(cdf, v, **kw), torch.tensor([[1], [2]])))
    assert inverse_cdf_pick(logits, torch.tensor([0.9, 0.9])).tolist() == [2, 0]


def test_inverse_cdf_draws_follow_the_softmax() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])
    draws = 20000
    u = torch.rand(draws, generator=torch.Generator().manual_seed(0))
    picks = inverse_cdf_pick(probs.log().expand(draws, -1), u)
    share = torch.bincount(picks, minlength=6) / draws
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((share - probs).abs() <= 5 * sigma).all(), share  # the zero-probability token: never


# --- sampling ---------------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 2**16), rows=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.bfloat16])
)
def test_temperature_zero_is_argmax(seed: int, rows: int, dtype: torch.dtype) -> None:
    logits = random_logits(seed, rows, 50).to(dtype)
    states = [SamplerState(SamplingParams(temperature=0.0), []) for _ in range(rows)]
    out = Sampler()(logits, states)
    assert out.dtype == torch.int64
    assert out.tolist() == logits.float().argmax(-1).tolist()


def test_greedy_ties_go_to_the_first_maximum() -> None:
    """As `argmax`: bf16 logits of a large vocabulary tie often; a tie must not pick by the CPU's thread split."""
    logits = torch.zeros(3, 40000, dtype=torch.bfloat16)
    logits[0, [7, 20000, 39999]] = 1
    logits[1, 39999] = 1
    states = [SamplerState(SamplingParams(temperature=0.0), []) for _ in range(3)]
    assert Sampler()(logits, states).tolist() == [7, 39999, 0] == logits.argmax(-1).tolist()


def test_greedy_rows_in_a_mixed_batch_are_argmax() -> None:
    logits = random_logits(3, 4, 50)
    states = [SamplerState(SamplingParams(temperature=t, seed=7), []) for t in (0.0, 1.0, 0.0, 1.5)]
    out = Sampler()(logits, states)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


random_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.3]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    top_k=st.sampled_from([0, 1, 5, 40]),
    frequency_penalty=st.sampled_from([0.0, 0.5]),
    presence_penalty=st.sampled_from([0.0, -0.5]),
    repetition_penalty=st.sampled_from([1.0, 1.2]),
    seed=st.integers(0, 2**62) | st.none(),
)


@FAST
@given(
    target=st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.7, 1.0, 2.0]),
        top_p=st.sampled_from([1.0, 0.8]),
        top_k=st.sampled_from([0, 10]),
        frequency_penalty=st.sampled_from([0.0, 0.4]),
        seed=st.integers(0, 2**62),
    ),
    others=st.lists(random_params, min_size=4, max_size=4),
    position=st.integers(0, 4),
    logits_seed=st.integers(0, 1000),
)
def test_seeded_row_is_the_same_alone_or_anywhere_in_a_batch(
    target: SamplingParams, others: list[SamplingParams], position: int, logits_seed: int
) -> None:
    steps = 4
    alone = []
    # Each step's logits for the target row are the same row of the same random matrix in both runs.
    states = [SamplerState(target, [1, 2, 3])]
    batch_params = [*others[:position], target, *others[position:]]
    batch_states = [SamplerState(p, [1, 2, 3]) for p in batch_params]
    sampler = Sampler()
    for step in range(steps):
        logits = random_logits(logits_seed + step, 5, 64)
        row = logits[position : position + 1]
        alone.append(sampler(row, states).item())
        states[0].append(alone[-1])
        for state, token in zip(batch_states, sampler(logits, batch_states).tolist(), strict=True):
            state.append(token)
    assert batch_states[position].output_ids == alone


def test_same_seed_repeats_and_different_seeds_differ() -> None:
    states = [SamplerState(SamplingParams(temperature=1.0, seed=s), []) for s in (11, 11, 12)]
    for step in range(30):
        logits = random_logits(step, 1, 1000).expand(3, -1)  # every row sees the same logits
        for state, token in zip(states, Sampler()(logits, states).tolist(), strict=True):
            state.append(token)
    a, b, c = (s.output_ids for s in states)
    assert a == b
    assert a != c  # 30 draws from a broad distribution over 1000 tokens cannot all agree by chance


def test_unseeded_states_get_distinct_random_seeds() -> None:
    seeds = {SamplerState(SamplingParams(), []).seed for _ in range(8)}
    assert len(seeds) == 8


def test_a_dominant_token_is_picked_most_often() -> None:
    logits = torch.zeros(1, 20)
    logits[0, 7] = 4.0  # p(7) = e^4 / (e^4 + 19) ~ 0.74
    state = SamplerState(SamplingParams(temperature=1.0, seed=0), [])
    picks = [Sampler()(logits, [state]).item() for _ in range(400)]
    share = picks.count(7) / len(picks)
    assert 0.65 < share < 0.83
    assert len(set(picks)) > 5  # the rest is still sampled


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])

    def share_of_argmax(temperature: float) -> float:
        state = SamplerState(SamplingParams(temperature=temperature, seed=1), [])
        picks = [Sampler()(logits, [state]).item() for _ in range(300)]
        return picks.count(0) / len(picks)

    assert share_of_argmax(0.2) > share_of_argmax(1.0) > share_of_argmax(5.0)


@FAST
@given(seed=st.integers(0, 2**16), temperature=st.floats(0.1, 5.0), top_p=st.floats(0.05, 1.0))
def test_top_k_one_is_always_argmax(seed: int, temperature: float, top_p: float) -> None:
    logits = random_logits(seed, 3, 40)
    states = [
        SamplerState(SamplingParams(temperature=temperature, top_k=1, top_p=top_p, seed=i), [])
        for i in range(3)
    ]
    assert Sampler()(logits, states).tolist() == logits.argmax(-1).tolist()


def test_samples_stay_inside_top_k_and_top_p() -> None:
    logits = random_logits(9, 1, 30)
    order = logits[0].argsort(descending=True)
    top_k_state = SamplerState(SamplingParams(temperature=2.0, top_k=3, seed=3), [])
    picks = {Sampler()(logits, [top_k_state]).item() for _ in range(200)}
    assert picks == set(order[:3].tolist())  # 200 draws at temperature 2 reach all three
    top_p_state = SamplerState(SamplingParams(temperature=1.0, top_p=0.5, seed=3), [])
    allowed = set(top_p_mask(logits, torch.tensor([0.5]))[0].nonzero().flatten().tolist())
    assert {Sampler()(logits, [top_p_state]).item() for _ in range(200)} <= allowed


def test_rejects_logits_that_do_not_match_the_states() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        Sampler()(torch.zeros(2, 5), [SamplerState(SamplingParams(), [])])


# --- on a GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_masks_on_the_gpu_are_the_cpus() -> None:
    """Peaked rows (settled among the candidates) and flat ones (sorted whole), with and without top-k.

    A flat row with top-p alone sums ~29000 probabilities of ~3e-5 before reaching p; the GPU's float32 scan and
    the CPU's may differ there by about one such step, so its kept prefix may end a token or two apart."""
    peaked = random_logits(0, 4, 32000, scale=3.0)
    peaked[:, :40] += 12.0
    logits = torch.cat([peaked, random_logits(1, 4, 32000, scale=0.5)]).bfloat16().float()  # ties, as bf16 gives
    k = torch.tensor([0, 50, 0, 1000] * 2)
    p = torch.tensor([0.9, 0.9, 1.0, 0.95] * 2)
    cpu = top_k_top_p_mask(logits, k, p)
    gpu = top_k_top_p_mask(logits.cuda(), k.cuda(), p.cuda()).cpu()
    differ = (gpu != cpu).sum(dim=-1).tolist()
    assert differ[:4] == [0, 0, 0, 0] and differ[5:] == [0, 0, 0]
    assert differ[4] <= 2


@pytest.mark.gpu
def test_seeded_sampling_on_the_gpu_repeats_and_stays_in_the_mask() -> None:
    logits = random_logits(2, 3, 32000).cuda()
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5), SamplingParams(temperature=1.0, top_k=20, seed=6),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=7)]

    def run() -> list[list[int]]:
        states = [SamplerState(p, [1, 2, 3], device="cuda") for p in params]
        for _ in range(20):
            for state, token in zip(states, Sampler()(logits, states).tolist(), strict=True):
                state.append(token)
        return [s.output_ids for s in states]

    first = run()
    assert run() == first
    scaled = logits[:2] / torch.tensor([[0.8], [1.0]], device="cuda")  # top-p acts after the temperature
    allowed = top_k_top_p_mask(scaled, torch.tensor([0, 20], device="cuda"), torch.tensor([0.9, 1.0], device="cuda"))
    for row, tokens in enumerate(first[:2]):
        assert allowed[row, tokens].all()


def test_token_scores_are_log_softmax_with_each_rows_own_count() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = -math.inf  # no probability: a finite floor, which JSON can carry
    tokens = torch.tensor([4, 7, 9])
    scores = sampler.token_scores(logits, tokens, [2, 0, 5])
    reference = logits.log_softmax(-1)
    assert [s.logprob for s in scores] == pytest.approx([reference[0, 4].item(), sampler.IMPOSSIBLE_LOGPROB,
                                                         reference[2, 9].item()])
    assert [len(s.top) for s in scores] == [2, 0, 5]
    top = reference[2].topk(5)
    assert [t for t, _ in scores[2].top] == top.indices.tolist()
    assert [lp for _, lp in scores[2].top] == pytest.approx(top.values.tolist())
