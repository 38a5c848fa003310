"""The official `openai` client against our OpenAI-compatible routes, and the chat template."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from tests.server.conftest import running_server
from vramlite.engine.tokenizer import Tokenizer
from vramlite.server.chat import chat_prompt_ids


@pytest.fixture(scope="module")
def chat_server(chat_llama_dir):
    with running_server(chat_llama_dir, api_key="sk-test") as running:
        yield running


@pytest.fixture(scope="module")
def oai(chat_server):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="sk-test", max_retries=0)


def test_models(oai):
    assert [m.id for m in oai.models.list()] == ["model"]
    assert oai.models.retrieve("model").id == "model"
    with pytest.raises(openai.NotFoundError, match="not served"):
        oai.models.retrieve("org/other")


def test_stop_reason_names_the_stop_string_or_token_and_a_stop_string_may_stay(oai):
    """vLLM's `stop_reason`, `include_stop_str_in_output` and `stop_token_ids`, streamed or not."""
    kwargs = dict(model="model", prompt="The quick brown fox", max_tokens=16, temperature=0)
    free = oai.completions.create(**kwargs).choices[0]
    assert free.model_extra["stop_reason"] is None
    stop = free.text[4:7]
    cut = free.text[: free.text.index(stop)]
    done = oai.completions.create(**kwargs, stop=["zzz", stop]).choices[0]
    assert (done.text, done.finish_reason, done.model_extra["stop_reason"]) == (cut, "stop", stop)
    kept = oai.completions.create(**kwargs, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop
    chunks = list(oai.completions.create(**kwargs, stop=stop, stream=True))
    assert [c.choices[0].model_extra["stop_reason"] for c in chunks][-1] == stop
    chat = dict(model="model", messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0)
    said = oai.chat.completions.create(**chat).choices[0].message.content
    for stream in (False, True):
        reply = oai.chat.completions.create(**chat, stop=said[4:7], stream=stream)
        last = list(reply)[-1] if stream else reply
        assert last.choices[0].model_extra["stop_reason"] == said[4:7]


def test_stop_token_ids_end_the_text_and_are_named(oai, chat_server):
    with chat_server.client(headers={"Authorization": "Bearer sk-test"}) as c:
        first = c.post("/generate", json={"prompt": "The quick brown fox", "max_tokens": 1, "temperature": 0,
                                          "logprobs": 0}).json()["logprobs"][0]["id"]
        bad = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "stop_token_ids": [10**6]})
    assert bad.status_code == 400 and "stop_token_ids" in bad.json()["error"]["message"]
    done = oai.completions.create(model="model", prompt="The quick brown fox", max_tokens=16, temperature=0,
                                  extra_body={"stop_token_ids": [first]}).choices[0]
    assert (done.text, done.finish_reason, done.model_extra["stop_reason"]) == ("", "stop", first)


