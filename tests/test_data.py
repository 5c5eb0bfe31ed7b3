"""onnxopt.data: reading .npz, .npy folders and onnx test-data; labels; batching; clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs import build, small_cnn
from onnxopt.data import DataStream, head, input_specs, load_data, parse_dims, stream_data, synthetic_data
from onnxopt.errors import DataError, OnnxoptError, OptionError

rng = np.random.default_rng(0)

TWO_INPUTS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[batch,4] a, int64[batch,seq] ids) => (float[batch,4] y) {
    y = Identity(a)
}"""


def cnn(batch="N") -> ir.Model:
    return ir.serde.deserialize_model(small_cnn(batch=batch))


def images(n: int) -> np.ndarray:
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32)


def batch_sizes(dataset) -> list[int]:
    return [feed["x"].shape[0] for feed in dataset]


# -- sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["labels", "label", "y", "targets"])
def test_npz_with_labels_key(tmp_path, key):
    x = images(5)
    labels = np.arange(5)
    np.savez(tmp_path / "d.npz", x=x, **{key: labels})
    data = load_data(tmp_path / "d.npz", cnn())
    assert len(data) == 1
    np.testing.assert_array_equal(data.batches[0]["x"], x)
    assert list(data.batches[0]) == ["x"]
    np.testing.assert_array_equal(data.labels, labels)
    assert data.num_samples == 5
    assert not data.synthetic


def test_explicit_labels_key(tmp_path):
    np.savez(tmp_path / "d.npz", x=images(3), cls=np.array([1, 2, 3]))
    data = load_data(tmp_path / "d.npz", cnn(), labels_key="cls")
    np.testing.assert_array_equal(data.labels, [1, 2, 3])
    with pytest.raises(DataError, match="labels key 'nope' not found"):
        load_data(tmp_path / "d.npz", cnn(), labels_key="nope")


