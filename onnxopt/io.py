"""Load and save models through onnx-ir: safe external data, atomic writes, the input never overwritten."""

from __future__ import annotations

__all__ = [
    "load_model",
    "save_model",
    "check_external_data",
    "check_destination",
    "check_model_path",
    "referenced_files",
    "iter_tensors",
    "default_output_path",
    "weight_bytes",
    "has_external_data",
    "model_bytes",
    "TWO_GB",
    "INLINE_WEIGHT_LIMIT",
    "spill_tensors",
]

import contextlib
import os
import shutil
import stat
import tempfile
import weakref
from collections.abc import Collection
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxopt.errors import ExternalDataError, ModelLoadError, OutputPathError

# protobuf cannot serialize a message of 2 GiB or more; past this, weights go to an external file.
TWO_GB = 2**31 - 1
# The margin left for the graph itself when deciding whether weights fit inline.
INLINE_WEIGHT_LIMIT = TWO_GB - 64 * 2**20


def load_model(source, *, copy: bool = True) -> ir.Model:
    """Return an ``ir.Model`` from a path, an ``onnx.ModelProto`` or an ``ir.Model``.

    External data is read lazily, after every reference is checked to stay inside the model's
    folder and inside its file. An ``ir.Model`` is cloned (unless ``copy=False``) so that the
    caller's object is never modified by the passes.
    """
    if isinstance(source, ir.Model):
        return source.clone() if copy else source
    if isinstance(source, onnx.ModelProto):
        _check_proto_tensors(source, Path("."))
        model = ir.serde.deserialize_model(source)
        _check_structure(model, "the ModelProto")
        check_external_data(model)
        return model
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    raise ModelLoadError(
        f"cannot load a model from {type(source).__name__}: give a path, an onnx.ModelProto or an ir.Model"
    )


def check_model_path(path: str | os.PathLike) -> Path:
    """``path`` when it names a non-empty regular file (symbolic links followed), else one
    ``ModelLoadError`` line: missing, a folder, a device or a FIFO (``/dev/zero`` would be read until
    memory runs out, a FIFO would block), or empty."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file (a device, pipe or socket), not an ONNX model")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    return path


def _load_path(path: Path) -> ir.Model:
    check_model_path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: not a valid ONNX model (truncated or not ONNX: {_first_line(exc)})"
        ) from None
    # Every tensor the file holds, wherever it sits (functions, subgraphs, sparse initializers,
    # attributes), before anything reads one: a pass that inlines a function reads its constants.
    _check_proto_tensors(proto, path.parent)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # a proto that parses but does not describe a graph
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    del proto
    _set_base_dir(model, path.parent)
    _check_structure(model, str(path))
    check_external_data(model)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_structure(model: ir.Model, where: str) -> None:
    """Refuse a proto that parsed but is no model (random bytes often parse as an empty message)."""
    if model.ir_version is None or model.ir_version <= 0:
        raise ModelLoadError(f"{where}: not a valid ONNX model (no ir_version; truncated or not ONNX)")
    if len(model.graph.outputs) == 0:
        raise ModelLoadError(f"{where}: not a valid ONNX model (the graph has no outputs)")
    if "" not in model.opset_imports and "ai.onnx" not in model.opset_imports:
        raise ModelLoadError(f"{where}: not a valid ONNX model (no default-domain opset import)")


def iter_tensors(model: ir.Model, *, functions: bool = False):
    """(name, tensor) of every initializer and tensor attribute of the main graph and its subgraphs;
    with ``functions``, of the model-local functions' nodes too (a pass that inlines them reads them)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.name, value.const_value
        yield from _attribute_tensors(graph)
    if functions:
        for function in model.functions.values():
            yield from _attribute_tensors(function)
            for node in function:
                for attr in node.attributes.values():
                    for sub in _attribute_graphs(attr):
                        yield from _attribute_tensors(sub)
                        for deeper in sub.subgraphs():
                            yield from _attribute_tensors(deeper)


