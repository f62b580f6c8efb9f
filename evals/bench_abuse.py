"""The hostile set, replayed against a real `qzoom serve` on the demo model: 5xx count, peak RSS, worst cost ratio.

    qzoom bench abuse [--bombs 8] [--repeats 3]

A `qzoom serve` subprocess (the shipped demo model, default settings, no Redis) on a loopback port receives:
1. malformed bodies on every JSON route: JSON nested 1,100 levels deep, an unpaired surrogate, UTF-16, invalid
   UTF-8, NaN; a blank question; a text file posing as a PNG; a 99-byte PNG claiming 40000x40000 pixels;
2. `--bombs` concurrent 99-byte PNGs claiming 6000x6000 pixels (each decodes to ~216 MB), twice;
3. the costliest request of the report (forced zoom, 8 steps, 8 boxes, τ_roi 0, 1024 new tokens), now refused;
4. the costliest requests the default caps still admit, timed against a default request on the same picture
   (median of `--repeats`, alternating).

Printed: the status counts, the number of 5xx answers that are not a 503 (target 0: overload is the only 5xx), the
server's peak RSS over its ready baseline (read from /proc: VmHWM after resetting it via clear_refs, else sampled)
against the documented bound (`QZOOM_BUDGET_DECODE_MB` plus the decoded images in flight), and each admitted costly
request's wall-time ratio and estimated token-step ratio against the default request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from qzoom.evals.bench_http import _Server
from qzoom.evals.synthetic import generate_item
from qzoom.settings import Settings

MiB = 1 << 20
DEEP = b'{"a":' * 1100 + b"1" + b"}" * 1100
JSON_ROUTES = ("/ask", "/v1/tools/gate", "/v1/tools/propose", "/v1/tools/zoom", "/v1/think")


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels over a few bytes of zeros (~99 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakRss:
    """The peak resident set of a process from now on: the kernel's VmHWM after a reset, and samples every 5 ms
    (the larger of the two; either alone where the other is unavailable)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = _rss_kb(pid, "VmRSS")
        self.sampled = self.baseline
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.kernel = True
        except OSError:
            self.kernel = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _rss_kb(self.pid, "VmRSS"))

    def over_baseline_mb(self) -> float:
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled, _rss_kb(self.pid, "VmHWM") if self.kernel else 0)
        return (peak - self.baseline) / 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _post(client: httpx.AsyncClient, path: str, **kw: Any) -> httpx.Response:
    return await client.post(path, **kw)


async def _hostile(client: httpx.AsyncClient, picture: bytes) -> list[tuple[str, int]]:
    """Step 1: malformed bodies and images; (what, status) per request."""
    out: list[tuple[str, int]] = []
    bodies = {
        "deep JSON": DEEP,
        "lone surrogate": b'{"query": "\\ud800", "image": "x"}',
        "UTF-16": '{"query": "q"}'.encode("utf-16"),
        "bad UTF-8": b'{"query": "\xff\xfe"}',
        "NaN": b'{"query": NaN}',
    }
    for name, body in bodies.items():
        for route in JSON_ROUTES:
            r = await _post(client, route, content=body, headers={"content-type": "application/json"})
            out.append((f"{name} {route}", r.status_code))
    image = _b64(picture)
    out.append(("blank query", (await _post(client, "/ask", json={"image": image, "query": "  "})).status_code))
    files = {"image": ("x.png", b"hello, not a png", "image/png")}
    out.append(("text as PNG", (await _post(client, "/ask", files=files, data={"query": "q"})).status_code))
    huge = {"image": _b64(bomb_png(40000, 40000)), "query": "q"}
    out.append(("40000x40000 PNG", (await _post(client, "/ask", json=huge)).status_code))
    report_170x = {"image": image, "query": "q", "force_zoom": True, "max_steps": 8, "max_boxes": 8,
                   "box_mode": "components", "roi_thresh": 0, "max_new_tokens": 1024}  # fmt: skip
    out.append(("170x request of the report", (await _post(client, "/ask", json=report_170x)).status_code))
    dup = [("X-API-Key", "a"), ("X-API-Key", "b")]
    out.append(
        (
            "duplicate X-API-Key",
            (await _post(client, "/ask", json={"image": image, "query": "q"}, headers=dup)).status_code,
        )
    )
    url = {"image_url": "http://127.0.0.1:1/x.png", "query": "q"}
    out.append(("image_url to loopback", (await _post(client, "/ask", json=url)).status_code))
    return out


async def _bombs(client: httpx.AsyncClient, n: int) -> list[tuple[str, int]]:
    """Step 2: n concurrent 6000x6000 pixel bombs."""
    body = {"image": _b64(bomb_png(6000, 6000)), "query": "what is this?", "max_new_tokens": 1}
    rs = await asyncio.gather(*(_post(client, "/ask", json=body) for _ in range(n)))
    return [("6000x6000 bomb", r.status_code) for r in rs]


