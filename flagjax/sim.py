"""Placeholder: being written (see the open issues)."""

def make_train_step(*args, **kwargs):
  raise NotImplementedError("make_train_step is being written")


