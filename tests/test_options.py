"""One options object: every knob reachable from the command line, one check naming the field,
validation during training decoding by the same definition, a silent stretch told by its type."""

from __future__ import annotations

import typing
from dataclasses import fields

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from speechformer.cli import build_parser, main
from speechformer.decoding import DecodeOptions, decode
from speechformer.errors import UserError
from speechformer.options import TranscribeOptions, _choices, flag_name, given_options, option_names
from speechformer.transcribe import Transcriber, load_model


def _flat(options: TranscribeOptions) -> dict:
    """Every option by name, the decoding's and the transcription's together."""
    own = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "decode"}
    return {f.name: getattr(options.decode, f.name) for f in fields(options.decode)} | own


def _other_value(name: str, hint, default):  # type: ignore[no-untyped-def]
    """A valid value of the option that is not its default, and the words that type it."""
    choices = _choices(hint)
    if choices:
        value = next(c for c in (["joint"] if name == "decoder" else []) + list(choices)[::-1] if c != default)
        return value, [flag_name(name), str(value)]
    if hint is bool:
        return (not default), [flag_name(name) if not default else "--no-" + name.replace("_", "-")]
    if name in ("language", "lm", "prompt"):  # the strings: a language code, an LM folder, previous text
        value = {"language": "de", "lm": "exp/lm", "prompt": "Kathleen's notes"}[name]
        return value, [flag_name(name), value]
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if typing.get_args(hint) else hint
    value = kind(3) + (default or 0) if kind is int else round((default or 0.25) + 0.25, 2)
    return value, [flag_name(name), str(value)]


def test_every_decode_and_transcribe_option_is_a_transcribe_flag_that_reaches_the_options():
    """Each field of DecodeOptions and TranscribeOptions (length_penalty, max_len_ratio and
    ctc_candidates included, which no flag reached before) has a transcribe flag made from the
    dataclass, and the value typed lands in that field; evaluate takes all but the times."""
    hints = typing.get_type_hints(DecodeOptions) | typing.get_type_hints(TranscribeOptions)
    generic = _flat(TranscribeOptions())
    wanted, argv = {}, []
    for name in option_names():
        wanted[name], words = _other_value(name, hints[name], generic[name])
        argv += words
    assert {"length_penalty", "max_len_ratio", "ctc_candidates"} <= set(wanted)
    args = build_parser().parse_args(["transcribe", "--model", "m", "a.wav", *argv])
    options = TranscribeOptions().replace(**given_options(args))
    got = _flat(options)
    assert got == wanted and all(got[n] != generic[n] for n in wanted)
    # flags not typed are not set: the model's defaults fill them in
    assert given_options(build_parser().parse_args(["transcribe", "--model", "m", "a.wav"])) == {}
    evaluate = build_parser().parse_args(["evaluate", "--model", "m", "--manifest", "x", "--out", "o",
                                          *[w for w in argv if w != "--timestamps"]])
    assert set(given_options(evaluate)) == set(wanted) - {"timestamps"}
    explain = build_parser().parse_args(["explain", "--model", "m", "a.wav", "--out", "o", "--max-len", "7",
                                         "--max-len-ratio", "0.5"])
    assert given_options(explain) == {"max_len": 7, "max_len_ratio": 0.5}


