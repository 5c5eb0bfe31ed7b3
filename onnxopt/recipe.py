"""A recipe: the whole configuration of one run, as one value.

``Recipe`` holds the passes in order and every option that shapes the run (data, budgets,
providers, the quantize pass's options), with the command line's defaults. The command line builds
one from its flags, ``optimize(model, recipe)`` runs one (``optimize(model, passes, **options)`` is
the same with a recipe built from the keywords), and a recipe reads and writes a small TOML file, so
that a run can be replayed (``--recipe run.toml``, ``--save-recipe run.toml``) and a sweep can
enumerate recipes (``recipe.replace(prune=0.3)``).

The TOML file is flat: one key per field, named as the field (the command line's flag with ``_``
for ``-``; ``protect_first = false`` is ``--prune-first``, ``validate = false`` ``--no-validate``),
``dims`` and ``fix_dims`` as tables::

    passes = ["simplify", "fold-bn", "share-init", "quantize"]
    calibration = "calib.npz"
    data = "test.npz"
    max_drop = 0.5
    [fix_dims]
    batch = 1

Fields left at their defaults are not written. Relative paths are read from the current folder,
as on the command line.
"""

from __future__ import annotations

__all__ = ["Recipe", "DEFAULT_PASSES", "QUANTIZE_PRESET", "DISTILL_OPTIONS", "read_toml", "TOML_LIMIT"]

import dataclasses
import math
import os
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxopt.calibrate import DEFAULT_PERCENTILE
from onnxopt.errors import OptionError, UnknownPassError
from onnxopt.options import check_arguments, require_torch
from onnxopt.passes import (
    REGISTRY,
    ClusterWeights,
    LowRankFactorize,
    QuantizeDynamic,
    QuantizeQDQ,
    QuantizeWeightsInt4,
    SparsifyWeights,
)
from onnxopt.passes._base import AUTO
from onnxopt.validate import DEFAULT_ATOL

DEFAULT_PASSES = ("simplify", "fold-bn", "prune", "share-init")
# --quantize int8 with the default passes: prune's lossless removal is left to a run of its own.
QUANTIZE_PRESET = ("simplify", "fold-bn", "share-init", "quantize")
# Options of the compression family's passes: each adds its pass (after the others) when given.
DISTILL_OPTIONS = ("train_data", "epochs", "steps", "temperature", "alpha", "lr", "seed", "distill_features", "feature_weight")
_INT4_OPTIONS = ("int4_block_size", "int4_method", "int4_symmetric", "accuracy_level", "int4_fallback")
QUANTIZE_MODES = ("int8", "int8-dynamic", "int4", "auto")  # auto: onnxopt.auto_quantize
_FAMILY_OPTIONS = ("cluster_bits", "cluster_per_channel", "sparsity", "sparsity_pattern", "lowrank_energy", "lowrank_ratio")
_QUANTIZE_OPTIONS = ("activations", "per_tensor", "bias_correction", "exclude", "calibrate", "percentile", "target",
                     "smooth_quant")


# The largest recipe or grid file read: a real one is a few hundred bytes.
TOML_LIMIT = 2**20


