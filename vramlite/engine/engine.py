"""`Engine`: load a model directory, then generate — one call, a stream, or step by step for a server."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vramlite.engine.config import parse_size, read_json
from vramlite.engine.detokenizer import IncrementalDetokenizer, texts_at
from vramlite.engine.device import pick_device, pick_dtype
from vramlite.engine.errors import LoadOutOfMemoryError, PromptTooLongError, UnsupportedTaskError
from vramlite.engine.fill_blank import continuation
from vramlite.engine.gpu_probe import GpuProbe, probe_device
from vramlite.engine.loader import load_model
from vramlite.engine.offload import WeightStore
from vramlite.engine.pooling import model_pooling, reduce
from vramlite.engine.runner import Chunk, HiddenFn, ModelRunner, ScoreFn
from vramlite.engine.sampler import (
    Sampler,
    SamplerState,
    SamplingParams,
    TokenScores,
    argmax,
    token_scores,
    warped,
)
from vramlite.engine.scheduler import Scheduler, SchedulerConfig
from vramlite.engine.sequence import FinishReason, Logprobs, StepOutput, TokenLogprob
from vramlite.engine.sequence import Sequence as Seq
from vramlite.engine.speculative import NgramIndex, accepted, sampled
from vramlite.engine.structured import Grammars
from vramlite.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# generation_config.json keys → SamplingParams fields, used as per-model defaults.
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class Completion:
    """The result of one finished request."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Logprobs] | None = None  # one per generated token, when the request asked for them
    prompt_logprobs: list[Logprobs | None] | None = None  # one per prompt token (None for the first), if asked
    stop_string: str | None = None  # the stop string that ended it, if one did


@dataclass
class StepResult:
    """What a forward pass computed for one sequence: its new token, if its prompt is all in the cache, with
    the token's scores, and the scores of the prompt tokens of this step's chunk, when the request asked. A
    step that verified a draft yields its accepted tokens and the model's next, having `computed` its chunk's
    tokens up to the first rejected one."""

    tokens: list[int] = field(default_factory=list)
    scores: TokenScores | None = None
    prompt_scores: list[TokenScores] = field(default_factory=list)
    computed: int | None = None  # tokens now in the cache, where not all the step's chunk (a rejected draft)
    pooled: torch.Tensor | None = None  # the chunk's part of an embedding (`pooling.reduce`)