def test_the_transcriber_decodes_with_the_options_the_flags_give(untrained_model, tmp_path, monkeypatch):
    """The options typed reach the decoder itself: --decoder joint --ctc-candidates 3 --length-penalty 0.5
    is what `decode` is called with, over the model's defaults."""
    from speechformer import cli, transcribe

    seen = []
    real = transcribe.decode
    monkeypatch.setattr(transcribe, "decode", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    wav = tmp_path / "a.wav"
    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
    args = build_parser().parse_args(["transcribe", "--model", str(untrained_model["model"]), str(wav), "--decoder",
                                      "joint", "--beam-size", "2", "--ctc-candidates", "3", "--length-penalty", "0.5",
                                      "--max-len", "4", "--device", "cpu"])
    t = cli._load_transcriber(args)
    assert t.transcribe([wav])[0].ok
    assert seen == [DecodeOptions(beam_size=2, length_penalty=0.5, max_len=4, decoder="joint", ctc_candidates=3)]


@pytest.mark.parametrize(("changes", "named"), [
    ({"beam_size": 0}, "--beam-size: must be at least 1, got 0; give a whole number of 1 or more"),
    ({"max_len_ratio": 0.0}, "--max-len-ratio: must be positive, got 0.0"),
    ({"decoder": "joint", "ctc_weight": 1.5}, "--ctc-weight: must be in [0, 1], got 1.5"),
    ({"precision": "fp16"}, "--precision: must be one of fp32, bf16, got 'fp16'"),
    ({"decoder": "ctc", "beam_size": 3}, "--decoder ctc: is greedy decoding, with no beam; drop --beam-size"),
    ({"chunk_seconds": -1.0}, "--chunk-seconds: must be positive, got -1.0"),
])
def test_check_names_the_field_and_what_it_may_be(changes, named):
    with pytest.raises(UserError) as err:
        TranscribeOptions().replace(**changes).check()
    assert str(err.value).startswith(named), str(err.value)


def test_check_against_the_model_and_on_the_command_line_is_one_line(untrained_model, tmp_path, capsys):
    """What the model cannot do is refused before any audio is read, in one line naming the
    flag; the training config's section is named as the config names it."""
    bundle = load_model(untrained_model["model"])
    with pytest.raises(UserError, match="^--language de: applies to Whisper models only"):
        bundle.default_options(language="de").check(bundle)
    with pytest.raises(UserError, match="^model.decoding.beam_size: must be at least 1"):
        TranscribeOptions(DecodeOptions(beam_size=0)).check(name=lambda f: f"model.decoding.{f}")
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    capsys.readouterr()
    for flags, line in ((["--max-len-ratio", "0"], "error: --max-len-ratio: must be positive, got 0.0; "),
                        (["--ctc-candidates", "4"], "error: --ctc-candidates: applies to --decoder joint "),
                        (["--task", "translate"], "error: --task translate: applies to Whisper models only; ")):
        assert main(["transcribe", "--model", str(untrained_model["model"]), str(wav), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(line), err


def test_validation_during_training_decodes_jointly_by_the_config_section(untrained_model, monkeypatch, capsys):
    """``model.decoding`` is a section of the training config made from DecodeOptions: the
    LightningCLI parser takes --model.decoding.decoder joint, and validation then decodes with
    joint CTC/attention beam search (its hypotheses are joint decoding's, not greedy's)."""
    from speechformer.lightning import SpeechModule
    from speechformer.model import ModelConfig

    with pytest.raises(SystemExit):
        main(["fit", "--print_config", "--model.decoding.decoder", "joint", "--model.decoding.beam_size", "3",
              "--model.decoding.ctc_weight", "0.5"])
    section = yaml.safe_load(capsys.readouterr().out)["model"]["decoding"]
    assert section["decoder"] == "joint" and section["beam_size"] == 3 and section["ctc_weight"] == 0.5

    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                         subsampling_channels=8, ctc_weight=0.3)
    joint = DecodeOptions(beam_size=3, decoder="joint", ctc_weight=0.5)
    module = SpeechModule(model=config, tokenizer=str(untrained_model["model"]), decoding=joint).eval()
    assert module.decoding == joint
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    wav = torch.randn(2, 16000) * 0.1
    batch = {"ids": ["a", "b"], "texts": ["the cat", "a dog"], "wav": wav, "wav_lengths": torch.tensor([16000, 12000]),
             "tokens": torch.tensor([[5, 6], [7, 0]]), "token_lengths": torch.tensor([2, 1])}
    with torch.no_grad():
        module.validation_step(batch, 0)
        memory, lengths = module.model.encode(batch["wav"], batch["wav_lengths"])
        rules = module.tokenizer.rules()
        expected = [module.tokenizer.decode(h.tokens) for h in decode(module.model, memory, lengths, joint, rules)]
        greedy = [module.tokenizer.decode(h.tokens) for h in decode(module.model, memory, lengths, DecodeOptions(),
                                                                     rules)]
    assert module._val_outputs[-1][2] == expected
    assert expected != greedy  # the check can tell the decoders apart
    with pytest.raises(UserError, match="^model.decoding.decoder joint: needs a CTC head"):
        SpeechModule(model=ModelConfig(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                                       subsampling_channels=8, ctc_head=False, ctc_weight=0.0),
                     tokenizer=str(untrained_model["model"]), decoding=joint)


def test_a_failed_read_of_a_long_file_is_reported_even_if_its_name_says_silence(untrained_model, tmp_path,
                                                                                monkeypatch):
    """A silent stretch of a long file is told by its type (SilentAudio), not by the word
    "silence" in the message: a block that cannot be read is an error, whatever the file is
    called (on main, ``silence_room.wav`` failing mid-file was reported as transcribed)."""
    from speechformer import transcribe
    from speechformer.audio import AudioError

    path = tmp_path / "silence_room.wav"
    sf.write(path, np.random.default_rng(1).normal(0, 0.1, 16000 * 10).astype(np.float32), 16000)
    real = transcribe.load_audio

    def failing(p, rate, offset=0.0, duration=None):  # type: ignore[no-untyped-def]
        if offset > 0:
            raise AudioError(p, "could not be read (a damaged frame)", "check the file")
        return real(p, rate, offset=offset, duration=duration)

    monkeypatch.setattr(transcribe, "load_audio", failing)
    bundle = load_model(untrained_model["model"])
    t = Transcriber(bundle, bundle.default_options(chunk_seconds=1.0, stream_seconds=4.0, max_len=3))
    result = t.transcribe([path])[0]
    assert not result.ok and "damaged frame" in result.error

    # a silent block is skipped, and the rest of the file still transcribed
    def silent_middle(p, rate, offset=0.0, duration=None):  # type: ignore[no-untyped-def]
        from speechformer.audio import SilentAudio

        if 3.0 < offset < 6.0:
            raise SilentAudio(p, "contains only silence", "check the recording")
        return real(p, rate, offset=offset, duration=duration)

    monkeypatch.setattr(transcribe, "load_audio", silent_middle)
    result = t.transcribe([path])[0]
    assert result.ok
