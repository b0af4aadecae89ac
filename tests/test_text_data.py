"""Tests of jquant.data.text: the pydoc_data corpus, its split, windows and entropies."""

import collections
import math
from pydoc_data import topics

import jax
import numpy as np
import pytest

from jquant import data
from jquant.data import text


@pytest.fixture(scope="module")
def ds():
    return data.load("text")


def _counter_entropy(counter: collections.Counter) -> float:
    total = sum(counter.values())
    return -sum(c / total * math.log(c / total) for c in counter.values())


def test_layout_vocabulary_and_windows(ds):
    assert ds.name == "text" and ds.input_shape == (128,)
    everything = "".join(topics.topics.values())
    assert ds.vocab == "".join(sorted(set(everything))) and ds.num_classes == len(ds.vocab)
    assert 440_000 < len(everything) < 500_000 and 90 < ds.num_classes < 120
    assert len(ds.ids_train) + len(ds.ids_test) == len(everything)
    for x, y, ids in ((ds.x_train, ds.y_train, ds.ids_train), (ds.x_test, ds.y_test, ds.ids_test)):
        x, y, ids = map(np.asarray, (x, y, ids))
        assert x.dtype == np.int32 and x.shape[1] == 128 and y.shape == x.shape
        k = len(x) // 2
        np.testing.assert_array_equal(x[k], ids[128 * k : 128 * k + 128])
        np.testing.assert_array_equal(y[k], ids[128 * k + 1 : 128 * k + 129])
    assert len(ds.x_train) == (len(ds.ids_train) - 128 - 1) // 128 + 1
    # a pytree, like Dataset: it passes through jit
    assert jax.jit(lambda d: d.x_train.sum())(ds) == np.asarray(ds.x_train).sum()


def test_split_is_by_document_and_deterministic(ds):
    names = sorted(topics.topics)
    held = [n for i, n in enumerate(names) if i % 10 == 5]
    assert text.decode(ds.ids_test, ds.vocab) == "".join(topics.topics[n] for n in held)
    train = "".join(topics.topics[n] for n in names if n not in held)
    assert text.decode(ds.ids_train, ds.vocab) == train
    again = data.load("text")
    np.testing.assert_array_equal(np.asarray(again.x_train), np.asarray(ds.x_train))


def test_entropies_against_a_count(ds):
    """Unigram H(X) and bigram H(X_t | X_t-1) against Counters of characters and pairs."""
    s = text.decode(ds.ids_train, ds.vocab)
    h1 = _counter_entropy(collections.Counter(s))
    h2 = _counter_entropy(collections.Counter(zip(s, s[1:], strict=False))) - _counter_entropy(
        collections.Counter(s[:-1])
    )
    assert text.unigram_entropy(ds.ids_train, ds.num_classes) == pytest.approx(h1, rel=1e-9)
    assert text.bigram_entropy(ds.ids_train, ds.num_classes) == pytest.approx(h2, rel=1e-9)
    # the numbers (whole corpus): 3.25 and 2.46 nats/char; the training split's
    assert h1 == pytest.approx(3.25, abs=0.02) and h2 == pytest.approx(2.45, abs=0.02)


def test_stride_and_short_context():
    small = data.load("text", context=8, stride=4)
    assert small.input_shape == (8,)
    np.testing.assert_array_equal(small.x_train[1, :4], small.x_train[0, 4:])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"context": 0}, "context"), ({"stride": -1}, "stride"), ({"context": 1.5}, "context")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load("text", **kwargs)


def test_encode_decode_round_trip_and_errors(ds):
    s = "def f(x):\n    return x"
    assert text.decode(text.encode(s, ds.vocab), ds.vocab) == s
    with pytest.raises(ValueError, match="vocabulary"):
        text.encode("\u00e9t\u00e9", "abc")
    with pytest.raises(ValueError, match="ids"):
        text.decode([0, 999], ds.vocab)
