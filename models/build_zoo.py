"""Write every zoo model to ``<outdir>/<name>.onnx``: ``python -m models.build_zoo [outdir]``.

The default outdir is ``models/zoo`` next to this file. Each export is checked (onnx.checker,
BatchNormalization count, onnxruntime against torch on another batch size) before it is written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from models import zoo

DEFAULT_OUTDIR = Path(__file__).resolve().parent / "zoo"


def build_zoo(outdir: Path = DEFAULT_OUTDIR) -> list[Path]:
    """Export every model in ``zoo.NAMES`` into ``outdir`` and print one line per model."""
    paths = []
    for name in zoo.NAMES:
        start = time.perf_counter()
        path = zoo.export(name, outdir / f"{name}.onnx")
        seconds = time.perf_counter() - start
        print(f"{name:26s} {path.stat().st_size / 1024:8.1f} KiB  {seconds:5.2f}s  -> {path}")
        paths.append(path)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} models, {total / 1024:.1f} KiB in all")
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        print("usage: python -m models.build_zoo [outdir]", file=sys.stderr)
        return 2
    build_zoo(Path(argv[0]) if argv else DEFAULT_OUTDIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
