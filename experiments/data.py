r"""Datasets for the experiments, and how they are spread over the workers.

Four datasets, all returned as a :class:`Dataset` of NHWC float32 images (normalised per
channel with the training set's statistics) and int32 labels:

* ``digits``: scikit-learn's embedded 8x8 handwritten digits (1,797 images, no download).
  A fixed stratified 80/20 split: 1,437 training and 360 test images.
* ``synthetic``: ten Gaussian classes in 8x8x1 "images" (no download): a quick, easy task.
* ``mnist``: the four idx files (``train-images-idx3-ubyte.gz``, ...), downloaded on first use
  into the cache folder.
* ``cifar10``: the python-pickle archive ``cifar-10-python.tar.gz``, downloaded on first use.

Workers get disjoint shards of the training set: IID (a random equal split) or non-IID with
the Dirichlet label skew of Hsu et al. (2019): for every class, the class's examples are split
over the workers in proportions drawn from ``Dirichlet(alpha * 1_n)``; small ``alpha`` gives
each worker a few dominant classes. Batches are drawn inside ``jax.jit`` from padded index
tables (:class:`WorkerShards`), so a whole chunk of training steps runs as one XLA program.

References:
  Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification", arXiv:1909.06335, 2019.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("digits", "mnist", "cifar10", "synthetic")

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Tried in order; the first is the mirror TensorFlow datasets use, the second torchvision's.
MNIST_URLS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
CIFAR10_FILE = "cifar-10-python.tar.gz"
CIFAR10_URLS = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


class DataError(Exception):
  """A dataset cannot be loaded; the message says what to do (shown as a one-line error)."""


class Dataset(NamedTuple):
  """A classification dataset: ``[N, H, W, C]`` float32 images and ``[N]`` int32 labels."""
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])


def default_data_dir() -> str:
  """The download cache: ``$FLAGJAX_DATA``, else ``~/.cache/flagjax``."""
  return os.environ.get("FLAGJAX_DATA") or os.path.join(
      os.path.expanduser("~"), ".cache", "flagjax")


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel standardisation with the training set's mean and standard deviation."""
  train = train.astype(np.float32)
  test = test.astype(np.float32)
  mean = train.mean(axis=(0, 1, 2), keepdims=True)
  std = train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
  return (train - mean) / std, (test - mean) / std


def load_digits() -> Dataset:
  """scikit-learn's 8x8 digits, split 80/20 (stratified, fixed seed) into train and test."""
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection
  digits = sk_datasets.load_digits()
  images = digits.images[..., None].astype(np.float32) / 16.0
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, labels, test_size=0.2, stratify=labels, random_state=0)
  x_train, x_test = _normalise(x_train, x_test)
  return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def make_synthetic(num_train: int = 2000, num_test: int = 500, num_classes: int = 10,
                   noise: float = 1.0, seed: int = 0) -> Dataset:
  """Gaussian classes as 8x8x1 images: class means ``N(0, I_64)``, samples mean + noise.

  Args:
    num_train: training examples.
    num_test: test examples.
    num_classes: number of classes.
    noise: standard deviation of the per-sample noise around the class mean.
    seed: numpy seed of the class means and samples (the dataset, not the training run).

  Returns:
    A :class:`Dataset` named ``synthetic``.
  """
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(num_classes, 64)).astype(np.float32)

  def draw(count):
    labels = rng.integers(0, num_classes, size=count).astype(np.int32)
    images = means[labels] + noise * rng.normal(size=(count, 64)).astype(np.float32)
    return images.reshape(count, 8, 8, 1), labels
  x_train, y_train = draw(num_train)
  x_test, y_test = draw(num_test)
  x_train, x_test = _normalise(x_train, x_test)
  return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)


# ---------------------------------------------------------------------------------------------
# Files that must be downloaded: MNIST (idx) and CIFAR-10 (python pickles in a tar.gz).