def _attribute_graphs(attr) -> list:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def _attribute_tensors(graph):
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                yield f"{node.name or node.op_type}.{attr.name}", attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                for i, tensor in enumerate(attr.value):
                    yield f"{node.name or node.op_type}.{attr.name}[{i}]", tensor


def _proto_tensors(proto: onnx.ModelProto):
    """(where, TensorProto) of every tensor a ModelProto holds: graph and function nodes' attributes
    (``t``, ``tensors``, sparse ones, recursively through subgraphs), initializers, sparse
    initializers, training graphs."""
    def graph_tensors(graph: onnx.GraphProto):
        yield from ((t.name, t) for t in graph.initializer)
        for sparse in graph.sparse_initializer:
            yield sparse.values.name, sparse.values
            yield sparse.indices.name or sparse.values.name, sparse.indices
        yield from nodes_tensors(graph.node)

    def nodes_tensors(nodes):
        for node in nodes:
            where = node.name or node.op_type
            for attr in node.attribute:
                name = f"{where}.{attr.name}"
                if attr.HasField("t"):
                    yield name, attr.t
                yield from ((name, t) for t in attr.tensors)
                sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                for s in (*sparse, *attr.sparse_tensors):
                    yield name, s.values
                    yield name, s.indices
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(proto.graph)
    for function in proto.functions:
        yield from nodes_tensors(function.node)
    for info in proto.training_info:
        yield from graph_tensors(info.initialization)
        yield from graph_tensors(info.algorithm)


def _check_proto_tensors(proto: onnx.ModelProto, base: Path) -> None:
    """Refuse any tensor of ``proto`` with no data type, or whose external data is not a file
    inside ``base`` (the model's folder)."""
    for name, tensor in _proto_tensors(proto):
        if tensor.data_type == onnx.TensorProto.UNDEFINED and (tensor.dims or tensor.raw_data or tensor.external_data):
            raise ModelLoadError(f"tensor '{name}': data type 0 (UNDEFINED); not a valid ONNX model")
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            entries = {e.key: e.value for e in tensor.external_data}
            _check_location(name, entries.get("location", ""), base)


def _check_location(name: str, location: str, base: Path) -> Path:
    """The file that external data ``location`` names, refused when it is empty, holds a NUL byte,
    is absolute, or resolves (symbolic links followed) outside ``base`` or to a non-file."""
    shown = location if "\x00" not in location else location.replace("\x00", "\\0")
    if not location:
        raise ExternalDataError(f"tensor '{name}': external data without a location")
    if "\x00" in location:
        raise ExternalDataError(f"tensor '{name}': external data location '{shown}' holds a NUL byte")
    if os.path.isabs(location) or Path(location).drive:
        raise ExternalDataError(
            f"tensor '{name}': external data location '{location}' is absolute; only paths inside the model's folder are allowed"
        )
    base = base.resolve()
    try:
        target = (base / location).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a symlink loop, a name the system refuses
        raise ExternalDataError(f"tensor '{name}': external data location '{location}' cannot be resolved ({exc})") from None
    # Path.parents compares whole components: '../model_evil/w.bin' from 'model/' is outside.
    if base != target and base not in target.parents:
        raise ExternalDataError(
            f"tensor '{name}': external data location '{location}' escapes the model's folder"
        )
    if target.exists() and not target.is_file():
        raise ExternalDataError(f"tensor '{name}': external data '{location}' is not a regular file (a folder, device or pipe)")
    if not target.is_file():
        raise ExternalDataError(f"tensor '{name}': external data file '{location}' not found next to the model")
    return target


def _set_base_dir(model: ir.Model, base_dir: Path) -> None:
    for _, tensor in iter_tensors(model, functions=True):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base_dir)


def declared_value_names(model: ir.Model) -> frozenset[str]:
    """The names of the intermediate values (neither graph input, output nor initializer) whose type
    or shape ``model`` declares, in every graph: a file's ``value_info``, as read.

    ``save_model(value_info=...)`` writes those again and no other: passes and shape inference type
    every value they touch, and writing them all made lossless results larger than their input
    (7.5 kB of value_info on a 300 kB file classifier, none of it needed by onnxruntime).
    """
    names = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        boundary = {*graph.inputs, *graph.outputs, *graph.initializers.values()}
        for node in graph:
            for value in node.outputs:
                if value not in boundary and value.name and (value.type is not None or value.shape is not None):
                    names.add(value.name)
    return frozenset(names)


