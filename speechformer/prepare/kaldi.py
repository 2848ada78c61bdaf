"""Kaldi data directories <-> manifests.

A Kaldi data dir (``data/train/``) holds whitespace-separated ``KEY VALUE`` files:

* ``wav.scp``: ``RECORDING PATH`` (a file path; relative paths are resolved against
  ``--audio-root``, default the current folder, as Kaldi resolves them from the recipe folder);
* ``text``: ``UTTERANCE transcript ...``;
* ``segments`` (optional): ``UTTERANCE RECORDING START END`` in seconds (``END`` -1: to the end
  of the file); without it every recording is one utterance of the same id;
* ``utt2spk`` (optional): ``UTTERANCE SPEAKER``.

Reading gives one manifest row per utterance of ``text`` (sorted by id, as Kaldi sorts):
``offset`` = START and ``duration`` = END - START for segments, the header's duration for
whole files. A ``wav.scp`` entry that is a command (``sox x.sph -t wav - |``) is refused with
the line named: speechformer reads audio files, so run the command once into a file and list that.

Writing (:func:`write_kaldi_dir`) produces ``wav.scp`` (absolute paths), ``text``, ``utt2spk``,
``spk2utt``, ``utt2dur`` and, when any utterance is a segment (an offset, or several
utterances in one file), ``segments`` with times to the millisecond. An utterance without a
speaker is its own speaker (Kaldi's convention when speakers are unknown).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..data import Utterance
from . import PrepareError, durations, report_skipped


def _read_table(path: Path, min_fields: int = 2) -> dict[str, tuple[str, int]]:
    """``KEY rest-of-line`` -> {key: (rest, line number)}; duplicate keys are an error."""
    table: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            key, _, rest = line.partition(" ")
            rest = rest.strip()
            if min_fields > 1 and not rest:
                raise PrepareError(f"{path}:{lineno}: expected 'KEY VALUE', got {line!r}")
            if key in table:
                raise PrepareError(f"{path}:{lineno}: {key} listed twice (first on line {table[key][1]})")
            table[key] = (rest, lineno)
    return table


def _recording_path(value: str, where: str, audio_root: Path) -> Path:
    if value.endswith("|"):
        raise PrepareError(f"{where}: is a command pipe ({value!r}); speechformer reads audio files, not "
                           "commands: run the command once into a .wav file (drop the '|', add '> FILE.wav') "
                           "and list that file in wav.scp")
    path = Path(value)
    return path if path.is_absolute() else audio_root / path


def read_kaldi_dir(folder: str | Path, audio_root: str | Path | None = None, jobs: int = 0) -> list[Utterance]:
    """The utterances of a Kaldi data dir (see the module docstring), sorted by id."""
    folder = Path(folder)
    root = Path(audio_root) if audio_root is not None else Path.cwd()
    for name in ("wav.scp", "text"):
        if not (folder / name).is_file():
            raise PrepareError(f"{folder / name} not found; a Kaldi data dir needs wav.scp and text")
    wav_scp = _read_table(folder / "wav.scp")
    text = _read_table(folder / "text", min_fields=1)
    segments = _read_table(folder / "segments") if (folder / "segments").is_file() else None
    utt2spk = _read_table(folder / "utt2spk") if (folder / "utt2spk").is_file() else {}

    recordings = {rec: _recording_path(value, f"{folder / 'wav.scp'}:{lineno}", root)
                  for rec, (value, lineno) in wav_scp.items()}
    # which recording (and times) each utterance of `text` comes from
    plan: list[tuple[str, str, float, float | None, str]] = []  # utt, rec, start, end, where
    empty: list[str] = []
    for utt, (words, lineno) in sorted(text.items()):
        if not words:
            empty.append(utt)
            continue
        if segments is not None:
            if utt not in segments:
                raise PrepareError(f"{folder / 'text'}:{lineno}: {utt} has no line in {folder / 'segments'}")
            value, seg_line = segments[utt]
            where = f"{folder / 'segments'}:{seg_line}"
            fields = value.split()
            try:
                rec, start, end = fields[0], float(fields[1]), float(fields[2])
            except (IndexError, ValueError) as err:
                raise PrepareError(f"{where}: expected 'UTTERANCE RECORDING START END'") from err
            if start < 0 or (end != -1 and end <= start):
                raise PrepareError(f"{where}: bad times start={start} end={end}")
            plan.append((utt, rec, start, None if end == -1 else end, where))
        else:
            plan.append((utt, utt, 0.0, None, f"{folder / 'text'}:{lineno}"))
    report_skipped(f"of {folder / 'text'} with an empty transcript", empty)
    for utt, rec, _, _, where in plan:
        if rec not in recordings:
            raise PrepareError(f"{where}: recording {rec} of {utt} is not in {folder / 'wav.scp'}")

    used = sorted({rec for _, rec, _, _, _ in plan})
    secs = dict(zip(used, durations([recordings[r] for r in used], jobs,
                                    where=lambda i: f"{folder / 'wav.scp'}:{wav_scp[used[i]][1]}")))
    utts: list[Utterance] = []
    for utt, rec, start, end, where in plan:
        length = secs[rec]
        stop = length if end is None else end
        if stop > length + 0.01:
            raise PrepareError(f"{where}: segment ends at {stop:.3f} s, after the end of {recordings[rec]} "
                               f"({length:.3f} s)")
        stop = min(stop, length)
        if stop <= start:
            raise PrepareError(f"{where}: segment starts at {start:.3f} s, at or after the end of "
                               f"{recordings[rec]} ({length:.3f} s)")
        speaker = utt2spk[utt][0] if utt in utt2spk else ""
        utts.append(Utterance(utt, recordings[rec], round(stop - start, 3), " ".join(text[utt][0].split()),
                              speaker, round(start, 3)))
    if not utts:
        raise PrepareError(f"{folder / 'text'}: no utterance with a transcript")
    return utts


def _recording_ids(utts: Sequence[Utterance]) -> dict[Path, str]:
    """One id per audio file: its stem, made unique with -2, -3 ... in path order."""
    ids: dict[Path, str] = {}
    taken: set[str] = set()
    for audio in sorted({Path(u.audio).resolve() for u in utts}):
        base = "_".join(audio.stem.split()) or "rec"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        ids[audio] = name
    return ids


def write_kaldi_dir(utts: Sequence[Utterance], folder: str | Path) -> Path:
    """Write ``utts`` as a Kaldi data dir (see the module docstring); return the folder."""
    folder = Path(folder)
    for u in utts:
        if not u.id or any(c.isspace() for c in u.id) or any(c.isspace() for c in u.speaker):
            raise PrepareError(f"utterance {u.id!r} (speaker {u.speaker!r}): Kaldi ids cannot contain whitespace")
    by_audio: dict[Path, int] = defaultdict(int)
    for u in utts:
        by_audio[Path(u.audio).resolve()] += 1
    segmented = any(u.offset for u in utts) or any(n > 1 for n in by_audio.values())
    rec_ids = _recording_ids(utts) if segmented else {Path(u.audio).resolve(): u.id for u in utts}
    ordered = sorted(utts, key=lambda u: u.id)
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, lines: list[str]) -> None:
        (folder / name).write_text("".join(line + "\n" for line in sorted(lines)), encoding="utf-8")

    write("wav.scp", [f"{rec} {audio.as_posix()}" for audio, rec in rec_ids.items()])
    write("text", [f"{u.id} {' '.join(u.text.split())}" for u in ordered])
    spk = {u.id: u.speaker or u.id for u in ordered}
    write("utt2spk", [f"{uid} {s}" for uid, s in spk.items()])
    spk2utt: dict[str, list[str]] = defaultdict(list)
    for uid, s in spk.items():
        spk2utt[s].append(uid)
    write("spk2utt", [f"{s} {' '.join(sorted(ids))}" for s, ids in spk2utt.items()])
    write("utt2dur", [f"{u.id} {u.duration:.3f}" for u in ordered])
    segments = folder / "segments"
    if segmented:
        write("segments", [f"{u.id} {rec_ids[Path(u.audio).resolve()]} {u.offset:.3f} {u.offset + u.duration:.3f}"
                           for u in ordered])
    elif segments.exists():
        segments.unlink()  # a stale one would turn whole files into segments
    return folder