def test_input_named_like_a_label_key_is_an_input(tmp_path):
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] y) => (float[N,2] z) { z = Relu(y) }"""
    )
    np.savez(tmp_path / "d.npz", y=np.ones((4, 2), np.float32))
    data = load_data(tmp_path / "d.npz", model)
    assert data.labels is None
    assert data.batches[0]["y"].shape == (4, 2)


def test_labels_count_must_match_samples(tmp_path):
    np.savez(tmp_path / "d.npz", x=images(4), labels=np.arange(3))
    with pytest.raises(DataError, match="3 labels for 4 samples"):
        load_data(tmp_path / "d.npz", cnn())


def test_folder_of_npy(tmp_path):
    model = build(TWO_INPUTS)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    ids = rng.integers(0, 9, (6, 3))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "ids.npy", ids)
    data = load_data(tmp_path, model, batch_size=4)
    assert [f["a"].shape for f in data] == [(4, 4), (2, 4)]
    np.testing.assert_array_equal(np.concatenate([f["ids"] for f in data]), ids)


def test_single_npy_for_a_one_input_model(tmp_path):
    np.save(tmp_path / "x.npy", images(2))
    assert batch_sizes(load_data(tmp_path / "x.npy", cnn())) == [2]
    with pytest.raises(DataError, match="one input"):
        load_data(tmp_path / "x.npy", build(TWO_INPUTS))


def _write_pb(path, array, name):
    path.write_bytes(onnx.numpy_helper.from_array(array, name=name).SerializeToString())


def test_onnx_test_data_pb_folder(tmp_path):
    x = images(2)
    _write_pb(tmp_path / "input_0.pb", x, "x")
    _write_pb(tmp_path / "output_0.pb", np.zeros((2, 10), np.float32), "y")  # outputs are ignored
    data = load_data(tmp_path, cnn())
    assert len(data) == 1
    np.testing.assert_array_equal(data.batches[0]["x"], x)


def test_onnx_test_data_sets_unnamed_tensors_in_input_order(tmp_path):
    model = build(TWO_INPUTS)
    for i, n in enumerate((1, 3)):
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        _write_pb(folder / "input_0.pb", np.ones((n, 4), np.float32), "")
        _write_pb(folder / "input_1.pb", np.zeros((n, 5), np.int64), "")
    data = load_data(tmp_path, model)
    assert [f["ids"].shape for f in data] == [(1, 5), (3, 5)]
    assert data.num_samples == 4


def test_iterable_of_feeds_and_mapping():
    model = cnn()
    data = load_data([{"x": images(1)}, {"x": images(3)}], model)
    assert batch_sizes(data) == [1, 3]
    data = load_data({"x": images(40)}, model)
    assert batch_sizes(data) == [32, 8]  # the default batch size


# -- batching ------------------------------------------------------------------------------------


def test_dynamic_batch_is_cut_into_batches(tmp_path):
    np.savez(tmp_path / "d.npz", x=images(10), labels=np.arange(10))
    data = load_data(tmp_path / "d.npz", cnn(), batch_size=4)
    assert batch_sizes(data) == [4, 4, 2]
    np.testing.assert_array_equal(data.labels, np.arange(10))


def test_fixed_batch_1_model_fed_n_samples(tmp_path):
    x = images(5)
    np.savez(tmp_path / "d.npz", x=x)
    data = load_data(tmp_path / "d.npz", cnn(batch=1), batch_size=4)  # the model's batch wins
    assert batch_sizes(data) == [1] * 5
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in data]), x)


def test_fixed_batch_model_fed_a_stack_of_whole_feeds():
    x = rng.standard_normal((3, 1, 3, 8, 8)).astype(np.float32)  # 3 feeds of [1,3,8,8]
    data = load_data({"x": x}, cnn(batch=1))
    assert batch_sizes(data) == [1, 1, 1]


def test_fixed_batch_not_a_multiple():
    with pytest.raises(DataError, match="not a multiple of the model's fixed batch 2"):
        load_data({"x": images(5)}, cnn(batch=2))


def test_zero_samples(tmp_path):
    # Nothing to validate on is an error, not a vacuous pass.
    np.savez(tmp_path / "d.npz", x=images(0))
    with pytest.raises(DataError, match="no samples"):
        load_data(tmp_path / "d.npz", cnn())


def test_inputs_disagree_on_sample_count():
    feeds = {"a": np.ones((3, 4), np.float32), "ids": np.ones((2, 5), np.int64)}
    with pytest.raises(DataError, match="disagree on the number of samples"):
        load_data(feeds, build(TWO_INPUTS))


# -- errors that name the problem ------------------------------------------------------------------


@pytest.mark.parametrize(
    "arrays,words",
    [
        ({"z": images(2)}, ["missing input(s) x", "unknown name(s) z", "x: float32[N,3,8,8]"]),
        ({}, ["missing input(s) x"]),
        ({"x": np.ones((2, 3, 8, 9), np.float32)}, ["'x'", "[2, 3, 8, 9]", "axis 3: 9 != 8"]),
        ({"x": np.ones((2, 3, 8), np.float32)}, ["'x'", "rank 4"]),
        ({"x": images(2).astype(np.float64)}, ["'x'", "float64", "float32"]),
    ],
    ids=["wrong-name", "missing", "wrong-shape", "wrong-rank", "wrong-dtype"],
)
def test_data_that_does_not_fit(tmp_path, arrays, words):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", cnn())
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_unreadable_sources(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    (tmp_path / "d.txt").write_text("1 2 3")
    (tmp_path / "empty").mkdir()
    for source, words in [
        (tmp_path / "d.npz", "not a readable .npz"),
        (tmp_path / "d.txt", "unknown data format"),
        (tmp_path / "empty", "holds no .npy files"),
        (tmp_path / "nothere.npz", "no such file"),
    ]:
        with pytest.raises(DataError, match=words):
            load_data(source, cnn())
    with pytest.raises(DataError):
        load_data(42, cnn())


def test_an_iterable_of_what_is_not_a_feed_is_one_line(tmp_path):
    """A list of file names (or of bare arrays) was taken for feeds: dict('a.npz') raised ValueError
    ('dictionary update sequence element #0 has length 1'), an iterator AttributeError."""
    from onnxopt.data import sample_rows

    words = "data batch 0: str is not a mapping of input names to arrays"
    with pytest.raises(DataError, match=words):
        load_data([str(tmp_path / "a.npz")], cnn())
    with pytest.raises(DataError, match=words):
        stream_data(iter([str(tmp_path / "a.npz")]), cnn(), max_samples=4)
    with pytest.raises(DataError, match=words):
        sample_rows([str(tmp_path / "a.npz")], cnn())
    with pytest.raises(DataError, match="data batch 1: ndarray is not a mapping"):
        load_data([{"x": images(1)}, images(1)], cnn())


# -- --dim and synthetic data ------------------------------------------------------------------------


def test_parse_dims():
    assert parse_dims(["batch=4", "seq = 128"]) == {"batch": 4, "seq": 128}
    assert parse_dims({"batch": 2}) == {"batch": 2}
    assert parse_dims(None) == {}


@pytest.mark.parametrize("item", ["batch", "=4", "batch=", "batch=0", "batch=-1", "batch=x", "batch=2.5", "batch=²"])
def test_parse_dims_errors(item):
    with pytest.raises(OptionError) as exc:
        parse_dims([item])
    assert repr(item) in str(exc.value) and "NAME=POSITIVE_INT" in str(exc.value)


@pytest.mark.parametrize("dims", [{"batch": 0}, {"batch": "x"}])
def test_parse_dims_mapping_errors(dims):
    with pytest.raises(OptionError):
        parse_dims(dims)


def test_synthetic_data_with_named_dims():
    model = build(TWO_INPUTS)
    assert [s.shape for s in input_specs(model)] == [("batch", 4), ("batch", "seq")]
    data = synthetic_data(model, dims={"batch": 3, "seq": 7})
    (feed,) = data.batches
    assert feed["a"].shape == (3, 4) and feed["a"].dtype == np.float32
    assert feed["ids"].shape == (3, 7) and feed["ids"].dtype == np.int64
    assert feed["ids"].min() >= 0 and feed["ids"].max() < 10  # usable as token ids
    assert data.synthetic and not data.notes
    assert load_data("synthetic", model, dims={"batch": 3, "seq": 7}).batches[0]["ids"].shape == (3, 7)


def test_synthetic_data_notes_dims_left_at_1():
    data = synthetic_data(build(TWO_INPUTS), dims={"batch": 2})
    assert data.batches[0]["ids"].shape == (2, 1)
    assert data.notes == ["dynamic dims set to 1: ids[1] (seq) (use --dim NAME=N)"]


def test_synthetic_data_unknown_dim_name():
    with pytest.raises(OptionError, match="--dim sequence: no input has a dimension of that name"):
        synthetic_data(build(TWO_INPUTS), dims={"sequence": 4})


def test_errors_are_onnxopt_errors():
    assert issubclass(DataError, OnnxoptError) and issubclass(OptionError, OnnxoptError)


# --- streaming (calibration) ------------------------------------------------------------------


def test_stream_reads_an_npz_batch_by_batch_like_load(tmp_path):
    x = images(70)
    np.savez(tmp_path / "a.npz", x=x)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    loaded = load_data(tmp_path / "a.npz", cnn(), batch_size=32)
    for name in ("a.npz", "c.npz"):
        stream = stream_data(tmp_path / name, cnn(), batch_size=32)
        assert isinstance(stream, DataStream) and (len(stream), stream.num_samples) == (3, 70)
        for got, want in zip(stream, loaded, strict=True):
            np.testing.assert_array_equal(got["x"], want["x"])
        assert [b["x"].shape[0] for b in stream] == [32, 32, 6]  # a file can be read again


def test_stream_reads_a_folder_of_npy_and_an_iterator_once(tmp_path):
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "x.npy", images(10))
    assert batch_sizes(stream_data(tmp_path / "f", cnn(), batch_size=4)) == [4, 4, 2]
    stream = stream_data(({"x": images(n)} for n in (2, 3)), cnn())
    assert batch_sizes(stream) == [2, 3] and stream.num_samples == 5
    with pytest.raises(DataError, match="read only once"):
        list(stream)
    labelled = stream_data(({"x": images(2), "labels": np.zeros(2, np.int64)} for _ in range(2)), cnn())
    assert [sorted(b) for b in labelled] == [["x"], ["x"]]  # calibration drops the labels


def test_head_takes_whole_batches_up_to_a_sample_count_and_spares_a_read_once_iterator(tmp_path):
    np.savez(tmp_path / "a.npz", x=images(70))
    stream = stream_data(tmp_path / "a.npz", cnn(), batch_size=32)
    assert batch_sizes(head(stream, 40)) == [32, 32] and batch_sizes(head(stream, 1)) == [32]
    assert batch_sizes(head(stream, 1000)) == [32, 32, 6] and batch_sizes(stream) == [32, 32, 6]
    # A read-once iterator's first batches are read ahead and kept; its read starts with them.
    batches = [images(2) for _ in range(3)]
    once = stream_data(({"x": b} for b in batches), cnn())
    taken = head(once, 4)
    assert batch_sizes(taken) == [2, 2]
    np.testing.assert_array_equal(taken.batches[1]["x"], batches[1])
    read = list(once)
    assert [b["x"].shape[0] for b in read] == [2, 2, 2] and once.num_samples == 6
    for got, want in zip(read, batches, strict=True):
        np.testing.assert_array_equal(got["x"], want)
    spent = stream_data(({"x": images(2)} for _ in range(3)), cnn())
    assert batch_sizes(spent) == [2, 2, 2] and head(spent, 4) is None  # read before: nothing kept


def test_head_copies_what_a_generator_refills():
    buffer = np.zeros((2, 3, 8, 8), np.float32)

    def refilling():
        for i in range(3):
            buffer[:] = i
            yield {"x": buffer}

    once = stream_data(refilling(), cnn())
    assert [float(b["x"].max()) for b in head(once, 100)] == [0.0, 1.0, 2.0]


def test_stream_reads_fortran_ordered_arrays(tmp_path):
    x = np.asfortranarray(images(10))
    np.savez(tmp_path / "f.npz", x=x)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "x.npy", x)
    for source in (tmp_path / "f.npz", tmp_path / "d"):
        stream = stream_data(source, cnn(), batch_size=4)
        assert isinstance(stream, DataStream)
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in stream]), x)


def test_stream_skips_labels_and_still_streams(tmp_path):
    """Calibration reads no labels: a file that has them (the same file as --eval) is streamed, not
    loaded whole."""
    x = images(10)
    np.savez(tmp_path / "l.npz", x=x, labels=np.arange(10))
    stream = stream_data(tmp_path / "l.npz", cnn(), batch_size=4)
    assert isinstance(stream, DataStream) and batch_sizes(stream) == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in stream]), x)


def test_stream_checks_the_first_batch_before_anything_runs(tmp_path):
    np.savez(tmp_path / "d.npz", x=images(8).astype(np.float64))
    with pytest.raises(DataError, match="dtype float64, the model expects float32"):
        stream_data(tmp_path / "d.npz", cnn())
    np.savez(tmp_path / "n.npz", image=images(8))
    with pytest.raises(DataError, match="missing input"):
        stream_data(tmp_path / "n.npz", cnn())
    with pytest.raises(DataError, match="axis 2"):
        stream_data(iter([{"x": np.zeros((1, 3, 9, 8), np.float32)}]), cnn())
    # A later batch that does not fit is named when it is read.
    stream = stream_data(iter([{"x": images(2)}, {"x": images(2).astype(np.float64)}]), cnn())
    with pytest.raises(DataError, match="batch 1: input 'x' has dtype float64"):
        list(stream)


def test_stream_of_a_truncated_npz_is_a_data_error(tmp_path):
    np.savez(tmp_path / "t.npz", x=images(64))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.npz"):
        list(stream_data(tmp_path / "t.npz", cnn()))


def test_streaming_memory_is_one_batch_whatever_the_number_of_samples(tmp_path):
    import tracemalloc

    def peak(samples: int) -> int:
        path = tmp_path / f"{samples}.npz"
        np.savez(path, x=np.zeros((samples, 3, 8, 8), np.float32))
        tracemalloc.start()
        try:
            for _ in stream_data(path, cnn(), batch_size=16):
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(32), peak(4096)  # 4096 samples: 3 MB of data; one batch is 12 KB
    assert large < 2 * small + 64 * 1024, (small, large)


def test_a_dim_given_twice_with_two_sizes_is_refused():
    assert parse_dims(["batch=2", "batch=2"]) == {"batch": 2}
    with pytest.raises(OptionError, match="--fix-dim batch is given twice: 1 and 8"):
        parse_dims(["batch=1", "batch=8"], "--fix-dim")


# -- reading no more than is safe, or asked (issue 14, part 4) ----------------------------------------


def _bomb(path, rows: int, compressed_bytes_of_zeros: int | None = None) -> None:
    """An .npz whose one member 'x' declares ``rows`` images, compressed (zeros compress ~1000x)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3, 8, 8)})
            f.write(b"\0" * (compressed_bytes_of_zeros if compressed_bytes_of_zeros is not None else rows * 768))


