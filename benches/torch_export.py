#!/usr/bin/env python3
# benches/torch_export.py: PyTorch-trained models for `gpu-mnist evaluate` to read without metadata
# (usage: python3 benches/torch_export.py DATA_DIR OUT_DIR; needs torch, numpy, safetensors).
# Train PyTorch models on MNIST in [0, 1] (no normalisation), report their test accuracy, and save
# their state_dicts with safetensors.torch.save_file, for `gpu-mnist evaluate` to read.
import gzip, os, sys
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import save_file
d = sys.argv[1]; out = sys.argv[2]
def idx(n):
    b = gzip.open(os.path.join(d, n)).read(); k = b[3]
    shape = [int.from_bytes(b[4+4*i:8+4*i], "big") for i in range(k)]
    return np.frombuffer(b, np.uint8, offset=4+4*k).reshape(shape)
xtr = torch.tensor(idx("train-images-idx3-ubyte.gz"), dtype=torch.float32) / 255
ytr = torch.tensor(idx("train-labels-idx1-ubyte.gz"), dtype=torch.long)
xte = torch.tensor(idx("t10k-images-idx3-ubyte.gz"), dtype=torch.float32) / 255
yte = torch.tensor(idx("t10k-labels-idx1-ubyte.gz"), dtype=torch.long)
torch.manual_seed(0); torch.set_num_threads(2)
dense = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
conv = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                     nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 128, 10))
for name, model in [("dense", dense), ("convnet", conv)]:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(1):
        perm = torch.randperm(60000)
        for i in range(0, 60000, 128):
            j = perm[i:i+128]
            opt.zero_grad(); F.cross_entropy(model(xtr[j].unsqueeze(1)), ytr[j]).backward(); opt.step()
    with torch.no_grad():
        acc = (model(xte.unsqueeze(1)).argmax(1) == yte).float().mean().item()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, name + ".safetensors"))
    print(name, "pytorch test accuracy", f"{100*acc:.2f}%", list(model.state_dict().keys()))
