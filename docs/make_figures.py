#!/usr/bin/env python3
"""Regenerate every figure of docs/transformers-from-scratch.md from speechformer's own code.

    python docs/make_figures.py                 # trains a tiny model first (a few minutes on CPU)
    python docs/make_figures.py --model exp/model   # or use a trained model (export dir or .ckpt)

Offline: the corpus is spoken by eSpeak NG (``data_prep/synthetic.py``), the model is
trained here with the toolkit's own Lightning module. The tiny model learns to read
random digit sequences ("seven two nine four"): with no grammar to lean on, the decoder
must look at the audio in order, so its cross-attention learns a clear alignment within
a couple of minutes of CPU. Every figure name is in ``FIGURES``; the tests check the doc
references only those.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIGITS = "zero one two three four five six seven eight nine".split()


def load_synthetic():
    """``data_prep/synthetic.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("data_prep_synthetic", ROOT / "data_prep" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def digit_corpus(out: Path, num_train: int = 200, num_test: int = 8, seed: int = 0, words: tuple[int, int] = (2, 5),
                 rate: tuple[int, int] = (170, 210)) -> Path:
    """Random sequences of ``words`` spoken digits, one voice: ``out/{train,test}.jsonl``.

    Raises ``synthetic.EspeakUnavailable`` when eSpeak NG is missing."""
    syn = load_synthetic()
    kind = syn.find_backend()
    stamp = [num_train, num_test, seed, list(words), list(rate)]
    if (out / "test.jsonl").is_file() and (out / "stamp.json").is_file() and \
            json.loads((out / "stamp.json").read_text()) == stamp:
        return out
    rng = random.Random(seed)
    plans = []
    for split, count in (("train", num_train), ("test", num_test)):
        (out / "wavs" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            text = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(*words)))
            plans.append(syn.UtterancePlan(
                split=split, utt_id=f"{split}_{i:05d}", text=text, spoken=text, voice="en-us", variant="m1",
                rate=rng.randint(*rate), pitch=50, lead_s=round(rng.uniform(0.05, 0.2), 3),
                trail_s=round(rng.uniform(0.05, 0.2), 3), noise="white", snr_db=30.0, peak=0.8,
                noise_seed=rng.getrandbits(32)))
    samples = syn.render_all(plans, kind, out)
    for split in ("train", "test"):
        rows = [{"id": p.utt_id, "audio": p.audio, "duration": round(samples[p.utt_id] / 16000, 3),
                 "text": p.text, "speaker": p.speaker} for p in plans if p.split == split]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "stamp.json").write_text(json.dumps(stamp))
    return out


