"""The `onnxprune` command line: argparse subcommands mapped onto the Python API.

`parser` builds the argument parser, `commands` runs each subcommand, `entry` turns every
way a command can end into an exit status and one line on stderr. Heavy modules (onnx,
onnxruntime, numba) are imported inside the commands so that `onnxprune --help` answers
at once.
"""

from .commands import COMMANDS
from .entry import main, run
from .parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main", "run"]
