"""Request and response models: the HTTP contract, as it appears at /docs and /openapi.json."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# min_length on each branch: on the union it lands in the schema as an array's `minLength`, which means nothing
Texts = Annotated[list[str], Field(min_length=1)]
Pairs = Annotated[list[tuple[str, str]], Field(min_length=1)]


class PredictRequest(BaseModel):
    inputs: Texts | Pairs = Field(
        description="texts, or pairs of texts for a sentence-pair task (all of one kind per request)",
        examples=[["a gripping, beautifully acted film"], [["A man plays a guitar.", "Someone plays music."]]],
    )


class ClassPrediction(BaseModel):
    label: str = Field(examples=["positive"])
    score: float = Field(description="probability of `label`", examples=[0.97])
    scores: dict[str, float] = Field(description="probability of every label", examples=[{"negative": 0.03, "positive": 0.97}])
    truncated: bool = Field(False, description="the input was longer than the model's maximum and was cut")


class RegressionPrediction(BaseModel):
    value: float = Field(examples=[3.8])
    truncated: bool = False


class PredictResponse(BaseModel):
    task: str
    version: str = Field(description="the version that answered")
    predictions: list[ClassPrediction | RegressionPrediction]


class VersionOut(BaseModel):
    version: str
    created_at: str
    size: int = Field(description="bytes")
    labels: list[str] = Field(description="class names in output order; empty for a regression task")
    metrics: dict = Field(description="dev metrics recorded at training time")
    method: str
    active: bool
    resident: bool = Field(description="loaded on the device in this process")


class TaskOut(BaseModel):
    name: str
    active: str | None
    versions: list[VersionOut]


class TaskList(BaseModel):
    tasks: list[TaskOut]


class TaskVersion(BaseModel):
    task: str
    version: str


class ActivateRequest(BaseModel):
    version: str = Field(pattern="^[0-9a-f]{16}$", description="a stored version of the task (16 hex digits)")


class Deleted(BaseModel):
    task: str
    version: str | None = Field(None, description="the deleted version; null when the whole task was deleted")


class Health(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    status: str = Field(description="ready, or degraded when the store does not answer (resident tasks are served)")
    tasks: int = Field(description="tasks with an active version")
    resident: int = Field(description="task versions loaded on the device")
    bank_bytes: int
    store: str = Field("ok", description="ok, or why the store did not answer")


class FanoutResponse(BaseModel):
    results: list[PredictResponse] = Field(description="one answer per task, in the order the tasks were asked")


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="allow")  # records written by other tools may carry more

    time: str = Field(description="ISO 8601, UTC")
    action: str | None = Field(None, description="upload, activate, rollback, delete_task or delete_version")
    task: str | None = None
    version: str | None = Field(None, description="the version uploaded, made active, or deleted")
    token: str | None = Field(None, description="the name of the token that made the change")
    client: str | None = Field(None, description="the client's address")


class AuditOut(BaseModel):
    records: list[AuditRecord] = Field(description="newest first")


class ErrorOut(BaseModel):
    detail: str = Field(examples=["task 'sst3' is not in the store; GET /tasks lists the tasks this server has"])


def errors(*statuses: int) -> dict:
    """The `responses=` of a route: the error statuses it may answer, each with the `{"detail"}` body."""
    return {s: {"model": ErrorOut} for s in statuses}
