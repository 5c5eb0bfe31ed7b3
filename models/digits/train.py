"""Train a small residual BatchNorm CNN on scikit-learn's digits: ``python -m models.digits.train``.

Deterministic (fixed seeds, deterministic algorithms, one thread), CPU only, a few seconds.
The 1797 8x8 images are split, stratified, into train / calibration / test (60 / 10 / 30 %);
pixels are scaled to [0, 1] and standardised with the training split's mean and std. Writes, next
to this file:

- ``digits_cnn.onnx``: opset 17, BatchNormalization kept as nodes, input ``input``
  [batch, 1, 8, 8] float32 (normalised), output ``output`` logits [batch, 10];
- ``digits_test.npz``: ``input`` (float32, N x 1 x 8 x 8) and ``labels`` (int64, N);
- ``digits_calib.npz``: ``input``, the calibration split.

It prints the test accuracy of torch and of onnxruntime on the exported model, which must agree.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models.zoo import ConvBNAct, ResidualBlock, bn_count, export_module

OUTDIR = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 40
BATCH = 32
LEARNING_RATE = 3e-3


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stem, identity residual block, downsampling residual block (1x1 conv+BN
    shortcut), global average pool, flatten, Linear: 1x8x8 -> 10 logits."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(1, width, 3),
            ResidualBlock(width, width),
            ResidualBlock(width, 2 * width, stride=2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified train / calib / test splits: normalised float32 N x 1 x 8 x 8, int64 labels."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=0.3, stratify=labels, random_state=SEED
    )
    train_x, calib_x, train_y, calib_y = train_test_split(
        rest_x, rest_y, test_size=1 / 7, stratify=rest_y, random_state=SEED
    )
    mean, std = train_x.mean(), train_x.std()
    splits = {"train": (train_x, train_y), "calib": (calib_x, calib_y), "test": (test_x, test_y)}
    return {name: (((x - mean) / std).astype(np.float32), y) for name, (x, y) in splits.items()}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """Adam with a one-cycle learning-rate schedule over EPOCHS epochs of shuffled mini-batches."""
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps = EPOCHS * -(-len(inputs) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=steps
    )
    generator = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), BATCH):
            batch = order[start : start + BATCH]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {total / len(inputs):.4f}")
    model.eval()


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predictions == y).mean())


def onnx_accuracy(data: bytes, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["output"], {"input": x})
    return float((logits.argmax(axis=1) == y).mean())


def main() -> int:
    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    splits = load_splits()
    print({name: len(y) for name, (_, y) in splits.items()})

    model = DigitsCNN()
    train(model, *splits["train"])
    test_x, test_y = splits["test"]
    data = export_module(model, torch.from_numpy(test_x[:1]))
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    if bn_count(proto) != bn_count(model):
        raise RuntimeError(
            f"{bn_count(model)} BatchNorm modules but {bn_count(proto)} nodes exported"
        )

    acc_torch = torch_accuracy(model, test_x, test_y)
    acc_onnx = onnx_accuracy(data, test_x, test_y)
    print(
        f"test accuracy: torch {acc_torch:.4f}, onnxruntime {acc_onnx:.4f} ({len(test_y)} images)"
    )
    if acc_torch != acc_onnx:
        raise RuntimeError("onnxruntime accuracy differs from torch")

    (OUTDIR / "digits_cnn.onnx").write_bytes(data)
    np.savez(OUTDIR / "digits_test.npz", input=test_x, labels=test_y)
    np.savez(OUTDIR / "digits_calib.npz", input=splits["calib"][0])
    seconds = time.perf_counter() - start
    print(f"wrote digits_cnn.onnx, digits_test.npz, digits_calib.npz to {OUTDIR} in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
