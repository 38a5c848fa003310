"""Structured output: generation held to a regex or a JSON schema, whatever the model would rather write."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import save_tiny_llama
from vramlite.engine import Engine, SamplingParams, pattern_compiler
from vramlite.engine.pattern_compiler import PatternCompiler
from vramlite.engine.structured import Constraint, Grammars, allowed_tokens


@pytest.fixture(scope="module")
def engine(tmp_path_factory, spm_tokenizer_dir) -> Engine:
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir, max_position_embeddings=256)
    return Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=4)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "size": {"enum": ["S", "M", "L"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "ok", "size", "tags"],
}


def assert_fits(doc: dict) -> None:
    """`doc` is what SCHEMA accepts."""
    assert set(doc) == {"name", "ok", "size", "tags"}
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 6
    assert isinstance(doc["ok"], bool) and doc["size"] in ("S", "M", "L")
    assert isinstance(doc["tags"], list) and len(doc["tags"]) <= 2
    assert all(isinstance(t, str) and len(t) <= 3 for t in doc["tags"])


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7),
                                      dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=3)],
                         ids=["greedy", "sampled", "penalized-top-k-top-p"])
def test_json_schema_output_parses_and_fits_the_schema(engine, sampling):
    out = engine.generate("The answer, as JSON:", SamplingParams(max_tokens=120, json_schema=SCHEMA, **sampling))
    assert out.finish_reason.value == "eos"  # the pattern ended, and so did the output
    assert_fits(json.loads(out.text))


def test_regex_output_matches(engine):
    pattern = r"[0-9]{3}-[a-z]{2,4}( ok| no)"
    for seed in range(3):
        out = engine.generate("Code:", SamplingParams(max_tokens=40, temperature=1.0, seed=seed, regex=pattern))
        assert re.fullmatch(pattern, out.text), out.text
        assert out.finish_reason.value == "eos"


def test_a_constrained_row_leaves_the_rest_of_its_batch_alone(engine):
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    alone = engine.generate("Once upon a time", free)
    ids = [engine.add_request("Once upon a time", free),
           engine.add_request("Reply in JSON:", SamplingParams(max_tokens=120, temperature=0, json_schema=SCHEMA))]
    seqs = [engine.sequence(i) for i in ids]
    while not all(s.finished for s in seqs):
        engine.step()
    assert seqs[0].output_ids == alone.token_ids
    assert_fits(json.loads(seqs[1].text))


def test_the_mask_allows_what_the_index_allows(engine):
    """The bitmask unpacked per row: every allowed id, across 32-bit words (bit 31 included), and no other."""
    index = engine.grammars.index(r"[a-z ]+\.")
    expected = sorted(index.get_allowed_tokens(index.get_initial_state()))
    assert any(i % 32 == 31 for i in expected) or len(expected) > 32
    rows = allowed_tokens([Constraint(index, engine.eos_ids)] * 2, engine.config.vocab_size, torch.device("cpu"))
    assert rows.shape == (2, engine.config.vocab_size)
    assert rows[0].nonzero().flatten().tolist() == expected == rows[1].nonzero().flatten().tolist()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(regex="([a-z]"), "output pattern"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema=[1, 2]), "json_schema must be a JSON object"),
    (dict(json_schema={"type": "nonsense"}), "json_schema: Unsupported type: nonsense"),
    (dict(json_schema={"type": "object"}, regex="a"), "give one of json_schema, regex and choice"),
    (dict(regex="a", choice=["a"]), "give one of json_schema, regex and choice"),
    (dict(regex="a+", ignore_eos=True), "ignore_eos cannot be combined"),
    (dict(choice=["a"], min_tokens=2), "min_tokens cannot be combined"),
    (dict(choice=["a", ""]), "choice must be at most 1024 non-empty strings"),
    (dict(choice=["a"] * 1025), "choice must be at most 1024 non-empty strings"),
    (dict(regex=""), "regex must be None or a non-empty string"),
])
def test_bad_patterns_are_refused_with_what_is_wrong(engine, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("x", SamplingParams(**kwargs))
    assert not engine.has_unfinished()


def test_equal_schemas_share_one_compiled_index_and_properties_keep_their_order(engine):
    a = SamplingParams(json_schema={"type": "object", "properties": {"b": {"type": "boolean"}, "a": {"enum": [1]}},
                                    "required": ["b", "a"]})
    b = SamplingParams(json_schema='{"type": "object",\n "properties": {"b": {"type": "boolean"}, "a": {"enum": [1]}},'
                                   ' "required": ["b", "a"]}')
    assert a.json_schema == b.json_schema
    assert engine.grammars.index_for(a) is engine.grammars.index_for(b)
    out = engine.generate("x", SamplingParams(max_tokens=30, temperature=0, json_schema=a.json_schema))
    assert list(json.loads(out.text)) == ["b", "a"]


CHOICES = ["yes", "no", "maybe (1.5 x $2)", "a|b", "[.*]", "窗前明月"]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=50)],
                         ids=["greedy", "sampled", "hot"])
def test_choice_output_is_exactly_one_of_the_strings(engine, sampling):
    """Regular-expression syntax in a choice is literal: "a|b" is one choice, not two."""
    seen = set()
    for seed in range(4):
        out = engine.generate("Pick:", SamplingParams(max_tokens=40, choice=CHOICES, seed=seed, **sampling))
        assert out.text in CHOICES and out.finish_reason.value == "eos"
        seen.add(out.text)
    assert not seen & {"a", "b"}


def test_one_choice_is_forced_whatever_the_logits(engine):
    out = engine.generate("Pick:", SamplingParams(max_tokens=40, temperature=0, choice=["[.*] and (a|b)?"]))
    assert out.text == "[.*] and (a|b)?"


def test_patterns_compile_apart_within_a_timeout(engine):
    """With a timeout, a pattern compiles in a child process: the same index as in this one, a pattern's errors
    as they were, and one that takes too long refused while the next compiles."""
    apart = Grammars(engine.tokenizer, engine.config.vocab_size, engine.eos_ids, timeout=30)
    here = engine.grammars
    params = SamplingParams(json_schema=SCHEMA)
    a, b = apart.index_for(params), here.index_for(params)
    state_a, state_b = a.get_initial_state(), b.get_initial_state()
    assert a.get_allowed_tokens(state_a) == b.get_allowed_tokens(state_b)
    with pytest.raises(ValueError, match=r"output pattern: \w"):
        apart.index("([a-z]")
    slow = Grammars(engine.tokenizer, engine.config.vocab_size, engine.eos_ids, timeout=0.5)
    with pytest.raises(ValueError, match=r"took over 0\.5 s to compile"):
        slow.index("[a-z]{1,20000}y")
    assert slow.index("a+") is not None


def test_one_child_compiles_pattern_after_pattern_and_a_new_one_follows_a_dead_one(engine):
    grammars = Grammars(engine.tokenizer, engine.config.vocab_size, engine.eos_ids, timeout=30)
    grammars.index("a+")
    compiler = grammars._compiler
    child = compiler._process.pid
    grammars.index("b+")
    with pytest.raises(ValueError, match="output pattern"):
        grammars.index("(")
    assert compiler._process.pid == child  # the vocabulary went over once
    compiler._process.kill()
    compiler._process.wait()
    index = grammars.index("c+")  # a fresh child
    assert compiler._process.pid != child
    assert index.get_allowed_tokens(index.get_initial_state()) == engine.grammars.index("c+").get_allowed_tokens(
        engine.grammars.index("c+").get_initial_state())
    compiler.close()
    assert compiler._process is None


def test_a_compiler_that_dies_says_how(monkeypatch):
    monkeypatch.setattr(pattern_compiler, "_CHILD", "import sys; sys.exit(3)")
    compiler = PatternCompiler(b"x" * (1 << 20), timeout=30)  # more than a pipe holds: the write breaks
    with pytest.raises(RuntimeError, match="the pattern compiler exited with 3"):
        compiler.compile("a+")
    assert compiler._process is None
