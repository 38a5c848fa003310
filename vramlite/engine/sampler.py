"""Next-token sampling: per-request parameters, per-sequence state and a batched sampler.

The pipeline over a batch of logits is repetition penalty (HF) -> frequency/presence
penalties and logit bias (OpenAI) -> the end of text banned before min_tokens ->
structured output's mask (tokens its pattern does not allow next) -> temperature
(0 = greedy) -> top-k -> top-p -> min-p -> sample. Every
row draws its randomness from its own seeded generator, so a seeded request produces
the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

from vramlite.engine.pooling import POOLING_METHODS
from vramlite.engine.structured import Constraint, allowed_tokens, canonical_schema

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows
MAX_PATTERN_CHARS = 65536  # a regex or JSON schema for structured output
MAX_LOGIT_BIAS = 300  # biased tokens per request, as OpenAI allows
MAX_CHOICE_STRINGS = 1024  # strings `choice` may list
IMPOSSIBLE_LOGPROB = -9999.0

# Temperatures below this are treated as greedy: dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5
TOP_P_CANDIDATES = 256
"""Top-p looks for its prefix among each row's this many most likely tokens (a top-k, linear in the vocabulary,
where sorting a 32000-word row took 2 ms on 2 CPU cores), and sorts a whole row only where they do not settle it
(they hold less than p of the mass, or the prefix reaches the tokens tied with the last of them)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; validated on construction (ValueError names the field)."""

    max_tokens: int = 128
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # cut tokens less likely than this times the most likely one (after temperature)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # the stop string that matched ends the text, not cut (vLLM's)
    skip_special_tokens: bool = True  # special tokens bring out no text (False: their text, as vLLM's)
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens are banned, stop strings not matched, before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # tokens that end generation like a stop string (fill_blank's sentinels)
    logprobs: int | None = None  # report each token's log-probability and this many most likely; None = off
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (each given those before it)
    json_schema: str | None = None  # output must be JSON this schema accepts (given as JSON text or an object)
    regex: str | None = None  # output must match this regular expression
    choice: tuple[str, ...] = ()  # output must be one of these strings
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in [-100, 100]), OpenAI's
    pooling: str | None = None  # an embedding: the prompt's hidden states pooled so (`pooling.POOLING_METHODS`)

    def __post_init__(self) -> None:
        # A bare string is one stop string, not a sequence of one-character ones.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))
        for name in ("stop_token_ids", "choice"):
            if isinstance(getattr(self, name), (list, tuple, frozenset, set)):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _require(
            _is_int(self.max_tokens) and self.max_tokens >= 0,
            "max_tokens",
            self.max_tokens,
            "an integer >= 0",
        )
        _require(
            _is_real(self.temperature) and self.temperature >= 0,
            "temperature",
            self.temperature,
            "a number >= 0 (0 means greedy)",
        )
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _require(
            _is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            self.top_k,
            "an integer >= 0 (0 turns top-k off)",
        )
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1] (0 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -2 <= value <= 2, name, value, "a number in [-2, 2]")
        _require(
            _is_real(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            self.repetition_penalty,
            "a number > 0 (1 turns it off)",
        )
        _require(
            isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS,
            "stop",
            self.stop,
            f"a list of at most {MAX_STOP_STRINGS} strings",
        )
        for s in self.stop:
            _require(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS,
                "stop",
                s,
                f"made of non-empty strings of at most {MAX_STOP_CHARS} characters",
            )
        _require(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")
        _require(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
                 self.min_tokens, f"an integer in [0, max_tokens = {self.max_tokens}]")
        _require(
            isinstance(self.stop_token_ids, tuple) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            "a list of token ids",
        )

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name, value,
                     f"an integer in [0, {MAX_LOGPROBS}] (alternatives per token) or None (off)")
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        _require(
            isinstance(self.logit_bias, tuple) and len(self.logit_bias) <= MAX_LOGIT_BIAS
            and all(isinstance(p, tuple) and len(p) == 2 and _is_int(p[0]) and p[0] >= 0 and _is_real(p[1])
                    and -100 <= p[1] <= 100 for p in self.logit_bias),
            "logit_bias", self.logit_bias if len(self.logit_bias) < 8 else "...",
            f"at most {MAX_LOGIT_BIAS} token ids, each with a bias in [-100, 100]",
        )
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", canonical_schema(self.json_schema))
        for name in ("json_schema", "regex"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, str) and 0 < len(value) <= MAX_PATTERN_CHARS), name,
                     value if value is None or len(str(value)) < 80 else f"{str(value)[:80]}...",
                     f"None or a non-empty string of at most {MAX_PATTERN_CHARS} characters")
        _require(
            isinstance(self.choice, tuple) and len(self.choice) <= MAX_CHOICE_STRINGS
            and all(isinstance(c, str) and c for c in self.choice)
            and sum(map(len, self.choice)) <= MAX_PATTERN_CHARS,
            "choice", self.choice if len(self.choice) < 8 else "...",
            f"at most {MAX_CHOICE_STRINGS} non-empty strings of at most {MAX_PATTERN_CHARS} characters in all",
        )
        if sum(x is not None for x in (self.json_schema, self.regex)) + bool(self.choice) > 1:
            raise ValueError("give one of json_schema, regex and choice")
        _require(self.pooling is None or (self.pooling in POOLING_METHODS and self.max_tokens == 0), "pooling",
                 self.pooling, f"None, or one of {', '.join(POOLING_METHODS)} with max_tokens 0 (an embedding)")
        for name in ("ignore_eos", "min_tokens"):
            if getattr(self, name) and self.structured:
                raise ValueError(f"{name} cannot be combined with json_schema, regex or choice: output ends where "
                                 "its pattern does")

    @property
    def structured(self) -> bool:
        """Whether the output is held to a pattern (`json_schema`, `regex` or `choice`)."""
        return self.json_schema is not None or self.regex is not None or bool(self.choice)

    @classmethod
    def from_kwargs(cls, **kw: Any) -> SamplingParams:
        """Build from loose keyword arguments: `top_n` is an alias of `top_k` and None means default."""
        kw = {k: v for k, v in kw.items() if v is not None}
        if "top_n" in kw:
            if "top_k" in kw:
                raise ValueError("give top_k or its alias top_n, not both")
            kw["top_k"] = kw.pop("top_n")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            allowed = ", ".join(sorted(known | {"top_n"}))
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}; known: {allowed}")
        return cls(**kw)


class SamplerState:
    """Per-sequence sampling state: parameters, seeded generator, prompt and generated token ids."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device | str = "cpu",
                 constraint: Constraint | None = None, end_ids: Sequence[int] = ()):
        self.params = params
        self.constraint = constraint  # the tokens structured output allows next
        # the tokens that would end the output (EOS, stop tokens), banned before params.min_tokens
        self.end_ids = torch.tensor(sorted(set(end_ids)) if params.min_tokens else [], dtype=torch.long,
                                    device=device)
        self.prompt_ids: tuple[int, ...] = tuple(int(i) for i in prompt_ids)
        self.output_ids: list[int] = []
        self.device = torch.device(device)
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed % 2**64)  # manual_seed takes 64 bits; any int seed is accepted
        self.greedy = params.temperature < GREEDY_TEMPERATURE
        self.penalized = (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
            or bool(params.logit_bias)
            or params.min_tokens > 0
        )
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        self._vocab_size = 0
        self._position: dict[int, int] = {}  # seen token -> its place in _seen and _counts
        self._seen = torch.empty(0, dtype=torch.long, device=self.device)
        self._counts = torch.empty(0, dtype=torch.float32, device=self.device)
        self._counted = 0

    def append(self, token_id: int) -> None:
        """Record a generated token."""
        self.output_ids.append(int(token_id))
        if self.constraint is not None:
            self.constraint.advance(int(token_id))

    def penalty_tensors(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens seen so far, prompt and generated (int64 [n], each once, in order of first sight), and how
        often each was generated (float32 [n]), on this state's device. Ids outside the logits' vocabulary
        (tokenizer-only added tokens) have no logit to penalize and are left out.

        Built on first use, then updated with only the tokens appended since the last call.
        """
        if vocab_size != self._vocab_size:
            self._vocab_size = vocab_size
            prompt = [t for t in dict.fromkeys(self.prompt_ids) if 0 <= t < vocab_size]
            self._position = {t: i for i, t in enumerate(prompt)}
            self._seen = torch.tensor(prompt, dtype=torch.long, device=self.device)
            self._counts = torch.zeros(len(prompt), dtype=torch.float32, device=self.device)
            self._counted = 0
        fresh, generated = [], []
        for t in self.output_ids[self._counted :]:
            if 0 <= t < vocab_size:
                if t not in self._position:
                    self._position[t] = len(self._position)
                    fresh.append(t)
                generated.append(self._position[t])
        self._counted = len(self.output_ids)
        if fresh:
            self._seen = torch.cat([self._seen, torch.tensor(fresh, dtype=torch.long, device=self.device)])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(len(fresh))])
        if generated:
            at = torch.tensor(generated, dtype=torch.long, device=self.device)
            self._counts.index_put_((at,), torch.ones_like(at, dtype=torch.float32), accumulate=True)
        return self._seen, self._counts

    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`logit_bias` as token ids (int64 [n]) and biases (float32 [n]) on this state's device."""
        if self._bias is None:
            ids, values = zip(*self.params.logit_bias, strict=True) if self.params.logit_bias else ((), ())
            self._bias = (torch.tensor(ids, dtype=torch.long, device=self.device),
                          torch.tensor(values, dtype=torch.float32, device=self.device))
        return self._bias


def apply_penalties_(logits: torch.Tensor, rows: Sequence[int], states: Sequence[SamplerState]) -> None:
    """Penalize, in place, row rows[i] of float32 logits [B, V] by states[i]'s penalties.

    Repetition penalty (HF) covers prompt and generated tokens: a positive logit is divided by it, any
    other multiplied. Frequency and presence penalties (OpenAI) cover generated tokens only:
    logit -= frequency * count + presence * (count > 0). Only the seen tokens' logits are read and written,
    not whole rows. Then `logit_bias` (OpenAI) is added to its tokens' logits, and a sequence short of its
    `min_tokens` has the tokens that would end it set to -inf.
    """
    vocab = logits.size(-1)
    stats = [s.penalty_tensors(vocab) for s in states]
    seen = torch.cat([ids for ids, _ in stats])
    counts = torch.cat([c for _, c in stats])
    device = logits.device
    lengths = torch.tensor([len(ids) for ids, _ in stats], device=device)
    per_row = torch.tensor([[r * vocab, s.params.repetition_penalty, s.params.frequency_penalty,
                             s.params.presence_penalty] for r, s in zip(rows, states, strict=True)],
                           dtype=torch.float64, device=device).repeat_interleave(lengths, dim=0)
    flat = seen + per_row[:, 0].long()
    rep, frequency, presence = per_row[:, 1:].float().unbind(-1)
    x = logits.view(-1)[flat]
    x = torch.where(x > 0, x / rep, x * rep) - frequency * counts - presence * (counts > 0)
    logits.view(-1)[flat] = x
    for row, state in zip(rows, states, strict=True):
        if state.params.logit_bias:
            logits[row].index_add_(0, *state.bias_tensors())
        if len(state.output_ids) < state.params.min_tokens:
            logits[row, state.end_ids] = -math.inf


def top_k_top_p_mask(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, V] of the tokens kept by top-k (k [B], 0 = off) and then top-p (p [B], 1 = off).

    Top-k keeps every token whose logit is >= the k-th largest, so ties at the boundary keep more
    than k tokens (as HF's TopKLogitsWarper). Top-p then keeps, among those, the smallest prefix of
    the tokens sorted by probability whose mass is >= p (as HF's TopPLogitsWarper), ties ranked by
    token id. The argmax is always kept.
    """
    keep = top_k_mask(logits, k)
    on = p < 1
    if not on.any():
        return keep
    # rows with top-p on; all of them as a view, where indexing [1, V] with a tensor took 0.15 ms on the CPU
    rows = slice(None) if on.all() else on.nonzero().flatten()
    x = logits[rows].masked_fill(~keep[rows], -math.inf)
    p = p[rows].unsqueeze(-1)
    probs = x.softmax(dim=-1)
    vocab, n = x.size(-1), min(TOP_P_CANDIDATES, x.size(-1))
    # a row's n most likely tokens can hold p of its mass only if n times its largest probability does
    if not bool((probs.amax(dim=-1, keepdim=True) * n >= p).any()):
        n = vocab
    top_p, exact = _top_p_among(x, probs, p, n)
    if not exact.all():
        slow = (~exact).nonzero().flatten()
        top_p[slow] = _top_p_among(x[slow], probs[slow], p[slow], vocab)[0]
    keep[rows] &= top_p
    return keep


def top_k_mask(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, V] of the tokens top-k keeps (k [B]; 0, or V and more, = off): those whose logit is >= their
    row's k-th largest (see top_k_top_p_mask)."""
    vocab = logits.size(-1)
    on = (k > 0) & (k < vocab)
    if not on.any():
        return torch.ones_like(logits, dtype=torch.bool)
    k = torch.where(on, k, 1)
    kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1).unsqueeze(-1))
    return (logits >= kth) | ~on.unsqueeze(-1)


def top_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, V] of the tokens top-p keeps (p [B], 1 = off); see top_k_top_p_mask."""
    return top_k_top_p_mask(logits, torch.zeros_like(p, dtype=torch.long), p)


def _top_p_among(x: torch.Tensor, probs: torch.Tensor, p: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p's mask [B, V] as found among each row's `n` most likely tokens, and whether that is its mask [B].

    It is where the prefix ends among the candidates whose logit beats the last candidate's: every token
    ranked above a non-candidate is one of those, and they are ranked as a sort of the whole row ranks them.
    With n = V, the whole row is sorted, and the mask is always exact.
    """
    vocab = x.size(-1)
    # in rank order: by logit, ties by id (for candidates: sorted by id, then a stable sort by logit)
    if n < vocab:
        ids = x.topk(n, dim=-1).indices.sort(dim=-1).values
        values, order = x.gather(-1, ids).sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(-1, order)
    else:
        values, ids = x.sort(dim=-1, descending=True, stable=True)
    ranked = probs.gather(-1, ids)
    cum = ranked.cumsum(dim=-1)
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    kept = mass_before < p
    kept[:, 0] = True  # the most likely token, even where p rounds to 0 in float32
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, ids, kept)
    if n == vocab:
        return mask, torch.ones(x.size(0), dtype=torch.bool, device=x.device)
    above = (values > values[:, -1:]).sum(dim=-1, keepdim=True)
    exact = (above > 0) & (cum.gather(-1, (above - 1).clamp(min=0)) >= p)
    return mask, exact.squeeze(-1)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value, the first where several tie (`max` documents that, as `argmax`
    does): torch's `max` finds it 2-3x faster than `argmax` on the CPU (a 32000-word row: 18 vs 47 us)."""
    return x.max(dim=-1).indices


