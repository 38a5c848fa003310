"""Request and reply bodies, with every field bounded. Unset sampling fields take the model's defaults."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from vramlite.engine.fill_blank import MAX_BLANKS, SPAN, split_blanks
from vramlite.engine.sampler import (
    MAX_CHOICE_STRINGS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_PATTERN_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
)
from vramlite.server.tools import forced_schema

MAX_PROMPT_CHARS = 1 << 20  # the body limit binds first; this keeps the schema bounded on its own
MAX_TOKENS_BOUND = 1 << 20  # the real bound is the model's context, checked per request
MAX_MODEL_NAME_CHARS = 256
MAX_TOOLS = 128
MAX_TOOL_NAME_CHARS = 64


def error_message(err: ErrorDetails) -> str:
    """The message of one pydantic error; our validators' ValueErrors read as their own text, without
    pydantic's "Value error, " in front."""
    return str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]


def _integral_float_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An int type with `bounds` (ge, le, lt) that takes 2.0 as 2, as JSON Schema's integer does (strict
    pydantic does not); "2" and true stay refused."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral_float_to_int)]


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Seed = json_int(ge=-(2**63), lt=2**63)
MaxTokens = json_int(ge=0, le=MAX_TOKENS_BOUND)
TopK = json_int(ge=0, le=1 << 20)
TokenId = json_int()
MAX_CHOICES = 16
ChoiceCount = json_int(ge=1, le=MAX_CHOICES)
Regex = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]
OutputChoices = Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]],
                          Field(min_length=1, max_length=MAX_CHOICE_STRINGS)]


class Body(BaseModel):
    """A request body, strict: a value must have its schema's JSON type (`"stream": 0` is a 422, not false)."""

    model_config = ConfigDict(strict=True)


class SamplingFields(Body):
    """BMInf's sampling parameters; a field left out (or null) takes the model's generation_config default."""

    # max_tokens left out: 128 (BMInf's and TGI's habit), or generate until the context is full (OpenAI's)
    until_context: ClassVar[bool] = False

    max_tokens: MaxTokens | None = Field(None, description="tokens to generate at most, ≤ the context (default "
                                         "128 on /generate, until the context is full on the OpenAI routes)")
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy (default 0.9)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (default 1.0)")
    top_k: TopK | None = Field(None, validation_alias=AliasChoices("top_k", "top_n"),
                               description="0 = off (default); `top_n` is an alias")
    min_p: float | None = Field(None, ge=0, le=1, description="cut tokens less likely than this times the most "
                                "likely one, after temperature (0 = off, the default)")
    min_tokens: MaxTokens | None = Field(None, description="tokens to generate at least: EOS and stop tokens are "
                                         "banned, and stop strings not matched, before them (default 0)")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="1 = off (default)")
    stop: StopString | list[StopString] | None = Field(None, description=f"a string or up to {MAX_STOP_STRINGS}")
    include_stop_str_in_output: bool | None = Field(None, description="the stop string that matched ends the "
                                                    "text instead of being cut off (vLLM's)")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_STRINGS, description="tokens that end "
                                                 "the text like a stop string, not shown (vLLM's)")
    skip_special_tokens: bool | None = Field(None, description="false: special tokens the model writes show in "
                                             "the text (vLLM's; default true)")
    seed: Seed | None = None
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] \
        | None = Field(None, max_length=MAX_LOGIT_BIAS, description="token id → added to its logit before sampling "
                       "(-100 bans it, 100 all but forces it), OpenAI's")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    def sampling_kwargs(self) -> dict[str, Any]:
        """The fields `Engine.sampling_params` takes; None means the model's default."""
        kwargs = self.model_dump(include=set(SamplingFields.model_fields))
        if self.logit_bias is not None:
            kwargs["logit_bias"] = {int(token): bias for token, bias in self.logit_bias.items()}
        return {**kwargs, **self.logprobs_kwargs(), **self.output_kwargs()}

    def output_kwargs(self) -> dict[str, Any]:
        """`json_schema` or `regex` for `SamplingParams` (structured output), where the route's body asks."""
        return {}

    def logprobs_kwargs(self) -> dict[str, int | None]:
        """`logprobs` and `prompt_logprobs` for `SamplingParams` (how many alternatives to report with each
        generated or prompt token's log-probability), where the route's body asks for them."""
        return {}


LogprobsCount = json_int(ge=0, le=MAX_LOGPROBS)


