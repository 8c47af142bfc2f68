"""flagjax: Byzantine-robust aggregation for JAX.

The Flag Aggregator (Almasi et al., ICLR 2024) and the classic robust rules as pure, jittable,
vmappable functions of stacked worker updates; pre-aggregators; Byzantine attacks; an optax
``Aggregator``; and a worker simulator on one device (vmap) or many (pmap, shard_map).
"""

from flagjax import aggregators
from flagjax import attacks
from flagjax import core
from flagjax import preaggregators
from flagjax import sim
from flagjax.aggregating import AggregateState
from flagjax.aggregating import WorkerMomentumState
from flagjax.aggregating import aggregate
from flagjax.aggregating import preaggregate
from flagjax.aggregating import worker_momentum

__version__ = "0.1.0"

__all__ = ["AggregateState", "WorkerMomentumState", "aggregate", "aggregators", "attacks", "core",
           "preaggregate", "preaggregators", "sim", "worker_momentum"]
