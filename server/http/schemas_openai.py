"""OpenAI-compatible request and response models (`/v1/models`, `/v1/completions`, `/v1/chat/completions`).

`model` is a generation task's name (its active version answers) or `task@version` (that version answers). Fields
OpenAI defines that this server does not honour are refused unless left at their neutral value (`n` 1,
penalties 0, no logprobs); fields it does not know are ignored, so clients that send extras still work.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPTS = 16  # prompts per /v1/completions request

Model = Annotated[str, Field(min_length=1, max_length=200, description="a generation task, or task@version to pin "
                             "one of its versions", examples=["e2e", "e2e@3f2a9c1b0d4e"])]
Stop = Annotated[str | list[str] | None, Field(description="up to 4 sequences where the text ends (besides the "
                                               "task's own); the text returned stops before them")]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Model
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy (the most likely token every step)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens whose "
                         "probability reaches top_p")
    stop: Stop = None
    seed: int | None = Field(None, description="the same seed, prompt and settings give the same text")
    stream: bool = Field(False, description="server-sent events, one per new piece of text, then `data: [DONE]`")
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="choices per prompt: 1")
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description="the task's input (put into the task's prompt template), or a list of inputs (one choice each)",
        examples=["name : The Eagle | Type : coffee shop | food : French | area : riverside"])
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 16; the server's limit "
                                   "is BITFIT_MAX_TOKENS)")
    logprobs: None = None
    echo: Literal[False] = False


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="one user message: its content is the task's input")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default: the server's limit)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: Literal[False] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="task@version: the version that answered")
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="task@version: the version that answered")
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(description="the task's name")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "bitfit-serve"
    version: str = Field(description="the active version (ask for another with model=task@version)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