def train_tiny_model(corpus: Path, exp: Path, epochs: int = 30, seed: int = 0) -> Path:
    """Train a tiny transformer on the digit corpus; returns the exported model folder.

    Sized for alignment per CPU-second: one decoder layer, small batches (many updates), CTC
    weight 0.5 (it teaches the encoder to localise each word, which the cross-attention then
    finds). Measured on the 8 test utterances: after 18 epochs one utterance's best head still
    stepped back 11 frames; after 30 (about 8 minutes on 2 busy CPU cores) none stepped back more
    than 3, though only 5 of 8 transcripts were right."""
    import lightning as L

    from speechformer.data import SpeechDataModule, read_manifest
    from speechformer.lightning import SpeechModule
    from speechformer.model import ModelConfig
    from speechformer.tokenizer import train_tokenizer
    from speechformer.transcribe import export_model, load_model

    train = corpus / "train.jsonl"
    train_tokenizer([u.text for u in read_manifest(train)], 48, exp / "tokenizer")
    L.seed_everything(seed, verbose=False)
    config = ModelConfig(d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=1,
                         subsampling_channels=16, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0,
                         ctc_weight=0.5, label_smoothing=0.0)
    module = SpeechModule(model=config, tokenizer=str(exp / "tokenizer"), lr=4e-3, warmup_steps=30)
    data = SpeechDataModule(train_manifest=str(train), valid_manifest=str(corpus / "test.jsonl"),
                            tokenizer=str(exp / "tokenizer"), max_batch_seconds=8.0, num_workers=0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(exp), use_distributed_sampler=False, gradient_clip_val=5.0,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    ckpt = exp / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    return export_model(load_model(ckpt), exp / "model")


def speak(text: str, out: Path, seed: int = 1) -> Path:
    """One utterance of ``text`` by eSpeak NG (the synthetic corpus's held-out voice) as a wav file."""
    import soundfile

    syn = load_synthetic()
    backend = syn.make_backend(syn.find_backend())
    plan = syn.UtterancePlan(split="test", utt_id="figure", text=text, spoken=text, voice=syn.HELD_OUT[0],
                             variant=syn.HELD_OUT[1], rate=180, pitch=50, lead_s=0.15, trail_s=0.15, noise="white",
                             snr_db=35.0, peak=0.8, noise_seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(out, syn.render(plan, backend), syn.SAMPLE_RATE, subtype="PCM_16")
    return out


def corpus_sentences(n: int = 3000, seed: int = 0) -> list[str]:
    """Transcripts of the synthetic corpus's grammar (text only: no audio needed for BPE)."""
    gen = load_synthetic().SentenceGenerator(seed)
    return [gen.next()[0] for _ in range(n)]


# ---------------------------------------------------------------------------- the figures
FIGURES = {
    "one_hot_embedding.png": "one-hot rows times the embedding table (TokenEmbedding.forward)",
    "matmul_lookup.png": "attention with one-hot queries and keys is a table lookup (attention)",
    "bigram.png": "a first-order sequence model: word-to-next-word probabilities in the corpus",
    "causal_mask.png": "the causal mask and a trained decoder's masked self-attention",
    "attention_qk.png": "QK^T / sqrt(d), then softmax: one encoder head's scores and weights",
    "positional_encoding.png": "sinusoids: the position table and position-to-position dot products",
    "softmax_candidates.png": "de-embedding + softmax: next-token probabilities at each step",
    "multi_head.png": "every cross-attention head of one decoder layer",
    "skip_connections.png": "how much each block adds to the residual stream",
    "layer_norm.png": "a frame vector before and after LayerNorm",
    "stacks.png": "encoder self-attention, layer by layer (heads averaged)",
    "cross_attention.png": "the best-aligned cross-attention head over the spectrogram",
    "bpe_merges.png": "one sentence split by BPE tokenizers of growing vocabulary, learnt from the corpus",
    "log_mel.png": "waveform and log-mel frames (LogMelFrontend.log_mel)",
}


def make_figures(model_dir: Path, audio: Path, out: Path, work: Path) -> list[Path]:
    """Draw every figure of ``FIGURES`` into ``out`` with ``model_dir`` explaining ``audio``."""
    import numpy as np
    import torch

    from speechformer.audio import load_audio
    from speechformer.explain import _alignment_figure, explain_waveform
    from speechformer.model import attention, capture_attention, causal_mask, sinusoids
    from speechformer.plot import pyplot
    from speechformer.tokenizer import train_tokenizer
    from speechformer.transcribe import load_model

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_model(model_dir)
    model, tok = bundle.model.eval(), bundle.tokenizer
    c = model.config
    wav = load_audio(audio, c.sample_rate)
    exp = explain_waveform(bundle, wav)
    written: list[Path] = []

    def save(name: str, fig) -> None:  # type: ignore[no-untyped-def]
        assert name in FIGURES, name
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        written.append(out / name)

    # one-hot rows times the embedding table = the embedding rows
    ids = exp.tokens[:8]
    one_hot = torch.nn.functional.one_hot(torch.tensor(ids), c.vocab_size).float()
    table = model.embedding.weight.detach()
    looked_up = model.embedding(torch.tensor(ids)).detach() / model.embedding.scale
    assert torch.allclose(one_hot @ table, looked_up, atol=1e-6)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), layout="constrained",
                             gridspec_kw={"width_ratios": [3, 1, 1]})
    axes[0].imshow(one_hot, cmap="Greys", aspect="auto", interpolation="nearest")
    axes[0].set_title(f"one-hot tokens [{len(ids)} x vocab {c.vocab_size}]")
    axes[0].set_yticks(range(len(ids)), exp.pieces[:8], fontsize=7)
    axes[1].imshow(table[:, :24], cmap="RdBu", aspect="auto", interpolation="nearest")
    axes[1].set_title("table [vocab x d]\n(first 24 dims)", fontsize=9)
    axes[2].imshow(looked_up[:, :24], cmap="RdBu", aspect="auto", interpolation="nearest")
    axes[2].set_title("one-hot @ table\n= looked-up rows", fontsize=9)
    save("one_hot_embedding.png", fig)

    # attention with one-hot queries/keys is a lookup of value rows
    g = torch.Generator().manual_seed(0)
    keys = torch.eye(6) * 8.0
    queries = keys[torch.tensor([2, 0, 5, 2])]
    values = torch.randn(6, 4, generator=g)
    y, w = attention(queries, keys, values)
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.8), layout="constrained")
    for ax, mat, title in zip(axes, (queries, keys, w, y), ("queries Q (one-hot x 8)", "keys K", "softmax(QK^T/sqrt d)",
                                                            "output = weights @ V")):
        ax.imshow(mat, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
    save("matmul_lookup.png", fig)

    # a first-order (Markov) model of the corpus's words
    sentences = corpus_sentences(2000)
    counts: dict[str, dict[str, int]] = {}
    for s in sentences:
        words = ["<s>"] + s.split() + ["</s>"]
        for a, b in zip(words, words[1:]):
            counts.setdefault(a, {}).setdefault(b, 0)
            counts[a][b] += 1
    common = sorted(counts, key=lambda w: -sum(counts[w].values()))[:16]
    mat = np.array([[counts.get(a, {}).get(b, 0) for b in common] for a in common], dtype=float)
    mat /= np.maximum(1, np.array([sum(counts[a].values()) for a in common]))[:, None]
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    ax.imshow(mat, cmap="Blues", interpolation="nearest")
    ax.set_xticks(range(len(common)), common, rotation=90, fontsize=7)
    ax.set_yticks(range(len(common)), common, fontsize=7)
    ax.set_xlabel("next word")
    ax.set_ylabel("word")
    ax.set_title("P(next word | word), 2,000 corpus sentences")
    save("bigram.png", fig)

    # causal mask and a trained decoder's self-attention (captured)
    memory, mem_lengths = model.encode(wav[None], torch.tensor([len(wav)]))
    dec_in = torch.tensor([exp.prompt + exp.tokens[:-1]])
    with torch.no_grad(), capture_attention([model.decoder_layers[0].self_attn]) as maps:
        model.decode(dec_in, memory, None)
    self_attn = maps[0][0][0].mean(0).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
    axes[0].imshow(causal_mask(12).numpy(), cmap="Greys", interpolation="nearest")
    axes[0].set_title("causal_mask(12): query t may read keys <= t")
    axes[1].imshow(self_attn, cmap="magma", interpolation="nearest")
    axes[1].set_title("decoder layer 0 self-attention (heads averaged)")
    for ax in axes:
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    save("causal_mask.png", fig)

    # QK^T / sqrt(d) and softmax for one encoder head (the last layer)
    layer = model.encoder_layers[-1]
    inputs = []
    hook = layer.attn.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
    with torch.no_grad():
        model.encode(wav[None], torch.tensor([len(wav)]))
    hook.remove()
    x = inputs[0]
    q = layer.attn._split(layer.attn.query(x))[0, 0]
    k = layer.attn._split(layer.attn.key(x))[0, 0]
    scores = (q @ k.T / q.shape[-1] ** 0.5).detach().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
    axes[0].imshow(scores, cmap="RdBu_r", interpolation="nearest")
    axes[0].set_title("scores QK^T / sqrt(d), encoder head 0")
    axes[1].imshow(exp.encoder[0], cmap="magma", interpolation="nearest", origin="upper")
    axes[1].set_title("softmax over each row = attention weights")
    for ax in axes:
        ax.set_xlabel("key frame")
        ax.set_ylabel("query frame")
    save("attention_qk.png", fig)

    # sinusoidal positions
    table = sinusoids(100, c.d_model).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    axes[0].imshow(table, cmap="RdBu", aspect="auto", interpolation="nearest")
    axes[0].set_title(f"sinusoids(100, {c.d_model}): sin | cos halves")
    axes[0].set_xlabel("channel")
    axes[0].set_ylabel("position")
    axes[1].imshow(table @ table.T, cmap="viridis", interpolation="nearest")
    axes[1].set_title("dot product of positions: near = similar")
    axes[1].set_xlabel("position")
    save("positional_encoding.png", fig)

    # next-token probabilities at each step
    steps = min(len(exp.top), 6)
    fig, axes = plt.subplots(1, steps, figsize=(2.2 * steps, 2.8), layout="constrained", squeeze=False)
    for i, ax in enumerate(axes[0]):
        cand = exp.top[i]
        ax.barh(range(len(cand)), [p for *_, p in cand], color=["tab:red" if t == exp.tokens[i] else "tab:grey"
                                                               for t, *_ in cand])
        ax.set_yticks(range(len(cand)), [piece for _, piece, _ in cand], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"step {i}", fontsize=9)
    save("softmax_candidates.png", fig)

    # every head of one decoder layer
    bl, _ = exp.best_head
    heads = exp.cross[bl]
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), layout="constrained", squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= len(heads):
            ax.axis("off")
            continue
        ax.imshow(heads[h], cmap="Greys", aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {bl} head {h}", fontsize=9)
        ax.set_xlabel("encoder frame", fontsize=8)
        ax.set_ylabel("output token", fontsize=8)
    save("multi_head.png", fig)

    # skip connections: size of the stream and of each layer's update
    norms = []
    hooks = [lyr.register_forward_hook(lambda m, a, o: norms.append(
        (float(a[0].norm(dim=-1).mean()), float((o[0] - a[0]).norm(dim=-1).mean())))) for lyr in model.encoder_layers]
    with torch.no_grad():
        model.encode(wav[None], torch.tensor([len(wav)]))
    for hk in hooks:
        hk.remove()
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    idx = np.arange(len(norms))
    ax.bar(idx - 0.2, [n[0] for n in norms], 0.4, label="|x| entering the layer")
    ax.bar(idx + 0.2, [n[1] for n in norms], 0.4, label="|layer(x) - x| (what it adds)")
    ax.set_xticks(idx, [f"encoder {i}" for i in idx])
    ax.set_ylabel("mean vector norm")
    ax.legend(fontsize=8)
    ax.set_title("x = x + block(norm(x)): each layer adds to the stream")
    save("skip_connections.png", fig)

    # layer normalisation
    norm = model.encoder_layers[0].attn_norm
    with torch.no_grad():
        stream = model.encoder_positions(model.subsampling(model.frontend(wav[None], torch.tensor([len(wav)]))[0]))
        vec = stream[0, stream.shape[1] // 2]
        normed = (vec - vec.mean()) / vec.var(unbiased=False).add(norm.eps).sqrt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), layout="constrained", sharey=True)
    axes[0].hist(vec.numpy(), bins=30, color="tab:grey")
    axes[0].set_title(f"a frame vector entering encoder layer 0\nmean {float(vec.mean()):.2f}, "
                      f"std {float(vec.std(unbiased=False)):.2f}", fontsize=9)
    axes[1].hist(normed.numpy(), bins=30, color="tab:blue")
    axes[1].set_title("normalised (LayerNorm before its gain and bias)\nmean 0.00, std 1.00", fontsize=9)
    save("layer_norm.png", fig)

    # the encoder stack, layer by layer
    mods = [lyr.attn for lyr in model.encoder_layers]
    with torch.no_grad(), capture_attention(mods) as maps:
        model.encode(wav[None], torch.tensor([len(wav)]))
    fig, axes = plt.subplots(1, len(mods), figsize=(3 * len(mods), 3), layout="constrained", squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(maps[i][0][0].mean(0).numpy(), cmap="magma", interpolation="nearest")
        ax.set_title(f"encoder layer {i}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    save("stacks.png", fig)

    # cross-attention over the spectrogram: the best-aligned head
    bl, bh = exp.best_head
    fig = _alignment_figure(plt, exp, exp.cross[bl, bh], f"cross-attention, decoder layer {bl} head {bh}",
                            exp.cross.shape[-1] * exp.encoder_frame_seconds, exp.pieces)
    save("cross_attention.png", fig)

    # BPE: one sentence split by tokenizers learnt from the corpus with more and more merges
    sentence = "the teacher painted seven wooden boxes"
    rows_text = []
    for size in (40, 80, 160, 320, 640):
        bpe = train_tokenizer(sentences, size, work / f"bpe{size}")
        rows_text.append((size, " | ".join(p.replace("\u2581", "_") for p in bpe.pieces(bpe.encode(sentence)))))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows_text) + 0.8))
    ax.axis("off")
    for i, (size, text) in enumerate(rows_text):
        ax.text(0.0, 1 - (i + 0.5) / len(rows_text), f"vocab {size:>3}:  {text}", family="monospace", fontsize=8,
                va="center", transform=ax.transAxes)
    ax.set_title("BPE learnt from 2,000 corpus sentences (_ marks a word start)", fontsize=10)
    save("bpe_merges.png", fig)

    # audio as frames
    log_mel, _ = model.frontend.log_mel(wav[None], torch.tensor([len(wav)]))
    fig, axes = plt.subplots(2, 1, figsize=(10, 4), layout="constrained", sharex=True)
    t = np.arange(len(wav)) / c.sample_rate
    axes[0].plot(t, wav.numpy(), linewidth=0.5)
    axes[0].set_title(f"waveform: {len(wav)} samples at {c.sample_rate} Hz")
    frames = log_mel[0, :len(wav) // 160].numpy()
    axes[1].imshow(frames.T, origin="lower", aspect="auto", interpolation="nearest",
                   extent=(0, frames.shape[0] * 0.01, 0, frames.shape[1]))
    axes[1].set_title(f"log-mel: {frames.shape[0]} frames of {frames.shape[1]} numbers (25 ms windows, 10 ms apart)")
    axes[1].set_xlabel("time (s)")
    save("log_mel.png", fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model (export dir or .ckpt); default: train a tiny one here")
    parser.add_argument("--text", default=None, help="what the figure utterance says (default: digits for the "
                        "tiny model, a corpus sentence for --model)")
    parser.add_argument("--work", default="docs/.figures_work", help="scratch folder (corpus, tiny model)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    work = Path(args.work)
    start = time.time()
    if args.model:
        model = Path(args.model)
        text = args.text or corpus_sentences(1, seed=11)[0]
    else:
        corpus = digit_corpus(work / "digits")
        print(f"make_figures: digit corpus ready ({time.time() - start:.0f} s); training a tiny model", flush=True)
        model = train_tiny_model(corpus, work / "tiny")
        text = args.text or "seven two nine four one"
    audio = speak(text, work / "figure.wav")
    written = make_figures(model, audio, Path(args.out), work)
    print(f"make_figures: {len(written)} figures in {args.out} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
