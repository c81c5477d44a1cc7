"""OpenAI request and response shapes (completions, chat, models, logprobs) and OpenAI-style error bodies.

Requests are validated strictly: a string where a number belongs is a 400, not coerced, and a field
this server does not implement (`tools`, `suffix`, `best_of`, ...) is a 400 naming it, never accepted
and ignored; such a field sent as null is no option and passes. Every error a client can cause leaves
as `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, model_validator

StrictFloat = Annotated[float, Strict()]  # ints are accepted for floats (JSON has one number type); strings are not

# OpenAI's seed is a signed 64-bit integer; anything wider is a 400 rather than a sampler crash.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class APIError(Exception):
    """An error a client caused (or overload); the app turns it into an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: Sequence[Dict[str, Any]]) -> APIError:
    """A 400 for FastAPI's RequestValidationError (malformed JSON, missing or wrong-typed fields)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg"))
        return APIError(400, f"Malformed JSON body: {detail}", code="invalid_json")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if not loc:
        return APIError(400, f"Request body must be a JSON object sent as Content-Type: application/json "
                             f"({first.get('msg')})", code="invalid_body")
    param = _param_path(loc)
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"'{param}' is not supported by this server", param=param, code="unsupported_parameter")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg')}", param=param, code="invalid_value")


def _param_path(loc: Sequence[Any]) -> str:
    """messages.0.content → messages[0].content; union branch tags (`str`, `list[int]`) are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in str(part) or str(part) in ("str", "int", "float", "bool") or "-" in str(part):
            break
        else:
            path += f".{part}" if path else str(part)
    return path


# ---------------------------------------------------------------------------------------------
# Requests

class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_null_extras(cls, data: Any) -> Any:
        """An unknown field sent as null asks for nothing; any other value is refused by name (extra="forbid")."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class StreamOptions(_Request):
    include_usage: StrictBool = False


class SamplingFields(_Request):
    model: StrictStr
    temperature: Optional[StrictFloat] = Field(None, ge=0, le=2)
    top_p: Optional[StrictFloat] = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=128)
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    seed: Optional[StrictInt] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: Optional[StrictFloat] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[StrictFloat] = Field(None, ge=-2, le=2)
    # Token id (as a string, JSON keys being strings) → a bias added to its logit, -100 to 100.
    logit_bias: Optional[Dict[StrictStr, Annotated[StrictFloat, Field(ge=-100, le=100)]]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None

    def stop_list(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    # A string, a list of strings, token ids, or a list of token id lists (one choice set per prompt).
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    # 0 only with echo: score the prompt, generate nothing.
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    # The chosen token's logprob and this many of the most likely ones, per token (OpenAI allows up to 5).
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)
    echo: StrictBool = False


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


# The roles a chat message may take (the API's, and batch generation's records).
Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES = get_args(Role)


class ChatMessage(_Request):
    role: Role
    content: Optional[Union[StrictStr, List[TextPart]]] = None
    # No `name`: the chat templates served here do not render a participant's name, so one sent is refused by name.

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    # The newer name OpenAI gives max_tokens on chat; either is accepted.
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


# ---------------------------------------------------------------------------------------------
# Responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the choice's text (the prompt's first, with echo): its text, logprob, top tokens, offset."""

    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


FinishReason = Optional[Literal["stop", "length"]]


class _Response(BaseModel):
    """What every completion response and chunk starts with."""

    id: str
    created: int
    model: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: List[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob]


class ChatLogprobs(BaseModel):
    content: List[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: List[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "framework"
    root: Optional[str] = None  # the folder served under this id (vLLM's field): it changes when a new model rolls out


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]