@contextlib.contextmanager
def _types_hidden(model: ir.Model, value_info: Collection[str] | None = None):
    """Hide, while saving, each initializer's type and shape and, where ``value_info`` names the
    intermediate values to declare, those of every other intermediate value; restored after.

    onnx-ir writes a value_info for every initializer, repeating the dtype and dims that its tensor
    already holds: 8 % of the bundled digits model's int8 file, 5 % of the zoo transformer's.
    """
    hidden = []

    def hide(value: ir.Value) -> None:
        if value.type is not None or value.shape is not None:
            hidden.append((value, value.type, value.shape))
            value.type = None
            value.shape = None

    for graph in (model.graph, *model.graph.subgraphs()):
        boundary = {*graph.inputs, *graph.outputs}
        for value in graph.initializers.values():
            if value.const_value is not None and value not in boundary:
                hide(value)  # else no tensor to carry the type, or a graph input or output: it keeps its declaration
        if value_info is None:
            continue
        for node in graph:
            for value in node.outputs:
                if value not in boundary and value.name not in value_info and not value.is_initializer():
                    hide(value)
    try:
        yield
    finally:
        for value, type_, shape in hidden:
            value.type = type_
            value.shape = shape


def model_bytes(model: ir.Model, value_info: Collection[str] | None = None) -> bytes:
    """``model`` serialized as ``save_model`` writes it (no repeated initializer value_info; with
    ``value_info``, only those intermediate values declared)."""
    with _types_hidden(model, value_info):
        return ir.serde.serialize_model(model).SerializeToString()


def check_external_data(model: ir.Model) -> None:
    """Refuse external data that is absolute, escapes its folder (``..``, a sibling folder, a
    symbolic link), is missing or too short: in the main graph, subgraphs and model-local functions."""
    for name, tensor in iter_tensors(model, functions=True):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        target = _check_location(name, location, Path(tensor.base_dir or "."))
        offset = tensor.offset or 0
        # ``length`` is optional in the file; the tensor's dtype and shape say how many bytes it needs.
        length = max(tensor.length or 0, tensor.nbytes)
        size = target.stat().st_size
        if offset + length > size:
            raise ExternalDataError(
                f"tensor '{name}': external data '{location}' is truncated (needs bytes {offset}..{offset + length}, file has {size})"
            )


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode a file created with ``open(path, "w")`` gets: 0666 less the umask."""
    return 0o666 & ~_umask()


def temp_file(folder: str | os.PathLike, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder`` (a unique name, created exclusively), with the mode that a
    plain ``open`` would give (mkstemp makes 0600, which an ``os.replace`` would hand on to the
    user's output: unreadable to the group a umask of 022 or 002 means to share it with)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, new_file_mode())
    except OSError:
        pass  # a file system without modes (FAT): nothing to hand on
    return fd, tmp


def stage_text(text: str, path: str | os.PathLike, flag: str) -> str:
    """``text`` in a new temporary file of a unique name beside ``path``; the caller commits it with
    ``os.replace`` or removes it (concurrent runs and an existing ``<path>.tmp`` are safe)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = temp_file(folder, f".{os.path.basename(path)}.", ".tmp")
    except OSError as exc:
        raise OutputPathError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputPathError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
        raise
    return tmp


def default_output_path(input_path: str | os.PathLike) -> Path:
    """``model.onnx`` → ``model.opt.onnx`` beside it."""
    path = Path(input_path)
    return path.with_name(f"{path.stem}.opt{path.suffix or '.onnx'}")


