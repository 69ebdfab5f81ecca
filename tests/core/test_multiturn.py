"""Multi-turn follow-up probes, on the real bundled model with short contexts; spill-and-recall's tiers."""

from __future__ import annotations

import random

import pytest
import torch

from kvtune.measure.multiturn import (CITIES, DEFAULT_KIND, FACT_KINDS, build_conversation, probe_turns,
                                      run_conversation)
from kvtune.measure.quality import EvalConfig, build_eval_set, evaluate_quality, full_stages, pydoc_text
from kvtune.pipeline import Pipeline, Stage
from kvtune.runtime import KVCache, prefill_record
from kvtune.scenarios import SCENARIOS, followup_ok
from kvtune.strategies import SELECTORS, ScoreInputs, Stages, build, multiturn_safe
from kvtune.strategies.spill_recall import SpillStore, page_bounds


@pytest.fixture(scope="module")
def doc_ids(smol):
    return smol.tokenizer(pydoc_text()[:60000], add_special_tokens=False).input_ids


def _stages(sel="none", params=None, codec="fp16", cparams=None) -> Stages:
    return Stages.of(Pipeline(selection=Stage(method=sel, params=params or {}),
                              codec=Stage(method=codec, params=cparams or {})))


@pytest.mark.parametrize("kind", sorted(FACT_KINDS))
def test_facts_sit_at_their_depths_and_answers_tokenize_exactly(smol, doc_ids, kind):
    tok, fk = smol.tokenizer, FACT_KINDS[kind]
    conv = build_conversation(tok, doc_ids, 600, facts=4, turns=3, rng=random.Random(3), kind=kind)
    ids = conv.context.tolist()
    assert len(ids) == 600
    assert len({f.name for f in conv.facts}) == 4 and len({f.value for f in conv.facts}) == 4
    for i, fact in enumerate(conv.facts):
        sentence = tok("\n\n" + fk.sentence.format(name=fact.name, value=fact.value) + "\n\n",
                       add_special_tokens=False).input_ids
        assert ids[fact.position : fact.position + len(sentence)] == sentence
        assert fact.depth == pytest.approx(fact.position / 600)
        assert abs(fact.depth - (i + 0.5) / 4) < 0.08  # evenly spread, the header shifts them a little
    assert len({t.fact for t in conv.turns}) == 3  # each turn asks about a different fact
    for turn in conv.turns:
        fact = conv.facts[turn.fact]
        assert turn.answer.tolist() == tok(f" {fact.value}", add_special_tokens=False).input_ids
        assert tok.decode(turn.answer).strip() == fact.value
        assert tok.decode(turn.prompt).endswith(fk.lead.format(name=fact.name))
        assert fk.question.format(name=fact.name) in tok.decode(turn.prompt)


def test_the_default_kind_is_what_evaluations_build(smol, doc_ids):
    a = build_conversation(smol.tokenizer, doc_ids, 300, facts=3, turns=2, rng=random.Random(5))
    b = build_conversation(smol.tokenizer, doc_ids, 300, facts=3, turns=2, rng=random.Random(5), kind=DEFAULT_KIND)
    assert torch.equal(a.context, b.context) and DEFAULT_KIND == "city"
    assert all(f.value in CITIES for f in a.facts)


def _one_conversation(smol, doc_ids, tokens=300, turns=3, seed=1):
    conv = build_conversation(smol.tokenizer, doc_ids, tokens, facts=4, turns=turns, rng=random.Random(seed))
    record = prefill_record(smol.model, conv.context.view(1, -1), attention_sums=True)
    prompts = [t.prompt.view(1, -1) for t in conv.turns]
    answers = [t.answer.view(1, -1) for t in conv.turns]
    return conv, record, prompts, answers


