"""A character-level corpus from CPython's own documentation (``pydoc_data.topics``), no download.

``pydoc_data.topics.topics`` maps 79 help topics (``"assert"``, ``"for"``, ...) to their text,
about 465K characters over 103 distinct symbols in CPython 3.11 (the exact text follows the
Python version; a model's weights cache is keyed by the arrays' content, so it follows too).

Split by document, deterministic: topics sorted by name, topic ``i`` goes to the validation
split when ``i % 10 == 5`` (8 topics, about 36K characters), else to training. Each split is
the concatenation of its topics' texts in that order. The vocabulary is the sorted set of
symbols present in the whole corpus; a character's token id is its index there.

Language-modelling examples are windows of ``context`` tokens taken every ``stride`` tokens:
``x[k] = ids[k * stride : k * stride + context]`` and ``y[k]`` the same window shifted by one
(the next character at every position).

>>> ds = load_text()
>>> ds.name, ds.num_classes, ds.input_shape
('text', 103, (128,))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TextDataset",
    "bigram_entropy",
    "corpus",
    "decode",
    "encode",
    "load_text",
    "unigram_entropy",
]

VALIDATION_EVERY = 10  # topic i (sorted by name) is held out when i % 10 == 5
VALIDATION_OFFSET = 5


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["x_train", "y_train", "x_test", "y_test", "ids_train", "ids_test"],
    meta_fields=["name", "num_classes", "input_shape", "vocab"],
)
@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Next-character prediction windows, in the layout of :class:`~jquant.data.Dataset`.

    Attributes:
      x_train, y_train: int32 ``(N, context)`` input windows and their next characters.
      x_test, y_test: the same for the validation split.
      ids_train, ids_test: int32 token ids of each whole split, ``(L,)``.
      name: ``"text"``.
      num_classes: vocabulary size (the model's output width).
      input_shape: ``(context,)``.
      vocab: the symbols, in token-id order.
    """

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    ids_train: jax.Array
    ids_test: jax.Array
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    vocab: str


def corpus() -> tuple[list[str], list[str]]:
    """``(train_documents, validation_documents)``: the topics' texts, split as documented."""
    from pydoc_data import topics

    names = sorted(topics.topics)
    held = [i % VALIDATION_EVERY == VALIDATION_OFFSET for i in range(len(names))]
    train = [topics.topics[n] for n, h in zip(names, held, strict=True) if not h]
    valid = [topics.topics[n] for n, h in zip(names, held, strict=True) if h]
    return train, valid


def encode(text: str, vocab: str) -> np.ndarray:
    """Token ids ``[vocab.index(c) for c in text]`` as int32; ValueError on unknown symbols."""
    table = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(text) - set(table))
    if unknown:
        raise ValueError(f"text holds symbols outside the vocabulary: {unknown[:10]!r}")
    return np.fromiter((table[c] for c in text), np.int32, len(text))


def decode(ids, vocab: str) -> str:
    """The text ``"".join(vocab[i] for i in ids)`` of token ids ``ids`` (1-D)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= len(vocab))):
        raise ValueError(f"ids must be 1-D token ids in [0, {len(vocab)}), got shape {ids.shape}")
    return "".join(vocab[i] for i in ids)


def _windows(ids: np.ndarray, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, len(ids) - context, stride)
    idx = starts[:, None] + np.arange(context)[None, :]
    return ids[idx], ids[idx + 1]


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_entropy(ids, vocab_size: int) -> float:
    """``H(X) = -sum_c p(c) log p(c)`` in nats, ``p`` the symbol frequencies of ``ids``."""
    ids = np.asarray(ids)
    return _entropy(np.bincount(ids, minlength=vocab_size).astype(np.float64))


def bigram_entropy(ids, vocab_size: int) -> float:
    """Conditional entropy ``H(X_t | X_{t-1}) = H(X_{t-1}, X_t) - H(X_{t-1})`` in nats.

    The plug-in estimate from the pair counts of ``ids``: the loss of the maximum-likelihood
    bigram model on its own data (the bigram baseline a language model must beat).
    """
    ids = np.asarray(ids).astype(np.int64)
    pairs = np.bincount(ids[:-1] * vocab_size + ids[1:], minlength=vocab_size**2)
    first = np.bincount(ids[:-1], minlength=vocab_size)
    return _entropy(pairs.astype(np.float64)) - _entropy(first.astype(np.float64))


def load_text(*, context: int = 128, stride: int | None = None) -> TextDataset:
    """Loads the ``pydoc_data`` corpus as next-character windows (see the module docstring).

    Args:
      context: window length (the model's context), a positive int.
      stride: distance between window starts, a positive int; default ``context`` (windows
        that do not overlap).

    Returns:
      A :class:`TextDataset` named ``"text"``.
    """
    stride = context if stride is None else stride
    for name, value in (("context", context), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    train_docs, valid_docs = corpus()
    train_text, valid_text = "".join(train_docs), "".join(valid_docs)
    if context >= len(valid_text):
        raise ValueError(f"context must be < {len(valid_text)} (validation length), got {context}")
    vocab = "".join(sorted(set(train_text) | set(valid_text)))
    ids_train, ids_test = encode(train_text, vocab), encode(valid_text, vocab)
    x_train, y_train = _windows(ids_train, context, stride)
    x_test, y_test = _windows(ids_test, context, stride)
    arrays = (x_train, y_train, x_test, y_test, ids_train, ids_test)
    return TextDataset(*(jnp.asarray(a) for a in arrays), "text", len(vocab), (context,), vocab)
