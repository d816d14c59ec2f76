"""The one error path for bad input, shared by every stage (torch-free; the JAX side uses it too).

Anything the user asked for that cannot work raises a ``UsageError`` (each stage has its own
subclass: ``StoreError``, ``ConfigError``, ...) whose message is one line saying what is wrong and
what to do. The CLI runner (``extractor.cli.run_main``) turns it into ``error: <message>`` on
stderr and exit status 2, with no traceback; no entry point keeps its own list of exceptions.
Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import NoReturn


class UsageError(ValueError):
    """A request that cannot work; the message says what is wrong and what to do."""


class UsageExit(SystemExit):
    """How an entry point ends on a usage error: exit status 2; ``str()`` is the line printed."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def one_line(err: BaseException) -> str:
    return "error: " + " ".join(str(err).split())


def exit_usage(err: BaseException) -> NoReturn:
    """Print ``err`` as one line on stderr and exit with status 2."""
    line = one_line(err)
    print(line, file=sys.stderr, flush=True)
    raise UsageExit(line) from None


def disk_full_error(err: OSError) -> UsageError | None:
    """A full disk or an exceeded file-size limit as a usage error (the rerun resumes), else None."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = err.filename or "while writing"
        return UsageError(f"out of disk space ({where}): free space and rerun the same command to resume; "
                          "finished work is kept")
    return None
