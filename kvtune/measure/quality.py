"""Quality of a pipeline, always against the same model with the full cache.

The evaluation set (built once per study, "prefill once, compress many"):

* **text** — real English prose from ``pydoc_data.topics`` (shipped with every Python). Each item is a context
  of ``context_tokens`` followed by ``continuation_tokens``. The context is prefilled once with the full cache
  (:func:`kvtune.runtime.prefill_record`); the full-cache log-probabilities of the continuation are computed once.
  A trial builds the compressed cache from the record and feeds the continuation (teacher forced) in chunks
  of ``chunk`` tokens — one token per forward for decode-time selectors (H2O, TOVA), which evict after every
  token as in generation. Metrics: KL(full || candidate) per
  position, top-1 agreement, perplexity of the true continuation.
* **passkey** — a five-digit pass key hidden in filler text, the question stated before the context and again
  at the end (the layout the default model can answer). The answer is teacher forced: an item counts as
  answered when greedy decoding would produce every answer token, which is the same as every forced position
  having the right argmax.
* **key-value retrieval** — a JSON object of random keys and values; the model must return the value of one
  key. Small models fail this even with the full cache.

A probe item counts only if the full cache answers it: ``probe_retention`` is the fraction of those items the
candidate also answers. Items the full cache fails are not run for candidates (they are scored as misses).

* **multi-turn follow-ups** (:mod:`kvtune.measure.multiturn`) — one shared context of natural text holding
  several competing facts, then a conversation of ``multiturn_turns`` questions about different facts, the cache
  persisting across turns; accuracy per turn, ``followup_retention`` over the turns after the first.

The search objective is ``quality_loss = kl_mean + (1 - probe_retention) + followup_weight * (1 -
followup_retention)`` (a retention term counts only when the full cache answers some of its items).

Devices: everything runs where the model is. Log-probabilities and KL are computed in float32 whatever the
model's dtype (bfloat16 on a GPU). On a CPU each prompt is prefilled alone; on a GPU prompts of equal length
are prefilled together, as many rows per forward as fit in half the free memory (:func:`rows_that_fit`), the
same bound splits the trial batches, and a record is kept in pinned host memory instead of on the GPU once
less than a fifth of the GPU's memory is free.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kvtune.measure.multiturn import ConversationBatch, build_conversations, score_conversations
from kvtune.pipeline import Pipeline, QualityResult
from kvtune.strategies import Stages
from kvtune.runtime import KVCache, LayerRecord, PrefillRecord, prefill_record

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class EvalConfig:
    """Sizes of the evaluation set. Defaults fit the default ``recommend`` in a few minutes on 2 CPU cores."""

    text_prompts: int = 3
    context_tokens: int = 1536
    continuation_tokens: int = 64
    chunk: int = 32
    passkey_items: int = 8
    passkey_tokens: int = 1536
    kv_items: int = 2
    kv_tokens: int = 1024
    multiturn_items: int = 2  # conversations (each: one shared context, several turns)
    multiturn_tokens: int = 1536  # context tokens of each conversation
    multiturn_facts: int = 4  # competing facts in the context
    multiturn_turns: int = 3  # questions per conversation, each about a different fact
    followup_weight: float = 1.0  # weight of (1 - followup_retention) in quality_loss
    seed: int = 0

    @classmethod
    def quick(cls) -> "EvalConfig":
        """Seconds, not minutes: for tests and smoke runs."""
        return cls(text_prompts=1, context_tokens=256, continuation_tokens=16, chunk=8, passkey_items=2,
                   passkey_tokens=256, kv_items=1, kv_tokens=256, multiturn_items=1, multiturn_tokens=256,
                   multiturn_turns=2)


@dataclass
class TextItem:
    record: PrefillRecord | None  # dropped once merged into a batch (the batch holds the tensors)
    continuation: torch.Tensor  # (1, C) token ids
    tokens: int = 0


@dataclass
class ProbeItem:
    kind: str  # "passkey" | "kv_retrieval"
    record: PrefillRecord | None  # dropped once merged into a batch
    answer: torch.Tensor  # (A,) token ids of the expected answer
    full_correct: bool = False
    tokens: int = 0


@dataclass
class TextBatch:
    """Text items of equal lengths, run as one batch: records merged along the batch axis."""

    record: PrefillRecord  # (B, T)
    continuation: torch.Tensor  # (B, C)
    ref_logprobs: torch.Tensor  # (B, C, V): full-cache log-probs at each continuation position


@dataclass
class ProbeBatch:
    kinds: list[str]
    record: PrefillRecord  # (B, T)
    answers: torch.Tensor  # (B, A)


@dataclass
class EvalSet:
    text: list[TextItem] = field(default_factory=list)
    probes: list[ProbeItem] = field(default_factory=list)
    text_batches: list[TextBatch] = field(default_factory=list)
    probe_batches: list[ProbeBatch] = field(default_factory=list)  # only items the full cache answers
    conversations: list[ConversationBatch] = field(default_factory=list)  # multi-turn items, references computed
    prefill_seconds: float = 0.0

    @property
    def context_lengths(self) -> list[int]:
        return ([it.tokens for it in self.text] + [it.tokens for it in self.probes] +
                [b.record.tokens for b in self.conversations for _row in range(b.full_correct.shape[0])])


def merge_records(records: list[PrefillRecord]) -> PrefillRecord:
    """Stack prefill records of equal length along the batch axis (every tensor is per batch row), on the first
    record's device."""
    if len(records) == 1:
        return records[0]
    records = [r.to(records[0].last_logits.device) for r in records]
    layers = []
    for parts in zip(*(r.layers for r in records)):
        sums = None if any(p.attention_sums is None for p in parts) else torch.cat([p.attention_sums for p in parts])
        layers.append(LayerRecord(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]),
                                  torch.cat([p.window_queries for p in parts]), sums, parts[0].scaling))
    return PrefillRecord(input_ids=torch.cat([r.input_ids for r in records]),
                         last_logits=torch.cat([r.last_logits for r in records]), layers=layers)