def has_external_data(model: ir.Model) -> bool:
    """Whether any tensor is still read lazily from an external-data file."""
    return any(isinstance(t, ir.ExternalTensor) for _, t in iter_tensors(model, functions=True))


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer and Constant tensor, subgraphs included."""
    return sum(t.nbytes for _, t in iter_tensors(model) if t is not None)


# In-memory tensors of at least this many bytes are what ``spill_tensors`` writes out.
SPILL_MIN_BYTES = 1 * 2**20


def spill_tensors(model: ir.Model, min_bytes: int | None = None) -> int:
    """Write every in-memory initializer of ``model`` of ``min_bytes`` or more to a file of a temporary
    folder, one tensor at a time, and read it lazily from there (an ``ir.ExternalTensor``); returns
    the bytes written.

    A pass over a model larger than memory makes its new weights in memory (a folded BatchNorm
    rescales a whole weight); spilled after each pass, they stop adding up, and the sessions and the
    save that follow read them from the page cache rather than from the process's own memory. The
    folder lives as long as ``model`` (removed when it is garbage collected); ``save_model`` copies
    the tensors out of it, and never removes it. ``min_bytes`` defaults to ``SPILL_MIN_BYTES``.
    External tensors that were memory-mapped meanwhile are replaced by unmapped ones (``_unmap``).
    """
    min_bytes = SPILL_MIN_BYTES if min_bytes is None else min_bytes
    _unmap(model)
    pending = [
        value for graph in (model.graph, *model.graph.subgraphs()) for value in graph.initializers.values()
        if value.const_value is not None and not isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.nbytes >= min_bytes and value.const_value.dtype.bitwidth % 8 == 0
    ]
    if not pending:
        return 0
    folder = _spill_folder(model)
    fd, data_path = tempfile.mkstemp(prefix="spill-", suffix=".data", dir=folder)
    written = 0
    with os.fdopen(fd, "wb") as f:
        for value in pending:
            tensor = value.const_value
            offset = f.tell()
            tensor.tofile(f) if hasattr(tensor, "tofile") else f.write(tensor.tobytes())
            length = f.tell() - offset
            value.const_value = ir.ExternalTensor(
                os.path.basename(data_path), offset, length, tensor.dtype, shape=ir.Shape(tensor.shape.numpy()),
                name=tensor.name or value.name, base_dir=folder,
            )
            written += length
            f.seek((f.tell() + 4095) // 4096 * 4096)  # page-aligned: onnxruntime maps the file
    return written


def _unmap(model: ir.Model) -> None:
    """Replace each external tensor that a pass memory-mapped (``numpy()`` maps its file) by a fresh,
    unmapped one of the same file: the pages a pass read leave the process once nothing holds them."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.raw is not None:
                value.const_value = ir.ExternalTensor(
                    tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=ir.Shape(tensor.shape.numpy()),
                    name=tensor.name, base_dir=tensor.base_dir, doc_string=tensor.doc_string,
                    metadata_props=dict(tensor.metadata_props) or None,
                )


_SPILL_FOLDERS: dict[int, str] = {}


def _spill_folder(model: ir.Model) -> str:
    folder = _SPILL_FOLDERS.get(id(model))
    if folder is None:
        folder = tempfile.mkdtemp(prefix="onnxopt-spill-")
        _SPILL_FOLDERS[id(model)] = folder

        def remove(key=id(model), folder=folder):
            _SPILL_FOLDERS.pop(key, None)
            shutil.rmtree(folder, ignore_errors=True)

        weakref.finalize(model, remove)
    return folder


