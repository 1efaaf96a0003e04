"""The one settings object.

Read once at an entry point (`imagegraph serve`, `imagegraph run`, a test fixture) from
`IMAGEGRAPH_*` environment variables and passed down. Nothing else in the package reads the
environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Pillow raises DecompressionBombError above twice this many pixels and warns above it; our
# own limit must stay below so that our clear error is the one users see.
PILLOW_PIXEL_WARNING_LIMIT = 89_478_485


class Settings(BaseSettings):
    """Configuration of one imagegraph process.

    >>> Settings(data_dir=Path("/tmp/ig")).database_url_or_default()
    'sqlite:////tmp/ig/imagegraph.db'
    """

    model_config = SettingsConfigDict(
        env_prefix="IMAGEGRAPH_", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(
        default_factory=lambda: Path.home() / ".imagegraph",
        description="Directory for the SQLite database and stored images.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; defaults to SQLite in the data directory.",
    )
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        default="NORMAL",
        description="NORMAL survives process crashes; FULL also survives power loss.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = Field(
        default=None,
        description="Base URL clients use to reach this server; used in asset URLs.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    allow_private_urls: bool = Field(
        default=False,
        description="Allow image URLs that resolve to private, loopback or link-local addresses.",
    )
    max_download_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    export_dir: Path | None = Field(
        default=None,
        description="Where `POST /batches/{id}/export` writes batch folders "
        "(default: <data-dir>/exports).",
    )
    max_image_pixels: int = Field(default=50_000_000, ge=64 * 64, le=PILLOW_PIXEL_WARNING_LIMIT)
    max_graph_nodes: int = Field(default=1000, ge=1)

    max_concurrent_nodes: int = Field(
        default=256, ge=1, description="Node runs one process executes at once."
    )
    cpu_threads: int = Field(
        default=0, ge=0, description="Threads for image operations; 0 means one per core."
    )
    cpu_processes: int = Field(
        default=1,
        ge=0,
        description="Processes for CPU work that holds the interpreter lock (the sandbox's "
        "drawing); 0 runs it in threads.",
    )
    db_threads: int = Field(default=4, ge=1)
    lease_seconds: float = Field(default=30.0, gt=0)
    node_timeout_seconds: float = Field(default=600.0, gt=0)
    node_max_attempts: int = Field(default=3, ge=1, le=20)
    retry_base_seconds: float = Field(default=2.0, ge=0)
    retry_cap_seconds: float = Field(default=300.0, ge=0)
    poll_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often a worker looks for work it was not told about."
    )
    image_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)

    default_plan: str = Field(
        default="self-hosted", description="Plan of workspaces created without one."
    )
    plans_file: Path | None = Field(
        default=None, description="YAML or JSON file of plans, added to the presets."
    )
    rate_limit_storage: str = Field(
        default="memory://",
        description="Where rate-limit counters live: memory:// for one process, "
        "redis://host:6379/0 to share them between servers.",
    )
    bootstrap_credits: float = Field(
        default=1000.0, ge=0, description="Credits of the default workspace on first start."
    )
    idempotency_hours: float = Field(
        default=72.0, ge=24, description="How long an Idempotency-Key is remembered."
    )
    trigger_requests_per_minute: int = Field(default=60, ge=1)
    trigger_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    webhook_retry_seconds: list[float] = Field(
        default=[5, 300, 1800, 7200, 18000, 36000, 36000],
        description="Waits before each retry of a webhook delivery (jittered by up to 20 %).",
    )
    webhook_timeout_seconds: float = Field(default=15.0, gt=0)
    allow_private_webhooks: bool = Field(
        default=False,
        description="Deliver webhooks to private, loopback or link-local addresses.",
    )

    # -- providers -------------------------------------------------------------------------
    # Each provider's key, from IMAGEGRAPH_<PROVIDER>_API_KEY or the provider's own variable.
    fal_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("IMAGEGRAPH_FAL_API_KEY", "FAL_KEY")
    )
    replicate_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("IMAGEGRAPH_REPLICATE_API_KEY", "REPLICATE_API_TOKEN"),
    )
    bfl_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("IMAGEGRAPH_BFL_API_KEY", "BFL_API_KEY")
    )
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("IMAGEGRAPH_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    stability_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("IMAGEGRAPH_STABILITY_API_KEY", "STABILITY_API_KEY"),
    )
    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("IMAGEGRAPH_GEMINI_API_KEY", "GEMINI_API_KEY")
    )
    # Where each provider's API is (the fakes in tests, a proxy, a regional host).
    fal_base_url: str = "https://queue.fal.run"
    replicate_base_url: str = "https://api.replicate.com"
    bfl_base_url: str = "https://api.bfl.ai"
    openai_base_url: str = "https://api.openai.com"
    stability_base_url: str = "https://api.stability.ai"
    gemini_base_url: str = "https://generativelanguage.googleapis.com"
    fal_jwks_url: str = Field(
        default="https://rest.alpha.fal.ai/.well-known/jwks.json",
        description="Public keys that sign fal's webhooks.",
    )
    replicate_webhook_secret: SecretStr | None = Field(
        default=None,
        description="whsec_ secret of Replicate's webhooks; fetched from Replicate if unset.",
    )
    catalog_file: Path | None = Field(
        default=None,
        description="YAML catalog of models, added to (or replacing) the built-in one.",
    )
    provider_timeout_seconds: float = Field(
        default=120.0, gt=0, description="One HTTP call to a provider (a synchronous generation)."
    )
    provider_concurrency: dict[str, int] = Field(
        default={"fal": 10, "replicate": 10, "bfl": 24, "openai": 8, "stability": 10, "gemini": 8},
        description="Jobs in flight at once per provider (credential), shared by all executions.",
    )
    provider_requests_per_second: dict[str, float] = Field(
        default={"replicate": 10.0, "stability": 15.0},
        description="Submissions per second per provider, for those that limit the rate.",
    )
    provider_retry_budget: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Retries per provider may be at most this share of first attempts.",
    )
    breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive failures that open a route's circuit."
    )
    breaker_failure_ratio: float = Field(default=0.5, gt=0, le=1)
    breaker_window_calls: int = Field(default=20, ge=1)
    breaker_window_seconds: float = Field(default=30.0, gt=0)
    breaker_open_seconds: float = Field(
        default=30.0, gt=0, description="How long an open circuit sends nodes to the next route."
    )
    blocked_prompt_terms: list[str] = Field(
        default=[],
        description="Words refused in prompts before any paid call (whole words, any case).",
    )
    blocked_prompt_patterns: list[str] = Field(
        default=[], description="Regular expressions refused in prompts before any paid call."
    )
    local_cache_bytes: int = Field(
        default=4 * 1024**3,
        ge=0,
        description="Memory for local diffusers pipelines kept loaded (least recently used go).",
    )
    local_models_dir: Path | None = Field(
        default=None,
        description=(
            "Where generate:local looks up model names (absolute model paths must lie under "
            "it); names not found there come from the Hugging Face cache."
        ),
    )
    local_device: str | None = Field(
        default=None,
        description="torch device for generate:local (cuda, cuda:1, cpu…); default: CUDA if seen.",
    )

    def provider_key(self, provider: str) -> str | None:
        secret: SecretStr | None = getattr(self, f"{provider}_api_key", None)
        return secret.get_secret_value() if secret is not None else None

    def provider_base_url(self, provider: str) -> str:
        return str(getattr(self, f"{provider}_base_url"))

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def database_url_or_default(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'imagegraph.db'}"

    def export_dir_or_default(self) -> Path:
        return (self.export_dir or self.data_dir / "exports").expanduser().resolve()

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"
