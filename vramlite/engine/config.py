"""Model configuration: one normalized view of an HF `config.json`, whatever the family."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramlite.engine.errors import ModelLoadError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (`rope_type` is default, linear, dynamic, llama3, yarn or longrope).

    `partial_rotary_factor` < 1 rotates only that leading fraction of each head's dimensions (phi3).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    partial_rotary_factor: float = 1.0

    SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, parsed from `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (qwen3, gemma3)
    attention_scale: float | None = None  # scores' scale when not head_dim ** -0.5 (gemma2, gemma3)
    attention_softcap: float | None = None  # scores squashed to cap·tanh(score / cap) (gemma2)
    logit_softcap: float | None = None  # the same for the final logits (gemma2)
    layer_windows: tuple[int | None, ...] = ()  # each decoder layer's sliding window (None: full); () if none has
    rope: RopeConfig | None = None
    local_rope: RopeConfig | None = None  # sliding-window layers' rope, where it differs (gemma3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    quantization: str | None = None  # "int8": decoder-block linears hold int8 weights
    is_encoder_decoder: bool = False  # prompts feed an encoder; `num_layers` counts the decoder's layers
    decoder_start_token_id: int | None = None  # the decoder's first input (encoder-decoder models)
    whole_prompt: bool = False  # the prompt attends both ways (CPM-Ant), so it is prefilled in one piece
    cache_prefix: int = 0  # cache positions each sequence takes before its own tokens (CPM-Ant's prompt tokens)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, raising ModelLoadError naming the file on any problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def eos_ids(value: Any) -> tuple[int, ...]:
    """`eos_token_id` as HF writes it (absent, an int or a list) → a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def common_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every family reads the same way from config.json."""
    return {"bos_token_id": raw.get("bos_token_id"), "eos_token_ids": eos_ids(raw.get("eos_token_id")),
            "torch_dtype": raw.get("torch_dtype") or raw.get("dtype"), "raw": raw}


def require(raw: dict[str, Any], *keys: str, source: str = "config.json") -> Any:
    """First present key among `keys` (HF's aliases), or ModelLoadError naming them."""
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    raise ModelLoadError(f"{source}: missing {' / '.join(keys)}")


def parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Rope settings from either transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` pair."""
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "su":  # LongRoPE's first name, in early phi3 configs
        rope_type = "longrope"
    if rope_type not in RopeConfig.SUPPORTED:
        raise ModelLoadError(
            f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(RopeConfig.SUPPORTED)})"
        )
    # Older phi3 configs keep these two beside rope_scaling rather than inside it.
    for k in ("original_max_position_embeddings", "partial_rotary_factor"):
        if params.get(k) is None and raw.get(k) is not None:
            params[k] = raw[k]
    kwargs = {
        k: params[k]
        for k in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                  "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
                  "partial_rotary_factor")
        if params.get(k) is not None
    }
    if rope_type in ("llama3", "yarn", "longrope") and "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = require(raw, "max_position_embeddings")
    if rope_type == "longrope":
        if "factor" not in kwargs:  # phi3 gives the context's growth by its two lengths
            kwargs["factor"] = require(raw, "max_position_embeddings") / kwargs["original_max_position_embeddings"]
        kwargs["short_factor"] = tuple(require(params, "short_factor", source="config.json rope_scaling"))
        kwargs["long_factor"] = tuple(require(params, "long_factor", source="config.json rope_scaling"))
    return RopeConfig(theta=theta, rope_type=rope_type, **kwargs)


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in a size such as `5GiB`, `512MiB`, `6GB`, `1024` or an int; ValueError if it is none."""
    if isinstance(size, int) and not isinstance(size, bool):
        number, unit = size, "B"
    else:
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise ValueError(f"{size!r} is not a size; write a number with B, KB, MB, GB, KiB, MiB or GiB")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    nbytes = int(number * _SIZE_UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"size {size!r} must be more than 0 bytes")
    return nbytes
