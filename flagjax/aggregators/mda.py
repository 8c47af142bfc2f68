"""Placeholder: being written (see the open issues)."""

def mda(*args, **kwargs):
  raise NotImplementedError("mda is being written")


