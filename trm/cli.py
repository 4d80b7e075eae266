"""The one error format of every ``trm`` command line.

Every entry point (``trm.train``, ``trm.data``, ``trm.evaluate``, ``trm.export``, ``trm.serve``,
``trm.plot``) runs its work through :func:`run`::

    def main(argv=None) -> int:
        return cli.run("trm.export", _main, argv, interrupted="run the same command again")

which gives every command the same behaviour:

- an expected failure (bad arguments, config, data, checkpoints, files, permissions, devices)
  prints one paragraph ``<prog>: error: <what is wrong and what to do>`` on stderr and exits 2;
- Ctrl+C prints ``<prog>: interrupted ...`` with how to continue, and exits 130;
- anything else is a bug of ours: the traceback, then a line asking to report it, exit 1;
- ``--version`` prints ``<prog> (trm X.Y.Z, torch A.B, Python C.D)`` and exits 0.

An expected failure is an exception of one of the classes named in :data:`EXPECTED_ERRORS`
(each module's own error class, e.g. ``trm.config.ConfigError``), an ``OSError`` (files and
permissions: explained by :func:`describe_os_error`), or ``torch.OutOfMemoryError``. Under
torchrun only rank 0 prints expected errors; a bug's traceback is printed by every rank.

Helpers shared by the commands: :class:`ArgumentParser` (argparse whose errors are this format,
with "did you mean" for a mistyped option), :func:`ensure_writable_dir` (create a folder the
command will write and prove it is writable before any work), :func:`check_device`.

Test: ``pytest tests/test_cli_errors.py``.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Sequence

EXPECTED_ERRORS = (
    "trm.cli.CommandError",
    "trm.config.ConfigError",
    "trm.data.format.DatasetError",
    "trm.data.sudoku.PuzzleGenerationError",
    "trm.data.maze.MazeGenerationError",
    "trm.eval.arc_vote.SubmissionError",
    "trm.train.checkpoint.CheckpointError",
    "trm.train.trainer.NonFiniteLossError",
    "trm.train.__main__.RunError",
    "trm.evaluate.EvaluateError",
    "trm.export.ExportError",
    "trm.serve.ServeError",
)
"""Exception classes (module.Class) whose message is written for the user: printed as the error
paragraph, no traceback. A class counts once its module is imported (an error cannot be of a
class whose module was never loaded), so this list imports nothing."""

REPORT_BUG = ("this is a bug in trm, not a mistake of yours. Please report it on the project's issue tracker "
              "with the command you ran, the traceback above and the version line of `{prog} --version`.")


class CommandError(ValueError):
    """A command-line request that cannot be carried out; the message says why and what to do."""


def version() -> str:
    """``trm X.Y.Z, torch A.B.C, Python D.E.F`` (the installed package's version, else pyproject's)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as package_version

        trm_version = package_version("trm")
    except (ImportError, PackageNotFoundError):
        trm_version = "unknown"
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return f"trm {trm_version}, torch {torch_version}, Python {sys.version.split()[0]}"


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _class_names(err: BaseException) -> set[str]:
    """module.Class of the error's class and its bases; a class of the module run as ``python -m
    trm.x`` (module ``__main__``) is named by that module's real name."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    names = set()
    for cls in type(err).__mro__:
        module = main_spec.name if cls.__module__ == "__main__" and main_spec is not None else cls.__module__
        names.add(f"{module}.{cls.__qualname__}")
    return names


def _is_expected(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    names = _class_names(err)
    return "torch.OutOfMemoryError" in names or any(name in names for name in EXPECTED_ERRORS)


_OS_ERROR_HINTS = {
    errno.EACCES: "you lack the permission: pick a path you own, or fix its permissions",
    errno.EPERM: "the system does not allow this here: pick a path on an ordinary disk that you own",
    errno.ENOENT: "a folder on the way does not exist or cannot hold files (as under /proc): check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: pick another path",
    errno.EISDIR: "it is a folder, where a file was expected",
    errno.EEXIST: "something of that name already exists",
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "your disk quota is used up: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EADDRINUSE: "another program already listens there: pick another port (--port)",
}


def describe_os_error(err: OSError) -> str:
    """One sentence: the path, what the system said, and what to do about it."""
    reason = err.strerror or str(err)
    what = f"{err.filename}: {reason}" if err.filename else reason
    if err.filename2:
        what += f" (with {err.filename2})"
    hint = _OS_ERROR_HINTS.get(err.errno or -1)
    if hint:
        return f"{what}; {hint}."
    return what if what.endswith((".", "?", "!")) else f"{what}."


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError):
        return describe_os_error(err)
    if "torch.OutOfMemoryError" in _class_names(err):
        first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        return (f"the device ran out of memory ({first}). Lower the batch (train.global_batch_size, "
                f"train.eval_batch_size), the model size, or use more devices.")
    return str(err).strip() or type(err).__name__


def print_error(prog: str, message: str) -> None:
    """``<prog>: error: MESSAGE`` on stderr as one paragraph (blank lines removed), on rank 0."""
    if not _is_main_rank():
        return
    text = "\n".join(line for line in message.strip().splitlines() if line.strip())
    sys.stdout.flush()
    print(f"{_end_progress_line()}{prog}: error: {text}", file=sys.stderr, flush=True)


def _end_progress_line() -> str:
    """A newline when a progress bar is still open (its line has no end yet), so that an error
    starts a line of its own; '' otherwise."""
    tqdm = sys.modules.get("tqdm")
    bars = getattr(getattr(tqdm, "tqdm", None), "_instances", ())
    return "\n" if any(not getattr(bar, "disable", True) for bar in list(bars)) else ""


def run(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        interrupted: str | Callable[[list[str]], str] = "nothing was changed that a rerun would not redo: "
                                                         "run the same command again") -> int:
    """Run ``main(argv)`` with the shared error format; returns the exit status.

    ``interrupted``: how to continue after Ctrl+C (a sentence, or a function of argv)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"{prog} ({version()})")
        return 0
    try:
        status = main(args)
        return 0 if status is None else int(status)
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if _is_main_rank():
            how = interrupted(args) if callable(interrupted) else interrupted
            sys.stdout.flush()
            print(f"\n{prog}: interrupted (Ctrl+C); {how}", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place where every failure is sorted
        if _is_expected(err):
            print_error(prog, _describe(err))
            return 2
        traceback.print_exc()
        print(f"{prog}: {REPORT_BUG.format(prog=prog)}", file=sys.stderr)
        print(f"{prog}: version: {version()}", file=sys.stderr, flush=True)
        return 1


class UsageError(CommandError):
    """An argument the parser rejects (unknown option, missing value, wrong type)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise :class:`UsageError` (printed by :func:`run` as one paragraph)
    and suggest the closest option for a mistyped one."""

    def _all_options(self) -> list[str]:
        """Option strings of this parser and of every subcommand below it."""
        options = []
        for action in self._actions:
            options += action.option_strings
            if isinstance(action, argparse._SubParsersAction):
                for sub in set(action.choices.values()):
                    options += sub._all_options() if isinstance(sub, ArgumentParser) else []
        return options

    def error(self, message: str) -> NoReturn:
        unknown = message.partition("unrecognized arguments: ")[2].split()
        options = self._all_options()
        for arg in unknown:
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1) if arg.startswith("-") else []
            if close:
                message += f" (did you mean {close[0]}?)"
                break
        raise UsageError(f"{message}. See `{self.prog} --help`.")


def ensure_writable_dir(path: str | Path, what: str, fix: str | None = None, create: bool = True) -> Path:
    """Prove that files can be written in the folder ``path``, creating it (and its parents) when
    ``create``; otherwise only prove that it could be created (nothing is made). A CommandError
    naming ``what`` (e.g. ``run_dir``) and saying ``fix`` (default: pick another) otherwise."""
    path = Path(path)
    fix = fix or f"Pick another {what}."
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise CommandError(f"{what} {path} cannot be a folder{where}: a file stands in its place. {fix}")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".trm-write-test-", dir=path if create else existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        verb = "cannot be written" if existing == path else "cannot be created"
        hint = _OS_ERROR_HINTS.get(err.errno or -1)
        raise CommandError(f"{what} {path} {verb} ({err.strerror or err}){f'; {hint}' if hint else ''}. {fix}") from None
    return path


def check_device(device: str, key: str = "device") -> None:
    """A CommandError when ``device`` asks for CUDA and no CUDA GPU is visible."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise CommandError(f"{key}=cuda was asked for, but no CUDA GPU is visible on this machine "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). "
                           f"Use {key}=cpu, or {key}=auto to take a GPU when there is one.")
