"""Placeholder: being written (see the open issues)."""

def krum(*args, **kwargs):
  raise NotImplementedError("krum is being written")


def multi_krum(*args, **kwargs):
  raise NotImplementedError("multi_krum is being written")


def bulyan(*args, **kwargs):
  raise NotImplementedError("bulyan is being written")


