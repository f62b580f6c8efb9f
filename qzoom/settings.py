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
| `QZOOM_API_KEYS` | comma-separated keys accepted in `X-API-Key` by the service | none: open       |
| `QZOOM_MAX_BODY_MB` | largest request body the service reads (413 above)         | 32               |
| `QZOOM_MAX_PIXELS_IN` | largest uploaded image in pixels, checked before decoding (413) | 40000000   |
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

(*) unset or empty: the demo model shipped inside the package (`qzoom.models.DEMO_MODEL`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from qzoom.models import default_model_dir


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
    max_pixels_in: int = Field(40_000_000, ge=1)
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

    @field_validator("api_keys", "mcp_allowed_hosts", "mcp_allowed_origins", "image_url_hosts", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    def model_dir(self) -> str:
        """The checkpoint to load: ``model`` if set, else the demo model shipped in the package.

        Raises :class:`qzoom.models.ModelNotFoundError` (an ``OSError``) when neither exists."""
        return self.model or str(default_model_dir())

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
