"""The docker compose stack and the Dockerfile, checked without a Docker engine (none runs on our machines or in CI).

1. The compose file's invariants: profiles (a plain `docker compose up` starts the stack the `.env` names), the
   NVIDIA reservation, healthchecks on /readyz and `redis-cli ping`, `depends_on: service_healthy`, a bounded
   no-persistence Redis, the model volume, `HF_HUB_OFFLINE=1`, every setting passed through from `.env`
   (`env_file`), and only settings that qzoom actually reads.
2. The Dockerfile agrees with the project: it copies every folder the package maps, pins the same torch, serves with
   the same command as compose, and checks health on /readyz.
3. The Dockerfile's serve command, run as a subprocess outside Docker with the CPU service's environment (Redis
   pointed at a private server), becomes ready, passes the image's own HEALTHCHECK command, answers `POST /ask`,
   fills the Redis cache, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from qzoom.settings import Settings
from qzoom.testing import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
QZOOM_SERVICES = ("qzoom-gpu", "qzoom-cpu")


# QZOOM_* names that the compose file itself reads (the host port, Redis' memory bound); qzoom ignores them.
COMPOSE_ONLY = {"QZOOM_PORT", "QZOOM_REDIS_MAXMEMORY"}


def dotenv(commented: bool = False) -> dict[str, str]:
    """The `.env` file's variables; with ``commented``, also the examples written as `# NAME=value` lines."""
    pairs = {}
    for line in (ROOT / ".env").read_text().splitlines():
        line = line.strip()
        if commented and re.match(r"#\s*[A-Z][A-Z0-9_]*=", line):
            line = line.lstrip("#").strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def container_env(svc: dict[str, Any]) -> dict[str, str]:
    """What compose gives the container: the `env_file` (.env) first, `environment` over it."""
    env: dict[str, str] = {}
    for entry in svc.get("env_file", []):
        path = entry["path"] if isinstance(entry, dict) else entry
        assert path == ".env", path
        env |= dotenv()
    return env | {k: str(v) for k, v in svc["environment"].items()}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}` / `${VAR:-default}` substitution, enough for our file (it uses nothing else)."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(3)
            if name in env and (env[name] or default is None):
                return env[name]
            assert default is not None, f"${{{name}}} has no default and is not set in .env"
            return default

        return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # safe_load resolves the `<<` merge keys of the x-* anchors, as compose does.
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return interpolate(raw, dotenv())


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_cmd() -> list[str]:
    [cmd] = [json.loads(rest) for word, rest in dockerfile_instructions() if word == "CMD"]
    return cmd


def dockerfile_healthcheck() -> list[str]:
    [rest] = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    return json.loads(rest[rest.index("CMD") + 3 :])


# ---------------------------------------------------------------------------------------------------------------------
# 1. compose invariants


def test_a_plain_compose_up_starts_a_stack(compose):
    profiles = dotenv()["COMPOSE_PROFILES"].split(",")
    assert profiles == ["gpu"]
    started = [
        name
        for name, svc in compose["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    ]
    assert "redis" in started and "qzoom-gpu" in started and "qzoom-cpu" not in started
    assert compose["services"]["qzoom-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in compose["services"]["redis"]  # Redis starts with either profile


def test_redis_is_a_bounded_cache_that_persists_nothing(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1] >= "7"
    args = redis["command"]
    assert args[0] == "redis-server"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert re.fullmatch(r"\d+[kmg]b", options["--maxmemory"]), options["--maxmemory"]
    assert options["--maxmemory-policy"] == "allkeys-lru"
    assert options["--save"] == "" and options["--appendonly"] == "no"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_gpu_service_reserves_an_nvidia_gpu(compose):
    svc = compose["services"]["qzoom-gpu"]
    [device] = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == "all" or int(device["count"]) >= 1
    assert svc["environment"]["QZOOM_DEVICE"] == "cuda" and svc["build"]["args"]["VARIANT"] == "cuda"


def test_cpu_service_runs_the_demo_model_on_the_cpu(compose):
    svc = compose["services"]["qzoom-cpu"]
    assert "deploy" not in svc
    assert svc["environment"]["QZOOM_DEVICE"] == "cpu" and svc["build"]["args"]["VARIANT"] == "cpu"
    assert "QZOOM_MODEL" not in container_env(svc)  # unset: the demo model shipped in the package


@pytest.mark.parametrize("name", QZOOM_SERVICES)
def test_qzoom_services_wait_for_redis_and_report_readiness(compose, name):
    svc = compose["services"][name]
    assert svc["depends_on"] == {"redis": {"condition": "service_healthy"}}
    check = svc["healthcheck"]
    assert check["test"][0] == "CMD" and check["test"][1:] == dockerfile_healthcheck()
    assert "/readyz" in " ".join(check["test"])
    assert int(check["start_period"].rstrip("s")) >= 300  # a real checkpoint takes minutes to load and warm up
    assert svc["command"] == dockerfile_cmd()
    assert svc["ports"] == ["8000:8000"]


@pytest.mark.parametrize("name", QZOOM_SERVICES)
def test_qzoom_services_are_offline_with_a_model_volume_and_known_settings(compose, name):
    svc = compose["services"][name]
    env = svc["environment"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "models:/models" in svc["volumes"] and "models" in compose["volumes"]
    assert env["HF_HOME"].startswith("/models/")
    # The cache points at the compose Redis service, by its service name.
    assert httpx.URL(env["QZOOM_REDIS_URL"]).host in compose["services"]
    # Every QZOOM_* variable is a setting qzoom reads: a typo here would be silently ignored by pydantic-settings.
    known = {f"QZOOM_{field.upper()}" for field in Settings.model_fields}
    assert {k for k in env if k.startswith("QZOOM_")} <= known


@pytest.mark.parametrize("name", QZOOM_SERVICES)
def test_every_setting_in_dotenv_reaches_the_service(compose, name):
    svc = compose["services"][name]
    assert svc["env_file"] == [{"path": ".env", "required": False}]  # optional: a clone without .env still starts
    env = container_env(svc)
    assert env["COMPOSE_PROFILES"] == dotenv()["COMPOSE_PROFILES"]  # the whole file, not a chosen few
    # Compose sets only what it owns (its Redis, the profile's device); the rest is the operator's, from .env.
    assert {k for k in svc["environment"] if k.startswith("QZOOM_")} == {"QZOOM_REDIS_URL", "QZOOM_DEVICE"}
    # The examples in .env are settings qzoom reads (or names the compose file itself reads), and they parse.
    examples = {k: v for k, v in dotenv(commented=True).items() if k.startswith("QZOOM_")}
    known = {f"QZOOM_{field.upper()}" for field in Settings.model_fields}
    assert set(examples) - COMPOSE_ONLY <= known
    assert {"QZOOM_MAX_PENDING", "QZOOM_IMAGE_URLS", "QZOOM_MCP_ALLOWED_HOSTS"} <= set(examples)
    settings = Settings(**{k.removeprefix("QZOOM_").lower(): v for k, v in examples.items() if k not in COMPOSE_ONLY})
    assert settings.max_pending == int(examples["QZOOM_MAX_PENDING"])


def test_deploy_doc_names_every_setting_and_the_gpu_prerequisite():
    text = (ROOT / "docs" / "deploy.md").read_text()
    missing = [f"QZOOM_{field.upper()}" for field in Settings.model_fields if f"`QZOOM_{field.upper()}`" not in text]
    assert not missing, f"docs/deploy.md's settings table lacks {missing}"
    assert "NVIDIA Container Toolkit" in text and "COMPOSE_PROFILES=cpu" in text


# ---------------------------------------------------------------------------------------------------------------------
# 2. Dockerfile agrees with the project


def test_dockerfile_copies_every_mapped_folder_and_pins_torch_like_the_project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    copied = {rest.split()[0] for word, rest in dockerfile_instructions() if word == "COPY"}
    assert folders <= copied, f"the image would miss {folders - copied}"
    [torch_pin] = [d for d in project["project"]["dependencies"] if d.startswith("torch==")]
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert runs.count(torch_pin) == 2  # both variants
    assert "pip install ." in runs
    envs = " ".join(rest for word, rest in dockerfile_instructions() if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in envs
    assert any(word == "USER" and rest != "root" for word, rest in dockerfile_instructions())


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git"} <= ignored


# ---------------------------------------------------------------------------------------------------------------------
# 3. The image's serve command, outside Docker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_port(argv: list[str], port: int) -> list[str]:
    """The same command on another port (8000 may be taken on a developer's machine)."""
    return [a.replace("8000", str(port)) if "8000" in a else a for a in argv]


@pytest.mark.slow
def test_the_images_serve_command_serves_outside_docker(compose, redis_server, tmp_path):
    port = free_port()
    env = container_env(compose["services"]["qzoom-cpu"])
    env |= {"QZOOM_REDIS_URL": redis_server.url, "HF_HOME": str(tmp_path / "hf")}
    # A tiny random checkpoint keeps this test about the command, not the model (any checkpoint dir serves alike).
    subprocess.run([sys.executable, "-m", "qzoom.cli", "init-tiny", str(tmp_path / "tiny")], check=True)
    env["QZOOM_MODEL"] = str(tmp_path / "tiny")
    cmd = with_port(dockerfile_cmd(), port)
    cmd[0] = str(Path(sys.executable).with_name(cmd[0]))  # the console script of this environment
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)

        health = subprocess.run(with_port(dockerfile_healthcheck(), port), capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr.decode()

        buf = io.BytesIO()
        Image.new("RGB", (640, 480), (30, 120, 200)).save(buf, format="PNG")
        resp = httpx.post(
            f"{base}/ask",
            files={"image": ("blue.png", buf.getvalue(), "image/png")},
            data={"query": "What colour is the picture?", "max_new_tokens": "4"},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert isinstance(body["answer"], str) and body["visual_tokens"] > 0
        # The coarse features went to the compose Redis (here: the private server standing in for it).
        assert redis_server.client().dbsize() > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says what stopped it.
    assert rc in (0, -signal.SIGTERM), f"`{shlex.join(cmd)}` exited with {rc}:\n{log.read_text()[-2000:]}"
    assert "Application shutdown complete" in log.read_text()
