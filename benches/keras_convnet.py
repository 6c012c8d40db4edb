"""The book's chapter 8 convnet in Keras, as Deep Learning with Python (2nd ed.) writes it, timed
per epoch: the baseline `gpu-mnist train --model convnet` is measured against besides
`torch_convnet.py`.

The model, loss, optimizer (Keras's RMSprop defaults), batch 64 and 5 epochs are the book's; the
only difference is where the images come from: the four IDX files of `--data` (the same files
gpu-mnist reads) instead of `keras.datasets.mnist.load_data()`, which downloads them.

    python3 -m venv ~/.venvs/keras && ~/.venvs/keras/bin/pip install tensorflow-cpu keras numpy
    ~/.venvs/keras/bin/python benches/keras_convnet.py --data DIR --seed 0

Prints each epoch's seconds, then `RESULT {json}` with the epoch times, the test accuracy and the
peak RSS, like the PyTorch baselines.
"""

import argparse
import gzip
import json
import os
import resource
import struct
import time

import numpy as np


def read_idx(path):
    """The array of one IDX file (gzip or plain)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(folder, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return read_idx(path)
    raise SystemExit(f"{folder}: no {stem} or {stem}.gz")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with the four MNIST IDX files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: TensorFlow's default")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import keras
    from keras import layers

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)

    train_images = load(args.data, "train-images-idx3-ubyte").reshape((60000, 28, 28, 1))
    train_labels = load(args.data, "train-labels-idx1-ubyte")
    test_images = load(args.data, "t10k-images-idx3-ubyte").reshape((10000, 28, 28, 1))
    test_labels = load(args.data, "t10k-labels-idx1-ubyte")
    train_images = train_images.astype("float32") / 255
    test_images = test_images.astype("float32") / 255

    # The book's listing 8.1, compiled and fitted as in listing 8.2.
    inputs = keras.Input(shape=(28, 28, 1))
    x = layers.Conv2D(filters=32, kernel_size=3, activation="relu")(inputs)
    x = layers.MaxPooling2D(pool_size=2)(x)
    x = layers.Conv2D(filters=64, kernel_size=3, activation="relu")(x)
    x = layers.MaxPooling2D(pool_size=2)(x)
    x = layers.Conv2D(filters=128, kernel_size=3, activation="relu")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.t0
            times.append(seconds)
            print(f"epoch {epoch + 1}: {seconds:.2f} s, train accuracy {logs['accuracy']:.4f}", flush=True)

    times = []
    model.fit(train_images, train_labels, epochs=args.epochs, batch_size=64, verbose=0, callbacks=[EpochTimes()])
    test_loss, test_acc = model.evaluate(test_images, test_labels, verbose=0)
    later = sorted(times[1:]) if len(times) > 1 else times
    median = later[len(later) // 2] if len(later) % 2 else sum(later[len(later) // 2 - 1 : len(later) // 2 + 1]) / 2
    result = {
        "framework": f"keras {keras.__version__} / tensorflow {tf.__version__}",
        "seed": args.seed,
        "epoch_s": [round(t, 3) for t in times],
        "median_epoch_2_on_s": round(median, 3),
        "test_accuracy": round(float(test_acc), 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
