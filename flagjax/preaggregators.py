"""Placeholder: being written (see the open issues)."""

def nnm(*args, **kwargs):
  raise NotImplementedError("nnm is being written")


def bucketing(*args, **kwargs):
  raise NotImplementedError("bucketing is being written")


def clip(*args, **kwargs):
  raise NotImplementedError("clip is being written")


def arc(*args, **kwargs):
  raise NotImplementedError("arc is being written")


