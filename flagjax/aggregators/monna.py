"""Placeholder: being written (see the open issues)."""

def monna(*args, **kwargs):
  raise NotImplementedError("monna is being written")


