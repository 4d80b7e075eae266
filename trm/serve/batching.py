"""The batching queue: concurrent requests share forward passes.

Request handlers ``submit`` their encoded grids and await the returned future. One worker thread
takes the first waiting job, then keeps collecting jobs until the batch holds ``max_batch`` rows
or ``max_wait_s`` has passed since that first job, runs the ACT loop once on all rows (in chunks
of ``max_batch`` when a single job is larger) with the model that is current at that moment, and
answers every job from its rows. A job whose model was swapped away between validation and its
batch is answered from the new model when the shapes agree (they always do within one run).
An exception fails only the jobs of that batch (HTTP 500 JSON); the worker keeps going.

Test: ``pytest tests/test_serve.py -k concurrent``.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from trm.serve.follow import ModelSlot
from trm.serve.solver import ServedModel, Solution


@dataclass
class Job:
    tokens: np.ndarray        # [n, seq_len] int32
    puzzle_ids: np.ndarray    # [n] int32
    trace: bool = False       # keep the per-step predictions (the batch then keeps them for all rows)
    future: Future = field(default_factory=Future)


@dataclass
class Answer:
    """A job's rows of a batch's solution, and the model that produced them."""

    solution: Solution
    model: ServedModel
    batch_rows: int


class NoModelError(RuntimeError):
    """No checkpoint is loaded yet."""


class Batcher:
    def __init__(self, slot: ModelSlot, max_batch: int = 64, max_wait_s: float = 0.005):
        self.slot = slot
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._carry_over: Job | None = None
        self.batches_run = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="trm-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, tokens: np.ndarray, puzzle_ids: np.ndarray, trace: bool = False) -> Future:
        job = Job(tokens, puzzle_ids, trace)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self) -> list[Job] | None:
        first = self._carry_over or self._queue.get()
        self._carry_over = None
        if first is None:
            return None
        jobs, rows = [first], len(first.tokens)
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            if rows + len(job.tokens) > self.max_batch:
                self._carry_over = job
                break
            jobs.append(job)
            rows += len(job.tokens)
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                self._run(jobs)
            except Exception as err:  # answer the batch's jobs with the error, keep serving
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)

    def _run(self, jobs: list[Job]) -> None:
        model = self.slot.current
        if model is None:
            raise NoModelError("no checkpoint is loaded yet")
        tokens = np.concatenate([job.tokens for job in jobs])
        if tokens.shape[1] != model.seq_len:
            raise ValueError(f"the served model changed to seq_len {model.seq_len}; resend the request")
        puzzle_ids = np.concatenate([job.puzzle_ids for job in jobs])
        trace = any(job.trace for job in jobs)
        whole = Solution.concatenate([model.solve(tokens[i:i + self.max_batch], puzzle_ids[i:i + self.max_batch], trace)
                                      for i in range(0, len(tokens), self.max_batch)])
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(tokens))
        start = 0
        for job in jobs:
            end = start + len(job.tokens)
            job.future.set_result(Answer(whole.rows(start, end), model, len(tokens)))
            start = end