class GenerateRequest(SamplingFields):
    """`POST /generate`: continue a prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    stream: bool = False
    logprobs: LogprobsCount | None = Field(None, description="report each token's log-probability and this "
                                           "many most likely tokens' (the model's distribution, before sampling)")
    prompt_logprobs: LogprobsCount | None = Field(None, description="the same for the prompt's tokens, each given "
                                                  "those before it; with max_tokens 0, scores the prompt alone")

    json_schema: dict[str, Any] | None = Field(None, description="output JSON that this JSON Schema accepts (then "
                                               "it ends, with EOS)")
    regex: Regex | None = Field(None, description="output text that this regular expression matches whole")
    choice: OutputChoices | None = Field(None, description="output exactly one of these strings")

    def logprobs_kwargs(self) -> dict[str, int | None]:
        return {"logprobs": self.logprobs, "prompt_logprobs": self.prompt_logprobs}

    def output_kwargs(self) -> dict[str, Any]:
        return {"json_schema": self.json_schema, "regex": self.regex, "choice": self.choice}


class FillBlankRequest(SamplingFields):
    """`POST /fill_blank`: each `<span>` in the prompt marks a blank to fill."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _count_blanks(cls, prompt: str) -> str:
        split_blanks(prompt)  # a ValueError naming the count unless 1 to MAX_BLANKS
        return prompt


class TokenizeRequest(Body):
    """`POST /tokenize`: the served model's token ids for a text."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    add_special_tokens: bool = Field(True, description="BOS/EOS as the model adds them to a prompt")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="the context: a prompt takes at most this many tokens, less one")


class DetokenizeRequest(Body):
    """`POST /detokenize`: the text of token ids."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[TokenId] = Field(max_length=MAX_PROMPT_CHARS)


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="snake_case kind, such as queue_full")
    message: str = Field(description="what to fix")


class ErrorBody(BaseModel):
    """The body of every error reply, whatever its status (DESIGN.md, "HTTP contract")."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class AnthropicErrorBody(BaseModel):
    """An error reply under /v1/messages: Anthropic's shape, which holds ours (its types for the statuses)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["error"]
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TokenLogprob(BaseModel):
    id: int
    text: str = Field(description="the text the token brings out; a character it leaves unfinished shows as U+FFFD")
    logprob: float


class GeneratedToken(TokenLogprob):
    top: list[TokenLogprob] = Field(description="the most likely tokens at this place, best first")


class GenerateResponse(BaseModel):
    text: str
    stopped: bool = Field(description="true when a stop string or the end of text ended it, false at a limit")
    finish_reason: Literal["stop", "length", "eos", "cancelled"]
    usage: Usage
    logprobs: list[GeneratedToken] | None = Field(None, description="with `logprobs` asked: one per generated "
                                                  "token, the one that ended the text included")
    prompt_logprobs: list[GeneratedToken | None] | None = Field(
        None, description="with `prompt_logprobs` asked: one per prompt token, null for the first")


class Stats(BaseModel):
    """`GET /stats`: what /metrics exposes, as JSON for the playground's charts."""

    time: float = Field(description="the server's clock, Unix seconds; a rate is the difference of two readings")
    state: Literal["loading", "ready", "draining", "failed", "stopped"]
    metrics: dict[str, float] = Field(description="each unlabelled gauge and counter of /metrics by name, less the "
                                                  "`vramlite_` prefix, such as `generation_tokens_total`")


class FilledBlank(BaseModel):
    index: int
    position: int = Field(description=f"character offset of this blank's {SPAN} in the prompt")
    text: str


class FillBlankResponse(BaseModel):
    blanks: list[FilledBlank] = Field(max_length=MAX_BLANKS)
    text: str = Field(description=f"the prompt with each {SPAN} replaced by its blank's text")
    finish_reason: Literal["stop", "length", "eos", "cancelled"]
    usage: Usage


# --- OpenAI-compatible bodies: unknown fields are ignored, as clients send many optional ones ----------


def unsupported(*no_ops: Any, why: str) -> Any:
    """An OpenAI field this server cannot honour: taken at one of its `no_ops` values (what clients send when
    they mean "off"), refused otherwise with `why`, rather than ignored: a client asking for JSON output or
    tool calls must not get an answer without them and no word of it."""
    def check(value: Any) -> Any:
        value = _integral_float_to_int(value)
        if not any(type(value) is type(n) and value == n for n in no_ops):
            raise PydanticCustomError("unsupported", "{value} is not supported: {why}",
                                      {"value": json.dumps(value)[:80], "why": why})
        return value
    allowed = " or ".join(json.dumps(n) for n in no_ops)
    return Annotated[Any, BeforeValidator(check), Field(None, description=f"not supported: only {allowed}")]


