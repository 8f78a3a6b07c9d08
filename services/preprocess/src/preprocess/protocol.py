"""OpenAI request models, following ../shared/data/openai/openapi.subset.json.

Only what the mesh acts on is typed; unknown fields are accepted and ignored
(as vLLM and LiteLLM do) so newer clients keep working. Fields the mesh cannot
honour yet are refused with a clear 400 instead of being silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import jsonschema
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from ragmesh.errors import RagmeshError, invalid_request

RequestT = TypeVar("RequestT", bound=BaseModel)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# Content parts that carry text; any other part (image_url, input_audio, ...) passes
# unchanged to a model with the matching capability (inference checks which).
TEXT_PARTS = frozenset({"text", "refusal"})
# A data: URL in a content part larger than this is refused (the body limit is for the whole request).
DEFAULT_MAX_DATA_URL_BYTES = 20 * 1024 * 1024
# Segments pydantic adds to an error location for a union's branches; not field names.
_UNION_BRANCHES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})

# "context": grounding documents (NVIDIA's QA models, ChatNVIDIA), kept apart from instructions.
Role = Literal["system", "developer", "user", "assistant", "tool", "function", "context"]


class ChatMessage(_Lenient):
    role: Role
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = None


class JsonSchemaFormat(_Lenient):
    name: StrictStr = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class RagOptions(BaseModel):
    """ragmesh's `rag` extension (the openai SDK sends it through extra_body)."""

    model_config = ConfigDict(extra="forbid")

    collection: StrictStr = Field(min_length=1)
    top_k: int = Field(default=4, ge=1, le=20)
    mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    on_error: Literal["fail", "no_context"] = "fail"
    # The rerank step: a model, true (the collection's default), false; unset: the collection's default.
    rerank: StrictBool | StrictStr | None = None
    rerank_candidates: int | None = Field(default=None, ge=1)
    rerank_required: StrictBool = False


