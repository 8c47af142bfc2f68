"""The experiments: data loaders on tiny files in the real formats, partitions, models, option
parsing, an end-to-end training run, one-line errors, and a sweep killed and resumed."""

import gzip
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tarfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flagjax
from experiments import data
from experiments import models
from experiments import leaderboard
from experiments import presets
from experiments import report
from experiments import specs
from experiments import sweep
from experiments import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny, easy setting shared by the end-to-end tests (few compilations, seconds to run).
TINY = ["--dataset", "synthetic", "--model", "mlp", "-n", "5", "-f", "1", "--alpha", "iid",
        "--steps", "40", "--eval-every", "20", "--batch-size", "16", "--seeds", "0",
        "--no-progress"]


def standardise(train_x, test_x):
  """The loaders' normalisation, from its definition: per channel, training mean and std."""
  mean = train_x.mean(axis=(0, 1, 2), keepdims=True)
  std = train_x.std(axis=(0, 1, 2), keepdims=True) + 1e-6
  return (train_x - mean) / std, (test_x - mean) / std


# ---------------------------------------------------------------------------------------------
# Data.


def write_idx(path, array):
  """A gzipped idx file as MNIST ships it: big-endian magic 0x0000080<ndim>, dims, uint8s."""
  array = np.asarray(array, np.uint8)
  header = struct.pack(">i", 0x800 + array.ndim) + struct.pack(">" + "i" * array.ndim,
                                                                *array.shape)
  with gzip.open(path, "wb") as stream:
    stream.write(header + array.tobytes())


