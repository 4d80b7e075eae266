"""Service mode end to end: the real uvicorn server on a loopback port over a tiny trained run.

One 6-step run (checkpoints at steps 3 and 6) is shared by this file and test_export_plot.py.
The followed copy of the run starts with step 3 only; step 6 is published into it mid-traffic.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from conftest import REPO, environ_without_ranks, run_train, write_config
from trm.data.puzzle_dataset import PuzzleDataset
from trm.serve import ServeError, build_service, check_bind, is_loopback
from trm.serve.solver import ServedModel
from trm.serve.tasks import TASKS, RequestError, task_for_dims

TOKEN = "t0ken-" + os.urandom(6).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RNG = np.random.default_rng(0)  # each test replaces it (seeded_rng)


@pytest.fixture(autouse=True)
def seeded_rng(test_seed, monkeypatch):
    """random_sudoku() and the other draws of this file come from the test's seed (named on
    failure); test_export_plot.py imports this fixture for its calls of random_sudoku()."""
    monkeypatch.setattr(sys.modules[__name__], "RNG", np.random.default_rng(test_seed))


_TRAINED: dict[Path, Path] = {}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, sudoku_dir) -> Path:
    """A 6-step run: metrics, TensorBoard, plots, checkpoints at steps 3 and 6 (evaluated at both).
    test_export_plot.py imports this fixture; the cache keeps it to ONE training run per session."""
    if sudoku_dir not in _TRAINED:
        root = tmp_path_factory.mktemp("tiny_run")
        run_train(str(write_config(root / "cfg.yaml", root / "run", sudoku_dir)))
        _TRAINED[sudoku_dir] = root / "run"
    return _TRAINED[sudoku_dir]


def copy_run(run: Path, dst: Path, steps: tuple[int, ...]) -> Path:
    """A copy of ``run`` holding only the given checkpoints (without any export made meanwhile)."""
    keep = {f"step_{s}" for s in steps}
    shutil.copytree(run, dst, ignore=lambda d, names: [n for n in names if n == "export"
                                                        or (Path(d).name == "checkpoints" and n not in keep)])
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A built service under a real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, service):
        self.service = service
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.close()


def random_sudoku() -> list[list[int]]:
    """A fresh random 9x9 puzzle whose givens agree (the service refuses contradictory ones): a solved
    grid with shuffled digits, rows within bands and columns within stacks, 35-75% of it blanked.
    Whether the puzzle has a unique solution is irrelevant to the service."""
    digits = RNG.permutation(9) + 1
    rows = [3 * band + r for band in RNG.permutation(3) for r in RNG.permutation(3)]
    cols = [3 * stack + c for stack in RNG.permutation(3) for c in RNG.permutation(3)]
    solved = np.array([[digits[(3 * (r % 3) + r // 3 + c) % 9] for c in cols] for r in rows])
    return np.where(RNG.random((9, 9)) < RNG.uniform(0.35, 0.75), 0, solved).tolist()


def random_maze() -> list[str]:
    """A fresh random 30x30 maze the service accepts: random walls, one start in row 0, one goal in
    a later row, and that row, row 0 and column 0 open (so the goal is reachable)."""
    cells = RNG.choice(list("# "), size=(30, 30))
    goal_row = int(RNG.integers(1, 30))
    cells[0, :] = cells[goal_row, :] = cells[:, 0] = " "
    cells[0, RNG.integers(30)] = "S"
    cells[goal_row, RNG.integers(30)] = "G"
    return ["".join(row) for row in cells]


def eval_grids(data_dir: Path, n: int = 8) -> tuple[list[list[list[int]]], np.ndarray]:
    """The first n evaluation puzzles as digit grids, and their label tokens."""
    ex = PuzzleDataset(data_dir, seed=0).eval_examples(np.arange(n))
    digits = np.where(ex["inputs"].numpy() >= 2, ex["inputs"].numpy() - 1, 0)
    return [d.reshape(9, 9).tolist() for d in digits], ex["labels"].numpy()


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """The service following a copy of the run that has only step 3 (bearer token set)."""
    follow = copy_run(tiny_run, tmp_path_factory.mktemp("follow") / "run", steps=(3,))
    service = build_service(follow, token=TOKEN, poll_seconds=0.2, max_batch=8, batch_wait_ms=20,
                            max_grids=16, max_body_bytes=64 * 1024)
    live = LiveServer(service)
    live.run_dir = follow
    yield live
    live.close()


def test_healthz_and_model_info(served):
    with served.client(headers=AUTH) as c:
        health = c.get("/healthz")
        info = c.get("/v1/model").json()
    assert health.status_code == 200 and health.json()["step"] == 3
    model = served.service.slot.current
    assert info["step"] == 3 and info["device"] == "cpu" and info["task"] == "sudoku"
    assert info["parameters"] == sum(p.numel() for p in model.model.parameters()) > 0
    assert info["recipe"]["model"]["hidden_size"] == 32 and info["recipe"]["seq_len"] == 81
    assert info["ema_weights"] is True and info["service"]["source_kind"] == "run"


def test_solve_over_http_reproduces_the_trainers_evaluation(served, tiny_run, sudoku_dir):
    """Early-exit token accuracy and steps of the served model on the evaluation puzzles equal what the
    trainer logged for that checkpoint (EMA weights evaluated inside the training process)."""
    grids, labels = eval_grids(sudoku_dir)
    with served.client(headers=AUTH) as c:
        body = c.post("/v1/solve", json={"task": "sudoku", "grids": grids}).json()
        single = c.post("/v1/solve", json={"task": "sudoku", "grid": grids[0]}).json()
    step = body["checkpoint_step"]
    logged = next(r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines())
                  if r["step"] == step and "eval/early_exit/token_accuracy" in r)
    predicted = np.array([np.array(r["grid"]).reshape(81) + 1 for r in body["results"]])  # digit d -> token d + 1
    token_acc = ((predicted == labels) & (labels != -100)).sum(-1) / (labels != -100).sum(-1)
    assert token_acc.mean() == pytest.approx(logged["eval/early_exit/token_accuracy"], abs=1e-6)
    steps = [r["supervision_steps"] for r in body["results"]]
    assert np.mean(steps) == pytest.approx(logged["eval/early_exit/steps"])
    for r in body["results"]:
        assert 0.0 <= r["halting_confidence"] <= 1.0 and isinstance(r["halted"], bool)
        assert (r["halting_confidence"] > 0.5) == r["halted"] or r["supervision_steps"] == 4
    assert single["grid"] == body["results"][0]["grid"] and single["checkpoint_step"] == step
    assert single["halting_confidence"] == pytest.approx(body["results"][0]["halting_confidence"], abs=1e-6)


def test_string_grid_equals_list_grid(served):
    grid = random_sudoku()
    text = "".join(str(d) if d else "." for row in grid for d in row)
    with served.client(headers=AUTH) as c:
        a = c.post("/v1/solve", json={"task": "sudoku", "grid": grid}).json()
        b = c.post("/v1/solve", json={"task": "sudoku", "grid": text}).json()
    assert a["grid"] == b["grid"] and len(a["grid"]) == 9 and all(len(r) == 9 for r in a["grid"])


def test_concurrent_requests_are_batched_and_answered_like_solo_requests(served):
    """24 requests in flight at once: the batcher's first forward is held until all of them are
    queued (no timing involved), so the following batches must be full (max_batch rows)."""
    puzzles = [random_sudoku() for _ in range(24)]
    batcher = served.service.batcher
    submitted, sizes = threading.Semaphore(0), []
    real_submit, real_run = batcher.submit, batcher._run

    def counting_submit(tokens, puzzle_ids, **options):  # options: e.g. trace
        future = real_submit(tokens, puzzle_ids, **options)
        submitted.release()
        return future

    def recording_run(jobs):
        if not sizes:  # hold the first batch until every request is queued (or 120 s passed)
            deadline = time.monotonic() + 120
            for _ in puzzles:
                submitted.acquire(timeout=max(deadline - time.monotonic(), 0))
        sizes.append(sum(len(job.tokens) for job in jobs))
        real_run(jobs)

    def ask(grid):
        with served.client(headers=AUTH) as c:
            return c.post("/v1/solve", json={"task": "sudoku", "grid": grid})

    batcher.submit, batcher._run = counting_submit, recording_run  # instance attributes shadow the methods
    try:
        with concurrent.futures.ThreadPoolExecutor(len(puzzles)) as pool:
            replies = list(pool.map(ask, puzzles))
    finally:
        del batcher.submit, batcher._run
    assert [r.status_code for r in replies] == [200] * len(puzzles)
    assert sum(sizes) == len(puzzles), sizes
    # after the held first batch, the other requests waited in the queue: full batches of max_batch
    assert max(sizes[1:]) == batcher.max_batch and len(sizes) <= 1 + -(-(len(puzzles) - 1) // batcher.max_batch), sizes
    with served.client(headers=AUTH) as c:
        for grid, reply in zip(puzzles, replies):
            solo = c.post("/v1/solve", json={"task": "sudoku", "grid": grid}).json()
            assert solo["grid"] == reply.json()["grid"]
            assert solo["supervision_steps"] == reply.json()["supervision_steps"]
            assert solo["halting_confidence"] == pytest.approx(reply.json()["halting_confidence"], abs=1e-5)


def _malformed() -> list[tuple[str, str, dict, int]]:
    g = random_sudoku()
    row_long = [r[:] for r in g]
    row_long[4] = row_long[4] + [1]

    def cell(value):
        bad = [r[:] for r in g]
        bad[RNG.integers(9)][RNG.integers(9)] = value
        return {"task": "sudoku", "grid": bad}

    return [
        ("POST", "/v1/solve", {"content": b'{"task": "sudoku", "grid": '}, 400),
        ("POST", "/v1/solve", {"content": b""}, 400),
        ("POST", "/v1/solve", {"content": b'{"task": "sudoku", "grid": NaN}'}, 400),
        ("POST", "/v1/solve", {"content": b"[" * 200_00 + b"]" * 200_00}, 400),
        ("POST", "/v1/solve", {"content": b"\xff\xfe\x00garbage"}, 400),
        ("POST", "/v1/solve", {"json": [1, 2, 3]}, 422),
        ("POST", "/v1/solve", {"json": {"grid": g}}, 422),
        ("POST", "/v1/solve", {"json": {"task": 7, "grid": g}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "chess", "grid": g}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "maze", "grid": g}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "arc", "grid": [[1, 2], [3, 4]]}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": g[:8]}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": row_long}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": [" " * 9] * 9}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": "1" * 80}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": "x" * 81}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": 12345}}, 422),
        ("POST", "/v1/solve", {"json": cell(10)}, 422),
        ("POST", "/v1/solve", {"json": cell(-1)}, 422),
        ("POST", "/v1/solve", {"json": cell(10**30)}, 422),
        ("POST", "/v1/solve", {"json": cell("5")}, 422),
        ("POST", "/v1/solve", {"json": cell(2.5)}, 422),
        ("POST", "/v1/solve", {"json": cell(True)}, 422),
        ("POST", "/v1/solve", {"json": cell(None)}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": g, "grids": [g]}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku"}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grids": []}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grids": {"a": g}}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": g, "temperature": 0.7}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": g, "puzzle_id": 5}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grid": g, "puzzle_id": "0"}}, 422),
        ("POST", "/v1/solve", {"json": {"task": "sudoku", "grids": [g] * 17}}, 413),
        ("POST", "/v1/solve", {"content": b'{"task": "sudoku", "grid": "' + b"1" * 70_000 + b'"}'}, 413),
        ("GET", "/v1/solve", {}, 405),
        ("DELETE", "/v1/model", {}, 405),
        ("GET", "/v2/solve", {}, 404),
    ]


def test_malformed_requests_get_4xx_json_and_the_service_stays_up(served):
    cases = _malformed()
    assert len(cases) >= 10
    with served.client(headers=AUTH) as c:
        for method, path, kwargs, expected in cases:
            reply = c.request(method, path, **kwargs)
            what = f"{method} {path} {str(kwargs)[:120]}"
            assert reply.status_code == expected, f"{what}: {reply.status_code} {reply.text[:300]}"
            error = reply.json()["error"]
            assert error["status"] == expected and len(error["message"]) > 5, what
        assert c.get("/healthz").status_code == 200
        ok = c.post("/v1/solve", json={"task": "sudoku", "grid": random_sudoku()})
        assert ok.status_code == 200 and len(ok.json()["grid"]) == 9


def test_bearer_token_is_checked(served):
    with served.client() as c:
        assert c.get("/healthz").status_code == 200  # open for load balancers
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            for method, path in (("GET", "/v1/model"), ("POST", "/v1/solve")):
                reply = c.request(method, path, headers=headers, json={"task": "sudoku", "grid": random_sudoku()})
                assert reply.status_code == 401, (headers, path)
                assert reply.headers["www-authenticate"] == "Bearer" and "token" in reply.json()["error"]["message"]
        assert c.get("/v1/model", headers=AUTH).status_code == 200


def test_newer_checkpoint_is_swapped_in_mid_traffic_without_a_failed_request(served, tiny_run):
    """Every client has been answered by step 3 before step 6 is published, and keeps asking until
    it has been answered by step 6 (events with generous deadlines, no fixed windows)."""
    seen: dict[int, list[int]] = {i: [] for i in range(4)}
    failures: list[str] = []
    stop = threading.Event()
    answered = {step: {i: threading.Event() for i in seen} for step in (3, 6)}

    def traffic(i: int) -> None:
        with served.client(headers=AUTH) as c:
            while not stop.is_set():
                try:
                    reply = c.post("/v1/solve", json={"task": "sudoku", "grids": [random_sudoku() for _ in range(i + 1)]})
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {reply.text[:200]}")
                else:
                    step = reply.json()["checkpoint_step"]
                    seen[i].append(step)
                    if step in answered:
                        answered[step][i].set()
                time.sleep(0.01)  # continuous traffic that still leaves the exporting child some CPU

    def wait_all(step: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(event.wait(max(deadline - time.monotonic(), 0)) for event in answered[step].values())

    threads = [threading.Thread(target=traffic, args=(i,)) for i in seen]
    for t in threads:
        t.start()
    try:
        assert wait_all(3, 120), f"not every client got an answer from step 3: {seen}"
        assert served.service.slot.current.step == 3
        incoming = served.run_dir / "checkpoints" / ".incoming_step_6"
        shutil.copytree(tiny_run / "checkpoints" / "step_6", incoming, ignore=shutil.ignore_patterns("export"))
        os.rename(incoming, served.run_dir / "checkpoints" / "step_6")  # appears complete, atomically
        swapped = served.service.slot.wait_for_step(6, timeout=120)
        answered_by_6 = wait_all(6, 120)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert answered_by_6, f"not every client got an answer from step 6: {seen}"
    assert swapped, "the newer checkpoint was not picked up"
    assert not failures, failures[:5]
    for steps in seen.values():
        assert steps and steps == sorted(steps), "a client saw the old model after the new one"
    assert set().union(*map(set, seen.values())) == {3, 6}
    assert served.service.slot.swaps == 1
    with served.client(headers=AUTH) as c:
        assert c.get("/healthz").json()["step"] == 6
        assert c.get("/v1/model").json()["step"] == 6
    assert (served.run_dir / "checkpoints" / "step_6" / "export" / "model.safetensors").is_file()


def test_kernels_that_cannot_run_here_fall_back_to_auto_and_say_why(served, monkeypatch, capsys, kernel_baselines):
    """A run trained with kernels=cuda, served where the CUDA kernels cannot run (planted: every
    machine reads as one without them): the service names the reason, switches to auto, whose
    native kernels then answer like the PyTorch reference; a backend that can run is kept. A
    baseline backing the CPU kernels is planted: the committed ones cover only the CPU models they
    were measured on, and on another model auto would (rightly) run the reference."""
    from conftest import BACKED
    from trm import ops
    from trm.ops import counters, dispatch
    from trm.serve.solver import set_kernels

    kernel_baselines(BACKED)
    real_available = dispatch.available
    monkeypatch.setattr(dispatch, "available",
                        lambda name: (False, "planted: no CUDA device") if name == "cuda" else real_available(name))
    model = served.service.slot.current
    tokens, ids = RNG.integers(1, 11, size=(6, 81)).astype(np.int32), np.zeros(6, dtype=np.int32)
    try:
        assert set_kernels("cuda") == "auto" and ops.get_backend() == "auto"
        said = capsys.readouterr().out
        assert "kernels=cuda cannot run here" in said and "planted: no CUDA device" in said
        assert "using kernels=auto" in said
        with counters.record() as seen:
            with_auto = model.solve(tokens, ids)
        picked = dispatch.resolve("rms_norm", next(model.model.parameters()).device)
        assert picked not in ("torch", "cuda") and seen.ran(picked, "rms_norm"), f"auto ran {picked}: {seen}"
        assert set_kernels("cpu") == "cpu" and ops.get_backend() == "cpu" and capsys.readouterr().out == ""
    finally:
        ops.set_backend("torch")
    with_torch = model.solve(tokens, ids)
    np.testing.assert_array_equal(with_auto.steps, with_torch.steps)
    np.testing.assert_allclose(with_auto.confidence, with_torch.confidence, atol=1e-4)
    assert (with_auto.tokens == with_torch.tokens).mean() > 0.99


def test_early_exit_rows_leave_the_batch_without_changing_answers(served):
    """Rows that halt early are dropped from the batch; every row's answer equals a plain loop that runs
    all rows to the end and reads each row at its first q_halt > 0 (bias shifted so some rows halt)."""
    model = ServedModel(served.service.slot.current.path, torch.device("cpu"))
    n = 23
    tokens = RNG.integers(1, 11, size=(n, 81)).astype(np.int32)
    ids = np.zeros(n, dtype=np.int32)
    batch = {"inputs": torch.from_numpy(tokens), "puzzle_identifiers": torch.from_numpy(ids)}

    def every_step() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(q_halt [n], argmax [n, 81]) of each step, all rows run to the end."""
        with torch.inference_mode():
            carry, per_step = model.model.initial_carry(batch), []
            for _ in range(model.max_steps):
                carry, out = model.model(carry, batch)
                carry.halted = torch.zeros_like(carry.halted)
                per_step.append((out["q_halt_logits"].clone(), out["logits"].argmax(-1)))
        return per_step

    median = float(torch.stack([q for q, _ in every_step()]).median())
    with torch.no_grad():
        model.model.inner.q_head.bias[0] -= median  # about half the (row, step) pairs now halt
    q_steps = every_step()
    expected_steps = np.full(n, model.max_steps)
    expected_tokens = q_steps[-1][1].numpy().copy()
    for row in range(n):
        for step, (q, argmax) in enumerate(q_steps, start=1):
            if q[row] > 0:
                expected_steps[row], expected_tokens[row] = step, argmax[row].numpy()
                break
    sol = model.solve(tokens, ids)
    assert 0 < (expected_steps < model.max_steps).sum() < n, "the shifted bias should halt some rows early"
    np.testing.assert_array_equal(sol.steps, expected_steps)
    np.testing.assert_array_equal(sol.tokens, expected_tokens)
    assert (sol.halted == (sol.confidence > 0.5)).all()


