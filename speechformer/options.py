"""What a transcription is asked to do: one frozen options object, one check, and the flags made from it.

:class:`TranscribeOptions` holds everything a :class:`~speechformer.transcribe.Transcriber` is
told: the decoding (:class:`~speechformer.decoding.DecodeOptions`), how long audio is cut and
read, how files are batched, the precision, whether times are wanted, Whisper's guards and
prompt. It is frozen: a request fills one in, nobody changes it afterwards.

Three ways in, one definition:

* Python: ``bundle.default_options(beam_size=4)`` (the model family's defaults, then yours:
  :meth:`~speechformer.transcribe.ModelBundle.default_options`, the one place that knows what
  Whisper or an fbank model needs), or ``TranscribeOptions(...)`` written out;
* the command line: :func:`add_option_flags` makes one flag per field (``beam_size`` is
  ``--beam-size``) for ``transcribe``, ``evaluate`` and ``explain``, and :func:`given_options`
  reads back the flags that were typed;
* a training config: ``model.decoding`` is a ``DecodeOptions`` section (jsonargparse reads the
  dataclass), checked by the same :meth:`TranscribeOptions.check`.

:meth:`TranscribeOptions.check` is the one home of every rule: a value out of range, a choice
that is not one, a decoder the model cannot serve. Each refusal is one
:class:`~speechformer.errors.UserError` naming the field (as a flag, or as the config's key)
and what it may be.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from .errors import UserError
from .tokenizer import WhisperTokenizer

if TYPE_CHECKING:
    from .transcribe import ModelBundle

#: An fbank model's audio is cut into chunks this much longer than its longest training
#: utterance: a silence detector rounds intervals outwards, and a whole training-length
#: sentence must fit in one chunk.
CHUNK_HEADROOM = 1.25

#: Whisper's guards (openai-whisper's defaults), set by ``ModelBundle.default_options`` for Whisper models.
WHISPER_GUARDS = {"no_speech_threshold": 0.6, "logprob_threshold": -1.0, "compression_ratio_threshold": 2.4}

Timing = Literal["ctc", "whisper"]

#: Whisper's window: its encoder reads 30 s (1500 frames), however short the audio.
WHISPER_WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode: the decoder and its settings. Checked, and filled in for a model family,
    by :class:`~speechformer.options.TranscribeOptions` (``check``) and
    ``ModelBundle.default_options`` (Whisper: ``max_len`` half the decoder's positions)."""

    beam_size: int = 1
    length_penalty: float = 1.0  # beam score = log p / length ** length_penalty
    max_len_ratio: float = 1.0  # at most this many tokens per encoder frame
    max_len: int = 0  # hard cap (0: the model's position table)
    decoder: Literal["attention", "joint", "ctc"] = "attention"
    ctc_weight: float = 0.3  # joint: weight of the CTC prefix score (0 = attention only, 1 = CTC only)
    ctc_candidates: int = 0  # joint: tokens per beam given a CTC prefix score (0: 1.5 x beam, all if ctc_weight 1)