class OpenAIBody(Body):
    """A part of an OpenAI body: fields it does not know are ignored."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


def joined_text(content: str | Sequence[Any]) -> str:
    """A message's content as one text: a string, or its parts' (content parts, text blocks) `text` joined."""
    return content if isinstance(content, str) else "".join(part.text for part in content)


def by_type(default: str) -> Discriminator:
    """Tells a union's members apart by a value's `type` (a dict's key or a model's field), `default` where it
    has none."""
    def tag(value: Any) -> str:
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
        return kind if isinstance(kind, str) else default
    return Discriminator(tag)


class ContentPart(Body):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class JsonSchemaFormat(OpenAIBody):
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON that a schema accepts."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_its_type(self) -> ResponseFormat:
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise ValueError('json_schema goes with type "json_schema", and only with it')
        return self

    def json_schema_of(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"type": "object"}
        return None if self.json_schema is None else self.json_schema.schema_


class StructuredOutputs(Body):
    """vLLM's `structured_outputs`: the output held to one of a JSON schema, a regular expression or a list of
    strings. Its other keys (a grammar, a structural tag) are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON Schema (object or text)")
    regex: Regex | None = None
    choice: OutputChoices | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if sum(x is not None for x in (self.json_, self.regex, self.choice)) != 1:
            raise ValueError("give one of json, regex and choice")
        return self

    def output_kwargs(self) -> dict[str, Any]:
        return {"json_schema": self.json_, "regex": self.regex, "choice": self.choice}


class StructuredFields(Body):
    """vLLM's structured-output fields, taken by every OpenAI- and Anthropic-style route."""

    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's structured output: `json`, "
                                                         "`regex` or `choice`")
    guided_json: dict[str, Any] | str | None = Field(None, description="structured_outputs.json's older name")
    guided_regex: Regex | None = Field(None, description="structured_outputs.regex's older name")
    guided_choice: OutputChoices | None = Field(None, description="structured_outputs.choice's older name")

    def structured_fields(self) -> dict[str, Any]:
        """These fields as given, for another route's body."""
        return self.model_dump(include=set(STRUCTURED_FIELDS), exclude_none=True, by_alias=True)


class OpenAIFields(SamplingFields, StructuredFields):
    model_config = ConfigDict(extra="ignore")
    until_context: ClassVar[bool] = True

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS,
                              description="must name the served model when given")
    n: ChoiceCount = Field(1, description="choices to generate, batched together; with a seed, choice i draws "
                           "from seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(None, description="structured output: `json_object`, or "
                                                   "`json_schema` with its `schema`")

    def output_patterns(self) -> list[str]:
        """The fields that ask for structured output, of which a request may give one."""
        format_ = self.response_format is not None and self.response_format.type != "text"
        return [name for name, given in (("response_format", format_),
                                          *((n, getattr(self, n) is not None) for n in STRUCTURED_FIELDS)) if given]

    @model_validator(mode="after")
    def _one_output_pattern(self) -> OpenAIFields:
        given = self.output_patterns()
        if len(given) > 1:
            raise ValueError(f"give one of {' and '.join(given)}: each holds the output to a pattern")
        return self

    def output_kwargs(self) -> dict[str, Any]:
        if self.structured_outputs is not None:
            return self.structured_outputs.output_kwargs()
        return {"json_schema": self.guided_json if self.response_format is None
                else self.response_format.json_schema_of(), "regex": self.guided_regex, "choice": self.guided_choice}


STRUCTURED_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice")



MAX_BATCH_INPUTS = 2048  # prompts or inputs of one request, as OpenAI allows; the server's batch and queue bound it
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
TextsOrIds = (Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=MAX_BATCH_INPUTS)]
              | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_BATCH_INPUTS)])
"""OpenAI's prompt or input: a text, token ids, or a list of either."""


