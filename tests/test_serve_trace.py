"""The service's per-step trace, held-out examples, page and OpenAPI schema (HTTP, no browser;
tests/test_browser.py drives the page itself)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from test_serve import LiveServer, eval_grids, tiny_run  # noqa: F401  (tiny_run: the shared 6-step run)
from trm.data.puzzle_dataset import PuzzleDataset
from trm.serve import build_service
from trm.serve.solver import ServedModel

RNG = np.random.default_rng(18)


@pytest.fixture(scope="module")
def live(tiny_run):  # noqa: F811
    server = LiveServer(build_service(tiny_run, poll_seconds=30, max_batch=8, batch_wait_ms=5))
    yield server
    server.close()


def test_trace_is_every_steps_prediction_and_confidence(live):
    """Per row, trace step k holds the argmax and sigmoid(q_halt) of a plain loop's step k, for
    the steps the row ran (bias shifted so that rows halt at different steps)."""
    model = ServedModel(live.service.slot.current.path, torch.device("cpu"))
    n = 11
    tokens = RNG.integers(1, 11, size=(n, 81)).astype(np.int32)
    ids = np.zeros(n, dtype=np.int32)
    batch = {"inputs": torch.from_numpy(tokens), "puzzle_identifiers": torch.from_numpy(ids)}
    with torch.inference_mode():
        carry, per_step = model.model.initial_carry(batch), []
        for _ in range(model.max_steps):
            carry, out = model.model(carry, batch)
            carry.halted = torch.zeros_like(carry.halted)
            per_step.append((out["q_halt_logits"].clone(), out["logits"].argmax(-1)))
    median = float(torch.stack([q for q, _ in per_step]).median())
    with torch.no_grad():
        model.model.inner.q_head.bias[0] -= median
    plain = model.solve(tokens, ids)
    sol = model.solve(tokens, ids, trace=True)
    assert plain.trace_tokens is None
    np.testing.assert_array_equal(sol.tokens, plain.tokens)
    np.testing.assert_array_equal(sol.steps, plain.steps)
    assert len(set(sol.steps.tolist())) > 1, "rows should stop at different steps"
    q_shifted = [q - median for q, _ in per_step]
    for row in range(n):
        for k in range(int(sol.steps[row])):
            np.testing.assert_array_equal(sol.trace_tokens[k, row], per_step[k][1][row].numpy())
            assert sol.trace_confidence[k, row] == pytest.approx(float(torch.sigmoid(q_shifted[k][row])), abs=1e-5)
        last = int(sol.steps[row]) - 1
        np.testing.assert_array_equal(sol.trace_tokens[last, row], sol.tokens[row])
        assert sol.trace_confidence[last, row] == pytest.approx(sol.confidence[row])
        assert (sol.trace_confidence[:last, row] <= 0.5).all()  # it did not halt before


def test_solve_with_trace_over_http(live, sudoku_dir):
    grids, _ = eval_grids(sudoku_dir, n=3)
    with live.client() as c:
        plain = c.post("/v1/solve", json={"task": "sudoku", "grids": grids}).json()
        traced = c.post("/v1/solve", json={"task": "sudoku", "grids": grids, "trace": True}).json()
        single = c.post("/v1/solve", json={"task": "sudoku", "grid": grids[0], "trace": True}).json()
        bad = c.post("/v1/solve", json={"task": "sudoku", "grid": grids[0], "trace": "yes"})
    for p, t in zip(plain["results"], traced["results"]):
        assert "trace" not in p
        assert t["grid"] == p["grid"] and t["supervision_steps"] == p["supervision_steps"]
        assert t["halted"] == p["halted"] and t["halting_confidence"] == pytest.approx(p["halting_confidence"])
        assert [s["step"] for s in t["trace"]] == list(range(1, t["supervision_steps"] + 1))
        assert t["trace"][-1]["grid"] == t["grid"]
        assert t["trace"][-1]["halting_confidence"] == pytest.approx(t["halting_confidence"])
        assert all(len(s["grid"]) == 9 and all(len(r) == 9 for r in s["grid"]) for s in t["trace"])
    assert single["trace"] == traced["results"][0]["trace"]
    assert bad.status_code == 422 and "trace" in bad.json()["error"]["message"]


def test_held_out_examples(live, sudoku_dir):
    ex = PuzzleDataset(sudoku_dir, seed=0).eval_examples(np.arange(12))
    with live.client() as c:
        got = c.get("/v1/examples/5").json()
        past = c.get("/v1/examples/12")
    inputs, labels = ex["inputs"][5].numpy(), ex["labels"][5].numpy()
    assert got["count"] == 12 and got["task"] == "sudoku" and got["index"] == 5
    assert np.array(got["grid"]).reshape(81).tolist() == np.where(inputs >= 2, inputs - 1, 0).tolist()
    assert np.array(got["solution"]).reshape(81).tolist() == (labels - 1).tolist()
    assert got["puzzle_id"] == int(ex["puzzle_identifiers"][5])
    assert past.status_code == 404 and "0-11" in past.json()["error"]["message"]


def test_page_is_self_contained_and_the_schema_documents_the_body(live):
    with live.client() as c:
        page = c.get("/")
        schema = c.get("/openapi.json").json()
        docs = c.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needed in ('id="task"', 'id="grid"', 'id="load"', 'id="solve"', 'id="next"', 'id="prev"', 'id="error"',
                   "/v1/solve", "trace: true"):
        assert needed in html, needed
    external = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""", html)
    assert not external, f"the page must not load anything from the network: {external}"
    body = schema["paths"]["/v1/solve"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SolveRequest"}
    request = schema["components"]["schemas"]["SolveRequest"]
    assert set(request["properties"]) == {"task", "grid", "grids", "puzzle_id", "task_id", "trace"}
    assert request["required"] == ["task"] and request["additionalProperties"] is False
    assert all(prop.get("description") for prop in request["properties"].values())
    replies = schema["paths"]["/v1/solve"]["post"]["responses"]
    assert {"200", "400", "401", "413", "422", "503"} <= set(replies)
    assert "SolveAnswer" in schema["components"]["schemas"] and "TraceStep" in schema["components"]["schemas"]
    assert "/v1/examples/{index}" in schema["paths"] and "/" not in schema["paths"]
    assert docs.status_code == 200 and "openapi.json" in docs.text