@dataclass(frozen=True)
class TranscribeOptions:
    """Everything a transcription is told, in one frozen object (see the module docstring).

    ``None`` in ``chunk_seconds`` means the model's window (``ModelBundle.window_seconds``);
    ``None`` in a guard's threshold turns the guard off.
    """

    decode: DecodeOptions = field(default_factory=DecodeOptions)
    # long audio: cut into chunks at quiet points, read block by block
    chunk_seconds: float | None = None
    pause_seconds: float | None = 0.5
    stream_seconds: float = 300.0
    # batching and hardware
    batch_seconds: float = 240.0
    max_batch_size: int = 32
    num_threads: int = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    cpu_fast_path: bool = True
    # what comes out
    timestamps: bool = False
    # Whisper's guards against text on silence and repetition loops, and its prompt
    no_speech_threshold: float | None = None
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float | None = None
    language: str | None = None
    task: Literal["transcribe", "translate"] | None = None
    prompt: str | None = None  # Whisper: previous text (initial_prompt), its last n_text_ctx // 2 - 1 tokens
    # shallow fusion: a language model folder (``speechformer lm train``) as one more full scorer
    lm: str | None = None
    lm_weight: float = 0.0
    lm_bonus: float = 0.0

    def replace(self, **changes: Any) -> "TranscribeOptions":
        """A copy with ``changes``: fields of this object or of its ``decode`` (``beam_size=4``).

        A CTC-weighting setting given with another decoder than joint is refused here, where
        "given" is known (the flag would otherwise be ignored without a word)."""
        decode_names = {f.name for f in fields(DecodeOptions)}
        own_names = {f.name for f in fields(self)} - {"decode"}
        unknown = sorted(set(changes) - decode_names - own_names)
        if unknown:
            raise UserError(flag_name(unknown[0]), "not an option", f"the options are {', '.join(option_names())}")
        decode = dataclasses.replace(self.decode, **{k: v for k, v in changes.items() if k in decode_names})
        for name in JOINT_ONLY:
            if name in changes and decode.decoder != "joint":
                raise UserError(flag_name(name), f"applies to --decoder joint (got --decoder {decode.decoder})",
                                "add --decoder joint, or drop the flag")
        return dataclasses.replace(self, decode=decode, **{k: v for k, v in changes.items() if k in own_names})

    def chunk_length(self, bundle: "ModelBundle") -> float:
        """Seconds per chunk: ``chunk_seconds``, or the model's window."""
        return self.chunk_seconds or bundle.window_seconds

    def check(self, bundle: "ModelBundle | None" = None, name: Callable[[str], str] | None = None) -> None:
        """Refuse, with one :class:`UserError` naming the field, any value out of its range and,
        given the model, anything it cannot do. ``name`` turns a field's name into what the user
        typed (default: its flag, ``--beam-size``; a training config passes ``model.decoding.``)."""
        name = name or flag_name
        for obj in (self.decode, self):
            _check_values(obj, name)
        d = self.decode
        if d.decoder == "ctc" and d.beam_size != 1:
            raise UserError(f"{name('decoder')} ctc", "is greedy decoding, with no beam",
                            f"drop {name('beam_size')} (or use {name('decoder')} joint for a beam search)")
        if self.lm is not None and d.decoder == "ctc":
            raise UserError(f"{name('lm')} {self.lm}", f"needs a search to join, and {name('decoder')} ctc is greedy "
                            "over CTC labels alone", f"use {name('decoder')} attention or joint, or drop {name('lm')}")
        for setting in ("lm_weight", "lm_bonus"):
            if self.lm is None and getattr(self, setting) != 0:
                raise UserError(name(setting), f"applies with {name('lm')} (none given)",
                                f"add {name('lm')} DIR, or drop the flag")
        if bundle is not None:
            _check_model(self, bundle, name)


