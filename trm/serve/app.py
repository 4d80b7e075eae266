"""The HTTP service (FastAPI on uvicorn): routes, request checks, bearer token, error replies.

Routes::

    GET  /             the page: pick a task, paste or load a held-out example, solve, step through
                       the supervision steps (``trm/serve/static/index.html``, no external assets)
    GET  /healthz      200 {"status": "ok", "step": N, ...} once a model is loaded, else 503
    GET  /v1/model     recipe, checkpoint step, parameter count, device, batching settings
    POST /v1/solve     {"task": "sudoku", "grid": GRID}            -> one answer
                       {"task": "sudoku", "grids": [GRID, ...]}    -> {"results": [...]}
                       optional "puzzle_id": int (row of the puzzle-embedding table; default 0)
                       ARC: "task_id": the task's id (its row); an unknown task is a 404 naming trm.adapt
                       optional "trace": true -> each answer also has "trace": the grid and the
                       halting confidence after every supervision step it ran
    GET  /v1/examples/N   held-out example N of the run's evaluation split (input, solution, puzzle_id)

An answer is ``{"grid": ..., "supervision_steps": int, "halting_confidence": float in [0, 1],
"halted": bool}`` plus ``"task"`` and ``"checkpoint_step"`` of the model that produced it
(grid formats: ``trm.serve.tasks``).

The OpenAPI schema (``/openapi.json``, browsable at ``/docs``) documents the request body and the
replies from the pydantic models below.

Every failure is a JSON reply ``{"error": {"status": S, "message": "..."}}``: 400 unreadable
body, 401 missing/wrong token, 404/405 unknown route/method (404 also: an ARC task_id the model
never learned), 413 body or grid count over the
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
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trm.serve.batching import Batcher, NoModelError
from trm.serve.follow import ModelSlot
from trm.data.format import DatasetError
from trm.serve.tasks import TASKS, RequestError

PAGE = Path(__file__).with_name("static") / "index.html"
"""The service's page (``GET /``): one self-contained HTML file, so it works offline."""


@dataclass
class Limits:
    max_body_bytes: int = 4 << 20
    max_grids: int = 256


GRID_SCHEMA = {"anyOf": [
    {"type": "string", "description": "sudoku: 81 characters 1-9, with 0 or '.' for a blank"},
    {"type": "array", "items": {"type": "string"}, "description": "maze: 30 strings of 30 characters from '# SG'"},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}},
     "description": "sudoku: 9 x 9 digits (0 = blank); arc: 1-30 rows of equally many colours 0-9"},
]}


def _list_of_grids(schema: dict[str, Any]) -> None:
    schema.pop("anyOf", None)
    schema.update(type="array", items=GRID_SCHEMA)


