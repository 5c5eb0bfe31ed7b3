"""onnxopt.io: loading refuses bad files with one-line errors; external data stays inside its folder;
saving is atomic, never overwrites the input by accident, and writes models that stand alone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.external_data_helper import convert_model_to_external_data

from graphs import run, small_cnn
from onnxopt.errors import ExternalDataError, ModelLoadError, OnnxoptError, OutputPathError
from onnxopt.io import default_output_path, load_model, save_model

X = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


def save_external(folder: Path, *, location: str = "weights.bin") -> Path:
    """small_cnn saved as ``folder/m.onnx`` with every initializer in ``folder/location``."""
    folder.mkdir(parents=True, exist_ok=True)
    proto = small_cnn()
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=location, size_threshold=0)
    onnx.save(proto, folder / "m.onnx")
    return folder / "m.onnx"


def rewrite_external(path: Path, **edits) -> None:
    """Change every initializer's external-data entries (``location=...``; ``length=None`` drops it)."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        for key, value in edits.items():
            if value is None:
                entries.pop(key, None)
            else:
                entries[key] = value
        del tensor.external_data[:]
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)
    onnx.save(proto, path)


def assert_one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


# -- bad model files -----------------------------------------------------------------------------


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(small_cnn(), path)
    return path


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are my notes, not a model\n" * 20)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line(exc, "notes.onnx", "not a valid ONNX model")


def test_other_format_that_parses_as_protobuf(tmp_path):
    # A .npz is a zip file: bytes that protobuf may half-accept.
    path = tmp_path / "data.onnx"
    np.savez(path.with_suffix(".npz"), x=np.ones(3))
    path.write_bytes(path.with_suffix(".npz").read_bytes())
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line(exc, "data.onnx", "not a valid ONNX model")


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.99])
def test_truncated_model(model_path, fraction):
    data = model_path.read_bytes()
    model_path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError) as exc:
        load_model(model_path)
    assert_one_line(exc, "m.onnx", "not a valid ONNX model")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert_one_line(exc, "empty.onnx", "empty file")


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path / "nothere.onnx")
    assert_one_line(exc, "nothere.onnx", "no such file")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path)
    assert_one_line(exc, "is a folder")


def test_unsupported_source_type():
    with pytest.raises(ModelLoadError) as exc:
        load_model(42)
    assert_one_line(exc, "int")


# -- external data -------------------------------------------------------------------------------


def test_external_data_loads_lazily_and_round_trips(tmp_path):
    path = save_external(tmp_path / "src")
    expected = run(small_cnn(), {"x": X})[0]
    model = load_model(path)
    weights = [v.const_value for v in model.graph.initializers.values()]
    assert weights and all(isinstance(t, ir.ExternalTensor) for t in weights)

    # Saved elsewhere with its weights external: a new data file, of a unique name, beside the new model.
    out = tmp_path / "out" / "m2.onnx"
    out.parent.mkdir()
    save_model(model, out, external_data=True)
    names = sorted(os.listdir(out.parent))
    assert names[0] == "m2.onnx" and len(names) == 2 and names[1].startswith("m2.onnx.") and names[1].endswith(".data")
    again = load_model(out)
    assert isinstance(again.graph.initializers["W"].const_value, ir.ExternalTensor)  # small ones go inline
    np.testing.assert_array_equal(run(onnx.load(out), {"x": X})[0], expected)

    # Saved elsewhere inline: the output must not point back at the source's data file.
    inline = tmp_path / "inline" / "m3.onnx"
    inline.parent.mkdir()
    save_model(load_model(path), inline)
    assert os.listdir(inline.parent) == ["m3.onnx"]
    proto = onnx.load(inline, load_external_data=False)
    assert not any(t.external_data for t in proto.graph.initializer)
    np.testing.assert_array_equal(run(proto, {"x": X})[0], expected)


def test_external_data_escaping_the_folder(tmp_path):
    path = save_external(tmp_path / "m")
    (tmp_path / "x.bin").write_bytes((tmp_path / "m" / "weights.bin").read_bytes())
    rewrite_external(path, location="../x.bin")
    with pytest.raises(ExternalDataError) as exc:
        load_model(path)
    assert_one_line(exc, "../x.bin", "escapes the model's folder")


def test_external_data_absolute_location(tmp_path):
    path = save_external(tmp_path / "m")
    rewrite_external(path, location=str((tmp_path / "m" / "weights.bin").resolve()))
    with pytest.raises(ExternalDataError) as exc:
        load_model(path)
    assert_one_line(exc, "weights.bin", "absolute")


