"""The HTTP service (FastAPI on uvicorn): routes, request checks, bearer token, error replies.

Routes::

    GET  /healthz      200 {"status": "ok", "step": N, ...} once a model is loaded, else 503
    GET  /v1/model     recipe, checkpoint step, parameter count, device, batching settings
    POST /v1/solve     {"task": "sudoku", "grid": GRID}            -> one answer
                       {"task": "sudoku", "grids": [GRID, ...]}    -> {"results": [...]}
                       optional "puzzle_id": int (row of the puzzle-embedding table; default 0)

An answer is ``{"grid": ..., "supervision_steps": int, "halting_confidence": float in [0, 1],
"halted": bool}`` plus ``"task"`` and ``"checkpoint_step"`` of the model that produced it
(grid formats: ``trm.serve.tasks``).

Every failure is a JSON reply ``{"error": {"status": S, "message": "..."}}``: 400 unreadable
body, 401 missing/wrong token, 404/405 unknown route/method, 413 body or grid count over the
limit, 422 a request that parses but does not fit the model (task, shape, values, puzzle_id) or has
no solution (contradictory Sudoku givens; a maze without one start and one goal joined by a path),
503 no model loaded yet, 500 an internal failure (logged; the service keeps running).

When a token is set, ``/v1/*`` needs ``Authorization: Bearer TOKEN``; ``/healthz`` stays open
for load balancers. ``check_bind`` refuses a non-loopback address without a token.

Test: ``pytest tests/test_serve.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trm.serve.batching import Batcher, NoModelError
from trm.serve.follow import ModelSlot
from trm.serve.tasks import TASKS, RequestError


@dataclass
class Limits:
    max_body_bytes: int = 4 << 20
    max_grids: int = 256


class SolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: StrictStr
    grid: Optional[Any] = None
    grids: Optional[list[Any]] = None
    puzzle_id: StrictInt = 0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"The request body has {declared} bytes; the limit is {limit}. Send fewer grids per request.", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"The request body is over the limit of {limit} bytes. Send fewer grids per request.", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise RequestError('The request body is empty; send a JSON object such as {"task": "sudoku", "grid": [...]}.', 400)
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise RequestError(f"The request body is not valid JSON ({str(err)[:200]}).", 400) from None


def _parse_request(data: Any) -> SolveRequest:
    if not isinstance(data, dict):
        raise RequestError(f'The request body must be a JSON object such as {{"task": "sudoku", "grid": [...]}}, '
                           f"not a {type(data).__name__}.")
    try:
        return SolveRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
        raise RequestError(f"Field '{where}': {first['msg']}{more}. Fields: task (string), grid or grids, "
                           f"optional puzzle_id (integer).") from None


def create_app(slot: ModelSlot, batcher: Batcher, token: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="trm service", description="Tiny Recursive Model inference", version="1")

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, err: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error(err.status, err.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, f"Invalid request: {err.errors()[0].get('msg', err)}")

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, err: Exception) -> JSONResponse:
        return _error(500, f"Internal error ({type(err).__name__}); the service is still running.")

    def authorize(request: Request) -> None:
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise RequestError("Missing or wrong bearer token: send the header 'Authorization: Bearer <token>'.", 401)

    def current_model():
        model = slot.current
        if model is None:
            raise RequestError(f"No checkpoint is loaded yet ({slot.source} has none complete); retry later.", 503)
        return model

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        model = slot.current
        if model is None:
            return JSONResponse({"status": "waiting for a checkpoint", "source": str(slot.source)}, status_code=503)
        return JSONResponse({"status": "ok", "step": model.step, "task": model.task})

    @app.get("/v1/model")
    async def model_info(request: Request) -> JSONResponse:
        authorize(request)
        info = current_model().describe()
        info["service"] = {"source": str(slot.source), "source_kind": slot.kind, "swaps": slot.swaps,
                           "max_batch": batcher.max_batch, "batch_wait_ms": batcher.max_wait_s * 1000,
                           "batches_run": batcher.batches_run, "largest_batch": batcher.largest_batch,
                           "max_grids_per_request": limits.max_grids, "max_body_bytes": limits.max_body_bytes}
        return JSONResponse(info)

    @app.post("/v1/solve")
    async def solve(request: Request) -> JSONResponse:
        authorize(request)
        req = _parse_request(await _read_json(request, limits.max_body_bytes))
        model = current_model()
        codec = TASKS.get(req.task)
        if codec is None:
            raise RequestError(f"Unknown task '{req.task}'; tasks: {', '.join(sorted(TASKS))}.")
        if req.task != model.task or not codec.fits(model.seq_len, model.vocab_size):
            raise RequestError(f"This model was trained for {model.task or 'an unrecognised dataset'} (seq_len "
                               f"{model.seq_len}, vocab {model.vocab_size}); it cannot solve task '{req.task}'.")
        if (req.grid is None) == (req.grids is None):
            raise RequestError("Send exactly one of 'grid' (one puzzle) or 'grids' (a list of puzzles).")
        grids = [req.grid] if req.grids is None else req.grids
        if not grids:
            raise RequestError("'grids' is empty; send at least one grid.")
        if len(grids) > limits.max_grids:
            raise RequestError(f"{len(grids)} grids in one request; the limit is {limits.max_grids}.", 413)
        if not 0 <= req.puzzle_id < model.num_puzzle_identifiers:
            raise RequestError(f"puzzle_id {req.puzzle_id} is out of range: this model knows puzzle ids "
                               f"0-{model.num_puzzle_identifiers - 1} (0 = blank / unseen puzzle).")
        names = ["grid"] if req.grids is None else [f"grids[{i}]" for i in range(len(grids))]
        tokens = np.stack([codec.encode(g, model.seq_len, name) for g, name in zip(grids, names)])
        puzzle_ids = np.full(len(grids), req.puzzle_id, dtype=np.int32)
        try:
            answer = await asyncio.wrap_future(batcher.submit(tokens, puzzle_ids))
        except NoModelError:
            raise RequestError("No checkpoint is loaded yet; retry later.", 503) from None
        sol = answer.solution
        results = [{
            "grid": codec.decode(sol.tokens[i]),
            "supervision_steps": int(sol.steps[i]),
            "halting_confidence": float(sol.confidence[i]) if math.isfinite(sol.confidence[i]) else None,
            "halted": bool(sol.halted[i]),
        } for i in range(len(grids))]
        head = {"task": req.task, "checkpoint_step": answer.model.step}
        return JSONResponse({**head, **results[0]} if req.grids is None else {**head, "results": results})

    return app