def _download(urls, path: str) -> None:
  """Downloads the first reachable URL to ``path`` (through a temp file, then renamed)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  errors = []
  for url in urls:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".part")
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
        shutil.copyfileobj(response, out)
      os.replace(tmp, path)
      return
    except Exception as error:  # noqa: BLE001 - any failure: try the next mirror
      errors.append(f"{url}: {error}")
      if os.path.exists(tmp):
        os.remove(tmp)
  raise DataError(f"could not download {os.path.basename(path)} ({'; '.join(errors)}); "
                  f"put the file in {os.path.dirname(path)} by hand or pass --data-dir")


def _fetch(name: str, urls, data_dir: str, download: bool) -> str:
  """The local path of ``name`` in ``data_dir``, downloading it when missing and allowed."""
  path = os.path.join(data_dir, name)
  if os.path.exists(path):
    return path
  if not download:
    raise DataError(f"missing dataset file {path}: download it from {urls[0]} into "
                    f"{data_dir}, or drop --offline to let the script download it")
  print(f"downloading {name} into {data_dir} ...", flush=True)
  _download(urls, path)
  return path


def fetch_files(name: str, data_dir: Optional[str] = None, download: bool = True) -> list[str]:
  """The local paths of dataset ``name``'s files, downloading the missing ones (none for the
  embedded and generated datasets). For a parent process to fetch once, with one clear error,
  before worker processes load the dataset."""
  data_dir = data_dir or default_data_dir()
  if name == "mnist":
    return [_fetch(file, [url + file for url in MNIST_URLS], data_dir, download)
            for file in MNIST_FILES.values()]
  if name == "cifar10":
    return [_fetch(CIFAR10_FILE, CIFAR10_URLS, data_dir, download)]
  return []


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file (MNIST's format): big-endian magic, dimensions, then uint8s."""
  try:
    with gzip.open(path, "rb") as stream:
      magic, = struct.unpack(">i", stream.read(4))
      if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise DataError(f"{path} is not an idx file of unsigned bytes (magic {magic}); "
                        f"delete it and run again to download it afresh")
      num_dims = magic & 0xFF
      shape = struct.unpack(">" + "i" * num_dims, stream.read(4 * num_dims))
      data = np.frombuffer(stream.read(), dtype=np.uint8)
  except (OSError, EOFError, struct.error) as error:
    raise DataError(f"cannot read {path} ({error}); delete it and run again to download "
                    f"it afresh") from None
  if data.size != int(np.prod(shape)):
    raise DataError(f"{path} holds {data.size} values, its header says {shape}; delete it "
                    f"and run again to download it afresh")
  return data.reshape(shape)


def load_mnist(data_dir: Optional[str] = None, download: bool = True) -> Dataset:
  """MNIST from the four gzipped idx files in ``data_dir`` (downloaded when missing).

  Args:
    data_dir: the cache folder; default :func:`default_data_dir`.
    download: fetch missing files from the mirrors in ``MNIST_URLS``.

  Returns:
    A :class:`Dataset` of ``[N, 28, 28, 1]`` images.
  """
  paths = fetch_files("mnist", data_dir, download)
  arrays = {key: read_idx(path) for key, path in zip(MNIST_FILES, paths)}
  x_train, x_test = _normalise(arrays["train_images"][..., None] / 255.0,
                               arrays["test_images"][..., None] / 255.0)
  return Dataset("mnist", x_train, arrays["train_labels"].astype(np.int32),
                 x_test, arrays["test_labels"].astype(np.int32), 10)


def _read_cifar_batch(archive: tarfile.TarFile, member: str, path: str):
  try:
    stream = archive.extractfile(member)
    batch = pickle.load(stream, encoding="bytes")
  except (KeyError, pickle.UnpicklingError, EOFError) as error:
    raise DataError(f"{path} has no readable {member} ({error}); delete it and run again "
                    f"to download it afresh") from None
  data = np.asarray(batch[b"data"], dtype=np.uint8)
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NCHW rows -> NHWC
  return images, np.asarray(batch[b"labels"], dtype=np.int32)