def test_external_data_file_missing(tmp_path):
    path = save_external(tmp_path / "m")
    (tmp_path / "m" / "weights.bin").unlink()
    with pytest.raises(ExternalDataError) as exc:
        load_model(path)
    assert_one_line(exc, "weights.bin", "not found")


@pytest.mark.parametrize("keep_length", [True, False], ids=["with-length", "no-length"])
def test_external_data_shorter_than_declared(tmp_path, keep_length):
    path = save_external(tmp_path / "m")
    if not keep_length:
        rewrite_external(path, length=None)  # the size then follows from dtype and shape
    data = tmp_path / "m" / "weights.bin"
    data.write_bytes(data.read_bytes()[:-4])  # the last tensor loses one float
    with pytest.raises(ExternalDataError) as exc:
        load_model(path)
    assert_one_line(exc, "weights.bin", "truncated", "'FB'")


# -- saving --------------------------------------------------------------------------------------


def test_save_refuses_to_overwrite_the_input(model_path):
    before = model_path.read_bytes()
    model = load_model(model_path)
    with pytest.raises(OutputPathError) as exc:
        save_model(model, model_path, protect=model_path)
    assert_one_line(exc, "refusing to overwrite the input")
    # Another spelling of the same path is the same file.
    with pytest.raises(OutputPathError):
        save_model(model, model_path.parent / "." / model_path.name, protect=model_path)
    assert model_path.read_bytes() == before
    assert os.listdir(model_path.parent) == ["m.onnx"]


def test_save_in_place_overwrites_the_input(model_path):
    model = load_model(model_path)
    model.graph.doc_string = "rewritten"
    save_model(model, model_path, protect=model_path, in_place=True)
    assert onnx.load(model_path).graph.doc_string == "rewritten"
    assert os.listdir(model_path.parent) == ["m.onnx"]  # no temporary folder left behind


def test_save_into_missing_folder(model_path, tmp_path):
    with pytest.raises(OutputPathError) as exc:
        save_model(load_model(model_path), tmp_path / "no" / "such" / "out.onnx")
    assert_one_line(exc, "does not exist")


def test_errors_are_onnxopt_errors():
    for cls in (ModelLoadError, ExternalDataError, OutputPathError):
        assert issubclass(cls, OnnxoptError)


def test_load_copies_an_ir_model_and_reads_a_proto(model_path):
    proto = onnx.load(model_path)
    from_proto = load_model(proto)
    assert [n.op_type for n in from_proto.graph] == [n.op_type for n in proto.graph.node]
    copy = load_model(from_proto)
    assert copy is not from_proto
    copy.graph.remove(list(copy.graph)[-1], safe=False)
    assert len(from_proto.graph) == len(proto.graph.node)
    assert load_model(from_proto, copy=False) is from_proto


def test_default_output_path(tmp_path):
    assert default_output_path(tmp_path / "resnet.onnx") == tmp_path / "resnet.opt.onnx"
    assert default_output_path("model") == Path("model.opt.onnx")


def test_weights_past_the_protobuf_limit_go_to_external_data(model_path, tmp_path, monkeypatch):
    """A model too big for one protobuf (2 GB; here a lowered limit) is saved with external data
    by default, and validates from a snapshot that cannot be plain bytes."""
    import onnxopt.io as io_module
    import onnxopt.runtime as runtime_module

    monkeypatch.setattr(io_module, "INLINE_WEIGHT_LIMIT", 16)
    monkeypatch.setattr(runtime_module, "INLINE_WEIGHT_LIMIT", 16)
    model = load_model(model_path)
    out = tmp_path / "big" / "m.onnx"
    out.parent.mkdir()
    save_model(model, out)
    names = sorted(os.listdir(out.parent))
    assert names[0] == "m.onnx" and len(names) == 2 and names[1].startswith("m.onnx.") and names[1].endswith(".data")
    snapshot = runtime_module.ModelSnapshot(load_model(out))
    assert snapshot.data is None and snapshot.path is not None
    import onnxopt

    result = onnxopt.optimize(out, ["fold-bn"], latency=False)
    assert result.ok


