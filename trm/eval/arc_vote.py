"""ARC voting evaluator: pass@k over augmented predictions and the ARC Prize submission file.

For every example of an ARC test split (one augmented version of one test input of one task),
the model predicts a 30x30 token canvas and a halting logit ``q_halt``. The evaluator

1. crops the canvas to its grid (:func:`trm.data.arc.decode_grid`); an empty crop (the canvas
   does not start with a colour) is a candidate like any other grid, as in the reference
   (``abstain_empty=True``: it casts no vote instead),
2. undoes the version's augmentation (transform and colour permutation, read from the puzzle
   identifier's name in ``identifiers.json``, the reference's naming),
3. votes per (task, test input): identical grids pool their votes and their ``sigmoid(q_halt)``,
4. ranks candidates by (votes, mean sigmoid(q_halt)) -- ties broken by the grid bytes, so the
   order is deterministic -- and scores pass@k as the ARC Prize does: a test input is solved when
   its solution is among the top k; a task scores the fraction of its test inputs solved;
   pass@k is the mean over the tasks with known solutions (``test_puzzles.json``).

The defaults are the reference's ``evaluators/arc.py`` (``aggregated_voting=True``): votes pile
up across the evaluations of a run (:meth:`ArcVoter.begin_evaluation` keeps them;
``accumulate=False``: each evaluation votes afresh), pass@k for :data:`PASS_KS`, and a task whose
solutions are unknown is not scored. Within one evaluation an example index counts once
(repeats, e.g. padding of a distributed sampler, are ignored). Where the reference differs:
votes are keyed by test input index (the reference pools identical test inputs of a task) and
exact ties of (votes, mean confidence) are broken by the grid bytes (the reference: arrival
order); the submission skips empty candidates (an empty grid is not a valid ARC answer).

Usage::

    voter = ArcVoter(ArcEvalSet.from_dataset("data/arc1"))
    voter.begin_evaluation()
    voter.add(example_indices, predicted_tokens, q_halt_logits)   # any number of batches
    print(voter.results())                                        # {"pass@1": ..., "pass@2": ..., "pass@1000": ...}
    voter.write_submission("run/submission.json")                 # validated ARC Prize format

Tests: ``pytest tests/test_arc.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from trm.data.arc import GRID_SIZE, NUM_COLOURS, SEQ_LEN, TEST_PUZZLES_FILE, as_grid, decode_grid, invert_grid, parse_version_name
from trm.data.format import DatasetError, load_identifiers, load_split


PASS_KS = (1, 2, 5, 10, 100, 1000)
"""The k of pass@k the reference's ARC evaluator reports."""


class SubmissionError(ValueError):
    """A submission does not follow the ARC Prize format; the message lists what is wrong."""


