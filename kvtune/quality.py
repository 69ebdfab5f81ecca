"""Quality of a pipeline, always against the same model with the full cache.

The evaluation set (built once per study, "prefill once, compress many"):

* **text** — real English prose from ``pydoc_data.topics`` (shipped with every Python). Each item is a context
  of ``context_tokens`` followed by ``continuation_tokens``. The context is prefilled once with the full cache
  (:func:`kvtune.runtime.prefill_record`); the full-cache log-probabilities of the continuation are computed once.
  A trial builds the compressed cache from the record and feeds the continuation (teacher forced) in chunks
  of ``chunk`` tokens, so decode-time selectors act between chunks. Metrics: KL(full || candidate) per
  position, top-1 agreement, perplexity of the true continuation.
* **passkey** — a five-digit pass key hidden in filler text, the question stated before the context and again
  at the end (the layout the default model can answer). The answer is teacher forced: an item counts as
  answered when greedy decoding would produce every answer token, which is the same as every forced position
  having the right argmax.
* **key-value retrieval** — a JSON object of random keys and values; the model must return the value of one
  key. Small models fail this even with the full cache.

A probe item counts only if the full cache answers it: ``probe_retention`` is the fraction of those items the
candidate also answers. The search objective is ``quality_loss = kl_mean + (1 - probe_retention)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kvtune.pipeline import Pipeline, QualityResult
from kvtune.runtime import KVCache, PrefillRecord, Stages, prefill_record

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class EvalConfig:
    """Sizes of the evaluation set. Defaults fit the default ``recommend`` in a few minutes on 2 CPU cores."""

    text_prompts: int = 3
    context_tokens: int = 1536
    continuation_tokens: int = 64
    chunk: int = 16
    passkey_items: int = 8
    passkey_tokens: int = 1536
    kv_items: int = 2
    kv_tokens: int = 1024
    seed: int = 0

    @classmethod
    def quick(cls) -> "EvalConfig":
        """Seconds, not minutes: for tests and smoke runs."""
        return cls(text_prompts=1, context_tokens=256, continuation_tokens=16, chunk=8, passkey_items=2,
                   passkey_tokens=256, kv_items=1, kv_tokens=256)


@dataclass
class TextItem:
    record: PrefillRecord
    continuation: torch.Tensor  # (1, C) token ids
    ref_logprobs: torch.Tensor  # (C, V) full-cache log-probs at each continuation position


@dataclass
class ProbeItem:
    kind: str  # "passkey" | "kv_retrieval"
    record: PrefillRecord
    answer: torch.Tensor  # (A,) token ids of the expected answer
    full_correct: bool = False


@dataclass
class EvalSet:
    text: list[TextItem] = field(default_factory=list)
    probes: list[ProbeItem] = field(default_factory=list)
    prefill_seconds: float = 0.0

    @property
    def context_lengths(self) -> list[int]:
        return [it.record.tokens for it in self.text] + [it.record.tokens for it in self.probes]


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
    ids = tokenizer(pydoc_text(), add_special_tokens=False).input_ids
    span = config.context_tokens + config.continuation_tokens
    if config.text_prompts:
        stride = max(span, (len(ids) - span) // config.text_prompts)
        for i in range(config.text_prompts):
            start = i * stride
            piece = torch.tensor([ids[start : start + span]])
            if piece.shape[1] < span:
                break
            note(f"prefill text {i + 1}/{config.text_prompts} ({config.context_tokens} tokens)")
            record = prefill_record(model, piece[:, : config.context_tokens], attention_sums=attention_sums)
            cont = piece[:, config.context_tokens :]
            item = TextItem(record, cont, torch.empty(0))
            item.ref_logprobs = continuation_logprobs(model, item, full_stages(), config.chunk)
            out.text.append(item)
    rng = random.Random(config.seed)
    for i in range(config.passkey_items):
        key = str(rng.randrange(10000, 100000))
        depth = (i + 0.5) / config.passkey_items
        prompt, answer = passkey_prompt(tokenizer, config.passkey_tokens, depth, key)
        note(f"prefill passkey {i + 1}/{config.passkey_items} ({len(prompt)} tokens)")
        record = prefill_record(model, torch.tensor([prompt]), attention_sums=attention_sums)
        out.probes.append(ProbeItem("passkey", record, torch.tensor(answer)))
    for i in range(config.kv_items):
        prompt, answer = kv_prompt(tokenizer, config.kv_tokens, rng)
        note(f"prefill kv-retrieval {i + 1}/{config.kv_items} ({len(prompt)} tokens)")
        record = prefill_record(model, torch.tensor([prompt]), attention_sums=attention_sums)
        out.probes.append(ProbeItem("kv_retrieval", record, torch.tensor(answer)))
    for item in out.probes:
        item.full_correct = probe_correct(model, item, full_stages(), config.chunk)
    out.prefill_seconds = time.perf_counter() - started
    return out


def full_stages() -> Stages:
    return Stages.of(Pipeline())


def continuation_logprobs(model: Any, item: TextItem, stages: Stages, chunk: int, seed: int = 0) -> torch.Tensor:
    """Log-probs (C, V) at each continuation position: the first from the prompt's prefill logits (computed
    with the full cache, as in serving), the rest from teacher-forced chunks over the compressed cache."""
    cache = KVCache.from_record(item.record, stages, seed=seed)
    cont = item.continuation
    rows = [item.record.last_logits[0].log_softmax(-1)]
    feed = cont[:, :-1]  # the last continuation token predicts nothing we score
    for start in range(0, feed.shape[1], chunk):
        piece = feed[:, start : start + chunk]
        logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits[0].float()
        rows.append(logits.log_softmax(-1))
    return torch.cat([r.view(-1, r.shape[-1]) for r in rows], dim=0)


def probe_correct(model: Any, item: ProbeItem, stages: Stages, chunk: int, seed: int = 0) -> bool:
    """Would greedy decoding produce ``item.answer`` under this pipeline? (teacher forced, exact)"""
    answer = item.answer
    if int(item.record.last_logits[0].argmax()) != int(answer[0]):
        return False
    if answer.shape[0] == 1:
        return True
    cache = KVCache.from_record(item.record, stages, seed=seed)
    feed = answer[:-1].view(1, -1)
    preds = []
    for start in range(0, feed.shape[1], chunk):
        logits = model(input_ids=feed[:, start : start + chunk], past_key_values=cache, use_cache=True).logits
        preds.append(logits[0].argmax(-1))
    return bool(torch.equal(torch.cat(preds), answer[1:]))


def evaluate_quality(model: Any, evalset: EvalSet, pipeline: Pipeline | Stages, config: EvalConfig,
                     seed: int = 0) -> QualityResult:
    """Measure one pipeline on a prepared evaluation set."""
    stages = pipeline if isinstance(pipeline, Stages) else Stages.of(pipeline)
    kls: list[torch.Tensor] = []
    agree = 0
    nll_cand = 0.0
    nll_full = 0.0
    n = 0
    for item in evalset.text:
        cand = continuation_logprobs(model, item, stages, config.chunk, seed)
        ref = item.ref_logprobs
        kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0)  # (C,)
        kls.append(kl)
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        target = item.continuation[0]
        nll_cand -= float(cand.gather(1, target.view(-1, 1)).sum())
        nll_full -= float(ref.gather(1, target.view(-1, 1)).sum())
        n += target.shape[0]
    kl_all = torch.cat(kls) if kls else torch.zeros(1)
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    for probe in evalset.probes:
        ok = probe_correct(model, probe, stages, config.chunk, seed)
        by_kind.setdefault(probe.kind, []).append((probe.full_correct, ok))
    counted = [(f, c) for items in by_kind.values() for f, c in items if f]
    retention = (sum(c for _f, c in counted) / len(counted)) if counted else None

    def acc(kind: str, which: int) -> float | None:
        rows = by_kind.get(kind)
        return None if not rows else sum(r[which] for r in rows) / len(rows)

    kl_mean = float(kl_all.mean())
    loss = kl_mean + (1.0 - retention if retention is not None else 0.0)
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
    )