def test_saved_initializers_carry_no_repeated_value_info(tmp_path):
    """onnx-ir repeats every initializer's dtype and dims as a value_info; the saved file has none of
    those, in subgraphs too, while an initializer that is also a graph input keeps its declaration,
    the model in memory keeps its types, and the saved model runs the same."""
    model = ir.from_proto(small_cnn())
    const = model.graph.initializers[next(iter(model.graph.initializers))]
    model.graph.inputs.append(const)  # an overridable weight: declared as an input
    model.graph.outputs.append(const)  # and an output: its declaration needs the type
    def weight(name, array):
        tensor = ir.tensor(array)
        return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)

    then_w = weight("then_w", np.ones((1,), np.float32))
    then_graph = ir.Graph([], [then_w], nodes=[], initializers=[then_w], name="then")
    else_w = weight("else_w", np.zeros((1,), np.float32))
    else_graph = ir.Graph([], [else_w], nodes=[], initializers=[else_w], name="else")
    flag = weight("flag", np.array(True))
    model.graph.register_initializer(flag)
    branch = ir.node("If", [flag], attributes={"then_branch": then_graph, "else_branch": else_graph})
    model.graph.append(branch)
    branch.outputs[0].name = "branch"
    branch.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    branch.outputs[0].shape = ir.Shape([1])
    model.graph.outputs.append(branch.outputs[0])
    typed = {v.name: (v.type, v.shape) for g in (model.graph, then_graph, else_graph) for v in g.initializers.values()}

    out = save_model(model, tmp_path / "m.onnx")

    proto = onnx.load(out)
    graphs = [proto.graph, *(a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)]
    assert len(graphs) == 3 and sum(len(g.initializer) - len({o.name for o in g.output}) for g in graphs) > 0
    for graph in graphs:
        assert graph.initializer
        outputs = {o.name for o in graph.output}  # an initializer that is an output keeps its type (and value_info)
        assert not ({i.name for i in graph.initializer} - outputs) & {v.name for v in graph.value_info}
        assert all(o.type.tensor_type.elem_type for o in graph.output)
    assert const.name in {i.name for i in proto.graph.input}
    onnx.checker.check_model(proto, full_check=True)
    assert {v.name: (v.type, v.shape) for g in (model.graph, then_graph, else_graph)
            for v in g.initializers.values()} == typed
    assert all(t is not None for t, _ in typed.values())
    feeds = {"x": X}
    np.testing.assert_array_equal(run(small_cnn(), feeds)[0], run(proto, feeds)[0])


def test_model_bytes_are_what_save_model_writes(tmp_path):
    """Reports size the snapshot's bytes: they must be the file's."""
    from onnxopt.io import model_bytes

    model = ir.from_proto(small_cnn())
    out = save_model(model, tmp_path / "m.onnx")
    assert model_bytes(model) == out.read_bytes()


# -- every tensor a file holds is checked before anything reads it (issue 14, part 4) ---------------


def _external_tensor(name: str, location: str, count: int = 16) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.UINT8, dims=[count])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def _model_with(*, nodes, functions=(), initializers=(), sparse=()) -> onnx.ModelProto:
    h = onnx.helper
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [16])],
                         initializer=list(initializers), sparse_initializer=list(sparse))
    opsets = [h.make_opsetid("", 17)] + ([h.make_opsetid("local", 1)] if functions else [])
    return h.make_model(graph, opset_imports=opsets, functions=list(functions))


def _reads(tensor_name: str) -> list:
    """Nodes that cast ``tensor_name`` to float and add it to x."""
    h = onnx.helper
    return [h.make_node("Cast", [tensor_name], ["c"], to=onnx.TensorProto.FLOAT), h.make_node("Add", ["x", "c"], ["y"])]


def _function_constant(location: str) -> onnx.ModelProto:
    """A model-local function whose Constant reads external data from ``location``."""
    h = onnx.helper
    body = [h.make_node("Constant", [], ["k"], value=_external_tensor("k", location)),
            h.make_node("Cast", ["k"], ["kf"], to=onnx.TensorProto.FLOAT), h.make_node("Add", ["x", "kf"], ["y"])]
    function = h.make_function("local", "F", ["x"], ["y"], body, [h.make_opsetid("", 17)])
    return _model_with(nodes=[h.make_node("F", ["x"], ["y"], domain="local")], functions=[function])


def _subgraph_constant(location: str) -> onnx.ModelProto:
    """An If whose then-branch holds a Constant with external data at ``location``."""
    h = onnx.helper
    branch = lambda name, t: h.make_graph(  # noqa: E731
        [h.make_node("Constant", [], [name], value=t)], name, [],
        [h.make_tensor_value_info(name, onnx.TensorProto.UINT8, [16])])
    plain = onnx.numpy_helper.from_array(np.zeros(16, np.uint8), "e")
    cond = onnx.numpy_helper.from_array(np.array(True), "cond")
    nodes = [h.make_node("If", ["cond"], ["k"], then_branch=branch("t", _external_tensor("t", location)),
                         else_branch=branch("e", plain)), *_reads("k")]
    return _model_with(nodes=nodes, initializers=[cond])


