"""The feature cache: vision features, prompt-prefix state and crop features, reused across steps and requests.

Contract (DESIGN.md "The worker and the cache", ecosystem spec §4):

- Keys are built by `feature_key(kind, model_id, revision, params, digest)` ->
  `qz:v1:{kind}:{model_id}@{revision}:{params_hash}:{digest}`. `digest` is `image_digest(image)`, a blake2b-128
  of the decoded pixels (mode, size, raw bytes), so a re-encoded but identical image hits and a one-pixel change
  misses. `params` holds everything else the value depends on (pixel budget, dtype, K, the box of a crop, ...);
  it is hashed as canonical JSON. Kinds in use: "vision" (coarse-view features), "prefix" (layer<K KV + layer-K
  hidden states of the prompt prefix up to the image end, see `pack_prefix`), "crop" (crop features).
- Values cross process boundaries only as safetensors bytes (`encode` / `decode`), never pickle: bytes from Redis
  are untrusted. The metadata carries the schema version, the key and every tensor's dtype and shape, and
  `decode` checks them; anything else raises `CacheCorrupt`, which `FeatureCache` counts and treats as a miss.
- `FeatureCache.get(key, device=...)` looks in L1 (`L1Cache`, an in-process LRU with a byte budget holding the
  tensors as they are, possibly on the GPU), then L2 (`RedisL2`, optional, shared by processes); an L2 hit is
  moved to the device and promoted into L1. `put` writes L1 always and L2 when configured (with a TTL, and only
  values up to a size cap). Returned tensors are shared with the cache: treat them as read-only.
- L2 values are authenticated: Redis holds `HMAC-SHA256(secret, key || value) || value`, and a value whose tag does
  not verify (written by anyone without the secret, or moved to another key) is dropped, deleted and counted in
  `stats()["forged"]`, never decoded. The secret is `QZOOM_CACHE_SECRET`; without it each process draws a random one
  at import, so its Redis values are its own (replicas share L2 entries only when they share the secret).
- Tenancy (`set_scope`): with `QZOOM_TENANT_SCOPE` the service marks each request's image with a scope derived from
  its API key, which `image_digest` mixes in: one key's entries (and image ids) are invisible to, and never hit
  for, another.
- It fails open: a Redis that is down, slow, full or answering garbage costs a recompute, is counted in
  `stats()` and logged (once per burst), and never raises. A restarted Redis is picked up again by later calls.
  Without a Redis URL the L1 alone serves.

The engine runs on one worker thread, so the Redis client is the synchronous one; the L1 and the counters are
nevertheless guarded by locks so that a metrics scrape from another thread reads consistent numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import redis
import safetensors.torch
import torch
from cachetools import LRUCache
from PIL import Image
from redis.backoff import NoBackoff
from redis.retry import Retry
from torch import Tensor

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"  # bump to invalidate every stored value (it is part of every key and every value's metadata)
KEY_PREFIX = f"qz:v{SCHEMA_VERSION}"
MiB = 1024 * 1024

# Metadata names that `encode` writes itself; a caller's meta may carry "key" (FeatureCache always does) but
# cannot fake these.
_META_SCHEMA = "qz_schema"
_META_TENSORS = "qz_tensors"
META_KEY = "key"

_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]{16,}$")

# Redis errors that mean "not reachable right now" (as opposed to an answer such as OOM): after one of these the
# L2 is left alone for `retry_after_s`, so a dead or hung server costs one timeout per interval, not one per call.
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class CacheCorrupt(ValueError):
    """Bytes that are not a value this code wrote for this key (truncated, foreign, other schema, other key)."""


class CacheForged(CacheCorrupt):
    """A Redis value whose HMAC tag does not verify: not written by a holder of the secret for this key."""


# Used when no secret is configured: values stay private to this process (see the module docstring).
_PROCESS_SECRET = os.urandom(32)
_TAG_BYTES = 32


def sign(secret: bytes, key: str, value: bytes) -> bytes:
    """`value` prefixed with its tag, HMAC-SHA256 over the key's length, the key and the value."""
    k = key.encode()
    tag = hmac.new(secret, len(k).to_bytes(4, "big") + k + value, hashlib.sha256).digest()
    return tag + value


def verify(secret: bytes, key: str, signed: bytes) -> bytes:
    """The value inside `signed` when its tag verifies for `key`, else `CacheForged`."""
    tag, value = signed[:_TAG_BYTES], signed[_TAG_BYTES:]
    if len(tag) != _TAG_BYTES or not hmac.compare_digest(sign(secret, key, value)[:_TAG_BYTES], tag):
        raise CacheForged("the value's HMAC does not verify for this key")
    return value


