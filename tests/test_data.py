"""Tests of jquant.data: MNIST-1D generation and cache, digits, the batching iterator."""

import random

import jax
import jax.numpy as jnp
import mnist1d.data
import mnist1d.utils
import numpy as np
import pytest
import sklearn.datasets

from jquant import data

SMALL = {"num_samples": 200}  # a 160 / 40 split that generates in well under a second


def _reference_mnist1d(seed, **overrides):
    """The mnist1d package called directly, as its README does."""
    args = mnist1d.data.get_dataset_args(as_dict=True)
    args.update(overrides, seed=seed)
    return mnist1d.data.make_dataset(mnist1d.utils.ObjectView(args))


@pytest.fixture(scope="module")
def small_mnist1d(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    # The legacy global generator is what mnist1d reseeds; we check it is restored.
    before = np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    ds = data.load("mnist1d", cache=cache, **SMALL)
    after = np.random.get_state()[1], random.getstate()  # noqa: NPY002
    return ds, cache, before, after


def test_mnist1d_matches_the_generator_and_has_the_documented_layout(small_mnist1d):
    ds, _, _, _ = small_mnist1d
    ref = _reference_mnist1d(42, **SMALL)
    assert ds.name == "mnist1d" and ds.num_classes == 10 and ds.input_shape == (40, 1)
    assert ds.x_train.shape == (160, 40, 1) and ds.x_test.shape == (40, 40, 1)
    assert ds.x_train.dtype == jnp.float32 and ds.y_train.dtype == jnp.int32
    np.testing.assert_allclose(ds.x_train[..., 0], ref["x"].astype(np.float32))
    np.testing.assert_allclose(ds.x_test[..., 0], ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, ref["y"])
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])


def test_mnist1d_leaves_the_global_random_state_alone(small_mnist1d):
    _, _, (np_before, py_before), (np_after, py_after) = small_mnist1d
    np.testing.assert_array_equal(np_before, np_after)
    assert py_before == py_after


def test_mnist1d_cache_round_trip_and_seed(small_mnist1d):
    ds, cache, _, _ = small_mnist1d
    files = sorted(cache.glob("mnist1d-*.npz"))
    assert len(files) == 1
    again = data.load_mnist1d(cache=cache, **SMALL)  # from the file
    for a, b in zip(jax.tree.leaves(ds), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    other = data.load_mnist1d(seed=7, cache=cache, **SMALL)
    assert len(list(cache.glob("mnist1d-*.npz"))) == 2
    assert not np.array_equal(other.x_train, ds.x_train)
    np.testing.assert_allclose(other.x_train[..., 0], _reference_mnist1d(7, **SMALL)["x"])


def test_mnist1d_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    data.load_mnist1d(num_samples=20)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1


@pytest.mark.slow
def test_standard_mnist1d(tmp_path):
    ds = data.load("mnist1d", cache=tmp_path)
    ref = mnist1d.data.make_dataset()
    assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
    np.testing.assert_allclose(ds.x_test[..., 0], ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, ref["y"])


def test_digits_layout_split_and_seed():
    ds = data.load("digits")
    sk = sklearn.datasets.load_digits()
    assert ds.name == "digits" and ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == len(sk.target) == 1797
    assert len(ds.x_test) == 360
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    # Each test image is one of sklearn's images / 16, with its label.
    flat = {tuple(img.ravel()): int(t) for img, t in zip(sk.images, sk.target, strict=True)}
    for x, y in zip(np.asarray(ds.x_test[:20]) * 16, np.asarray(ds.y_test[:20]), strict=True):
        assert flat[tuple(x.ravel().astype(np.float64))] == y
    # Stratified: each class's share of the test set is its share of the data, +- 1 example.
    expected = np.bincount(sk.target) * 360 / 1797
    assert np.all(np.abs(np.bincount(np.asarray(ds.y_test)) - expected) <= 1)
    same, other = data.load_digits(seed=0), data.load_digits(seed=1)
    np.testing.assert_array_equal(same.y_test, ds.y_test)
    assert not np.array_equal(other.y_test, ds.y_test)


def test_dataset_is_a_pytree():
    ds = data.load("digits")
    assert len(jax.tree.leaves(ds)) == 4
    n = jax.jit(lambda d: d.x_train.shape[0] + d.y_test.sum() * 0)(ds)
    assert int(n) == len(ds.x_train)


@pytest.mark.parametrize(
    ("bad", "kwargs"),
    [
        ("name", {"name": "mnist"}),
        ("num_samplez", {"name": "mnist1d", "num_samplez": 10}),
        ("test_fraction", {"name": "digits", "test_fraction": 1.5}),
    ],
)
def test_bad_arguments_raise_value_error(bad, kwargs):
    with pytest.raises(ValueError, match=bad):
        data.load(**kwargs)


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_remainder"),
    # One n and few batch sizes: each new shape costs a compile of the gather.
    [(10, 3, False), (10, 3, True), (10, 4, False), (10, 10, True), (10, 11, True)],
)
def test_batches_cover_the_data(n, batch_size, drop_remainder):
    x = jnp.arange(n) * 10
    y = jnp.arange(n)
    got = list(data.batches(x, y, batch_size, key=jax.random.key(0), drop_remainder=drop_remainder))
    sizes = [len(b) for b, _ in got]
    full, rest = divmod(n, batch_size)
    expected_sizes = [batch_size] * full + ([rest] if rest and not drop_remainder else [])
    assert sizes == expected_sizes
    seen = np.concatenate([np.asarray(yb) for _, yb in got]) if got else np.zeros(0, int)
    assert len(np.unique(seen)) == len(seen) == sum(expected_sizes)  # no repeats
    if not drop_remainder:
        assert sorted(seen.tolist()) == list(range(n))  # every example once
    for xb, yb in got:
        np.testing.assert_array_equal(xb, yb * 10)  # x and y stay paired