def as_batch(value: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """A `TextsOrIds` value as a list of texts or token-id lists."""
    return [value] if isinstance(value, str) or isinstance(value[0], int) else list(value)


class CompletionRequest(OpenAIFields):
    """`POST /v1/completions`: a prompt or a list of them, as text or token ids."""

    prompt: TextsOrIds = Field(description="a text, token ids, or a list of either: each prompt's `n` choices, "
                               "batched together, indexed prompt by prompt")
    logprobs: LogprobsCount | None = Field(None, description="each token's log-probability and this many "
                                           "most likely tokens'")
    echo: bool | None = Field(None, description="the prompt in front of the completion (with `logprobs`: its "
                              "tokens' too; `max_tokens: 0` scores a prompt)")
    best_of: unsupported(None, 1, why="one completion per request")
    suffix: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="the text after the completion: "
                               "the model fills in the middle (a model with fill-in-the-middle tokens, or T5)")

    def logprobs_kwargs(self) -> dict[str, int | None]:
        return {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}

    def prompts(self) -> list[str | list[int]]:
        return as_batch(self.prompt)


class FunctionCall(OpenAIBody):
    name: str = Field(max_length=MAX_TOOL_NAME_CHARS)
    arguments: str = Field(max_length=MAX_PROMPT_CHARS)


class MessageToolCall(OpenAIBody):
    id: str | None = Field(None, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBody):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = Field(None, max_length=MAX_PROMPT_CHARS)
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=MAX_TOOL_NAME_CHARS)
    reasoning_content: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="an assistant's thought, "
                                          "for templates that read it (Qwen 3's)")

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required, unless an assistant message has tool_calls")
        return self

    def text(self) -> str:
        return "" if self.content is None else joined_text(self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: a tool call's arguments as an object where they parse."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        for key in ("tool_call_id", "name", "reasoning_content"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDefinition(OpenAIBody):
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBody):
    name: str = Field(max_length=MAX_TOOL_NAME_CHARS)


class NamedToolChoice(OpenAIBody):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(OpenAIFields):
    """`POST /v1/chat/completions`; `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: MaxTokens | None = Field(None, validation_alias=AliasChoices("max_tokens", "max_completion_tokens"))
    logprobs: bool | None = Field(None, description="each token's log-probability")
    top_logprobs: LogprobsCount | None = Field(None, description="with `logprobs`: this many most likely tokens' too")
    add_generation_prompt: bool = Field(True, description="end the prompt with the template's start of an "
                                        "assistant message (vLLM's)")
    continue_final_message: bool = Field(False, description="the last message is an assistant's to continue, with "
                                         "add_generation_prompt false (vLLM's)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="more variables for the chat template "
                                                        "(Qwen 3: `{\"enable_thinking\": false}`), as vLLM takes them")
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS, description="functions the model may "
                                               "call; the chat template describes them to it")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" (the default with tools): calls read from the reply; "required" or a named '
        'function: the reply held to calls (structured output); "none"')
    functions: unsupported(None, [], why="no function calling")
    function_call: unsupported(None, "none", "auto", why="no function calling")
    modalities: unsupported(None, ["text"], why="text is the only modality")

    @model_validator(mode="after")
    def _continue_an_assistants_message(self) -> ChatCompletionRequest:
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message needs add_generation_prompt false and an assistant's message "
                             "last")
        return self

    @model_validator(mode="after")
    def _tool_choice_of_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                t.function.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        if self.tool_mode() not in ("none", "auto") and self.output_patterns():
            raise ValueError(f"{self.output_patterns()[0]} cannot be combined with a tool_choice that forces a call")
        return self

    def tool_mode(self) -> str | dict[str, Any]:
        """How the reply relates to the tools: "none", "auto", "required" or a named function's choice."""
        if not self.tools:
            return "none"
        choice = self.tool_choice or "auto"
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return None if not self.tools else [t.model_dump(exclude_none=True) for t in self.tools]

    def output_kwargs(self) -> dict[str, Any]:
        forced = None if not self.tools else forced_schema(self.tool_dicts(), self.tool_mode())
        return super().output_kwargs() if forced is None else {"json_schema": forced}

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    def logprobs_kwargs(self) -> dict[str, int | None]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}



class EmbeddingRequest(OpenAIBody):
    """`POST /v1/embeddings`: one input or a list, as texts or token ids."""

    input: TextsOrIds
    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS, description="must name the served model when "
                              "given")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: each embedding's float32 "
                                                        "values, little-endian, in base64 (what the openai client "
                                                        "asks for)")
    dimensions: unsupported(None, why="embeddings have the model's hidden size")

    def inputs(self) -> list[str | list[int]]:
        return as_batch(self.input)