def test_completion_and_stream_agree(oai):
    kwargs = dict(model="model", prompt="The quick brown fox", max_tokens=8, temperature=0)
    done = oai.completions.create(**kwargs)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens >= 2
    chunks = list(oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == done.choices[0].finish_reason


def test_chat_and_stream_agree(oai):
    kwargs = dict(model="model", messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello, world!"}],
                  max_completion_tokens=8, temperature=0, seed=1)
    done = oai.chat.completions.create(**kwargs)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_openai_errors(oai, chat_server):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="model", prompt="x", temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=chat_server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_completion_logprobs_through_the_client(oai):
    kwargs = dict(model="model", prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=2)
    done = oai.completions.create(**kwargs)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == done.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob <= 0 and 1 <= len(top) <= 3  # the sampled token is among them, as OpenAI
        assert max(top.values()) >= logprob
    chunks = list(oai.completions.create(**kwargs, stream=True))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    assert oai.completions.create(**{**kwargs, "logprobs": None}).choices[0].logprobs is None


def test_chat_logprobs_through_the_client(oai):
    kwargs = dict(model="model", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0,
                  logprobs=True, top_logprobs=2)
    done = oai.chat.completions.create(**kwargs)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens
    for entry in content:
        assert bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob >= entry.logprob
    streamed = [e for c in oai.chat.completions.create(**kwargs, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # the prompt's keys and values came from the prefix cache the second time: equal up to rounding
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs: needs logprobs: true"):
        oai.chat.completions.create(**{**kwargs, "logprobs": False})


def test_echo_scores_a_prompt_as_evaluation_harnesses_ask(oai, chat_llama_dir):
    """`echo` with `logprobs` and `max_tokens: 0` (lm-evaluation-harness's loglikelihood): the prompt back, each
    of its tokens' log-probabilities given those before (the first's null), as the engine scores them."""
    from vramlite.engine import Engine, SamplingParams

    prompt = "The quick brown fox"
    done = oai.completions.create(model="model", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = done.choices[0]
    assert choice.text == prompt and done.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == done.usage.prompt_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == prompt and lp.text_offset[-1] == len(prompt) - len(lp.tokens[-1])
    engine = Engine.from_dir(chat_llama_dir, device="cpu", context=128)
    want = engine.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=1)).prompt_logprobs
    assert lp.token_logprobs[1:] == pytest.approx([w.chosen.logprob for w in want[1:]], abs=1e-5)
    streamed = list(oai.completions.create(model="model", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                           stream=True))
    assert streamed[0].choices[0].text == prompt and streamed[0].choices[0].logprobs.tokens == lp.tokens
    generated = oai.completions.create(model="model", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                       logprobs=0)
    assert generated.choices[0].text.startswith(prompt)
    assert len(generated.choices[0].logprobs.tokens) == done.usage.prompt_tokens + 3
    assert oai.completions.create(model="model", prompt=prompt, max_tokens=0, echo=True).choices[0].text == prompt


def test_n_choices_each_their_own_and_reproducible(oai):
    """n choices of one prompt, batched: with a seed, choice i is what a single request with seed + i gives."""
    kwargs = dict(model="model", prompt="The quick brown fox", max_tokens=6, temperature=1.0, seed=11)
    done = oai.completions.create(**kwargs, n=3)
    assert [c.index for c in done.choices] == [0, 1, 2]
    alone = [oai.completions.create(**{**kwargs, "seed": 11 + i}) for i in range(3)]
    assert [c.text for c in done.choices] == [a.choices[0].text for a in alone]
    assert done.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert done.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed = ["", "", ""]
    for chunk in oai.completions.create(**kwargs, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in done.choices]
    chat = dict(model="model", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=1.0,
                seed=5, n=2)
    replies = oai.chat.completions.create(**chat)
    assert [c.index for c in replies.choices] == [0, 1]
    deltas = ["", ""]
    for chunk in oai.chat.completions.create(**chat, stream=True):
        for choice in chunk.choices:
            deltas[choice.index] += choice.delta.content or ""
    assert deltas == [c.message.content for c in replies.choices]


def test_more_choices_than_the_server_holds_is_422(oai):
    with pytest.raises(openai.UnprocessableEntityError, match="n: 16 choices are more than this server holds"):
        oai.completions.create(model="model", prompt="x", max_tokens=1, n=16)
    with pytest.raises(openai.UnprocessableEntityError, match="n: Input should be less than or equal to 16"):
        oai.completions.create(model="model", prompt="x", max_tokens=1, n=17)


def test_lm_evaluation_harness_loglikelihood_request(oai, chat_llama_dir):
    """The request lm-evaluation-harness's `local-completions` makes for a log-likelihood (a batch of one
    token-id prompt, context then continuation; one token generated, echo, logprobs 1), read as it reads it:
    the continuation's log-probabilities are `token_logprobs[ctxlen:-1]`."""
    from vramlite.engine import Engine, SamplingParams

    engine = Engine.from_dir(chat_llama_dir, device="cpu", context=128)
    context, continuation = engine.encode("The quick brown")[1:], engine.encode(" fox jumps")[1:]
    done = oai.completions.create(model="model", prompt=[context + continuation], temperature=0, max_tokens=1,
                                  logprobs=1, seed=1234, echo=True)
    logprobs = done.choices[0].logprobs.token_logprobs[len(context) : -1]
    want = engine.generate(context + continuation, SamplingParams(max_tokens=0, prompt_logprobs=0)).prompt_logprobs
    assert logprobs == pytest.approx([w.chosen.logprob for w in want[len(context) :]], abs=1e-5)


@pytest.mark.parametrize("params", [{"logprobs": 21}, {"best_of": 3}])
def test_completion_options_we_cannot_honour_are_refused(oai, params):
    """Not ignored: the client asked for something the answer would silently lack."""
    field = next(iter(params))
    with pytest.raises(openai.UnprocessableEntityError, match=f"{field}: "):
        oai.completions.create(model="model", prompt="x", max_tokens=2, **params)


@pytest.mark.parametrize("params", [{"functions": [{"name": "f"}]}, {"function_call": {"name": "f"}}])
def test_chat_options_we_cannot_honour_are_refused(oai, params):
    field = next(iter(params))
    with pytest.raises(openai.UnprocessableEntityError, match=f"{field}: .* is not supported"):
        oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                    **params)


def test_a_suffix_needs_a_model_that_fills_in_the_middle(oai):
    with pytest.raises(openai.BadRequestError, match="suffix: "):
        oai.completions.create(model="model", prompt="x", suffix=" the end", max_tokens=2)


def test_options_at_their_off_values_are_taken(oai):
    done = oai.completions.create(model="model", prompt=["x"], max_tokens=2, echo=False, best_of=1,
                                  suffix=None, logit_bias={}, user="u")
    assert done.usage.completion_tokens >= 1
    chat = oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       response_format={"type": "text"},
                                       tool_choice="none", tools=[], modalities=["text"])
    assert chat.usage.completion_tokens >= 1


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "adult": {"type": "boolean"}},
          "required": ["name", "adult"]}


