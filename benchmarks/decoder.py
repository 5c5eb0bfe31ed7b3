"""Benchmark: weight-only int4 on a small trained Llama-style decoder, against onnxruntime's MatMulNBitsQuantizer.

    .venv/bin/python -m benchmarks.decoder [--steps 400] [--budget 2] [--json out.json] [--cache DIR]

Needs ``transformers`` (the ``bench`` extra) and ``torch``; not onnxopt itself.

The model: ``transformers.LlamaForCausalLM`` from a config (4 layers, hidden 256, 4 heads, SwiGLU MLP
768 wide, RoPE, RMSNorm, 128 positions, untied LM head), with a byte-level BPE vocabulary of 8,192
tokens trained by ``tokenizers``. (GPT-2 was tried first: its export reads its Conv1D weights
through Gemm, which ``quantize-int4`` leaves float unless ``op_types`` names Gemm, and its tied LM
head reads the token table through a Transpose, so ``--quantize int4`` quantized almost nothing.) No small decoder with real trained weights ships inside a PyPI wheel that we found,
and random weights give near-uniform logits that say little about int4; so the model is trained
here, briefly (``--steps`` AdamW steps, batch 16 x 64 tokens), on the Python standard library's own
source files (sorted; every 8th file held out), until its next-token distributions are peaked.
Tokenizer and weights are cached under ``--cache`` (the temp dir by default) and reused.

Exported with ``torch.onnx.export`` (opset 18, the exporter's own, no KV cache: ``input_ids [batch, seq]`` ->
``logits [batch, seq, vocab]``, batch and seq dynamic). Rows: onnxopt ``--quantize int4`` through
``onnxopt.optimize`` (the command line's recipe: ``simplify,fold-bn,share-init`` then
``quantize-int4``), RTN and HQQ at block 32 and 128; onnxruntime's ``MatMulNBitsQuantizer`` (RTN
symmetric on MatMul and Gather, HQQ on MatMul) on the same simplified fp32 file. Figures on 32
held-out sequences of 64 tokens: cosine of the next-token logits per position against fp32 (mean
and worst over all 2,048 positions), top-1 agreement with fp32, the file over fp32's, latency over
fp32's (``compare_latency``: batch 1 x seq 64, one thread, interleaved, median ratio) and build
seconds. Name the CPU beside any figure copied from here.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from benchmarks.transformers import _cpu, _session
from onnxopt import optimize
from onnxopt.latency import compare_latency
from onnxopt.passes import Simplify
from onnxopt.recipe import Recipe
from onnxopt.runtime import ModelSnapshot

VOCAB, LAYERS, HIDDEN, HEADS, MLP, POSITIONS = 8192, 4, 256, 4, 768, 128
SEQ, EVAL_SEQUENCES, BATCH = 64, 32, 16


def _corpus() -> tuple[list[str], list[str]]:
    """The standard library's .py files (sorted): train on 7 of 8, hold out every 8th."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if i % 8 == 0]


def _tokenizer(cache: Path, train: list[str]):
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    path = cache / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train, vocab_size=VOCAB, min_frequency=2, show_progress=False)
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


def _ids(tok, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)])


def _model(cache: Path, train_ids: np.ndarray, steps: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=POSITIONS,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config)
    weights = cache / f"llama_steps{steps}.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights))
        return model.eval(), None
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    start, loss = time.perf_counter(), None
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - SEQ - 1, BATCH)
        batch = torch.from_numpy(np.stack([train_ids[s:s + SEQ] for s in starts]))
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    torch.save(model.state_dict(), weights)
    return model.eval(), {"steps": steps, "final_train_loss": float(loss.item()),
                          "train_seconds": time.perf_counter() - start}


def _export(model, path: Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    ids = torch.zeros((2, SEQ), dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=POSITIONS)
    torch.onnx.export(Logits(model), (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                      opset_version=18, dynamo=True, dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                      external_data=False)


def _ort_nbits(base: Path, algorithm: str, block: int) -> ir.Model:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, op_types_to_quantize=("MatMul", "Gather"))
    else:
        config = HQQWeightOnlyQuantConfig(block_size=block, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(base), algo_config=config)
    quantizer.process()
    return ir.from_proto(quantizer.model.model)


def _ours(base: Path, method: str, block: int) -> ir.Model:
    recipe = Recipe(quantize="int4", int4_method=method, int4_block_size=block, validate=False, latency=False)
    return optimize(str(base), recipe).model


def next_token_figures(logits: np.ndarray, ref: np.ndarray) -> dict:
    """Cosine of the logits per position (mean, worst) and top-1 agreement, over every position."""
    a = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"cosine_mean": float(cos.mean()), "cosine_worst": float(cos.min()),
            "top1": float((a.argmax(1) == b.argmax(1)).mean())}


def run(steps: int = 400, budget: float = 2.0, json_path: Path | None = None, cache: Path | None = None,
        only: list[str] | None = None) -> list[dict]:
    import torch

    torch.set_num_threads(2)
    cache = Path(cache or Path(tempfile.gettempdir()) / "onnxopt-bench-decoder")
    cache.mkdir(parents=True, exist_ok=True)
    train, held = _corpus()
    tok = _tokenizer(cache, train)
    train_ids, held_ids = _ids(tok, train), _ids(tok, held)
    model, training = _model(cache, train_ids, steps)
    rng = np.random.default_rng(1)
    starts = rng.choice(len(held_ids) - SEQ, EVAL_SEQUENCES, replace=False)
    eval_ids = np.stack([held_ids[s:s + SEQ] for s in starts])
    with torch.no_grad():
        t = torch.from_numpy(eval_ids)
        held_loss = float(model(input_ids=t, labels=t).loss)
    tmp = Path(tempfile.mkdtemp(prefix="onnxopt-decoder-"))
    export = tmp / "llama.onnx"
    _export(model, export)
    fp32 = ir.load(export)
    Simplify()(fp32)
    base = tmp / "fp32.onnx"
    ir.save(fp32, base)
    fp32_size = base.stat().st_size
    fp32_session, fp32_snapshot = _session(fp32), ModelSnapshot(fp32)
    ref = fp32_session.run(None, {"input_ids": eval_ids})[0]
    with torch.no_grad():
        torch_ref = model(input_ids=torch.from_numpy(eval_ids)).logits.numpy()
    probs = np.exp(ref - ref.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    labels = eval_ids[:, 1:]
    fp32_acc = float((ref[:, :-1].argmax(-1) == labels).mean())
    header = {"cpu": _cpu(), "onnxruntime": ort.__version__, "training": training, "held_out_loss": held_loss,
              "fp32_top1_vs_next_token": fp32_acc, "fp32_mean_max_prob": float(probs.max(-1).mean()),
              "export_vs_torch_max_abs": float(np.abs(ref - torch_ref).max()), "fp32_bytes": fp32_size}
    print(json.dumps(header, indent=1))
    rows = {}
    for method in ("rtn", "hqq"):
        for block in (32, 128):
            rows[f"onnxopt int4 {method.upper()} b{block}"] = (lambda m=method, b=block: _ours(base, m, b))
    for method, blocks in (("rtn", (32, 128)), ("hqq", (32, 128))):
        for block in blocks:
            rows[f"onnxruntime MatMulNBits {method.upper()} b{block}"] = (lambda m=method, b=block: _ort_nbits(base, m, b))
    feed = {"input_ids": eval_ids[:1]}
    results = []
    print(f"Llama-style decoder, CPU: {_cpu()}, onnxruntime {ort.__version__}, 1 thread; "
          f"{EVAL_SEQUENCES}x{SEQ} held-out tokens")
    print(f"{'row':34s} {'cos mean':>9s} {'cos worst':>9s} {'top1':>6s} {'acc':>6s} {'file':>6s} {'latency':>17s} {'build s':>7s}")
    for name, make in rows.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            model_q = make()
        except Exception as exc:  # noqa: BLE001 - a quantizer that fails is a row of the table
            results.append({"row": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{name:34s} failed: {results[-1]['error']}", flush=True)
            continue
        build = time.perf_counter() - start
        path = tmp / (name.replace(" ", "_") + ".onnx")
        ir.save(model_q, path)
        ops = {n.op_type for n in model_q.graph}
        session = _session(model_q)
        y = session.run(None, {"input_ids": eval_ids})[0]
        fig = next_token_figures(y, ref)
        acc = float((y[:, :-1].argmax(-1) == labels).mean())
        lat = compare_latency(fp32_snapshot, ModelSnapshot(model_q), feed, threads=1, budget_seconds=budget)
        row = {"row": name, **fig, "top1_vs_next_token": acc, "file_ratio": path.stat().st_size / fp32_size,
               "latency_ratio": lat.ratio, "latency_ci": [lat.ratio_low, lat.ratio_high], "build_seconds": build,
               "float_matmuls_left": sum(1 for n in model_q.graph if n.op_type in ("MatMul", "Gemm")),
               "ops": sorted(ops & {"MatMulNBits", "GatherBlockQuantized", "Gather", "MatMul", "Gemm"})}
        results.append(row)
        print(f"{name:34s} {fig['cosine_mean']:9.5f} {fig['cosine_worst']:9.5f} {fig['top1']:6.3f} {acc:6.3f} "
              f"{row['file_ratio']:6.3f} {lat.ratio:5.2f} [{lat.ratio_low:.2f},{lat.ratio_high:.2f}] {build:7.1f}",
              flush=True)
    if json_path:
        json_path.write_text(json.dumps({**header, "rows": results}, indent=1))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (batch 16 x 64 tokens)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per row")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cache", type=Path, help="tokenizer and trained weights (default: the temp dir)")
    parser.add_argument("--only", action="append", help="only this row (repeatable)")
    args = parser.parse_args(argv)
    return run(steps=args.steps, budget=args.budget, json_path=args.json, cache=args.cache, only=args.only)


if __name__ == "__main__":
    main()
