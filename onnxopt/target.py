"""The int8 arithmetic of the machine a quantized model will run on, and the weights that are exact there.

onnxruntime's u8s8 kernels (MLAS) on x86 without VNNI (SSE4.1, AVX2, AVX-512 BW) multiply uint8
activations by int8 weights with ``pmaddubsw``: each pair of adjacent products along K is added into
an int16 with saturation before the int32 sum. Two products reach 2 × 255 × 127 = 64770, far past
32767, so 8-bit weights give wrong sums (measured on an AVX2 CPU by onnxruntime's own
``quantize_static``: a digits ResNet at 94.26% int8 against 99.81% float). With 7-bit weights,
|w| <= 63, a pair is at most 255 × 126 = 32130: no saturation whatever the pairing or the data.
VNNI (``vpdpbusd``, AVX-VNNI, AMX) and arm64 (``sdot``/``udot``) add into int32 directly: 8-bit
weights are exact. TensorRT takes symmetric int8 activations (zero point 0) and int8 weights.

``resolve`` turns ``--target`` (``auto`` detects) into a ``Target``; the quantize pass receives only
its arithmetic (weight bits, activation type) through its constructor.
"""

from __future__ import annotations

__all__ = ["TARGETS", "Target", "resolve", "detect_cpu"]

import platform
from collections.abc import Sequence
from dataclasses import dataclass

from onnxopt.errors import OptionError
from onnxopt.passes.quantize import TARGET_WEIGHT_BITS

TARGETS = ("auto", *TARGET_WEIGHT_BITS)
_WHY = {
    "avx2": "u8s8 kernels add product pairs into int16 with saturation (pmaddubsw): 7-bit weights, |pair| <= 255*126 = 32130",
    "avx512": "AVX-512 without VNNI adds product pairs into int16 with saturation (vpmaddubsw): 7-bit weights",
    "vnni": "VNNI adds products into int32 (vpdpbusd): 8-bit weights are exact",
    "arm64": "arm64 adds products into int32 (sdot/udot): 8-bit weights are exact",
    "tensorrt": "TensorRT: symmetric int8 activations (zero point 0), 8-bit weights",
}
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Target:
    """A resolved target: its name, the weight bits and activation type it needs, and why."""

    name: str
    detected: bool  # chosen by ``auto``
    why: str

    @property
    def weight_bits(self) -> int:
        return TARGET_WEIGHT_BITS[self.name]

    @property
    def weight_max(self) -> int:
        """The largest |int8 weight|: 63 for 7 bits, 127 for 8 (symmetric, zero point 0)."""
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def activations(self) -> str | None:
        """The activation type the target requires (None: either)."""
        return "int8" if self.name == "tensorrt" else None

    def as_dict(self) -> dict:
        return {"name": self.name, "detected": self.detected, "weight_range": [-self.weight_max, self.weight_max],
                "why": self.why}


def detect_cpu(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str, str]:
    """The target of this CPU (or of the given ``/proc/cpuinfo`` text and ``platform.machine()``), and why.

    An x86 CPU whose flags cannot be read, or that has none of the known ones, gets ``avx2``: 7-bit
    weights are exact on every kernel, so the unknown case costs precision, never correctness."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine in ("aarch64", "arm64", "armv8l") or machine.startswith("armv9"):
        return "arm64", f"machine {machine}"
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    if {"asimddp", "asimd"} & flags:  # an arm cpuinfo read on an emulated or odd machine name
        return "arm64", "arm Features in /proc/cpuinfo"
    vnni = [f for f in _VNNI_FLAGS if f in flags]
    if vnni:
        return "vnni", f"CPU flag {vnni[0]}"
    if "avx512bw" in flags:
        return "avx512", "CPU flag avx512bw without VNNI"
    if "avx2" in flags:
        return "avx2", "CPU flag avx2 without VNNI"
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "avx2", f"{machine} without avx2/VNNI flags read: 7-bit weights (SSE4.1 kernels saturate too)"
    return "avx2", f"instruction set of machine '{machine or 'unknown'}' not known: 7-bit weights, exact on every kernel"


def _names(providers: str | Sequence[str]) -> list[str]:
    items = [providers] if isinstance(providers, str) else list(providers)
    return [str(p).lower() for p in items]


def resolve(target: str | None = "auto", providers: str | Sequence[str] = "cpu",
            cpuinfo: str | None = None, machine: str | None = None) -> Target:
    """``target`` as a ``Target``; ``auto`` (or None) detects: a CUDA or TensorRT provider first in
    ``providers`` gives ``tensorrt``, else the CPU's instruction set (``detect_cpu``)."""
    name = "auto" if target is None else str(target).strip().lower()
    if name not in TARGETS:
        raise OptionError(f"--target {target}: unknown target (known: {', '.join(TARGETS)})")
    if name != "auto":
        return Target(name, False, _WHY[name])
    first = (_names(providers) or ["cpu"])[0]
    if "tensorrt" in first or "cuda" in first:
        return Target("tensorrt", True, f"provider {first}: " + _WHY["tensorrt"])
    found, reason = detect_cpu(cpuinfo, machine)
    return Target(found, True, f"{reason}: {_WHY[found]}")
