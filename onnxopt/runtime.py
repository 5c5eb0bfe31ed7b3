"""onnxruntime sessions: providers by short name, session options, in-memory ``ir.Model`` input, >2 GB models."""

from __future__ import annotations

__all__ = [
    "QUIET_RUN",
    "PROVIDER_NAMES",
    "OPTIMIZATION_LEVELS",
    "available_providers",
    "resolve_providers",
    "ModelSnapshot",
    "create_session",
    "run_session",
]

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import OptionError, ProviderError
from onnxopt.io import INLINE_WEIGHT_LIMIT, has_external_data, iter_tensors, model_bytes, save_model, weight_bytes

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}

OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_providers(names: str | Sequence[str] = "cpu") -> list[str]:
    """Map short names (``cpu``, ``cuda``, comma-separated) to onnxruntime provider names, or raise.

    CPU is appended as the fallback for nodes another provider does not take.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    available = available_providers()
    resolved = []
    for name in names:
        key = name.strip()
        full = PROVIDER_NAMES.get(key.lower(), key)
        if full not in PROVIDER_NAMES.values() and full not in available:
            raise OptionError(f"unknown provider '{key}' (known: {', '.join(PROVIDER_NAMES)})")
        if full not in available:
            raise ProviderError(
                f"provider '{key}' ({full}) is not available in this onnxruntime (available: {', '.join(available)})"
            )
        if full not in resolved:
            resolved.append(full)
    if not resolved:
        raise OptionError("no execution provider given")
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


# onnxruntime 1.32 on CPU crashes the process (SIGSEGV) creating a fully optimized session of a
# float16 MatMul that reads Transpose(perm=[1, 0, 2]) (every nn.TransformerEncoder export): its
# MatmulTransposeFusion then the NCHWc transformer. Float16 models leave that fusion out on CPU.
CPU_FLOAT16_DISABLED = ("MatmulTransposeFusion",)


def _has_float16(model: ir.Model) -> bool:
    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    if any(v.dtype in half for v in model.graph.initializers.values()):
        return True
    return any(o.dtype in half for node in model.graph for o in node.outputs)


# onnxruntime reads external data of a model given as bytes from a folder named in the session's
# config (``session.model_external_initializers_file_folder_path``) since 1.18.
_READS_EXTERNAL_FOLDER = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit()) >= (1, 18)


def _one_external_folder(model: ir.Model) -> tuple[str | None, int]:
    """The one folder that every external-data tensor of ``model`` is read from, when there is one
    and the tensors held in memory fit a serialized model (``INLINE_WEIGHT_LIMIT``), else None; and
    the bytes those external tensors hold."""
    folders, inline, external = set(), 0, 0
    for _, tensor in iter_tensors(model, functions=True):
        if isinstance(tensor, ir.ExternalTensor):
            folders.add(os.path.realpath(tensor.base_dir or "."))
            external += tensor.nbytes
        elif tensor is not None:
            inline += tensor.nbytes
    return (next(iter(folders)) if len(folders) == 1 and inline < INLINE_WEIGHT_LIMIT else None), external


class ModelSnapshot:
    """A frozen, onnxruntime-ready copy of a model: serialized bytes, or a temporary folder.

    Taking the snapshot before the passes run keeps the original available for validation without
    reloading it, and later changes to the ``ir.Model`` do not affect it.
    """

    def __init__(self, model: ir.Model | None, *, by_reference: bool = False):
        self._tmp_dir: str | None = None
        self._sessions: dict[tuple, ort.InferenceSession] = {}
        self.path: str | None = None
        self.data: bytes | None = None
        self.external_folder: str | None = None  # where ``data``'s external references point
        self._external_bytes = 0
        self.float16 = False
        if model is None:  # ``from_file``
            return
        self.float16 = _has_float16(model)
        folder, external_bytes = _one_external_folder(model) if by_reference and _READS_EXTERNAL_FOLDER else (None, 0)
        if folder is not None:
            # Weights still in the files they were read from, all in one folder: only the graph is
            # serialized, with its external references, and onnxruntime reads the weights from that
            # folder itself (a model with extra outputs for calibration copies no weight). For
            # sessions only: ``data`` alone is not a whole model.
            self.data, self.external_folder, self._external_bytes = model_bytes(model), folder, external_bytes
            return
        # Bytes cannot carry external data (its paths are relative to a folder): past 2 GB, or when
        # weights are still read lazily from files, the snapshot is a temporary folder instead.
        if not has_external_data(model) and weight_bytes(model) < INLINE_WEIGHT_LIMIT:
            try:
                self.data = model_bytes(model)
            except ValueError:  # protobuf refuses messages of 2 GB and more
                self.data = None
        if self.data is None:
            self._tmp_dir = tempfile.mkdtemp(prefix="onnxopt-")
            self.path = os.path.join(self._tmp_dir, "model.onnx")
            save_model(model, self.path, external_data=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelSnapshot":
        """The model as the file at ``path`` holds it (its external data beside it), read by
        onnxruntime from there: nothing is copied. The caller keeps the file unchanged while the
        snapshot lives (the input model of a run: ``io.save_model`` never writes it)."""
        snapshot = cls(None)
        snapshot.path = os.fspath(path)
        return snapshot

    @property
    def nbytes(self) -> int:
        if self.data is not None:
            return len(self.data) + self._external_bytes
        assert self.path is not None
        if self._tmp_dir is None:
            return os.path.getsize(self.path)
        return sum(os.path.getsize(os.path.join(self._tmp_dir, f)) for f in os.listdir(self._tmp_dir))

    def session(self, **options) -> ort.InferenceSession:
        """A session with these options; created once, then reused (creation costs seconds on big models)."""
        if self.float16 and options.get("optimization", "all") != "disabled" and "disabled_optimizers" not in options:
            options["disabled_optimizers"] = CPU_FLOAT16_DISABLED  # see CPU_FLOAT16_DISABLED
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
        if key not in self._sessions:
            self._sessions[key] = create_session(self.data if self.data is not None else self.path,
                                                 external_folder=self.external_folder, **options)
        return self._sessions[key]

    def release(self) -> None:
        """Drop the sessions made so far (each holds the model's weights); later calls make new ones."""
        self._sessions.clear()

    def close(self) -> None:
        self._sessions.clear()
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __del__(self):
        self.close()


# Intra-op threads of a session that names no count (None: onnxruntime's default, one per core).
# A sweep's worker processes set it to cores / workers, so that concurrent builds share the cores
# instead of each starting a thread per core (``onnxopt.sweep``).
DEFAULT_INTRA_OP_THREADS: int | None = None


def session_options(
    *,
    optimization: str = "all",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    optimized_model_path: str | None = None,
) -> ort.SessionOptions:
    if optimization not in OPTIMIZATION_LEVELS:
        raise OptionError(f"unknown graph optimization level '{optimization}' (known: {', '.join(OPTIMIZATION_LEVELS)})")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    if optimization == "disabled":
        # Reference, validation and observation sessions: several live at once in a lossy search,
        # and each arena keeps its largest run's activations (the PaddleOCR detector at batch 16:
        # 1.55 GB peak with arenas). Timed sessions (optimized) keep theirs: allocation is part of speed.
        options.enable_cpu_mem_arena = False
    if intra_op_threads or DEFAULT_INTRA_OP_THREADS:
        options.intra_op_num_threads = int(intra_op_threads or DEFAULT_INTRA_OP_THREADS)
    if inter_op_threads:
        options.inter_op_num_threads = int(inter_op_threads)
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    return options


def create_session(
    model: ir.Model | bytes | str | os.PathLike,
    *,
    providers: str | Sequence[str] = "cpu",
    optimization: str = "all",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    optimized_model_path: str | None = None,
    disabled_optimizers: Sequence[str] | None = None,
    external_folder: str | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for an ``ir.Model``, serialized bytes or a path.

    ``external_folder``: the folder that the external-data locations of ``model`` (bytes) are
    relative to (onnxruntime reads them from there).

    ``disabled_optimizers`` names onnxruntime graph transformers to leave out (float16 models on CPU:
    ``onnxopt.precision.CPU_FLOAT16_DISABLED``).
    """
    options = session_options(
        optimization=optimization,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        optimized_model_path=optimized_model_path,
    )
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    resolved = resolve_providers(providers)
    if isinstance(model, ir.Model):
        snapshot = ModelSnapshot(model)
        try:
            return snapshot.session(
                providers=resolved,
                optimization=optimization,
                intra_op_threads=intra_op_threads,
                inter_op_threads=inter_op_threads,
                optimized_model_path=optimized_model_path,
                disabled_optimizers=tuple(disabled_optimizers) if disabled_optimizers else None,
            )
        finally:
            snapshot.close()
    source = model if isinstance(model, bytes) else os.fspath(model)
    if disabled_optimizers:
        return ort.InferenceSession(source, sess_options=options, providers=resolved,
                                    disabled_optimizers=list(disabled_optimizers))
    return ort.InferenceSession(source, sess_options=options, providers=resolved)


def _quiet_run_options() -> ort.RunOptions:
    options = ort.RunOptions()
    options.log_severity_level = 4  # a failing run raises; its error is reported once, by the caller
    return options


QUIET_RUN = _quiet_run_options()


def run_session(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one feed; returns outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed), QUIET_RUN)))
