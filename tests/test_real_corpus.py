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
        assert e.member.endswith(".onnx") and e.size > 0, e.id


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
