"""Daemon settings: one name per setting, read from a TOML profile, then `VRAMLITE_*` env, then CLI flags.

A setting `max_queue` is the TOML key `max_queue`, the env variable `VRAMLITE_MAX_QUEUE` and the flag
`--max-queue`; later sources win (flags > env > profile > defaults). Only this module reads TOML and env.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vramlite.engine.config import parse_size
from vramlite.engine.lora import parse_adapter
from vramlite.server.schemas import error_message

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# The profiles of configs/, through the link vramlite/configs → ../configs, which puts them in the wheel as
# package data: the same path works in a source tree and in an installed package (the Docker image).
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
ENV_PREFIX = "VRAMLITE_"
DEFAULT_PROFILE = "default"

class SettingsError(ValueError):
    """A profile, env variable or flag has a bad value: names the setting and where it came from."""


class Settings(BaseModel):
    """Everything `vramlite serve` needs; validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = Field(None, description="HF-format model directory; default: the shipped demo model")
    fill_model: str | None = Field(None, description="model directory that answers /fill_blank, e.g. a T5; "
                                   "default: the shipped demo T5 when --model is unset, else the served model; "
                                   "'none': the served model")
    served_model_name: str | None = Field(None, description="name for the OpenAI API; default: the dir's name")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; default: a GPU if present")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] | None = None
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_tokens_per_step: int = Field(512, ge=1)
    context: int | None = Field(None, ge=2, description="KV-cache positions per sequence; default: the model's")
    max_queue: int = Field(64, ge=0, description="requests that may wait beyond the running batch; more → 429")
    request_timeout: float = Field(600.0, gt=0, description="seconds from arrival to the last token")
    drain_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for running requests")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_header_bytes: int = Field(16 << 10, ge=1024, description="request headers over this → 431")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client may take to send a request's headers")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send a request's body")
    api_key: str | None = Field(None, min_length=1, description="require `Authorization: Bearer <key>`")
    memory_limit: str | None = Field(None, description="VRAM budget such as 5GiB; layers beyond it are streamed")
    prefetch_depth: int = Field(1, ge=1, le=8, description="streamed layers copied ahead of compute")
    quantize: Literal["none", "int8"] | None = Field(None, description="int8: quantize the decoder linears at load")
    prefix_caching: bool = Field(True, description="a prompt that starts like the tokens a freed KV cache slot "
                                 "holds (a chat's earlier turns) reuses their keys and values")
    kv_cache_dtype: Literal["auto", "int8"] = Field("auto", description="keys and values cached in the compute "
                                                    "dtype (auto) or in int8 with a scale per position and head, "
                                                    "about half the memory (longer contexts, more sequences)")
    speculative_tokens: int = Field(0, ge=0, le=32, description="requests draft up to this many tokens a "
                                    "step by prompt lookup (what followed their last tokens where these occurred "
                                    "before) and verify them in one forward pass; 0 = off")
    pattern_timeout: float = Field(60, gt=0, le=3600, description="seconds a structured-output pattern (JSON "
                                   "schema, regex, choice) may take to compile, in a process of its own; longer is "
                                   "refused (422)")
    reasoning_format: Literal["none", "think"] = Field(
        "none", description='"think": a reasoning model\'s <think>...</think> comes apart from its answer, as '
        "reasoning_content (chat), a reasoning item (responses) or a thinking block (messages); \"none\": it stays "
        "in the text")
    speculative_max_batch: int = Field(1, ge=1, le=4096, description="draft only while at most this many "
                                       "sequences run (batch 1 gains on a CPU, batch 4 loses; layers streamed "
                                       "over PCIe may gain at any batch)")
    compile_decode: bool = Field(False, description="CPU: run decode steps compiled by torch.compile, "
                                 "compiled at load (the demo model 1.4-1.45x faster on 2 Intel cores)")
    cpu_layout: Literal["auto", "dense", "rows", "packed"] = Field(
        "auto", description="CPU: layout of linear weights (float and int8); auto: the fastest, timed at load; "
        "a name: that layout wherever it applies, the same on every load")
    allow_special_tokens: bool = Field(False, description="read special-token strings such as </s> in prompt "
                                       "text as those tokens (default: as plain text)")
    log_prompts: bool = Field(False, description="put prompt and output text in the request log lines")
    lora: list[str] = Field([], description="PEFT LoRA adapter directories merged into the served model's weights "
                            "at load, DIR or DIR:SCALE, comma-separated (default: none)")
    cors_origins: list[str] = Field([], description="origins allowed by CORS, comma-separated (default: none)")
    log_level: str = "INFO"

    @field_validator("memory_limit")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("cors_origins", "lora", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return [o.strip() for o in value.split(",") if o.strip()] if isinstance(value, str) else value

    @property
    def lora_adapters(self) -> list[tuple[str, float]]:
        return [parse_adapter(spec) for spec in self.lora]

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit is None else parse_size(self.memory_limit)


def profile_path(profile: str | Path) -> Path:
    """A profile name (`default`, `gtx1060-6gb`) in configs/, or a path to a TOML file."""
    path = Path(profile)
    if path.suffix != ".toml":
        path = CONFIGS_DIR / f"{profile}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.toml")))
        raise SettingsError(f"profile {profile!r}: no file {path} (profiles in {CONFIGS_DIR}: {known})")
    return path


def _read_profile(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: {e}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    names = Settings.model_fields
    return {key[len(ENV_PREFIX):].lower(): value for key, value in env.items()
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in names}


def load_settings(flags: Mapping[str, Any], env: Mapping[str, str], profile: str | Path = DEFAULT_PROFILE
                  ) -> Settings:
    """Merge a profile, env variables and flags (None = not given); raises SettingsError naming the source."""
    path = profile_path(profile)
    layers = {str(path): _read_profile(path), "environment": _from_env(env),
              "flags": {k: v for k, v in flags.items() if v is not None}}
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, values in layers.items():
        merged.update(values)
        source.update(dict.fromkeys(values, name))
    try:
        return Settings(**merged)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "settings"
            problems.append(f"{name} (from {source.get(name, 'defaults')}): {error_message(err)}")
        raise SettingsError("bad settings: " + "; ".join(problems)) from None
