"""The one error path for bad input, shared by every stage (torch-free; the JAX side uses it too).

Anything the user asked for that cannot work raises a ``UsageError`` (each stage has its own
subclass: ``StoreError``, ``ConfigError``, ...) whose message is one line saying what is wrong and
what to do. The CLI runner (``sae_core.cli.run_main``) turns it into ``error: <message>`` on
stderr and exit status 2, with no traceback; no entry point keeps its own list of exceptions.
Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import errno
import re
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


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# tensorstore and orbax report a failed write as ValueError/Exception text carrying the OS error
_FULL_TEXT = re.compile("|".join([*(rf"os_error_code='{code}'" for code in _FULL), "No space left on device",
                                  "Disk quota exceeded", "File too large"]))
_FILE_TEXT = re.compile(r'(?:writing|write to)(?: local file)? "([^"]+)"')


def disk_full_error(err: BaseException) -> UsageError | None:
    """A full disk or an exceeded file-size limit (an OSError, or tensorstore's or orbax's error
    around one) as a usage error: the rerun resumes. None for anything else."""
    if isinstance(err, OSError) and err.errno in _FULL:
        where = err.filename or "while writing"
    else:
        text = "".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
        if not _FULL_TEXT.search(text):
            return None
        found = _FILE_TEXT.search(text)
        where = found.group(1) if found else "while writing"
    return UsageError(f"out of disk space ({where}): free space and rerun the same command to resume; "
                      "finished work is kept")