def test_cache_persists_across_turns_like_one_forward(smol, doc_ids):
    """No selection: every turn's answer log-probs equal those of the whole transcript run in one forward."""
    conv, record, prompts, answers = _one_conversation(smol, doc_ids)
    ok, lps, cache = run_conversation(smol.model, record, prompts, answers, full_stages())
    pieces, spans, at = [conv.context], [], conv.context.shape[0]
    for p, a in zip(prompts, answers):
        pieces += [p[0], a[0]]
        at += p.shape[1]
        spans.append(at - 1)  # the prompt's last position predicts the first answer token
        at += a.shape[1]
    full = torch.cat(pieces).view(1, -1)
    ref = smol.model(input_ids=full, cache=KVCache(full_stages(), smol.model.config.num_hidden_layers),
                     use_cache=True).logits.float().log_softmax(-1)
    for start, a, lp in zip(spans, answers, lps):
        assert (ref[:, start : start + a.shape[1]] - lp).abs().max().item() < 2e-4
    # every token fed is held except the last answer token (it is fed with the next turn's prompt)
    assert cache.stored_tokens()[0] == full.shape[1] - 1


@pytest.mark.parametrize("sel, params, codec", [("snapkv_agnostic", {"budget": 0.5}, "fp16"),
                                                ("h2o", {"budget": 0.5}, "fp16"), ("none", {}, "kivi")])
def test_prefill_once_equals_prefilling_the_context_live(smol, doc_ids, sel, params, codec):
    """Selectors that select at the end of the context: the record-built cache gives the same per-turn
    log-probs as a cache that prefilled the context itself."""
    conv, record, prompts, answers = _one_conversation(smol, doc_ids, tokens=260, turns=2)
    stages = _stages(sel, params, codec, {"bits": 4} if codec == "kivi" else None)
    _ok, from_record, _ = run_conversation(smol.model, record, prompts, answers, stages)
    live = KVCache(stages, smol.model.config.num_hidden_layers)
    smol.model(input_ids=conv.context.view(1, -1), cache=live, use_cache=True, logits_to_keep=1)
    carry, got = None, []
    for p, a in zip(prompts, answers):
        head = p[:, :-1] if carry is None else torch.cat([carry, p[:, :-1]], dim=1)
        live.begin_turn()
        smol.model(input_ids=head, cache=live, use_cache=True)
        feed = torch.cat([p[:, -1:], a[:, :-1]], dim=1)
        if stages.selector is not None and stages.selector.decode_time:
            logits = torch.cat([smol.model(input_ids=feed[:, i : i + 1], cache=live, use_cache=True).logits
                                for i in range(feed.shape[1])], dim=1)
        else:
            logits = smol.model(input_ids=feed, cache=live, use_cache=True).logits
        got.append(logits.float().log_softmax(-1))
        carry = a[:, -1:]
    for x, y in zip(from_record, got):
        assert (x - y).abs().max().item() < 2e-4


