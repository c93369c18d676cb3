"""Settings: the one place that reads environment variables (prefix ``AIGC_``, and OpenMP's ``OMP_NUM_THREADS``).

Every field can also be passed explicitly (``Settings(database_url=...)``), which is what the CLI
and the tests do; unknown ``AIGC_*`` variables are ignored, bad values raise a clear error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    return Path.home() / ".aigc"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIGC_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="Data folder: the SQLite database, generated files, secrets.")
    database_url: str = Field("", description="SQLAlchemy URL; empty: sqlite:///<home>/aigc.db (WAL). PostgreSQL: postgresql+psycopg://...")
    admin_token: str = Field("", description="Operator token for /v1/admin/* across tenants (empty: operator endpoints are off).")
    models_dir: Path | None = Field(None, description="Folder of run directories to serve (each sub-folder is a model).")
    public_url: str = Field("", description="Base URL used in image `url` responses (empty: taken from the request).")
    # What a second of compute costs the operator, in USD: the basis of per-request cost and margin.
    cpu_second_cost: float = 0.00002
    gpu_second_cost: float = 0.0008
    device: str = Field("auto", description="Where served models compute: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
    model_devices: str = Field("", description="Per-model placement, NAME=DEVICE[,NAME=DEVICE...]: overrides AIGC_DEVICE for those models.")
    embeddings: bool = Field(True, description="Serve /v1/embeddings with the offline all-MiniLM-L6-v2 encoder (listed in /v1/models).")
    speech: bool = Field(True, description="Serve /v1/audio/speech (model tts-1) with the installed voices: Piper voices and eSpeak NG.")
    voices_dir: Path | None = Field(None, description="A folder of Piper voices (NAME.onnx + NAME.onnx.json) for speech.")
    quota_status: Literal[402, 429] = Field(402, description="HTTP status of exhausted credit or quota: 402, or 429 as OpenAI "
                                            "answers it (type and code insufficient_quota either way).")
    memory_budget_mb: int = 4096  # loaded CPU models beyond this are evicted, least recently used first
    gpu_memory_budget_mb: int = 0  # the same per GPU; 0: 90% of the GPU's memory
    request_timeout_s: float = 120.0
    max_prompt_chars: int = 100_000
    max_batch: int = 32  # sequences decoded together per text model
    context_tokens: int = 1024  # KV cache length per sequence (prompt + completion), capped by the model's own
    key_cache_s: float = 5.0  # a key revoked from another process stops working within this many seconds (without NOTIFY)
    # The fleet (serve/fleet.py, serve/ratelimit.py): several processes and hosts on one PostgreSQL.
    echo_token_ms: float = Field(0.0, ge=0, description="Stub (--echo-model) models write a word every this many ms "
                                 "(0: all at once): streams that last, for load and fault tests.")
    workers: int = Field(1, ge=1, description="Server processes on this host (aigc serve --workers); more than 1 needs PostgreSQL.")
    rate_limit_backend: Literal["auto", "memory", "postgres", "redis"] = Field(
        "auto", description="Where rate limits count: auto (Redis when AIGC_REDIS_URL is set, PostgreSQL when the database is, "
                            "else in the process), memory, postgres or redis.")
    redis_url: str = Field("", description="redis://HOST:6379/0: rate limits in Redis (optional; needs the redis package).")
    db_busy_timeout_s: float = Field(5.0, gt=0, description="How long a request waits for a SQLite database another "
                                     "writer holds (the CLI, say) before it answers 503.")
    settle_retry_s: float = Field(60.0, ge=0, description="How long a finished request keeps trying to record its usage "
                                  "while the database is unavailable (a PostgreSQL restart, a held SQLite lock).")
    heartbeat_s: float = Field(5.0, gt=0, description="How often a server renews its lease and reaps dead servers.")
    serve_spec: str = Field("", description="Set by aigc serve --workers for its worker processes: what to serve (JSON).")
    prometheus_multiproc_dir: str = Field("", validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR"),
                                          description="prometheus_client's own variable: metrics shared by the workers.")
    lease_s: float = Field(30.0, gt=0, description="A server whose heartbeat is older than this is dead: any other server "
                                                   "releases its holds and fails its jobs.")
    image_url_ttl_s: int = 3600  # also the lifetime of music and video result URLs
    job_workers: int = 1  # threads rendering music and video jobs
    fine_tune_workers: int = Field(1, ge=1, description="Fine-tuning jobs this server trains at once (each in its own process); more wait queued.")
    fine_tune_max_active: int = Field(2, ge=1, description="Fine-tuning jobs a tenant may have queued or running at once.")
    fine_tune_max_seconds: float = Field(3600.0, gt=0, description="The time budget of one fine-tuning job (training stops there and keeps its best model).")
    max_body_mb: int = Field(64, ge=1, description="The largest request body (413 beyond it); /v1/files uploads: file_max_mb.")
    max_header_kb: int = Field(32, ge=1, description="The most a request's headers may weigh in all (431 beyond it).")
    client_timeout_s: float = Field(30.0, gt=0, description="How long a client may take to send a request's head, and "
                                    "between parts of its body (408 and closed beyond it).")
    trusted_proxies: str = Field("", description="Reverse proxies (addresses or networks, comma-separated) whose "
                                 "X-Forwarded-For is believed; empty: the peer's address counts, the header is ignored.")
    complaints_per_minute: int = Field(20, ge=1, description="Complaints (no key needed) one address may file a minute.")
    complaints_per_minute_total: int = Field(600, ge=1, description="Complaints all addresses together may file a minute "
                                             "(a flood from many addresses).")
    cors_origins: str = Field("", description="Origins (comma-separated) whose pages may call the API from a browser; "
                              "empty: none (CORS closed).")
    file_max_mb: int = Field(512, ge=1, description="The largest file /v1/files accepts.")
    console_idle_minutes: float = Field(60.0, gt=0, description="A console session ends after this long without a request.")
    threads: int = Field(0, ge=0, description="torch intra-op threads for every job; 0: follow the free CPU (aigc/threads.py).")
    log_json: bool = True
    log_level: str = Field("WARNING", description="Logging level of the CLI (the server logs at INFO).")
    cache_dir: Path | None = Field(None, description="Cache of derived artefacts (image feature networks); empty: ~/.cache/aigc.")
    # OpenMP's own variable, read here so that this stays the one reader of the environment.
    omp_num_threads: str = Field("", validation_alias=AliasChoices("OMP_NUM_THREADS"), description="OpenMP's thread count, if set.")
    # Governance (aigc/govern): production C2PA credentials and the data-encryption key ring.
    c2pa_cert: str = Field("", description="PEM file: the C2PA signing certificate chain (leaf first, no root). Empty: a local development CA.")
    c2pa_key: str = Field("", description="PEM file: the private key of c2pa_cert.")
    c2pa_signer: str = Field("", description="module:function that signs bytes (HSM/KMS) instead of c2pa_key.")
    c2pa_alg: str = Field("es256", description="es256, es384, es512, ps256, ps384, ps512 or ed25519.")
    c2pa_trust_anchors: str = Field("", description="PEM file of extra trust anchors for verification.")
    data_keys: str = Field("", description="kid:base64key[,kid:base64key...] (first active); empty: HOME/keys/data-keys.json.")

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'aigc.db'}"