def test_npz_declaring_more_than_the_read_limit_is_refused_before_reading(tmp_path, monkeypatch):
    """A compressed .npz was loaded whole (a 6 MB zip bomb took 6.3 GB): the header's shape is
    checked against the limit first; here a 4 MB member (4 KB compressed) against a 1 MB limit."""
    import onnxopt.data as data_module

    monkeypatch.setattr(data_module, "READ_LIMIT", 2**20)
    path = tmp_path / "bomb.npz"
    _bomb(path, 5000)
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError) as exc:
        load_data(path, cnn())
    message = str(exc.value)
    assert "\n" not in message and "declares float32[5000, 3, 8, 8]" in message and "--max-samples" in message
    # the first samples only: read and checked, well under the limit
    dataset = load_data(path, cnn(), max_samples=100)
    assert dataset.num_samples == 100


def test_huge_declared_shapes_in_npy_and_npz_are_one_line(tmp_path):
    with open(tmp_path / "x.npy", "wb") as f:  # 3.6 TiB declared, 64 bytes present
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
        f.write(b"\0" * 64)
    model = build("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,1000000] x) => (float[N,1000000] y) { y = Identity(x) }""")
    for source in (tmp_path / "x.npy", tmp_path):
        with pytest.raises(DataError) as exc:
            load_data(source, model)
        assert "\n" not in str(exc.value) and "declares float32[1000000, 1000000]" in str(exc.value)
    _bomb(tmp_path / "short.npz", 10**7, 768)  # declares 7 GiB, holds one sample
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "short.npz", cnn())
    assert "declares" in str(exc.value)
    with pytest.raises(DataError, match="ends before"):  # streamed batch by batch: the file is short
        list(stream_data(tmp_path / "short.npz", cnn()))