def check_destination(path: str | os.PathLike, what: str | None = None) -> Path:
    """Refuse, before any work, a destination that cannot take a new regular file: a missing or
    unwritable folder, or an existing path that is not a regular file (``/dev/null``, a folder, a
    FIFO: replacing it would destroy it). ``what`` names the option in the message (``--report``)."""
    path = Path(path)
    shown = f"{what} {path}" if what else str(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{shown}: folder '{folder}' does not exist")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise OutputPathError(f"{shown}: exists and is {kind}; give the path of a file")
    try:  # the one sure test of writability (os.access says yes to root on a read-only mount)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OutputPathError(f"{shown}: cannot write in folder '{folder}' ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def referenced_files(model_path: str | os.PathLike) -> set[Path]:
    """The resolved external-data files that the ONNX file at ``model_path`` references (none when
    it is absent or unreadable): the files a write must never touch."""
    model_path = Path(model_path)
    if not model_path.is_file():
        return set()
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return set()
    found = set()
    for _, tensor in _proto_tensors(proto):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and "\x00" not in location:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                found.add((model_path.parent / location).resolve())
    return found


def _lazy_files(model: ir.Model) -> set[Path]:
    """The files that ``model``'s lazily read tensors still come from."""
    found = set()
    for _, tensor in iter_tensors(model, functions=True):
        if isinstance(tensor, ir.ExternalTensor):
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                found.add(Path(tensor.path).resolve())
    return found


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    protect: str | os.PathLike | None = None,
    in_place: bool = False,
    external_data: bool | None = None,
    value_info: Collection[str] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; never overwrite ``protect`` (the input) unless ``in_place``.

    Weights go to an external-data file beside the model when ``external_data`` is true, or, by
    default, when they would not fit in one protobuf (2 GB). The pair switches at once for a reader:
    the data goes to a new, unique ``<name>.<random>.data`` that no file references yet, the model
    to a unique temporary file, which then replaces ``path`` (the one commit); only after that are
    the data files of the replaced output removed (those named ``<name>[.*].data`` that nothing
    else read here references). An interruption before the commit leaves the old pair as it was;
    no file that ``protect`` or the model's own lazily read tensors reference is ever written or removed.
    ``value_info`` (``declared_value_names`` of the input), when given, names the intermediate values
    whose types the file declares; by default every typed value is declared.
    """
    path = Path(path)
    if protect is not None and not in_place:
        if path.resolve() == Path(protect).resolve():
            raise OutputPathError(
                f"{path}: refusing to overwrite the input model; choose another -o path or pass --in-place"
            )
    check_destination(path)
    folder = path.parent if str(path.parent) else Path(".")
    # In place, the input's data files are the replaced output's: removable once nothing reads them.
    kept = _lazy_files(model) | (referenced_files(protect) if protect is not None and not in_place else set())
    if path.resolve() in kept:
        raise OutputPathError(f"{path}: refusing to overwrite the input model's external data; choose another -o path")
    if external_data is None:
        external_data = weight_bytes(model) > INLINE_WEIGHT_LIMIT
    if not external_data:
        # ir.save would keep lazily loaded tensors as references to their source file, relative
        # to a folder the output may not share: read them in, so that the output stands alone.
        ir.external_data.load_to_model(model)
    old_data = {f for f in referenced_files(path) if f.parent == folder.resolve() and _our_data_name(path, f.name)}
    written: list[str] = []
    try:
        data_name = None
        if external_data:
            fd, data_path = temp_file(folder, f"{path.name}.", ".data")
            os.close(fd)
            written.append(data_path)
            data_name = os.path.basename(data_path)
        fd, tmp_model = temp_file(folder, f".{path.name}.", ".tmp")
        os.close(fd)
        written.append(tmp_model)
        # Lazy external tensors are read while writing, so they must still point at their source.
        with _types_hidden(model, value_info):
            ir.save(model, tmp_model, format="protobuf", external_data=data_name)
        for done in written:  # in case the writer made its files anew
            with contextlib.suppress(OSError):
                os.chmod(done, new_file_mode())
        os.replace(tmp_model, path)  # the commit: readers see the old pair until here, the new one after
        written.clear()
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        for leftover in written:  # an error or an interruption before the commit
            with contextlib.suppress(OSError):
                os.unlink(leftover)
    for stale in old_data - kept - referenced_files(path):
        with contextlib.suppress(OSError):
            stale.unlink()
    return path


def _our_data_name(path: Path, name: str) -> bool:
    """Whether ``name`` is an external-data file that ``save_model`` writes for ``path``."""
    return name == f"{path.name}.data" or (name.startswith(f"{path.name}.") and name.endswith(".data"))
