"""Two processes on localhost (``jax.distributed``, 4 CPU devices each, gloo collectives)
train as one: bitwise equal across the processes and equal to this process's 8 devices.

One configuration per kind of aggregator state: a Gram-space rule (Krum), a coordinate-wise
rule (trimmed mean), a stateful rule (centered clipping around the last aggregate with worker
momentum) and ``aggregating.process(nnm, flag, adam)``. Each process passes host-local numpy
params, ``tx.init`` state and a plain ``jax.random.key``, as a user would.
"""

import tempfile

import numpy as np
from absl.testing import absltest

from experiments import multihost

STEPS = 3


class TwoProcessTest(absltest.TestCase):

  def test_two_processes_equal_one_process_with_every_kind_of_state(self):
    with tempfile.TemporaryDirectory() as out:
      hosts = multihost.launch(2, 4, out, STEPS, multihost.CONFIGS, timeout=400)
    self.assertTrue(all(int(h["num_devices"]) == 8 for h in hosts))
    self.assertTrue(all(bool(h["pmap_refused"]) for h in hosts))
    for name in multihost.CONFIGS:
      key = f"{name}/params"
      np.testing.assert_array_equal(hosts[1][key], hosts[0][key], err_msg=name)
      single = multihost.train(name, STEPS)  # this process: 8 devices, one host
      # Flag's IRLS amplifies the reduction order of K (gloo vs in-process sums) to ~1e-7.
      np.testing.assert_allclose(hosts[0][key], single["params"], rtol=1e-5, atol=2e-6,
                                 err_msg=name)
      np.testing.assert_allclose(hosts[0][f"{name}/losses"], single["losses"], rtol=1e-5)
      # Training moved: the params left zero.
      self.assertGreater(np.abs(single["params"]).max(), 1e-3, msg=name)


if __name__ == "__main__":
  absltest.main()
