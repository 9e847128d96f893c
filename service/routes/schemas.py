"""Request and response bodies of the v1 API."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# Numbers and switches as JSON writes them (JsonInt, JsonFloat, StrictBool): the lax defaults would read
# "inner_steps": true as 1 step and "transductive": "yes" as true.
from service.tensors import EncodedTensor, JsonFloat, JsonInt, TensorInput

LabelsInput = Union[list[Any], EncodedTensor]

_TENSOR_DOC = (
    "Inputs [N, *input_shape]: nested lists, {dtype, shape, base64} (raw little-endian bytes), "
    "or for image models {images: [base64 PNG/JPEG, or data URLs data:image/png;base64,..., ...]}."
)


class Support(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: TensorInput = Field(..., description=_TENSOR_DOC)
    y: LabelsInput = Field(..., description="Class indices [N] in [0, n_way) (classification) or targets [N] / [N, outputs] (regression).")


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: TensorInput = Field(..., description=_TENSOR_DOC)


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    support: Support
    inner_steps: Optional[JsonInt] = Field(None, description="Inner steps (default: the model's).")
    inner_lr: Optional[JsonFloat] = Field(None, description="Inner learning rate (default: the model's).")
    ttl_s: Optional[JsonInt] = Field(None, description="Session lifetime in seconds (default and maximum: service settings).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    support: Support
    query: Query
    inner_steps: Optional[JsonInt] = Field(None, description="Inner steps (default: the model's).")
    inner_lr: Optional[JsonFloat] = Field(None, description="Inner learning rate (default: the model's).")
    transductive: StrictBool = Field(False, description="Normalise queries with their own batch statistics instead of the support set's.")


class SessionPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: TensorInput = Field(..., description=_TENSOR_DOC)
    transductive: StrictBool = Field(False, description="Normalise queries with their own batch statistics instead of the support set's.")


class Timing(BaseModel):
    total_ms: float = Field(..., description="Time in the engine: queue wait plus computation.")
    compute_ms: float = Field(..., description="Time of the batched computation this request was part of.")
    batch_size: int = Field(..., description="Requests computed together with this one.")


class AdaptResponse(BaseModel):
    session_id: str
    model: str
    model_version: str
    created: float = Field(..., description="Unix time")
    expires: float = Field(..., description="Unix time")
    expires_at: str = Field(..., description="ISO 8601, UTC")
    ttl_s: int
    inner_steps: int
    inner_lr: float
    support_loss_before: float
    support_loss_after: float
    adaptation_ms: float
    session_bytes: int
    timing: Timing


class PredictResponse(BaseModel):
    model: str
    predictions: list[Any] = Field(..., description="Class indices [N] (classification), values [N] or [N, outputs] (regression).")
    probabilities: Optional[list[list[float]]] = Field(None, description="Class probabilities [N, n_way] (classification).")
    support_loss_before: Optional[float] = None
    support_loss_after: Optional[float] = None
    inner_steps: Optional[int] = None
    inner_lr: Optional[float] = None
    session_id: Optional[str] = None
    timing: Timing


class SessionInfo(BaseModel):
    session_id: str
    model: str
    created: float
    expires: float
    expires_at: str
    size_bytes: int
    meta: dict


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    name: str
    version: str
    algorithm: Optional[str]
    task_type: str
    input_shape: list[int]
    n_way: Optional[int]
    inner_steps: int
    inner_lr: float
    support_shift: int = 0  # > 0: adaptation also sees each support image shifted by this many pixels (4 views)
    metrics: dict
    device: str


class ModelList(BaseModel):
    models: list[ModelInfo]