def load_cifar10(data_dir: Optional[str] = None, download: bool = True) -> Dataset:
  """CIFAR-10 from ``cifar-10-python.tar.gz`` in ``data_dir`` (downloaded when missing).

  The archive holds ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``: pickled dicts
  with ``b"data"`` (``[10000, 3072]`` uint8, channel-major rows) and ``b"labels"``.

  Args:
    data_dir: the cache folder; default :func:`default_data_dir`.
    download: fetch the archive from ``CIFAR10_URLS`` when missing.

  Returns:
    A :class:`Dataset` of ``[N, 32, 32, 3]`` images.
  """
  path, = fetch_files("cifar10", data_dir, download)
  try:
    with tarfile.open(path, "r:gz") as archive:
      names = [m for m in archive.getnames() if "/data_batch_" in m]
      if not names:
        raise DataError(f"{path} holds no cifar-10-batches-py/data_batch_*; delete it and "
                        f"run again to download it afresh")
      train = [_read_cifar_batch(archive, m, path) for m in sorted(names)]
      test_member = next((m for m in archive.getnames() if m.endswith("/test_batch")), None)
      if test_member is None:
        raise DataError(f"{path} holds no cifar-10-batches-py/test_batch; delete it and run "
                        f"again to download it afresh")
      x_test, y_test = _read_cifar_batch(archive, test_member, path)
  except (tarfile.TarError, OSError, EOFError) as error:
    raise DataError(f"cannot read {path} ({error}); delete it and run again to download it "
                    f"afresh") from None
  x_train = np.concatenate([images for images, _ in train])
  y_train = np.concatenate([labels for _, labels in train])
  x_train, x_test = _normalise(x_train / 255.0, x_test / 255.0)
  return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


def load_dataset(name: str, data_dir: Optional[str] = None, download: bool = True) -> Dataset:
  """Loads one of :data:`DATASETS` by name (see the module docstring)."""
  if name == "digits":
    return load_digits()
  if name == "synthetic":
    return make_synthetic()
  if name == "mnist":
    return load_mnist(data_dir, download)
  if name == "cifar10":
    return load_cifar10(data_dir, download)
  raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Spreading the training set over the workers.


class WorkerShards(NamedTuple):
  """Each worker's training examples as a padded index table, for sampling inside ``jit``.

  Attributes:
    indices: ``[n, max_size]`` int32; row i's first ``sizes[i]`` entries are worker i's
      examples (the rest repeat them, and are never drawn).
    sizes: ``[n]`` int32, each >= 1.
  """
  indices: np.ndarray
  sizes: np.ndarray


def _pad(groups: list[np.ndarray], width: Optional[int] = None) -> WorkerShards:
  sizes = np.array([len(g) for g in groups], np.int32)
  width = int(sizes.max()) if width is None else max(width, int(sizes.max()))
  indices = np.stack([np.resize(g, width) for g in groups]).astype(np.int32)
  return WorkerShards(indices, sizes)


def iid_partition(num_examples: int, num_workers: int, seed: int,
                  width: Optional[int] = None) -> WorkerShards:
  """A random split into ``num_workers`` shards of (almost) equal size (see :func:`partition`)."""
  order = np.random.default_rng(seed).permutation(num_examples)
  return _pad(np.array_split(order, num_workers), width)


def dirichlet_partition(labels: np.ndarray, num_workers: int, alpha: float, seed: int,
                        min_size: int = 10, max_tries: int = 1000,
                        width: Optional[int] = None) -> WorkerShards:
  r"""Label-skewed shards: class k's examples split in proportions ``p_k ~ Dir(alpha 1_n)``.

  Draws are repeated (up to ``max_tries``) until every worker holds at least ``min_size``
  examples, as in the usual federated-learning benchmarks; the last draw is then topped up
  from the largest shards so that no worker is empty.

  Args:
    labels: ``[N]`` integer labels of the training set.
    num_workers: ``n``.
    alpha: Dirichlet concentration (> 0); smaller is more skewed.
    seed: numpy seed of the split.
    min_size: the fewest examples a worker may hold.
    max_tries: redraws before topping up.
    width: pad the index table to at least this many columns (see :func:`partition`).

  Returns:
    :class:`WorkerShards`.

  References:
    Hsu, Qi and Brown, arXiv:1909.06335, 2019.
  """
  if not alpha > 0:
    raise DataError(f"the Dirichlet alpha must be > 0, got {alpha}; use --alpha iid for an "
                    f"IID split")
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  min_size = min(min_size, len(labels) // num_workers)
  for _ in range(max_tries):
    groups = [[] for _ in range(num_workers)]
    for k in np.unique(labels):
      members = rng.permutation(np.flatnonzero(labels == k))
      proportions = rng.dirichlet(np.full(num_workers, alpha))
      cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
      for group, part in zip(groups, np.split(members, cuts)):
        group.extend(part.tolist())
    if min(len(g) for g in groups) >= min_size:
      break
  groups = [np.array(g, np.int64) for g in groups]
  for i, group in enumerate(groups):
    while len(groups[i]) < min_size:  # top up from the largest shard
      donor = int(np.argmax([len(g) for g in groups]))
      groups[i] = np.append(groups[i], groups[donor][-1])
      groups[donor] = groups[donor][:-1]
  return _pad([rng.permutation(g) for g in groups], width)


def partition(labels: np.ndarray, num_workers: int, alpha: Optional[float], seed: int,
              width: Optional[int] = None,
              exclude: Optional[np.ndarray] = None) -> WorkerShards:
  """IID shards when ``alpha`` is None, else :func:`dirichlet_partition`.

  ``width`` pads the index table to a fixed number of columns (e.g. the training-set size), so
  that every seed's shards have the same shape and a compiled training loop is reused.
  ``exclude``: example indices no worker gets (the server's root set); the others are split
  as above and the indices refer to the full training set.
  """
  labels = np.asarray(labels)
  if exclude is not None and len(exclude):
    kept = np.setdiff1d(np.arange(len(labels)), exclude)
    shards = partition(labels[kept], num_workers, alpha, seed, width)
    return WorkerShards(kept[shards.indices].astype(np.int32), shards.sizes)
  if alpha is None:
    return iid_partition(len(labels), num_workers, seed, width)
  return dirichlet_partition(labels, num_workers, alpha, seed, width=width)


def root_set(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
  """The server's clean root examples: ``size`` training indices, each class in proportion
  to its share of the training set (FLTrust's root dataset, Cao et al., NDSS 2021: 100
  examples by default), drawn with a fixed ``seed``, sorted.

  Each class gets ``floor(size * share)`` examples and the remainder goes to the classes
  with the largest fractional parts, so exactly ``min(size, len(labels))`` come back
  (FLPoison floors the quotas and may return fewer).
  """
  labels = np.asarray(labels)
  size = min(max(int(size), 0), len(labels))
  if size == 0:
    return np.zeros((0,), np.int64)
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(labels, return_counts=True)
  exact = size * counts / counts.sum()
  quota = np.floor(exact).astype(int)
  for k in np.argsort(-(exact - quota), kind="stable")[:size - quota.sum()]:
    quota[k] += 1
  chosen = [rng.choice(np.flatnonzero(labels == c), q, replace=False)
            for c, q in zip(classes, quota) if q]
  return np.sort(np.concatenate(chosen))


def sample_batches(key: jax.Array, shards: WorkerShards, images: jax.Array,
                   labels: jax.Array, batch_size: int) -> dict:
  """Each worker's minibatch, drawn uniformly with replacement from its shard (jittable).

  Args:
    key: a ``jax.random`` key.
    shards: the workers' :class:`WorkerShards` (as arrays).
    images: ``[N, H, W, C]`` training images (on device).
    labels: ``[N]`` training labels.
    batch_size: examples per worker.

  Returns:
    ``{"image": [n, batch_size, H, W, C], "label": [n, batch_size]}``.
  """
  indices, sizes = shards
  num_workers = indices.shape[0]
  u = jax.random.uniform(key, (num_workers, batch_size))
  position = jnp.minimum((u * sizes[:, None]).astype(jnp.int32), sizes[:, None] - 1)
  example = jnp.take_along_axis(indices, position, axis=1)
  return {"image": images[example], "label": labels[example]}


def label_histogram(shards: WorkerShards, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """``[n, num_classes]`` counts of each worker's labels (for reports and tests)."""
  return np.stack([np.bincount(labels[row[:size]], minlength=num_classes)
                   for row, size in zip(shards.indices, shards.sizes)])
