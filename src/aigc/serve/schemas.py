"""Response models: what every JSON route answers, so the OpenAPI schema documents it (and the
schema tests check the answers against it). Request models live with their routes.

Fields that carry free-form records (a moderation decision, a C2PA report, a dataset manifest) are
typed ``dict``: their shape is the producing module's, documented there.
"""
from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Out(BaseModel):
    model_config = ConfigDict(extra="allow")  # answers may gain fields; clients ignore what they do not know


class ListOf(Out, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]


# ---------------------------------------------------------------- models, text, images

class ModelCard(Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: str = Field(description="text, image, music, embedding or echo")
    version: str = Field(description="Fingerprint of the weights; changes whenever the model is retrained.")


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Out):
    text: str
    index: int
    logprobs: dict | None = Field(None, description="With logprobs: each token's log-probability (OpenAI's shape for the endpoint).")
    finish_reason: str | None


class Completion(Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Out):
    index: int
    message: ChatMessage
    logprobs: dict | None = Field(None, description="With logprobs: each token's log-probability (OpenAI's shape for the endpoint).")
    finish_reason: str | None


class ChatCompletion(Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Embedding(Out):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="The vector, or with encoding_format=base64 its little-endian float32 bytes.")


class EmbeddingUsage(Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(ListOf[Embedding]):
    model: str
    usage: EmbeddingUsage


class ImageData(Out):
    url: str | None = Field(None, description="A signed URL that expires (response_format=url).")
    b64_json: str | None = None
    revised_prompt: str | None = Field(None, description="The condition the model drew (class or caption).")


class ImagesResponse(Out):
    created: int
    data: list[ImageData]


# ---------------------------------------------------------------- jobs (music, video)

class JobFile(Out):
    name: str
    bytes: int
    sha256: str
    mime: str
    url: str


class Job(Out):
    id: str
    object: Literal["generation.job"] = "generation.job"
    kind: Literal["audio", "video"]
    model: str
    status: Literal["queued", "running", "succeeded", "failed"]
    created_at: int | None
    started_at: int | None
    finished_at: int | None
    error: str | None
    result: dict | None = Field(None, description="When succeeded: seconds, generation_id, files (each with a signed url), and "
                                                  "the modality's details.")


# ---------------------------------------------------------------- usage

class UsageRow(Out):
    requests: int
    input_tokens: int
    output_tokens: int
    images: int
    seconds: float
    train_tokens: int = 0
    characters: int = 0
    list_price: float
    revenue: float
    compute_s: float
    cost: float
    margin: float


class UsageReport(ListOf[UsageRow]):
    group_by: list[str]


# ---------------------------------------------------------------- administration

class PlanOut(Out):
    id: int
    name: str
    kind: Literal["subscription", "payg", "prepaid"]
    monthly_fee: float
    included: float
    overage_rate: float | None
    price_multiplier: float
    spend_limit: float | None
    rpm: int
    tpm: int


class PriceOut(Out):
    model: str
    version: str
    input_per_1k: float
    output_per_1k: float
    per_image: float
    per_second: float
    per_1k_train_tokens: float = 0.0
    per_1k_chars: float = 0.0


class OrgOut(Out):
    id: int
    name: str
    plan: str | None
    credits: float
    reserved: float
    period_start: str
    period_list_price: float
    period_charged: float


class UserOut(Out):
    id: int
    org_id: int
    email: str
    role: str
    created_at: str


class KeyOut(Out):
    id: int
    org_id: int
    user_id: int
    name: str
    prefix: str
    allowed_models: list[str] | None
    rpm: int | None
    tpm: int | None
    expires_at: str | None
    revoked_at: str | None
    created_at: str


class NewKey(KeyOut):
    api_key: str = Field(description="The secret; shown only in this response.")


class NewOrg(Out):
    organization: OrgOut
    user: UserOut | None = None
    key: KeyOut | None = None
    api_key: str | None = None


# ---------------------------------------------------------------- governance

class VerifyReport(Out):
    kind: str | None = None
    sha256: str | None = None
    c2pa: dict | None = None
    image_watermark: dict | None = None
    exact_match: bool | None = None
    text_watermark: dict | None = None


class ModerationResult(Out):
    flagged: bool
    action: str
    rules: list
    categories: dict[str, bool]
    category_scores: dict[str, float]
    classifier_score: float | None = None


class ModerationResponse(Out):
    id: str
    model: str
    results: list[ModerationResult]


class ComplaintOut(Out):
    id: int
    object: Literal["complaint"] = "complaint"
    created_at: str
    status: str
    reason: str
    contact: str
    evidence: dict | None
    evidence_sha256: str | None
    generation_id: str | None
    decided_by: str | None
    decided_at: str | None
    decision_note: str | None


class NewComplaint(ComplaintOut):
    matched_generation: bool


class Decided(ComplaintOut):
    revoked_key: int | None
    deleted_files: int


class Explanation(Out):
    id: str
    object: Literal["generation.explanation"] = "generation.explanation"
    created_at: str
    request_id: str
    endpoint: str
    kind: str
    status: str
    model: dict
    dataset: dict | None
    parameters: dict | None
    parameters_sha256: str | None
    output_sha256: str
    filters: list[str]
    moderation: dict | None
    watermark: dict | None
    stored_content: Literal["purged", "encrypted", "not stored"]
    audit: dict | None
    prompt: str | None = None
    output: str | None = None


class PolicyOut(Out):
    policy: dict
    moderation: str | None
    defaults: dict


# ---------------------------------------------------------------- operations

class Health(Out):
    status: str


class Ready(Out):
    status: str
    models: int | None = None
    loaded: list[str] | None = None
    database: str | None = None


# ---------------------------------------------------------------- files and fine-tuning (OpenAI's shapes)

class FileOut(Out):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    kind: str = Field(description="chat or preference: what the file's records are")
    preparation: dict = Field(description="The data preparation's report: records read and kept, drop reasons with examples, PII counts.")


class Page(ListOf[T], Generic[T]):
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(Out):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FineTuneJobOut(Out):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    error: dict | None
    fine_tuned_model: str | None
    hyperparameters: dict
    model: str
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    method: dict
    suffix: str | None
    estimated_tokens: int = Field(description="Tokens of one epoch of the training data (the hold is this times the epochs).")


class FineTuneEventOut(Out):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict
    type: str


class CheckpointOut(Out):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict
