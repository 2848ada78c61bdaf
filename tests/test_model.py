"""One test per transformer idea: each shows the part behaves as the idea says."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from speechformer.decoding import DecodeOptions, beam_search, greedy_decode
from speechformer.model import (DecoderLayer, ModelConfig, MultiHeadAttention, SpeechTransformer, TokenEmbedding,
                                attention, capture_attention, causal_mask, sinusoids)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def model() -> SpeechTransformer:
    torch.manual_seed(0)
    return SpeechTransformer(tiny_config()).eval()


def test_one_hot_queries_make_attention_a_lookup_of_value_rows():
    keys = torch.eye(5)  # five orthogonal keys
    values = torch.randn(5, 3)
    sharp = 50.0  # scale so the softmax is (almost) one-hot
    queries = torch.eye(5)[[3, 0, 4]] * sharp * math.sqrt(5)
    out, weights = attention(queries, keys, values)
    torch.testing.assert_close(out, values[[3, 0, 4]], atol=1e-5, rtol=0)
    assert torch.allclose(weights.argmax(-1), torch.tensor([3, 0, 4]))
    # the fused kernel computes the same lookup
    fused = torch.nn.functional.scaled_dot_product_attention(queries[None], keys[None], values[None])[0]
    torch.testing.assert_close(fused, out, atol=1e-5, rtol=1e-5)


def test_soft_attention_blends_rows_and_weights_sum_to_one():
    q, k, v = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 2)
    out, weights = attention(q, k, v)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    torch.testing.assert_close(out, weights @ v)


def test_causal_mask_is_lower_triangular():
    m = causal_mask(4)
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False], [True, True, True, True]]


def test_multi_head_attention_fused_path_equals_written_out_formula():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    fused = mha(x, mask=mask)
    with capture_attention([mha]) as captured:
        explicit = mha(x, mask=mask)
    weights = captured[0][0]
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert float(weights[1, :, :, 5:].abs().max()) == 0.0  # padded keys get no weight


def test_decoder_output_at_t_does_not_depend_on_tokens_after_t(model):
    memory = torch.randn(2, 9, 32)
    tokens = torch.randint(4, 40, (2, 8))
    changed = tokens.clone()
    t = 4
    changed[:, t + 1:] = torch.randint(4, 40, (2, 8 - t - 1))
    a = model.decode(tokens, memory, None)
    b = model.decode(changed, memory, None)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # and the later outputs do see them


def test_cross_attention_output_changes_with_encoder_memory():
    torch.manual_seed(0)
    layer = DecoderLayer(32, 4, 64, 0.0, 0.0, "relu", True, 1e-5).eval()
    x = torch.randn(1, 5, 32)
    m1, m2 = torch.randn(1, 9, 32), torch.randn(1, 9, 32)
    with capture_attention([layer.cross_attn]) as captured:
        y1 = layer(x, m1, None)
    y2 = layer(x, m2, None)
    assert not torch.allclose(y1, y2)
    assert captured[0][0].shape == (1, 4, 5, 9)  # every token looks over every frame


def test_layer_norm_gives_zero_mean_unit_variance(model):
    norm = model.encoder_layers[0].attn_norm
    x = torch.randn(3, 5, 32) * 7 + 3
    y = norm(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3, rtol=0)


def test_skip_connection_passes_input_through_when_blocks_output_zero():
    torch.manual_seed(0)
    cfg = tiny_config()
    m = SpeechTransformer(cfg).eval()
    layer = m.encoder_layers[0]
    for lin in (layer.attn.out, layer.ff.fc2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 6, 32)
    y = layer(x)
    torch.testing.assert_close(y, x)  # x + 0 + 0


def test_positional_encodings_differ_by_position_and_are_bounded():
    pe = sinusoids(512, 64)
    assert pe.abs().max() <= 1.0
    distances = torch.cdist(pe, pe)
    off_diagonal = distances[~torch.eye(512, dtype=torch.bool)]
    assert float(off_diagonal.min()) > 1e-3  # no two positions share an encoding
    # nearby positions are closer than far ones (the wiggles are smooth)
    assert float(distances[100, 101]) < float(distances[100, 300])


def test_positions_make_the_encoder_order_aware(model):
    """Without positions, self-attention is permutation-equivariant; with them it is not."""
    x = torch.randn(1, 10, 32)
    perm = torch.randperm(10)
    layer = model.encoder_layers[0]
    plain = layer(x)
    plain_perm = layer(x[:, perm])
    torch.testing.assert_close(plain[:, perm], plain_perm, atol=1e-5, rtol=1e-5)
    pos = model.encoder_positions
    with_pos = layer(pos(x))
    with_pos_perm = layer(pos(x[:, perm]))
    assert not torch.allclose(with_pos[:, perm], with_pos_perm, atol=1e-3)


def test_embedding_is_a_one_hot_lookup_and_de_embedding_is_tied():
    torch.manual_seed(0)
    emb = TokenEmbedding(10, 8, scale=False)
    ids = torch.tensor([3, 7])
    one_hot = torch.nn.functional.one_hot(ids, 10).float()
    torch.testing.assert_close(emb(ids), one_hot @ emb.weight)
    # de-embedding scores each token by similarity to its own embedding: the row itself wins
    logits = emb.logits(emb.weight[ids] * 10)
    assert logits.argmax(-1).tolist() == [3, 7]
    probs = logits.softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_bf16_de_embedding_casts_the_table_once_and_follows_its_changes():
    """Under bf16 autocast the logits equal the plain formula (x @ W.t() in bf16); without
    gradients the bf16 table is cast once and kept, and made again when the table changes."""
    torch.manual_seed(0)
    emb = TokenEmbedding(50, 16, scale=False)
    x = torch.randn(3, 1, 16)
    plain = lambda: x.bfloat16() @ emb.weight.detach().bfloat16().t()  # noqa: E731
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = emb.logits(x)
        kept = emb._cast[1]
        assert first.dtype == torch.bfloat16 and torch.equal(first, plain())
        assert torch.equal(emb.logits(x), first) and emb._cast[1] is kept  # not cast again
    with torch.no_grad():
        emb.weight.mul_(2.0)  # an optimiser step, a state-dict load: the version counter moves
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb._cast[1] is kept and torch.equal(emb.logits(x), plain()) and emb._cast[1] is not kept
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: the gradient reaches the table
        emb.logits(x).float().sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    torch.testing.assert_close(emb.logits(x), x @ emb.weight.t())  # fp32: unchanged


def test_kv_cache_decoding_equals_full_sequence(model):
    memory, lengths = model.encode(torch.randn(2, 8000), torch.tensor([8000, 6000]))
    mask = model.memory_mask(lengths, memory.shape[1])
    tokens = torch.randint(4, 40, (2, 6))
    full = model.decode(tokens, memory, mask)
    state = model.init_state(memory, 8)
    first = model.decode(tokens[:, :2], memory, mask, state)  # a prompt of two tokens
    rest = [model.decode(tokens[:, i:i + 1], memory, mask, state) for i in range(2, 6)]
    torch.testing.assert_close(torch.cat([first] + rest, 1), full, atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_an_utterance_encoding(model):
    wav = torch.randn(1, 8000)
    alone, la = model.encode(wav, torch.tensor([8000]))
    padded = torch.cat([wav, torch.zeros(1, 4000)], 1)
    batch = torch.cat([padded, torch.randn(1, 12000)], 0)
    together, lb = model.encode(batch, torch.tensor([8000, 12000]))
    n = int(la[0])
    assert int(lb[0]) == n
    torch.testing.assert_close(together[0, :n], alone[0], atol=1e-4, rtol=1e-3)


def test_decoding_stops_and_is_bounded_by_input_length(model):
    memory, lengths = model.encode(torch.randn(3, 4000), torch.tensor([4000, 3000, 2000]))
    for hyps in (greedy_decode(model, memory, lengths),
                 beam_search(model, memory, lengths, DecodeOptions(beam_size=3))):
        assert len(hyps) == 3
        for h in hyps:
            assert len(h.tokens) <= int(lengths.max()) + 2
            assert model.config.bos_id not in h.tokens and model.config.blank_id not in h.tokens


def test_beam_search_scores_at_least_as_well_as_greedy(model):
    torch.manual_seed(1)
    memory, lengths = model.encode(torch.randn(2, 6000), torch.tensor([6000, 6000]))
    mask = model.memory_mask(lengths, memory.shape[1])

    def logprob(h: list[int], row: int) -> float:
        """Teacher-forced sum of log p over the tokens and the end token (nothing is suppressed
        on these rows: the suppressed ids are never chosen, so the renormalisation is tiny)."""
        c = model.config
        seq = torch.tensor([[c.bos_id] + h])
        logits = model.decode(seq, memory[row:row + 1], None if mask is None else mask[row:row + 1])
        logits[..., [c.blank_id, c.bos_id]] = float("-inf")
        logp = logits[0].log_softmax(-1)
        target = h + [c.eos_id]
        return float(sum(logp[i, t] for i, t in enumerate(target)))

    greedy = greedy_decode(model, memory, lengths)
    beam = beam_search(model, memory, lengths, DecodeOptions(beam_size=4))
    for row in range(2):
        g, b = greedy[row].tokens, beam[row].tokens
        if g and len(g) < lengths[row]:  # greedy finished properly
            assert logprob(b, row) / (len(b) + 1) >= logprob(g, row) / (len(g) + 1) - 1e-4
            # the scores the decoders report are the model's own
            assert abs(greedy[row].logprob - logprob(g, row)) < 1e-3
            assert abs(beam[row].logprob - logprob(b, row)) < 1e-3


def test_whisper_architecture_is_expressible():
    cfg = ModelConfig.whisper(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                              n_vocab=100, n_text_ctx=32, n_text_state=64, n_text_head=2, n_text_layer=2)
    m = SpeechTransformer(cfg)
    assert not m.encoder_layers[0].attn.qkv.bias[64:128].any()  # no key bias: its rows are zero
    assert isinstance(m.encoder_layers[0].ff.act, torch.nn.GELU)
    assert m.subsampling.conv2.stride == (2,)
    names = dict(m.named_parameters())
    assert "decoder_positions.table" in names  # learned decoder positions
    assert m.ctc is None
    wav = torch.randn(1, 16000)
    memory, lengths = m.encode(wav, torch.tensor([16000]))
    assert memory.shape == (1, 1500, 64)


def test_training_loss_decreases_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = SpeechTransformer(tiny_config(ctc_weight=0.3))
    wav, wl = torch.randn(2, 8000), torch.tensor([8000, 7000])
    tokens, tl = torch.randint(4, 40, (2, 5)), torch.tensor([5, 3])
    out = m(wav, wl, tokens, tl)
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = float(out["loss"])
    for _ in range(30):
        opt.zero_grad()
        loss = m(wav, wl, tokens, tl)["loss"]
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_batched_decoding_equals_one_utterance_at_a_time(model):
    """Rows that finish early are dropped from the batch (greedy) and beams share one
    projection of the memory (beam search): neither may change any result."""
    torch.manual_seed(3)
    lengths = torch.tensor([6000, 2500, 4000, 1200, 5000, 3000])
    memory, mem_lengths = model.encode(torch.randn(6, 6000), lengths)
    options = DecodeOptions(max_len=12)
    for decode_fn, opts in ((greedy_decode, options), (beam_search, DecodeOptions(beam_size=3, max_len=12))):
        together = decode_fn(model, memory, mem_lengths, opts)
        for i in range(6):
            n = int(mem_lengths[i])
            alone = decode_fn(model, memory[i:i + 1, :n], mem_lengths[i:i + 1], opts)[0]
            assert together[i].tokens == alone.tokens
            assert abs(together[i].logprob - alone.logprob) < 1e-3
    lengths_out = {len(h.tokens) for h in greedy_decode(model, memory, mem_lengths, options)}
    assert len(lengths_out) > 1  # the rows really finished at different steps


def test_byte_mask_dropout_zeroes_the_asked_fraction_and_keeps_the_expectation():
    from speechformer.fastpath import ByteMaskDropout as Dropout

    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    x = torch.ones(200, 1000, requires_grad=True)
    y = drop(x)
    zeroed = float((y == 0).float().mean())
    assert abs(zeroed - 0.25) < 0.01
    assert abs(float(y.mean()) - 1.0) < 0.02  # kept elements are scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # the gradient flows through exactly the kept ones
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_onednn_prepacked_linear_equals_nn_linear_and_is_used_for_cpu_inference(model):
    from speechformer.fastpath import PackedLinear, onednn_available, prepack_linears

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    for shape in [(1, 96), (7, 96), (3, 11, 96)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert torch.allclose(PackedLinear(lin)(x), lin(x), atol=1e-5, rtol=1e-5)
    wav, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    with torch.inference_mode():
        memory, ml = model.eval().encode(wav, lengths)
        before = greedy_decode(model, memory, ml, DecodeOptions(max_len=10))
        n = prepack_linears(model)
        packed_memory, _ = model.encode(wav, lengths)
        after = greedy_decode(model, packed_memory, ml, DecodeOptions(max_len=10))
    assert n > 0 and not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.allclose(packed_memory, memory, atol=1e-4)
    assert [h.tokens for h in after] == [h.tokens for h in before]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile (inductor) needs a C++ compiler")
def test_compiled_layers_give_the_same_losses_gradients_and_state_dict():
    import copy

    torch.manual_seed(0)
    eager = SpeechTransformer(tiny_config(ctc_weight=0.3, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0)).train()
    compiled = copy.deepcopy(eager).compile_layers()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints stay interchangeable
    for wav_len, tok_len in ((8000, 5), (6400, 7)):  # two shapes: one dynamic graph serves both
        wav, wl = torch.randn(2, wav_len), torch.tensor([wav_len, wav_len - 1000])
        tokens, tl = torch.randint(4, 40, (2, tok_len)), torch.tensor([tok_len, tok_len - 2])
        eager.zero_grad()
        compiled.zero_grad()
        a, b = eager(wav, wl, tokens, tl), compiled(wav, wl, tokens, tl)
        for k in ("loss", "att_loss", "ctc_loss"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
        a["loss"].backward()
        b["loss"].backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
