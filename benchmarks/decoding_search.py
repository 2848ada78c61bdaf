#!/usr/bin/env python3
"""The search over scorers against the decoding code it replaced (issue 15), side by side in one
process: greedy, beam 5 and joint CTC/attention beam 5 (CTC weight 0.3) on the decoder of
``decoding.py`` (Speech2Text's sizes, 6 layers, d_model 256, vocab 5000, random weights, plus a
random CTC head over a random 250-vector memory), ``--tokens`` tokens per utterance (the end
token suppressed), at each batch size. Outputs are compared token for token.

    python benchmarks/decoding_search.py --old /path/to/old/speechformer/decoding.py [--quick]

``--old`` is the previous ``speechformer/decoding.py`` (for example ``git show 884b4ba:speechformer/decoding.py
> /tmp/decoding_old.py``); it is imported as a module of this checkout's package.

Target: joint beam 5 at batch 16 no slower than before (new / old time <= 1.0).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import decoding_args, decoding_parser, interleaved, markdown_table, median, ratio, record  # noqa: E402


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("speechformer._decoding_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = decoding_parser(__doc__)
    p.add_argument("--old", type=Path, required=True, help="the previous speechformer/decoding.py")
    args = decoding_args(p)

    import torch

    import speechformer.decoding as new
    from speechformer.model import ModelConfig, SpeechTransformer
    from speechformer.tokenizer import DecodeRules

    old = load_old(args.old)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = SpeechTransformer(ModelConfig(
        vocab_size=5000, d_model=256, n_heads=4, d_ff=2048, n_encoder_layers=0, n_decoder_layers=6, dropout=0.0,
        decoder_positions="learned", max_target_positions=1000, bos_id=2, eos_id=2)).eval()
    rules = DecodeRules(prompt=[2], eos_id=2, suppress=[2])  # exactly --tokens tokens
    cases = {"greedy": dict(), "beam 5": dict(beam_size=5), "joint beam 5": dict(beam_size=5, decoder="joint")}
    rows, ratios = [], []
    for batch in args.batches:
        memory = torch.randn(batch, 250, 256)
        lengths = torch.full((batch,), 250)
        out: dict[str, list] = {}

        def run(module, name, fields):
            def call() -> None:
                hyps = module.decode(model, memory, lengths, module.DecodeOptions(max_len=args.tokens, **fields), rules)
                out[name] = [(h.tokens, round(h.logprob, 3)) for h in hyps]
            return call

        contenders = {}
        for case, fields in cases.items():
            contenders[f"before: {case}"] = run(old, f"before: {case}", fields)
            contenders[f"scorers: {case}"] = run(new, f"scorers: {case}", fields)
        times = interleaved(contenders, rounds=args.rounds)
        for case in cases:
            same = sum(a == b for a, b in zip(out[f"before: {case}"], out[f"scorers: {case}"]))
            rows.append([f"{case}, batch {batch}", median(times[f"before: {case}"]),
                         median(times[f"scorers: {case}"]), f"{same}/{batch}"])
            ratios.append([f"batch {batch}: {case}, scorers / before",
                           ratio(times, f"scorers: {case}", f"before: {case}"), "<= 1.0" if "joint" in case else "-"])
    body = (f"{args.tokens} tokens per utterance from a 250-vector memory, {args.threads} threads, "
            f"{args.rounds} interleaved rounds; before = `{args.old}`.\n\n"
            + markdown_table(["decoder", "before s", "scorers s", "same tokens and scores"], rows)
            + "\n\n" + markdown_table(["time ratio (median of per-round ratios)", "x", "target"], ratios))
    record("decoding_search", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
