"""The feature cache: digests, keys, the safetensors codec, the L1 LRU, and L2 against a real `redis-server`.

The Redis tests start private servers on unix sockets (tests/redis_server.py); they skip where the binary is
missing, except in CI (`CI=true` or `QZOOM_REQUIRE_REDIS=1`), where a missing server is a failure.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from qzoom.cache import (
    META_KEY,
    CacheCorrupt,
    FeatureCache,
    L1Cache,
    decode,
    encode,
    feature_key,
    image_digest,
    key_kind,
    pack_prefix,
    unpack_prefix,
)
from qzoom.testing import RedisServer, redis_server_binary

DIGEST = "0123456789abcdef0123456789abcdef"
PARAMS = {"min_pixels": 3136, "max_pixels": 50176, "dtype": "torch.bfloat16"}


def key(kind: str = "vision", n: int = 0, **params: object) -> str:
    return feature_key(kind, "Qwen/Qwen2.5-VL-3B-Instruct", "abc123", {**PARAMS, **params}, f"{n:032x}")


def blob(n_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(n_bytes // 4, generator=g)}


def require_redis() -> None:
    if redis_server_binary() is None:
        message = "redis-server is not installed (`apt-get install redis-server`; .ci/run installs it)"
        if os.environ.get("CI") == "true" or os.environ.get("QZOOM_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server():
    require_redis()
    server = RedisServer(maxmemory="64mb", policy="allkeys-lru").start()
    yield server
    server.stop()


@pytest.fixture
def own_server():
    """A server of the test's own, for tests that kill, pause or fill it."""
    require_redis()
    servers: list[RedisServer] = []

    def start(**kwargs: str) -> RedisServer:
        servers.append(RedisServer(**kwargs).start())
        return servers[-1]

    yield start
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)  # a test that failed while the server was paused
        server.stop()