def test_mnist_loader_reads_idx_files_without_network(tmp_path):
  rng = np.random.default_rng(0)
  train_images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  test_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  train_labels, test_labels = rng.integers(0, 10, 12), rng.integers(0, 10, 5)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_labels)
  ds = data.load_mnist(str(tmp_path), download=False)
  chex.assert_shape([ds.train_images, ds.test_images], [(12, 28, 28, 1), (5, 28, 28, 1)])
  want_train, want_test = standardise(train_images[..., None] / 255.0,
                                      test_images[..., None] / 255.0)
  np.testing.assert_allclose(ds.train_images, want_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ds.test_images, want_test, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(ds.train_labels, train_labels)
  np.testing.assert_array_equal(ds.test_labels, test_labels)


def test_idx_reader_rejects_a_corrupt_file(tmp_path):
  path = tmp_path / "bad.gz"
  with gzip.open(path, "wb") as stream:
    stream.write(struct.pack(">iiii", 2051, 3, 28, 28) + b"\x00" * 10)  # too few pixels
  with pytest.raises(data.DataError, match="delete it"):
    data.read_idx(str(path))


def test_cifar10_loader_reads_the_python_pickle_archive(tmp_path):
  rng = np.random.default_rng(1)
  batches = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batches[name] = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, 10, 3).tolist(), b"batch_label": name.encode()}
  with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
    for name, batch in batches.items():
      payload = pickle.dumps(batch)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(payload)
      archive.addfile(info, io.BytesIO(payload))
  ds = data.load_cifar10(str(tmp_path), download=False)
  chex.assert_shape([ds.train_images, ds.test_images], [(15, 32, 32, 3), (3, 32, 32, 3)])
  # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major within a plane.
  to_nhwc = lambda raw: raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
  raw_train = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
  want_train, want_test = standardise(to_nhwc(raw_train), to_nhwc(batches["test_batch"][b"data"]))
  np.testing.assert_allclose(ds.train_images, want_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ds.test_images, want_test, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(ds.test_labels, batches["test_batch"][b"labels"])


def test_missing_file_offline_says_what_to_do(tmp_path):
  with pytest.raises(data.DataError, match=r"missing dataset file .*train-images.*download"):
    data.load_mnist(str(tmp_path), download=False)



def test_fetch_files_downloads_only_what_is_missing(tmp_path, monkeypatch):
  fetched = []

  def fake_download(urls, path):
    fetched.append(os.path.basename(path))
    with open(path, "wb") as stream:
      stream.write(b"x")
  monkeypatch.setattr(data, "_download", fake_download)
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"already here")
  paths = data.fetch_files("mnist", str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == sorted(data.MNIST_FILES.values())
  assert sorted(fetched) == sorted(set(data.MNIST_FILES.values()) -
                                   {"train-labels-idx1-ubyte.gz"})
  assert data.fetch_files("mnist", str(tmp_path)) == paths and len(fetched) == 3
  assert data.fetch_files("cifar10", str(tmp_path)) == [str(tmp_path / data.CIFAR10_FILE)]
  assert data.fetch_files("digits", str(tmp_path)) == []


def test_leaderboard_in_processes_fetches_the_data_once_first(tmp_path, capsys):
  # A missing file is one clear error from the parent, before any process starts (each of
  # the two processes used to try the download itself and die with a traceback).
  argv = ["--quick", "--no-progress", "--jobs", "2", "--dataset", "mnist", "--offline",
          "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
  assert leaderboard.main(argv) == 2
  err = capsys.readouterr().err
  assert "missing dataset file" in err and "Traceback" not in err
  assert not (tmp_path / "out" / "claims").exists()

def test_digits_split():
  ds = data.load_digits()
  chex.assert_shape([ds.train_images, ds.test_images], [(1437, 8, 8, 1), (360, 8, 8, 1)])
  assert set(np.unique(ds.test_labels)) == set(range(10))
  np.testing.assert_allclose(ds.train_images.mean(), 0.0, atol=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_partition_is_disjoint_and_complete(alpha):
  labels = data.load_digits().train_labels
  shards = data.partition(labels, 15, alpha, seed=3, width=len(labels))
  chex.assert_shape(shards.indices, (15, len(labels)))
  owned = np.concatenate([row[:size] for row, size in zip(shards.indices, shards.sizes)])
  np.testing.assert_array_equal(np.sort(owned), np.arange(len(labels)))
  assert shards.sizes.min() >= 10
  if alpha is None:
    assert shards.sizes.max() - shards.sizes.min() <= 1


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_server_root_set_is_class_proportional_and_kept_out_of_every_shard(alpha):
  labels = data.load_digits().train_labels
  root = data.root_set(labels, 100)
  assert len(root) == len(np.unique(root)) == 100
  share = np.bincount(labels[root], minlength=10) / 100
  np.testing.assert_allclose(share, np.bincount(labels, minlength=10) / len(labels), atol=0.011)
  shards = data.partition(labels, 15, alpha, seed=3, width=len(labels), exclude=root)
  chex.assert_shape(shards.indices, (15, len(labels)))
  owned = np.concatenate([row[:size] for row, size in zip(shards.indices, shards.sizes)])
  np.testing.assert_array_equal(np.sort(owned), np.setdiff1d(np.arange(len(labels)), root))


def test_dirichlet_skews_the_labels():
  labels = data.load_digits().train_labels

  def dominant_share(alpha):
    hist = data.label_histogram(data.partition(labels, 15, alpha, seed=0), labels, 10)
    return np.mean(hist.max(1) / hist.sum(1))
  assert dominant_share(0.1) > 2 * dominant_share(None)


def test_batches_come_from_each_workers_own_shard():
  labels = np.arange(200) % 10
  shards = data.partition(labels, 4, 0.5, seed=1, width=200)
  ids = jnp.arange(200)
  batch = data.sample_batches(jax.random.key(0), data.WorkerShards(*map(jnp.asarray, shards)),
                              ids.astype(jnp.float32), ids, 64)
  chex.assert_shape([batch["image"], batch["label"]], [(4, 64), (4, 64)])
  for worker, drawn in enumerate(np.asarray(batch["label"])):
    own = shards.indices[worker, :shards.sizes[worker]]
    assert np.isin(drawn, own).all()


# ---------------------------------------------------------------------------------------------
# Models.


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_are_pure_functions_of_their_params(name):
  model = models.create(name, (8, 8, 1), 10, seed=0)
  apply, params = models.functional(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
  logits = apply(params, x)
  chex.assert_shape(logits, (3, 10))
  np.testing.assert_allclose(logits, model(x), rtol=1e-5, atol=1e-5)
  zeroed = jax.tree.map(jnp.zeros_like, params)
  np.testing.assert_allclose(apply(zeroed, x), 0.0)  # the params really flow through apply


def test_resnet18_shapes_and_size():
  from flax import nnx
  # Abstract: no 11M-parameter initialisation on the test CPU.
  model = nnx.eval_shape(lambda: models.create("resnet18", (32, 32, 3), 10, seed=0))
  apply, params = models.functional(model)
  logits = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  chex.assert_shape(logits, (2, 10))
  assert 11.0e6 < models.num_parameters(params) < 11.4e6  # ResNet-18 for CIFAR: ~11.2M


# ---------------------------------------------------------------------------------------------
# Specs and presets.


def test_parse_spec():
  assert specs.parse_spec("flag:lam=4,scale=norm,rank=None", "rule") == specs.Spec(
      "flag", (("lam", 4), ("scale", "norm"), ("rank", None)))
  assert specs.parse_spec("gaussian:sigma=100", "attack").label == "gaussian(sigma=100)"
  with pytest.raises(specs.UsageError, match="write flag:key=value"):
    specs.parse_spec("flag:lam", "rule")


def test_rule_options_are_checked():
  with pytest.raises(specs.UsageError, match="unknown rule 'krumm' \\(did you mean krum\\?\\)"):
    specs.rule_kwargs(specs.parse_spec("krumm", "rule"), 1)
  with pytest.raises(specs.UsageError, match="flag has no hyperparameter 'lamda'"):
    specs.rule_kwargs(specs.parse_spec("flag:lamda=3", "rule"), 1)
  assert specs.rule_kwargs(specs.parse_spec("trimmed_mean", "rule"), 2) == {"f": 2}
  assert specs.rule_kwargs(specs.parse_spec("mean", "rule"), 2) == {}


def test_broken_bound_is_unavailable_not_a_crash():
  with pytest.raises(specs.RuleUnavailable, match=r"bulyan needs n >= 4\*f \+ 3"):
    specs.check_rule(specs.parse_spec("bulyan", "rule"), 15, 5)
  specs.check_rule(specs.parse_spec("bulyan", "rule"), 15, 3)
  # Bounds that involve a hyperparameter and f, or only n, are n/a in this setting too.
  with pytest.raises(specs.RuleUnavailable, match=r"multi_krum needs 1 <= m <= n - f"):
    specs.check_rule(specs.parse_spec("multi_krum:m=14", "rule"), 15, 3)
  with pytest.raises(specs.RuleUnavailable, match=r"smea needs C\(n, f\) <= 100000"):
    specs.check_rule(specs.parse_spec("smea", "rule"), 40, 12)


@pytest.mark.parametrize("text, message", [
    ("flag:scale=bogus", r"flag\(scale='bogus'\): flag needs scale in"),
    ("dnc:subsample_size=0", r"dnc needs subsample_size >= 1"),
    ("centered_clipping:tau=-1", r"centered_clipping needs tau >= 0"),
])
def test_bad_hyperparameter_value_is_a_usage_error_not_unavailable(text, message):
  # A value the rule refuses whatever n and f are is the user's mistake, reported as such
  # (it was shown as n/a with the hint "lower --num-byzantine ... or raise --num-workers").
  with pytest.raises(specs.UsageError, match=message):
    specs.check_rule(specs.parse_spec(text, "rule"), 15, 3)
  with pytest.raises(specs.UsageError, match=message):
    train.validate(train.Config(rules=("mean", text)))


@pytest.mark.parametrize("name", specs.FLAT_ROW_ATTACKS)
def test_attacks_on_flat_rows_give_the_pytree_attacks_rows(name):
  # The experiments run these attacks on the leaves laid end to end: the same rows as the
  # attack on the pytree, bit for bit, on rows with ties, a constant
  # column, a near-zero row and huge finite values.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 30)).astype(np.float32)
  x[1] = x[0]                 # duplicated row
  x[:, 3] = 2.5               # constant column
  x[4] *= 1e-30               # near-zero row
  x[:, 20:] *= 1e30           # huge finite values (a float32 Gram of these overflows)
  tree = {"a": x[:, :6].reshape(7, 2, 3), "b": {"c": x[:, 6:20], "d": x[:, 20:]}}
  attack = getattr(flagjax.attacks, name)
  expected = attack(tree, 3, jax.random.key(1))
  got = specs.on_flat_rows(attack)(tree, 3, jax.random.key(1))
  chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
  chex.assert_trees_all_equal(got, expected)
  # One leaf, or leaves of mixed dtypes: the attack sees the pytree as it is.
  mixed = {"a": x[:, :6].astype(np.float16), "b": x[:, 6:20]}
  chex.assert_trees_all_equal(specs.on_flat_rows(attack)(mixed, 2, jax.random.key(2)),
                              attack(mixed, 2, jax.random.key(2)))
  assert name in specs.GRADIENT_ATTACKS


def test_lossy_links_damage_only_the_byzantine_workers_own_updates():
  plan = specs.make_attack(specs.parse_spec("lossy:drop_fraction=0.25", "attack"),
                           num_workers=5, num_byzantine=2, num_classes=10)
  assert plan.attack is None and plan.data_attack is None and len(plan.pre) == 1
  rows = {"w": jnp.arange(1, 5001, dtype=jnp.float32).reshape(5, 1000)}
  out, _ = plan.pre[0].update(rows, plan.pre[0].init(None), key=jax.random.key(0))
  out, rows = np.asarray(out["w"]), np.asarray(rows["w"])
  np.testing.assert_array_equal(out[:3], rows[:3])  # honest workers: intact
  kept = out[3:] != 0
  np.testing.assert_array_equal(out[3:][kept], rows[3:][kept])
  assert abs(1 - kept.mean() - 0.25) < 0.03


def test_attack_options_are_checked():
  with pytest.raises(specs.UsageError, match="attack ipm has no hyperparameter 'epsilon'"):
    specs.make_attack(specs.parse_spec("ipm:epsilon=2", "attack"), num_workers=5,
                      num_byzantine=1, num_classes=10)
  plan = specs.make_attack(specs.parse_spec("label_flip", "attack"), num_workers=5,
                           num_byzantine=1, num_classes=10)
  batch = {"image": jnp.zeros((3, 8, 8, 1)), "label": jnp.array([0, 3, 9])}
  np.testing.assert_array_equal(plan.data_attack(batch, jax.random.key(0))["label"], [9, 6, 0])



@pytest.mark.parametrize("text, num_byzantine, message", [
    ("gaussian:sigma=-1", 3, r"attack gaussian\(sigma=-1\): gaussian needs sigma >= 0"),
    ("ipm:eps=abc", 3, r"ipm needs eps as a real scalar"),
    ("min_max:perturbation=bogus", 3, r"min_max needs perturbation in"),
    ("fang:b=0.5", 3, r"fang needs b > 1"),
    ("mimic:idx=50", 3, r"mimic needs 0 <= idx < h, got idx=50, h=12"),
    ("alie", 8, r"alie needs 1 <= f <= floor\(n/2\)"),
    ("optimal_alie:rule=krum", 3, r"rule is not a hyperparameter"),
])
def test_attack_values_are_usage_errors_before_training(text, num_byzantine, message):
  # A gradient attack's values were checked only when the training program traced it: a
  # traceback from inside JAX, after the data was loaded.
  with pytest.raises(specs.UsageError, match=message):
    specs.make_attack(specs.parse_spec(text, "attack"), num_workers=15,
                      num_byzantine=num_byzantine, num_classes=10,
                      rule=flagjax.aggregators.mean, rule_kwargs={})
  good = specs.make_attack(specs.parse_spec(text.split(":")[0], "attack"), num_workers=15,
                           num_byzantine=3, num_classes=10, rule=flagjax.aggregators.mean,
                           rule_kwargs={})
  assert good.attack is not None


@pytest.mark.parametrize("change, message", [
    ({"momentum": -1.0}, r"--momentum must be in \[0, 1\)"),
    ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
    ({"weight_decay": -0.1}, "--weight-decay must be >= 0"),
    ({"worker_momentum": 1.5}, r"--worker-momentum must be in \[0, 1\)"),
])
def test_optimizer_values_are_checked(change, message):
  # A negative momentum trained silently; a worker momentum of 1.5 was a traceback.
  with pytest.raises(specs.UsageError, match=message):
    train.validate(train.Config(rules=("mean",)).replace(**change))


def test_a_root_set_that_leaves_workers_no_data_is_refused():
  # It was an IndexError from deep in the data split.
  config = train.Config(rules=("fltrust",), server_examples=1437 - 14)
  with pytest.raises(specs.UsageError, match="use at most 1422"):
    train.prepare(config)
  assert len(train.prepare(config.replace(server_examples=1422)).server_indices) == 1422
  train.prepare(config.replace(rules=("mean",)))  # no rule uses the root set: no check


def test_presets_resolve_to_valid_configs():
  for preset in presets.PRESETS.values():
    for _, config in train.preset_configs(preset):
      train.validate(config)
  assert [c.num_byzantine for _, c in train.preset_configs(presets.get("tolerance"))] == [1, 2, 3]
  scaling = train.preset_configs(presets.get("scaling"))
  assert [(c.num_workers, c.num_byzantine) for _, c in scaling] == [(15, 3), (30, 6), (60, 12)]
  with pytest.raises(presets.PresetError, match="experiments.sweep --preset readme"):
    train.preset_config(presets.get("readme"))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
  path = tmp_path / "a" / "x.json"
  report.atomic_write_json(str(path), {"v": 1})
  report.atomic_write_json(str(path), {"v": 2})
  assert json.loads(path.read_text()) == {"v": 2}
  assert os.listdir(path.parent) == ["x.json"]


# ---------------------------------------------------------------------------------------------
# End to end.


def test_train_end_to_end(tmp_path, capsys):
  code = train.main(TINY + ["--rules", "fltrust", "flag", "bulyan", "--attack", "sign_flip",
                            "--out", str(tmp_path), "--name", "tiny"])
  assert code == 0
  out = capsys.readouterr().out
  assert "bulyan" in out and "n/a" in out
  result = json.loads((tmp_path / "tiny.json").read_text())
  assert (tmp_path / "tiny.png").stat().st_size > 1000
  assert result["rules"]["bulyan"] == {"status": "n/a",
                                       "reason": "bulyan needs n >= 4*f + 3, got n=5, f=1"}
  for rule in ("fltrust", "flag"):
    run = result["rules"][rule]["runs"][0]
    assert run["steps"] == [0, 20, 40]
    assert run["final_accuracy"] > 0.5  # chance is 0.1
  assert result["config"]["num_workers"] == 5
  # fltrust gets the server's gradient on its root set (100 training examples by default).
  assert result["config"]["server_examples"] == 100
  assert result["command"].startswith("python -m experiments.train --dataset synthetic")
  for rule in ("fltrust", "flag"):
    run = result["rules"][rule]["runs"][0]
    # One entry per evaluation in every per-step list (None where no chunk ran yet).
    assert len(run["honest_loss"]) == len(run["steps"]) == len(run["byzantine_weight"])
    assert run["honest_loss"][0] is None and run["honest_loss"][1] is not None
  versions = result["versions"]
  assert versions["cpu"] and versions["jaxlib"] and "git_commit" in versions
  # Rerunning the same command resumes: every finished run is read back, not recomputed.
  code = train.main(TINY + ["--rules", "fltrust", "flag", "bulyan", "--attack", "sign_flip",
                            "--out", str(tmp_path), "--name", "tiny"])
  assert code == 0
  assert capsys.readouterr().out.count("reused") == 2
  again = json.loads((tmp_path / "tiny.json").read_text())
  assert again["rules"]["flag"]["runs"] == result["rules"]["flag"]["runs"]


def test_train_federated_rounds(tmp_path):
  # 8 workers (2 Byzantine), 2 local steps, 6 sampled per round, Krum told f = 1: each run is
  # the plain-JAX-tested simulator with the CLI's options; here the CLI wiring is checked.
  options = ["--num-workers", "8", "--num-byzantine", "2", "--local-steps", "2",
             "--clients-per-round", "6", "--lr", "0.1", "--momentum", "0",
             "--attack", "sign_flip"]
  argv = TINY + options + ["--declared-f", "1", "--rules", "mean", "krum",
                           "--out", str(tmp_path), "--name", "fed"]
  assert train.main(argv) == 0
  result = json.loads((tmp_path / "fed.json").read_text())
  config = result["config"]
  assert (config["local_steps"], config["clients_per_round"], config["assumed_byzantine"]) == (
      2, 6, 1)
  for rule in ("mean", "krum"):
    run = result["rules"][rule]["runs"][0]
    assert np.isfinite(run["final_accuracy"])
    # The Byzantine share of the sampled rows' coefficients is a fraction (Gram-space rules).
    weights = [w for w in run["byzantine_weight"] if w is not None]
    assert weights and all(0 <= w <= 1 for w in weights)
  # Krum (told f = 1 of 6 rows) kept its accuracy under the sign flip; the mean did not win.
  assert (result["rules"]["krum"]["runs"][0]["final_accuracy"]
          >= result["rules"]["mean"]["runs"][0]["final_accuracy"] - 0.05)
  # Bounds are checked against the sampled rows: Krum told f = 2 of 6 needs n >= 7.
  code = train.main(TINY + options + ["--declared-f", "2", "--rules", "krum", "--out",
                                     str(tmp_path), "--name", "fed2"])
  assert code != 0


def test_report_compares_saved_results(tmp_path, capsys):
  def record(setting, accuracies):
    return {"setting": setting, "rules": {
        rule: {"status": "ok", "final_accuracy": report.summarize([acc]),
               "runs": [{"steps": [0, 10], "test_accuracy": [0.1, acc]}]}
        for rule, acc in accuracies.items()} | {"krum": {"status": "n/a", "reason": "bound"}}}
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(record("A", {"mean": 0.5, "flag": 0.9})))
  b.write_text(json.dumps(record("B", {"mean": 0.25, "flag": 0.75})))
  code = report.main([str(a), str(b), "--compare", "--out", str(tmp_path / "cmp")])
  assert code == 0
  table = (tmp_path / "cmp" / "compare.md").read_text()
  assert "| flag | 0.900 | 0.750 |" in table.replace(" ± 0.000", "")
  assert "n/a" in table and (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
  with pytest.raises(SystemExit):
    report.main(["--help"])
  assert "Re-plot and compare" in capsys.readouterr().out
  (tmp_path / "bad.json").write_text("[1, 2]")
  assert report.main([str(tmp_path / "bad.json")]) == 2


@pytest.mark.parametrize("options,message", [
    (["--rules", "krumm"], "unknown rule 'krumm'"),
    (["--rules", "krum", "-f", "2"], r"krum needs n >= 2\*f \+ 3, got n=5, f=2: lower"),
    (["--attack", "gausian"], "unknown attack 'gausian' \\(did you mean gaussian\\?\\)"),
    (["--dataset", "mnist", "--offline"], "missing dataset file .* download"),
    (["-f", "5"], r"--num-byzantine must be in \[0, num_workers\)"),
])
def test_bad_options_end_with_one_line(tmp_path, capsys, options, message):
  argv = TINY + ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path)] + options
  assert train.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ")
  assert __import__("re").search(message, err), err


def kill_after(module: str, argv, prefix: str, folder) -> dict:
  """Runs ``python -m <module> argv``, SIGKILLs it at the first output line starting with
  ``prefix``, and returns ``{file name: mtime}`` of the finished files in ``folder``."""
  process = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    for line in process.stdout:
      if line.startswith(prefix):
        process.send_signal(signal.SIGKILL)
        break
  finally:
    process.kill()
    process.wait()
  return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.name.startswith(".")}


def test_sweep_killed_and_resumed_loses_and_duplicates_nothing(tmp_path, capsys):
  out = tmp_path / "sweep"
  argv = TINY + ["--rules", "mean", "bulyan", "median", "--attacks", "sign_flip",
                 "-f", "1", "2", "--out", str(out)]
  cells = out / "cells"
  # Killed at the first finished cell, mid-run.
  before = kill_after("experiments.sweep", argv, "cell ", cells)
  assert 1 <= len(before) < 6, before

  assert sweep.main(argv) == 0
  log = capsys.readouterr().out
  assert f"resuming: {len(before)} of 6 cells already done" in log
  after = {p.name: p.stat().st_mtime_ns for p in cells.iterdir() if not p.name.startswith(".")}
  assert len(after) == 6 and all(after[name] == mtime for name, mtime in before.items())
  records = [json.loads((cells / name).read_text()) for name in after]
  assert sorted((r["setting"], r["rule"]) for r in records) == sorted(
      (f"sign_flip, f = {f}", rule) for f in (1, 2) for rule in ("mean", "bulyan", "median"))
  summary = json.loads((out / "results.json").read_text())
  assert [row["setting"] for row in summary["rows"]] == ["sign_flip, f = 1", "sign_flip, f = 2"]
  for row in summary["rows"]:
    assert row["rules"]["mean"]["status"] == row["rules"]["median"]["status"] == "ok"
    assert row["rules"]["bulyan"]["status"] == "n/a"
  table = (out / "table.md").read_text()
  assert table.count("| sign_flip, f = 1 |") == 1 and table.count("| sign_flip, f = 2 |") == 1
  assert "n/a [1]" in table and "[1] n/a: bulyan needs n >= 4*f + 3, got n=5, f=1." in table
  assert (out / "heatmap.png").exists()


def test_sweep_recomputes_cell_files_of_the_wrong_shape_with_a_warning(tmp_path):
  from experiments import sweep
  cells = tmp_path / "cells"
  cells.mkdir()
  good = {"key": "a" * 20, "status": "ok", "final_accuracy": 0.5, "seed": 0}
  (cells / f"{'a' * 20}.json").write_text(json.dumps(good))
  (cells / f"{'b' * 20}.json").write_text("{}")
  (cells / f"{'c' * 20}.json").write_text("[1, 2]")
  (cells / f"{'d' * 20}.json").write_text('{"key": "dddd", "sta')  # truncated
  (cells / f"{'e' * 20}.json").write_text(json.dumps({**good, "key": "f" * 20}))
  warnings = []
  done = sweep.load_done(str(tmp_path), warn=warnings.append)
  assert list(done) == ["a" * 20]
  assert len(warnings) == 4
  for letter, line in zip("bcde", warnings):
    assert f"{letter * 20}.json" in line and "recomputed" in line


def test_sweep_into_an_unwritable_folder_is_one_line(tmp_path, capsys):
  from experiments import sweep
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  code = sweep.main(TINY + ["--rules", "mean", "--out", str(blocker / "out")])
  assert code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: cannot write the results")


def test_progress_bar_stays_off_when_stderr_is_not_a_terminal(monkeypatch):
  import io
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  bar = train.progress_bar(10, True)
  assert bar.disable
  bar.update(10)
  bar.close()
  assert sys.stderr.getvalue() == ""


def test_flag_released_is_a_rule_spec(tmp_path):
  code = train.main(TINY + ["--rules", "flag_released:lam=2.0", "--attack", "sign_flip",
                            "--out", str(tmp_path), "--name", "released"])
  assert code == 0
  result = json.loads((tmp_path / "released.json").read_text())
  assert result["rules"]["flag_released(lam=2.0)"]["status"] == "ok"


def test_flag_convergence_reference_agrees_with_flag_on_a_tiny_case():
  from experiments import flag_convergence
  x, rank, lam = flag_convergence.family_problem("n=7, r=2", 0)
  best = flag_convergence.grassmann_minimum(x, rank, lam, restarts=3, steps=100)
  result = jax.jit(lambda v: __import__("flagjax").aggregators.flag_solve(
      v, rank=rank, lam=lam, max_iters=200))(jnp.asarray(x))
  # Both are minimisers of the same objective: they agree to well within 1%.
  assert abs(float(result.objective) - best) <= 1e-2 * best
  assert bool(result.converged)


def test_flag_convergence_training_grams_and_table():
  from experiments import flag_convergence
  grams = flag_convergence.training_grams(2)
  assert len(grams) == 2
  for K in grams:
    K = np.asarray(K, np.float64)
    chex.assert_shape(K, (16, 16))
    np.testing.assert_allclose(K, K.T)
    assert np.linalg.eigvalsh(K).min() >= -1e-4 * np.abs(K).max()
  rows = flag_convergence.training_table(3)
  assert len(rows) == 5 and all(row.startswith("| ") and row.endswith(" |") for row in rows)


# ---------------------------------------------------------------------------------------------
# The leaderboard: worst case over attacks, batched runs, killed and resumed.

BOARD = ["--dataset", "synthetic", "--num-workers", "5", "--steps", "6", "--batch-size", "8",
         "--rules", "bulyan", "median", "--f", "1", "--alphas", "iid", "0.5",
         "--attacks", "sign_flip", "min_max", "--seeds", "0", "1", "--no-progress",
         "--jobs", "1"]


def test_leaderboard_worst_case_is_the_minimum_over_attacks():
  board = leaderboard.Board(train.Config(), ["mean", "krum"], [1], [None], ["alie", "fang"],
                            [0, 1])
  done = {}
  accuracies = {("mean", "alie"): (0.8, 0.6), ("mean", "fang"): (0.9, 0.3),
                ("krum", "alie"): (0.5, 0.5), ("krum", "fang"): (0.7, 0.9)}
  for (rule, attack), values in accuracies.items():
    for seed, value in zip([0, 1], values):
      key = sweep.cell_key(board.run_config(rule, 1, attack, None, seed))
      done[key] = {"status": "ok", "final_accuracy": value}
  summary = leaderboard.summarize(board, done)
  by_rule = {cell["rule"]: cell for cell in summary["cells"]}
  # mean: alie averages 0.7, fang 0.6, so fang is its worst; krum: alie 0.5 < fang 0.8.
  assert by_rule["mean"]["worst_attack"] == "fang"
  assert by_rule["mean"]["worst"]["mean"] == pytest.approx(0.6)
  assert by_rule["mean"]["worst"]["std"] == pytest.approx(0.3)
  assert by_rule["krum"]["worst_attack"] == "alie" and by_rule["krum"]["status"] == "ok"
  del done[sweep.cell_key(board.run_config("krum", 1, "fang", None, 1))]
  assert leaderboard.summarize(board, done)["cells"][1]["status"] == "partial"


def test_leaderboard_groups_switchable_attacks_and_each_run_is_its_own():
  board = leaderboard.Board(train.Config(), ["median"], [1, 2], [None, 0.5],
                            ["alie", "label_flip", "gaussian", "optimal_ipm", "fang"], [0])
  # Gradient attacks (plain or optimal) share one program per (rule, f); the others have
  # their own.
  assert board.attack_families() == [("alie", "gaussian", "optimal_ipm", "fang"),
                                     ("label_flip",)]
  groups = list(board.groups())
  assert len(groups) == 4 and sum(len(board.runs(*g)) for g in groups) == len(board) == 20
  # One batched program over three attacks (a random and an adaptive one among them) and two
  # heterogeneities: each run equals experiments.train's run of its config alone.
  config = train.Config(dataset="synthetic", num_workers=5, num_byzantine=1, steps=4,
                        eval_every=4, batch_size=8, rules=("median",), seeds=(0,))
  configs = [config.replace(attack=a, alpha=alpha)
             for a in ("gaussian", "alie", "optimal_ipm") for alpha in (None, 0.5)]
  prepared = train.prepare(config)
  batched = leaderboard.batched_runner(configs[0], prepared, "median",
                                       ("alie", "gaussian", "optimal_ipm"))(configs)
  for i in (0, 3, 4):  # each attack once, both heterogeneities
    alone = train.build_runner(configs[i], prepared, "median").run(0)
    assert batched[i][0] == pytest.approx(alone["final_accuracy"], abs=1e-6), configs[i]
    # eval_every = steps: one chunk, so its mean honest loss is the batched run's.
    assert batched[i][1] == pytest.approx(alone["honest_loss"][-1], rel=1e-5), configs[i]
  # The attacks differ (else the test could not tell a wrong branch).
  assert len({round(loss, 6) for _, loss in batched}) == len(configs)


def test_leaderboard_speedup_measures_the_first_group_both_ways(tmp_path):
  base = train.Config(dataset="synthetic", num_workers=5, steps=3, eval_every=3, batch_size=8)
  board = leaderboard.Board(base, ["median"], [1], [None], ["sign_flip", "min_max"], [0])
  result = leaderboard.measure_speedup(board, str(tmp_path), log=lambda _: None)
  assert result["attacks"] == ["sign_flip", "min_max"] and result["runs"] == 2
  assert result["speedup"] == pytest.approx(
      result["sweep_seconds_per_run"] / result["batched_seconds_per_run"])
  # Both sides computed the same two runs (same keys, same accuracies).
  batched = sweep.load_done(str(tmp_path / "speedup-batched"))
  alone = sweep.load_done(str(tmp_path / "speedup-sweep"))
  assert set(batched) == set(alone) and len(batched) == 2
  for key in batched:
    assert batched[key]["final_accuracy"] == pytest.approx(alone[key]["final_accuracy"],
                                                           abs=1e-6)
  assert json.loads((tmp_path / "speedup.json").read_text()) == result


def test_leaderboard_in_two_processes_gives_the_same_runs(tmp_path):
  # Two processes share the groups by claim files: every run once, each the one-process run.
  board = ["--dataset", "synthetic", "--num-workers", "5", "--steps", "4", "--batch-size", "8",
           "--rules", "median", "trimmed_mean", "mean", "--f", "1", "--alphas", "iid",
           "--attacks", "sign_flip", "label_flip", "--seeds", "0", "--no-progress"]
  one, two = tmp_path / "one", tmp_path / "two"
  assert leaderboard.main(board + ["--jobs", "1", "--out", str(one)]) == 0
  assert leaderboard.main(board + ["--jobs", "2", "--out", str(two)]) == 0
  first, second = sweep.load_done(str(one)), sweep.load_done(str(two))
  assert len(first) == 6 and set(first) == set(second)
  for key, record in first.items():
    assert second[key]["final_accuracy"] == record["final_accuracy"], key
  assert not (two / "claims").exists()
  summary = json.loads((two / "leaderboard.json").read_text())
  assert summary["cells"] == json.loads((one / "leaderboard.json").read_text())["cells"]
  assert "2 processes" in (two / "table.md").read_text()
  assert leaderboard.main(board + ["--jobs", "0", "--out", str(two)]) == 2


@pytest.mark.parametrize("option, message", [
    (["--attacks", "sign_flip", "gaussian:sigma=-1"], "gaussian needs sigma >= 0"),
    (["--attacks", "alie", "--f", "1", "8"], r"alie needs 1 <= f <= floor\(n/2\)"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_leaderboard_refuses_bad_values_before_starting(tmp_path, capsys, option, message):
  # Before, the first two failed inside both worker processes ("2 of 2 leaderboard processes
  # failed") and --steps 0 ran the default number of steps.
  assert leaderboard.main(["--quick", "--no-progress", "--out", str(tmp_path)] + option) == 2
  assert re.search(message, capsys.readouterr().err)
  assert not (tmp_path / "cells").exists()


def test_leaderboard_checks_only_its_own_attacks():
  # ALIE (train.Config's default attack) breaks its bound at f = 8 of 15; a board without
  # it must not be refused for it.
  args = leaderboard.build_parser().parse_args(
      ["--rules", "mean", "--f", "8", "--attacks", "sign_flip", "--alphas", "iid"])
  assert list(leaderboard.board_from_args(args).fs) == [8]

@pytest.mark.parametrize("cores, jobs", [(2, 2), (16, 2), (7, 3), (4, 4)])
def test_leaderboard_processes_get_disjoint_cores_covering_the_machine(monkeypatch, cores, jobs):
  # Each process gets its own cores (two XLA thread pools on the same cores were measured
  # ~2x slower each), all of them used, split as evenly as they go.
  monkeypatch.setattr(leaderboard, "_available_cores", lambda: list(range(10, 10 + cores)))
  if not hasattr(os, "sched_setaffinity"):
    assert leaderboard._cores_of(0, jobs) is None
    return
  parts = [leaderboard._cores_of(i, jobs) for i in range(jobs)]
  assert sorted(c for part in parts for c in part) == list(range(10, 10 + cores))
  assert {len(part) for part in parts} <= {cores // jobs, -(-cores // jobs)}


def test_leaderboard_processes_are_not_pinned_without_a_core_each(monkeypatch):
  monkeypatch.setattr(leaderboard, "_available_cores", lambda: [0, 1])
  assert leaderboard._cores_of(0, 3) is None and leaderboard._cores_of(0, 1) is None


def test_best_rule_per_cell_is_the_highest_worst_case_first_rule_on_ties():
  nan = float("nan")
  worst = {"a": np.array([[0.5, nan], [0.9, 0.2]]),
           "b": np.array([[0.5, nan], [0.3, 0.4]]),
           "c": np.array([[0.1, nan], [0.9, nan]])}
  best, texts = leaderboard._best_per_cell(worst)
  np.testing.assert_array_equal(best, np.fmax.reduce(list(worst.values())))
  assert texts.tolist() == [["a\n0.50", "n/a"], ["a\n0.90", "b\n0.40"]]


def test_leaderboard_charts_the_best_rule_without_root_data_apart(tmp_path):
  # FLTrust trusts the server's clean examples: a second best-rule chart leaves it out.
  base = train.Config(dataset="synthetic", num_workers=5, steps=2, eval_every=2, batch_size=8)
  mixed = leaderboard.Board(base, ["median", "fltrust"], [1], [None], ["sign_flip"], [0])
  leaderboard.write_outputs(str(tmp_path / "mixed"), mixed, {}, "test")
  assert (tmp_path / "mixed" / "best-rule-without-root-data.png").exists()
  for rules in (["median"], ["fltrust"]):
    alone = leaderboard.Board(base, rules, [1], [None], ["sign_flip"], [0])
    leaderboard.write_outputs(str(tmp_path / rules[0]), alone, {}, "test")
    assert (tmp_path / rules[0] / "best-rule.png").exists()
    assert not (tmp_path / rules[0] / "best-rule-without-root-data.png").exists()


def test_leaderboard_killed_and_resumed_matches_one_at_a_time_training(tmp_path, capsys):
  out = tmp_path / "board"
  argv = BOARD + ["--out", str(out)]
  cells = out / "cells"
  # Killed at the first finished group (bulyan's, n/a: both attacks share a group), mid-grid.
  before = kill_after("experiments.leaderboard", argv, "[8/", cells)
  assert 8 <= len(before) < 16, before

  assert leaderboard.main(argv) == 0
  log = capsys.readouterr().out
  assert f"resuming: {len(before)} of 16 runs already done" in log
  after = {p.name: p.stat().st_mtime_ns for p in cells.iterdir() if not p.name.startswith(".")}
  assert len(after) == 16 and all(after[name] == mtime for name, mtime in before.items())
  summary = json.loads((out / "leaderboard.json").read_text())
  cells_by_rule = {(c["rule"], c["alpha"]): c for c in summary["cells"]}
  assert cells_by_rule[("bulyan", None)]["status"] == "n/a"
  for rule in ("median",):
    for alpha in (None, 0.5):
      cell = cells_by_rule[(rule, alpha)]
      assert cell["status"] == "ok" and cell["worst_attack"] in ("sign_flip", "min_max")
      assert cell["worst"]["mean"] == min(s["mean"] for s in cell["attacks"].values())
  table = (out / "table.md").read_text()
  assert "[1] n/a: bulyan needs n >= 4*f + 3, got n=5, f=1." in table
  assert (out / "best-rule.png").exists() and (out / "heatmap-median.png").exists()
  # A batched run is the run experiments.train does one at a time (same keys, same steps).
  config = train.Config(dataset="synthetic", num_workers=5, num_byzantine=1, steps=6,
                        eval_every=6, batch_size=8, alpha=0.5, attack="min_max",
                        rules=("median",), seeds=(1,))
  record = json.loads((cells / f"{sweep.cell_key(config)}.json").read_text())
  alone = train.build_runner(config, train.prepare(config), "median").run(1)
  assert record["final_accuracy"] == pytest.approx(alone["final_accuracy"], abs=1e-6)
