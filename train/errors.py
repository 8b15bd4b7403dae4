"""User-facing errors: one line, the cause and the fix.

``UserError("cause; fix")`` is raised for problems the user can correct (a config value, a
flag, a file, a workdir, a dataset, a checkpoint). The command-line entry points
(``python -m train``, ``python -m train.visualize``) print it as ``error: <message>`` and
exit with status 2; ``--debug`` or ``ATTENTION_FLAX_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import NoReturn

DEBUG_ENV = "ATTENTION_FLAX_DEBUG"
EXIT_CODE = 2


class UserError(ValueError):
  """A problem the user can fix; ``str(err)`` is one line: what is wrong, then what to do.

  A ValueError, so that code catching bad values catches these too."""


def debug_requested(argv: list[str] | None = None) -> bool:
  """Whether tracebacks were asked for: ``--debug`` in ``argv`` or ATTENTION_FLAX_DEBUG set
  to something other than "", "0" or "false"."""
  if argv is not None and any(a in ("--debug", "-debug", "--debug=true", "--debug=1")
                              for a in argv):
    return True
  return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(err: BaseException) -> str:
  """``err`` as one line of text: its message with newlines folded, or its type name when
  the message is empty."""
  text = " ".join(str(err).split())
  return text or type(err).__name__


def warn(message: str) -> None:
  """Prints ``warning: <message>`` as one line on stderr."""
  print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _chain(err: BaseException):
  """``err`` and the exceptions it was raised from or while handling, outermost first."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    yield err
    err = err.__cause__ or err.__context__


def user_message(err: BaseException, known: tuple[type, ...] = (ValueError, TypeError, OSError)
                 ) -> str | None:
  """The one line to show for ``err``, or None when it is not a user's problem (a bug,
  whose traceback should be shown).

  A full disk or a permission error anywhere in the chain of causes is named as such
  (libraries such as orbax wrap them); a UserError, a SyntaxError (of a config file) and
  the ``known`` types give their own message.
  """
  if isinstance(err, UserError):
    return one_line(err)
  for cause in _chain(err):
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
      where = f" writing {cause.filename}" if cause.filename else ""
      return (f"no space left on the device{where}; free some space or choose a --workdir "
              "on another disk (the checkpoints saved so far are intact).")
    if isinstance(cause, PermissionError) or (
        isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EROFS)):
      where = cause.filename or "a file"
      return (f"no permission to access {where} ({cause.strerror or cause}); fix its "
              "permissions or choose another --workdir.")
  if isinstance(err, SyntaxError) and not isinstance(err, UserError):
    return (f"syntax error in {err.filename} line {err.lineno}: {err.msg}; fix that file.")
  if isinstance(err, known):
    return one_line(err)
  return None


def exit_with(err: BaseException, debug: bool, known: tuple[type, ...] = (
    ValueError, TypeError, OSError)) -> NoReturn:
  """Prints ``error: <message>`` (after the traceback when ``debug``) and exits with
  :data:`EXIT_CODE`; re-raises ``err`` when it is not a user's problem."""
  message = user_message(err, known)
  if message is None:
    raise err
  if debug:
    traceback.print_exception(err)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_CODE)
