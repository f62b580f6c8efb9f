"""The demo page: `GET /` and its assets under `GET /static/{name}`, open without an API key.

The page (`service/static/`, plain HTML/JS/CSS shipped as package data, no build step, nothing fetched from other
hosts) posts an image and a question to `POST /ask` with `Accept: text/event-stream` and draws each step as it
streams: gate score, SD-RPN heatmap and zoom boxes over the image, then the answer, timings and visual tokens. The
calls it makes carry the `X-API-Key` the user typed (kept in the browser's localStorage) when keys are configured.

Only the files present in `static/` at import are served, looked up by bare name (the path parameter cannot hold
`/`), so no request can reach another file. Responses carry a Content-Security-Policy that allows this origin only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from .errors import ApiError

STATIC_DIR = Path(__file__).parent / "static"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

ASSETS: dict[str, Path] = {p.name: p for p in sorted(STATIC_DIR.iterdir()) if p.is_file() and p.suffix in _MEDIA_TYPES}

# Same origin only: the page needs nothing else, and a stray external reference fails loudly instead of leaking.
# blob: and data: images are the user's own picture and the heatmap drawn in the page.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the package: revalidate each load (ETag / Last-Modified make that cheap).
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["demo page"], include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no such file: /static/{name}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)


@router.get("/")
async def index() -> FileResponse:
    """The demo page."""
    return _file("index.html")


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    """A script, stylesheet or icon of the demo page."""
    return _file(name)
