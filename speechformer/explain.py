"""See inside the transformer: what one utterance looks like on its way to text.

``speechformer explain --model M AUDIO --out DIR`` writes, for one utterance:

* ``spectrogram.png``: the log-mel frames the encoder reads;
* ``cross_attention_layer{i}.png`` / ``.npy``: for each decoder layer, each output token's
  cross-attention over the encoder frames (heads averaged), ``[tokens, frames]``;
* ``cross_attention_best_head.png`` / ``.npy``: the single head that aligns tokens to frames
  best (sharp and in order, see :func:`alignment_scores`), and ``cross_attention_heads.npy`` with every head,
  ``[layers, heads, tokens, frames]``;
* ``encoder_attention_layer{L}.png`` / ``.npy``: the encoder's self-attention maps of one
  layer, ``[heads, frames, frames]``;
* ``candidates.json``: at each decoding step, the top next-token candidates with their
  softmax probabilities;
* ``explain.json`` (what was found, shapes, file names) and ``index.html``, which puts it
  all together with the transcript.

How: the utterance is encoded once, greedy decoding (:func:`~speechformer.decoding.greedy_decode`,
as ``transcribe --beam-size 1``) gives the tokens, and one teacher-forced pass of the decoder
over prompt + tokens gives, at every position, the next-token probabilities and the attention
weights. The weights come from :func:`~speechformer.model.capture_attention`, which makes chosen
:class:`~speechformer.model.MultiHeadAttention` modules use the written-out formula
(:func:`~speechformer.model.attention`) while it is open and keep what it computed; the normal
path (fused ``scaled_dot_product_attention``) is not touched and costs nothing extra.

Output token *i* is drawn with the attention of the decoder position that *predicts* it
(the position reading token *i - 1*), as openai-whisper's word timings do: that is what the
decoder was looking at when it chose the token. For Whisper the encoder always sees 30 s
of frames; only the frames that cover the audio are kept here (``explain.json`` reports how
much attention fell past them).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .audio import load_audio
from .decoding import apply_filters, greedy_decode, logit_filters
from .model import SpeechTransformer, capture_attention
from .atomic import atomic_write_text
from .options import TranscribeOptions, tokenizer_for
from .transcribe import ModelBundle, load_model

# ---------------------------------------------------------------------------- analysis
@dataclass
class Explanation:
    """Everything ``explain`` found for one utterance (arrays as numpy, on the CPU)."""

    transcript: str
    tokens: list[int]  # the output tokens: the transcript's tokens, then the end token
    pieces: list[str]  # the tokenizer's piece for each output token
    prompt: list[int]
    spectrogram: np.ndarray  # [frames, n_mels] log-mel (Whisper: its features, the audio's frames only)
    frame_seconds: float  # seconds per spectrogram frame
    encoder_frame_seconds: float  # seconds per encoder frame (after subsampling)
    cross: np.ndarray  # [decoder layers, heads, tokens, encoder frames]
    encoder_layer: int
    encoder: np.ndarray  # [heads, encoder frames, encoder frames]
    probs: np.ndarray  # [tokens]: probability of each chosen token
    top: list[list[tuple[int, str, float]]]  # per step: (id, piece, probability), best first
    best_head: tuple[int, int]  # (decoder layer, head) that aligns best
    head_scores: np.ndarray  # [layers, heads], see alignment_scores
    spoken: list[int] = field(default_factory=list)  # token rows with a sound of their own (scored)
    outside_mass: float = 0.0  # Whisper: mean cross-attention mass on frames past the audio
    agrees_with_greedy: bool = True  # teacher-forced argmax == greedy's token at every transcript step
    ended_by_length_cap: bool = False  # greedy stopped at its length cap, not on the end token
    duration: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


def alignment_scores(cross: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
    """How well each head aligns tokens to frames: ``[layers, heads]``, in [0, 1], higher is better.

    The score is *sharpness* times *order*, over the token rows ``rows`` (default all; callers
    pass the spoken tokens: the end token and punctuation have no sound of their own):

    * sharpness: the mean, over tokens, of the largest attention weight (1.0 = each token
      looks at a single frame);
    * order: Kendall's tau-a between token index and the frame of the token's peak: +1 when
      later tokens always peak later, 0 for no relation. It rules out the sharp heads that
      align nothing, such as an "attention sink" that puts every token on the same frame
      (tau 0: its peaks are all tied).
    """
    layers, heads, tokens, frames = cross.shape
    text = cross if rows is None else cross[:, :, list(rows)]
    n = text.shape[2]
    if n == 0 or frames == 0:
        return np.zeros((layers, heads))
    sharpness = text.max(-1).mean(-1)
    if n == 1:
        return sharpness
    peaks = text.argmax(-1)  # [layers, heads, n]
    later = np.sign(peaks[..., None, :] - peaks[..., :, None])  # [.., i, j]: sign(peak_j - peak_i)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)  # pairs i < j
    tau = later[..., upper].sum(-1) / upper.sum()
    return sharpness * np.clip(tau, 0.0, None)


def backward_jumps(peaks: Sequence[int] | np.ndarray) -> np.ndarray:
    """How far each peak lies behind the latest peak before it (0 when it does not go back)."""
    peaks = np.asarray(peaks)
    if peaks.size == 0:
        return peaks
    return np.maximum.accumulate(peaks) - peaks


def peak_frames(attention: np.ndarray) -> np.ndarray:
    """The frame each token attends to most, ``[tokens]`` from ``[tokens, frames]``."""
    return attention.argmax(-1)


WORD_MARKS = ("\u2581", "\u0120", " ")  # a piece that starts a word: sentencepiece's ▁, byte-level BPE's Ġ


def word_groups(pieces: Sequence[str], rows: Sequence[int]) -> list[list[int]]:
    """The token rows ``rows`` (in order; callers pass the spoken ones) grouped into words.

    A piece that begins with a word mark starts a word, any other piece continues the word
    before it (in "don't" the apostrophe is not spoken, so "t" joins "don")."""
    words: list[list[int]] = []
    for row in rows:
        if not words or pieces[row].startswith(WORD_MARKS):
            words.append([row])
        else:
            words[-1].append(row)
    return words


def word_peaks(attention: np.ndarray, words: Sequence[Sequence[int]]) -> np.ndarray:
    """The frame each word attends to most: the attention of its pieces summed, ``[words]``.

    A head that aligns looks at a word's stretch of audio while it writes the word's pieces,
    but which frame *inside* that stretch is highest varies from piece to piece (a piece's own
    peak can fall a few frames before the previous piece's); summed over the word, the peak is
    the word's place."""
    return np.array([int(attention[list(w)].sum(0).argmax()) for w in words], dtype=np.int64)


@torch.inference_mode()
def explain_waveform(bundle: ModelBundle, wav: Tensor, encoder_layer: int = -1, top_k: int = 5,
                     options: TranscribeOptions | None = None) -> Explanation:
    """Encode one waveform, decode it greedily (``options.decode``'s length limits, ``options``'
    language and task; default: the model's), and collect what the model looked at."""
    model: SpeechTransformer = bundle.model.eval()
    options = bundle.default_options() if options is None else options
    options.check(bundle)
    tokenizer = tokenizer_for(options, bundle.tokenizer)
    c = model.config
    n_enc_layers = len(model.encoder_layers)
    if not -n_enc_layers <= encoder_layer < n_enc_layers:
        raise ValueError(f"--encoder-layer {encoder_layer}: this model has {n_enc_layers} encoder layers "
                         f"(0..{n_enc_layers - 1}, or -1 for the last)")
    encoder_layer %= n_enc_layers
    device = next(model.parameters()).device
    wav = wav.to(device)[None]
    lengths = torch.tensor([wav.shape[1]], device=device)
    whisper = c.is_whisper

    with capture_attention([model.encoder_layers[encoder_layer].attn]) as enc_maps:
        memory, mem_lengths = model.encode(wav, lengths)
    hop = model.frontend.hop_length
    spec, frames = model.frontend.log_mel(wav, lengths)
    if whisper:  # the audio's frames of the 30 s window, and the encoder frames covering them
        n_spec = max(1, wav.shape[1] // hop)
        n_enc = min(int(mem_lengths[0]), math.ceil(n_spec / c.subsampling_factor))
    else:
        n_spec = int(frames[0])
        n_enc = int(mem_lengths[0])
    spectrogram = spec[0, :n_spec].float().cpu().numpy()

    rules = tokenizer.rules()
    hyp = greedy_decode(model, memory, mem_lengths, options.decode, rules)[0]
    out_tokens = hyp.tokens + [rules.eos_id]
    prompt = list(rules.prompt)
    dec_in = torch.tensor([prompt + hyp.tokens], device=device)
    mask = model.memory_mask(mem_lengths, memory.shape[1])
    cross_modules = [layer.cross_attn for layer in model.decoder_layers]
    with capture_attention(cross_modules) as cross_maps:
        logits = model.decode(dec_in, memory, mask)
    p = len(prompt)
    rows = slice(p - 1, p - 1 + len(out_tokens))  # the positions that predict each output token
    # the probabilities decoding chose from: each position's logits through decoding's own filters
    filters = logit_filters(rules, c.vocab_size, device)
    emitted = torch.tensor([hyp.tokens], dtype=torch.long, device=device)
    step_logits = torch.cat([apply_filters(filters, logits[0, p - 1 + i:p + i], emitted[:, :i], i)
                             for i in range(len(out_tokens))])
    probs = step_logits.softmax(-1)
    chosen = torch.tensor(out_tokens, device=device)
    top_p, top_id = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    top = [[(int(i), _piece(tokenizer, int(i)), float(q)) for i, q in zip(ids, ps)]
           for ids, ps in zip(top_id.tolist(), top_p.tolist())]

    full = torch.stack([m[0][0, :, rows] for m in cross_maps])  # [layers, heads, tokens, all frames]
    cross = full[..., :n_enc]
    outside = float(full[..., n_enc:].sum(-1).mean()) if full.shape[-1] > n_enc else 0.0
    cross_np = cross.cpu().numpy()
    # the tokens that stand for sound: letters or digits (not the end token, not punctuation)
    spoken = [i for i, t in enumerate(hyp.tokens) if any(ch.isalnum() for ch in tokenizer.decode([t]))]
    scores = alignment_scores(cross_np, spoken)
    best = np.unravel_index(int(scores.argmax()), scores.shape)
    encoder = enc_maps[0][0][0, :, :n_enc, :n_enc].cpu().numpy()
    return Explanation(
        transcript=tokenizer.decode(hyp.tokens), tokens=out_tokens,
        pieces=[_piece(tokenizer, t) for t in out_tokens], prompt=prompt,
        spectrogram=spectrogram, frame_seconds=hop / c.sample_rate,
        encoder_frame_seconds=hop * c.subsampling_factor / c.sample_rate,
        cross=cross_np, encoder_layer=encoder_layer, encoder=encoder,
        probs=probs.gather(1, chosen[:, None])[:, 0].cpu().numpy(), top=top,
        best_head=(int(best[0]), int(best[1])), head_scores=scores, spoken=spoken, outside_mass=outside,
        agrees_with_greedy=bool((probs[:-1].argmax(-1) == chosen[:-1]).all()),
        ended_by_length_cap=int(probs[-1].argmax()) != rules.eos_id,
        duration=wav.shape[1] / c.sample_rate,
    )


def _piece(tokenizer: Any, token: int) -> str:
    return str(tokenizer.pieces([token])[0])


# ---------------------------------------------------------------------------- files
def write_explanation(exp: Explanation, out_dir: str | Path, title: str = "utterance") -> dict[str, Path]:
    """Write the figures, arrays, JSON files and index.html; returns {name: path}."""
    from .plot import pyplot

    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    n_layers, n_heads, n_tokens, n_frames = exp.cross.shape
    labels = exp.pieces
    enc_seconds = n_frames * exp.encoder_frame_seconds

    def save_npy(name: str, array: np.ndarray) -> None:
        files[name] = out / name
        np.save(files[name], array.astype(np.float32))

    def save_png(name: str, fig: Any) -> None:
        files[name] = out / name
        fig.savefig(files[name], dpi=100)
        plt.close(fig)

    # the spectrogram
    fig, ax = plt.subplots(figsize=(10, 3), layout="constrained")
    _draw_spectrogram(ax, exp)
    ax.set_title(f"log-mel spectrogram ({exp.spectrogram.shape[0]} frames x {exp.spectrogram.shape[1]} mel bins)")
    save_png("spectrogram.png", fig)

    # cross-attention: per layer (heads averaged), every head, the best-aligned head
    save_npy("cross_attention_heads.npy", exp.cross)
    for layer in range(n_layers):
        mean = exp.cross[layer].mean(0)
        save_npy(f"cross_attention_layer{layer}.npy", mean)
        save_png(f"cross_attention_layer{layer}.png",
                 _alignment_figure(plt, exp, mean, f"decoder layer {layer}: cross-attention, "
                                   f"{n_heads} heads averaged", enc_seconds, labels))
    bl, bh = exp.best_head
    save_npy("cross_attention_best_head.npy", exp.cross[bl, bh])
    save_png("cross_attention_best_head.png",
             _alignment_figure(plt, exp, exp.cross[bl, bh], f"best-aligned head: decoder layer {bl}, head {bh} "
                               f"(score {exp.head_scores[bl, bh]:.2f})", enc_seconds, labels))

    # encoder self-attention of one layer: each head and their mean
    el = exp.encoder_layer
    save_npy(f"encoder_attention_layer{el}.npy", exp.encoder)
    panels = [exp.encoder.mean(0)] + list(exp.encoder)
    names = ["heads averaged"] + [f"head {h}" for h in range(len(exp.encoder))]
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), layout="constrained", squeeze=False)
    for ax, panel, name in zip(axes.flat, panels, names):
        ax.imshow(panel, origin="lower", aspect="auto", cmap="magma",
                  extent=(0, enc_seconds, 0, enc_seconds), interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("key frame (s)")
        ax.set_ylabel("query frame (s)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"encoder layer {el}: self-attention ({n_frames} x {n_frames} frames)")
    save_png(f"encoder_attention_layer{el}.png", fig)

    # next-token candidates
    steps = [{"step": i, "token": t, "piece": piece, "p": round(float(p), 6),
              "top": [{"token": tid, "piece": tp, "p": round(q, 6)} for tid, tp, q in top]}
             for i, (t, piece, p, top) in enumerate(zip(exp.tokens, exp.pieces, exp.probs, exp.top))]
    files["candidates.json"] = out / "candidates.json"
    atomic_write_text(files["candidates.json"], json.dumps(steps, indent=1, ensure_ascii=False) + "\n")

    words = word_groups(exp.pieces, exp.spoken)  # token rows of each spoken word
    summary = {
        "title": title, "transcript": exp.transcript, "duration": round(exp.duration, 3),
        "prompt": exp.prompt, "tokens": exp.tokens, "pieces": exp.pieces,
        "spectrogram_frames": int(exp.spectrogram.shape[0]), "n_mels": int(exp.spectrogram.shape[1]),
        "frame_seconds": exp.frame_seconds, "encoder_frames": n_frames,
        "encoder_frame_seconds": exp.encoder_frame_seconds,
        "decoder_layers": n_layers, "heads": n_heads, "encoder_layer": el,
        "best_head": {"layer": bl, "head": bh, "score": round(float(exp.head_scores[bl, bh]), 4)},
        "head_scores": np.round(exp.head_scores, 4).tolist(),
        "best_head_peaks": peak_frames(exp.cross[bl, bh]).tolist(),
        "spoken_tokens": exp.spoken,
        "words": words, "best_head_word_peaks": word_peaks(exp.cross[bl, bh], words).tolist(),
        "attention_past_audio": round(exp.outside_mass, 4),
        "teacher_forced_argmax_equals_greedy": exp.agrees_with_greedy,
        "ended_by_length_cap": exp.ended_by_length_cap,
        "files": sorted(files) + ["explain.json", "index.html"],
        **exp.meta,
    }
    files["explain.json"] = out / "explain.json"
    atomic_write_text(files["explain.json"], json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    files["index.html"] = out / "index.html"
    atomic_write_text(files["index.html"], _index_html(exp, summary, steps, files))
    return files


def word_attention(exp: Explanation) -> tuple[list[str], np.ndarray]:
    """The best-aligned head's attention word by word: each spoken word's label (its pieces
    joined, word marks dropped) and its pieces' attention summed, ``[words, encoder frames]``."""
    bl, bh = exp.best_head
    groups = word_groups(exp.pieces, exp.spoken)
    attention = exp.cross[bl, bh]
    labels = ["".join(exp.pieces[r] for r in g).lstrip("".join(WORD_MARKS)) for g in groups]
    rows = [attention[g].sum(0) for g in groups]
    return labels, (np.stack(rows) if rows else np.zeros((0, attention.shape[-1]), dtype=attention.dtype))


def best_head_word_png(exp: Explanation) -> bytes:
    """The spectrogram with the best-aligned head over it, one row per spoken word, as PNG
    bytes: the server's "look inside" view (``POST /v1/speechformer/explain``)."""
    import io

    from .plot import pyplot

    plt = pyplot()
    labels, attention = word_attention(exp)
    bl, bh = exp.best_head
    enc_seconds = exp.cross.shape[-1] * exp.encoder_frame_seconds
    fig = _alignment_figure(plt, exp, attention, f"best-aligned cross-attention head (decoder layer {bl}, head {bh},"
                            f" score {exp.head_scores[bl, bh]:.2f}), word by word", enc_seconds, labels)
    fig.axes[1].set_ylabel("word")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _draw_spectrogram(ax: Any, exp: Explanation) -> None:
    seconds = exp.spectrogram.shape[0] * exp.frame_seconds
    ax.imshow(exp.spectrogram.T, origin="lower", aspect="auto", cmap="viridis",
              extent=(0, seconds, 0, exp.spectrogram.shape[1]), interpolation="nearest")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")


def _alignment_figure(plt: Any, exp: Explanation, attention: np.ndarray, title: str, enc_seconds: float,
                      labels: list[str]) -> Any:
    """The spectrogram on top, each output token's attention over the frames below, same time axis."""
    n_tokens = attention.shape[0]
    height = 2.0 + max(2.0, 0.22 * n_tokens)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, height), sharex=True, layout="constrained",
                                      gridspec_kw={"height_ratios": [2.0, max(2.0, 0.22 * n_tokens)]})
    _draw_spectrogram(top, exp)
    top.set_xlabel("")
    bottom.imshow(attention, aspect="auto", cmap="Greys", interpolation="nearest",
                  extent=(0, enc_seconds, n_tokens - 0.5, -0.5))
    peaks = (attention.argmax(-1) + 0.5) * exp.encoder_frame_seconds
    bottom.plot(peaks, np.arange(n_tokens), ".", color="tab:red", markersize=4, label="peak")
    bottom.set_yticks(range(n_tokens))
    bottom.set_yticklabels(labels, fontsize=7)
    bottom.set_xlim(0, max(enc_seconds, exp.spectrogram.shape[0] * exp.frame_seconds))
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("output token")
    top.set_title(title)
    return fig


def _index_html(exp: Explanation, summary: dict[str, Any], steps: list[dict[str, Any]],
                files: dict[str, Path]) -> str:
    e = html.escape
    bl, bh = exp.best_head
    n_layers = exp.cross.shape[0]
    figures = [("spectrogram.png", "The log-mel spectrogram: what the encoder reads."),
               ("cross_attention_best_head.png",
                f"The best-aligned cross-attention head (decoder layer {bl}, head {bh}; score = sharpness x order, "
                "see explain.json): for each output token (rows), where in the audio the decoder looked when it "
                "chose that token. Red dots: each token's peak.")]
    figures += [(f"cross_attention_layer{i}.png", f"Decoder layer {i}: cross-attention, heads averaged.")
                for i in range(n_layers)]
    figures += [(f"encoder_attention_layer{exp.encoder_layer}.png",
                 f"Encoder layer {exp.encoder_layer}: self-attention, each frame (rows) over all frames.")]
    rows = []
    for s in steps:
        cands = " ".join(f"<span class='{'hit' if c['token'] == s['token'] else ''}'>{e(c['piece'])} "
                         f"{c['p']:.3f}</span>" for c in s["top"])
        rows.append(f"<tr><td>{s['step']}</td><td><code>{e(s['piece'])}</code></td><td>{s['p']:.3f}</td>"
                    f"<td>{cands}</td></tr>")
    data = [n for n in sorted(files) if not n.endswith(".png") and n != "index.html"]
    past = (f"<p>Whisper reads 30 s windows: {summary['attention_past_audio']:.1%} of the cross-attention "
            "(mean over tokens, layers and heads) fell on frames past the audio; the maps show the audio's "
            "frames only.</p>" if exp.outside_mass else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>speechformer explain: {e(summary['title'])}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 90%; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
.hit {{ font-weight: bold; color: #b00; }}
</style></head><body>
<h1>{e(summary['title'])}</h1>
<p><b>Transcript (greedy):</b> {e(exp.transcript) or '<i>(empty)</i>'}</p>
<p>{summary['duration']:.2f} s of audio, {summary['spectrogram_frames']} spectrogram frames
({exp.frame_seconds * 1000:.0f} ms apart), {summary['encoder_frames']} encoder frames
({exp.encoder_frame_seconds * 1000:.0f} ms apart), {len(exp.tokens)} output tokens (the end token included).</p>
{past}
{''.join(f'<h2>{e(name)}</h2><p>{e(text)}</p><img src="{e(name)}" alt="{e(name)}">' for name, text in figures)}
<h2>Next-token candidates</h2>
<p>At each step, the most likely next tokens and their softmax probabilities (after the tokens
decoding never emits are removed); the chosen token in red. (<a href="candidates.json">candidates.json</a>)</p>
<table><tr><th>step</th><th>token</th><th>p</th><th>top candidates</th></tr>
{chr(10).join(rows)}
</table>
<h2>Data</h2>
<ul>{''.join(f'<li><a href="{e(n)}">{e(n)}</a></li>' for n in data)}</ul>
</body></html>
"""


def explain(model_path: str | Path, audio: str | Path, out_dir: str | Path, encoder_layer: int = -1,
            top_k: int = 5, device: str | None = None, **overrides: Any) -> dict[str, Path]:
    """The ``speechformer explain`` command: load, analyse one utterance, write ``out_dir``.
    ``overrides`` are options by name (``max_len=20``, ``language="de"``) over the model's defaults."""
    from .plot import pyplot

    pyplot()  # fail now, not after the model has run, if matplotlib is missing
    bundle = load_model(model_path, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = bundle.default_options(**overrides)
    c = bundle.model.config
    wav = load_audio(audio, c.sample_rate)
    seconds = len(wav) / c.sample_rate
    limit = bundle.window_seconds
    if seconds > limit:
        raise ValueError(f"{audio}: {seconds:.1f} s is longer than one window of this model ({limit:.1f} s); "
                         "explain shows one utterance: cut the file first")
    exp = explain_waveform(bundle, wav, encoder_layer, top_k, options)
    exp.meta = {"model": str(model_path), "audio": str(audio)}
    return write_explanation(exp, out_dir, title=Path(audio).name)
