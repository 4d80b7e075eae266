"""Service mode: an HTTP JSON service over a trained model that follows its run as it trains.

    python -m trm.serve runs/tiny                         # a run: newest checkpoint, follows new ones
    python -m trm.serve CHECKPOINT_DIR                    # one checkpoint: runs/tiny/checkpoints/step_N
    python -m trm.serve exports/tiny --port 8080          # an export folder (python -m trm.export)
    python -m trm.train configs/tiny.yaml mode=service    # the config's run_dir, settings from serve.*
    TRM_SERVE_TOKEN=secret python -m trm.serve runs/tiny --host 0.0.0.0

    curl -s localhost:8000/v1/solve -d '{"task": "sudoku", "grid": "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"}'

Pieces: ``tasks`` (grid <-> tokens per task), ``solver`` (a loaded export and its ACT loop),
``follow`` (which model is current; watching a run), ``batching`` (the batching queue), ``app``
(routes, checks, token). Weights come from safetensors only (``trm.export``).

Test: ``pytest tests/test_serve.py``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_ENV = "TRM_SERVE_TOKEN"


class ServeError(RuntimeError):
    """The service cannot start as asked; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """ServeError unless the address is loopback or a bearer token is set."""
    if not is_loopback(host) and not token:
        raise ServeError(
            f"Refusing to listen on {host} without a bearer token: anyone who can reach it could use the model. "
            f"Set a token (--token, or the environment variable TRM_SERVE_TOKEN), or bind to 127.0.0.1."
        )


@dataclass
class Service:
    """A built service: the ASGI app and the parts behind it (tests drive it in a thread)."""

    app: Any
    slot: Any
    batcher: Any

    def close(self) -> None:
        self.batcher.close()
        self.slot.stop()


def build_service(source: str | Path, *, token: str | None = None, device: str = "auto", max_batch: int = 64,
                  batch_wait_ms: float = 5.0, poll_seconds: float = 10.0, max_grids: int = 256,
                  max_body_bytes: int = 4 << 20, kernels: str | None = None, follow_run: bool = False) -> Service:
    """Load the model named by ``source`` (export / checkpoint / run folder) and build the app.
    ``follow_run`` treats ``source`` as a run folder even before it exists (``mode=service``).
    Raises ``trm.serve.follow.ServeError`` when it cannot."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ServeError(f"The service needs FastAPI and uvicorn ({err}); install them with "
                         f"`pip install -e '.[serve]'` (or `pip install fastapi uvicorn`).") from None
    from trm.serve.app import Limits, create_app
    from trm.serve.batching import Batcher
    from trm.serve.follow import ModelSlot
    from trm.serve.solver import pick_device, set_kernels

    if max_batch < 1 or max_grids < 1 or max_body_bytes < 1 or batch_wait_ms < 0 or poll_seconds <= 0:
        raise ServeError("max_batch, max_grids and max_body_bytes must be >= 1, batch_wait_ms >= 0, poll_seconds > 0.")
    try:
        slot = ModelSlot(source, pick_device(device), poll_seconds=poll_seconds, kind="run" if follow_run else None)
        slot.load_initial()
    except ValueError as err:
        raise ServeError(str(err)) from None
    set_kernels(kernels or (slot.current.cfg.kernels if slot.current is not None else "auto"))
    slot.start()
    batcher = Batcher(slot, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000)
    app = create_app(slot, batcher, token=token, limits=Limits(max_body_bytes=max_body_bytes, max_grids=max_grids))
    return Service(app, slot, batcher)


def check_port(host: str, port: int) -> None:
    """ServeError when ``host:port`` cannot be listened on (taken, or not an address of this machine)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]"), port))
    except OSError as err:
        raise ServeError(f"Cannot listen on {host}:{port} ({err.strerror or err}): another program may use the port, "
                         f"or {host} is not an address of this machine. Pick another --port or --host.") from None


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          log_level: str = "info", **options: Any) -> None:
    """Run the service until interrupted (``options``: see ``build_service``)."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    check_bind(host, token)
    check_port(host, port)
    service = build_service(source, token=token, **options)
    try:
        uvicorn.run(service.app, host=host, port=port, log_level=log_level)
    finally:
        service.close()


def serve_config(cfg: Any) -> int:
    """``python -m trm.train CONFIG mode=service``: serve the config's run_dir with its ``serve`` settings."""
    s = cfg.serve
    serve(cfg.run_dir, host=s.host, port=s.port, device=cfg.device, kernels=cfg.kernels, max_batch=s.max_batch,
          batch_wait_ms=s.batch_wait_ms, poll_seconds=s.poll_seconds, max_grids=s.max_grids_per_request,
          max_body_bytes=s.max_body_bytes, follow_run=True)
    return 0
