"""``config.compare_with``: the models trained after the main one with the same settings.

The value is "" or comma-separated entries, each ``model`` or ``model:key=value;key=value``
(that entry's model_kwargs; values read as on the command line: bool, int, float, else a
string). ``train.trainer.train_and_evaluate`` trains each entry in :func:`compared_dir`.
"""

from __future__ import annotations

import os
from typing import Any

from train.errors import UserError


def _parse_value(text: str) -> Any:
  """A model_kwargs value as the command line reads it: bool, int, float, else the string."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text.strip()


def parse_compare_with(text: str) -> list[tuple[str, str, dict[str, Any]]]:
  """``config.compare_with`` -> [(entry, model, model_kwargs)], one per comma-separated entry
  ``model`` or ``model:key=value;key=value`` (values bool / int / float / str). "" -> [].

  Raises:
    UserError: an entry with an empty model name or a ``key=value`` pair without "=".
  """
  entries = []
  for entry in (e.strip() for e in str(text or "").split(",")):
    if not entry:
      continue
    name, _, rest = entry.partition(":")
    kwargs: dict[str, Any] = {}
    for pair in (p.strip() for p in rest.split(";")):
      if not pair:
        continue
      key, eq, value = pair.partition("=")
      if not eq or not key.strip():
        raise UserError(
            f"config.compare_with entry {entry!r}: {pair!r} is not key=value; write "
            "entries as model or model:key=value;key=value, separated by commas.")
      kwargs[key.strip()] = _parse_value(value)
    if not name.strip():
      raise UserError(f"config.compare_with entry {entry!r} names no model; write "
                       "model or model:key=value;key=value.")
    entries.append((entry, name.strip(), kwargs))
  return entries


def compared_dir(workdir: str, entry: str, several: bool) -> str:
  """Where a compare_with entry trains: workdir/baseline for a single entry, else
  workdir/compared/<entry with characters other than letters, digits, "-", "_", "=" and "."
  replaced by "_">."""
  if not several:
    return os.path.join(workdir, "baseline")
  safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in entry)
  return os.path.join(workdir, "compared", safe)
