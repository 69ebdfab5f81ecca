"""The runtime inside transformers, on the real bundled model."""

from __future__ import annotations

import pytest
import torch

from kvtune.pipeline import Pipeline, Stage
from kvtune.measure.quality import pydoc_text
from kvtune.strategies import Stages
from kvtune.runtime import KVCache, prefill_record
from kvtune.strategies.base import budget_tokens


@pytest.fixture(scope="module")
def text_ids(smol):
    ids = smol.tokenizer(pydoc_text()[:20000], add_special_tokens=False).input_ids
    return torch.tensor([ids[:300]])


CHUNKS = [(0, 200), (200, 260), (260, 261), (261, 262)]  # prefill, a chunk, two decode steps


def _plain_logits(smol, ids, chunks=None):
    """The stock model (SDPA attention, transformers' DynamicCache), fed in the same chunks."""
    from transformers import DynamicCache

    model = smol.model
    model.set_attn_implementation("sdpa")
    try:
        if chunks is None:
            return model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        return torch.cat([model(input_ids=ids[:, a:b], cache=cache, use_cache=True).logits
                          for a, b in chunks], dim=1)
    finally:
        model.set_attn_implementation("kvtune")


def test_identity_pipeline_reproduces_full_cache_logits(smol, text_ids):
    """The empty pipeline == the stock full cache, chunk for chunk (float32, max abs diff <= 1e-5)."""
    ref = _plain_logits(smol, text_ids, CHUNKS)
    cache = KVCache(Pipeline(), smol.spec.layers)
    got = torch.cat([smol.model(input_ids=text_ids[:, a:b], cache=cache, use_cache=True).logits
                     for a, b in CHUNKS], dim=1)
    assert (got - ref).abs().max().item() <= 1e-5
    assert cache.get_seq_length() == 262
    # against one unchunked forward only float reassociation differs (different matmul shapes)
    whole = _plain_logits(smol, text_ids[:, :262])
    assert (got - whole).abs().max().item() <= 2e-4


def test_identity_from_record_equals_plain(smol, text_ids):
    ref = _plain_logits(smol, text_ids, [(0, 250), (250, 300)])
    record = prefill_record(smol.model, text_ids[:, :250])
    smol.model.set_attn_implementation("sdpa")
    last = smol.model(input_ids=text_ids[:, :250], logits_to_keep=1).logits[:, -1]  # same lm_head shape
    smol.model.set_attn_implementation("kvtune")
    assert (record.last_logits - last).abs().max().item() <= 1e-5
    cache = KVCache.from_record(record, Pipeline())
    got = smol.model(input_ids=text_ids[:, 250:], cache=cache, use_cache=True).logits
    assert (got - ref[:, 250:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pipeline", [
    Pipeline(selection=Stage(method="snapkv", params={"budget": 0.3, "window": 16})),
    Pipeline(selection=Stage(method="h2o", params={"budget": 0.4, "recent": 16})),
    Pipeline(selection=Stage(method="streaming_llm", params={"budget": 64}), codec=Stage(method="kivi", params={"bits": 4})),
    Pipeline(codec=Stage(method="fp8", params={"fmt": "e4m3"})),
])
def test_prefill_once_equals_running_the_pipeline_live(smol, text_ids, pipeline):
    """Building the compressed cache from the prefill record gives the same result as prefilling with the
    pipeline's cache in place (the record-and-reuse shortcut is exact)."""
    prompt, cont = text_ids[:, :240], text_ids[:, 240:260]
    live = KVCache(pipeline, smol.spec.layers)
    smol.model(input_ids=prompt, cache=live, use_cache=True)
    live_logits = smol.model(input_ids=cont, cache=live, use_cache=True).logits
    record = prefill_record(smol.model, prompt, attention_sums=True)
    reused = KVCache.from_record(record, pipeline)
    reuse_logits = smol.model(input_ids=cont, cache=reused, use_cache=True).logits
    assert reused.stored_tokens() == live.stored_tokens()
    assert reused.nbytes() == live.nbytes()
    assert (live_logits - reuse_logits).abs().max().item() <= 1e-4


def test_eviction_really_shrinks_the_cache_and_positions_continue(smol, text_ids):
    pipeline = Pipeline(selection=Stage(method="snapkv", params={"budget": 0.25}))
    record = prefill_record(smol.model, text_ids[:, :200])
    cache = KVCache.from_record(record, pipeline)
    kept = budget_tokens(0.25, 200)
    assert cache.stored_tokens() == [kept] * smol.spec.layers
    full = KVCache.from_record(record, Pipeline())
    assert cache.nbytes() * 200 == full.nbytes() * kept
    assert cache.get_seq_length() == 200  # positions count tokens seen, not kept
    smol.model(input_ids=text_ids[:, 200:205], cache=cache, use_cache=True)
    assert cache.get_seq_length() == 205
    assert cache.stored_tokens()[0] == kept + 5


def test_h2o_evicts_during_decode_to_stay_within_budget(smol, text_ids):
    pipeline = Pipeline(selection=Stage(method="h2o", params={"budget": 0.3, "recent": 8}))
    record = prefill_record(smol.model, text_ids[:, :150], attention_sums=True)
    cache = KVCache.from_record(record, pipeline)
    for step in range(12):
        tok = text_ids[:, 150 + step : 151 + step]
        smol.model(input_ids=tok, cache=cache, use_cache=True)
        seen = 151 + step
        assert cache.stored_tokens() == [budget_tokens(0.3, seen)] * smol.spec.layers
    assert all(layer.scores.shape[-1] == len(layer.store) for layer in cache.layers)


@pytest.mark.parametrize("codec, tol", [("fp16", 1e-4), ("int8", 0.15)])
def test_batch_of_two_unpadded_matches_single(smol, text_ids, codec, tol):
    """Rows of a batch are independent. With a lossy codec, float noise between batched and single matmuls
    (~2e-5) can move a value across a rounding boundary; a flipped int8 step in a kept key moves the next logits by
    up to ~0.1 through 30 layers (0.115 measured with SnapKV's paper defaults, window 64, which keep most of this
    120-token prompt's last tokens), so the tolerance is 0.15 — the fp16 case checks exact row independence."""
    ids = torch.cat([text_ids[:, :120], text_ids[:, 120:240]], dim=0)  # (2, 120)
    pipeline = Pipeline(selection=Stage(method="snapkv", params={"budget": 0.5}), codec=Stage(method=codec))
    batch = KVCache(pipeline, smol.spec.layers)
    both = smol.model(input_ids=ids, cache=batch, use_cache=True).logits
    nxt = smol.model(input_ids=ids[:, -1:], cache=batch, use_cache=True).logits
    for row in range(2):
        single = KVCache(pipeline, smol.spec.layers)
        one = smol.model(input_ids=ids[row : row + 1], cache=single, use_cache=True).logits
        one_next = smol.model(input_ids=ids[row : row + 1, -1:], cache=single, use_cache=True).logits
        assert (one - both[row : row + 1]).abs().max().item() <= 1e-4  # prefill attends the fresh K/V
        assert (one_next - nxt[row : row + 1]).abs().max().item() <= tol
        assert single.stored_tokens() == batch.stored_tokens()
        assert 2 * single.nbytes() == batch.nbytes()


def test_generate_works_with_the_cache(smol):
    ids = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    cache = KVCache(Stages.of(Pipeline(codec=Stage(method="kivi", params={"bits": 4}))), smol.spec.layers)
    out = smol.model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)
    plain = smol.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == plain.shape == (1, ids.shape[1] + 4)
