"""`kubeci validate FILE...`: check pipeline files from the shell or a pre-commit hook.

Exit status: 0 when every file is valid, 1 when any file has problems, 2 for a usage
error or a file that cannot be read. Problems go to standard output, one per line as
`FILE:LINE:COLUMN: PATH: MESSAGE`, or as one JSON array with `--format json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO, Any, NoReturn

from pipelines_schema.loader import MAX_FILE_BYTES, file_too_large, validate_text
from pipelines_schema.problems import Problem

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
STDIN_NAME = "-"


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An argument parser that returns its exit status to `main` instead of exiting."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Check KubeCI pipeline files (.kubeci.yml) and report every problem.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="pipeline file; '-' reads stdin")
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="output format: text lines FILE:LINE:COLUMN: PATH: MESSAGE (default) or a JSON array",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "kubeci validate") -> int:
    """Validate the files named in `argv` (default: the command line); return the exit status."""
    parser = _parser(prog)
    try:
        options = parser.parse_args(argv)
    except _ParserExit as stop:
        return stop.status
    problems: list[Problem] = []
    valid_files: list[str] = []
    unreadable = False
    for filename in options.files:
        found = _validate_file(filename, prog)
        if found is None:
            unreadable = True
            continue
        problems.extend(found)
        if not found:
            valid_files.append(filename)
    _write(sys.stdout, options.format, problems, valid_files)
    if unreadable:
        return EXIT_USAGE
    return EXIT_INVALID if problems else EXIT_VALID


def _validate_file(filename: str, prog: str) -> list[Problem] | None:
    """Return the problems of one file, or None after reporting that it cannot be read."""
    try:
        if filename == STDIN_NAME:
            return validate_text(sys.stdin.buffer.read(), "<stdin>")
        with open(filename, "rb") as stream:
            size_bytes = os.fstat(stream.fileno()).st_size
            if size_bytes > MAX_FILE_BYTES:
                return [file_too_large(filename, size_bytes)]
            return validate_text(stream.read(MAX_FILE_BYTES + 1), filename)
    except OSError as error:
        reason = error.strerror or str(error)
        sys.stderr.write(f"{prog}: cannot read {filename}: {reason}\n")
        return None


def _write(out: IO[str], output_format: str, problems: list[Problem], valid: list[str]) -> None:
    if output_format == "json":
        records: list[dict[str, Any]] = [problem.to_dict() for problem in problems]
        out.write(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        return
    for problem in problems:
        out.write(problem.format() + "\n")
    for filename in valid:
        out.write(f"{filename}: valid\n")
