"""Placeholder: being written (see the open issues)."""

def geometric_median(*args, **kwargs):
  raise NotImplementedError("geometric_median is being written")