@dataclass
class ArcEvalSet:
    """What voting needs to know about each example of an ARC evaluation split.

    ``task_ids`` lists the tasks scored (those of ``test_puzzles.json``, else those present);
    ``example_*`` arrays [num_examples] give each example's task (index into ``task_ids``),
    test input index, transform and colour permutation ([num_examples, 10]); ``solutions[t][j]``
    is the true output grid of test input ``j`` of task ``t`` (None when unknown).
    """

    task_ids: list[str]
    example_task: np.ndarray
    example_test: np.ndarray
    example_transform: np.ndarray
    example_colours: np.ndarray
    solutions: list[list[np.ndarray | None]]

    @property
    def num_examples(self) -> int:
        return len(self.example_task)

    @classmethod
    def from_dataset(cls, root: str | Path, split: str = "test") -> ArcEvalSet:
        """Read a dataset directory in the reference layout (built here or by the reference).

        Examples of a puzzle are its version of the task's test inputs, in order, so test index =
        example index - the puzzle's first example.
        """
        root = Path(root)
        data = load_split(root, split)
        names = load_identifiers(root)
        if len(names) < data.metadata.num_puzzle_identifiers:
            raise DatasetError(f"{root / 'identifiers.json'}: {len(names)} names for {data.metadata.num_puzzle_identifiers} puzzle identifiers")
        parsed = {int(i): parse_version_name(names[int(i)]) for i in np.unique(data.puzzle_identifiers)}
        puzzle_task = [parsed[int(i)][0] for i in data.puzzle_identifiers]

        test_puzzles_path = root / TEST_PUZZLES_FILE
        if test_puzzles_path.is_file():
            try:
                test_puzzles = json.loads(test_puzzles_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DatasetError(f"{test_puzzles_path}: not valid JSON ({err})") from None
            if not isinstance(test_puzzles, Mapping):
                raise DatasetError(f"{test_puzzles_path}: expected an object mapping task ids to tasks")
            task_ids = list(test_puzzles)
            solutions = []
            for task_id in task_ids:
                tests = test_puzzles[task_id].get("test") if isinstance(test_puzzles[task_id], Mapping) else None
                if not isinstance(tests, list) or not tests:
                    raise DatasetError(f"{test_puzzles_path}: task {task_id} has no 'test' list")
                solutions.append([
                    as_grid(t["output"], f"{test_puzzles_path}: task {task_id} test {j} output") if isinstance(t, Mapping) and "output" in t else None
                    for j, t in enumerate(tests)
                ])
        else:
            task_ids = list(dict.fromkeys(puzzle_task))
            solutions = None

        task_index = {task_id: i for i, task_id in enumerate(task_ids)}
        missing = sorted(set(puzzle_task) - set(task_index))
        if missing:
            raise DatasetError(f"{test_puzzles_path}: task(s) of the {split} split missing: {', '.join(missing[:5])}")
        examples = np.arange(data.num_examples)
        puzzles = data.example_puzzle(examples)
        example_test = examples - data.puzzle_indices[puzzles]
        puzzle_task_index = np.array([task_index[t] for t in puzzle_task], dtype=np.int64)
        example_task = puzzle_task_index[puzzles]
        transforms = np.array([parsed[int(i)][1] for i in data.puzzle_identifiers], dtype=np.int64)
        colours = np.stack([parsed[int(i)][2] for i in data.puzzle_identifiers]) if data.num_puzzles else np.zeros((0, NUM_COLOURS), np.uint8)
        if solutions is None:
            counts = np.zeros(len(task_ids), np.int64)
            np.maximum.at(counts, example_task, example_test + 1)
            solutions = [[None] * int(n) for n in counts]
        num_tests = np.array([len(s) for s in solutions])
        too_far = example_test >= num_tests[example_task]
        if too_far.any():
            e = int(np.argmax(too_far))
            raise DatasetError(
                f"{root / split}: example {e} would be test input {example_test[e]} of task {task_ids[example_task[e]]}, "
                f"which has {num_tests[example_task[e]]} (puzzles must hold a task's test inputs in order)"
            )
        return cls(task_ids, example_task, example_test, transforms[puzzles], colours[puzzles], solutions)


@dataclass
class Candidate:
    """One distinct (de-augmented) answer to a test input."""

    grid: np.ndarray
    votes: int
    confidence_sum: float

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.votes


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _grid_key(grid: np.ndarray) -> bytes:
    return bytes(grid.shape) + grid.tobytes()


class ArcVoter:
    """Accumulates votes of augmented predictions and scores them (see the module docstring)."""

    def __init__(self, eval_set: ArcEvalSet, accumulate: bool = True, abstain_empty: bool = False):
        self.eval_set = eval_set
        self.accumulate = accumulate
        self.abstain_empty = abstain_empty
        self._votes: dict[tuple[int, int], dict[bytes, Candidate]] = {}
        self._seen: set[int] = set()
        self.abstained = 0

    def begin_evaluation(self) -> None:
        """Start a new evaluation round: forget the votes (unless ``accumulate``) and the examples seen."""
        if not self.accumulate:
            self._votes.clear()
            self.abstained = 0
        self._seen.clear()

    def add(self, example_indices: Any, predictions: Any, q_halt_logits: Any) -> None:
        """Vote with predicted token canvases [B, 900] (or [B, 30, 30]) of the given examples.

        ``q_halt_logits`` [B] are the halting head's logits; their sigmoid breaks vote ties.
        """
        indices = _numpy(example_indices).reshape(-1)
        preds = _numpy(predictions)
        q = _numpy(q_halt_logits).reshape(-1).astype(np.float64)
        if preds.ndim == 3:
            preds = preds.reshape(len(preds), -1)
        if preds.ndim != 2 or preds.shape[1] != SEQ_LEN or not (len(preds) == len(indices) == len(q)):
            raise ValueError(f"add(): need example_indices [B], predictions [B, {SEQ_LEN}] and q_halt_logits [B]; "
                             f"got {list(indices.shape)}, {list(_numpy(predictions).shape)}, {list(q.shape)}")
        if len(indices) and (not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0 or indices.max() >= self.eval_set.num_examples):
            raise ValueError(f"add(): example indices must be integers in [0, {self.eval_set.num_examples})")
        if np.isnan(q).any():
            raise ValueError("add(): q_halt_logits hold NaN; the model's halting head diverged")
        confidence = _sigmoid(q)
        es = self.eval_set
        for row, example in enumerate(indices.tolist()):
            if example in self._seen:
                continue
            self._seen.add(example)
            grid = decode_grid(preds[row])
            if grid.size == 0:
                if self.abstain_empty:
                    self.abstained += 1
                    continue
            else:
                grid = invert_grid(grid, int(es.example_transform[example]), es.example_colours[example])
            tally = self._votes.setdefault((int(es.example_task[example]), int(es.example_test[example])), {})
            key = _grid_key(grid)
            if key in tally:
                tally[key].votes += 1
                tally[key].confidence_sum += float(confidence[row])
            else:
                tally[key] = Candidate(grid, 1, float(confidence[row]))

    def ranked(self, task: int, test: int) -> list[Candidate]:
        """Candidates for test input ``test`` of task index ``task``, best first."""
        tally = self._votes.get((task, test), {})
        order = sorted(tally, key=lambda k: (-tally[k].votes, -tally[k].mean_confidence, k))
        return [tally[k] for k in order]

    def results(self, ks: Sequence[int] = PASS_KS) -> dict[str, float]:
        """``pass@k`` (ARC Prize scoring: mean over tasks of the fraction of test inputs whose
        solution is in the top k), ``input_pass@k`` (fraction of test inputs), and counts."""
        ks = sorted({int(k) for k in ks})
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        es = self.eval_set
        task_scores = {k: [] for k in ks}
        input_hits = {k: 0 for k in ks}
        scored_inputs = 0
        for t, solutions in enumerate(es.solutions):
            if not solutions or any(s is None for s in solutions):
                continue
            hits = {k: 0 for k in ks}
            for j, solution in enumerate(solutions):
                ranked = self.ranked(t, j)
                position = next((i for i, c in enumerate(ranked) if np.array_equal(c.grid, solution)), None)
                for k in ks:
                    hits[k] += position is not None and position < k
            scored_inputs += len(solutions)
            for k in ks:
                task_scores[k].append(hits[k] / len(solutions))
                input_hits[k] += hits[k]
        out: dict[str, float] = {}
        for k in ks:
            out[f"pass@{k}"] = float(np.mean(task_scores[k])) if task_scores[k] else 0.0
        for k in ks:
            out[f"input_pass@{k}"] = input_hits[k] / scored_inputs if scored_inputs else 0.0
        votes = sum(c.votes for tally in self._votes.values() for c in tally.values())
        out.update(
            tasks_scored=len(task_scores[ks[0]]),
            test_inputs_scored=scored_inputs,
            tasks_with_votes=len({t for t, _ in self._votes}),
            votes=votes,
            abstained=self.abstained,
            candidates_per_input=(sum(len(v) for v in self._votes.values()) / len(self._votes)) if self._votes else 0.0,
        )
        return out

    def submission(self, attempts: int = 2) -> dict[str, list[dict[str, list[list[int]]]]]:
        """ARC Prize submission: per task, per test input, ``attempt_1 .. attempt_<attempts>`` grids.

        Empty candidates are skipped (not a valid ARC grid); missing candidates repeat the last
        one; a test input with no non-empty candidate gets [[0]].
        """
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        out = {}
        for t, task_id in enumerate(self.eval_set.task_ids):
            entries = []
            for j in range(len(self.eval_set.solutions[t])):
                grids = [c.grid.tolist() for c in self.ranked(t, j) if c.grid.size][:attempts] or [[[0]]]
                grids += [grids[-1]] * (attempts - len(grids))
                entries.append({f"attempt_{a + 1}": grids[a] for a in range(attempts)})
            out[task_id] = entries
        return out

    def write_submission(self, path: str | Path, attempts: int = 2) -> dict[str, Any]:
        """Write ``submission.json`` (validated first); returns the submission."""
        submission = self.submission(attempts)
        validate_submission(submission, {t: len(s) for t, s in zip(self.eval_set.task_ids, self.eval_set.solutions)}, attempts)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(submission))
        return submission


