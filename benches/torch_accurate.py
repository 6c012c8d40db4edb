#!/usr/bin/env python3
"""PyTorch baseline of `gpu-mnist train --model accurate`, the same recipe: conv 5x5x24 -> relu ->
max pool 2 -> batch norm -> conv 3x3x32 -> relu -> max pool 2 -> batch norm -> dense 256 -> relu ->
dropout 0.25 -> dense 10 (batch norm with Keras's epsilon 1e-3 and momentum 0.99, PyTorch's momentum
0.01);
Adam(lr 0.01, betas 0.7/0.9), OneCycleLR(max 0.01, 30 % warm-up, cosine, no momentum cycling);
batch 128; 10 epochs; every training batch augmented on the device as it is drawn (each image
shifted by up to 2 pixels each way, rotated by up to 10 degrees, scaled by 0.9 to 1.1:
F.affine_grid + F.grid_sample, bilinear, zeros outside); inputs in [0, 1]; data resident in memory.

usage: torch_accurate.py --data DIR [--device cpu|cuda] [--threads 2] [--seed 0] [--epochs 10]
Prints RESULT {json}: train_seconds (model build + training, data already loaded), test_accuracy.
"""
import argparse, gzip, json, math, os, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def idx(path):
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        b = f.read()
    dims = b[3]
    shape = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * dims).reshape(shape)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 24, 5)
        self.n1 = nn.BatchNorm2d(24, eps=1e-3, momentum=0.01)
        self.c2 = nn.Conv2d(24, 32, 3)
        self.n2 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        self.f1 = nn.Linear(800, 256)
        self.f2 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.n1(F.max_pool2d(F.relu(self.c1(x)), 2))
        x = self.n2(F.max_pool2d(F.relu(self.c2(x)), 2))
        x = F.dropout(F.relu(self.f1(x.flatten(1))), 0.25, self.training)
        return self.f2(x)


def augment(x, shift=2.0, rotate=10.0, scale=0.1):
    """Each image of x (N, 1, 28, 28) under its own random shift, rotation and scale (bilinear)."""
    n = x.shape[0]
    u = torch.rand(n, 4, device=x.device) * 2 - 1
    angle = u[:, 2] * math.radians(rotate)
    inv = 1.0 / (1.0 + scale * u[:, 3])
    cos, sin = torch.cos(angle) * inv, torch.sin(angle) * inv
    # The inverse map in affine_grid's coordinates ([-1, 1] over 28 pixels: a pixel is 2 / 28).
    tx, ty = u[:, 0] * shift * 2 / 28, u[:, 1] * shift * 2 / 28
    theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                         torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    f = lambda n: os.path.join(a.data, n)
    xtr = idx(f("train-images-idx3-ubyte.gz")); ytr = idx(f("train-labels-idx1-ubyte.gz"))
    xte = idx(f("t10k-images-idx3-ubyte.gz")); yte = idx(f("t10k-labels-idx1-ubyte.gz"))
    to = lambda x: (torch.tensor(x, dtype=torch.float32) / 255).unsqueeze(1).to(dev)
    Xtr, Xte = to(xtr), to(xte)
    Ytr, Yte = torch.tensor(ytr, dtype=torch.long, device=dev), torch.tensor(yte, dtype=torch.long, device=dev)
    torch.manual_seed(a.seed)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = Net().to(dev)
    steps = a.epochs * ((len(Xtr) + a.batch - 1) // a.batch)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.7, 0.9))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=steps, cycle_momentum=False)
    model.train()
    for _ in range(a.epochs):
        perm = torch.randperm(len(Xtr), device=dev)
        for i in range(0, len(Xtr), a.batch):
            j = perm[i:i + a.batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(augment(Xtr[j])), Ytr[j])
            loss.backward()
            opt.step()
            sched.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(Xte[i:i + 2000]).argmax(1) == Yte[i:i + 2000]).sum()) for i in range(0, len(Xte), 2000))
    total_s = time.perf_counter() - t0
    print("RESULT " + json.dumps({"framework": f"torch {torch.__version__}", "device": a.device,
                                  "threads": a.threads, "seed": a.seed, "epochs": a.epochs,
                                  "train_seconds": round(train_s, 3), "train_and_test_seconds": round(total_s, 3),
                                  "test_accuracy": correct / len(Xte)}))


if __name__ == "__main__":
    main()
