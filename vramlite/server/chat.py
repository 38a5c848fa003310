"""Chat messages → prompt token ids, with the model's Jinja chat template when it has one."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vramlite.engine.tokenizer import Tokenizer
from vramlite.server.errors import ApiError


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


@lru_cache(maxsize=4)
def _compile(template: str) -> Any:
    # As transformers renders chat templates: sandboxed, trimmed blocks, `raise_exception` available.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)


TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None, *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
    """Token ids that ask the model for the assistant's next message (without `add_generation_prompt`: for
    whatever follows the messages), or with `continue_final_message` for the rest of the last one, an
    assistant's that the caller began (the rendering cut right after its text, as transformers cuts it).

    With a template, the rendered text is trusted (it places the special tokens itself, BOS included), and
    `tools` (OpenAI's function definitions) are the template's to describe; without one, the messages become
    "role: content" lines ending with "assistant:", and tools are refused (400): nothing would tell the model
    of them. The space after the colon is left out where the content starts with one, as a reply generated
    after "assistant:" does: a reply sent back in the next turn then reads as it was generated, and the
    prefix cache reuses its tokens. `template_kwargs` are more of the template's variables (Qwen 3's
    `enable_thinking`, as vLLM's `chat_template_kwargs` passes them), none of TEMPLATE_VARIABLES.
    """
    reserved = sorted(set(template_kwargs or ()) & set(TEMPLATE_VARIABLES))
    if reserved:
        raise ApiError(422, "validation_error", f"chat_template_kwargs: {', '.join(reserved)} come from the "
                       "request itself")
    if tokenizer.chat_template is None:
        if tools:
            raise ApiError(400, "invalid_request", "tools need the model's chat template to describe them, and "
                           "this model has none")
        lines = [f"{m['role']}:{'' if m['content'][:1].isspace() else ' '}{m['content']}" for m in messages]
        prompt = ["assistant:"] if add_generation_prompt and not continue_final_message else []
        return tokenizer.encode("\n".join([*lines, *prompt]))
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    try:
        text = _compile(tokenizer.chat_template).render(
            **(template_kwargs or {}), messages=messages, tools=tools,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            bos_token=_token_text(tokenizer, tokenizer.bos_id), eos_token=_token_text(tokenizer, eos))
    except TemplateError as e:
        raise ApiError(400, "invalid_request", f"the model's chat template rejected the messages: {e}") from None
    if continue_final_message:
        text = _cut_after(text, messages[-1]["content"])
    return tokenizer.encode(text, add_special_tokens=False, parse_special=True)


def _cut_after(text: str, final: str) -> str:
    """`text` cut right after the last place it shows `final` (whose trailing space a template may trim)."""
    at = text.rfind(final.strip())
    if not final.strip() or at < 0:
        raise ApiError(400, "invalid_request", "continue_final_message: the chat template does not show the final "
                       "message's text, so there is nothing to continue")
    whole = text[at : at + len(final.lstrip())] == final.lstrip()
    return text[: at + len(final.lstrip() if whole else final.strip())]