@pytest.fixture
def flush(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


# -- digests and keys ---------------------------------------------------------------------------------------------


def png(image: Image.Image, level: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=level)
    return out.getvalue()


def test_digest_follows_pixels_not_file_bytes():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB")
    fast, small = png(image, 0), png(image, 9)
    assert fast != small
    a, b = Image.open(io.BytesIO(fast)), Image.open(io.BytesIO(small))
    assert image_digest(a) == image_digest(b) == image_digest(image)
    assert len(image_digest(image)) == 32 and int(image_digest(image), 16) >= 0

    changed = image.copy()
    r, g, bl = changed.getpixel((5, 7))  # type: ignore[misc]
    changed.putpixel((5, 7), (r ^ 1, g, bl))
    assert image_digest(changed) != image_digest(image)

    # Same raw bytes, other geometry or mode: different images.
    flat = Image.frombytes("RGB", (32, 96), image.tobytes())
    assert image_digest(flat) != image_digest(image)
    gray = Image.frombytes("L", (64 * 3, 48), image.tobytes())
    assert image_digest(gray) != image_digest(image)


def test_digest_of_palette_images_sees_the_palette():
    indices = Image.frombytes("P", (8, 8), bytes(range(64)))
    other = indices.copy()
    indices.putpalette([i % 256 for i in range(768)])
    other.putpalette([(i * 7) % 256 for i in range(768)])
    assert indices.tobytes() == other.tobytes()
    assert image_digest(indices) != image_digest(other)


def test_key_has_model_revision_params_and_digest():
    k = key()
    assert k.startswith("qz:v1:vision:Qwen/Qwen2.5-VL-3B-Instruct@abc123:")
    assert k.endswith(":" + f"{0:032x}")
    assert key_kind(k) == "vision" and key_kind("something:else") == "other"
    base = feature_key("vision", "m", "r1", PARAMS, DIGEST)
    variants = [
        feature_key("crop", "m", "r1", PARAMS, DIGEST),
        feature_key("vision", "m2", "r1", PARAMS, DIGEST),
        feature_key("vision", "m", "r2", PARAMS, DIGEST),
        feature_key("vision", "m", "r1", {**PARAMS, "max_pixels": 1}, DIGEST),
        feature_key("vision", "m", "r1", {**PARAMS, "box": [0, 0, 10, 10]}, DIGEST),
        feature_key("vision", "m", "r1", PARAMS, "f" * 32),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert feature_key("vision", "m", "r1", dict(reversed(PARAMS.items())), DIGEST) == base  # order-free
    # Separators in names cannot forge another key's structure.
    odd = feature_key("vision", "a:b@c d", "r:1", PARAMS, DIGEST)
    assert odd.count(":") == base.count(":") and odd.count("@") == 1 and " " not in odd
    with pytest.raises(ValueError, match="digest"):
        feature_key("vision", "m", "r1", PARAMS, "")
    with pytest.raises(ValueError, match="kind"):
        feature_key("vi:sion", "m", "r1", PARAMS, DIGEST)
    with pytest.raises(TypeError, match="JSON"):
        feature_key("vision", "m", "r1", {"dtype": torch.float32}, DIGEST)


# -- codec --------------------------------------------------------------------------------------------------------


def test_codec_round_trip_keeps_dtypes_shapes_and_values():
    base = torch.randn(6, 10)
    tensors = {
        "features": torch.randn(5, 8).to(torch.bfloat16),
        "grid_thw": torch.tensor([1, 4, 6]),
        "half": torch.randn(2, 3, dtype=torch.float16),
        "view": base[:, 2:5],  # non-contiguous, shares storage
        "empty": torch.empty(0, 4),
    }
    with torch.inference_mode():
        data = encode(tensors, {META_KEY: "k1", "model": "m"})
    out = decode(data, {META_KEY: "k1", "model": "m"})
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)


def test_codec_rejects_mismatches_and_garbage():
    data = encode({"features": torch.ones(3)}, {META_KEY: "k1"})
    with pytest.raises(CacheCorrupt, match="key"):
        decode(data, {META_KEY: "k2"})
    for junk in (b"", b"not safetensors at all", b"\xff" * 8 + b"{}", data[: len(data) - 4], b"\x02\0\0\0\0\0\0\0{}"):
        with pytest.raises(CacheCorrupt):
            decode(junk, {META_KEY: "k1"})
    # Well-formed safetensors that this code did not write: no schema, another schema, a forged layout.
    plain = safetensors.torch.save({"features": torch.ones(3)}, metadata={META_KEY: "k1"})
    with pytest.raises(CacheCorrupt, match="schema"):
        decode(plain, {META_KEY: "k1"})
    other = safetensors.torch.save({"features": torch.ones(3)}, metadata={META_KEY: "k1", "qz_schema": "0"})
    with pytest.raises(CacheCorrupt, match="schema"):
        decode(other, {META_KEY: "k1"})
    layout = json.dumps({"features": ["float32", [3]]}, separators=(",", ":"))
    forged = safetensors.torch.save(
        {"features": torch.ones(4)}, metadata={META_KEY: "k1", "qz_schema": "1", "qz_tensors": layout}
    )
    with pytest.raises(CacheCorrupt, match="layout"):
        decode(forged, {META_KEY: "k1"})
    with pytest.raises(ValueError, match="reserved"):
        encode({"x": torch.ones(1)}, {"qz_schema": "9"})


def test_prefix_pack_round_trip():
    kv = [(torch.randn(2, 7, 4), torch.randn(2, 7, 4)) for _ in range(3)]
    hidden = torch.randn(7, 16).to(torch.bfloat16)
    packed = decode(encode(pack_prefix(kv, hidden), {META_KEY: "p"}), {META_KEY: "p"})
    kv2, hidden2 = unpack_prefix(packed)
    assert len(kv2) == 3 and torch.equal(hidden2, hidden)
    for (k, v), (k2, v2) in zip(kv, kv2, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert unpack_prefix(pack_prefix([], torch.empty(0)))[0] == []
    broken = pack_prefix(kv, hidden)
    del broken["v.1"]
    with pytest.raises(CacheCorrupt):
        unpack_prefix(broken)


# -- L1 -----------------------------------------------------------------------------------------------------------


def test_l1_evicts_least_recently_used_within_byte_budget():
    l1 = L1Cache(max_bytes=1200)
    for name in "abc":
        assert l1.put(name, blob(400))
    assert l1.get("a") is not None  # a becomes the most recent: b is now the oldest
    l1.put("d", blob(400))
    assert l1.keys() == {"c", "a", "d"}  # b, the least recently used, went
    l1.put("e", blob(800))  # needs two slots
    assert l1.keys() == {"d", "e"}  # c and a, the oldest two
    assert l1.stats()["bytes"] == 1200 and l1.stats()["evictions"] == 3
    assert not l1.put("huge", blob(1600)) and "huge" not in l1 and l1.keys() == {"d", "e"}
    l1.put("d", blob(40))  # replacing an entry frees its old bytes
    assert l1.stats()["bytes"] == 840
    # A slice of a big buffer is stored compactly, so it is charged (and keeps alive) only its own bytes.
    big = torch.zeros(10_000)
    l1.put("slice", {"features": big[:10]})
    (stored,) = l1.get("slice").values()  # type: ignore[union-attr]
    assert stored.untyped_storage().nbytes() == 40
    assert L1Cache(0).put("x", blob(4)) is False


def test_feature_cache_without_redis_is_l1_only():
    cache = FeatureCache.from_url(None, l1_bytes=1 * 1024 * 1024)
    assert cache.l2 is None
    assert cache.get(key()) is None
    value = {"features": torch.randn(4, 8).to(torch.bfloat16), "grid_thw": torch.tensor([1, 2, 2])}
    cache.put(key(), value, {"model": "m"})
    hit = cache.get(key(), device="cpu")
    assert hit is not None and hit["features"] is value["features"]  # L1 keeps the tensors themselves
    stats = cache.stats()
    assert stats["kinds"]["vision"] == {"misses": 1, "puts": 1, "l1_hits": 1}
    assert stats["l2"] is None


# -- L2 against a real redis-server -------------------------------------------------------------------------------


def test_l2_round_trip_and_second_process(redis_server, flush):
    writer = FeatureCache.from_url(redis_server.url)
    value = {"features": torch.randn(20, 16).to(torch.bfloat16), "grid_thw": torch.tensor([1, 8, 10])}
    writer.put(key("crop", 1, box=[0, 0, 32, 32]), value, {"model": "m"})
    assert flush.exists(key("crop", 1, box=[0, 0, 32, 32]))

    reader = FeatureCache.from_url(redis_server.url)  # another process sharing the Redis: empty L1
    assert reader.get(key("crop", 1, box=[0, 0, 64, 64])) is None  # another box, another entry
    hit = reader.get(key("crop", 1, box=[0, 0, 32, 32]), device="cpu")
    assert hit is not None
    assert hit["features"].dtype == torch.bfloat16 and torch.equal(hit["features"], value["features"])
    assert torch.equal(hit["grid_thw"], value["grid_thw"])
    again = reader.get(key("crop", 1, box=[0, 0, 32, 32]))  # promoted into L1
    assert again is not None and again["features"] is hit["features"]
    stats = reader.stats()
    assert stats["kinds"]["crop"] == {"misses": 1, "l2_hits": 1, "l1_hits": 1}
    assert stats["l2"]["hits"] == 1 and stats["l2"]["bytes_read"] > 640 and stats["l2"]["errors"] == 0

    # The prefix state survives the trip as well.
    kv = [(torch.randn(2, 5, 4), torch.randn(2, 5, 4)) for _ in range(2)]
    writer.put(key("prefix", 1, k=2), pack_prefix(kv, torch.randn(5, 8)))
    kv2, _ = unpack_prefix(reader.get(key("prefix", 1, k=2)) or {})
    assert torch.equal(kv2[1][0], kv[1][0])
    writer.close()
    reader.close()


def test_l2_entries_expire(redis_server, flush):
    cache = FeatureCache.from_url(redis_server.url, l1_bytes=0, ttl_s=30)
    cache.put(key(n=2), blob(64))
    assert 28 <= flush.ttl(key(n=2)) <= 30  # written with EX ttl_s
    assert cache.l2 is not None and cache.l2.set(key(n=3), b"x", ttl_s=1)
    assert flush.ttl(key(n=3)) == 1
    flush.pexpire(key(n=2), 50)  # let Redis expire it for real, without waiting out the TTL
    time.sleep(0.15)
    assert cache.get(key(n=2)) is None
    assert cache.stats()["kinds"]["vision"]["misses"] == 1
    cache.close()


def test_redis_evicts_under_maxmemory(own_server):
    server = own_server(maxmemory="2mb", policy="allkeys-lru")
    cache = FeatureCache.from_url(server.url, l1_bytes=0)
    keys = [key(n=i) for i in range(40)]
    for i, k in enumerate(keys):  # 40 × 128 KiB = 5 MiB through a 2 MiB Redis
        cache.put(k, blob(128 * 1024, seed=i))
    client = server.client()
    assert client.ping()
    assert int(client.info("stats")["evicted_keys"]) > 0
    assert not client.exists(keys[0]) and not client.exists(keys[1])
    assert cache.get(keys[-1]) is not None  # the newest survive and still decode
    assert cache.get(keys[0]) is None
    assert cache.stats()["l2"]["errors"] == 0
    client.close()
    cache.close()


def test_full_redis_without_eviction_fails_open(own_server, caplog):
    server = own_server(maxmemory="2mb", policy="noeviction")
    cache = FeatureCache.from_url(server.url, l1_bytes=0)
    with caplog.at_level(logging.WARNING, logger="qzoom.cache"):
        for i in range(20):  # Redis answers OOM once it is full: counted, logged once, never raised
            cache.put(key(n=i), blob(128 * 1024, seed=i))
    l2 = cache.stats()["l2"]
    assert l2["errors"] > 0 and l2["errors_OutOfMemoryError"] == l2["errors"] and l2["writes"] > 0
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    assert cache.get(key(n=0)) is not None  # reads still work on a full Redis
    cache.close()


def test_values_over_the_size_cap_are_not_written(redis_server, flush):
    cache = FeatureCache.from_url(redis_server.url, max_value_bytes=64 * 1024)
    cache.put(key(n=4), blob(128 * 1024))
    cache.put(key(n=5), blob(16 * 1024))
    assert not flush.exists(key(n=4)) and flush.exists(key(n=5))
    assert cache.get(key(n=4)) is not None  # L1 still has it
    assert cache.stats()["l2"]["skipped_too_large"] == 1
    cache.close()


def test_unreadable_redis_values_are_misses(redis_server, flush):
    cache = FeatureCache.from_url(redis_server.url, l1_bytes=0)
    flush.set(key(n=6), b"\x80\x04pickle? no thanks")
    assert cache.get(key(n=6)) is None
    assert not flush.exists(key(n=6))  # dropped, so the recomputed value can replace it
    cache.put(key(n=7), blob(64))
    flush.copy(key(n=7), key(n=8))  # a valid value under a key it was not written for
    assert cache.get(key(n=8)) is None
    assert cache.get(key(n=7)) is not None
    stats = cache.stats()
    assert stats["corrupt"] == 2 and stats["kinds"]["vision"]["misses"] == 2
    cache.close()


def test_redis_killed_mid_run_then_restarted(own_server, caplog):
    server = own_server()
    cache = FeatureCache.from_url(server.url, l1_bytes=0, retry_after_s=0)
    cache.put(key(n=1), blob(256))
    assert cache.get(key(n=1)) is not None

    server.kill()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="qzoom.cache"):
        for _ in range(5):
            assert cache.get(key(n=1)) is None
            cache.put(key(n=2), blob(256))  # does not raise
    assert time.monotonic() - start < 2.0
    l2 = cache.stats()["l2"]
    assert l2["errors"] == 10 and l2["available"] == 0
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1  # one warning per burst

    server.start()  # same socket, empty server
    assert cache.get(key(n=1)) is None  # reconnects; the data died with the old server
    cache.put(key(n=3), blob(256))
    assert cache.get(key(n=3)) is not None
    assert FeatureCache.from_url(server.url).get(key(n=3)) is not None  # and other processes see it
    assert cache.stats()["l2"]["available"] == 1 and cache.stats()["l2"]["errors"] == 10
    cache.close()


def test_dead_redis_is_left_alone_between_retries(own_server):
    server = own_server()
    cache = FeatureCache.from_url(server.url, l1_bytes=0, retry_after_s=60)
    server.kill()
    for _ in range(4):
        assert cache.get(key()) is None
        cache.put(key(), blob(64))
    l2 = cache.stats()["l2"]
    assert l2["errors"] == 1 and l2["skipped_unavailable"] == 7  # one try, then no network until the pause ends


def test_slow_redis_times_out_into_a_miss(own_server):
    server = own_server()
    cache = FeatureCache.from_url(server.url, l1_bytes=0, socket_timeout_s=0.2, retry_after_s=0)
    cache.put(key(n=1), blob(64))
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # alive but not answering
    try:
        start = time.monotonic()
        assert cache.get(key(n=1)) is None
        assert time.monotonic() - start < 1.5
        assert cache.stats()["l2"]["errors_TimeoutError"] == 1
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert cache.get(key(n=1)) is not None
    cache.close()


def test_unreachable_url_is_not_an_error():
    cache = FeatureCache.from_url("unix:///nonexistent/qzoom-test.sock", retry_after_s=0)
    assert cache.get(key()) is None
    cache.put(key(), blob(64))
    assert cache.get(key()) is not None  # served by L1
    assert cache.stats()["l2"]["errors"] == 2
