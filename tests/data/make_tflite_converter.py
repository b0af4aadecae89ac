"""Makes the TFLiteConverter comparison files: ``mnist1d_cnn_float.npz`` (the float MNIST-1D
CNN and data) and ``mnist1d_cnn_tfliteconverter.tflite`` (TensorFlow's full-integer conversion
of it), for ``tests/test_tflite_converter.py``.

Two stages, in two environments (TensorFlow is never installed into jquant's):

1. jquant's environment (``PYTHONPATH=$PWD python tests/data/make_tflite_converter.py float``):
   the zoo CNN trained on MNIST-1D (``train_or_load("cnn", mnist1d, seed 0, 3000 steps)``),
   its float32 parameters (``params/<layer>/<kernel|bias>``), 256 representative examples
   (``x_rep``: the first 256 training inputs) and 256 test examples (``x_test``, ``y_test``).
2. A separate virtual environment with ``tensorflow-cpu``
   (``python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu``, then
   ``/tmp/tfvenv/bin/python tests/data/make_tflite_converter.py tflite``): the same network as a
   Keras model (Conv1D SAME + relu, MaxPool1D 2, twice; Flatten; Dense + relu; Dense) with those
   weights, converted by ``tf.lite.TFLiteConverter`` with ``Optimize.DEFAULT``, the
   representative dataset ``x_rep`` (one example per step), ``TFLITE_BUILTINS_INT8`` and int8
   input and output.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
FLOAT = HERE / "mnist1d_cnn_float.npz"
TFLITE = HERE / "mnist1d_cnn_tfliteconverter.tflite"
LAYERS = ("conv1", "conv2", "dense1", "head")


def make_float() -> None:
    from jquant import data
    from jquant.models.train import train_or_load

    ds = data.load("mnist1d")
    trained = train_or_load("cnn", ds, 0, 3000)
    params = trained.variables["params"]
    arrays = {
        f"params/{layer}/{k}": np.asarray(params[layer][k], np.float32)
        for layer in LAYERS
        for k in ("kernel", "bias")
    }
    arrays |= dict(
        x_rep=np.asarray(ds.x_train[:256], np.float32),
        x_test=np.asarray(ds.x_test[:256], np.float32),
        y_test=np.asarray(ds.y_test[:256], np.int32),
    )
    np.savez_compressed(FLOAT, **arrays)
    print(f"wrote {FLOAT}")


def make_tflite() -> None:
    import tensorflow as tf

    f = np.load(FLOAT)
    keras = tf.keras
    inp = keras.Input(f["x_rep"].shape[1:])
    h = inp
    for layer in ("conv1", "conv2"):
        kernel = f[f"params/{layer}/kernel"]
        conv = keras.layers.Conv1D(kernel.shape[-1], kernel.shape[0], padding="same",
                                   activation="relu", name=layer)  # fmt: skip
        h = keras.layers.MaxPooling1D(2)(conv(h))
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(f["params/dense1/bias"].size, activation="relu", name="dense1")(h)
    out = keras.layers.Dense(f["params/head/bias"].size, name="head")(h)
    model = keras.Model(inp, out)
    for layer in LAYERS:
        model.get_layer(layer).set_weights([f[f"params/{layer}/kernel"], f[f"params/{layer}/bias"]])

    def representative():
        for i in range(len(f["x_rep"])):
            yield [f["x_rep"][i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    TFLITE.write_bytes(converter.convert())
    print(f"wrote {TFLITE} with TensorFlow {tf.__version__}")


if __name__ == "__main__":
    stages = {"float": make_float, "tflite": make_tflite}
    if len(sys.argv) != 2 or sys.argv[1] not in stages:
        sys.exit(f"usage: {sys.argv[0]} float | tflite")
    stages[sys.argv[1]]()
