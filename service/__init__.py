"""The HTTP service (`qzoom.service`): FastAPI app around one model worker.

    app = create_app()                  # qzoom.service.app; `qzoom serve` runs it under uvicorn (workers=1)

Modules (flat, since the distribution maps only `service/` itself into `qzoom.service`):
- `app`: `create_app(engine_factory, settings)`, lifespan (load, warm up, ready), routers and middleware
- `ask`: `POST /ask` (JSON, multipart, SSE); `images`: `POST /v1/images`, `POST /v1/tools/zoom`;
  `health`: `/healthz`, `/readyz`; `metrics`: `GET /metrics` (Prometheus)
- `page`: the demo page at `GET /` (files in `static/`, package data) that streams `POST /ask` in a browser
- `deps`: service state, the ready worker, API keys; `errors`: the error model and handlers;
  `middleware`: the request body limit (image guards live in `qzoom.guards`, shared with the CLI and MCP)
"""