def _sparse_initializer(location: str) -> onnx.ModelProto:
    values = _external_tensor("s", location, 4)
    indices = onnx.numpy_helper.from_array(np.arange(4, dtype=np.int64), "s_idx")
    sparse = onnx.helper.make_sparse_tensor(values, indices, [16])
    return _model_with(nodes=[onnx.helper.make_node("Identity", ["x"], ["y"])], sparse=[sparse])


def _tensors_attribute(location: str) -> onnx.ModelProto:
    """A tensor inside a TENSORS attribute (of a custom-domain node: nothing checks what it means)."""
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    attr = onnx.helper.make_attribute("stash", [_external_tensor("st", location)])
    custom = onnx.helper.make_node("Stash", ["x"], ["unused"], domain="custom")
    custom.attribute.append(attr)
    model = _model_with(nodes=[node, custom])
    model.opset_import.append(onnx.helper.make_opsetid("custom", 1))
    return model


@pytest.mark.parametrize("build", [_function_constant, _subgraph_constant, _sparse_initializer, _tensors_attribute])
def test_external_data_anywhere_in_the_model_is_checked(tmp_path, build):
    """A tensor in a model-local function, an If branch, a sparse initializer or a TENSORS
    attribute that points outside the model's folder is refused at load (simplify inlined the
    function's Constant and copied /etc/passwd into the output)."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(build("../../../../../../../../etc/passwd"), folder / "m.onnx")
    with pytest.raises(ExternalDataError) as exc:
        load_model(folder / "m.onnx")
    assert_one_line(exc, "escapes the model's folder")
    with pytest.raises(ExternalDataError):  # a ModelProto in memory too
        load_model(onnx.load(folder / "m.onnx", load_external_data=False))


def test_function_external_data_inside_the_folder_loads(tmp_path):
    """A function's Constant with external data inside the folder is read from the model's folder
    (its base folder is set like the main graph's), wherever the process runs."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "k.bin").write_bytes(bytes(range(16)))
    onnx.save(_function_constant("k.bin"), folder / "m.onnx")
    model = load_model(folder / "m.onnx")
    from onnxopt.passes import Simplify

    Simplify()(model)  # inlines the function and folds its constant
    out = tmp_path / "out.onnx"
    save_model(model, out)
    x = np.zeros(16, np.float32)
    np.testing.assert_array_equal(run(onnx.load(out), {"x": x})[0], np.arange(16, dtype=np.float32))


def test_cli_refuses_function_external_data_and_writes_nothing(tmp_path, capsys):
    from onnxopt.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(_function_constant("../../../../../../../../etc/passwd"), folder / "m.onnx")
    out = tmp_path / "out.onnx"
    code = main([str(folder / "m.onnx"), "--passes", "simplify", "--no-validate", "--no-latency", "-o", str(out), "-q"])
    assert code == 2 and not out.exists()
    assert "escapes the model's folder" in capsys.readouterr().err


def test_external_data_in_a_sibling_folder_with_the_same_prefix(tmp_path):
    """'../model_evil/w.bin' from folder 'model/': a string-prefix test would let it through."""
    path = save_external(tmp_path / "model")
    evil = tmp_path / "model_evil"
    evil.mkdir()
    (evil / "w.bin").write_bytes((tmp_path / "model" / "weights.bin").read_bytes())
    rewrite_external(path, location="../model_evil/w.bin")
    with pytest.raises(ExternalDataError) as exc:
        load_model(path)
    assert_one_line(exc, "escapes the model's folder")


def test_external_data_through_a_symlink_out_of_the_folder(tmp_path):
    path = save_external(tmp_path / "model")
    (tmp_path / "outside.bin").write_bytes((tmp_path / "model" / "weights.bin").read_bytes())
    (tmp_path / "model" / "link.bin").symlink_to(tmp_path / "outside.bin")
    rewrite_external(path, location="link.bin")
    with pytest.raises(ExternalDataError) as exc:
        load_model(path)
    assert_one_line(exc, "escapes the model's folder")


def test_external_data_location_with_a_nul_byte(tmp_path):
    path = save_external(tmp_path / "model")
    rewrite_external(path, location="weights.bin\x00.txt")
    with pytest.raises(ExternalDataError) as exc:
        load_model(path)
    assert_one_line(exc, "NUL byte")


def test_initializer_with_data_type_zero(tmp_path):
    proto = _model_with(nodes=[onnx.helper.make_node("Identity", ["x"], ["y"])])
    proto.graph.initializer.append(onnx.TensorProto(name="w", data_type=0, dims=[2], raw_data=b"\0" * 8))
    onnx.save(proto, tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path / "m.onnx")
    assert_one_line(exc, "'w'", "data type 0")


# -- writing never touches what the input reads, and switches the pair at once --------------------


def _data_files(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".data"))


