"""A reward as an HTTP service, and its client (the paper ran LLaVA on separate GPUs this way).

Server, one command (binds 127.0.0.1 unless ``--host`` says otherwise)::

    python -m diffusion_mdp.rewards.server --reward aesthetic --port 8000

Client: the reward spec ``"http://host:8000"`` (``make_reward``, ``gym.make(..., reward=...)``, the config's
``reward``) builds a :class:`RemoteReward`.

Protocol (stdlib only):

- ``GET /health`` -> ``{"status": "ok", "reward": name}``.
- ``POST /score`` with an ``.npz`` body holding ``images`` (uint8 ``(B, H, W, 3)``) and ``request`` (a JSON
  string ``{"prompts": [...], "metadata": [...]}``) -> JSON ``{"rewards": [B floats], "info": {key: value}}``
  (``info`` values are lists or scalars). A reward that raises answers 500 with ``{"error": message}``.

The client retries connection failures, timeouts and 5xx answers (``retries`` times, with exponential
backoff), then raises :class:`RemoteRewardError` naming the URL and every attempt. It never swallows a
failure: the environment turns it into a ``RewardError``, and the agent keeps its last checkpoint intact.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from diffusion_mdp.rewards import RewardFn, make_reward

MAX_BODY_BYTES = 1 << 30  # 1 GiB: 256 images of 512×512×3 are 200 MB


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or failed, after every retry."""


def encode_request(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> bytes:
    """The ``POST /score`` body: an uncompressed npz (images stay bytes; no base64 inflation)."""
    buffer = io.BytesIO()
    request = json.dumps({"prompts": list(prompts), "metadata": [dict(m) for m in metadata]}, default=str)
    np.savez(buffer, images=np.asarray(images, dtype=np.uint8), request=np.array(request))
    return buffer.getvalue()


def decode_request(body: bytes) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        images = data["images"]
        request = json.loads(str(data["request"]))
    return images, list(request["prompts"]), list(request.get("metadata") or [{} for _ in request["prompts"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):  # torch tensors
        return value.tolist()
    return value


def make_handler(reward_fn: RewardFn, name: str) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving ``reward_fn`` (calls are serialised: one model, one batch at a time)."""
    lock = threading.Lock()

    class RewardHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "reward": name})
            else:
                self._reply(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/score":
                self._reply(404, {"error": f"unknown path {self.path}; use POST /score"})
                return
            length = int(self.headers.get("Content-Length", 0))
            if not 0 < length <= MAX_BODY_BYTES:
                self._reply(413, {"error": f"body of {length} bytes; expected 1..{MAX_BODY_BYTES}"})
                return
            try:
                images, prompts, metadata = decode_request(self.rfile.read(length))
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
    reward: str | RewardFn, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False, **reward_kwargs: Any
) -> ThreadingHTTPServer:
    """Build (not start) a threaded server for ``reward``; call ``serve_forever()`` or run it in a thread.

    ``port=0`` picks a free port (read it from ``server.server_address``).
    """
    name = reward if isinstance(reward, str) else getattr(reward, "__name__", type(reward).__name__)
    reward_fn = make_reward(reward, **reward_kwargs)
    server = ThreadingHTTPServer((host, port), make_handler(reward_fn, str(name)))
    server.daemon_threads = True
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


class RemoteReward:
    """A reward computed by a server started with ``python -m diffusion_mdp.rewards.server``.

    Args:
        url: Base URL, e.g. ``"http://gpu-node:8000"`` (``/score`` is appended).
        timeout: Seconds per attempt (a VLM on 256 images may need minutes: raise it).
        retries: Attempts after the first one, for connection errors, timeouts and 5xx answers.
        backoff: Seconds before the first retry, doubled each time.
    """

    def __init__(self, url: str, timeout: float = 600.0, retries: int = 3, backoff: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.__name__ = self.url

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        body = encode_request(images, prompts, metadata)
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.url}/score", data=body, method="POST", headers={"Content-Type": "application/x-npz"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return np.asarray(payload["rewards"], dtype=np.float64), dict(payload.get("info", {}))
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                errors.append(f"attempt {attempt + 1}: HTTP {exc.code} {detail}")
                if exc.code < 500:  # the request itself is wrong: retrying cannot help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                errors.append(f"attempt {attempt + 1}: {type(exc).__name__}: {getattr(exc, 'reason', exc)}")
        raise RemoteRewardError(
            f"reward server {self.url}/score failed after {len(errors)} attempt(s) "
            f"(timeout {self.timeout:g}s each): " + "; ".join(errors)
        )

    def health(self) -> dict[str, Any]:
        """``GET /health`` (raises ``urllib.error.URLError`` when unreachable)."""
        with urllib.request.urlopen(f"{self.url}/health", timeout=min(self.timeout, 10.0)) as response:
            return dict(json.loads(response.read()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a registered reward over HTTP (POST /score, GET /health).")
    parser.add_argument("--reward", required=True, help="registered reward name, e.g. aesthetic")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it on the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="device of the reward model (default: cuda if available)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    kwargs = {"device": args.device} if args.device else {}
    server = serve(args.reward, args.host, args.port, args.verbose, **kwargs)
    host, port = server.server_address[:2]
    print(f"serving reward {args.reward!r} on http://{host}:{port} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()


__all__ = ["RemoteReward", "RemoteRewardError", "decode_request", "encode_request", "main", "serve"]