def is_person(text: str) -> bool:
    doc = json.loads(text)
    return set(doc) == {"name", "adult"} and isinstance(doc["name"], str) and isinstance(doc["adult"], bool)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_format_json_schema(oai, stream):
    """The answer is JSON the schema accepts, whole or streamed, and it ends there ("stop")."""
    kwargs = dict(model="model", messages=[{"role": "user", "content": "Who? Answer in JSON."}], max_tokens=64,
                  temperature=1.0, seed=5, response_format={"type": "json_schema",
                                                            "json_schema": {"name": "person", "schema": PERSON}})
    if stream:
        chunks = list(oai.chat.completions.create(**kwargs, stream=True))
        text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = oai.chat.completions.create(**kwargs).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert is_person(text) and finish == "stop"


def test_json_object_mode_and_structured_completions(oai):
    chat = oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=48, temperature=0, response_format={"type": "json_object"})
    assert chat.choices[0].finish_reason == "length" or isinstance(json.loads(chat.choices[0].message.content), dict)
    done = oai.completions.create(model="model", prompt="Person:", max_tokens=64, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"schema": PERSON}}})
    assert is_person(done.choices[0].text)


@pytest.mark.parametrize(("response_format", "message"), [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "Unsupported type: nonsense"),
    ({"type": "json_schema"}, "json_schema goes with type"),
    ({"type": "json_object", "json_schema": {"schema": PERSON}}, "json_schema goes with type"),
    ({"type": "xml"}, "response_format.type"),
])
def test_bad_response_formats_are_refused_with_what_is_wrong(oai, response_format, message):
    with pytest.raises(openai.UnprocessableEntityError, match=message):
        oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                    response_format=response_format)


def test_generate_with_a_regex_or_a_json_schema(chat_server):
    for body, check in (({"regex": "[0-9]{4}-[0-9]{2}"}, lambda text: re.fullmatch("[0-9]{4}-[0-9]{2}", text)),
                        ({"json_schema": PERSON}, is_person)):
        reply = httpx.post(chat_server.url + "/generate", headers={"Authorization": "Bearer sk-test"},
                           json={"prompt": "Date:", "max_tokens": 64, "temperature": 0.7, "seed": 1, **body})
        assert reply.status_code == 200, reply.text
        assert check(reply.json()["text"]) and reply.json()["finish_reason"] == "eos"
    reply = httpx.post(chat_server.url + "/generate", headers={"Authorization": "Bearer sk-test"},
                       json={"prompt": "x", "regex": "(unclosed"})
    assert reply.status_code == 422 and "output pattern" in reply.json()["error"]["message"]


MOODS = ["positive", "negative", "not sure (50%)"]


@pytest.mark.parametrize("extra", [{"structured_outputs": {"choice": MOODS}}, {"guided_choice": MOODS}],
                         ids=["structured_outputs", "guided_choice"])