def _numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _grid_problem(grid: Any) -> str | None:
    """What is wrong with a submitted grid, or None."""
    if not isinstance(grid, list) or not grid:
        return "is not a non-empty list of rows"
    if not all(isinstance(row, list) and row for row in grid):
        return "has a row that is not a non-empty list"
    if len({len(row) for row in grid}) != 1:
        return "is not rectangular (rows of different lengths)"
    if len(grid) > GRID_SIZE or len(grid[0]) > GRID_SIZE:
        return f"is larger than {GRID_SIZE}x{GRID_SIZE}"
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < NUM_COLOURS for row in grid for x in row):
        return "has a cell that is not an integer 0-9"
    return None


def validate_submission(submission: Any, expected_tests: Mapping[str, int] | None = None, attempts: int = 2) -> None:
    """Raise :class:`SubmissionError` unless ``submission`` (a dict, or a path to its JSON) is an
    ARC Prize submission: ``{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}`` with one
    dict per test input, exactly the keys ``attempt_1 .. attempt_<attempts>``, each grid a
    rectangular list of lists of integers 0-9 of at most 30x30. With ``expected_tests``
    (task id -> number of test inputs) every task must be present with that many entries and no
    other task may appear.
    """
    if isinstance(submission, (str, Path)):
        path = Path(submission)
        try:
            submission = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SubmissionError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(submission, dict):
        raise SubmissionError(f"a submission is a JSON object mapping task ids to lists, got {type(submission).__name__}")
    keys = {f"attempt_{a + 1}" for a in range(attempts)}
    problems = []
    for task_id, entries in submission.items():
        if not isinstance(task_id, str) or not task_id:
            problems.append(f"task id {task_id!r} is not a non-empty string")
            continue
        if not isinstance(entries, list) or not entries:
            problems.append(f"task {task_id}: expected a non-empty list with one dict per test input")
            continue
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict):
                problems.append(f"task {task_id} test {j}: expected a dict with keys {sorted(keys)}")
                continue
            if set(entry) != keys:
                problems.append(f"task {task_id} test {j}: keys {sorted(entry)} but expected exactly {sorted(keys)}")
            for name in sorted(keys & set(entry)):
                problem = _grid_problem(entry[name])
                if problem:
                    problems.append(f"task {task_id} test {j} {name}: grid {problem}")
    if expected_tests is not None:
        for task_id, count in expected_tests.items():
            if task_id not in submission:
                problems.append(f"task {task_id} is missing")
            elif isinstance(submission[task_id], list) and len(submission[task_id]) != count:
                problems.append(f"task {task_id}: {len(submission[task_id])} entries for {count} test inputs")
        extra = sorted(set(submission) - set(expected_tests), key=str)
        if extra:
            problems.append(f"unknown task id(s): {', '.join(map(str, extra[:5]))}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise SubmissionError("invalid ARC submission: " + "; ".join(problems[:10]) + more)


def score_submission(submission: Mapping[str, Any], solutions: Mapping[str, Iterable[Any]]) -> float:
    """ARC Prize score of a (valid) submission: mean over the tasks of ``solutions`` of the fraction
    of their test inputs where some attempt equals the solution grid."""
    scores = []
    for task_id, task_solutions in solutions.items():
        task_solutions = [np.asarray(s).tolist() for s in task_solutions]
        entries = submission.get(task_id, [])
        hits = sum(
            1 for j, solution in enumerate(task_solutions)
            if j < len(entries) and any(attempt == solution for attempt in entries[j].values())
        )
        scores.append(hits / len(task_solutions) if task_solutions else 0.0)
    return float(np.mean(scores)) if scores else 0.0


__all__ = ["PASS_KS", "ArcEvalSet", "ArcVoter", "Candidate", "SubmissionError", "score_submission", "validate_submission"]
