"""Benchmark: a 12-recipe sweep on the digits CNN against the sum of its recipes' single runs (issue 18).

    .venv/bin/python -m benchmarks.sweep [--workers 2] [--latency-budget 1] [--ray]

Single runs: ``optimize(model, recipe)`` one after another in this process (latency measured at
the same budget, as ``python -m onnxopt`` would, without its process start). The sweep: the same
12 recipes through ``run_sweep`` on a fresh output folder (worker start-up included), then a rerun
of the grid extended by 4 recipes (only those 4 are built), and with ``--ray`` the 12 on a local
Ray cluster (its start-up included), whose front must be the pool's.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from onnxopt import optimize
from onnxopt.latency import machine_description
from onnxopt.sweep import expand_grid, run_sweep

MODEL = "models/digits/digits_cnn.onnx"
TEST = "models/digits/digits_test.npz"
GRID = {"passes": [["simplify", "fold-bn", "share-init"], ["simplify", "fold-bn"]],
        "cluster_bits": ["none", 4, 3], "prune": ["none", 0.25]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-budget", type=float, default=1.0)
    parser.add_argument("--ray", action="store_true")
    args = parser.parse_args()
    recipes = expand_grid(GRID)
    assert len(recipes) == 12
    start = time.perf_counter()
    for r in recipes:
        optimize(MODEL, r.replace(data=TEST, latency_budget=args.latency_budget))
    single = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        pool = run_sweep(MODEL, recipes, eval=TEST, out_dir=out, workers=args.workers,
                         latency_budget=args.latency_budget)
        swept = time.perf_counter() - start
        extended = expand_grid({**GRID, "cluster_bits": ["none", 4, 3, 2]})
        start = time.perf_counter()
        more = run_sweep(MODEL, extended, eval=TEST, out_dir=out, workers=args.workers,
                         latency_budget=args.latency_budget)
        rerun = time.perf_counter() - start
    print(f"machine: {machine_description()}")
    print(f"12 single runs, one after another: {single:.1f} s")
    print(f"sweep of the 12, {args.workers} workers: {swept:.1f} s ({swept / single:.2f}x the single runs; "
          f"build {pool.build_seconds:.1f} s, timing {pool.timing_seconds:.1f} s); "
          f"{len(pool.failed)} failed, front of {len(pool.front)}")
    print(f"grid extended to 16: {rerun:.1f} s, built {sum(not e.cached for e in more.entries)}, "
          f"cached {sum(e.cached for e in more.entries)}")
    if args.ray:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            ray = run_sweep(MODEL, recipes, eval=TEST, out_dir=out, ray="auto", latency_budget=args.latency_budget)
            seconds = time.perf_counter() - start
        same = [(e.metrics["accuracy"], e.metrics["file_bytes"]) for e in ray.entries] == \
               [(e.metrics["accuracy"], e.metrics["file_bytes"]) for e in pool.entries]
        print(f"sweep of the 12 on a local Ray cluster: {seconds:.1f} s (build {ray.build_seconds:.1f} s); "
              f"accuracy and bytes as the pool's: {same}; front of {len(ray.front)}, the pool's recipes: "
              f"{[e.key for e in ray.front] == [e.key for e in pool.front]}")
        print("latency ratio [95% interval], pool then ray, per recipe; front marked *:")
        for a, b in zip(pool.entries, ray.entries):
            print("  " + "   ".join(f"{e.metrics['latency_ratio']:.4f} [{e.metrics['latency_low'] or 0:.4f}, "
                                    f"{e.metrics['latency_high'] or 0:.4f}]{'*' if e.pareto else ' '}" for e in (a, b))
                  + f"   acc {a.metrics['accuracy']:.4f} bytes {a.metrics['file_bytes']}")


if __name__ == "__main__":
    main()
