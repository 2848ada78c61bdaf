"""Data-parallel training: two CPU processes (gloo) under Lightning's DDP strategy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechformer.data import read_manifest
from speechformer.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_ranks_see_disjoint_batches_and_end_with_identical_weights(tiny_corpus, tmp_path):
    train = read_manifest(tiny_corpus / "train.jsonl")
    train_tokenizer([u.text for u in train], 40, tmp_path / "tok")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_ddp_train.py"), str(tiny_corpus),
                           str(tmp_path / "tok"), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    everyone = {u.id for u in train}
    for epoch in (0, 1):
        seen = [[u for e, ids in r["batches"] if e == epoch for u in ids] for r in ranks]
        counts = [sum(1 for e, _ in r["batches"] if e == epoch) for r in ranks]
        assert counts[0] == counts[1] > 0  # the same number of steps: no rank waits forever in all-reduce
        assert not set(seen[0]) & set(seen[1])  # disjoint shares
        assert sorted(seen[0] + seen[1]) == sorted(everyone)  # together: every utterance once per epoch
    # Lightning hands the epoch to our batch sampler, whose shuffle it seeds (the same on both ranks,
    # or the shares above would overlap)
    for r in ranks:
        assert r["sampler_epochs"] == [e for e, _ in r["batches"]]
    # gradients were averaged: both replicas hold the same weights, and they moved from the start
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], ranks[0]["initial"][k])]
    assert len(moved) > len(a) // 2