def test_contradictory_sudoku_givens_get_422_naming_the_cells(served):
    """Two 5s in a row (and a 7 twice in a column, as one grid of a batch): 422 naming the cells, not
    a 200 whose answer overwrites one of them; a consistent puzzle still gets its answer."""
    row = random_sudoku()
    row[2] = [5, 0, 0, 0, 0, 0, 0, 5, 0]
    for r in range(9):
        if r != 2:
            row[r] = [0 if d == 5 else d for d in row[r]]
    column = [[0] * 9 for _ in range(9)]
    column[0][4] = column[8][4] = 7
    with served.client(headers=AUTH) as c:
        one = c.post("/v1/solve", json={"task": "sudoku", "grid": row})
        as_text = c.post("/v1/solve", json={"task": "sudoku", "grid": "".join(str(d) for r in row for d in r)})
        batch = c.post("/v1/solve", json={"task": "sudoku", "grids": [random_sudoku(), column]})
        fine = c.post("/v1/solve", json={"task": "sudoku", "grid": random_sudoku()})
    for reply in (one, as_text):
        assert reply.status_code == 422, reply.text
        message = reply.json()["error"]["message"]
        assert "digit 5 twice in row 2: cells (2, 0), (2, 7)" in message and "no solution" in message, message
    assert batch.status_code == 422
    assert "grids[1]" in batch.json()["error"]["message"]
    assert "digit 7 twice in column 4: cells (0, 4), (8, 4)" in batch.json()["error"]["message"]
    assert fine.status_code == 200