class SamplingRequest(_Lenient):
    """What chat and legacy completion requests share."""

    model: StrictStr = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: StrictStr | None = None
    # ragmesh extensions
    rag: RagOptions | None = None
    cache: StrictBool | None = None

    def deterministic(self) -> bool:
        """Greedy decoding or a fixed seed: the same request gives the same answer."""
        return self.temperature == 0 or self.seed is not None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def completion_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def text_of(self, index: int) -> str:
        """The text of message `index`: its text parts joined (images and other parts left out)."""
        content = self.messages[index].content
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part["text"] for part in content if part.get("type") == "text")

    def content_parts(self) -> list[tuple[str, str]]:
        """(type, param) of every part that is not text: what the model must be able to take."""
        return [
            (str(part["type"]), f"messages[{i}].content[{j}]")
            for i, message in enumerate(self.messages)
            if isinstance(message.content, list)
            for j, part in enumerate(message.content)
            if part.get("type") not in TEXT_PARTS
        ]

    def completion_limit(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens, as in OpenAI's API."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    """POST /v1/completions (legacy): a prompt, or a list of them (text or token ids)."""

    prompt: StrictStr | list[StrictStr] | list[int] | list[list[int]]
    # OpenAI's default for legacy completions.
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: int | None = Field(default=None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request, in order: a text, or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [[int(p) for p in prompt]]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def prompt_text(self) -> str:
        """The text of a single text prompt ("" for a token prompt)."""
        first = self.prompts()[0]
        return first if isinstance(first, str) else ""

    def prompt_ids(self) -> list[int]:
        """The token ids of a single token prompt ([] for a text prompt)."""
        first = self.prompts()[0]
        return first if isinstance(first, list) else []

    def one_prompt(self, prompt: str | list[int]) -> CompletionRequest:
        """This request with `prompt` alone: what one prompt of a list runs as."""
        return self.model_copy(update={"prompt": prompt})


class EmbeddingsRequest(BaseModel):
    """POST /v1/embeddings (OpenAI's fields; others pass to an upstream embedding model as sent)."""

    model_config = ConfigDict(extra="allow")

    input: StrictStr | list[StrictStr] | list[int] | list[list[int]]
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: StrictStr | None = None
    # NVIDIA's: "query" or "passage" (asymmetric models embed them differently).
    input_type: StrictStr | None = None
    # NVIDIA's: past the model's limit, NONE refuses the input, START or END cuts it there.
    truncate: Literal["NONE", "START", "END"] | None = None


class CreateCollectionRequest(BaseModel):
    """POST /v1/collections."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    reranker: StrictStr | None = None  # the default reranking model of its searches


class UpdateCollectionRequest(BaseModel):
    """PATCH /v1/collections/{name}: only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    reranker: StrictStr | None = None  # null: no default reranker
    # Who else may use it: "private" (404 to every other key), "read" (search, RAG), "write" (documents too).
    shared: Literal["private", "read", "write"] | None = None


class SearchRequest(BaseModel):
    """POST /v1/search."""

    model_config = ConfigDict(extra="forbid")

    collection: StrictStr = Field(min_length=1)
    query: StrictStr = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    cache: bool = True
    # A reranking model, true (the collection's default), false (none); unset: the collection's default.
    rerank: StrictBool | StrictStr | None = None
    rerank_candidates: int | None = Field(default=None, ge=1)
    rerank_required: StrictBool = False


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_BRANCHES or "[" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out


def validation_error(exc: ValidationError) -> RagmeshError:
    """A pydantic error as an OpenAI 400 naming the parameter.

    For a union (content: string or parts), the deepest error is the branch the
    client meant, so it is the one reported.
    """
    errors = exc.errors(include_url=False)
    first = max(errors, key=lambda e: len(e["loc"]))
    param = _param(tuple(first["loc"])) or None
    if first["type"] == "missing":
        return invalid_request(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    value = first.get("input")
    shown = (
        repr(value) if isinstance(value, str | int | float | bool) and len(repr(value)) < 80 else type(value).__name__
    )
    return invalid_request(
        f"Invalid value for '{param}': {first['msg']} (got {shown}).", param=param, code="invalid_value"
    )


def validated(model: type[RequestT], body: Any) -> RequestT:
    """`body` as a `model`: 400 when it is not a JSON object or does not validate."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


@dataclass(frozen=True)
class RequestBounds:
    """Limits on what a generation request may ask for (settings of preprocess, safe defaults)."""

    # Characters per stop sequence: each is matched against every delta of every channel.
    max_stop_chars: int = 256
    # A response_format schema's JSON size and nesting depth (it is compiled into a grammar).
    max_schema_bytes: int = 32 * 1024
    max_schema_depth: int = 16
    # Guardrails redact or block text in the answers (postprocess's settings): logprobs would
    # show the tokens they hide, so asking for them is refused.
    guardrails: bool = True


DEFAULT_BOUNDS = RequestBounds()


def _check_sampling(request: SamplingRequest, max_n: int, bounds: RequestBounds) -> None:
    stops = request.stop_list()
    if len(stops) > 4:
        raise invalid_request("'stop' accepts at most 4 sequences.", param="stop")
    if any(not s for s in stops):
        raise invalid_request("Stop sequences must not be empty.", param="stop")
    if any(len(s) > bounds.max_stop_chars for s in stops):
        raise invalid_request(
            f"Stop sequences may be at most {bounds.max_stop_chars} characters long.",
            param="stop",
            code="stop_too_long",
        )
    if (request.n or 1) > max_n:
        raise invalid_request(f"'n' must be at most {max_n} on this server.", param="n")
    if request.stream_options is not None and not request.stream:
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")


def _refuse_logprobs(bounds: RequestBounds) -> None:
    """Logprobs with guardrails on: a redacted token's logprob would tell what was redacted."""
    if bounds.guardrails:
        raise invalid_request(
            "'logprobs' cannot be combined with this server's guardrails (PII redaction or a "
            "blocklist): the tokens' logprobs would show the text the guardrails hide.",
            param="logprobs",
            code="logprobs_with_guardrails",
        )


# Prompts one /v1/completions request may carry (each is a generation of its own).
MAX_PROMPTS = 64


def parse_completion_request(
    body: Any, max_n: int, max_prompts: int = MAX_PROMPTS, bounds: RequestBounds = DEFAULT_BOUNDS
) -> CompletionRequest:
    """Validate a legacy completion request (400 on any problem)."""
    request = validated(CompletionRequest, body)
    _check_sampling(request, max_n, bounds)
    if request.logprobs is not None:
        _refuse_logprobs(bounds)
    prompts = request.prompts()
    if not prompts or any(isinstance(p, list) and not p for p in prompts):
        raise invalid_request("'prompt' must not be empty (a text, a list of texts or of token ids).", param="prompt")
    if len(prompts) > max_prompts:
        raise invalid_request(f"'prompt' may list at most {max_prompts} prompts on this server.", param="prompt")
    if request.echo and any(isinstance(p, list) for p in prompts):
        raise invalid_request("'echo' needs text prompts (token-id prompts cannot be echoed).", param="echo")
    if request.best_of not in (None, 1, request.n or 1):
        raise invalid_request("'best_of' is not supported (only best_of equal to n).", param="best_of")
    return request


def parse_chat_request(
    body: Any,
    max_n: int,
    max_data_url_bytes: int = DEFAULT_MAX_DATA_URL_BYTES,
    bounds: RequestBounds = DEFAULT_BOUNDS,
) -> ChatCompletionRequest:
    """Validate a decoded JSON body as a chat completion request (400 on any problem)."""
    request = validated(ChatCompletionRequest, body)
    _check_sampling(request, max_n, bounds)
    if request.top_logprobs and not request.logprobs:
        raise invalid_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    if request.logprobs:
        _refuse_logprobs(bounds)
    _check_tools(request)
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or not fmt.json_schema.schema_:
            raise invalid_request(
                "response_format of type 'json_schema' needs json_schema.schema.", param="response_format.json_schema"
            )
        check_schema_size(fmt.json_schema.schema_, bounds)
        check_json_schema(fmt.json_schema.schema_)
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                _check_part(part, f"messages[{i}].content[{j}]", max_data_url_bytes)
        elif message.content is None and message.role != "assistant":
            raise invalid_request(
                f"Missing required parameter: 'messages[{i}].content'.",
                param=f"messages[{i}].content",
                code="missing_required_parameter",
            )
    return request


def _depth(node: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counted no further than `limit` + 1."""
    if limit < 0 or not isinstance(node, dict | list):
        return 0
    children = node.values() if isinstance(node, dict) else node
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def check_schema_size(schema: dict[str, Any], bounds: RequestBounds) -> None:
    """400 for a response_format schema over the size or depth limits: it becomes a grammar
    the engine compiles and follows token by token."""
    param = "response_format.json_schema.schema"
    size = len(orjson.dumps(schema))
    if size > bounds.max_schema_bytes:
        raise invalid_request(
            f"The JSON schema is {size} bytes; at most {bounds.max_schema_bytes} are accepted.",
            param=param,
            code="json_schema_too_large",
        )
    if _depth(schema, bounds.max_schema_depth) > bounds.max_schema_depth:
        raise invalid_request(
            f"The JSON schema nests deeper than {bounds.max_schema_depth} levels.",
            param=param,
            code="json_schema_too_deep",
        )


_TOOL_CHOICES = ("none", "auto", "required")


def _check_tools(request: ChatCompletionRequest) -> None:
    """tools and tool_choice in OpenAI's shapes (400 naming the parameter), before any generation."""
    names = []
    for i, tool in enumerate(request.tools or ()):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
            raise invalid_request(
                f"Invalid value for 'tools[{i}]': a tool is {{'type': 'function', 'function': {{'name': ...}}}}.",
                param=f"tools[{i}]",
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid_request(
                f"Invalid value for 'tools[{i}].function.parameters': a JSON schema object.",
                param=f"tools[{i}].function.parameters",
            )
        names.append(function["name"])
    choice = request.tool_choice
    if choice is None:
        return
    if not request.tools:
        raise invalid_request("'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice")
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise invalid_request(
            "Invalid value for 'tool_choice': 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}.",
            param="tool_choice",
        )
    if name not in names:
        raise invalid_request(
            f"tool_choice names the function {name!r}, which is not among the tools.", param="tool_choice"
        )


def check_json_schema(schema: dict[str, Any]) -> None:
    """400 before any generation when a response_format schema is not a valid JSON Schema (checked
    against the metaschema it names, draft 2020-12 by default): the answer could never be checked."""
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise invalid_request(
            f"response_format.json_schema.schema is not a valid JSON Schema: {exc.message}"
            + (f" (at {where})" if where else "")
            + ".",
            param="response_format.json_schema.schema",
            code="invalid_json_schema",
        ) from None


def _check_part(part: dict[str, Any], param: str, max_data_url_bytes: int) -> None:
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid_request(f"Invalid value for '{param}.text': must be a string.", param=f"{param}.text")
    elif not isinstance(kind, str) or not kind:
        raise invalid_request(
            f"Invalid content part type {kind!r}: expected 'text' or 'image_url'.", param=f"{param}.type"
        )
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise invalid_request(
                f"Invalid value for '{param}.image_url': an object with a 'url' (http(s) or data:).",
                param=f"{param}.image_url",
            )
        if url.startswith("data:") and len(url) > max_data_url_bytes:
            raise invalid_request(
                f"The data URL in '{param}.image_url.url' is {len(url)} bytes; at most {max_data_url_bytes} are "
                "accepted (send a smaller image, or an http(s) URL).",
                param=f"{param}.image_url.url",
                code="data_url_too_large",
            )
