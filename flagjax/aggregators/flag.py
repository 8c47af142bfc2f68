"""Placeholder: being written (see the open issues)."""

def flag(*args, **kwargs):
  raise NotImplementedError("flag is being written")


def flag_solve(*args, **kwargs):
  raise NotImplementedError("flag_solve is being written")


FlagResult = None