def test_maze_needs_one_start_one_goal_and_a_path_between_them():
    maze = random_maze()
    no_start = [r.replace("S", " ") for r in maze]
    two_goals = [maze[0].replace(" ", "G", 1), *maze[1:]]  # row 0 is open but for the start
    walled = [" " * 30] * 30
    walled[0] = "S" + "#" * 29
    walled[1] = "#" * 30
    walled[29] = " " * 29 + "G"
    cases = ((no_start, "exactly one start 'S'; it has none"), (two_goals, "exactly one goal 'G'; it has"),
             (walled, "no path from the start 'S' at (0, 0) to the goal 'G' at (29, 29)"))
    for grid, needle in cases:
        with pytest.raises(RequestError, match=re.escape(needle)) as caught:
            TASKS["maze"].encode(grid, 900, "grid")
        assert caught.value.status == 422
    TASKS["maze"].encode(maze, 900, "grid")


def test_task_codecs_round_trip_and_name_the_problem():
    assert task_for_dims(81, 11) == "sudoku" and task_for_dims(900, 6) == "maze" and task_for_dims(900, 12) == "arc"
    assert task_for_dims(81, 7) is None
    h, w = int(RNG.integers(1, 30)), int(RNG.integers(1, 30))
    colours = RNG.integers(0, 10, size=(h, w)).tolist()
    tokens = TASKS["arc"].encode(colours, 900, "grid")
    assert TASKS["arc"].decode(tokens) == colours
    assert (tokens.reshape(30, 30)[:h, :w] >= 2).all() and (tokens.reshape(30, 30)[h:, w:] == 0).all()
    maze = random_maze()
    assert TASKS["maze"].decode(TASKS["maze"].encode(maze, 900, "grid")) == maze
    for task, grid, needle in (("arc", [[1, 2], [3]], "row 1"), ("arc", [[11]], "0-9"), ("maze", maze[:29], "29 rows"),
                               ("maze", [row.replace("#", "o") for row in maze], "cell")):
        with pytest.raises(RequestError, match=needle):
            TASKS[task].encode(grid, 900, "grid")


