"""A private, throwaway `redis-server` for tests and benchmarks: unix socket in a temp dir, no TCP, no persistence.

    server = RedisServer(maxmemory="2mb", policy="allkeys-lru").start()
    url = server.url                 # unix:///tmp/qzr-.../redis.sock
    server.kill(); server.start()    # SIGKILL mid-run, then a fresh (empty) server on the same socket
    server.stop()                    # SIGTERM and remove the temp dir

`--port 0` turns TCP off, so nothing collides with a Redis already running on the machine (there is one on 6379
on ours) and nothing leaves the process's user. The socket lives under /tmp with a short name because unix socket
paths are limited to ~107 bytes and pytest's tmp_path can be longer.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def die_with_parent() -> None:
    """`preexec_fn` for helper servers: SIGTERM the child when its parent dies, so none outlives a crashed run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServer:
    def __init__(self, *, maxmemory: str | None = None, policy: str | None = None, binary: str | None = None) -> None:
        found = binary or redis_server_binary()
        if found is None:
            raise FileNotFoundError("redis-server not found on PATH")
        self.binary = found
        self.maxmemory = maxmemory
        self.policy = policy
        self.dir = Path(tempfile.mkdtemp(prefix="qzr-"))
        self.socket = self.dir / "redis.sock"
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def argv(self) -> list[str]:
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory]
        if self.policy is not None:
            args += ["--maxmemory-policy", self.policy]
        return args

    def client(self) -> redis.Redis:
        """A plain client for checks from the test side (binary values, generous timeout)."""
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start (or start again, on the same socket) and return once PING answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self._log_tail()}")
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"redis-server did not answer PING in {timeout_s} s:\n{self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, the socket file may stay behind (a restart replaces it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Clean shutdown and removal of the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"