def test_output_whose_data_name_is_the_inputs_data_file(tmp_path):
    """The input reads 'out.onnx.data'; writing '-o out.onnx' with external data used that very
    name and overwrote the input's weights. Now the data goes to a new name and the input's stays."""
    path = save_external(tmp_path, location="out.onnx.data")
    before = (tmp_path / "out.onnx.data").read_bytes()
    expected = run(onnx.load(path), {"x": X})[0]
    model = load_model(path)
    save_model(model, tmp_path / "out.onnx", protect=path, external_data=True)
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    np.testing.assert_array_equal(run(onnx.load(path), {"x": X})[0], expected)
    np.testing.assert_array_equal(run(onnx.load(tmp_path / "out.onnx"), {"x": X})[0], expected)


def test_overwriting_an_output_removes_only_its_own_old_data(tmp_path):
    path = save_external(tmp_path / "src")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    (out.parent / "other.bin").write_bytes(b"not ours")
    save_model(load_model(path), out, external_data=True)
    first = _data_files(out.parent)
    save_model(load_model(path), out, external_data=True)
    second = _data_files(out.parent)
    assert len(first) == len(second) == 1 and first != second  # the old pair's data went, the new stays
    assert (out.parent / "other.bin").exists()
    np.testing.assert_array_equal(run(onnx.load(out), {"x": X})[0], run(small_cnn(), {"x": X})[0])


def test_interrupted_save_leaves_the_old_output_pair_intact(tmp_path, monkeypatch):
    """Ctrl-C at the last step (replacing the model file) of a save with external data: the old
    model and its data still load and give the old outputs, and no new file is left behind."""
    import onnxopt.io as io_module

    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    old = small_cnn(seed=1)
    save_model(ir.from_proto(old), out, external_data=True)
    files = sorted(os.listdir(out.parent))
    expected = run(old, {"x": X})[0]
    real_replace = os.replace

    def interrupted(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(io_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(ir.from_proto(small_cnn(seed=2)), out, external_data=True)
    monkeypatch.undo()
    assert sorted(os.listdir(out.parent)) == files
    np.testing.assert_array_equal(run(onnx.load(out), {"x": X})[0], expected)


@pytest.mark.parametrize("kind", ["devnull", "folder", "fifo"])
def test_save_refuses_a_destination_that_is_not_a_regular_file(tmp_path, model_path, kind):
    if kind == "devnull":  # a link to it: old code replaced the link, never the real device
        target = tmp_path / "null.onnx"
        target.symlink_to(os.devnull)
    elif kind == "folder":
        target = tmp_path / "dir.onnx"
        target.mkdir()
    else:
        target = tmp_path / "pipe.onnx"
        os.mkfifo(target)
    with pytest.raises(OutputPathError) as exc:
        save_model(load_model(model_path), target)
    assert_one_line(exc, "regular file" if kind != "folder" else "a folder")
    assert os.path.exists(target) and not os.path.isfile(target)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (a folder nobody can create files in)")
def test_check_destination_refuses_an_unwritable_folder():
    from onnxopt.io import check_destination

    with pytest.raises(OutputPathError) as exc:
        check_destination("/proc/self/run.json", "--report")
    assert_one_line(exc, "--report", "cannot write")


# -- value_info: the output declares what the input declared, no more (issue 14) -------------------

VALUE_INFO_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    r = Relu(c)
    y = Add(r, b)
}"""


def _value_info_model(declare: bool) -> Path:
    from graphs import build_proto

    rng = np.random.default_rng(0)
    proto = build_proto(VALUE_INFO_MODEL, {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                                           "b": rng.standard_normal((4, 1, 1)).astype(np.float32)})
    if declare:
        proto.graph.value_info.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["N", 4, 8, 8]))
    return proto


@pytest.mark.parametrize("declare", [False, True])
def test_the_output_declares_only_the_value_info_the_input_declared(tmp_path, declare):
    """Passes type every value they touch; writing them all grew lossless results (magika +7.5 kB)."""
    from onnxopt import optimize

    src = tmp_path / "m.onnx"
    onnx.save(_value_info_model(declare), src)
    result = optimize(src, validate=False, latency=False)
    assert any(v.type is not None for n in result.model.graph for v in n.outputs if v.name == "r")  # typed in memory
    out = result.save(tmp_path / "out.onnx")
    saved = onnx.load(out)
    assert [vi.name for vi in saved.graph.value_info] == (["c"] if declare else [])
    assert out.stat().st_size <= src.stat().st_size