def test_loopback_check():
    for host in ("127.0.0.1", "127.5.0.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.7", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ServeError, match="token"):
            check_bind(host, None)
        check_bind(host, "secret")


def _env() -> dict[str, str]:
    env = {**environ_without_ranks(), "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    env.pop("TRM_SERVE_TOKEN", None)
    return env


def test_cli_refuses_a_public_bind_without_a_token(tiny_run):
    proc = subprocess.run([sys.executable, "-m", "trm.serve", str(tiny_run), "--host", "0.0.0.0"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "without a bearer token" in proc.stderr and "Traceback" not in proc.stderr


def test_train_mode_service_serves_the_run(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", steps=(3, 6))
    refused = run_train(str(run / "config.yaml"), "mode=service", f"run_dir={run}", "serve.host=0.0.0.0", check=False)
    assert refused.returncode == 2 and "without a bearer token" in refused.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trm.train", str(run / "config.yaml"), "mode=service",
                             f"run_dir={run}", f"serve.port={port}", "serve.poll_seconds=0.5"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the service exited: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the service did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        info = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json()
        assert info["step"] == 6 and info["service"]["source_kind"] == "run"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/solve", json={"task": "sudoku", "grid": random_sudoku()},
                           timeout=30)
        assert reply.status_code == 200 and reply.json()["checkpoint_step"] == 6
    finally:
        proc.terminate()
        proc.wait(timeout=30)