class Engine:
    """A model, its tokenizer, a KV cache for `max_batch_size` sequences, and the generation loop.

    Not thread-safe: one thread calls `add_request` / `step` (the server's
    engine thread), or uses the blocking `generate` / `stream` helpers.
    """

    def __init__(self, model_dir: Path, runner: ModelRunner, tokenizer: Tokenizer,
                 scheduler_config: SchedulerConfig, defaults: dict[str, Any], probe: GpuProbe | None = None,
                 speculative_tokens: int = 0, speculative_max_batch: int = 1,
                 pattern_timeout: float | None = None) -> None:
        self.model_dir = model_dir
        self.probe = probe or GpuProbe.cpu()  # what the device reported at start (name, PCIe, bandwidth)
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = runner.model.config
        self.context = runner.context
        self.defaults = defaults
        self.sampler = Sampler()
        self.scheduler = Scheduler(scheduler_config, runner.cache.allocate, runner.cache.free)
        self.eos_ids = tuple(dict.fromkeys((*tokenizer.eos_ids, *self.config.eos_token_ids)))
        self.grammars = Grammars(tokenizer, self.config.vocab_size, self.eos_ids, pattern_timeout)  # structured output
        self.continuation = continuation(self.config, tokenizer)
        self._ids = itertools.count()
        self._sequences: dict[int, Seq] = {}
        self.speculative_tokens = speculative_tokens  # drafted per step and request (see `speculative`)
        self.speculative_max_batch = speculative_max_batch  # drafts only while at most this many sequences run
        self.drafted_tokens = 0
        self.accepted_tokens = 0

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_batch_size: int = 8, context: int | None = None,
                 max_tokens_per_step: int = 512, quantize: str | None = None,
                 memory_limit: int | str | None = None, prefetch_depth: int = 1,
                 compile_decode: bool = False, cpu_layout: str = "auto", prefix_caching: bool = True,
                 speculative_tokens: int = 0, speculative_max_batch: int = 1, kv_cache_dtype: str = "auto",
                 lora: Sequence[tuple[str | Path, float]] = (), pattern_timeout: float | None = None) -> Engine:
        """Load an HF-format directory (config.json, *.safetensors, tokenizer) for generation.

        device: "cpu", "cuda", "cuda:1" ... (default: a GPU if present). dtype:
        "fp32" / "fp16" / "bf16" (default: the best for the device).
        context: KV-cache positions per sequence (default: the model's maximum).
        quantize: "int8" to quantize the decoder blocks' linear layers at load
        (an int8 checkpoint from `vramlite quantize` loads as int8 anyway).
        memory_limit: a device-memory budget in bytes or as "5GiB", "512MiB"
        (default: none); layers that do not fit are streamed from host memory,
        `prefetch_depth` layers ahead. `engine.offload` then holds the plan and
        the transfer accounting. compile_decode: run decode steps compiled by
        torch.compile, compiled here at load (CPU, float models wholly
        resident; see `ModelRunner`). cpu_layout: how CPU linear weights (float
        and int8) are laid out, "auto" (timed at load: the fastest here) or
        "dense", "rows", "packed" (see `vramlite.engine.layers.cpu_layout`). prefix_caching: a prompt that
        starts like the tokens a freed cache slot holds reuses their keys and values (see `KVCache`).
        speculative_tokens: requests draft up to this many tokens a step by prompt lookup and verify
        them in one forward pass (see `vramlite.engine.speculative`); 0: off; only while at most
        `speculative_max_batch` sequences run (a drafting sequence leaves the batched decode path).
        kv_cache_dtype: "auto" (the compute dtype) or "int8" (about half the memory; see `KVCache`).
        lora: (PEFT adapter directory, scale) pairs merged into the weights at load (see `vramlite.engine.lora`).
        pattern_timeout: seconds a structured-output pattern may take to compile, in a process of its own
        (see `Grammars`); None: no limit, compiled in this process.
        """
        if kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {kv_cache_dtype!r}")
        kv_int8 = kv_cache_dtype == "int8"
        if not 0 <= speculative_tokens <= max_tokens_per_step:
            raise ValueError(f"speculative_tokens must be in [0, max_tokens_per_step], got {speculative_tokens}")
        start = time.perf_counter()
        model_dir = Path(path)
        dev = pick_device(device)
        dt = pick_dtype(dev, dtype)
        probe = probe_device(dev)  # raises for a GPU too old to use, before any weight is read
        log.info("%s", probe.log_line())
        scheduler_config = SchedulerConfig(max_batch_size, max_tokens_per_step, prefix_caching)
        free, total = torch.cuda.mem_get_info(dev) if dev.type == "cuda" else (None, None)
        try:
            model, context = load_model(model_dir, dev, dt, context, quantize, memory_limit, max_batch_size,
                                        max_tokens_per_step, prefetch_depth, probe.h2d_bytes_per_second, kv_int8,
                                        lora)
            runner = ModelRunner(model, dev, dt, max_batch_size, context, compile_decode, cpu_layout,
                                 max_chunk=max_tokens_per_step, kv_int8=kv_int8)
            runner.warm_up_kernels(max_tokens_per_step)
        except torch.cuda.OutOfMemoryError as e:
            limit = parse_size(memory_limit) if isinstance(memory_limit, str) else memory_limit
            raise LoadOutOfMemoryError(model_dir, e, free, total, limit) from None
        tokenizer = Tokenizer.from_dir(model_dir)
        defaults = cls._generation_defaults(model_dir)
        log.info("engine ready in %.2f s: KV cache %.1f MiB for %d sequences × %d positions",
                 time.perf_counter() - start, runner.cache.nbytes / 2**20, max_batch_size, context)
        return cls(model_dir, runner, tokenizer, scheduler_config, defaults, probe, speculative_tokens,
                   speculative_max_batch, pattern_timeout)

    @staticmethod
    def _generation_defaults(model_dir: Path) -> dict[str, Any]:
        path = model_dir / "generation_config.json"
        if not path.exists():
            return {}
        gen = read_json(path)
        defaults = {ours: gen[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if gen.get(theirs) is not None}
        if gen.get("do_sample") is False:
            defaults["temperature"] = 0.0
        return defaults

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def offload(self) -> WeightStore | None:
        """The memory plan and its accounting (`.plan`, `.stats`) when loaded with a memory_limit."""
        return self.runner.model.offload

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        """SamplingParams from keyword arguments over the model's generation_config.json defaults."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        if "top_n" in given:
            given.setdefault("top_k", given.pop("top_n"))
        return SamplingParams.from_kwargs(**{**self.defaults, **given})

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text or token ids); returns its sequence id. Raises PromptTooLongError, and
        ValueError for bad input (a structured-output pattern that does not compile, among others; compiling
        one takes up to seconds, once per pattern: `grammars.index` may do it ahead, in another thread).

        An encoder-decoder model with sentinels continues a prompt that holds none as one blank at its end
        (see `fill_blank.Continuation`); a prompt with sentinels is passed to the encoder as it is.
        """
        params = params or self.sampling_params()
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise ValueError("prompt is empty and the tokenizer adds no BOS token; give at least one token")
        if len(prompt_ids) >= self.context:
            raise PromptTooLongError(len(prompt_ids), self.context)
        if params.pooling is not None:
            self._check_embeds()
        if params.prompt_logprobs is not None and (self.config.is_encoder_decoder or self.config.whole_prompt):
            raise ValueError("prompt_logprobs: this model reads its prompt both ways (an encoder's, or CPM-Ant's), "
                             "so a prompt token has no probability given those before it")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        bad = [t for t, _ in params.logit_bias if t >= self.config.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                             f"(0..{self.config.vocab_size - 1})")
        encoder_ids: list[int] = []
        given = len(prompt_ids)  # usage counts the prompt as given, not the blank a continuation adds
        if self.config.is_encoder_decoder:  # the prompt is the encoder's; the decoder starts from its start token
            encoder_ids, prompt_ids = prompt_ids, [self.config.decoder_start_token_id]
            cont = self.continuation
            if cont is not None and cont.applies(encoder_ids):
                encoder_ids, prompt_ids = cont.encoder_ids(encoder_ids), [*prompt_ids, cont.sentinel_id]
                params = replace(params, stop_token_ids=(*params.stop_token_ids, *sorted(cont.sentinel_ids)))
            if len(encoder_ids) > self.context:
                raise PromptTooLongError(len(encoder_ids), self.context)
        state = SamplerState(params, prompt_ids, self.device, self.grammars.constraint(params),
                             end_ids=[*(() if params.ignore_eos else self.eos_ids), *params.stop_token_ids])
        seq = Seq(next(self._ids), prompt_ids, params, state,
                  IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens), self.eos_ids,
                  encoder_ids, self.config.whole_prompt)
        seq.num_prompt_tokens = given
        if self.speculative_tokens and seq.caches_prefix and not state.penalized and state.constraint is None \
                and params.logprobs is None:
            seq.lookup = NgramIndex()
        self._sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def sequence(self, seq_id: int) -> Seq:
        return self._sequences[seq_id]

    def abort(self, seq_id: int) -> StepOutput | None:
        """Cancel a request; its cache slot is free for the next step. None if it already finished."""
        seq = self._sequences.pop(seq_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        return seq.finish(FinishReason.CANCELLED)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[StepOutput]:
        """Run one forward pass over the scheduled batch; returns what each sequence produced.

        A sequence whose forward pass fails (an exception, CUDA out of memory) ends with
        `FinishReason.ERROR` and frees its slot; the rest of the batch goes on.
        """
        # max_tokens 0 ends a request before it runs, unless it asked for its prompt's log-probabilities or embedding
        outputs = [self._finish(seq, FinishReason.LENGTH) for seq in list(self.scheduler.waiting)
                   if seq.params.max_tokens == 0 and not seq.runs_without_output]
        self._draft()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        try:
            results = self._compute(batch)
        except Exception as error:
            batch, results, failed = self._isolate(batch, error)
            outputs += failed
        for (seq, n), result in zip(batch, results, strict=True):
            start = seq.num_computed
            if result.prompt_scores:
                seq.prompt_logprobs += self._prompt_logprobs(seq, start, result.prompt_scores)
            if seq.pooler is not None:
                seq.pooler.add(result.pooled)
            if result.computed is None:
                seq.num_computed += n
            else:
                seq.num_computed += result.computed
                self.drafted_tokens += n - 1
                self.accepted_tokens += result.computed - 1
                seq.lookup.verified(n - 1, result.computed - 1)
            seq.encoded = True
            if result.tokens:
                new = []
                for token in result.tokens:
                    new.append(seq.append(token, self.context, result.scores))
                    if new[-1].finished:
                        break
            elif seq.num_pending == 0:  # a prompt scored or embedded with max_tokens 0, now all in the cache
                new = [seq.finish(FinishReason.LENGTH)]
                if seq.pooler is not None:
                    new[0] = replace(new[0], embedding=seq.pooler.embedding())
            else:
                continue
            if start < seq.prompt_length <= seq.num_computed:  # the first output: the prompt is in the cache
                new[0] = replace(new[0], cached_tokens=seq.num_cached_tokens)
                if seq.params.prompt_logprobs is not None:
                    new[0] = replace(new[0], prompt_logprobs=tuple(seq.prompt_logprobs))
            if new[-1].finished:
                self._release(seq)
            outputs += new
        return outputs

    def _draft(self) -> None:
        """Draft the next tokens of each decoding sequence that speculates (the scheduler gives them what its
        budget has left), as many as may still be generated and fit the context: none while more than
        `speculative_max_batch` sequences run."""
        drafting = self.speculative_tokens and len(self.scheduler.running) <= self.speculative_max_batch
        for seq in self.scheduler.running:
            seq.draft = []
            if drafting and seq.lookup is not None and seq.num_pending == 1:
                room = min(self.speculative_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                           self.context - len(seq.token_ids))
                seq.draft = seq.lookup.draft(seq.token_ids, room)

    def _compute(self, batch: list[tuple[Seq, int]]) -> list[StepResult]:
        """The forward pass and sampling for `batch`: a token for each sequence whose prompt is now all in
        the cache (and that may generate), and the scores of prompt tokens asked for. Changes no sequence, so
        a failure can be retried."""
        chunks = [Chunk(seq.slot, seq.next_tokens(n), seq.num_computed,
                        seq.encoder_ids if seq.num_encoder_pending else ()) for seq, n in batch]
        results = [StepResult() for _ in batch]
        scoring = {i: self._prompt_scorer(seq, results[i]) for i, (seq, n) in enumerate(batch)
                   if seq.params.prompt_logprobs is not None and seq.num_computed < seq.prompt_length - 1}
        verifying = {i: self._verifier(seq, n, results[i]) for i, (seq, n) in enumerate(batch)
                     if n > seq.num_pending}
        pooling = {i: self._pooled_into(seq, results[i]) for i, (seq, _) in enumerate(batch) if seq.pooler is not None}
        logits = self.runner.forward(chunks, scoring={**scoring, **verifying}, hidden=pooling)
        rows = [row for row, (seq, n) in enumerate(batch) if seq.num_pending == n and seq.params.max_tokens > 0]
        if not rows:
            return results
        logits = logits if len(rows) == len(batch) else logits[rows]
        picked = self.sampler(logits, [batch[row][0].sampler for row in rows])
        asked = {i: batch[row][0].params.logprobs for i, row in enumerate(rows)
                 if batch[row][0].params.logprobs is not None}
        scores = dict(zip(asked, token_scores(logits[list(asked)], picked[list(asked)], list(asked.values())),
                          strict=True)) if asked else {}
        for i, (row, token) in enumerate(zip(rows, picked.tolist(), strict=True)):
            results[row].tokens, results[row].scores = [token], scores.get(i)
        return results

    def _verifier(self, seq: Seq, n: int, result: StepResult) -> ScoreFn:
        """Checks the draft of `seq`'s chunk of `n` tokens (the last sampled one, then n - 1 drafted) against
        the model's logits at each of its positions, into `result`: kept to its first miss for a greedy
        request, by speculative sampling for a sampled one."""
        draft = seq.draft[: n - 1]
        rows: list[torch.Tensor] = []

        def verify(first: int, logits: torch.Tensor) -> None:
            rows.append(argmax(logits) if seq.sampler.greedy else logits)
            if sum(len(r) for r in rows) == n:
                chunk = torch.cat(rows)
                if seq.sampler.greedy:
                    result.tokens = accepted(chunk.tolist(), draft)
                else:
                    probs = warped(chunk, [seq.sampler] * n).softmax(dim=-1)
                    result.tokens = sampled(probs, draft, seq.sampler.generator)
                result.computed = len(result.tokens)  # the last sampled token and the drafts kept
        return verify

    @staticmethod
    def _pooled_into(seq: Seq, result: StepResult) -> HiddenFn:
        """Reduces `seq`'s chunk's final hidden states to its part of the embedding, into `result`."""
        def take(states: torch.Tensor) -> None:
            result.pooled = reduce(seq.pooler.method, seq.num_computed, seq.pooler.length, states)
        return take

    @staticmethod
    def _prompt_scorer(seq: Seq, result: StepResult) -> ScoreFn:
        """Scores into `result` the prompt tokens that the logits of `seq`'s chunk predict: row r of the chunk
        (token num_computed + r) predicts token num_computed + r + 1."""
        def score(first: int, logits: torch.Tensor) -> None:
            start = seq.num_computed + first + 1
            targets = seq.token_ids[start : min(start + len(logits), seq.prompt_length)]
            if targets:
                ids = torch.tensor(targets, device=logits.device)
                k = seq.params.prompt_logprobs
                result.prompt_scores += token_scores(logits[: len(targets)], ids, [k] * len(targets))
        return score

    def _prompt_logprobs(self, seq: Seq, start: int, scores: list[TokenScores]) -> list[Logprobs]:
        """Log-probabilities of prompt tokens start + 1, start + 2, ... from their scores, with their texts."""
        entries = []
        for t, score in enumerate(scores, start + 1):
            token = seq.token_ids[t]
            texts = texts_at(self.tokenizer, seq.token_ids, t, [token, *(i for i, _ in score.top)])
            top = tuple(TokenLogprob(i, text, lp) for (i, lp), text in zip(score.top, texts[1:], strict=True))
            entries.append(Logprobs(TokenLogprob(token, texts[0], score.logprob), top))
        return entries

    def _isolate(self, batch: list[tuple[Seq, int]], error: Exception
                 ) -> tuple[list[tuple[Seq, int]], list[StepResult], list[StepOutput]]:
        """After a failed batch, run each sequence alone: those that fail again end with ERROR.

        The retry is exact: the failed pass advanced no sequence, and the cache rows it may have
        written are rewritten with the same values.
        """
        log.error("event=step_failed seq_ids=%s error=%r; retrying each sequence alone",
                  ",".join(str(seq.seq_id) for seq, _ in batch), error, exc_info=error)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory may pass once the failed pass's blocks are gone
        kept: list[tuple[Seq, int]] = []
        results: list[StepResult] = []
        failed: list[StepOutput] = []
        for seq, n in batch:
            cause = error
            if len(batch) > 1:
                try:
                    results += self._compute([(seq, n)])
                    kept.append((seq, n))
                    continue
                except Exception as e:
                    cause = e
            log.error("event=sequence_failed seq_id=%d error=%r", seq.seq_id, cause)
            out = self._finish(seq, FinishReason.ERROR)
            failed.append(replace(out, error=f"{type(cause).__name__}: {cause}"))
        return kept, results, failed

    def _finish(self, seq: Seq, reason: FinishReason) -> StepOutput:
        out = seq.finish(reason)
        self._release(seq)
        return out

    def _release(self, seq: Seq) -> None:
        self.scheduler.remove(seq)
        self._sequences.pop(seq.seq_id, None)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kwargs: Any
               ) -> Iterator[StepOutput]:
        """Yield each step's output for one prompt as it is produced; the last one has `finish_reason`."""
        seq_id = self.add_request(prompt, params or self.sampling_params(**kwargs))
        try:
            while True:
                for out in self.step():
                    if out.seq_id == seq_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(seq_id)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kwargs: Any
                 ) -> Completion:
        """Generate for one prompt; keyword arguments are SamplingParams fields (`top_n` = `top_k`)."""
        return self.generate_batch([prompt], params or self.sampling_params(**kwargs))[0]

    def embedding_params(self, pooling: str | None = None) -> SamplingParams:
        """The parameters of an embedding request: `pooling`, else the model's (`pooling.model_pooling`).
        UnsupportedTaskError for a model without embeddings, or whose directory asks for a pooling that is not
        supported."""
        self._check_embeds()
        try:
            return SamplingParams(max_tokens=0, pooling=pooling or model_pooling(self.model_dir))
        except ValueError as e:
            raise UnsupportedTaskError(str(e)) from None

    def _check_embeds(self) -> None:
        cfg = self.config
        if cfg.is_encoder_decoder or cfg.whole_prompt or cfg.cache_prefix:
            raise UnsupportedTaskError(f"embeddings: a {cfg.model_type} model does not read its prompt left to "
                                       "right alone; embeddings come from decoder-only models")

    def embed(self, inputs: Sequence[str | Sequence[int]], pooling: str | None = None) -> list[list[float]]:
        """The embedding of each input (text or token ids), batched by the scheduler: its final hidden states
        pooled (`pooling`: "last", "mean" or "first"; default the model's) and L2-normalized. RuntimeError if
        the forward pass fails for an input."""
        params = self.embedding_params(pooling)
        ids = [self.add_request(p, params) for p in inputs]
        found: dict[int, list[float]] = {}
        try:
            while len(found) < len(ids):
                for out in self.step():
                    if out.finish_reason is FinishReason.ERROR:
                        raise RuntimeError(f"the forward pass failed for input {ids.index(out.seq_id)}: {out.error}")
                    if out.embedding is not None:
                        found[out.seq_id] = out.embedding
        finally:
            for i in ids:
                self.abort(i)
        return [found[i] for i in ids]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
                       ) -> list[Completion]:
        """Generate for several prompts at once, batched by the scheduler; results in prompt order."""
        params = params or self.sampling_params()
        ids = [self.add_request(p, params) for p in prompts]
        seqs = {i: self._sequences[i] for i in ids}
        try:
            while not all(s.finished for s in seqs.values()):
                self.step()
        finally:
            for i in ids:
                self.abort(i)
        return [Completion(s.text, s.output_ids, s.finish_reason, s.num_prompt_tokens, s.num_output_tokens,
                           None if s.params.logprobs is None else s.logprobs,
                           None if s.params.prompt_logprobs is None else s.prompt_logprobs, s.stop.matched)
                for s in seqs.values()]