def family_options(whisper: bool, max_target_positions: int, **overrides: Any) -> TranscribeOptions:
    """The options a model family needs, then ``overrides`` (any option by name): the one place
    that knows the families apart (``ModelBundle.default_options``, the onnxruntime transcriber).

    Whisper: at most half the decoder's positions per window (openai-whisper's ``sample_len``, so
    a repetition loop cannot run to 446 tokens), and the guards against text on silence and
    repetition loops (:data:`WHISPER_GUARDS`). Other models: no guards."""
    if whisper:
        base = TranscribeOptions(DecodeOptions(max_len=max_target_positions // 2), **WHISPER_GUARDS)
    else:
        base = TranscribeOptions()
    return base.replace(**overrides)


def window_seconds(whisper: bool, max_input_seconds: float) -> float:
    """The longest audio decoded as one window: Whisper's 30 s, or a little more than the
    longest training utterance (:data:`CHUNK_HEADROOM`); longer audio is cut."""
    return WHISPER_WINDOW_SECONDS if whisper else CHUNK_HEADROOM * max_input_seconds


def _check_model(options: TranscribeOptions, bundle: "ModelBundle", name: Callable[[str], str]) -> None:
    """What this model cannot do: decode without a tokenizer, CTC without a head, Whisper windows
    longer than 30 s, times without a source, a language on a model without languages."""
    if bundle.tokenizer is None:
        raise UserError("model", "has no tokenizer", "import it again with --tokenizer tokenizer.json")
    c = bundle.model.config
    decoder = options.decode.decoder
    if decoder != "attention" and bundle.model.ctc is None:
        why = "Whisper models have none" if c.is_whisper else "ctc_head: false"
        raise UserError(f"{name('decoder')} {decoder}", f"needs a CTC head, and this model has none ({why})",
                        f"use {name('decoder')} attention")
    if c.is_whisper and options.chunk_seconds is not None and options.chunk_seconds > WHISPER_WINDOW_SECONDS:
        raise UserError(f"{name('chunk_seconds')} {options.chunk_seconds:g}",
                        f"longer than a Whisper window ({WHISPER_WINDOW_SECONDS:g} s)",
                        f"give at most {WHISPER_WINDOW_SECONDS:g}, or leave it out")
    if options.timestamps:
        timing_source(bundle, name("timestamps"))
    _check_language(options, bundle.tokenizer, name)
    if options.prompt is not None and not isinstance(bundle.tokenizer, WhisperTokenizer):
        raise UserError(name("prompt"), "applies to Whisper models only (this model reads no previous text)",
                        "drop the flag")


def _check_language(options: TranscribeOptions, tokenizer: Any, name: Callable[[str], str]) -> None:
    asked = [f"{name(f)} {v}" for f, v in (("language", options.language), ("task", options.task)) if v]
    if not asked:
        return
    if not isinstance(tokenizer, WhisperTokenizer):
        raise UserError(" ".join(asked), "applies to Whisper models only", "drop the flag")
    if options.language is not None and tokenizer.multilingual:
        from .tokenizer import WHISPER_LANGUAGES

        if options.language not in WHISPER_LANGUAGES:
            raise UserError(asked[0], "not a language of Whisper", "use a code such as en, de, fr")
    if not tokenizer.multilingual:  # tiny.en ...: no language or task tokens, the flag would be ignored
        refused = [f"{name('language')} {options.language}"] * (options.language not in (None, "en")) + \
            [f"{name('task')} {options.task}"] * (options.task == "translate")
        if refused:
            raise UserError(" ".join(refused), "this is an English-only Whisper model (it only transcribes English)",
                            "use a multilingual model (such as tiny, not tiny.en) or drop the flag")


def set_fields(obj: Any) -> dict[str, Any]:
    """The fields of a dataclass that differ from its class's defaults: what a config section
    set (jsonargparse fills in the rest), to lay over a model family's defaults."""
    default = type(obj)()
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) != getattr(default, f.name)}


def timing_source(bundle: "ModelBundle", flag: str = "--timestamps") -> Timing:
    """Where this model's timestamps come from: ``"ctc"`` (word times from a forced alignment
    to its CTC head) or ``"whisper"`` (segment times from Whisper's time tokens, word times from
    its alignment heads, :mod:`speechformer.alignment`). A model with
    neither gets one line naming ``flag``, the option that asked for times."""
    if bundle.model.ctc is not None:
        return "ctc"
    tokenizer = bundle.tokenizer
    if isinstance(tokenizer, WhisperTokenizer) and bundle.model.config.vocab_size > tokenizer.timestamp_begin:
        return "whisper"
    raise UserError(flag, "this model cannot time its transcript: times come from a CTC head (word times, forced "
                    "alignment) or from Whisper's time tokens (segment times), and it has neither (ctc_head: false, "
                    "not a Whisper model)", "use --format text, tsv or json without --timestamps, or a model "
                    "trained with a CTC head")


def tokenizer_for(options: TranscribeOptions, tokenizer: Any) -> Any:
    """The model's tokenizer with ``options.language`` / ``options.task`` in its prompt."""
    if not (options.language or options.task) or not isinstance(tokenizer, WhisperTokenizer):
        return tokenizer
    data = tokenizer.payload() | {k: v for k, v in (("language", options.language), ("task", options.task)) if v}
    return WhisperTokenizer.from_payload(data)