def test_choice_on_the_openai_routes(oai, extra):
    """vLLM's `structured_outputs` and its older `guided_*` fields hold the reply to their pattern."""
    for seed in range(3):
        chat = oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "Mood?"}],
                                           max_tokens=16, temperature=1.0, seed=seed, extra_body=extra)
        assert chat.choices[0].message.content in MOODS and chat.choices[0].finish_reason == "stop"
    done = oai.completions.create(model="model", prompt="Mood:", max_tokens=16, temperature=1.0, extra_body=extra)
    assert done.choices[0].text in MOODS


@pytest.mark.parametrize("extra", [{"structured_outputs": {"json": PERSON}}, {"guided_json": PERSON},
                                   {"structured_outputs": {"json": json.dumps(PERSON)}},
                                   {"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}"}},
                                   {"guided_regex": "[0-9]{4}-[0-9]{2}"}],
                         ids=["json", "guided_json", "json-text", "regex", "guided_regex"])
def test_json_and_regex_structured_outputs(oai, extra):
    text = oai.completions.create(model="model", prompt="Who, when:", max_tokens=64, temperature=0.7, seed=2,
                                  extra_body=extra).choices[0].text
    assert re.fullmatch("[0-9]{4}-[0-9]{2}", text) if "regex" in json.dumps(extra) else is_person(text)


@pytest.mark.parametrize(("extra", "message"), [
    ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "a"}, "give one of structured_outputs and guided_regex"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "give one of response_format and guided_ch"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "give one of json, regex and choice"),
    ({"structured_outputs": {}}, "give one of json, regex and choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_choice": ["a"], "min_tokens": 2}, "min_tokens cannot be combined"),
    ({"min_tokens": 3, "max_tokens": 2}, "min_tokens must be an integer in [0, max_tokens = 2]"),
    ({"min_p": 1.5}, "min_p"),
])
def test_bad_structured_outputs_and_sampling_extras_are_refused(oai, extra, message):
    with pytest.raises(openai.UnprocessableEntityError, match=re.escape(message)):
        oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                    extra_body=extra)


def test_generate_with_a_choice_min_p_and_min_tokens(chat_server, chat_llama_dir):
    def generate(**body) -> dict:
        reply = httpx.post(chat_server.url + "/generate", headers={"Authorization": "Bearer sk-test"},
                           json={"prompt": "Mood:", "max_tokens": 16, **body})
        assert reply.status_code == 200, reply.text
        return reply.json()
    assert generate(choice=MOODS, temperature=1.5, seed=3)["text"] in MOODS
    # min_p = 1 keeps only the most likely token: sampling at any temperature is greedy decoding
    assert generate(min_p=1.0, temperature=5.0, seed=8)["text"] == generate(temperature=0)["text"]
    eos = Tokenizer.from_dir(chat_llama_dir).eos_ids[0]
    forced_end = {"temperature": 0, "logit_bias": {str(eos): 100}, "logprobs": 0}
    assert [t["id"] for t in generate(**forced_end)["logprobs"]] == [eos]
    held = generate(**forced_end, min_tokens=5)
    assert held["usage"]["completion_tokens"] == 6 and held["finish_reason"] == "eos"


def test_logit_bias_steers_and_bans_tokens(oai, chat_server):
    """+100 all but forces a token, sampled or not; -100 bans the one greedy decoding would pick."""
    def generated_ids(**body) -> list[int]:
        reply = httpx.post(chat_server.url + "/generate", headers={"Authorization": "Bearer sk-test"},
                           json={"prompt": "x", "max_tokens": 6, "logprobs": 0, **body})
        return [token["id"] for token in reply.json()["logprobs"]]

    assert generated_ids(temperature=0.9, seed=2, logit_bias={"77": 100}) == [77] * 6
    greedy = generated_ids(temperature=0)[0]
    assert generated_ids(temperature=0, logit_bias={str(greedy): -100})[0] != greedy
    forced = oai.completions.create(model="model", prompt="x", max_tokens=3, temperature=0, logit_bias={"77": 100})
    assert forced.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match=re.escape("logit_bias token ids must be in 0..511")):
        oai.completions.create(model="model", prompt="x", max_tokens=1, logit_bias={"512": -100})
    with pytest.raises(openai.UnprocessableEntityError, match="logit_bias"):
        oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                    logit_bias={"5": 101})


