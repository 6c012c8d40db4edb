#!/usr/bin/env python3
# benches/keras_export.py (usage: KERAS_BACKEND=jax python3 benches/keras_export.py DATA_DIR OUT_DIR;
# needs keras, jax, numpy, safetensors).
# A Keras-trained dense model (the book's 784-512-10, RMSprop, one epoch), its test accuracy in
# Keras, and its weights saved with safetensors under gpu-mnist's names, without metadata.
import gzip, os, sys
os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np, keras
from safetensors.numpy import save_file
d = sys.argv[1]; out = sys.argv[2]
def idx(n):
    b = gzip.open(os.path.join(d, n)).read(); k = b[3]
    shape = [int.from_bytes(b[4+4*i:8+4*i], "big") for i in range(k)]
    return np.frombuffer(b, np.uint8, offset=4+4*k).reshape(shape)
xtr = idx("train-images-idx3-ubyte.gz").reshape(-1, 784).astype("float32") / 255
ytr = idx("train-labels-idx1-ubyte.gz")
xte = idx("t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype("float32") / 255
yte = idx("t10k-labels-idx1-ubyte.gz")
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10, activation="softmax")])
model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(xtr, ytr, epochs=1, batch_size=128, verbose=0)
loss, acc = model.evaluate(xte, yte, verbose=0)
save_file({f"dense_{i}.{k}": np.ascontiguousarray(w) for i, l in enumerate(model.layers)
           for k, w in zip(("kernel", "bias"), l.get_weights())}, os.path.join(out, "keras.safetensors"))
print(f"keras {keras.__version__} test accuracy {100 * acc:.2f}%, loss {loss:.4f}")
