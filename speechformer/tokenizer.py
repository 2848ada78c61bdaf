"""Tokenizers: speechformer's sentencepiece BPE, and Whisper's byte-level BPE, behind one interface.

Byte-pair encoding starts from characters and repeatedly merges the most frequent
adjacent pair into a new symbol, so frequent words become one token and rare words
split into pieces: no word is ever out of vocabulary.

Id layout (fixed, so the model config can rely on it): 0 ``<blank>`` (the CTC blank,
never produced by ``encode``), 1 ``<unk>``, 2 ``<s>`` (decoder start), 3 ``</s>`` (end).
Text is normalised with :func:`speechformer.text.normalize_text` before training and
encoding, the same function that scoring uses.

:class:`WhisperTokenizer` wraps OpenAI Whisper's byte-level BPE (``tokenizer.json``, read
by Hugging Face's ``tokenizers`` library) with its special tokens: it keeps case and
punctuation, and its decoder prompt is ``<|startoftranscript|>`` (+ language and task on
multilingual models) + ``<|notimestamps|>``; with timestamps the prompt ends before
``<|notimestamps|>`` and the model writes time tokens ``<|0.00|>`` ... ``<|30.00|>`` (one every
0.02 s, the ids after ``<|notimestamps|>``) around each segment of text.

Both provide what the rest of the toolkit uses: ``vocab_size``, ``encode``, ``decode``,
``pieces``, ``save``, ``eos_id``, ``prompt`` (the decoder's first tokens), ``rules()`` (the
decoding constraints) and ``payload()`` (plain data for a checkpoint); :func:`load_tokenizer`
opens either from a model folder.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import sentencepiece as spm

from .text import dropped_characters, normalize_text

BLANK_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_FILE = "tokenizer.model"
WHISPER_FILE = "tokenizer.json"
WHISPER_CONFIG_FILE = "tokenizer_config.json"
WHISPER_TIME_PRECISION = 0.02  # seconds per Whisper time token (30 s window / 1500 encoder frames)


@dataclass
class DecodeRules:
    """What a decoder must respect, from the tokenizer: how to start, how to stop, what never to emit.

    ``prompt`` is fed before the first predicted token; ``suppress`` are never emitted;
    ``suppress_at_start`` not as the first token (Whisper: a bare space or end-of-text);
    ``no_speech_id`` is the token whose probability at the start-of-transcript position
    says "there is no speech here" (Whisper only; the probability is reported, not emitted).

    ``timestamp_begin`` set (Whisper with timestamps): ids from it up are time tokens
    ``<|0.00|>``, ``<|0.02|>``, ... and decoding follows Whisper's timestamp rules
    (:func:`speechformer.decoding.apply_timestamp_rules`): the first token is a time no later
    than ``max_initial_timestamp`` steps, times come in pairs and never go back.
    """

    prompt: list[int]
    eos_id: int
    suppress: list[int] = field(default_factory=list)
    suppress_at_start: list[int] = field(default_factory=list)
    no_speech_id: int | None = None
    sot_index: int = 0  # position in the prompt whose prediction carries the no-speech probability
    timestamp_begin: int | None = None  # id of <|0.00|>; None: no timestamp rules
    max_initial_timestamp: int = 50  # the first time token is at most this many steps (1.0 s at 0.02 s)
    no_timestamps_id: int | None = None  # <|notimestamps|>: never emitted when timing


class Tokenizer:
    """A loaded sentencepiece model with speechformer's id layout and normalisation."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (
                BLANK_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError("tokenizer: not a speechformer tokenizer (expected ids blank=0 unk=1 bos=2 eos=3); "
                             "train one with `speechformer tokenizer train`")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a ``tokenizer.model`` file or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {path} not found; train one with `speechformer tokenizer train`")
        return cls(path.read_bytes())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    blank_id, unk_id, bos_id, eos_id = BLANK_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(normalize_text(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i > EOS_ID])

    def lost_characters(self, text: str) -> list[str]:
        """The characters of ``text`` its token ids do not carry: removed by the normalisation
        (an emoji, see :func:`~speechformer.text.dropped_characters`) or not in the vocabulary,
        so encoded as ``<unk>`` (Chinese in a tokenizer trained on English). In order, with
        repeats; empty when the text is represented in full."""
        kept = normalize_text(text)
        unknown = [c for c in kept if c != " " and self.sp.piece_to_id(c) == UNK_ID]
        return dropped_characters(text) + unknown

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    @property
    def prompt(self) -> list[int]:
        return [BOS_ID]

    def rules(self, timestamps: bool = False) -> DecodeRules:
        if timestamps:
            raise ValueError("a sentencepiece tokenizer has no time tokens; times come from the CTC head")
        return DecodeRules(prompt=self.prompt, eos_id=EOS_ID, suppress=[BLANK_ID, BOS_ID])

    def payload(self) -> dict[str, Any]:
        return {"type": "sentencepiece", "model": self.model_proto}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MODEL_FILE
        path.write_bytes(self.model_proto)
        return path


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a BPE model of ``vocab_size`` pieces on normalised ``texts``; save it in ``out_dir``."""
    sentences = [t for t in (normalize_text(x) for x in texts) if t]
    if not sentences:
        raise ValueError("tokenizer: no non-empty transcripts to train on")
    if vocab_size < 8:
        raise ValueError(f"tokenizer: --vocab-size must be at least 8, got {vocab_size}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, pad_id=BLANK_ID, pad_piece="<blank>",
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=2, minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"tokenizer: --vocab-size {vocab_size} does not fit these transcripts: {err}") from err
    tok = Tokenizer(model.getvalue())
    tok.save(out_dir)
    return tok


# ---------------------------------------------------------------------------- Whisper
# Language codes in Whisper's token order (<|en|> = sot + 1, <|zh|> = sot + 2, ...).
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg "
    "lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so "
    "af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()


class WhisperTokenizer:
    """OpenAI Whisper's byte-level BPE with its special tokens (see the module docstring).

    Text is encoded as Whisper writes it: a leading space, case and punctuation kept.
    ``multilingual`` models put ``<|language|><|task|>`` after ``<|startoftranscript|>``.
    """

    blank_id = None

    def __init__(self, tokenizer_json: str, multilingual: bool, language: str | None = "en",
                 task: str = "transcribe", suppress: Iterable[int] | None = None,
                 suppress_at_start: Iterable[int] | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tokenizer_json = tokenizer_json
        self.hf = HFTokenizer.from_str(tokenizer_json)
        self.multilingual = multilingual
        self.language = language if multilingual else "en"
        self.task = task
        if task not in ("transcribe", "translate"):
            raise ValueError(f"whisper tokenizer: task must be transcribe or translate, got {task!r}")
        if multilingual and self.language not in WHISPER_LANGUAGES:
            raise ValueError(f"whisper tokenizer: unknown language {language!r}; use a code such as en, de, fr")

        special = self._special
        self.eot = self.eos_id = special("<|endoftext|>")
        self.sot = self.bos_id = special("<|startoftranscript|>")
        self.transcribe_id = special("<|transcribe|>")
        self.translate_id = special("<|translate|>")
        self.sot_lm = special("<|startoflm|>")
        self.sot_prev = special("<|startofprev|>")
        self.no_timestamps = special("<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1  # <|0.00|>, as in every Whisper vocabulary
        no_speech = self.hf.token_to_id("<|nospeech|>")
        self.no_speech = no_speech if no_speech is not None else special("<|nocaptions|>")
        self.suppress = sorted(set(suppress) if suppress is not None else self._default_suppress())
        self.suppress_at_start = list(suppress_at_start) if suppress_at_start is not None else (
            self.hf.encode(" ", add_special_tokens=False).ids + [self.eot])

    def _special(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"whisper tokenizer: {token} is missing from tokenizer.json; is it a Whisper tokenizer?")
        return i

    # ------------------------------------------------------------------ interface
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def prompt(self) -> list[int]:
        """``<|startoftranscript|>`` [``<|lang|>`` ``<|task|>``] ``<|notimestamps|>``."""
        return self._start() + [self.no_timestamps]

    def _start(self) -> list[int]:
        seq = [self.sot]
        if self.multilingual:
            seq.append(self.sot + 1 + WHISPER_LANGUAGES.index(self.language))
            seq.append(self.transcribe_id if self.task == "transcribe" else self.translate_id)
        return seq

    def previous_text(self, text: str, max_tokens: int) -> list[int]:
        """A previous-text prompt (openai-whisper's and faster-whisper's ``initial_prompt``):
        ``<|startofprev|>`` then the last ``max_tokens`` tokens of ``" " + text.strip()``
        (the leading space as those libraries add it; the text is otherwise not normalised)."""
        ids = self.hf.encode(" " + text.strip(), add_special_tokens=False).ids
        return [self.sot_prev] + ids[max(0, len(ids) - max_tokens):]

    def rules(self, timestamps: bool = False, previous: Sequence[int] = ()) -> DecodeRules:
        """Whisper's decoding constraints; ``timestamps``: the prompt without ``<|notimestamps|>``
        and the timestamp rules on (openai-whisper's ``without_timestamps=False``); ``previous``
        (:meth:`previous_text`) goes before ``<|startoftranscript|>``, which still carries the
        no-speech probability (``sot_index``). The prompt is never part of the output."""
        previous = list(previous)
        rules = DecodeRules(prompt=previous + self.prompt, eos_id=self.eot, suppress=self.suppress,
                            suppress_at_start=self.suppress_at_start, no_speech_id=self.no_speech,
                            sot_index=len(previous))
        if not timestamps:
            return rules
        return replace(rules, prompt=previous + self._start(), timestamp_begin=self.timestamp_begin,
                       max_initial_timestamp=round(1.0 / WHISPER_TIME_PRECISION), no_timestamps_id=self.no_timestamps)

    def encode(self, text: str) -> list[int]:
        """Transcript -> ids, as Whisper writes it (one leading space, case and punctuation kept)."""
        text = " ".join(text.split())
        return self.hf.encode(" " + text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids if int(i) < self.eot]).strip()

    def lost_characters(self, text: str) -> list[str]:
        """None: byte-level BPE represents any text, and the text is not normalised."""
        return []

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self._piece(int(i)) for i in ids]

    def _piece(self, i: int) -> str:
        if i >= self.timestamp_begin:  # time tokens are not in tokenizer.json
            return f"<|{(i - self.timestamp_begin) * WHISPER_TIME_PRECISION:.2f}|>"
        return self.hf.id_to_token(i) or f"<{i}>"

    def _default_suppress(self) -> list[int]:
        """Whisper's ``suppress_tokens="-1"``: non-speech symbols plus the task/control tokens."""
        enc = self.hf.encode
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        # hyphens and single quotes are fine between words, not at the beginning of one
        result = {enc(" -", add_special_tokens=False).ids[0], enc(" '", add_special_tokens=False).ids[0]}
        for symbol in symbols + sorted(miscellaneous):
            for ids in (enc(symbol, add_special_tokens=False).ids, enc(" " + symbol, add_special_tokens=False).ids):
                if len(ids) == 1 or symbol in miscellaneous:
                    result.add(ids[0])
        result |= {self.transcribe_id, self.translate_id, self.sot, self.sot_prev, self.sot_lm, self.no_speech}
        return sorted(result)

    # ------------------------------------------------------------------ storage
    def config(self) -> dict[str, Any]:
        return {"type": "whisper", "multilingual": self.multilingual, "language": self.language,
                "task": self.task, "suppress_tokens": self.suppress, "begin_suppress_tokens": self.suppress_at_start}

    def payload(self) -> dict[str, Any]:
        return {**self.config(), "tokenizer_json": self.tokenizer_json}

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> "WhisperTokenizer":
        return cls(data["tokenizer_json"], bool(data["multilingual"]), data.get("language") or "en",
                   data.get("task") or "transcribe", data.get("suppress_tokens"), data.get("begin_suppress_tokens"))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / WHISPER_FILE).write_text(self.tokenizer_json, encoding="utf-8")
        (folder / WHISPER_CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
        return folder / WHISPER_FILE

    @classmethod
    def load(cls, folder: str | Path) -> "WhisperTokenizer":
        folder = Path(folder)
        cfg_path = folder / WHISPER_CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"tokenizer: {cfg_path} not found; create the folder with "
                                    "`speechformer import-whisper`")
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        data["tokenizer_json"] = (folder / WHISPER_FILE).read_text(encoding="utf-8")
        return cls.from_payload(data)


AnyTokenizer = Union[Tokenizer, WhisperTokenizer]


def load_tokenizer(path: str | Path) -> AnyTokenizer:
    """A sentencepiece ``tokenizer.model`` (file or folder) or a Whisper model folder."""
    path = Path(path)
    if path.is_dir() and (path / WHISPER_FILE).is_file() and not (path / MODEL_FILE).is_file():
        return WhisperTokenizer.load(path)
    return Tokenizer.load(path)


def tokenizer_from_payload(data: dict[str, Any] | bytes) -> AnyTokenizer:
    """Rebuild a tokenizer from the plain data a checkpoint stores."""
    if isinstance(data, (bytes, bytearray)):
        return Tokenizer(bytes(data))
    if data.get("type") == "whisper":
        return WhisperTokenizer.from_payload(data)
    return Tokenizer(data["model"])