def decode_rules(options: TranscribeOptions, tokenizer: Any, timing: Timing | None, positions: int) -> Any:
    """The decoding rules of ``tokenizer`` (:func:`tokenizer_for`'s) under ``options``, shared by the
    PyTorch and onnxruntime paths: Whisper timing from its time tokens drops ``<|notimestamps|>`` and
    turns the timestamp rules on; ``options.prompt`` (Whisper) goes first as previous text, its last
    ``positions // 2 - 1`` tokens (openai-whisper's ``n_text_ctx // 2 - 1``; ``positions``: the
    decoder's)."""
    if not isinstance(tokenizer, WhisperTokenizer):
        return tokenizer.rules()
    previous = tokenizer.previous_text(options.prompt, positions // 2 - 1) if options.prompt is not None else []
    return tokenizer.rules(timestamps=timing == "whisper", previous=previous)


# ---------------------------------------------------------------------------- the rules, once
#: (test, what the value must be, what to do) for each field with a range; a Literal field's
#: choices are checked from its type.
_AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1", "give a whole number of 1 or more")
_POSITIVE = (lambda v: v > 0, "must be positive", "give a number above 0")
_AT_LEAST_0 = (lambda v: v >= 0, "must be at least 0", "give 0 or more")
RANGES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "beam_size": _AT_LEAST_1,
    "length_penalty": _AT_LEAST_0,
    "max_len_ratio": _POSITIVE,
    "max_len": (_AT_LEAST_0[0], "must be at least 0", "give 0 (the model's position table) or more tokens"),
    "ctc_weight": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]",
                   "give 0 (attention only) to 1 (CTC only)"),
    "ctc_candidates": (_AT_LEAST_0[0], "must be at least 0", "give 0 (1.5 x the beam) or more"),
    "chunk_seconds": _POSITIVE,
    "pause_seconds": _AT_LEAST_0,
    "stream_seconds": _POSITIVE,
    "batch_seconds": _POSITIVE,
    "max_batch_size": _AT_LEAST_1,
    "num_threads": _AT_LEAST_1,
    "no_speech_threshold": (lambda v: 0.0 <= v <= 1.0, "must be a probability in [0, 1]", "give 0 to 1, or off"),
    "compression_ratio_threshold": _POSITIVE,
    "lm_weight": (_AT_LEAST_0[0], "must be at least 0", "give 0 (the LM only vetoes) or more, such as 0.3"),
}

#: Settings of joint decoding only: given with another decoder they would do nothing.
JOINT_ONLY = ("ctc_weight", "ctc_candidates")


def _check_values(obj: Any, name: Callable[[str], str]) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or dataclasses.is_dataclass(value):
            continue
        choices = _choices(hints[f.name])
        if choices and value not in choices:
            raise UserError(name(f.name), f"must be one of {', '.join(map(str, choices))}, got {value!r}",
                            f"use one of {', '.join(map(str, choices))}")
        rule = RANGES.get(f.name)
        if rule is None:
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        test, must, todo = rule
        if not numeric or (isinstance(value, float) and math.isnan(value)) or not test(value):
            raise UserError(name(f.name), f"{must}, got {value!r}", todo)


