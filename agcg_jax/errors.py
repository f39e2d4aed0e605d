"""User-facing errors.

Anything a user can get wrong (a path, a config key, a dataset that is not
there) raises `UserError` with one line naming the file or option. The CLI
prints that line and exits non-zero; it never shows a traceback for these.
"""


class UserError(Exception):
  """A problem with the user's input, reported as one line, exit status 2."""
