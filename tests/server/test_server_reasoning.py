"""A reasoning model's thought apart from its answer (`reasoning_format` "think"): `<think>...</think>` split from
streamed text by `ThoughtSplitter` as from the whole, and served as chat's `reasoning_content`, a Responses
reasoning item and an Anthropic thinking block."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise

import anthropic
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.server.conftest import running_server
from vramlite.server.reasoning import ThoughtSplitter, split_thought
from vramlite.server.schemas import ChatMessage


@pytest.mark.parametrize(("text", "in_thought", "want"), [
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", False, ("\nLet me see.\n", "It is 4.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("Let me see.</think>It is 4.", True, ("Let me see.", "It is 4.")),  # DeepSeek-R1: the prompt opened it
    ("It is 4.", False, (None, "It is 4.")),
    ("The <think> tag", False, (None, "The <think> tag")),
    ("<think>cut off by max_tok", False, ("cut off by max_tok", "")),
    ("<thi", False, (None, "<thi")),
])
def test_split_thought(text, in_thought, want):
    assert split_thought(text, in_thought) == want


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.sampled_from(["<think>", "</think>", "<", "/", "t", "h", "k", ">", " ", "\n", "x"]))
       .map("".join), cuts=st.lists(st.integers(0, 60), max_size=8), in_thought=st.booleans())
def test_any_chunking_splits_as_the_whole(text, cuts, in_thought):
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    splitter = ThoughtSplitter(in_thought)
    pieces = [splitter.feed(text[a:b]) for a, b in pairwise(points)]
    pieces.append(splitter.finish())
    thought, answer = split_thought(text, in_thought)
    assert "".join(p[0] for p in pieces) == (thought or "") and "".join(p[1] for p in pieces) == answer


@pytest.fixture(scope="module")
def r1_like_dir(chat_llama_dir, tmp_path_factory):
    """The chat LLaMA with a template that opens the reply's thought, as DeepSeek-R1's does."""
    out = tmp_path_factory.mktemp("r1-like") / "model"
    shutil.copytree(chat_llama_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("[assistant]", "[assistant]<think>\n")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


THOUGHT = r"[a-z]{2,6}</think> [a-z]{2,6}"  # the reply held to a thought and an answer (structured output)
ASK = [{"role": "user", "content": "Two plus two?"}]


@pytest.fixture(scope="module")
def running(r1_like_dir):
    with running_server(r1_like_dir, reasoning_format="think") as server:
        yield server


def test_chat_gives_the_thought_as_reasoning_content_streamed_or_not(running):
    oai = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
    kwargs = dict(model="model", messages=ASK, max_tokens=40, temperature=1.0,
                  extra_body={"seed": 5, "structured_outputs": {"regex": THOUGHT}})
    message = oai.chat.completions.create(**kwargs).choices[0].message
    thought, answer = message.model_extra["reasoning_content"], message.content
    assert thought.isalpha() and answer.isalpha()
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thought
    assert "".join(d.content or "" for d in deltas) == answer

    done = oai.responses.create(model="model", input="Two plus two?", max_output_tokens=40, temperature=1.0,
                                extra_body={"seed": 5, "structured_outputs": {"regex": THOUGHT}})
    reasoning, message = done.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == thought and done.output_text == answer
    events = list(oai.responses.create(model="model", input="Two plus two?", max_output_tokens=40, temperature=1.0,
                                       stream=True, extra_body={"seed": 5, "structured_outputs": {"regex": THOUGHT}}))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert [e.type for e in events].count("response.output_item.done") == 2

    all_thought = oai.chat.completions.create(model="model", messages=ASK, max_tokens=40, extra_body={
        "structured_outputs": {"regex": "[a-z]{2,6}"}}).choices[0].message
    assert all_thought.content is None and all_thought.model_extra["reasoning_content"].isalpha()

    claude = anthropic.Anthropic(base_url=running.url, api_key="none", max_retries=0)
    kwargs = dict(model="model", messages=ASK, max_tokens=40,
                  extra_body={"temperature": 1.0, "seed": 5, "structured_outputs": {"regex": THOUGHT}})
    thinking, text = claude.messages.create(**kwargs).content
    assert (thinking.type, thinking.thinking, text.text) == ("thinking", thought, answer)
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[0].thinking == thought
    asked = claude.messages.create(**kwargs, thinking={"type": "enabled", "budget_tokens": 16}).content
    assert [b.type for b in asked] == ["thinking", "text"] and asked[0].thinking == thought


def test_thoughts_stay_in_the_text_unless_asked(r1_like_dir):
    with running_server(r1_like_dir) as server:
        oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        message = oai.chat.completions.create(model="model", messages=ASK, max_tokens=40, temperature=1.0,
                                              extra_body={"seed": 5, "structured_outputs": {"regex": THOUGHT}})
    assert "</think> " in message.choices[0].message.content
    assert "reasoning_content" not in message.choices[0].message.model_extra


def test_an_assistants_thought_goes_back_to_the_template():
    message = ChatMessage.model_validate({"role": "assistant", "content": "4", "reasoning_content": "2 + 2"})
    assert message.for_template() == {"role": "assistant", "content": "4", "reasoning_content": "2 + 2"}
