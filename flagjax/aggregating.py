"""Placeholder: being written (see the open issues)."""

def aggregate(*args, **kwargs):
  raise NotImplementedError("aggregate is being written")


