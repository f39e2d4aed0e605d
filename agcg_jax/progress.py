"""Progress bars that read well in a terminal and in a log file.

In a terminal: tqdm as usual. Written to a file or a CI log, tqdm's
carriage-return updates would pile up into one unreadable line per refresh;
there the bar prints a plain line at most every `LOG_INTERVAL_S` seconds (and
its last state), so a 2,000-step stage is a handful of lines.
"""
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def interactive(stream=None) -> bool:
  stream = stream or sys.stderr
  return bool(getattr(stream, "isatty", lambda: False)())


class _Lines:
  """A file for tqdm that turns each refresh into one plain line."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").replace("\x1b[A", "").strip()
    if text:
      self._stream.write(text + "\n")

  def flush(self) -> None:
    self._stream.flush()


def bar(iterable=None, **kwargs) -> tqdm:
  """tqdm(iterable, **kwargs) in a terminal; plain timed lines elsewhere."""
  stream = kwargs.pop("file", None) or sys.stderr
  if interactive(stream):
    return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
  kwargs.pop("dynamic_ncols", None)
  return tqdm(iterable, file=_Lines(stream), ncols=100, mininterval=LOG_INTERVAL_S,
              maxinterval=LOG_INTERVAL_S, **kwargs)