def run_abuse_benchmark(*, bombs: int = 8, repeats: int = 3, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Replay the hostile set against `qzoom serve` on the demo model; print and return the figures."""
    from qzoom.admission import CostModel
    from qzoom.engine import QZoomEngine
    from qzoom.schemas import AskOptions

    settings = Settings()
    model_dir = Path(settings.model_dir())
    item = generate_item("test", 0, seed=0)
    buf = io.BytesIO()
    item.image.convert("RGB").save(buf, format="PNG")
    picture = buf.getvalue()
    # The same cost model the server uses, on the same checkpoint, for the estimated ratios.
    costs = CostModel.for_engine(QZoomEngine.from_pretrained(model_dir), settings)
    default = costs.default_ask()

    server = _Server(model_dir, Settings(max_pending=settings.max_pending, max_batch=settings.max_batch))
    results: dict[str, Any] = {}
    try:
        server.wait_ready()

        async def main() -> None:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
                # Warm the answer path before the baseline is read.
                await _post(client, "/ask", json={"image": _b64(picture), "query": item.question})
                peak = PeakRss(server.proc.pid)
                statuses = await _hostile(client, picture)
                statuses += await _bombs(client, bombs)
                statuses += await _bombs(client, bombs)
                results["peak_rss_over_baseline_mb"] = peak.over_baseline_mb()
                results["baseline_rss_mb"] = peak.baseline / 1024
                results["statuses"] = statuses
                results["costly"] = await _costly(client, picture, item.question, repeats)

        asyncio.run(main())
    finally:
        server.stop()

    counts = Counter(status for _, status in results["statuses"])
    five = [(what, s) for what, s in results["statuses"] if s >= 500 and s != 503]
    echo(f"hostile requests: {len(results['statuses'])}; statuses: {dict(sorted(counts.items()))}")
    for what, status in results["statuses"]:
        if status >= 500:
            echo(f"  {status} {what}")
    echo(f"5xx other than 503 (overload): {len(five)}")
    bound = settings.budget_decode_mb
    echo(
        f"peak RSS over the ready baseline ({results['baseline_rss_mb']:.0f} MB): "
        f"{results['peak_rss_over_baseline_mb']:.0f} MB with {bombs} concurrent 6000x6000 bombs, twice "
        f"(image budget QZOOM_BUDGET_DECODE_MB = {bound:g} MB)"
    )
    echo(f"default request: {default.token_steps} token-steps estimated ({default.visual_tokens} visual tokens)")
    worst = 1.0
    for name, (ratio, options) in results["costly"].items():
        est = costs.ask((item.image.width, item.image.height), 0, AskOptions(**options)).token_steps
        echo(f"  {name}: {ratio:.1f}x the default's wall time; estimated {est / default.token_steps:.1f}x")
        worst = max(worst, ratio)
    echo(f"worst admitted request: {worst:.1f}x a default request's wall time")
    results["five_xx"] = len(five)
    results["worst_ratio"] = worst
    return results


COSTLY: dict[str, dict[str, Any]] = {
    "256 new tokens": {"max_new_tokens": 256},
    "4 zoom steps, τ_roi 0": {"force_zoom": True, "max_steps": 4, "max_boxes": 1, "roi_thresh": 0.0},
    "2 steps x 2 boxes best, 256 tokens": {
        "force_zoom": True,
        "max_steps": 2,
        "max_boxes": 2,
        "box_mode": "components",
        "multi_box": "best",
        "roi_thresh": 0.0,
        "max_new_tokens": 256,
    },
    "4 boxes best, 256 tokens": {
        "force_zoom": True,
        "max_steps": 1,
        "max_boxes": 4,
        "box_mode": "components",
        "multi_box": "best",
        "roi_thresh": 0.0,
        "max_new_tokens": 256,
    },
    "visual-token cap (819 per view x 5)": {
        "force_zoom": True,
        "max_steps": 4,
        "max_boxes": 1,
        "roi_thresh": 0.0,
        "max_pixels": 819 * 784,
        "min_pixels": 784,
    },
}


async def _costly(
    client: httpx.AsyncClient, picture: bytes, question: str, repeats: int
) -> dict[str, tuple[float, dict[str, Any]]]:
    """Step 4: each costly-but-admitted request's median wall time over the default's, alternating."""
    image = _b64(picture)

    async def timed(options: dict[str, Any]) -> float:
        start = time.perf_counter()
        r = await _post(client, "/ask", json={"image": image, "query": question, **options})
        if r.status_code != 200:
            raise RuntimeError(f"{options} was answered {r.status_code}: {r.text[:300]}")
        return time.perf_counter() - start

    out: dict[str, tuple[float, dict[str, Any]]] = {}
    for name, options in COSTLY.items():
        base, costly = [], []
        for _ in range(repeats):
            base.append(await timed({}))
            costly.append(await timed(options))
        out[name] = (statistics.median(costly) / statistics.median(base), options)
    return out
