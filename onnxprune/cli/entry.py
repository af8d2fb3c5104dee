"""How a command runs and ends: logging to stderr for its duration, then one exit status
(and one line on stderr) for every way it can end: success, user error, bug, Ctrl-C,
closed pipe."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from .commands import COMMANDS
from .parser import build_parser

if TYPE_CHECKING:
    from .parser import _Parser


@contextlib.contextmanager
def _logging_to_stderr(args: argparse.Namespace):
    """Log to stderr for one command; put the logger back after (main() may run in-process)."""
    root = logging.getLogger("onnxprune")
    saved = (root.handlers[:], root.level, root.propagate)
    _setup_logging(args)
    try:
        yield
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", 0):
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    if getattr(args, "quiet", False):
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("onnxprune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status: 0 success, 1 validation failed, 2 user
    error, 3 internal error (a bug), 130 interrupted, 141 stdout closed by its reader."""
    args = None
    try:
        parser, args = _parse(argv)
        if not args.command:
            parser.print_help()
            return 2
        with _logging_to_stderr(args):
            if getattr(args, "recipe", None):  # its values become defaults: options win
                from ..recipe import parse_with_recipe

                args = parse_with_recipe(parser, parser.prune_parser, argv, args.recipe)
            return COMMANDS[args.command](args)
    except SystemExit:
        raise
    except BaseException as exc:  # every way a command can end gets its exit status here
        return _exit_status(exc, verbose=getattr(args, "verbose", 0))


def _parse(argv: list[str] | None) -> tuple[_Parser, argparse.Namespace]:
    """Parse the command line, refusing a bad argument before anything heavy is imported.

    The options parts declare (``--ria-alpha``) need every part class imported, numba and
    onnx with them: the first pass leaves them out and only checks the other arguments;
    the whole parser runs when a part option, a recipe or `prune --help` is given.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    helped = any(word in ("-h", "--help") for word in words)
    if not helped or "prune" not in words:  # only prune's help lists the part options
        core = build_parser(with_parts=False)
        args, unknown = core.parse_known_args(words)
        if not unknown and not getattr(args, "recipe", None):
            return core, args
    parser = build_parser()
    return parser, parser.parse_args(words)


def _exit_status(exc: BaseException, verbose: int) -> int:
    """Say in one line on stderr how the command ended, and return its exit status.

    With -v a user error's traceback follows its line, with the error it was raised from
    (onnx, onnxruntime, the OS); an internal error is re-raised whole.
    """
    from ..errors import OnnxPruneError, ValidationFailed

    if _interrupted(exc):
        _say("onnxprune: interrupted")
        return 130
    if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
        _discard_stdout()  # what is still buffered cannot be delivered
        return 141  # 128 + SIGPIPE, as a tool killed by the closed pipe reports
    if isinstance(exc, (OnnxPruneError, ValidationFailed)):
        _say(f"onnxprune: error: {exc}")
        if verbose and isinstance(exc, OnnxPruneError):
            # where it was raised, and the onnx/onnxruntime/OS error it was chained from
            _say_traceback(exc)
        return exc.exit_code
    if isinstance(exc, MemoryError):
        _say("onnxprune: error: out of memory")
        return 2
    if verbose or not isinstance(exc, Exception):
        raise exc
    _say(f"onnxprune: internal error: {type(exc).__name__}: {exc} "
         "(run with -v for the traceback)")
    return 3


def _interrupted(exc: BaseException) -> bool:
    """Whether Ctrl-C caused `exc`: a KeyboardInterrupt anywhere in its chain.

    A SIGINT that lands inside compiled code (a numba kernel, onnxruntime) can surface as
    "SystemError: ... returned a result with an exception set", with the KeyboardInterrupt
    as its context.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        stack += [current.__cause__, current.__context__]
    return False


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (`onnxprune inspect M | head -1`).

    The write end of such a pipe polls as an error; a BrokenPipeError from another pipe
    (a child process) leaves stdout healthy.
    """
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file behind stdout
        return False


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that no later flush raises again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def _say(line: str) -> None:
    """One line on stderr; a closed stderr leaves nothing to say it on."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _say_traceback(exc: BaseException) -> None:
    """The traceback of `exc` on stderr, with the exceptions it was raised from."""
    import traceback

    try:
        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def run() -> None:
    """The console script: `main`, then exit without the interpreter's teardown.

    The output is committed (renamed into place) and the report written before `main`
    returns; what remains is finalising numba and llvmlite, which costs ~0.3 s a run here.
    """
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(status)
