"""Process settings, read once from `QZOOM_*` environment variables (pydantic-settings); nothing else reads os.environ.

| variable        | meaning                                                      | default          |
|-----------------|--------------------------------------------------------------|------------------|
| `QZOOM_MODEL`   | checkpoint directory used when no `--model` is given          | `qzoom-tiny` (*) |
| `QZOOM_DEVICE`  | torch device: `cpu`, `cuda`, `cuda:1`, ... or `auto`          | `auto`           |
| `QZOOM_DTYPE`   | `float32`, `bfloat16` or `float16`; `auto` = bf16 on GPU      | `auto`           |
| `QZOOM_REDIS_URL` | L2 feature cache shared by processes (`redis://`, `unix://`) | none: L1 only    |
| `QZOOM_CACHE_L1_MB` | in-process feature cache budget                            | 512              |
| `QZOOM_CACHE_TTL_S` | lifetime of an L2 entry                                    | 900              |
| `QZOOM_CACHE_MAX_VALUE_MB` | largest value written to Redis                      | 64               |
| `QZOOM_API_KEYS` | comma-separated keys accepted in `X-API-Key` (a blank entry is an error) | empty: open |
| `QZOOM_PROTECT_METRICS` | `/metrics` asks for `X-API-Key` like the other routes     | false            |
| `QZOOM_TENANT_SCOPE` | cache entries and uploaded image ids are private to each API key | false      |
| `QZOOM_CACHE_SECRET` | HMAC key authenticating Redis values (none: a random per-process key) | random |
| `QZOOM_MAX_BODY_MB` | largest request body the service reads (413 above)         | 32               |
| `QZOOM_MAX_PIXELS_IN` | largest image in pixels, read from its header before decoding (413) | 40000000 |
| `QZOOM_MAX_NEW_TOKENS` | largest `max_new_tokens` a request may ask for (422 above)   | 256              |
| `QZOOM_MAX_ZOOM_VIEWS` | largest zoom steps x boxes per step of one request (422 above) | 4              |
| `QZOOM_MAX_VISUAL_TOKENS` | largest visual tokens one request may prefill, all views (422 above) | 4096    |
| `QZOOM_BUDGET_TOKENS` | token-steps of all admitted requests together (503 above)   | 65536            |
| `QZOOM_BUDGET_DECODE_MB` | image memory (decoding and decoded pixels) of all admitted requests (503 above) | 1024 |
| `QZOOM_IMAGE_STORE_MB` | decoded pixels kept for `image_id`s (`POST /v1/images`), least recently used evicted | 1024 |
| `QZOOM_MAX_PENDING` | requests in flight in the service's worker (503 above)      | 64               |
| `QZOOM_MAX_BATCH` | requests batched into one engine call                         | 8                |
| `QZOOM_BATCH_WINDOW_MS` | how long the worker waits to fill a batch               | 2.0              |
| `QZOOM_RETRY_AFTER_S` | `Retry-After` sent with a 503                              | 1.0              |
| `QZOOM_MCP_ALLOWED_HOSTS` | Host values the /mcp/ endpoint answers (comma-separated) | loopback names |
| `QZOOM_MCP_ALLOWED_ORIGINS` | browser Origins the /mcp/ endpoint answers           | loopback origins |
| `QZOOM_IMAGE_URLS` | accept `image_url` in requests (fetched by the server)        | false            |
| `QZOOM_IMAGE_URL_HOSTS` | hosts an `image_url` may name, `host` or `host:port` (comma-separated) | none |
| `QZOOM_IMAGE_URL_TIMEOUT_S` | total time for fetching one image URL, redirects included | 10.0          |
| `QZOOM_IMAGE_URL_MAX_MB` | largest image fetched from a URL (counted while streaming) | 32             |
| `QZOOM_IMAGE_URL_PRIVATE` | also fetch from loopback/private addresses (allow-listed hosts only) | false  |

(*) unset or empty: the demo model shipped inside the package (`qzoom.models.DEMO_MODEL`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from qzoom.guards import DEFAULT_MAX_PIXELS
from qzoom.models import default_model_dir

if TYPE_CHECKING:
    import torch


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QZOOM_", extra="ignore")

    model: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    redis_url: str | None = None
    cache_l1_mb: int = Field(512, ge=0)
    cache_ttl_s: int = Field(900, ge=1)
    cache_max_value_mb: int = Field(64, ge=1)
    # NoDecode: the environment gives "k1,k2", not JSON; split below.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_mb: float = Field(32.0, gt=0)
    max_pixels_in: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    protect_metrics: bool = False
    tenant_scope: bool = False
    cache_secret: SecretStr | None = None
    # Per-request caps and the per-process budget (qzoom.admission): no request costs more than a stated multiple
    # of a default one, and the requests admitted together fit the budget.
    max_new_tokens: int = Field(256, ge=1)
    max_zoom_views: int = Field(4, ge=0)
    max_visual_tokens: int = Field(4096, ge=1)
    budget_tokens: int = Field(65536, ge=1)
    budget_decode_mb: float = Field(1024.0, gt=0)
    image_store_mb: float = Field(1024.0, gt=0)
    max_pending: int = Field(64, ge=1)
    max_batch: int = Field(8, ge=1)
    batch_window_ms: float = Field(2.0, ge=0)
    retry_after_s: float = Field(1.0, ge=0)
    # DNS-rebinding protection of the MCP endpoint: the Host (and browser Origin) values it answers.
    mcp_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    )
    mcp_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    )

    # Image URLs make the server fetch what a client names: off unless enabled, and then only from listed hosts.
    image_urls: bool = False
    image_url_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_url_timeout_s: float = Field(10.0, gt=0)
    image_url_max_mb: float = Field(32.0, gt=0)
    image_url_private: bool = False

    @field_validator("mcp_allowed_hosts", "mcp_allowed_origins", "image_url_hosts", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, v: object) -> object:
        # An unset or empty variable means an open server; a value that names no key (" , ") or holds a blank
        # entry is a mistake that would silently open it, so it stops the start instead.
        if isinstance(v, str):
            if v == "":
                return []
            v = v.split(",")
        if isinstance(v, list):
            keys = [k.strip() if isinstance(k, str) else k for k in v]
            if any(k == "" for k in keys):
                raise ValueError(
                    "QZOOM_API_KEYS has a blank entry; give comma-separated non-blank keys, or leave it empty for an "
                    "open server"
                )
            return keys
        return v

    def cache_key(self) -> bytes | None:
        """The HMAC key of Redis values (`QZOOM_CACHE_SECRET`), or None: a random key of this process."""
        secret = self.cache_secret.get_secret_value() if self.cache_secret is not None else ""
        return secret.encode() if secret else None  # an empty value (compose's unset default) is no secret

    def model_dir(self) -> str:
        """The checkpoint to load: ``model`` if set, else the demo model shipped in the package.

        Raises :class:`qzoom.models.ModelNotFoundError` (an ``OSError``) when neither exists."""
        return self.model or str(default_model_dir())

    def torch_device(self) -> torch.device:
        """The device to run on; `ValueError` (one line naming what exists) for a name torch does not know or a
        device this machine or torch build does not have."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"device {self.device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(
                    f"device {self.device!r} is not available: no CUDA device (or a CPU-only torch build)"
                    "; use cpu or auto"
                )
            if device.index is not None and device.index >= count:
                raise ValueError(
                    f"device {self.device!r} is not available: this machine has {count} CUDA "
                    f"device(s), cuda:0 to cuda:{count - 1}"
                )
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {self.device!r} is not available on this machine; use cpu or auto")
        elif device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {self.device!r} is not supported; use auto, cpu, cuda or cuda:N")
        return device

    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
