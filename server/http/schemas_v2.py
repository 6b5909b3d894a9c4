"""The Open Inference Protocol (V2; KServe, Triton) as bitfit-serve speaks it: request and response models.

A task is a model. Inputs: `text` (BYTES, shape [n]) and, for a pair task, `text_pair` (BYTES, [n]). Outputs:
`label` (BYTES, [n]) and `scores` (FP32, [n, k], labels in the metadata's order) for classification; `value`
(FP32, [n]) for regression. Tensor data come in the JSON (`data`) or after it, in the binary tensor data
extension that tritonclient uses by default (`parameters.binary_data_size`, `Inference-Header-Content-Length`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

BYTES, FP32 = "BYTES", "FP32"


class V2Error(BaseModel):
    error: str = Field(examples=["task 'sst3' is not in the store; GET /tasks lists the tasks this server has"])


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: str = Field(description="the version that would answer")
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")
    optional: bool = Field(False, description="an input that may be left out")


class ModelParameters(BaseModel):
    labels: list[str] = Field(description="class names in the order of `scores`; empty for a regression task")
    version: str = Field(description="the version these metadata describe")
    active_version: str | None
    input_kind: Literal["text", "pair"] | None = Field(description="single texts or pairs; null: either")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="every stored version, oldest first")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters


# -- inference ------------------------------------------------------------------------------------------------


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_size: int | None = Field(None, ge=0, description="bytes of this tensor after the JSON header")


class InferInput(BaseModel):
    name: Literal["text", "text_pair"]
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=2, description="[n] (or [n, 1])")
    datatype: Literal["BYTES"]
    parameters: TensorParameters | None = None
    data: Annotated[list[str], Field(min_length=1)] | Annotated[list[list[str]], Field(min_length=1)] | None = Field(
        None, description="the texts (UTF-8), unless sent as binary data")


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data: bool | None = Field(None, description="send this output as binary data after the JSON header")


class RequestedOutput(BaseModel):
    name: Literal["label", "scores", "value"]
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # the protocol's others (priority, timeout, ...) are accepted, unused

    binary_data_output: bool | None = Field(None, description="every output as binary data, unless it says otherwise")


class InferRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "r1", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]}]})

    id: str | None = Field(None, description="echoed in the response")
    parameters: RequestParameters | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=2)
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output of the task")


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[str] | list[float] | None = Field(None, description="row-major; absent when sent as binary data")
    parameters: dict | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the version that answered")
    id: str | None = None
    outputs: list[OutputTensor]


def v2_errors(*statuses: int) -> dict:
    """The `responses=` of a V2 route: its error statuses, each with the protocol's `{"error"}` body."""
    return {s: {"model": V2Error} for s in statuses}
