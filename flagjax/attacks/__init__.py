r"""Byzantine attacks: what the ``f`` Byzantine workers send, or the data they train on.

Gradient attacks share one signature,

    ``attack(honest, f, key=None, *, axis_name=None, **hparams) -> byzantine``,

where ``honest`` holds the honest workers' updates stacked on a leading axis (``[h, ...]`` or
a pytree of such leaves) and the result holds ``f`` rows in the same structure and dtype
(``[f, ...]``; integer or bool honest rows give float32 rows, as the rules return, never
truncated values). Hyperparameters are keyword arguments; bind them with ``functools.partial``
(``functools.partial(attacks.ipm, eps=0.5)``) to hand an attack to :mod:`flagjax.sim`.

=================  =========================================================================
attack             Byzantine rows (``mu``, ``sigma``: coordinate-wise mean and std of honest)
=================  =========================================================================
``gaussian``       ``N(mu, sigma^2)`` noise, hyperparameters ``mu=0``, ``sigma=1``
``uniform``        ``U[minval, maxval)`` noise, ``U[0, 1)`` by default (as in the paper)
``sign_flip``      ``-mu``
``ipm``            ``-eps * mu`` (inner-product manipulation), ``eps=0.1``
``alie``           ``mu + z * sigma`` ("a little is enough"), ``z`` from Baruch et al.
``mimic``          a copy of honest row ``idx`` (``idx=0``)
``nan`` / ``inf``  rows of NaN / ``+inf``
``scaled``         ``factor * mu``, ``factor=-10`` (a large sign flip)
``optimal_alie``   ``alie`` with ``z`` searched to do the most damage to a given rule
``optimal_ipm``    ``ipm`` with ``eps`` searched to do the most damage to a given rule
``min_max``        ``mu + gamma * p``, largest gamma with every distance to an honest row
                   within the honest diameter (Shejwalkar & Houmansadr, NDSS 2021)
``min_sum``        ``mu + gamma * p``, largest gamma with the sum of squared distances to
                   the honest rows within the honest maximum (same paper)
``fang``           per coordinate just beyond the honest extreme opposite to ``sign(mu)``
                   (Fang et al., USENIX Security 2020; aimed at trimmed mean / median)
=================  =========================================================================

Coordinate-wise statistics are per-coordinate fused sums over the honest rows in row order
(the mean by :func:`flagjax.core.gram.combine`; never a reduction along axis 0), so every
attack also runs on a
coordinate shard ``[h, s]`` (the simulator applies gradient attacks after its
``all_to_all``); ``axis_name`` is only needed by the adaptive attacks, which call the rule on
the shards. ``sigma`` is the population standard deviation (numpy's default, ``ddof=0``).

Data attacks are factories returning ``data_attack(batch, key) -> batch`` for one worker's
batch, applied before its gradient is taken: :func:`label_flip`, and the paper's workers on
augmented data, :func:`augment_gaussian`, :func:`augment_lotka_volterra`,
:func:`augment_cat_map` and :func:`augmented` (one of the three at random per batch). A batch
is a dict with images and labels under ``"x"``/``"y"`` or ``"image"``/``"label"`` (other keys
pass through), or a pair ``(x, y)``; the same structure comes back. Images are
``[batch, H, W]`` or ``[batch, H, W, C]`` (channels last); flat features ``[batch, H*W*C]``
are read as images of a given ``image_shape``.

Lossy links (a fraction of each update's coordinates lost in transit, read as zeros) act on a
worker's *own* update, not on rows made from the honest ones: :func:`lossy_link` drops the
coordinates of one update, :func:`lossy` of every row (or chosen rows) of stacked updates.
``lossy(p)`` has the signature of a pre-aggregator with a key, so it composes in front of any
rule through :func:`flagjax.preaggregate` (in ``optax.chain`` or the ``pre`` slot of
``optax.experimental.aggregating.process``).

Modules, one per family: :mod:`~flagjax.attacks.gradient` (rule-agnostic rows),
:mod:`~flagjax.attacks.adaptive` (omniscient: optimised factors, Min-Max / Min-Sum, Fang),
:mod:`~flagjax.attacks.links` (lossy links), :mod:`~flagjax.attacks.data` (label flipping)
and :mod:`~flagjax.attacks.augment` (the paper's augmented-data workers); every name is
re-exported here.
"""

from flagjax.attacks.adaptive import (PERTURBATIONS, fang, min_max, min_sum, optimal_alie,
                                      optimal_ipm, search_factor)
from flagjax.attacks.augment import (augment_cat_map, augment_gaussian, augment_lotka_volterra,
                                     augmented, cat_map_source, lotka_volterra_source)
from flagjax.attacks.data import label_flip
from flagjax.attacks.gradient import (alie, alie_default_z, gaussian, inf, ipm, mimic, nan,
                                      scaled, sign_flip, uniform)
from flagjax.attacks.links import lossy, lossy_link

__all__ = [
    "PERTURBATIONS",
    "alie",
    "alie_default_z",
    "augment_cat_map",
    "augment_gaussian",
    "augment_lotka_volterra",
    "augmented",
    "cat_map_source",
    "fang",
    "gaussian",
    "inf",
    "ipm",
    "label_flip",
    "lossy",
    "lossy_link",
    "lotka_volterra_source",
    "mimic",
    "min_max",
    "min_sum",
    "nan",
    "optimal_alie",
    "optimal_ipm",
    "scaled",
    "search_factor",
    "sign_flip",
    "uniform",
]