# ---------------------------------------------------------------------------- flags
#: Each field's help on the command line (the flag is the field's name, dashes for underscores).
HELP: dict[str, str] = {
    "beam_size": "hypotheses kept per step; 1 is greedy decoding (fastest)",
    "length_penalty": "beam search: a hypothesis scores log p / length ** this (0: no length normalisation)",
    "max_len_ratio": "at most this many tokens per encoder frame",
    "max_len": "at most this many tokens per window (0: the model's position table; Whisper: half of it)",
    "decoder": "attention: the decoder alone (greedy, or beam search with --beam-size); joint: beam search "
               "scored by the decoder and CTC prefix scores (--ctc-weight); ctc: the CTC head alone, greedy "
               "(fastest, no decoder pass)",
    "ctc_weight": "--decoder joint: weight of the CTC score, 0 (attention only) to 1 (CTC only)",
    "ctc_candidates": "--decoder joint: tokens per beam given a CTC prefix score (0: 1.5 x the beam; all "
                      "when --ctc-weight is 1)",
    "chunk_seconds": "cut longer audio at quiet points (default: 1.25 x the longest training utterance; "
                     "Whisper: its 30 s window)",
    "pause_seconds": "long audio: a pause this long always ends a chunk",
    "stream_seconds": "files longer than this are read block by block (memory does not grow with length)",
    "batch_seconds": "audio seconds per batch (padded)",
    "max_batch_size": "at most this many windows per batch",
    "num_threads": "threads reading audio files",
    "precision": "bf16: bfloat16 matmuls (CPUs with AMX/AVX512-BF16, GPUs); about 1.7x faster on such a CPU, "
                 "transcripts compared in benchmarks/README.md",
    "cpu_fast_path": "on CPU in fp32, prepack the decoder's linear layers for oneDNN (equal results, faster)",
    "timestamps": "times in --format json: \"words\" from a CTC forced alignment (models with a CTC head) or "
                  "from the alignment heads' cross-attention, and \"segments\" from Whisper's own time tokens "
                  "(Whisper models)",
    "no_speech_threshold": "Whisper: a window whose no-speech probability is above this, with an unsure "
                           "transcript (--logprob-threshold), is dropped (default: 0.6 for Whisper; off: no guard)",
    "logprob_threshold": "Whisper: a transcript is unsure when its average log-probability is below this",
    "compression_ratio_threshold": "a transcript that gzips better than this is a repetition loop and is cut "
                                   "back (default: 2.4 for Whisper, off for other models)",
    "language": "Whisper multilingual models: language code (default: the one given at import)",
    "task": "Whisper multilingual models: transcribe, or translate into English (default: the one given at import)",
    "prompt": "Whisper: previous text the decoder reads before each window (openai-whisper's initial_prompt: "
              "spellings, names, style); its last n_text_ctx/2-1 tokens (223) are kept, none is output",
    "lm": "a language model folder (`speechformer lm train`, on this model's tokenizer) joining the search as a "
          "full scorer (shallow fusion; --decoder attention or joint)",
    "lm_weight": "--lm: weight of the LM's log-probability in each hypothesis's score",
    "lm_bonus": "--lm: score added per emitted token (not the end), against the LM's bias to short transcripts",
}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def option_names() -> list[str]:
    """Every option's name, the decoding's first, in the order of the dataclasses."""
    return [f.name for f in fields(DecodeOptions)] + [f.name for f in fields(TranscribeOptions) if f.name != "decode"]


def _field_types() -> dict[str, tuple[Any, Any]]:
    """Each option's (type, generic default)."""
    out = {}
    for cls in (DecodeOptions, TranscribeOptions):
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name != "decode":
                out[f.name] = (hints[f.name], f.default)
    return out


def _choices(hint: Any) -> tuple[Any, ...]:
    args = [a for a in get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    return tuple(c for a in args if get_origin(a) is Literal for c in get_args(a))


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _parse_type(hint: Any) -> Callable[[str], Any]:
    """The flag's argument type: int, float or str; ``off``/``none`` for an optional one is None."""
    optional = _is_union(hint) and type(None) in get_args(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), str) if _is_union(hint) else hint
    convert = base if base in (int, float) else str

    def parse(text: str) -> Any:
        if optional and text.lower() in ("off", "none"):
            return None
        return convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in "invalid int value"
    return parse


def add_option_flags(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """One flag per option in ``names`` (default: all), made from the dataclasses: its type, its
    choices (a Literal), a switch for a bool. A flag not typed is not set (``given_options`` leaves
    it to the model's defaults), so each help says the generic default itself."""
    group = parser.add_argument_group("transcription options (TranscribeOptions / DecodeOptions)")
    types_ = _field_types()
    for n in names or option_names():
        hint, default = types_[n]
        shown = "off" if default is None else default
        said = "default" in HELP[n] or default is False  # a switch is off unless given
        text = HELP[n] if said else f"{HELP[n]} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": n, "default": argparse.SUPPRESS, "help": text}
        if hint is bool:
            kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_type(hint)
            choices = _choices(hint)
            if choices:
                kwargs["choices"] = choices
        group.add_argument(flag_name(n), **kwargs)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options typed on the command line (those :func:`add_option_flags` made), by field name."""
    return {n: getattr(args, n) for n in option_names() if hasattr(args, n)}


#: The options each command takes: transcribe all of them; evaluate all but times; explain
#: decodes one window greedily (no beam, batching or chunking).
COMMAND_OPTIONS = {"transcribe": None, "evaluate": ("timestamps",), "explain": None}
EXPLAIN_OPTIONS = ["max_len", "max_len_ratio", "language", "task"]


def command_options(command: str) -> list[str]:
    """The options ``command`` has flags for."""
    if command == "explain":
        return list(EXPLAIN_OPTIONS)
    return [n for n in option_names() if n not in (COMMAND_OPTIONS.get(command) or ())]