@pytest.mark.parametrize("content", [b"", b"PK\x05\x06" + b"\0" * 18], ids=["zero-bytes", "no-members"])
def test_empty_npz_is_one_line(tmp_path, content):
    (tmp_path / "d.npz").write_bytes(content)
    for read in (load_data, stream_data):
        with pytest.raises(DataError) as exc:
            read(tmp_path / "d.npz", cnn())
        assert "\n" not in str(exc.value) and "d.npz" in str(exc.value)


def test_max_samples_caps_every_source(tmp_path):
    x, labels = images(10), np.arange(10) % 4
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", x)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))
    feeds = [{"x": x[i:i + 4]} for i in range(0, 10, 4)]
    for source in (tmp_path / "d.npz", tmp_path / "npy", {"x": x}, feeds, tmp_path / "fortran.npy"):
        dataset = load_data(source, cnn(), max_samples=6, batch_size=4)
        assert dataset.num_samples == 6, source
        np.testing.assert_array_equal(np.concatenate([f["x"] for f in dataset]), x[:6])
    assert list(load_data(tmp_path / "d.npz", cnn(), max_samples=6).labels) == list(labels[:6])
    for source in (tmp_path / "d.npz", tmp_path / "npy", iter(feeds)):
        stream = stream_data(source, cnn(), batch_size=4, max_samples=6)
        assert sum(f["x"].shape[0] for f in stream) == 6, source