def _column(
    states: Sequence[SamplerState], name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.tensor([getattr(s.params, name) for s in states], dtype=dtype, device=device)


def warped(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """Float32 logits [B, V] of rows that are not greedy after temperature, top-k, top-p and min-p (-inf where
    cut): row i's softmax is the distribution states[i] draws from."""
    device = logits.device
    x = logits / _column(states, "temperature", torch.float32, device).unsqueeze(-1)
    if any(s.params.top_k > 0 or s.params.top_p < 1 for s in states):
        keep = top_k_top_p_mask(
            x, _column(states, "top_k", torch.long, device), _column(states, "top_p", torch.float32, device)
        )
        x = x.masked_fill(~keep, -math.inf)
    if any(s.params.min_p > 0 for s in states):
        x = x.masked_fill(~min_p_mask(x, _column(states, "min_p", torch.float32, device)), -math.inf)
    return x


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, V] of the tokens min-p keeps (min_p [B], 0 = off): those at least min_p times as likely as
    their row's most likely token, as HF's MinPLogitsWarper and llama.cpp keep them. A ratio of probabilities is
    one of exponentials of logits, so this compares logits, with no softmax; it is the same before top-k and
    top-p or after them, which never cut the most likely token."""
    return logits >= logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(-1)


def _sample(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """A draw from each row's `warped` logits; logits are float32 [B, V]."""
    u = torch.cat([torch.rand(1, generator=s.generator, device=logits.device) for s in states])
    return inverse_cdf_pick(warped(logits, states), u)


def inverse_cdf_pick(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token from softmax(logits) [B, V] per row given u [B] ~ U[0, 1): the first whose cumulative
    probability exceeds u times the row's mass. One number per row, from the row's own generator, keeps a draw
    independent of the batch around it, and costs a uniform, not an exponential per word as Gumbel-max does."""
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    mass = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, u.unsqueeze(-1) * mass, right=True)
    # where rounding puts u * mass at the top: the last token of nonzero probability, where the CDF first peaks
    # (and a vocabulary id whatever the logits: NaN ones leave no peak)
    last = torch.searchsorted(cdf, mass).clamp_(max=cdf.size(-1) - 1)
    picked = torch.minimum(picked, last)
    # A parallel scan (CUDA's cumsum) may round the running sum up at a token of zero probability, which
    # u * mass can then fall under: never return a masked (-inf) token; take the row's most likely instead.
    masked = logits.gather(-1, picked) == -math.inf
    if masked.any():
        picked = torch.where(masked, argmax(logits).unsqueeze(-1), picked)
    return picked.squeeze(-1)


class TokenScores(NamedTuple):
    """A sampled token's log-probability and the `k` most likely tokens' (id, log-probability), best first."""

    logprob: float
    top: list[tuple[int, float]]


def token_scores(logits: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int]) -> list[TokenScores]:
    """For each row of logits [B, V]: token[i]'s log-probability and the ks[i] most likely tokens'.

    Under the model's own distribution, log_softmax of the logits before penalties, temperature, top-k and
    top-p, as vLLM and OpenAI report them: the same numbers whatever the sampling parameters. A token of no
    probability (a -inf logit) gets `IMPOSSIBLE_LOGPROB`, as vLLM gives it: JSON has no -inf.
    """
    logprobs = logits.float().log_softmax(dim=-1).clamp_(min=IMPOSSIBLE_LOGPROB)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
    k = max(ks, default=0)
    if k == 0:
        return [TokenScores(lp, []) for lp in chosen]
    values, ids = (t.tolist() for t in logprobs.topk(min(k, logprobs.size(-1)), dim=-1))
    return [TokenScores(lp, list(zip(row_ids[:n], row_values[:n], strict=True)))
            for lp, row_ids, row_values, n in zip(chosen, ids, values, ks, strict=True)]


class Sampler:
    """Picks the next token of every row of a batch; stateless, all per-sequence state is in SamplerState."""

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        """Sample int64 token ids [B] from logits [B, V] (any float dtype), row i following states[i]."""
        if logits.dim() != 2 or logits.size(0) != len(states):
            raise ValueError(f"expected logits [{len(states)}, vocab], got {list(logits.shape)}")
        constrained = [i for i, s in enumerate(states) if s.constraint is not None]
        if not constrained and all(s.greedy and not s.penalized for s in states):
            return argmax(logits)
        device = logits.device
        penalized = [i for i, s in enumerate(states) if s.penalized]
        if penalized or constrained:  # on a copy: the caller's logits stay as they are
            x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            if penalized:
                apply_penalties_(x, penalized, [states[i] for i in penalized])
        else:
            x = logits.float()
        if constrained:
            allowed = allowed_tokens([states[i].constraint for i in constrained], x.size(-1), device)
            rows = torch.tensor(constrained, device=device)
            x[rows] = x[rows].masked_fill(~allowed, -math.inf)
        sampled = [i for i, s in enumerate(states) if not s.greedy]
        if len(sampled) == len(states):
            return _sample(x, states)
        out = argmax(x)
        if sampled:
            index = torch.tensor(sampled, dtype=torch.long, device=device)
            out[index] = _sample(x[index], [states[i] for i in sampled])
        return out