def test_query_aware_selection_waits_for_the_first_question(smol, doc_ids):
    """SnapKV in a conversation selects after turn 1's question (the question in its window), so it keeps
    the budget of context + question, while the query-agnostic variant selected at the end of the context."""
    conv, record, prompts, answers = _one_conversation(smol, doc_ids, tokens=260, turns=2)
    _ok, _lp, aware = run_conversation(smol.model, record, prompts[:1], answers[:1], _stages("snapkv", {"budget": 0.3}))
    _ok, _lp, agnostic = run_conversation(smol.model, record, prompts[:1], answers[:1],
                                          _stages("snapkv_agnostic", {"budget": 0.3}))
    t, q, a = conv.context.shape[0], prompts[0].shape[1], answers[0].shape[1]
    kept_aware = -(-3 * (t + q - 1) // 10)  # ceil(0.3 * tokens seen when it selected)
    assert aware.stored_tokens()[0] == kept_aware + a  # then the prompt's last token and A - 1 answer tokens
    assert agnostic.stored_tokens()[0] == -(-3 * t // 10) + q - 1 + a


def test_multiturn_fields_in_the_quality_result(smol):
    cfg = EvalConfig(text_prompts=0, passkey_items=0, kv_items=0, multiturn_items=2, multiturn_tokens=300,
                     multiturn_turns=3)
    evalset = build_eval_set(smol.model, smol.tokenizer, cfg, attention_sums=True)
    full = evaluate_quality(smol.model, evalset, Pipeline(), cfg)
    assert full.multiturn_turns == 3 and full.turn_accuracy == full.turn_accuracy_full
    assert full.multiturn_kl == 0.0
    assert full.followup_retention in (None, 1.0) and full.turn1_retention in (None, 1.0)
    tiny = evaluate_quality(smol.model, evalset,
                            Pipeline(selection=Stage(method="streaming_llm", params={"budget": 8, "sinks": 4})), cfg)
    assert tiny.multiturn_kl > 0.0
    if tiny.followup_retention is not None:  # an 8-token cache answers no follow-up about the context
        assert tiny.followup_retention == 0.0
        assert tiny.probe_retention is None  # no single-turn probes in this set: the loss is KL + follow-ups
        assert tiny.quality_loss == pytest.approx(tiny.kl_mean + cfg.followup_weight, abs=1e-5)


# ------------------------------------------------------------------------------------------- spill and recall
def test_spill_store_keeps_every_token_and_recalls_exactly_the_top_pages():
    torch.manual_seed(0)
    sel = build("selection", "spill_recall", {"budget": 0.25, "page_size": 8, "window": 4, "sinks": 0, "recent": 0})
    b, h, hq, t, d = 2, 2, 4, 64, 8
    keys, values = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    store = sel.wrap_store(lambda: build("codec", "fp16", {}).new_store())
    assert isinstance(store, SpillStore)
    store.append(keys, values)
    queries = torch.randn(b, hq, 4, d)
    inputs = ScoreInputs(keys, values, 0, 1, d**-0.5, queries)
    idx = sel.select(inputs)
    store.keep(idx)
    assert len(store) == 16 and store.tokens_held() == t
    # the resident tokens are the two best pages by Quest's bound, computed here by brute force
    lo, hi = page_bounds(keys, 8)
    for i in range(b):
        for j in range(h):
            qs = queries[i, 2 * j : 2 * j + 2].reshape(-1, d)  # the group's query heads, every window query
            bound = torch.stack([torch.maximum(q * hi[i, j], q * lo[i, j]).sum(-1) for q in qs]).amax(0)  # (P,)
            top = sorted(bound.topk(2).indices.tolist())
            expect = [p * 8 + o for p in top for o in range(8)]
            assert store.resident[i, j].tolist() == expect
            k_gpu, _ = store.decoded()
            assert torch.equal(k_gpu[i, j], keys[i, j, expect])
    # a new turn: new tokens arrive on the GPU, then a re-selection with other queries recalls other pages
    new_k, new_v = torch.randn(b, h, 8, d), torch.randn(b, h, 8, d)
    store.append(new_k, new_v)
    assert store.tokens_held() == t + 8 and len(store) == 24
    all_k, all_v = store.reselectable()
    assert torch.equal(all_k, torch.cat([keys, new_k], dim=2))  # the host tier holds every token seen, in order
    other = ScoreInputs(all_k, all_v, 0, 1, d**-0.5, -queries)
    before = store.resident.clone()
    idx = sel.select(other, tokens_seen=t + 8)
    store.reselect(idx)
    assert torch.equal(store.resident.long(), idx) and len(store) == idx.shape[-1] == 18
    moved = sum(len(set(idx[i, j].tolist()) - set(before[i, j].tolist())) for i in range(b) for j in range(h))
    assert store.recalled_tokens == moved > 0
    k_gpu, v_gpu = store.decoded()
    gather = idx.unsqueeze(-1).expand(*idx.shape, d)
    assert torch.equal(k_gpu, all_k.gather(2, gather)) and torch.equal(v_gpu, all_v.gather(2, gather))
    assert store.nbytes() == store.gpu_nbytes() + store.host_nbytes()


def test_spill_recall_recalls_pages_for_follow_up_turns(smol, doc_ids):
    """In a conversation the host tier holds every token seen and each turn re-selects the resident pages."""
    conv, record, prompts, answers = _one_conversation(smol, doc_ids, tokens=300, turns=3)
    stages = _stages("spill_recall", {"budget": 0.3, "page_size": 16})
    _ok, _lp, cache = run_conversation(smol.model, record, prompts, answers, stages)
    seen = cache.get_seq_length()
    for layer in cache.layers:
        assert layer.store.tokens_held() == seen
        assert len(layer.store) < seen
    assert sum(layer.store.recalled_tokens for layer in cache.layers) > 0


# ------------------------------------------------------------------------------------------- scenario
def test_multi_turn_scenario_allows_what_never_drops_a_token():
    mt = SCENARIOS["multi-turn"]
    assert set(mt.selection) == set(multiturn_safe("selection"))
    assert "spill_recall" in mt.selection and "snapkv" not in mt.selection and "none" in mt.selection
    assert all(not SELECTORS[m].drops_tokens for m in mt.selection if m != "none")


def test_followup_ok_compares_with_the_full_cache():
    from kvtune.pipeline import QualityResult

    base = dict(quality_loss=0.0, kl_mean=0.0, kl_max=0.0, top1_agreement=1.0, perplexity=1.0, perplexity_full=1.0,
                eval_tokens=1)
    mt = SCENARIOS["multi-turn"]
    full = QualityResult(**base, turn_accuracy=[1.0, 0.5, 0.5], turn_accuracy_full=[1.0, 0.5, 0.5],
                         followup_retention=1.0)
    assert followup_ok(full, mt)
    lost = full.model_copy(update={"turn_accuracy": [1.0, 0.0, 0.0], "followup_retention": 0.0})
    assert not followup_ok(lost, mt)
    assert followup_ok(lost, SCENARIOS["datacenter"])  # other scenarios do not check follow-ups
    assert followup_ok(full.model_copy(update={"followup_retention": None}), mt)  # nothing to compare


def test_probe_turns_follow_the_workload():
    from types import SimpleNamespace as NS

    assert probe_turns(None, 4, 3)[0] == 3
    assert probe_turns(NS(turns_per_session=NS(p50=7), prefix_reuse_ratio=None), 4, 3)[0] == 4  # clamped to facts
    assert probe_turns(NS(turns_per_session=NS(p50=1), prefix_reuse_ratio=None), 4, 3)[0] == 2  # one follow-up
    n, why = probe_turns(NS(turns_per_session=None, prefix_reuse_ratio=0.5), 4, 3)
    assert n == 2 and "prefix reuse" in why
    assert probe_turns(NS(turns_per_session=None, prefix_reuse_ratio=0.7), 4, 3)[0] == 3


def test_decode_time_selectors_are_evaluated_one_token_per_forward(smol):
    """H2O/TOVA evict after every token in generation; the evaluation feeds them token by token too."""
    from kvtune.measure.quality import batch_logprobs

    cfg = EvalConfig(text_prompts=1, context_tokens=200, continuation_tokens=12, chunk=6, passkey_items=0,
                     kv_items=0, multiturn_items=0)
    evalset = build_eval_set(smol.model, smol.tokenizer, cfg, attention_sums=True)
    stages = _stages("tova", {"budget": 0.3})
    got = evaluate_quality(smol.model, evalset, stages, cfg)
    batch = evalset.text_batches[0]
    ref = batch.ref_logprobs
    for chunk, same in ((1, True), (cfg.chunk, False)):
        cand = batch_logprobs(smol.model, batch.record, batch.continuation, stages, chunk)
        kl = float((ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0).mean())
        assert (abs(kl - got.kl_mean) < 1e-5) == same
