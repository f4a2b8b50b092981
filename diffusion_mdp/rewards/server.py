"""A reward as an HTTP service, and its client (the paper ran LLaVA on separate GPUs this way).

Server, one command (binds 127.0.0.1 unless ``--host`` says otherwise)::

    python -m diffusion_mdp.rewards.server --reward aesthetic --port 8000
    DIFFUSION_MDP_REWARD_TOKEN=s3cret python -m diffusion_mdp.rewards.server --reward aesthetic --host 0.0.0.0

Binding beyond loopback (``--host 0.0.0.0``, a LAN address) requires a shared-secret token (``--token`` or
``$DIFFUSION_MDP_REWARD_TOKEN``): every request must then carry ``Authorization: Bearer <token>`` (the
client sends it from the config's ``reward_token``, ``--reward-token``, or the same environment variable).
Requests are limited in size (``--max-request-mb``, 256 MB by default) before anything is read or decoded.

Client: the reward spec ``"http://host:8000"`` (``make_reward``, ``gym.make(..., reward=...)``, the config's
``reward``) builds a :class:`RemoteReward`.

Protocol (stdlib only):

- ``GET /health`` -> ``{"status": "ok", "reward": name}``.
- ``POST /score`` with an ``.npz`` body holding ``images`` (uint8 ``(B, H, W, 3)``) and ``request`` (a JSON
  string ``{"prompts": [...], "metadata": [...]}``) -> JSON ``{"rewards": [B floats], "info": {key: value}}``
  (``info`` values are lists or scalars). A reward that raises answers 500 with ``{"error": message}``.

The client retries connection failures, timeouts and 5xx answers (``retries`` times, with exponential
backoff), then raises :class:`RemoteRewardError` naming the URL and every attempt. The defaults (60 s per
attempt, 2 retries) notice a stalled server within minutes; while it waits, it prints a line every
``progress_every`` seconds. It never swallows a failure: the environment turns it into a ``RewardError``,
and the agent keeps its last checkpoint intact.
"""

from __future__ import annotations

import argparse
import hmac
import io
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from diffusion_mdp.rewards import RewardFn, make_reward

MAX_BODY_BYTES = 256 << 20  # 256 MB: 256 images of 512×512×3 are 200 MB; one sample batch is far smaller
TOKEN_ENV = "DIFFUSION_MDP_REWARD_TOKEN"
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 2


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or failed, after every retry."""


def encode_request(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> bytes:
    """The ``POST /score`` body: an uncompressed npz (images stay bytes; no base64 inflation)."""
    buffer = io.BytesIO()
    request = json.dumps({"prompts": list(prompts), "metadata": [dict(m) for m in metadata]}, default=str)
    np.savez(buffer, images=np.asarray(images, dtype=np.uint8), request=np.array(request))
    return buffer.getvalue()


def decode_request(
    body: bytes, max_bytes: int = MAX_BODY_BYTES
) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """Parse a ``POST /score`` body without pickle; members inflating past ``max_bytes`` are refused unread."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:  # a compressed npz could expand far beyond its body
        inflated = sum(info.file_size for info in archive.infolist())
    if inflated > max_bytes:
        raise ValueError(f"the request's arrays hold {inflated} bytes; the limit is {max_bytes}")
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        images = data["images"]
        request = json.loads(str(data["request"]))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    prompts = list(request["prompts"])
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return images, prompts, list(request.get("metadata") or [{} for _ in prompts])


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the server to this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: what it resolves to decides
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):  # torch tensors
        return value.tolist()
    return value


def make_handler(
    reward_fn: RewardFn, name: str, token: str | None = None, max_bytes: int = MAX_BODY_BYTES
) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving ``reward_fn`` (calls are serialised: one model, one batch at a time).

    With ``token``, requests without ``Authorization: Bearer <token>`` get 401 and nothing is read.
    """
    lock = threading.Lock()
    expected = f"Bearer {token}".encode() if token else None

    class RewardHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120  # seconds a client may take to send its request: a stalled client frees its thread

        def _authorized(self) -> bool:
            if expected is None:
                return True
            given = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(given, expected):  # constant time: the token cannot be guessed byte by byte
                return True
            self.close_connection = True
            self._reply(401, {"error": "missing or wrong token: send Authorization: Bearer <token>"})
            return False

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nobody to answer
                self.close_connection = True
                if getattr(self.server, "verbose", False):
                    self.log_message("client %s left before the answer (HTTP %d)", self.client_address[0], code)

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "reward": name})
            else:
                self._reply(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/score":
                self._reply(404, {"error": f"unknown path {self.path}; use POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
            except ValueError:
                length = -1
            if not 0 < length <= max_bytes:
                self.close_connection = True  # the body is not read: the connection cannot be reused
                self._reply(413, {"error": f"body of {length} bytes; expected 1..{max_bytes} (--max-request-mb)"})
                return
            try:
                images, prompts, metadata = decode_request(self.rfile.read(length), max_bytes)
            except Exception as exc:  # a malformed request is the client's fault: 400, not a crash
                self._reply(400, {"error": f"bad request body: {type(exc).__name__}: {exc}"})
                return
            try:
                with lock:
                    rewards, info = reward_fn(images, prompts, metadata)
            except Exception as exc:
                self._reply(500, {"error": f"reward {name!r} raised {type(exc).__name__}: {exc}"})
                return
            payload = {
                "rewards": np.asarray(rewards, dtype=np.float64).reshape(-1).tolist(),
                "info": {key: _jsonable(value) for key, value in dict(info).items()},
            }
            self._reply(200, payload)

        def log_message(self, format: str, *args: Any) -> None:  # quiet unless --verbose
            if getattr(self.server, "verbose", False):
                super().log_message(format, *args)

    return RewardHandler


def serve(
    reward: str | RewardFn,
    host: str = "127.0.0.1",
    port: int = 8000,
    verbose: bool = False,
    token: str | None = None,
    max_request_bytes: int = MAX_BODY_BYTES,
    **reward_kwargs: Any,
) -> ThreadingHTTPServer:
    """Build (not start) a threaded server for ``reward``; call ``serve_forever()`` or run it in a thread.

    ``port=0`` picks a free port (read it from ``server.server_address``).

    Args:
        token: Shared secret every request must carry (``Authorization: Bearer <token>``); None reads
            ``$DIFFUSION_MDP_REWARD_TOKEN``. Required when ``host`` is not a loopback address.
        max_request_bytes: Largest accepted request body (and the largest its arrays may inflate to).

    Raises:
        ValueError: ``host`` reaches beyond this machine and no token is set, or a limit that is not positive.
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if not token and not is_loopback(host):
        raise ValueError(
            f"binding {host!r} exposes the reward (and its GPU) to the network: set a shared secret with "
            f"--token <secret> (or ${TOKEN_ENV}) and give the same reward_token to the client, or bind 127.0.0.1"
        )
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    name = reward if isinstance(reward, str) else getattr(reward, "__name__", type(reward).__name__)
    reward_fn = make_reward(reward, **reward_kwargs)
    server = ThreadingHTTPServer((host, port), make_handler(reward_fn, str(name), token, max_request_bytes))
    server.daemon_threads = True
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


