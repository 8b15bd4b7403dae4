"""One workdir, one run: an exclusive lock, and the checks that a workdir can be written.

``WorkdirLock(workdir).acquire()`` creates ``workdir/.lock`` and holds an exclusive
``fcntl.flock`` on it; the file records the holder ({"pid", "host", "since"}). The
operating system drops the lock when the holding process ends in any way (SIGKILL
included), so a lock file that exists but that nobody holds is stale: the next run takes it
over with a one-line warning naming the run that left it. A run that finds the lock held
fails at once with :class:`~train.errors.UserError` naming the holder. ``release`` removes
the file. In a multi-process run each process takes its own lock (``.lock`` for process 0,
``.lock.<i>`` for process i), so processes of one run on a shared file system do not
block each other, while a second run's processes are refused. flock works on local file
systems; on network file systems without lock support it may not exclude other hosts.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from train import errors

LOCK_NAME = ".lock"


def lock_name(process_index: int = 0) -> str:
  """The lock file name of one process of a run: .lock, or .lock.<i> for process i > 0."""
  return LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"


def describe_holder(info: dict) -> str:
  """"pid P on host H since T" from a lock file's record (what is known of it)."""
  return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
          f"since {info.get('since', '?')}")


def _read_record(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", "replace")
  try:
    record = json.loads(text) if text.strip() else {}
  except json.JSONDecodeError:
    return {}
  return record if isinstance(record, dict) else {}


def prepare_workdir(workdir: str) -> str:
  """Creates ``workdir`` (and its parents) unless it exists; returns its absolute path.

  Raises:
    UserError: the path (or a parent) is a file, or cannot be created or written.
  """
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
  except FileExistsError as err:
    raise errors.UserError(
        f"--workdir={workdir} is a file, not a directory; choose another --workdir "
        "(or move the file away).") from err
  except NotADirectoryError as err:
    raise errors.UserError(
        f"--workdir={workdir}: a parent of it is a file; choose another --workdir.") from err
  except PermissionError as err:
    raise permission_error(workdir, err) from err
  return path


def permission_error(workdir: str, err: OSError) -> errors.UserError:
  """The one-line error for a workdir (or a file in it) this process may not write."""
  where = err.filename or workdir
  return errors.UserError(
      f"no permission to write {where} ({err.strerror or err}); give this user write access "
      f"to --workdir={workdir} (chmod u+w) or choose another --workdir.")


class WorkdirLock:
  """An exclusive lock on ``workdir`` held by this process until :meth:`release`.

  Args:
    workdir: the run's directory (created if missing).
    process_index: this process's index in a multi-process run (its own lock file).
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = workdir
    self.path = os.path.join(os.path.abspath(workdir), lock_name(process_index))
    self._fd: int | None = None
    self.stale: dict | None = None  # the record of a stale lock taken over, if any

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (or fails at once); returns self.

    Raises:
      UserError: another process holds it (naming pid, host and start time), or the
        workdir cannot be created or written.
    """
    if self._fd is not None:
      return self
    prepare_workdir(self.workdir)
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except PermissionError as err:
        raise permission_error(self.workdir, err) from err
      except IsADirectoryError as err:
        raise errors.UserError(f"{self.path} is a directory; remove it (it is the run's lock "
                               "file name).") from err
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as err:
        holder = _read_record(fd)
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise
        raise errors.UserError(
            f"--workdir={self.workdir} is in use by another run ({describe_holder(holder)}); "
            "wait for it to finish, stop it, or choose another --workdir.") from None
      # A releasing run may have removed the file between our open and our flock: then we
      # hold a lock on a file nobody else sees, so try again on the path's current file.
      try:
        now, held = os.stat(self.path), os.fstat(fd)
        same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    self._fd = fd
    record = _read_record(fd)
    if record:
      self.stale = record
      errors.warn(f"took over the stale lock of {describe_holder(record)} on "
                  f"{self.workdir} (that run ended without releasing it).")
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (text + "\n").encode())
    os.fsync(fd)
    return self

  def release(self) -> None:
    """Removes the lock file and drops the lock (a no-op when not held)."""
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # While still holding it: no one can take it in between.
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