# The tenant an image belongs to, carried in its `info` (Pillow copies `info` into crops, resizes and conversions, so
# every view cut from the image inherits it). `image_digest` mixes it in: set, the same pixels get another digest per
# tenant, hence other cache keys and other image ids. `qzoom.images.load_image` drops any value a file brings along.
SCOPE_INFO = "qzoom_scope"


def set_scope(image: Image.Image, scope: str | None) -> Image.Image:
    """Mark `image` (in place) as belonging to `scope` (None: shared by everyone)."""
    if scope:
        image.info[SCOPE_INFO] = scope
    else:
        image.info.pop(SCOPE_INFO, None)
    return image


# -- keys ---------------------------------------------------------------------------------------------------------


def image_digest(image: Image.Image) -> str:
    """blake2b-128 hex of the decoded pixels: mode, size and raw bytes, not the file's bytes.

    Two encodings of the same pixels (PNG at another compression level, PNG vs lossless WebP) get the same digest,
    so they share cached features. The hash is cryptographic because the cache is shared: a crafted collision
    would let one user's image answer another's question. Palette images are expanded first, since their raw
    bytes are indices whose meaning depends on the palette.
    """
    scope = image.info.get(SCOPE_INFO)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    h = hashlib.blake2b(digest_size=16)
    h.update(f"qzoom-pixels-v1\0{image.mode}\0{image.width}x{image.height}\0".encode())
    if scope:
        h.update(f"scope\0{scope}\0".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def params_hash(params: Mapping[str, object]) -> str:
    """Short blake2b of the canonical JSON of `params` (sorted keys, no spaces); non-JSON values are an error.

    No `default=str` fallback: a repr that embeds an address or is not stable would silently turn every lookup
    into a miss, so callers pass plain numbers, strings, lists (e.g. `str(dtype)`, `box.as_list()`).
    """
    try:
        text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cache key params must be plain JSON values: {exc}") from exc
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def feature_key(kind: str, model_id: str, revision: str, params: Mapping[str, object], digest: str) -> str:
    """`qz:v1:{kind}:{model_id}@{revision}:{params_hash}:{digest}` for a value computed from an image.

    model_id and revision are percent-encoded (':', '@', spaces, ...), so no part can spill into another; the
    digest must be a hex digest, so a forgotten digest (an empty string) fails here instead of making every
    image share one entry.
    """
    if not _KIND_RE.match(kind):
        raise ValueError(f"cache kind must match {_KIND_RE.pattern}, got {kind!r}")
    if not model_id or not revision:
        raise ValueError("cache keys need a model id and a revision")
    if not _HEX_RE.match(digest):
        raise ValueError(f"cache keys need a hex image digest (see image_digest), got {digest!r}")
    model = f"{quote(model_id, safe='/._-+')}@{quote(revision, safe='/._-+')}"
    return f"{KEY_PREFIX}:{kind}:{model}:{params_hash(params)}:{digest}"


def key_kind(key: str) -> str:
    """The kind segment of a key built by `feature_key` ("other" for foreign keys), for per-kind counters."""
    parts = key.split(":", 3)
    return parts[2] if len(parts) > 3 and f"{parts[0]}:{parts[1]}" == KEY_PREFIX else "other"


# -- codec --------------------------------------------------------------------------------------------------------


def _dense_cpu(t: Tensor) -> Tensor:
    """A contiguous CPU tensor owning exactly its bytes: safetensors refuses views and tensors sharing storage."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.nbytes:
        t = t.clone()
    return t


def _layout(tensors: Mapping[str, Tensor]) -> str:
    return json.dumps(
        {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in sorted(tensors.items())},
        separators=(",", ":"),
    )


def encode(tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> bytes:
    """safetensors bytes of `tensors` (moved to CPU, made dense; bf16 kept) with `meta` plus schema and layout.

    Pass the value's key as `meta["key"]` (`META_KEY`) so that `decode` can tell a value stored under another key.
    """
    for name in (_META_SCHEMA, _META_TENSORS):
        if name in meta:
            raise ValueError(f"metadata name {name!r} is reserved for the codec")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("safetensors metadata must map str to str")
    dense = {name: _dense_cpu(t) for name, t in tensors.items()}
    metadata = {**meta, _META_SCHEMA: SCHEMA_VERSION, _META_TENSORS: _layout(dense)}
    return bytes(safetensors.torch.save(dense, metadata=metadata))


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes, parsed without touching the tensor buffers."""
    if len(data) < 8:
        raise CacheCorrupt("value too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CacheCorrupt("safetensors header length exceeds the value")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheCorrupt(f"safetensors header is not JSON: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CacheCorrupt("value has no qzoom metadata")
    return meta


def decode(data: bytes, expected_meta: Mapping[str, str]) -> dict[str, Tensor]:
    """CPU tensors from `encode`'s bytes, after checking the schema, every `expected_meta` entry and the layout.

    Never unpickles anything: safetensors is a JSON header plus raw buffers. Raises `CacheCorrupt` on any mismatch
    or malformed input.
    """
    meta = read_metadata(data)
    if meta.get(_META_SCHEMA) != SCHEMA_VERSION:
        raise CacheCorrupt(f"schema {meta.get(_META_SCHEMA)!r} != {SCHEMA_VERSION!r}")
    for name, want in expected_meta.items():
        if meta.get(name) != want:
            raise CacheCorrupt(f"metadata {name!r} is {meta.get(name)!r}, expected {want!r}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError and whatever a malformed buffer provokes: all mean "not ours"
        raise CacheCorrupt(f"not a readable safetensors value: {exc}") from exc
    if _layout(tensors) != meta.get(_META_TENSORS):
        raise CacheCorrupt("tensor names, dtypes or shapes differ from the recorded layout")
    return tensors


# -- prefix state -------------------------------------------------------------------------------------------------


def pack_prefix(kv: Sequence[tuple[Tensor, Tensor]], hidden: Tensor) -> dict[str, Tensor]:
    """Flat tensors for the prefix state: per-layer `k.{i}`/`v.{i}` ((kv_heads, n, head_dim)) and `hidden` ((n, d))."""
    out = {"hidden": hidden}
    for i, (k, v) in enumerate(kv):
        out[f"k.{i}"] = k
        out[f"v.{i}"] = v
    return out


def unpack_prefix(tensors: Mapping[str, Tensor]) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Inverse of `pack_prefix`: (per-layer (k, v) in layer order, hidden). Raises `CacheCorrupt` on gaps."""
    layers = sum(1 for name in tensors if name.startswith("k."))
    expected = {"hidden"} | {f"{p}.{i}" for i in range(layers) for p in "kv"}
    if set(tensors) != expected:
        raise CacheCorrupt(f"prefix value has tensors {sorted(tensors)}, expected {sorted(expected)}")
    return [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(layers)], tensors["hidden"]


# -- L1 -----------------------------------------------------------------------------------------------------------


def _compact(t: Tensor) -> Tensor:
    """`t` itself unless it is a view pinning a larger buffer (a slice of a batch output): then a compact copy, so
    the byte budget counts what the entry really keeps alive."""
    if not t.is_contiguous() or t.untyped_storage().nbytes() > t.nbytes:
        return t.contiguous().clone()
    return t


class _LRU(LRUCache[str, tuple[dict[str, Tensor], int]]):
    """cachetools' LRU sized by each entry's byte count, counting what it evicts."""

    evictions = 0

    def popitem(self) -> tuple[str, tuple[dict[str, Tensor], int]]:
        item = super().popitem()
        self.evictions += 1
        return item


class L1Cache:
    """Thread-safe in-process LRU of tensor dicts with a budget in bytes (sum of the tensors' nbytes).

    Tensors are kept as they are (on their device), so a hit costs nothing. An entry larger than the whole budget
    is not stored; a budget of 0 disables the level. The LRU is cachetools' (`LRUCache` with a size function),
    behind a lock: cachetools caches are not thread-safe, and the worker thread and the event loop both use this.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries = _LRU(maxsize=max(max_bytes, 1), getsizeof=lambda entry: entry[1])
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.skipped_too_large = 0

    @property
    def evictions(self) -> int:
        return self._entries.evictions

    def get(self, key: str) -> dict[str, Tensor] | None:
        with self._lock:
            entry = self._entries.get(key)  # a hit counts as a use (LRU order)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            return dict(entry[0])  # a new dict, so a caller adding names cannot change the entry

    def put(self, key: str, tensors: Mapping[str, Tensor]) -> bool:
        """Store (replacing any entry under `key`) and evict least recently used entries to fit; False if too large."""
        # Kept as the very objects given (detached only if they carry autograd history), so hits share them.
        stored = {name: _compact(t.detach() if t.requires_grad else t) for name, t in tensors.items()}
        size = sum(t.nbytes for t in stored.values())
        with self._lock:
            self._entries.pop(key, None)
            if size > self.max_bytes or self.max_bytes <= 0:
                self.skipped_too_large += 1
                return False
            self._entries[key] = (stored, size)
            return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> set[str]:
        """The cached keys."""
        with self._lock:
            return set(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": int(self._entries.currsize),
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "skipped_too_large": self.skipped_too_large,
            }


# -- L2 -----------------------------------------------------------------------------------------------------------


class RedisL2:
    """Bytes in Redis under a TTL, failing open: every Redis problem is a miss or a skipped write, never an error.

    `SET key value EX ttl` (no NX: a rewrite after a corrupt read must replace the bad value). Values over
    `max_value_bytes` are not written: each big GET/SET holds Redis's single thread for milliseconds, and the
    spec sizes one 7B coarse view at ~9 MB. After a connection error or timeout the server is left alone for
    `retry_after_s`, then tried again, so a restarted Redis is picked up without a restart of ours. Redis's own
    answers (OOM under `maxmemory` with noeviction, ...) are counted but do not pause the level.
    """

    # At most one warning per this many seconds: one per outage or burst of OOM answers, not one per call of a busy
    # worker (a full Redis fails every SET while GETs succeed, so "since the last success" would not bound it).
    WARN_EVERY_S = 60.0

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: int = 900,
        max_value_bytes: int = 64 * MiB,
        retry_after_s: float = 1.0,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_value_bytes = max_value_bytes
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._unreachable = False  # the last call hit a connection error or timeout
        self._paused_until = 0.0
        self._last_warning = -float("inf")
        self._errors_since_warning = 0
        self.counters: dict[str, int] = defaultdict(int)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl_s: int = 900,
        max_value_bytes: int = 64 * MiB,
        socket_timeout_s: float = 0.5,
        retry_after_s: float = 1.0,
    ) -> RedisL2:
        """A client for `redis://`, `rediss://` or `unix://` URLs; connects lazily (a down server is not an error).

        Short timeouts, because waiting on the cache must never cost more than recomputing would. One immediate
        retry on connection errors only: it replaces a pooled connection that a restarted server has closed;
        redis-py's default (10 retries with backoff) would stall the worker for seconds on a dead server.
        """
        client = redis.Redis.from_url(
            url,
            decode_responses=False,  # values are binary
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        )
        return cls(client, ttl_s=ttl_s, max_value_bytes=max_value_bytes, retry_after_s=retry_after_s)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _available(self) -> bool:
        with self._lock:
            if self._unreachable and time.monotonic() < self._paused_until:
                self.counters["skipped_unavailable"] += 1
                return False
            return True

    def _ok(self) -> None:
        with self._lock:
            if not self._unreachable:
                return
            self._unreachable = False
        log.info("feature cache: Redis is reachable again")

    def _fail(self, op: str, exc: Exception) -> None:
        now = time.monotonic()
        unavailable = isinstance(exc, _UNAVAILABLE)
        errors = 0
        with self._lock:
            self.counters["errors"] += 1
            self.counters[f"errors_{type(exc).__name__}"] += 1
            self._errors_since_warning += 1
            if unavailable:
                self._unreachable = True
                self._paused_until = now + self.retry_after_s
            warn = now - self._last_warning >= self.WARN_EVERY_S
            if warn:
                self._last_warning = now
                errors, self._errors_since_warning = self._errors_since_warning, 0
        if warn:
            log.warning(
                "feature cache: Redis %s failed (%s: %s); serving from L1 or recomputing (%d errors since the last "
                "warning; at most one warning per %.0f s)",
                op,
                type(exc).__name__,
                exc,
                errors,
                self.WARN_EVERY_S,
            )

    def get(self, key: str) -> bytes | None:
        if not self._available():
            return None
        try:
            value = self.client.get(key)
        except (redis.RedisError, OSError) as exc:
            self._fail("GET", exc)
            return None
        self._ok()
        if not isinstance(value, bytes):
            self._count("misses")
            return None
        self._count("hits")
        self._count("bytes_read", len(value))
        return value

    def fits(self, nbytes: int) -> bool:
        """Whether a value of `nbytes` may be written; counts "skipped_too_large" when not."""
        if nbytes > self.max_value_bytes:
            self._count("skipped_too_large")
            return False
        return True

    def set(self, key: str, value: bytes, ttl_s: int | None = None) -> bool:
        """Write with a TTL; False (never an exception) when skipped or failed."""
        if not self.fits(len(value)):
            return False
        if not self._available():
            return False
        try:
            self.client.set(key, value, ex=ttl_s or self.ttl_s)
        except (redis.RedisError, OSError) as exc:
            self._fail("SET", exc)
            return False
        self._ok()
        self._count("writes")
        self._count("bytes_written", len(value))
        return True

    def delete(self, key: str) -> None:
        """Best-effort removal (of a value that failed to decode)."""
        if not self._available():
            return
        try:
            self.client.delete(key)
        except (redis.RedisError, OSError) as exc:
            self._fail("DEL", exc)
        else:
            self._ok()

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):  # closing a dead connection has nothing to tell us
            self.client.close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            names = ("hits", "misses", "writes", "bytes_read", "bytes_written", "errors")
            out = {name: 0 for name in (*names, "skipped_too_large", "skipped_unavailable")}
            out.update(self.counters)
            out["available"] = int(not self._unreachable)
            return out


# -- the facade ---------------------------------------------------------------------------------------------------


class FeatureCache:
    """L1 then (optionally) L2; what the engine talks to. See the module docstring for the contract."""

    def __init__(self, l1: L1Cache, l2: RedisL2 | None = None, secret: bytes | None = None) -> None:
        self.l1 = l1
        self.l2 = l2
        self.secret = secret or _PROCESS_SECRET
        self._lock = threading.Lock()
        self._kinds: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.corrupt = 0
        self.forged = 0

    @classmethod
    def from_url(
        cls,
        redis_url: str | None,
        l1_bytes: int = 512 * MiB,
        ttl_s: int = 900,
        max_value_bytes: int = 64 * MiB,
        *,
        socket_timeout_s: float = 0.5,
        retry_after_s: float = 1.0,
        secret: bytes | None = None,
    ) -> FeatureCache:
        """From settings (`QZOOM_REDIS_URL`, `QZOOM_CACHE_*`, `QZOOM_CACHE_SECRET` as `secret`); without a URL, L1
        only. A malformed URL raises ValueError here (a configuration error worth failing at startup); an unreachable
        one does not."""
        l2 = None
        if redis_url:
            l2 = RedisL2.from_url(
                redis_url,
                ttl_s=ttl_s,
                max_value_bytes=max_value_bytes,
                socket_timeout_s=socket_timeout_s,
                retry_after_s=retry_after_s,
            )
        return cls(L1Cache(l1_bytes), l2, secret)

    def _count(self, key: str, name: str) -> None:
        with self._lock:
            self._kinds[key_kind(key)][name] += 1

    def get(self, key: str, device: torch.device | str | None = None) -> dict[str, Tensor] | None:
        """The tensors stored under `key` (on `device` when given), or None. Never raises for cache trouble."""
        hit = self.l1.get(key)
        if hit is not None:
            self._count(key, "l1_hits")
            return _to(hit, device)
        if self.l2 is not None:
            data = self.l2.get(key)
            if data is not None:
                try:
                    tensors = decode(verify(self.secret, key, data), {META_KEY: key})
                except CacheCorrupt as exc:
                    with self._lock:
                        self.corrupt += 1
                        self.forged += isinstance(exc, CacheForged)
                    log.warning("feature cache: dropping an unreadable Redis value for %s: %s", key, exc)
                    self.l2.delete(key)
                else:
                    # Compact first (safetensors may return views into one buffer), so that L1 keeps, and later
                    # hits return, these very tensors.
                    tensors = {name: _compact(t) for name, t in _to(tensors, device).items()}
                    self.l1.put(key, tensors)
                    self._count(key, "l2_hits")
                    return dict(tensors)
        self._count(key, "misses")
        return None

    def put(self, key: str, tensors: Mapping[str, Tensor], meta: Mapping[str, str] | None = None) -> None:
        """Store in L1 and, when configured and small enough, in Redis. Never raises for cache trouble."""
        self.l1.put(key, tensors)
        self._count(key, "puts")
        if self.l2 is None:
            return
        # Decide on size before encoding: a too-large GPU value should not even be copied to the host.
        if not self.l2.fits(sum(t.nbytes for t in tensors.values())):
            return
        self.l2.set(key, sign(self.secret, key, encode(tensors, {**(meta or {}), META_KEY: key})))

    def close(self) -> None:
        if self.l2 is not None:
            self.l2.close()

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: per level, per kind ({"vision": {"l1_hits", "l2_hits", "misses", "puts"}}), errors."""
        with self._lock:
            kinds = {kind: dict(counts) for kind, counts in self._kinds.items()}
            corrupt = self.corrupt
            forged = self.forged
        return {
            "l1": self.l1.stats(),
            "l2": self.l2.stats() if self.l2 is not None else None,
            "kinds": kinds,
            "corrupt": corrupt,
            "forged": forged,
        }


def _to(tensors: dict[str, Tensor], device: torch.device | str | None) -> dict[str, Tensor]:
    if device is None:
        return tensors
    return {name: t.to(device) for name, t in tensors.items()}