def test_negative_labels_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=images(2), labels=np.array([1, -3]))
    with pytest.raises(DataError, match="-3"):
        load_data(tmp_path / "d.npz", cnn())


# --- rows in any order (distillation's training data) ---------------------------------------------


def test_sample_rows_reads_any_range_of_an_npz_or_npy_folder_with_its_labels(tmp_path):
    from onnxopt.data import SampleRows, sample_rows

    x, y = images(70), np.arange(70) % 4
    np.savez(tmp_path / "a.npz", x=x, labels=y)
    np.savez_compressed(tmp_path / "c.npz", x=x, labels=y)
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "x.npy", np.asfortranarray(x))
    np.save(tmp_path / "f" / "y.npy", y[:, None])
    for source in (tmp_path / "a.npz", tmp_path / "c.npz", tmp_path / "f", {"x": x, "labels": y}):
        rows = sample_rows(source, cnn())
        assert isinstance(rows, SampleRows) and rows.num_samples == 70 and rows.sample_bytes == x[0].nbytes
        assert rows.in_memory == isinstance(source, dict)
        for start, stop in ((40, 70), (0, 7), (65, 90)):
            feed, labels = rows.read(start, stop)
            np.testing.assert_array_equal(feed["x"], x[start:stop])
            np.testing.assert_array_equal(labels, y[start:stop])
    assert sample_rows(tmp_path / "a.npz", cnn(), max_samples=10).num_samples == 10
    np.savez(tmp_path / "bad.npz", x=x, labels=y[:60])
    with pytest.raises(DataError, match="60 labels for 70 samples"):
        sample_rows(tmp_path / "bad.npz", cnn())
    with pytest.raises(DataError, match="no input 'x'"):
        sample_rows({"z": x}, cnn())
