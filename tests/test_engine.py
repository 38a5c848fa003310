"""The Engine's request lifecycle: streaming, stop strings, seeds, aborts at any step, slot reuse."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.conftest import save_tiny_llama
from vramlite.engine import Engine, FinishReason, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_dir(model_dir, device="cpu", max_batch_size=3)


SAMPLED = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)


def test_stream_concatenates_to_generate(engine):
    whole = engine.generate("床前明月光", SAMPLED)
    steps = list(engine.stream("床前明月光", SAMPLED))
    assert "".join(s.text for s in steps) == whole.text
    assert [s.token_id for s in steps] == whole.token_ids
    assert steps[-1].finish_reason is FinishReason.LENGTH and all(not s.finished for s in steps[:-1])


def test_seed_gives_same_output_and_other_seed_differs(engine):
    a = engine.generate("Hello", SAMPLED)
    b = engine.generate("Hello", SAMPLED)
    c = engine.generate("Hello", SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True))
    assert a.token_ids == b.token_ids != c.token_ids


def test_stop_string_ends_generation_and_is_not_returned(engine):
    free = engine.generate("The quick", SAMPLED)
    stop = free.text[5:8]
    assert stop
    out = engine.generate("The quick", SamplingParams(**{**SAMPLED.__dict__, "stop": (stop,)}))
    assert out.finish_reason is FinishReason.STOP and out.stop_string == stop
    assert out.text == free.text[: free.text.index(stop)]
    assert free.stop_string is None
    kept = engine.generate("The quick", SamplingParams(**{**SAMPLED.__dict__, "stop": (stop,),
                                                          "include_stop_str_in_output": True}))
    assert kept.text == free.text[: free.text.index(stop) + len(stop)] and kept.stop_string == stop


def test_abort_mid_generation_leaves_others_unchanged_and_frees_the_slot(engine):
    prompts = ["Hello", "床前明月光", "Numbers 12345"]
    alone = [engine.generate(p, SAMPLED).token_ids for p in prompts]
    ids = [engine.add_request(p, SAMPLED) for p in prompts]
    tokens: dict[int, list[int]] = {i: [] for i in ids}

    def step() -> None:
        for out in engine.step():
            if out.token_id is not None:
                tokens.setdefault(out.seq_id, []).append(out.token_id)

    for _ in range(5):
        step()
    assert engine.runner.cache.num_free_slots == 0
    assert engine.abort(ids[1]).finish_reason is FinishReason.CANCELLED
    assert engine.runner.cache.num_free_slots == 1
    late = engine.add_request("Hello", SAMPLED)  # takes the freed slot while the others run on
    while engine.has_unfinished():
        step()
    assert engine.runner.cache.num_free_slots == 3
    assert engine.abort(late) is None  # already finished
    assert tokens[ids[0]] == alone[0] and tokens[ids[2]] == alone[2] and tokens[late] == alone[0]
    assert len(tokens[ids[1]]) == 5


def test_more_requests_than_slots_wait_their_turn(engine):
    prompts = [f"Hello {i}" for i in range(7)]
    alone = [engine.generate(p, SAMPLED).token_ids for p in prompts]
    assert [c.token_ids for c in engine.generate_batch(prompts, SAMPLED)] == alone


def test_long_prompt_is_prefilled_in_chunks(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu", max_batch_size=2, max_tokens_per_step=8)
    prompt = list(range(3, 40))
    chunked = engine.generate(prompt, SAMPLED)
    whole = Engine.from_dir(model_dir, device="cpu", max_batch_size=2).generate(prompt, SAMPLED)
    assert chunked.token_ids == whole.token_ids


def test_max_tokens_zero_generates_nothing(engine):
    out = engine.generate("Hello", max_tokens=0)
    assert out.completion_tokens == 0 and out.text == "" and out.finish_reason is FinishReason.LENGTH


def test_eos_ends_generation(engine):
    greedy = engine.generate("Hello", max_tokens=5, temperature=0, ignore_eos=True)
    first = greedy.token_ids[0]
    engine.eos_ids = (first,)
    try:
        out = engine.generate("Hello", max_tokens=5, temperature=0)
    finally:
        engine.eos_ids = (2,)
    assert out.finish_reason is FinishReason.EOS and out.token_ids == [first] and out.text == ""


def test_min_tokens_holds_off_eos_and_stop_tokens(engine):
    """EOS (2) and a stop token, each all but forced by logit_bias, come only once min_tokens are out."""
    for end, kwargs, reason in ((2, {}, FinishReason.EOS), (7, {"stop_token_ids": (7,)}, FinishReason.STOP)):
        params = dict(max_tokens=8, temperature=0, logit_bias={end: 100}, **kwargs)
        assert engine.generate("Hello", SamplingParams(**params)).token_ids == [end]
        out = engine.generate("Hello", SamplingParams(**params, min_tokens=3))
        assert out.finish_reason is reason and len(out.token_ids) == 4 and out.token_ids[-1] == end
        assert end not in out.token_ids[:3]


def test_min_tokens_matches_stop_strings_only_after_them(engine):
    """A stop string counts from the text of the token after the first min_tokens (each step's text, as streamed)."""
    texts = [step.text for step in engine.stream("The quick", SAMPLED)]
    head, tail = "".join(texts[:6]), "".join(texts[6:])
    stop = head[1:3]
    assert stop and not engine.generate("The quick", replace(SAMPLED, stop=(stop,))).text.startswith(head)
    out = engine.generate("The quick", replace(SAMPLED, stop=(stop,), min_tokens=6))
    assert out.text == head + (tail[: tail.index(stop)] if stop in tail else tail)
    late = tail[2:4]
    out = engine.generate("The quick", replace(SAMPLED, stop=(late,), min_tokens=6))
    assert out.finish_reason is FinishReason.STOP and out.text == head + tail[: tail.index(late)]


def test_generation_config_supplies_defaults(tmp_path, model_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_k": 7, "max_new_tokens": 9}))
    engine = Engine.from_dir(d, device="cpu")
    params = engine.sampling_params(top_p=0.5)
    assert (params.temperature, params.top_k, params.max_tokens, params.top_p) == (0.0, 7, 9, 0.5)
    assert engine.sampling_params(top_n=3).top_k == 3


def test_bad_sampling_value_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.sampling_params(top_p=0)
    with pytest.raises(ValueError, match="unknown"):
        engine.sampling_params(temprature=1.0)


def test_logprobs_are_the_reference_models_log_softmax(engine, model_dir):
    """Each token's log-probability and its alternatives, against transformers' logits teacher-forced on the
    same tokens: the model's own distribution, not the sampler's (penalties and temperature change nothing)."""
    import torch
    import transformers as tf

    params = SamplingParams(max_tokens=8, temperature=1.3, top_k=5, repetition_penalty=1.5, seed=3, ignore_eos=True,
                            logprobs=4)
    done = engine.generate("床前明月光", params)
    assert len(done.logprobs) == done.completion_tokens == 8
    prompt = engine.encode("床前明月光")
    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(torch.tensor([prompt + done.token_ids])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    for step, (token, lp) in enumerate(zip(done.token_ids, done.logprobs, strict=True)):
        assert lp.chosen.token_id == token
        assert lp.chosen.logprob == pytest.approx(reference[step, token].item(), abs=1e-4)
        top = reference[step].topk(4)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
        assert [t.logprob for t in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert lp.top[0].logprob >= lp.chosen.logprob


def test_logprobs_ride_on_the_stream_with_each_tokens_text(engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    steps = list(engine.stream("床前明月光", params))
    assert all(s.logprobs is not None and s.logprobs.top == () for s in steps)
    assert [s.logprobs.chosen.token_id for s in steps] == [s.token_id for s in steps]
    # each token's own text; an unfinished character shows as U+FFFD there (the random model emits stray bytes)
    assert "".join(s.logprobs.chosen.text for s in steps).replace("\ufffd", "") == "".join(
        s.text for s in steps).replace("\ufffd", "")
    assert all(s.logprobs is None for s in engine.stream("床前明月光", SamplingParams(max_tokens=3)))
    assert engine.generate("床前明月光", SamplingParams(max_tokens=3)).logprobs is None


def test_logprobs_of_a_batch_are_each_sequences_own(engine):
    """Rows that ask, and rows that do not, in one step: each gets what it asked for, as when alone."""
    asks = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    alone = engine.generate("明月", asks)
    a = engine.add_request("明月", asks)
    b = engine.add_request("床前明月光", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs: dict[int, list] = {a: [], b: []}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.seq_id].append(out)
    for out, want in zip(outs[a], alone.logprobs, strict=True):
        assert out.logprobs.chosen.token_id == want.chosen.token_id
        assert [t.token_id for t in out.logprobs.top] == [t.token_id for t in want.top]
        assert out.logprobs.chosen.logprob == pytest.approx(want.chosen.logprob, abs=1e-5)
    assert all(o.logprobs is None for o in outs[b])


@pytest.mark.parametrize("bad", [-1, 21, 2.0, True])
def test_logprobs_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"logprobs must be an integer in \[0, 20\]"):
        SamplingParams(logprobs=bad)


@pytest.mark.parametrize("step_budget", [512, 3])  # the prompt in one piece, or chunked across steps
def test_prompt_logprobs_are_the_reference_models(model_dir, step_budget):
    """Each prompt token's log-probability given those before it, against transformers' teacher-forced logits,
    whether the prompt is prefilled whole or in chunks, with or without tokens generated after it."""
    import torch
    import transformers as tf

    engine = Engine.from_dir(model_dir, device="cpu", max_batch_size=2, max_tokens_per_step=step_budget)
    prompt = engine.encode("The quick brown fox jumps over the lazy dog")
    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for max_tokens in (0, 3):
        done = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=2))
        assert done.completion_tokens == max_tokens and done.logprobs is None
        assert len(done.prompt_logprobs) == len(prompt) and done.prompt_logprobs[0] is None
        for t, lp in enumerate(done.prompt_logprobs[1:], 1):
            assert lp.chosen.token_id == prompt[t]
            assert lp.chosen.logprob == pytest.approx(reference[t - 1, prompt[t]].item(), abs=1e-4)
            assert [x.token_id for x in lp.top] == reference[t - 1].topk(2).indices.tolist()
        assert "".join(lp.chosen.text for lp in done.prompt_logprobs[1:]) == engine.tokenizer.decode(prompt[1:])


def test_prompt_logprobs_come_once_with_the_first_output(engine):
    steps = list(engine.stream("床前明月光", SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0)))
    assert steps[0].prompt_logprobs is not None and len(steps[0].prompt_logprobs) == len(engine.encode("床前明月光"))
    assert all(s.prompt_logprobs is None for s in steps[1:])
    assert engine.generate("床前明月光", SamplingParams(max_tokens=0)).prompt_logprobs is None  # not asked: not run


def test_prompt_logprobs_of_an_encoder_decoder_are_refused():
    from vramlite import models

    t5 = Engine.from_dir(models.path(models.FILL_BLANK), device="cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="prompt_logprobs: this model reads its prompt both ways"):
        t5.add_request("床前明月光", SamplingParams(prompt_logprobs=0))
