"""``python -m trm.serve RUN_DIR | CHECKPOINT | EXPORT_DIR [options]``: serve a model over HTTP.

    python -m trm.serve runs/tiny --port 8000
    TRM_SERVE_TOKEN=secret python -m trm.serve runs/tiny --host 0.0.0.0

See ``trm.serve`` for the routes and ``trm.serve.app`` for the error replies.
Test: ``pytest tests/test_serve.py -k cli``.
"""

from __future__ import annotations

import os
import sys

from trm import cli
from trm.config import ServeConfig

DEFAULTS = ServeConfig()


def _serve_command(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m trm.serve", description="Serve a trained TRM over HTTP (JSON).")
    parser.add_argument("source", help="a run folder (followed as it trains), a checkpoint folder, or an export folder")
    parser.add_argument("--host", default=DEFAULTS.host, help="address to bind (default %(default)s); "
                        "anything but loopback needs a token")
    parser.add_argument("--port", type=int, default=DEFAULTS.port, help="port (default %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token required on /v1/* (default: $TRM_SERVE_TOKEN)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--kernels", default=None, help="op backend (default: the run's `kernels`)")
    parser.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, help="rows per forward batch")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULTS.batch_wait_ms,
                        help="how long a batch waits for more requests")
    parser.add_argument("--poll-seconds", type=float, default=DEFAULTS.poll_seconds,
                        help="how often a run folder is checked for a newer checkpoint")
    parser.add_argument("--max-grids", type=int, default=DEFAULTS.max_grids_per_request, help="grids per request")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes, help="request body limit")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = parser.parse_args(argv)

    from trm.serve import TOKEN_ENV, check_bind, serve

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)  # before loading anything
    serve(args.source, host=args.host, port=args.port, token=token, log_level=args.log_level,
          device=args.device, kernels=args.kernels, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
          poll_seconds=args.poll_seconds, max_grids=args.max_grids, max_body_bytes=args.max_body_bytes)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: an error explained on stderr)."""
    return cli.run("trm.serve", _serve_command, argv, interrupted="the service stopped; start it again to serve")


if __name__ == "__main__":
    sys.exit(main())