def test_chat_template_kwargs_reach_the_template(oai):
    kwargs = dict(model="model", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    plain = oai.chat.completions.create(**kwargs).usage.prompt_tokens
    hinted = oai.chat.completions.create(**kwargs, extra_body={"chat_template_kwargs": {"hint": "be brief"}})
    assert hinted.usage.prompt_tokens > plain
    with pytest.raises(openai.UnprocessableEntityError, match="messages come from the request itself"):
        oai.chat.completions.create(**kwargs, extra_body={"chat_template_kwargs": {"messages": []}})


BATCH = ["The quick brown fox", "床前明月光，", "Once upon a time"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_gives_each_prompts_choices_in_turn(oai, stream):
    """Choice p * n + i is prompt p's choice i, what prompt p alone gives (seed + i); usage counts each prompt."""
    kwargs = dict(model="model", max_tokens=5, temperature=1.0, seed=3, n=2)
    alone = [oai.completions.create(**kwargs, prompt=p) for p in BATCH]
    want = [c.text for a in alone for c in a.choices]
    if stream:
        texts = [""] * 6
        for chunk in oai.completions.create(**kwargs, prompt=BATCH, stream=True,
                                            stream_options={"include_usage": True}):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
            usage = chunk.usage or None
    else:
        done = oai.completions.create(**kwargs, prompt=BATCH)
        assert [c.index for c in done.choices] == list(range(6))
        texts, usage = [c.text for c in done.choices], done.usage
    assert texts == want
    assert usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_a_batch_of_token_id_prompts_scored_with_echo(oai, chat_llama_dir):
    """lm-evaluation-harness with batch_size > 1: several token-id prompts, echo and logprobs, max_tokens 0."""
    prompts = [[1, 5, 9, 200], [1, 300, 301]]
    done = oai.completions.create(model="model", prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    alone = [oai.completions.create(model="model", prompt=p, max_tokens=0, echo=True, logprobs=0) for p in prompts]
    assert [c.text for c in done.choices] == [a.choices[0].text for a in alone]
    for c, a in zip(done.choices, alone, strict=True):
        assert c.logprobs.token_logprobs[1:] == pytest.approx(a.choices[0].logprobs.token_logprobs[1:], abs=1e-5)


def test_a_batch_is_admitted_whole_or_not_at_all(oai, chat_server):
    before = chat_server.metric("vramlite_prompt_tokens_total")
    with pytest.raises(openai.UnprocessableEntityError, match="prompts × n: 14 choices are more than"):
        oai.completions.create(model="model", prompt=["x"] * 7, n=2, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="the context holds 128 tokens"):  # the second is too long
        oai.completions.create(model="model", prompt=["x", "word " * 300], max_tokens=1)
    time.sleep(0.2)  # what was admitted would be scheduled by now
    assert chat_server.metric("vramlite_prompt_tokens_total") == before


def test_chat_template_renders_messages(chat_llama_dir, tiny_llama_dir):
    messages = [{"role": "user", "content": "Hello"}]
    templated = Tokenizer.from_dir(chat_llama_dir)
    ids = chat_prompt_ids(templated, messages)
    assert ids[0] == templated.bos_id and ids.count(templated.bos_id) == 1
    assert templated.eos_ids[0] in ids  # the template's eos_token became the control token, not text
    assert templated.decode(ids) == "[user] Hello[assistant]"
    plain = Tokenizer.from_dir(tiny_llama_dir)
    assert plain.decode(chat_prompt_ids(plain, messages)) == "user: Hello\nassistant:"
    # a reply generated after "assistant:" starts with its own space: sent back, it reads as generated, so the
    # next turn's prompt starts with the tokens the last one computed (the prefix cache reuses them)
    turn = [*messages, {"role": "assistant", "content": " Hi there"}, {"role": "user", "content": "Bye"}]
    assert plain.decode(chat_prompt_ids(plain, turn)) == "user: Hello\nassistant: Hi there\nuser: Bye\nassistant:"


def test_continue_final_message_and_no_generation_prompt(chat_llama_dir, tiny_llama_dir):
    """vLLM's options, rendered as transformers renders them: the assistant's begun message cut right after its
    text, trailing space kept where the template keeps it (its end-of-turn token left out), or the messages
    without the assistant's start."""
    begun = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Sure, the answer is "}]
    templated, plain = Tokenizer.from_dir(chat_llama_dir), Tokenizer.from_dir(tiny_llama_dir)
    ids = chat_prompt_ids(templated, begun, add_generation_prompt=False, continue_final_message=True)
    assert templated.decode(ids) == "[user] Hello[assistant] Sure, the answer is "
    assert ids.count(templated.eos_ids[0]) == 1  # the user's turn's alone
    assert templated.decode(chat_prompt_ids(templated, begun[:1], add_generation_prompt=False)) == "[user] Hello"
    assert plain.decode(chat_prompt_ids(plain, begun, add_generation_prompt=False, continue_final_message=True)) \
        == "user: Hello\nassistant: Sure, the answer is "
    assert plain.decode(chat_prompt_ids(plain, begun[:1], add_generation_prompt=False)) == "user: Hello"


def test_a_template_that_trims_the_final_message_is_cut_after_its_trimmed_text():
    from vramlite.server.chat import _cut_after
    from vramlite.server.errors import ApiError

    assert _cut_after("[user] x[assistant] The answer is</s>", "The answer is ") == "[user] x[assistant] The answer is"
    assert _cut_after("[a] no[b] no</s>", "no") == "[a] no[b] no"  # the last place it shows
    with pytest.raises(ApiError, match="does not show the final message"):
        _cut_after("[user] x[assistant] </s>", "gone")


def test_a_continued_message_is_what_a_completion_of_its_prompt_gives(oai, chat_llama_dir):
    begun = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Sure, the answer is"}]
    reply = oai.chat.completions.create(model="model", messages=begun, max_tokens=6, temperature=0, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
    ids = chat_prompt_ids(Tokenizer.from_dir(chat_llama_dir), begun, add_generation_prompt=False,
                          continue_final_message=True)
    done = oai.completions.create(model="model", prompt=ids, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == done.choices[0].text
    for extra in ({"continue_final_message": True}, {"add_generation_prompt": False, "continue_final_message": True,
                                                      "messages": begun[:1]}):
        with pytest.raises(openai.UnprocessableEntityError, match="continue_final_message needs"):
            oai.chat.completions.create(model="model", messages=begun, max_tokens=2, extra_body=extra)


def test_without_max_tokens_a_completion_runs_to_the_end_of_the_context(chat_llama_dir):
    """As OpenAI and vLLM: no max_tokens means until the model stops or the context is full, not /generate's
    default of 128 tokens."""
    with running_server(chat_llama_dir, context=256) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0)
        done = client.completions.create(model="model", prompt="The quick brown fox", temperature=0)
        assert done.choices[0].finish_reason == "length"  # this random model never ends its text
        assert done.usage.prompt_tokens + done.usage.completion_tokens == 256
        with srv.client() as c:
            assert c.post("/generate", json={"prompt": "The quick brown fox", "temperature": 0}).json()["usage"][
                "completion_tokens"] == 128


def test_a_pattern_too_slow_to_compile_is_refused_and_others_go_on(tiny_llama_dir):
    with running_server(tiny_llama_dir, pattern_timeout=0.5) as srv, srv.client() as c:
        started = time.monotonic()
        r = c.post("/generate", json={"prompt": "x", "max_tokens": 4, "regex": "[a-z]{1,20000}y"})
        assert r.status_code == 422 and "took over 0.5 s to compile" in r.json()["error"]["message"]
        assert time.monotonic() - started < 10
        r = c.post("/generate", json={"prompt": "x", "max_tokens": 4, "regex": "[ab]{4}"})
        assert r.status_code == 200 and re.fullmatch("[ab]{4}", r.json()["text"])


def test_usage_counts_the_prompt_tokens_the_prefix_cache_held(oai):
    kwargs = dict(model="model", prompt="A prompt seen twice: " + "lorem ipsum " * 8, max_tokens=2, temperature=0)
    first, again = (oai.completions.create(**kwargs).usage for _ in range(2))
    assert first.prompt_tokens_details.cached_tokens <= 1  # BOS, shared with earlier prompts
    assert 10 < again.prompt_tokens_details.cached_tokens < again.prompt_tokens == first.prompt_tokens
    response = oai.responses.create(model="model", input="Hi there", max_output_tokens=2)
    response_again = oai.responses.create(model="model", input="Hi there", max_output_tokens=2)
    cached = [r.usage.input_tokens_details.cached_tokens for r in (response, response_again)]
    assert cached[0] < cached[1] < response_again.usage.input_tokens  # (the first shares BOS with earlier prompts)
