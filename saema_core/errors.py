"""The base of saema's own errors: an expected failure whose message says what was wrong and where.

Every error saema raises about its input (a hook, a prompt file, a store, a checkpoint, a model)
derives from `SaemaError`, a `ValueError`: the command line prints it as one line, and flow and task
logs show it as one line instead of a traceback (`tasks.quiet_errors`).
"""

from __future__ import annotations

import errno


class SaemaError(ValueError):
    """An expected failure; its message names what was wrong and where."""


#: OS errors about the user's environment rather than a bug: full disk, quota, read-only, permission.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_expected(error: BaseException) -> bool:
    """Whether `error` is one the user can act on from its message alone (no traceback needed)."""
    return isinstance(error, SaemaError) or (isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS)


def describe_os_error(error: OSError) -> str:
    """`no space left on device: /path` — the cause and the file, in one line."""
    cause = (error.strerror or str(error)).lower()
    where = error.filename or ""
    return f"{cause}: {where}" if where else cause