def test_batches_order():
    x = y = jnp.arange(10)
    plain = np.concatenate([b for b, _ in data.batches(x, y, 3)])
    np.testing.assert_array_equal(plain, np.arange(10))
    k0 = [np.asarray(b) for b, _ in data.batches(x, y, 3, key=jax.random.key(0))]
    k0_again = [np.asarray(b) for b, _ in data.batches(x, y, 3, key=jax.random.key(0))]
    k1 = [np.asarray(b) for b, _ in data.batches(x, y, 3, key=jax.random.key(1))]
    np.testing.assert_array_equal(np.concatenate(k0), np.concatenate(k0_again))
    assert not np.array_equal(np.concatenate(k0), np.concatenate(k1))
    assert not np.array_equal(np.concatenate(k0), plain)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_batches_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(jnp.zeros(4), jnp.zeros(4), batch_size))


def test_batches_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        next(data.batches(jnp.zeros(4), jnp.zeros(5), 2))


def test_mnist1d_corrupt_cache_is_named_and_regenerated(tmp_path):
    ref = _reference_mnist1d(42, **SMALL)
    data.load_mnist1d(cache=tmp_path, **SMALL)
    (path,) = tmp_path.glob("mnist1d-*.npz")
    good = path.read_bytes()
    with np.load(path) as f:
        nan = {k: f[k] for k in f.files}
    nan["x_train"][3, 5] = np.nan
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0x10  # inside x_train's compressed-or-not bytes: bad CRC-32
    with open(tmp_path / "nan.npz", "wb") as f:
        np.savez(f, **nan)
    corrupt = {
        "truncated": good[: len(good) // 2],
        "flipped": bytes(flipped),
        "non-finite": (tmp_path / "nan.npz").read_bytes(),
    }
    for what, raw in corrupt.items():
        path.write_bytes(raw)
        with pytest.warns(RuntimeWarning, match=rf"{path}: corrupt data cache"):
            ds = data.load_mnist1d(cache=tmp_path, **SMALL)
        np.testing.assert_array_equal(ds.y_train, ref["y"], err_msg=what)
        np.testing.assert_allclose(ds.x_train[..., 0], ref["x"].astype(np.float32))
        assert path.read_bytes() == good, what  # replaced by the regenerated file