class SolveRequest(BaseModel):
    """The body of ``POST /v1/solve``: exactly one of ``grid`` and ``grids``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "sudoku", "grid": "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79",
         "trace": True}]})

    task: StrictStr = Field(description="sudoku | maze | arc: the task the served model was trained for (GET /v1/model)")
    grid: Optional[Any] = Field(None, description="one puzzle", json_schema_extra=GRID_SCHEMA)
    grids: Optional[list[Any]] = Field(None, description="several puzzles (answered as 'results', in order)",
                                       json_schema_extra=_list_of_grids)
    puzzle_id: StrictInt = Field(0, description="row of the puzzle-embedding table (0 = blank / unseen puzzle); "
                                                "GET /v1/examples/N gives a held-out example's")
    task_id: Optional[StrictStr] = Field(None, description="arc: the task's id (its puzzle-embedding row); a task "
                                                           "the model never learned is a 404 naming trm.adapt")
    trace: StrictBool = Field(False, description="also return the predicted grid and the halting confidence after "
                                                 "every supervision step")


class TraceStep(BaseModel):
    step: int = Field(description="supervision step, from 1")
    grid: Any = Field(description="the prediction after this step (the task's answer format)")
    halting_confidence: Optional[float] = Field(description="sigmoid(q_halt) after this step; > 0.5 means halt")


class SolveAnswer(BaseModel):
    grid: Any = Field(description="the answer: sudoku 9 x 9 digits, maze 30 strings with the path as 'o', arc colours")
    supervision_steps: int = Field(description="steps run before stopping (early exit or the step budget)")
    halting_confidence: Optional[float] = Field(description="sigmoid(q_halt) at the stopping step")
    halted: bool = Field(description="true when the model chose to stop (q_halt > 0)")
    trace: Optional[list[TraceStep]] = Field(None, description="with trace=true: one entry per step")


class SolveReply(SolveAnswer):
    """The reply to a request with ``grid``."""

    task: str
    checkpoint_step: int = Field(description="training step of the checkpoint that answered")


class SolveBatchReply(BaseModel):
    """The reply to a request with ``grids``."""

    task: str
    checkpoint_step: int
    results: list[SolveAnswer]


class ExampleReply(BaseModel):
    task: Optional[str]
    index: int
    count: int = Field(description="held-out examples in the split")
    grid: Any = Field(description="the puzzle, in the request format of the task")
    solution: Any = Field(description="the label, in the answer format")
    puzzle_id: int


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorReply(BaseModel):
    error: ErrorBody


ERRORS = {status: {"model": ErrorReply, "description": what} for status, what in (
    (400, "unreadable body"), (401, "missing or wrong bearer token"), (413, "body or grid count over the limit"),
    (422, "a request that does not fit the model"), (503, "no checkpoint loaded yet"))}


def _confidence(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


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
                           f"optional puzzle_id (integer), optional trace (boolean).") from None


ADAPT_HINT = ("A TRM knows an ARC task only through the puzzle-embedding row it learned for it: adapt the model to "
              "new tasks with `python -m trm.adapt {run} --tasks TASKS_challenges.json --out NEW_RUN`, then serve NEW_RUN "
              "and name the task with \"task_id\".")


def _arc_task_row(model: Any, req: SolveRequest) -> int:
    """The row of the ARC task a request names (``task_id``, or an explicit ``puzzle_id`` > 0);
    a task the model never learned is a 404 pointing at ``trm.adapt``."""
    hint = ADAPT_HINT.format(run=model.cfg.run_dir)
    if req.task_id is None:
        if req.puzzle_id > 0:
            return req.puzzle_id
        raise RequestError(f"Name the ARC task: send \"task_id\" (one of the {len(model.task_rows)} tasks this model "
                           f"learned) or \"puzzle_id\". Without it the model sees the blank row and cannot solve the task. "
                           + hint)
    if req.task_id not in model.task_rows:
        known = ", ".join(sorted(model.task_rows)[:5]) or "none found next to the model"
        raise RequestError(f"ARC task '{req.task_id[:64]}' is unknown to this model (it learned {len(model.task_rows)} "
                           f"tasks, e.g. {known}). " + hint, 404)
    return model.task_rows[req.task_id]


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

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/examples/{index}", response_model=ExampleReply, responses=ERRORS)
    async def example(index: int, request: Request) -> JSONResponse:
        """Held-out example ``index`` of the served run's evaluation split (404 when the dataset is
        not where the run's ``data.path`` says, relative to the service's working directory)."""
        authorize(request)
        model = current_model()
        codec = TASKS.get(model.task or "")
        if codec is None:
            raise RequestError("This model's dataset has no grid format the service knows.", 404)
        try:
            inputs, labels, puzzle_id, count = model.held_out_example(index)
        except DatasetError as err:
            raise RequestError(f"No held-out examples here: {err}", 404) from None
        except IndexError as err:
            raise RequestError(f"No held-out example {index}: {err}.", 404) from None
        grid = codec.decode(inputs)
        if model.task == "maze":  # the request format has no path
            grid = [row.replace("o", " ") for row in grid]
        return JSONResponse({"task": model.task, "index": index, "count": count, "grid": grid,
                             "solution": codec.decode(labels), "puzzle_id": puzzle_id})

    @app.post("/v1/solve", responses={200: {"model": SolveReply | SolveBatchReply,
                                            "description": "one answer (grid) or a list (grids)"}, **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/SolveRequest"}}}}})
    async def solve(request: Request) -> JSONResponse:
        """Solve one grid or a batch of grids (body: SolveRequest); ``trace`` adds every step's prediction."""
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
        if req.task == "arc" and model.num_puzzle_identifiers > 1:
            req.puzzle_id = _arc_task_row(model, req)
        names = ["grid"] if req.grids is None else [f"grids[{i}]" for i in range(len(grids))]
        tokens = np.stack([codec.encode(g, model.seq_len, name) for g, name in zip(grids, names)])
        puzzle_ids = np.full(len(grids), req.puzzle_id, dtype=np.int32)
        try:
            answer = await asyncio.wrap_future(batcher.submit(tokens, puzzle_ids, trace=req.trace))
        except NoModelError:
            raise RequestError("No checkpoint is loaded yet; retry later.", 503) from None
        sol = answer.solution
        results = [{
            "grid": codec.decode(sol.tokens[i]),
            "supervision_steps": int(sol.steps[i]),
            "halting_confidence": _confidence(sol.confidence[i]),
            "halted": bool(sol.halted[i]),
        } for i in range(len(grids))]
        if req.trace:
            for i, result in enumerate(results):
                result["trace"] = [{"step": k + 1, "grid": codec.decode(sol.trace_tokens[k, i].astype(np.int64)),
                                    "halting_confidence": _confidence(sol.trace_confidence[k, i])}
                                   for k in range(int(sol.steps[i]))]
        head = {"task": req.task, "checkpoint_step": answer.model.step}
        return JSONResponse({**head, **results[0]} if req.grids is None else {**head, "results": results})

    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the request body model (the route parses its body itself, for
        size limits and its own error replies, so FastAPI does not see the model)."""
        if app.openapi_schema is None:
            generate_openapi()["components"]["schemas"]["SolveRequest"] = SolveRequest.model_json_schema()
        return app.openapi_schema

    app.openapi = openapi
    return app
