"""Request and response bodies of the v1 API."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# Numbers and switches as JSON writes them (JsonInt, JsonFloat, StrictBool): the lax defaults would read
# "inner_steps": true as 1 step and "transductive": "yes" as true.
from service.sessions import SessionMeta
from service.tensors import JsonFloat, JsonInt, LabelsInput, TensorInput

_TENSOR_DOC = (
    "Inputs [N, *input_shape]: nested lists of numbers, {dtype, shape, base64} (raw little-endian bytes, base64 with "
    "or without padding, standard or URL-safe), or for image models {images: [base64 PNG/JPEG, or data URLs "
    "data:image/png;base64,..., ...]}. Pictures are preprocessed as the training data was (GET /v1/models/{name}'s "
    "preprocessing says how); a uint8 tensor is raw pixels or bytes, mapped to 0-1 as the training data's were "
    "(and inverted where the preprocessing inverts); other numbers go to the model as they are."
)


class Support(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: TensorInput = Field(..., description=_TENSOR_DOC)
    y: LabelsInput = Field(..., description="Class indices [N] in [0, n_way), every class at least once (classification), or targets [N] / [N, outputs] (regression). Numbers, not true/false.")


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: TensorInput = Field(..., description=_TENSOR_DOC)


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    support: Support
    inner_steps: Optional[JsonInt] = Field(None, description="Inner steps (default: the model's).")
    inner_lr: Optional[JsonFloat] = Field(None, description="Inner learning rate (default: the model's).")
    ttl_s: Optional[JsonInt] = Field(None, description="Session lifetime in seconds from its creation; predictions do not extend it (default and maximum: GET /v1/models's limits).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    support: Support
    query: Query
    inner_steps: Optional[JsonInt] = Field(None, description="Inner steps (default: the model's).")
    inner_lr: Optional[JsonFloat] = Field(None, description="Inner learning rate (default: the model's).")
    transductive: StrictBool = Field(False, description="Normalise queries with their own batch statistics instead of the support set's (default false).")


class SessionPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: TensorInput = Field(..., description=_TENSOR_DOC)
    transductive: StrictBool = Field(False, description="Normalise queries with their own batch statistics instead of the support set's (default false).")


class Timing(BaseModel):
    total_ms: float = Field(..., description="Time in the service from the decoded inputs to the answer: queue wait, computation and, for adapt, storing the session.")
    compute_ms: float = Field(..., description="Time of the batched computation this request was part of.")
    batch_size: int = Field(..., description="Requests computed together with this one.")


class AdaptResponse(BaseModel):
    session_id: str
    model: str
    model_version: str
    created: float = Field(..., description="Unix time")
    expires: float = Field(..., description="Unix time")
    expires_at: str = Field(..., description="ISO 8601, UTC", json_schema_extra={"format": "date-time"})
    ttl_s: int
    inner_steps: int
    inner_lr: Optional[float] = Field(..., description="The inner learning rate adaptation used; null: the model's learned rates (learned_lrs).")
    support_loss_before: float
    support_loss_after: float
    adaptation_ms: float
    session_bytes: int
    timing: Timing


class Predictions(BaseModel):
    """What both predict answers begin with (each its own schema: a session's, a stateless one's)."""

    model: str
    predictions: list[Any] = Field(..., description="Class indices [N] (classification), values [N] or [N, outputs] (regression).")
    probabilities: Optional[list[list[float]]] = Field(None, description="Class probabilities [N, n_way] (classification).")


class SessionPredictResponse(Predictions):
    session_id: str
    timing: Timing


class PredictResponse(Predictions):
    support_loss_before: float
    support_loss_after: float
    inner_steps: int
    inner_lr: Optional[float] = Field(None, description="The inner learning rate adaptation used; absent with the model's learned rates (learned_lrs).")
    timing: Timing


class SessionInfo(BaseModel):
    session_id: str
    model: str
    created: float = Field(..., description="Unix time")
    expires: float = Field(..., description="Unix time")
    expires_at: str = Field(..., description="ISO 8601, UTC", json_schema_extra={"format": "date-time"})
    size_bytes: int
    meta: SessionMeta


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str
    version: str = Field(..., description="The checkpoint's content hash. After a reload to another version, the old version's sessions answer 404.")
    algorithm: Optional[str]
    loss: str = Field(..., description="The loss adaptation minimises on the support set: cross_entropy, mse, or one the model's trainer registered.")
    task_type: Literal["classification", "regression"]
    input_shape: list[int] = Field(..., description="The shape of one input: a tensor is [N, *input_shape].")
    n_way: Optional[int] = Field(..., description="Classification: the number of classes; labels are in [0, n_way) and every class needs a support example.")
    output_size: int = Field(..., description="Outputs per input: n_way for classification, the target size for regression.")
    inner_steps: int = Field(..., description="Default inner steps.")
    inner_lr: float = Field(..., description="Default inner learning rate (with learned_lrs: the rate training started from, used only where a request sets inner_lr).")
    learned_lrs: bool = Field(..., description="Whether a request without inner_lr adapts with the inner learning rates the model meta-learned (Meta-SGD: per parameter element; MAML++: per step); false for other models, and for one whose checkpoint records a test-time inner_lr (eval_inner_lr), which replaces them.")
    support_shift: int = Field(0, description="> 0: adaptation also sees each support image shifted by this many pixels (4 more views).")
    adapted_parameters: list[str] = Field(..., description="The parameters adaptation changes (what a session stores).")
    accepts_images: bool = Field(..., description="Whether x may be {images: [...]}, preprocessed as the training data was.")
    preprocessing: Optional[dict] = Field(
        ...,
        description="How the training data became the model's input: for pictures (kind image) resize, grey or RGB, "
        "scaling, inversion, applied to {images} uploads; for a .npz (kind array) whether uint8 was divided by 255. A "
        "uint8 tensor gets the value mapping (scaling, inversion); float numbers go to the model as they are, so "
        "they must already be preprocessed this way.",
    )
    metrics: dict = Field(..., description="Training metrics from the checkpoint.")
    training: dict = Field(..., description="How the model was trained (configuration, iterations, time).")
    model_spec: Optional[dict] = Field(..., description="The architecture and its arguments.")
    library_version: Optional[str]
    device: str


class Limits(BaseModel):
    """What this service accepts (its settings)."""

    max_support: int = Field(..., description="Most support examples in one request.")
    max_query: int = Field(..., description="Most query examples in one request.")
    max_inner_steps: int = Field(..., description="Largest inner_steps (smallest: 0).")
    max_example_steps: int = Field(..., description="Most support examples x inner_steps in one request (a bound on its computation).")
    min_inner_lr: float
    max_inner_lr: float
    default_ttl_s: int = Field(..., description="A session's lifetime when adapt gives no ttl_s (counted from its creation; predictions do not extend it).")
    max_ttl_s: int
    max_body_bytes: int = Field(..., description="Larger bodies are answered 413.")
    max_image_side: int = Field(..., description="Largest width or height of a picture sent as {images}.")
    max_list_pixels: int = Field(..., description="Most pixels one list of pictures ({images}) may hold, counted from their headers before any is decoded.")
    max_list_values: int = Field(..., description="Most comma-separated values a body may hold (numbers sent as JSON lists); send more as {dtype, shape, base64}.")


class ModelList(BaseModel):
    models: list[ModelInfo]
    limits: Limits