class RemoteReward:
    """A reward computed by a server started with ``python -m diffusion_mdp.rewards.server``.

    Args:
        url: Base URL, e.g. ``"http://gpu-node:8000"`` (``/score`` is appended).
        timeout: Seconds per attempt (a VLM on a large batch may need minutes: raise it).
        retries: Attempts after the first one, for connection errors, timeouts and 5xx answers.
        backoff: Seconds before the first retry, doubled each time.
        token: The server's shared secret (``--token``); None or '' reads ``$DIFFUSION_MDP_REWARD_TOKEN``.
        progress_every: While an answer is awaited, print a line to stderr every this many seconds (0: never).

    Raises:
        ValueError: A timeout that is not positive or finite, negative retries or backoff.
    """

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 1.0,
        token: str | None = None,
        progress_every: float = 15.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        if not 0 < self.timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if self.retries < 0 or self.backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got retries={retries!r}, backoff={backoff!r}")
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.progress_every = float(progress_every)
        self.__name__ = self.url

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = dict(extra)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _progress(self, attempt: int, started: float, done: threading.Event) -> None:
        """Print how long the server has been busy, every ``progress_every`` s until ``done`` (a thread)."""
        while not done.wait(self.progress_every):
            print(
                f"waiting for reward server {self.url}: {time.monotonic() - started:.0f}s of {self.timeout:g}s "
                f"(attempt {attempt + 1}/{self.retries + 1})",
                file=sys.stderr,
                flush=True,
            )

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        body = encode_request(images, prompts, metadata)
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.url}/score",
                data=body,
                method="POST",
                headers=self._headers(**{"Content-Type": "application/x-npz"}),
            )
            done = threading.Event()
            if self.progress_every > 0:
                threading.Thread(
                    target=self._progress, args=(attempt, time.monotonic(), done), daemon=True
                ).start()
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return np.asarray(payload["rewards"], dtype=np.float64), dict(payload.get("info", {}))
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                errors.append(f"attempt {attempt + 1}: HTTP {exc.code} {detail}")
                if exc.code == 401:
                    errors.append(f"set reward_token (--reward-token or ${TOKEN_ENV}) to the server's --token")
                if exc.code < 500:  # the request itself is wrong: retrying cannot help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                errors.append(f"attempt {attempt + 1}: {type(exc).__name__}: {getattr(exc, 'reason', exc)}")
            finally:
                done.set()
        raise RemoteRewardError(
            f"reward server {self.url}/score failed after {len(errors)} attempt(s) "
            f"(timeout {self.timeout:g}s each; raise reward_timeout / reward_retries if the server is just slow): "
            + "; ".join(errors)
        )

    def health(self) -> dict[str, Any]:
        """``GET /health`` (raises ``urllib.error.URLError`` when unreachable)."""
        request = urllib.request.Request(f"{self.url}/health", headers=self._headers())
        with urllib.request.urlopen(request, timeout=min(self.timeout, 10.0)) as response:
            return dict(json.loads(response.read()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve a registered reward over HTTP (POST /score, GET /health).", allow_abbrev=False
    )
    parser.add_argument("--reward", required=True, help="registered reward name, e.g. aesthetic")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (anything beyond loopback requires --token)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="device of the reward model (default: cuda if available)")
    parser.add_argument(
        "--token", default=None, help=f"shared secret clients must send (default: ${TOKEN_ENV}; none on loopback)"
    )
    parser.add_argument(
        "--max-request-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest accepted request, in MB"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if not 0 < args.max_request_mb < float("inf"):
        parser.error(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    kwargs = {"device": args.device} if args.device else {}
    try:
        server = serve(
            args.reward, args.host, args.port, args.verbose, args.token, int(args.max_request_mb * 2**20), **kwargs
        )
    except ValueError as exc:
        parser.error(str(exc))
    host, port = server.server_address[:2]
    secured = "token required" if (args.token or os.environ.get(TOKEN_ENV)) else "no token, loopback only"
    print(f"serving reward {args.reward!r} on http://{host}:{port} (POST /score, GET /health; {secured})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()


__all__ = ["RemoteReward", "RemoteRewardError", "decode_request", "encode_request", "is_loopback", "main", "serve"]