def read_toml(path: str | os.PathLike, flag: str) -> dict[str, Any]:
    """The table of the TOML file at ``path`` (``--recipe``, ``--grid``: ``flag`` names it in the
    messages); a missing file, a folder, a device or a FIFO, a file over ``TOML_LIMIT`` and text that
    is not UTF-8 TOML are each one ``OptionError`` line, before more than ``TOML_LIMIT`` bytes are read."""
    shown = f"{flag} {os.fspath(path)}"
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise OptionError(f"{shown}: is a folder, not a TOML file")
            if not stat.S_ISREG(mode):
                raise OptionError(f"{shown}: not a regular file (a device, pipe or socket); give a TOML file")
            data = f.read(TOML_LIMIT + 1)
    except FileNotFoundError:
        raise OptionError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise OptionError(f"{shown}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise OptionError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if len(data) > TOML_LIMIT:
        raise OptionError(f"{shown}: more than {TOML_LIMIT // 2**20} MiB; a TOML file of options is far smaller")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise OptionError(f"{shown}: not UTF-8 text (byte {exc.start}); a TOML file is UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"{shown}: not valid TOML ({exc})") from None


@dataclass
class Recipe:
    """Every option of a run (see ``onnxopt.optimize`` for what each does)."""

    passes: Sequence[str | ir.passes.PassBase] = DEFAULT_PASSES
    # data and validation
    data: Any = None
    dims: Mapping[str, int] | Sequence[str] | None = None
    fix_dims: Mapping[str, int] | Sequence[str] | None = None
    batch_size: int | None = None
    max_samples: int | None = None
    providers: str | Sequence[str] = "cpu"
    validate: bool = True
    rtol: float | None = None
    atol: float = DEFAULT_ATOL
    check: bool = False
    # latency
    latency: bool = True
    latency_budget: float = 5.0
    threads: int | None = None
    # pruning by importance
    prune: float | None = None
    importance: str = "l1"
    prune_scope: str = "layer"
    round_to: int = 1
    protect_first: bool = True
    # quantization
    quantize: str | None = None
    calibration: Any = None
    calibrate: str = "minmax"
    percentile: float = DEFAULT_PERCENTILE
    activations: str = "uint8"
    per_tensor: bool = False
    bias_correction: bool = True
    exclude: Sequence[str] = field(default_factory=tuple)
    target: str | None = "auto"
    max_drop: float | None = None
    min_cosine: float | None = None
    outputs: Sequence[str] | None = None  # the outputs a budget judges (the others are reported)
    speed_fallback: bool | None = None
    smooth_quant: float | str | None = None  # int8 (static and dynamic): SmoothQuant's alpha, or "auto"
    # int8-dynamic: "row" (one scale per row, token, of each activation), "tensor" (one per tensor) or "auto"
    # (with a budget, per tensor first and per row where the budget needs it; without one, per tensor, or per
    # row when --smooth-quant asks for smoothing)
    dynamic_activations: str = "auto"
    # weight-only int4 (quantize = "int4") and dynamic int8 (quantize = "int8-dynamic")
    int4_block_size: int = 32
    int4_method: str = "rtn"
    int4_symmetric: bool = True
    accuracy_level: int | None = None
    int4_fallback: str = "int8"  # the budget's way back for a 4-bit layer: 8 bits first, or float at once
    # half precision, after the other passes: "fp16" or "bf16" (float32 islands chosen by measurement)
    precision: str | None = None
    # knowledge distillation from the input model, after the lossy passes
    distill: bool = False
    train_data: Any = None
    epochs: int | None = None
    steps: int | None = None
    temperature: float = 4.0
    alpha: float = 0.5
    lr: float = 1e-3
    seed: int = 0
    # intermediate matching: "auto" (the channel groups' boundaries) or tensor names, and its weight
    distill_features: str | Sequence[str] | None = None
    feature_weight: float = 1.0
    # the rest of the compression family (lossy: reported, not judged by the lossless tolerance);
    # "auto": per layer by measured sensitivity under the budget (onnxopt.sensitivity)
    cluster_bits: int | str | None = None
    cluster_per_channel: bool = False
    sparsity: float | str | None = None
    sparsity_pattern: str | None = None
    lowrank_energy: float | str | None = None
    lowrank_ratio: float | None = None

    # -- building -----------------------------------------------------------------------------------

    def replace(self, **changes) -> Recipe:
        """A copy with ``changes``; an unknown name is refused in one line."""
        _known(changes, "optimize()")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> Recipe:
        """The recipe a TOML file holds; unknown keys, bad TOML and bad values are one-line errors."""
        path = Path(path)
        return cls._from_table(read_toml(path, "--recipe"), f"--recipe {path}")

    @classmethod
    def from_toml_text(cls, text: str) -> Recipe:
        """The recipe a TOML text holds (``to_toml``'s inverse)."""
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise OptionError(f"recipe: not valid TOML ({exc})") from None
        return cls._from_table(table, "recipe")

    @classmethod
    def _from_table(cls, table: Mapping[str, Any], where: str) -> Recipe:
        _known(table, where)
        for name in ("data", "calibration", "train_data"):  # a file holds paths; arrays come by the API alone
            if name in table and not isinstance(table[name], str):
                raise OptionError(f"{where}: {name} = {table[name]!r}: give a file path as a string")
        recipe = cls(**table)
        recipe.check_options()
        return recipe

    # -- checking and resolving ---------------------------------------------------------------------

    def check_options(self) -> None:
        """Refuse a field whose type or value cannot work (``OptionError``, the command line's words)."""
        if self.quantize not in (None, *QUANTIZE_MODES):
            raise OptionError(f"--quantize {self.quantize!r}: not one of {', '.join(QUANTIZE_MODES)}")
        self._check_int4_and_distill()
        if isinstance(self.exclude, str) or not all(isinstance(e, str) for e in self.exclude):
            raise OptionError(f"--exclude: give a list of node names, op types or patterns, not {self.exclude!r}")
        for name in ("per_tensor", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}: must be true or false, not {getattr(self, name)!r}")
        if self.outputs is not None and (isinstance(self.outputs, str) or not all(isinstance(o, str) for o in self.outputs)):
            raise OptionError(f"--outputs: give a list of output names, not {self.outputs!r}")
        if self.precision not in (None, "fp16", "bf16"):
            raise OptionError(f"--precision {self.precision!r}: not one of fp16, bf16")
        if self.activations not in ("uint8", "int8", "auto"):
            raise OptionError(f"--activations {self.activations!r}: not one of uint8, int8, auto")
        if self.smooth_quant is not None:
            alpha = self.smooth_quant
            if not (alpha == "auto" or (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                        and math.isfinite(alpha) and 0.0 <= alpha <= 1.0)):
                raise OptionError(f"--smooth-quant {alpha!r}: give alpha in [0, 1] or auto")
            if self.quantize == "int4" or not (self.quantize in ("int8", "int8-dynamic", "auto") or any(
                    _is_quantize(p) or _is_dynamic(p) for p in self.pass_list())):
                raise OptionError("--smooth-quant applies to --quantize int8, int8-dynamic or auto")
        if self.dynamic_activations not in ("row", "tensor", "auto"):
            raise OptionError(f"--dynamic-activations {self.dynamic_activations!r}: not one of row, tensor, auto")
        if self.dynamic_activations == "tensor" and self.smooth_quant is not None and self.quantize == "int8-dynamic":
            raise OptionError("--smooth-quant with --quantize int8-dynamic needs --dynamic-activations row: with one "
                              "scale per tensor, the spread between rows, not channels, sets the step")
        if self.dynamic_activations != "auto" and self.quantize not in ("int8-dynamic", "auto") and not any(
                _is_dynamic(p) for p in self.pass_list()):
            raise OptionError("--dynamic-activations applies to --quantize int8-dynamic (or auto)")
        self._check_family()
        check_arguments({**self.arguments(), "passes": self.pass_list()})
        if self.distill:
            require_torch("--distill")
        if self.prune is not None and self.importance in ("taylor", "fisher"):
            require_torch(f"--importance {self.importance}")
        if not self._quantizes() and self._quantize_options_changed():
            raise OptionError("--activations, --target, --per-tensor, --exclude, --calibrate, --percentile, "
                              "--no-bias-correction and --no-speed-fallback apply to --quantize int8")

    def _check_int4_and_distill(self) -> None:
        if self.int4_block_size not in (16, 32, 64, 128, 256) or isinstance(self.int4_block_size, bool):
            raise OptionError(f"--int4-block-size {self.int4_block_size!r}: not one of 16, 32, 64, 128, 256")
        if self.int4_method not in ("rtn", "hqq", "gptq"):
            raise OptionError(f"--int4-method {self.int4_method!r}: not one of rtn, hqq, gptq")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise OptionError(f"--accuracy-level {self.accuracy_level!r}: not one of 0, 1, 2, 3, 4")
        if self.int4_fallback not in ("int8", "float"):
            raise OptionError(f"--int4-fallback {self.int4_fallback!r}: not one of int8, float")
        default = Recipe()
        if self.quantize != "int4" and any(getattr(self, n) != getattr(default, n) for n in _INT4_OPTIONS):
            raise OptionError("--int4-block-size, --int4-method, --int4-asymmetric, --int4-fallback and --accuracy-level "
                              "apply to --quantize int4")
        if self.quantize == "int4" and self.int4_method == "gptq" and self.calibration is None and self.data is None:
            raise OptionError("--int4-method gptq needs --calibration (or --data): its X^T X per weight input comes "
                              "from running the model on samples")
        if not isinstance(self.distill, bool):
            raise OptionError(f"--distill: distill must be true or false, not {self.distill!r}")
        if not self.distill:
            if any(getattr(self, n) != getattr(default, n) for n in DISTILL_OPTIONS):
                raise OptionError("--train-data, --epochs, --steps, --temperature, --alpha, --lr, --seed, --distill-features "
                                  "and --feature-weight apply to --distill")
            return
        if self.train_data is None:
            raise OptionError("--distill needs --train-data (inputs to train on; labels are not needed)")
        if self.epochs is not None and self.steps is not None:
            raise OptionError("--distill: give --epochs or --steps, not both")
        for flag, value, low in (("--epochs", self.epochs, 1), ("--steps", self.steps, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise OptionError(f"{flag} {value!r}: must be a positive whole number")
        for flag, value in (("--temperature", self.temperature), ("--lr", self.lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise OptionError(f"{flag} {value!r}: must be a finite number above 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise OptionError(f"--alpha {self.alpha!r}: must be a number in [0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise OptionError(f"--seed {self.seed!r}: must be a whole number from 0 to 2**63 - 1")
        features = self.distill_features
        if features is not None and features != "auto" and (
                isinstance(features, str) or not isinstance(features, Sequence) or not features
                or not all(isinstance(f, str) and f.strip() for f in features)):
            raise OptionError(f"--distill-features {features!r}: give auto or tensor names (NAME[,NAME])")
        weight = self.feature_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise OptionError(f"--feature-weight {weight!r}: must be a finite number above 0")
        if weight != 1.0 and features is None:
            raise OptionError("--feature-weight applies to --distill-features")

    def _check_family(self) -> None:
        def number(flag: str, value, low: float, high: float, high_open: bool = False, whole: bool = False,
                   low_open: bool = False) -> None:
            if value is None:
                return
            kind = int if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise OptionError(f"{flag} {value!r}: must be {'a whole number' if whole else 'a number'}")
            inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
            if not inside:  # NaN too: no comparison holds
                raise OptionError(f"{flag} {value:g}: must be in {'(' if low_open else '['}{low:g}, {high:g}"
                                  f"{')' if high_open else ']'}")

        autos = self.auto_levels()
        if autos and self.data is None:
            raise OptionError(f"{autos[0]} auto measures each layer on --eval (or --data): give it")
        if autos and not self.validate:
            raise OptionError(f"{autos[0]} auto measures each layer against the input model: not with --no-validate")
        if self.sparsity == AUTO and self.sparsity_pattern is not None:
            raise OptionError("--sparsity auto chooses a sparsity per layer; --sparsity-pattern 2:4 fixes one: give one")
        if self.lowrank_energy == AUTO and self.lowrank_ratio is not None:
            raise OptionError("--lowrank-energy auto and --lowrank-ratio both set the rank: give one")
        number("--cluster-bits", _fixed(self.cluster_bits), 1, 8, whole=True)
        number("--sparsity", _fixed(self.sparsity), 0.0, 1.0, high_open=True)
        if self.lowrank_energy == 0:
            raise OptionError("--lowrank-energy 0: keeps nothing; give a fraction in (0, 1]")
        number("--lowrank-energy", _fixed(self.lowrank_energy), 0.0, 1.0, low_open=True)
        number("--lowrank-ratio", self.lowrank_ratio, 0.0, 1.0, low_open=True, high_open=True)
        if self.sparsity_pattern not in (None, "2:4"):
            raise OptionError(f"--sparsity-pattern {self.sparsity_pattern!r}: not one of 2:4")
        if not isinstance(self.cluster_per_channel, bool):
            raise OptionError(f"cluster_per_channel: must be true or false, not {self.cluster_per_channel!r}")

    def auto_levels(self) -> list[str]:
        """The flags set to ``auto`` (levels per layer chosen by measured sensitivity)."""
        return [flag for flag, value in (("--sparsity", self.sparsity), ("--cluster-bits", self.cluster_bits),
                                         ("--lowrank-energy", self.lowrank_energy)) if value == AUTO]

    def pass_list(self) -> list[str | ir.passes.PassBase]:
        """The passes in order, names or objects: ``quantize int8`` adds its pass (with the default
        passes, the quantize preset), and a ``quantize`` name becomes a ``QuantizeQDQ`` with this
        recipe's options."""
        passes = self.passes
        if isinstance(passes, str):
            passes = [p.strip() for p in passes.split(",") if p.strip()]
        elif not isinstance(passes, Sequence) or isinstance(passes, Mapping):
            raise OptionError(f"--passes: give pass names (a list, or one comma-separated string) or pass objects, "
                              f"not {type(passes).__name__}")
        items = list(passes)
        for name, given in (("lowrank", self.lowrank_energy is not None or self.lowrank_ratio is not None),
                            ("sparsify", self.sparsity is not None or self.sparsity_pattern is not None),
                            ("cluster", self.cluster_bits is not None)):
            if given and name not in items and not any(getattr(p, "name", None) == name for p in items):
                items.append(name)
        # auto is checked as static int8 (whose options it takes); optimize() runs onnxopt.auto_quantize for it
        mode_pass = {"int8": "quantize", "int8-dynamic": "quantize-dynamic", "int4": "quantize-int4",
                     "auto": "quantize"}.get(self.quantize)
        if mode_pass and not any(_is_quantize(p) or p == mode_pass or getattr(p, "name", None) == mode_pass for p in items):
            preset = [*QUANTIZE_PRESET[:-1], mode_pass]
            items = preset if tuple(items) == DEFAULT_PASSES else [*items, mode_pass]
        built = {"quantize": self._quantize_pass, "cluster": self._cluster_pass, "sparsify": self._sparsify_pass,
                 "lowrank": self._lowrank_pass, "quantize-dynamic": self._dynamic_pass, "quantize-int4": self._int4_pass}
        return [built[p]() if isinstance(p, str) and p in built else p for p in items]

    def resolved_passes(self) -> list[ir.passes.PassBase]:
        """``pass_list`` as pass objects (names from ``onnxopt.passes.REGISTRY``)."""
        resolved = []
        for item in self.pass_list():
            if isinstance(item, ir.passes.PassBase):
                resolved.append(item)
                continue
            name = str(item).strip()
            if name not in REGISTRY:
                raise UnknownPassError(f"unknown pass '{name}' (known: {', '.join(REGISTRY)})")
            resolved.append(REGISTRY[name]())
        return resolved

    def arguments(self) -> dict[str, Any]:
        """The fields that ``onnxopt.pipeline`` reads, by name (the quantize pass's own options go into its object)."""
        skip = {"passes", "quantize", "activations", "per_tensor", "bias_correction", "exclude", "dynamic_activations",
                *_FAMILY_OPTIONS,
                *_INT4_OPTIONS}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def _quantizes(self) -> bool:
        return any(_is_quantize(p) or _is_dynamic(p) for p in self.pass_list()) or self.quantize in ("int8-dynamic", "int4")

    def _quantize_options_changed(self) -> bool:
        default = Recipe()
        return any(getattr(self, n) != getattr(default, n) for n in _QUANTIZE_OPTIONS) or self.speed_fallback is False

    def _dynamic_pass(self) -> QuantizeDynamic:
        from onnxopt.target import resolve

        # The weights the target's kernels sum exactly: 7-bit on x86 without VNNI, as for static int8.
        layout = self.dynamic_activations
        if layout == "auto" and self.max_drop is None and self.min_cosine is None:
            # No budget to step by: per tensor (onnxruntime's fused layout, the faster; per row was slower than
            # fp32 on the zoo transformer at batch 1), unless smoothing is asked for, which needs rows.
            layout = "row" if self.smooth_quant is not None else "tensor"
        return QuantizeDynamic(exclude=tuple(self.exclude), activations=layout,
                               smooth_alpha=self.smooth_quant).for_target(resolve(self.target, self.providers).name)

    def _int4_pass(self) -> QuantizeWeightsInt4:
        return QuantizeWeightsInt4(block_size=self.int4_block_size, symmetric=self.int4_symmetric, method=self.int4_method,
                                   accuracy_level=self.accuracy_level, exclude=tuple(self.exclude),
                                   fallback=self.int4_fallback)

    def _cluster_pass(self) -> ClusterWeights:
        if self.cluster_bits == AUTO:
            return ClusterWeights(per_channel=self.cluster_per_channel, per_layer=AUTO)
        return ClusterWeights(bits=4 if self.cluster_bits is None else self.cluster_bits, per_channel=self.cluster_per_channel)

    def _sparsify_pass(self) -> SparsifyWeights:
        if self.sparsity == AUTO:
            return SparsifyWeights(per_layer=AUTO)
        return SparsifyWeights(sparsity=0.5 if self.sparsity is None else self.sparsity, pattern=self.sparsity_pattern)

    def _lowrank_pass(self) -> LowRankFactorize:
        if self.lowrank_energy == AUTO:
            return LowRankFactorize(per_layer=AUTO)
        return LowRankFactorize(energy=0.9 if self.lowrank_energy is None else self.lowrank_energy, ratio=self.lowrank_ratio)

    def _quantize_pass(self) -> QuantizeQDQ:
        return QuantizeQDQ(activations=self.activations, per_channel=not self.per_tensor, exclude=list(self.exclude),
                           bias_correction=self.bias_correction)

    # -- writing ------------------------------------------------------------------------------------

    def to_toml(self) -> str:
        """The fields that differ from the defaults, as TOML that ``from_toml`` reads back."""
        default = Recipe()
        lines, tables = ["# onnxopt recipe: python -m onnxopt MODEL --recipe THIS_FILE"], []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "passes":
                value = self._pass_names()
                if tuple(value) == DEFAULT_PASSES:
                    continue
            elif _same(value, getattr(default, f.name)):
                continue
            if value is None:
                continue
            if f.name in ("dims", "fix_dims"):
                tables.append((f.name, _dims_table(f.name, value)))
                continue
            lines.append(f"{f.name} = {_toml_value(f.name, value)}")
        for name, table in tables:
            lines += ["", f"[{name}]", *(f"{_toml_key(k)} = {v}" for k, v in table.items())]
        return "\n".join(lines) + "\n"

    def _pass_names(self) -> list[str]:
        names = []
        for p in ([x.strip() for x in self.passes.split(",") if x.strip()] if isinstance(self.passes, str) else self.passes):
            if isinstance(p, str):
                names.append(p)
            elif isinstance(p, QuantizeQDQ):
                names.append("quantize")  # its options are the recipe's fields
            else:
                raise OptionError(f"--save-recipe: pass {getattr(p, 'name', type(p).__name__)!r} is an object with "
                                  "options a recipe cannot hold; name it from onnxopt.passes.REGISTRY instead")
        return names


def _fixed(value):
    """A level as ``number`` checks it: ``auto`` is checked apart; any other string is refused there."""
    return None if value == AUTO else value


def _known(names: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise OptionError(f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(sorted(known))})")


def _is_dynamic(p) -> bool:
    """A listed dynamic int8 pass, by name or object."""
    return p == "quantize-dynamic" or getattr(p, "name", None) == "quantize-dynamic"


def _is_quantize(p) -> bool:
    return p == "quantize" or isinstance(p, QuantizeQDQ)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return type(a) is type(b) and a == b or (a is None and b is None)


def _dims_table(name: str, dims) -> dict[str, str]:
    if isinstance(dims, Mapping):
        items = dims.items()
    else:
        items = []
        for entry in dims:
            key, sep, size = str(entry).partition("=")
            if not sep or not size.strip().lstrip("-").isdigit():
                raise OptionError(f"--{name.replace('_', '-')} {entry!r}: give NAME=N")
            items.append((key.strip(), int(size)))
    return {str(k): str(int(v)) for k, v in items}


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)  # TOML's bare keys: ASCII only
    return key if bare else _toml_string(key)


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string that reads back as ``text``: quotes, backslashes and every control
    character (which TOML forbids raw: CR, NUL, ESC, DEL) escaped; other characters as they are."""
    out = []
    for c in text:
        if 0xD800 <= ord(c) <= 0xDFFF:  # a file name's undecodable byte (surrogateescape): no UTF-8 for it
            raise OptionError(f"--save-recipe: {text!r} is not valid Unicode (a name in another encoding?); "
                              "a recipe file holds UTF-8 text")
        if c in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(name: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise OptionError(f"{name} {value}: a recipe holds finite numbers")
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return _toml_string(os.fspath(value))
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return "[" + ", ".join(_toml_string(os.fspath(v)) for v in value) + "]"
    raise OptionError(f"--save-recipe: {name} is {type(value).__name__} (arrays or an iterator of feeds), "
                      "which a recipe cannot hold; give a file path")