def _groups(items: list, key, rows: int | None = None) -> list[list]:
    """Items grouped by ``key`` (order kept), each group cut into pieces of at most ``rows`` items."""
    out: dict[Any, list] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    groups = list(out.values())
    if rows is None:
        return groups
    return [g[i : i + rows] for g in groups for i in range(0, len(g), rows)]


GPU_RESERVE = 0.2  # records move to host memory once less than this fraction of the GPU's memory is free


def rows_that_fit(model: Any, tokens: int, attention_sums: bool = False) -> int | None:
    """How many prompts of ``tokens`` tokens one forward may batch on the model's GPU: half the free memory over
    one row's prefill record plus its activations (an upper estimate). ``None`` on a CPU: no bound (CPU prefills
    run one prompt at a time; trial batches merge every equal-length item, as the memory allows there)."""
    if model.device.type != "cuda":
        return None
    cfg = model.config
    el = torch.finfo(model.dtype).bits // 8
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    q_heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or q_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // q_heads
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    record = layers * (2 * kv_heads * tokens + q_heads * min(tokens, 64)) * head_dim * el
    if attention_sums:
        record += layers * kv_heads * tokens * 4
    activations = tokens * (8 * hidden + 3 * inter) * el + 2 * cfg.vocab_size * 4
    free = torch.cuda.mem_get_info(model.device)[0]
    return max(1, min(256, int(0.5 * free // (record + activations))))


def _keep_on(record: PrefillRecord) -> PrefillRecord:
    """The record itself while the GPU keeps its reserve free; else its copy in pinned host memory."""
    dev = record.last_logits.device
    if dev.type != "cuda":
        return record
    free, total = torch.cuda.mem_get_info(dev)
    return record if free > GPU_RESERVE * total else record.to("cpu")


def _prefill_all(model: Any, pending: list[tuple[Any, torch.Tensor, str]], attention_sums: bool,
                 note: Callable[[str], None]) -> None:
    """Prefill every ``(item, prompt ids (1, T), label)`` and set ``item.record``: one prompt per forward on a
    CPU, equal-length prompts batched on a GPU (:func:`rows_that_fit`)."""
    if model.device.type == "cuda":
        batches = [g for group in _groups(pending, lambda p: p[1].shape[1])
                   for g in _groups(group, lambda p: 0, rows_that_fit(model, group[0][1].shape[1], attention_sums))]
    else:
        batches = [[p] for p in pending]
    done = 0
    for part in batches:
        done += len(part)
        rows = f", {len(part)} rows" if len(part) > 1 else ""
        note(f"prefill {part[-1][2]} ({done}/{len(pending)}, {part[0][1].shape[1]} tokens{rows})")
        record = _keep_on(prefill_record(model, torch.cat([p[1] for p in part]), attention_sums=attention_sums))
        for i, (item, _ids, _label) in enumerate(part):
            item.record = record if len(part) == 1 else record.row(i)


def pydoc_text() -> str:
    """Real English text that every Python install has (~113K tokens for a Llama-style tokenizer)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def _chat_ids(tokenizer: Any, user: str, assistant_prefix: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        text += assistant_prefix
    else:
        text = f"{user}\n\n{assistant_prefix}"
    return tokenizer(text, add_special_tokens=False).input_ids


def passkey_prompt(tokenizer: Any, target_tokens: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) with the key at ``depth`` (0..1) of a filler haystack of about target_tokens."""
    question = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will ask you for the pass key at the end.")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    overhead = len(_chat_ids(tokenizer, question + needle + "What is the pass key?", "The pass key is"))
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    n = max(2, (target_tokens - overhead) // per_filler)
    at = int(round(depth * n))
    hay = FILLER * at + needle + FILLER * (n - at)
    ids = _chat_ids(tokenizer, f"{question}\n\n{hay}\n\nWhat is the pass key?", "The pass key is")
    answer = tokenizer(f" {key}", add_special_tokens=False).input_ids
    return ids, answer


def kv_prompt(tokenizer: Any, target_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): a JSON object of random hex keys/values; asks for one key's value."""
    def hexid() -> str:
        return "".join(rng.choice("0123456789abcdef") for _ in range(8))

    pairs: list[tuple[str, str]] = []
    text = ""
    while True:
        pairs.append((hexid(), hexid()))
        body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
        text = "{" + body + "}"
        if len(tokenizer(text, add_special_tokens=False).input_ids) >= target_tokens - 80:
            break
    key, value = pairs[rng.randrange(len(pairs))]
    user = (f'Extract the value for the key "{key}" from the JSON object below.\n\n{text}\n\n'
            f'What is the value for the key "{key}"?')
    ids = _chat_ids(tokenizer, user, f'The value for the key "{key}" is "')
    answer = tokenizer(value, add_special_tokens=False).input_ids
    return ids, answer


def build_eval_set(model: Any, tokenizer: Any, config: EvalConfig, *, attention_sums: bool,
                   progress: Callable[[str], None] | None = None) -> EvalSet:
    """Prefill every evaluation prompt once with the full cache and compute the full-cache references."""
    import time

    started = time.perf_counter()
    out = EvalSet()
    note = progress or (lambda _msg: None)
    dev = model.device
    pending: list[tuple[Any, torch.Tensor, str]] = []  # (item, prompt ids (1, T), label) awaiting prefill
    ids = tokenizer(pydoc_text(), add_special_tokens=False).input_ids
    span = config.context_tokens + config.continuation_tokens
    if config.text_prompts:
        stride = max(span, (len(ids) - span) // config.text_prompts)
        for i in range(config.text_prompts):
            start = i * stride
            piece = torch.tensor([ids[start : start + span]])
            if piece.shape[1] < span:
                break
            out.text.append(TextItem(None, piece[:, config.context_tokens :].to(dev)))
            pending.append((out.text[-1], piece[:, : config.context_tokens], f"text {i + 1}/{config.text_prompts}"))
    rng = random.Random(config.seed)
    for i in range(config.passkey_items):
        key = str(rng.randrange(10000, 100000))
        depth = (i + 0.5) / config.passkey_items
        prompt, answer = passkey_prompt(tokenizer, config.passkey_tokens, depth, key)
        out.probes.append(ProbeItem("passkey", None, torch.tensor(answer, device=dev)))
        pending.append((out.probes[-1], torch.tensor([prompt]), f"passkey {i + 1}/{config.passkey_items}"))
    for i in range(config.kv_items):
        prompt, answer = kv_prompt(tokenizer, config.kv_tokens, rng)
        out.probes.append(ProbeItem("kv_retrieval", None, torch.tensor(answer, device=dev)))
        pending.append((out.probes[-1], torch.tensor([prompt]), f"kv-retrieval {i + 1}/{config.kv_items}"))
    _prefill_all(model, pending, attention_sums, note)
    # equal-length items run as one batch: one forward serves them all (the weights are read once)
    identity = full_stages()
    rows = rows_that_fit(model, max((p[1].shape[1] for p in pending), default=1) + config.continuation_tokens,
                         attention_sums)
    for group in _groups(out.text, lambda it: (it.record.tokens, it.continuation.shape[1]), rows):
        record = merge_records([it.record for it in group])
        cont = torch.cat([it.continuation for it in group])
        ref = batch_logprobs(model, record, cont, identity, config.chunk)
        out.text_batches.append(TextBatch(record, cont, ref))
    for group in _groups(out.probes, lambda it: (it.record.tokens, it.answer.shape[0]), rows):
        ok = batch_probe_correct(model, merge_records([it.record for it in group]),
                                 torch.stack([it.answer for it in group]), identity, config.chunk)
        for it, good in zip(group, ok):
            it.full_correct = good
    for group in _groups([p for p in out.probes if p.full_correct], lambda it: (it.record.tokens, it.answer.shape[0]),
                         rows):
        out.probe_batches.append(ProbeBatch([it.kind for it in group], merge_records([it.record for it in group]),
                                            torch.stack([it.answer for it in group])))
    for it in [*out.text, *out.probes]:  # the batches hold the tensors now; keep one copy in memory
        it.tokens, it.record = it.record.tokens, None
    if config.multiturn_items:
        note(f"prefill multi-turn {config.multiturn_items} x {config.multiturn_tokens} tokens, "
             f"{config.multiturn_turns} turns")
        out.conversations = build_conversations(
            model, tokenizer, ids, items=config.multiturn_items, context_tokens=config.multiturn_tokens,
            facts=config.multiturn_facts, turns=config.multiturn_turns, seed=config.seed, attention_sums=attention_sums)
    out.prefill_seconds = time.perf_counter() - started
    return out


def full_stages() -> Stages:
    return Stages.of(Pipeline())


def batch_logprobs(model: Any, record: PrefillRecord, continuation: torch.Tensor, stages: Stages, chunk: int,
                   seed: int = 0) -> torch.Tensor:
    """Log-probs (B, C, V) at each continuation position: the first from the prompt's prefill logits (computed
    with the full cache, as in serving), the rest from teacher-forced chunks over the compressed cache."""
    dev = model.device
    cache = KVCache.from_record(record, stages, seed=seed, device=dev)
    rows = [record.last_logits.to(dev).float().log_softmax(-1).unsqueeze(1)]  # (B, 1, V) float32
    feed = continuation[:, :-1].to(dev)  # the last continuation token predicts nothing we score
    for start in range(0, feed.shape[1], chunk):
        logits = model(input_ids=feed[:, start : start + chunk], cache=cache, use_cache=True).logits
        rows.append(logits.float().log_softmax(-1))
    return torch.cat(rows, dim=1)


def batch_probe_correct(model: Any, record: PrefillRecord, answers: torch.Tensor, stages: Stages, chunk: int,
                        seed: int = 0) -> list[bool]:
    """Per row: would greedy decoding produce ``answers[row]`` under this pipeline? (teacher forced, exact)"""
    dev = model.device
    answers = answers.to(dev)
    ok = record.last_logits.to(dev).argmax(-1) == answers[:, 0]  # (B,)
    if answers.shape[1] > 1 and bool(ok.any()):
        cache = KVCache.from_record(record, stages, seed=seed, device=dev)
        feed = answers[:, :-1]
        preds = [model(input_ids=feed[:, a : a + chunk], cache=cache, use_cache=True).logits.argmax(-1)
                 for a in range(0, feed.shape[1], chunk)]
        ok &= (torch.cat(preds, dim=1) == answers[:, 1:]).all(dim=1)
    return [bool(x) for x in ok]


def scoring_chunk(stages: Stages, config: EvalConfig) -> int:
    """Tokens per teacher-forced forward: one for decode-time selectors (H2O, TOVA), which evict after every
    generated token as in generation, else ``config.chunk``."""
    return 1 if stages.selector is not None and stages.selector.decode_time else config.chunk


def probe_outcomes(model: Any, evalset: EvalSet, stages: Stages, config: EvalConfig, seed: int = 0) -> list[list[bool]]:
    """The probe slice of a trial: per probe batch (``evalset.probe_batches``), per row, whether the candidate
    still answers the item. :func:`evaluate_quality` computes exactly this; pass it back (``probes=``) so a
    candidate that continues after the slice is not scored on the probes twice."""
    chunk = scoring_chunk(stages, config)
    return [batch_probe_correct(model, b.record, b.answers, stages, chunk, seed) for b in evalset.probe_batches]


def probe_loss_bound(model: Any, evalset: EvalSet, stages: Stages, config: EvalConfig, seed: int = 0,
                     outcomes: list[list[bool]] | None = None) -> float | None:
    """Multi-fidelity stage 1: ``1 - probe_retention`` from the probe items alone (the cheap slice: a few answer
    tokens per item; ``outcomes`` when :func:`probe_outcomes` already ran). Every other term of ``quality_loss``
    is >= 0, so this is a lower bound on the candidate's full quality loss, exact in the probe term (same items,
    same scoring as :func:`evaluate_quality`). None when the full cache answers no probe item (no bound)."""
    counted = sum(p.full_correct for p in evalset.probes)
    if not counted:
        return None
    if outcomes is None:
        outcomes = probe_outcomes(model, evalset, stages, config, seed)
    return 1.0 - sum(sum(oks) for oks in outcomes) / counted


def evaluate_quality(model: Any, evalset: EvalSet, pipeline: Pipeline | Stages, config: EvalConfig,
                     seed: int = 0, probes: list[list[bool]] | None = None) -> QualityResult:
    """Measure one pipeline on a prepared evaluation set. ``probes``: this pipeline's :func:`probe_outcomes`
    on the same set when the multi-fidelity slice already computed them (same numbers, not run again)."""
    stages = pipeline if isinstance(pipeline, Stages) else Stages.of(pipeline)
    kls: list[torch.Tensor] = []
    agree = 0
    nll_cand = 0.0
    nll_full = 0.0
    n = 0
    # decode-time selectors (H2O, TOVA) evict after every generated token: feed one token per forward, as
    # generation does, rather than evicting once per teacher-forced chunk
    chunk = scoring_chunk(stages, config)
    for batch in evalset.text_batches:
        cand = batch_logprobs(model, batch.record, batch.continuation, stages, chunk, seed)  # (B, C, V)
        ref = batch.ref_logprobs
        kls.append((ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0).flatten())  # (B*C,) float32
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        target = batch.continuation.to(cand.device).unsqueeze(-1)  # (B, C, 1)
        nll_cand -= float(cand.gather(2, target).sum())
        nll_full -= float(ref.gather(2, target).sum())
        n += batch.continuation.numel()
    kl_all = torch.cat(kls) if kls else torch.zeros(1)
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    if probes is None:
        probes = probe_outcomes(model, evalset, stages, config, seed)
    elif [len(oks) for oks in probes] != [len(b.kinds) for b in evalset.probe_batches]:
        raise ValueError("probes= does not match this evaluation set's probe batches")
    for batch, oks in zip(evalset.probe_batches, probes):  # items the full cache answers
        for kind, ok in zip(batch.kinds, oks):
            by_kind.setdefault(kind, []).append((True, ok))
    for probe in evalset.probes:  # an item the full cache fails cannot count: a miss, not run
        if not probe.full_correct:
            by_kind.setdefault(probe.kind, []).append((False, False))
    counted = [(f, c) for items in by_kind.values() for f, c in items if f]
    retention = (sum(c for _f, c in counted) / len(counted)) if counted else None

    def acc(kind: str, which: int) -> float | None:
        rows = by_kind.get(kind)
        return None if not rows else sum(r[which] for r in rows) / len(rows)

    kl_mean = float(kl_all.mean())
    loss = kl_mean + (1.0 - retention if retention is not None else 0.0)
    mt = score_conversations(model, evalset.conversations, stages, seed)
    if mt is not None and mt.followup_retention is not None:
        loss += config.followup_weight * (1.0 - mt.followup_retention)
    return QualityResult(
        quality_loss=round(loss, 6),
        kl_mean=round(kl_mean, 6),
        kl_max=round(float(kl_all.max()), 6),
        top1_agreement=round(agree / max(1, n), 6),
        perplexity=round(math.exp(nll_cand / max(1, n)), 4),
        perplexity_full=round(math.exp(nll_full / max(1, n)), 4),
        passkey_accuracy=acc("passkey", 1),
        passkey_full_accuracy=acc("passkey", 0),
        kv_retrieval_accuracy=acc("kv_retrieval", 1),
        kv_retrieval_full_accuracy=acc("kv_retrieval", 0),
        probe_retention=None if retention is None else round(retention, 6),
        eval_tokens=n,
        eval_context_tokens=evalset.context_lengths,
        multiturn_turns=None if mt is None else mt.turns,
        turn_accuracy=None if mt is None else mt.turn_accuracy,
        turn_accuracy_full=None if mt is None else mt.turn_accuracy_full,
        turn1_retention=None if mt is None else mt.turn1_retention,
        followup_retention=None if mt is None else mt.followup_retention,
        multiturn_kl=None if mt is None else mt.kl_mean,
    )
