"""Tool calling on the OpenAI chat route: how a reply is held to, or read for, calls of the request's tools.

The tools go to the model's chat template (`tools`), which describes them in the
model's own words. Then, by `tool_choice`:
- a named function: the reply is that function's arguments, held to its parameters' JSON schema (structured
  output), as vLLM does for a named tool;
- "required": the reply is a JSON array of calls, each `{"name", "arguments"}` of one of the tools;
- "auto" (the default with tools): the model writes what it likes, and calls are read from the formats
  open models use: Hermes' `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Qwen 2.5 and 3,
  Hermes, ...); Mistral's `[TOOL_CALLS]` token, then a JSON array of calls (v0.3, Nemo) or each call as
  `name[ARGS]{...}` (Mistral Small 3.2, Devstral, Magistral), which the route keeps in the text
  (`MISTRAL_TAG`, special tokens shown); and a reply that is one JSON call or an array of them, with
  `arguments` or `parameters` (Llama 3.1 and later);
- "none": the model writes what it likes, and nothing is read as a call.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field, replace
from typing import Any

from vramlite.server.reasoning import tag_start_at_end

HERMES_TAG = "<tool_call>"
MISTRAL_TAG = "[TOOL_CALLS]"
CALL_TAGS = (HERMES_TAG, MISTRAL_TAG)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_ID = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str | None = field(default=None, compare=False)  # the call's id where its format sets one

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id or f"call_{secrets.token_hex(12)}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def forced_schema(tools: list[dict[str, Any]], choice: str | dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a reply is held to under `choice` (None: a free reply): a named function's parameters,
    or for "required" an array of one or more calls of the tools."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return next(_parameters(t) for t in tools if t["function"]["name"] == name)
    if choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": _parameters(t)},
              "required": ["name", "arguments"]} for t in tools]
    return {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def read_calls(text: str, tools: list[dict[str, Any]], choice: str | dict[str, Any]
               ) -> tuple[str | None, list[ToolCall]]:
    """A reply's text content (None if only calls) and the tool calls in it, as `choice` shaped it."""
    if isinstance(choice, dict):
        return None, [ToolCall(choice["function"]["name"], text)]
    if choice == "none":
        return text, []
    names = {t["function"]["name"] for t in tools}
    if choice == "required":
        calls = _calls(json_or_none(text), names)  # none where max_tokens cut the array short
        return (None, calls) if calls else (text, [])
    if MISTRAL_TAG in text:
        content, _, rest = text.partition(MISTRAL_TAG)
        calls = _mistral_calls(rest, names)
        if calls:
            return content.strip() or None, calls
    blocks = _HERMES.findall(text)
    if blocks:
        calls = [call for block in blocks for call in _calls(json_or_none(block), names)]
        if calls:
            content = _HERMES.sub("", text).strip()
            return content or None, calls
    calls = _calls(json_or_none(text.strip()), names)
    return (None, calls) if calls else (text, [])


def _mistral_calls(text: str, names: set[str]) -> list[ToolCall]:
    """The calls after Mistral's first `[TOOL_CALLS]`: a JSON array of calls, or `name[ARGS]{...}` (with
    `[CALL_ID]id` before `[ARGS]` in some versions) after each tag; none unless all parse. Each gets an id of 9
    letters and digits unless the model wrote one: Mistral's chat templates refuse other ids."""
    calls = []
    for part in text.split(MISTRAL_TAG):
        name, args_tag, arguments = part.partition("[ARGS]")
        if not args_tag:
            found = _calls(json_or_none(part.strip()), names)
            if not found:
                return []
            calls += found
            continue
        name, _, call_id = name.partition("[CALL_ID]")
        parsed = json_or_none(arguments.strip())
        found = _calls({"name": name.strip(), "arguments": parsed}, names) if isinstance(parsed, dict) else []
        if not found:
            return []
        calls.append(replace(found[0], id=call_id.strip() or None))
    return [call if call.id else replace(call, id="".join(secrets.choice(_MISTRAL_ID) for _ in range(9)))
            for call in calls]


class CallWatcher:
    """An "auto" reply streamed: its text goes out as it comes while it cannot be a tool call, and is held back
    from where one may begin (a Hermes `<tool_call>` tag, Mistral's `[TOOL_CALLS]`, or a reply that opens with
    a JSON object or array)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # text[:sent] has gone out
        self.holding = False

    def feed(self, piece: str) -> str:
        """The text that can go out now, `piece` added to the reply."""
        self.text += piece
        if self.holding or not self.text.strip():
            return ""
        if self.sent == 0 and self.text.lstrip()[0] in "{[":
            self.holding = True
            return ""
        found = [at for at in (self.text.find(tag, self.sent) for tag in CALL_TAGS) if at >= 0]
        if found:
            at = min(found)
            self.holding = True
        else:  # hold back an end that may be a tag's beginning
            at = len(self.text) - max(tag_start_at_end(self.text, tag) for tag in CALL_TAGS)
        out, self.sent = self.text[self.sent : at], at
        return out

    def finish(self, tools: list[dict[str, Any]]) -> tuple[str, list[ToolCall]]:
        """At the reply's end: the text still to go out and the calls read from the whole reply."""
        content, calls = read_calls(self.text, tools, "auto")
        if not calls:
            return self.text[self.sent :], []
        rest = self.text[self.sent :]
        rest = rest.partition(MISTRAL_TAG)[0] if MISTRAL_TAG in self.text else _HERMES.sub("", rest)
        return ("" if content is None else rest.strip()), calls


def json_or_none(text: str) -> Any:
    """The JSON value of `text`, None where it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _calls(value: Any, names: set[str]) -> list[ToolCall]:
    """The calls of known tools in a parsed JSON call or list of calls (`arguments` or `parameters`)."""
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append(ToolCall(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls
