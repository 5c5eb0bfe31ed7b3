"""Benchmark: the latency verdict's goals timed on real models of this machine.

    python -m benchmarks.latency [--runs 20] [--budget 10]

A chain of 4 MatMuls (256x256) against itself must be judged ``no difference``, and against a
chain of 5 (25% more work) ``slower``, in at least 19 of 20 comparisons each. These figures belong
to the machine and its load, so they are printed here; ``tests/test_latency.py`` checks the same
goals on a simulated noisy machine, which holds on any CPU.
"""

from __future__ import annotations

import argparse
import time

from onnxopt.bench import bench
from onnxopt.latency import machine_description
from onnxopt.testing import matmul_chain


def run(candidate_matmuls: int, runs: int, budget: float) -> list:
    baseline = matmul_chain(4)
    return [bench(matmul_chain(candidate_matmuls), baseline, budget_seconds=budget) for _ in range(runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per comparison")
    args = parser.parse_args(argv)
    print(machine_description(1))
    for matmuls, goal in ((4, "no difference"), (5, "slower")):
        start = time.perf_counter()
        results = run(matmuls, args.runs, args.budget)
        hits = sum(r.verdict == goal for r in results)
        print(f"\n4 vs {matmuls} MatMuls: '{goal}' in {hits} of {len(results)} "
              f"(goal {len(results) - 1}), {time.perf_counter() - start:.0f} s")
        for r in results:
            print(f"  {r.verdict:>13}  ratio {r.ratio:.3f} [{r.ratio_low:.3f}, {r.ratio_high:.3f}]  "
                  f"{r.blocks} blocks, {r.seconds:.1f} s, stopped: {r.stopped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
