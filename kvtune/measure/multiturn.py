"""Multi-turn follow-up probes: several questions about one shared context, the cache persisting between turns.

Why: query-aware eviction (SnapKV, H2O-style) keeps what the *current* question needs; SCBench (Li et al., ICLR
2025) and KVzip (Kim et al., 2025) show it then loses the answers to follow-up questions about other parts of
the same context. A single-question probe cannot see that.

An item (:class:`Conversation`):

* the **context**: one user message of natural text (``pydoc_data.topics``, exactly ``multiturn_tokens`` tokens
  with the chat header) holding ``multiturn_facts`` *competing* facts of one kind (:data:`FACT_KINDS`) — "The
  Vega server is located in Lisbon." with a different name and city each (:data:`DEFAULT_KIND`), or "The access
  code of the Vega server is 40721." — at evenly spread depths (recorded per fact);
* ``multiturn_turns`` **turns**, each asking about a different fact, in a seeded order. The assistant turn starts
  with the fact's lead-in ("The Vega server is located in") and the answer is the value (`` Lisbon``), teacher
  forced: a turn counts as answered when greedy decoding would produce every answer token. The conversation
  goes on with the right answer whatever the candidate said, as a chat transcript does.

How a turn runs (:func:`run_conversation`), with the cache persisting across turns as a server keeps it: the
context comes from its prefill record (computed once per study with the full cache). Each turn feeds its prompt
(the rest of the previous answer, the next question, the assistant prefix) after ``KVCache.begin_turn()``, all
but the prompt's last token in one forward; prefill-time selectors select right after it with the turn's
queries in their window (at turn 1: over the whole context, the question included, as SnapKV at the end of a
prefill; later turns: over what they kept), a spilling selector recalls the top pages; query-agnostic selectors
selected at the end of the context. Then the prompt's last token and the answer are fed teacher forced — one
token per forward for decode-time selectors (H2O, TOVA evict after every token, as in generation), one chunk
otherwise — so every answer token, the first included, is predicted over the cache the stage leaves.

Full-cache references (which turns the full cache answers, and its log-probabilities on the answer tokens) are
computed once per study; conversations of equal shape run as one batch. A turn counts only if the full cache
answers it; ``followup_retention`` is the fraction of the counted follow-up turns (turn >= 2) the candidate
also answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtune.runtime import KVCache, PrefillRecord, prefill_record
from kvtune.strategies import Stages

NAMES = ("Vega", "Lyra", "Draco", "Hydra", "Perseus", "Orion", "Atlas", "Cygnus", "Auriga", "Carina", "Cetus",
         "Lupus", "Pavo", "Volans", "Mensa", "Norma", "Pictor", "Sagitta", "Tucana", "Octans")
INSTRUCTION = "Read the document below. I will ask you several questions about it.\n\n"
CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Dublin", "Vienna",
          "Prague", "Lisbon", "Athens", "Moscow", "Sydney", "Toronto", "Boston", "Seoul", "Delhi")


@dataclass(frozen=True)
class FactKind:
    """One kind of competing fact: the sentence placed in the document, the question, the answer's lead-in (the
    assistant turn starts with it, so the answer is the value alone) and how values are drawn."""

    sentence: str  # with {name} and {value}
    question: str  # with {name}
    lead: str  # with {name}; the answer `` {value}`` follows it
    draw: Any  # (rng, count) -> distinct values


FACT_KINDS: dict[str, FactKind] = {
    "code": FactKind("The access code of the {name} server is {value}.", "What is the access code of the {name} server?",
                     "The access code of the {name} server is",
                     lambda rng, n: [str(v) for v in rng.sample(range(10000, 100000), n)]),
    "city": FactKind("The {name} server is located in {value}.", "In which city is the {name} server located?",
                     "The {name} server is located in", lambda rng, n: rng.sample(CITIES, n)),
}
# The kind every evaluation uses unless told otherwise. Cities, because the bundled model answers them with the
# full cache where it misses five-digit codes: on the default recommend's probe (seed 0, two conversations of
# 1536 tokens, four facts, two turns) cities 1/2 first turns and 2/2 follow-ups, codes 1/2 and 0/2; on six
# conversations of three turns cities 4/6, 6/6, 4/6 per turn, codes 5/6, 3/6, 3/6. A turn the full cache misses
# cannot count, so with codes the default probe's follow-up check could never reject a candidate.
DEFAULT_KIND = "city"


@dataclass
class Fact:
    name: str
    value: str  # five digits
    position: int  # token index in the context where the fact sentence starts
    depth: float  # position / context tokens


@dataclass
class Turn:
    prompt: torch.Tensor  # (Q,) ids fed before the answer: previous answer's tail, the question, the assistant prefix
    answer: torch.Tensor  # (A,) ids of the expected answer
    fact: int  # index into Conversation.facts


@dataclass
class Conversation:
    context: torch.Tensor  # (T,) ids of the shared context (chat header, instruction, document)
    facts: list[Fact]
    turns: list[Turn]
    record: PrefillRecord | None = None  # dropped once merged into a batch
    full_correct: list[bool] = field(default_factory=list)  # per turn

    def shape(self) -> tuple:
        return (self.context.shape[0], *[(t.prompt.shape[0], t.answer.shape[0]) for t in self.turns])


@dataclass
class ConversationBatch:
    """Conversations of equal shape, run as one batch; full-cache references computed once."""

    record: PrefillRecord  # (B, T)
    prompts: list[torch.Tensor]  # per turn (B, Q)
    answers: list[torch.Tensor]  # per turn (B, A)
    full_correct: torch.Tensor  # (B, turns) bool
    full_logprobs: list[torch.Tensor]  # per turn (B, A, V) float32


def _chat_pieces(tokenizer: Any) -> tuple[str, str, str, str]:
    """Chat-template text around the turns: (before the first user message, between a user message and the
    assistant's, between the assistant's and the next user message, after the last user message)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "\x01"}, {"role": "assistant", "content": "\x02"},
             {"role": "user", "content": "\x03"}], tokenize=False, add_generation_prompt=True)
        head, rest = text.split("\x01")
        to_assistant, rest = rest.split("\x02")
        to_user, after = rest.split("\x03")
        return head, to_assistant, to_user, after
    return "", "\n\nAnswer: ", "\n\nQuestion: ", "\n\nAnswer: "


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _name_pool(tokenizer: Any, count: int) -> list[str]:
    """Names that tokenize to the same number of tokens inside the question (so conversations batch)."""
    by_len: dict[int, list[str]] = {}
    for name in NAMES:
        by_len.setdefault(len(_ids(tokenizer, f" the {name} server")), []).append(name)
    pool = max(by_len.values(), key=len)
    if len(pool) < count:
        pool = list(NAMES)
    return pool


def build_conversation(tokenizer: Any, document_ids: list[int], context_tokens: int, facts: int, turns: int,
                       rng: random.Random, kind: str = DEFAULT_KIND) -> Conversation:
    """One conversation: ``facts`` facts at depths (i + 0.5) / facts of a context of exactly ``context_tokens``
    tokens cut from ``document_ids`` (whole text, random start), then ``turns`` questions about distinct facts."""
    if not 1 <= turns <= facts:
        raise ValueError(f"turns must be in 1..facts ({facts}), got {turns}")
    head, to_assistant, to_user, after = _chat_pieces(tokenizer)
    header = _ids(tokenizer, head + INSTRUCTION)
    fk = FACT_KINDS[kind]
    names = rng.sample(_name_pool(tokenizer, facts), facts)
    values = fk.draw(rng, facts)
    sentences = [_ids(tokenizer, "\n\n" + fk.sentence.format(name=n, value=v) + "\n\n") for n, v in zip(names, values)]
    body_len = context_tokens - len(header) - sum(len(s) for s in sentences)
    if body_len < 8 * facts:
        raise ValueError(f"multiturn context of {context_tokens} tokens is too short for {facts} facts")
    start = rng.randrange(0, max(1, len(document_ids) - body_len))
    body = document_ids[start : start + body_len]
    ids = list(header)
    placed: list[Fact] = []
    cut = 0
    for i, (name, value, sent) in enumerate(zip(names, values, sentences)):
        at = round((i + 0.5) / facts * body_len)
        ids += body[cut:at]
        cut = at
        placed.append(Fact(name, value, len(ids), 0.0))
        ids += sent
    ids += body[cut:]
    for f in placed:
        f.depth = f.position / len(ids)
    order = rng.sample(range(facts), turns)
    out_turns = []
    for t, which in enumerate(order):
        name = names[which]
        question = fk.question.format(name=name)
        if t == 0:
            text = "\n\n" + question + to_assistant + fk.lead.format(name=name)
        else:
            text = "." + to_user + question + after + fk.lead.format(name=name)
        out_turns.append(Turn(torch.tensor(_ids(tokenizer, text)), torch.tensor(_ids(tokenizer, f" {values[which]}")),
                              which))
    return Conversation(torch.tensor(ids), placed, out_turns)


MIN_TURNS, MAX_TURNS = 2, 4


def probe_turns(workload: Any, facts: int, default: int) -> tuple[int, str]:
    """Turns per probe conversation from the workload's multi-turn structure, and where the number came from.

    ``workload`` is a :class:`~kvtune.profile.schema.WorkloadProfile` (or None). Sessions in the trace: the median
    turns per session. Else prefix reuse (Mooncake ``hash_ids``): a conversation of n equal turns re-reads about
    (n - 1) / n of its input, so n = 1 / (1 - reuse). Clamped to 2..min(4, facts): one follow-up at least, and
    each turn asks about a different fact."""
    hi = min(MAX_TURNS, facts)
    stats = getattr(workload, "turns_per_session", None)
    if stats is not None:
        n = max(MIN_TURNS, min(hi, int(stats.p50)))
        return n, f"median turns per session of the trace ({stats.p50}), clamped to {MIN_TURNS}..{hi}"
    reuse = getattr(workload, "prefix_reuse_ratio", None)
    if reuse is not None:
        raw = 1.0 / max(1e-6, 1.0 - float(reuse))
        n = max(MIN_TURNS, min(hi, round(raw)))
        return n, (f"prefix reuse of the trace ({100 * float(reuse):.0f}% of input tokens, ~{raw:.1f} turns per "
                   f"conversation), clamped to {MIN_TURNS}..{hi}")
    return default, "default (the workload has no sessions or prefix reuse)"


def run_conversation(model: Any, record: PrefillRecord, prompts: list[torch.Tensor], answers: list[torch.Tensor],
                     stages: Stages, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], KVCache]:
    """Run every turn over one persisting cache. prompts/answers: per turn (B, Q) / (B, A).

    Returns (correct (B, turns) bool, per-turn log-probs (B, A, V) at the answer positions, the cache)."""
    cache = KVCache.from_record(record, stages, seed=seed, defer_selection=True)
    dev = record.last_logits.device
    per_token = stages.selector is not None and stages.selector.decode_time
    carry: torch.Tensor | None = None  # the previous answer's last token, not yet fed
    correct, logprobs = [], []
    for prompt, answer in zip(prompts, answers):
        prompt, answer = prompt.to(dev), answer.to(dev)
        head = prompt[:, :-1] if carry is None else torch.cat([carry, prompt[:, :-1]], dim=1)
        cache.begin_turn()
        model(input_ids=head, cache=cache, use_cache=True, logits_to_keep=1)
        feed = torch.cat([prompt[:, -1:], answer[:, :-1]], dim=1)  # (B, A): position i predicts answer[:, i]
        if per_token:
            logits = torch.cat([model(input_ids=feed[:, i : i + 1], cache=cache, use_cache=True).logits
                                for i in range(feed.shape[1])], dim=1)
        else:
            logits = model(input_ids=feed, cache=cache, use_cache=True).logits
        lp = logits.float().log_softmax(-1)  # (B, A, V)
        logprobs.append(lp)
        correct.append((lp.argmax(-1) == answer).all(dim=1))
        carry = answer[:, -1:]
    return torch.stack(correct, dim=1), logprobs, cache


def build_conversations(model: Any, tokenizer: Any, document_ids: list[int], *, items: int, context_tokens: int,
                        facts: int, turns: int, seed: int, attention_sums: bool,
                        kind: str = DEFAULT_KIND) -> list[ConversationBatch]:
    """Build, prefill once and reference (full cache) every conversation; equal shapes share a batch."""
    from kvtune.measure.quality import full_stages, merge_records  # quality imports this module

    rng = random.Random(seed * 7919 + 11)
    convs = [build_conversation(tokenizer, document_ids, context_tokens, facts, turns, rng, kind) for _ in range(items)]
    dev = model.device
    for c in convs:
        c.record = prefill_record(model, c.context.view(1, -1).to(dev), attention_sums=attention_sums)
    groups: dict[tuple, list[Conversation]] = {}
    for c in convs:
        groups.setdefault(c.shape(), []).append(c)
    batches = []
    identity = full_stages()
    for group in groups.values():
        record = merge_records([c.record for c in group])  # type: ignore[misc]
        prompts = [torch.stack([c.turns[t].prompt for c in group]).to(dev) for t in range(turns)]
        answers = [torch.stack([c.turns[t].answer for c in group]).to(dev) for t in range(turns)]
        ok, lps, _cache = run_conversation(model, record, prompts, answers, identity)
        for c, row in zip(group, ok.tolist()):
            c.full_correct = row
            c.record = None  # the batch holds the tensors now
        batches.append(ConversationBatch(record, prompts, answers, ok, lps))
    return batches


@dataclass
class MultiTurnScores:
    turn_accuracy: list[float]  # candidate, per turn, over every conversation
    turn_accuracy_full: list[float]
    turn1_retention: float | None  # of turn-1 items the full cache answers, the fraction the candidate answers
    followup_retention: float | None  # the same over turns >= 2
    kl_mean: float  # KL(full || candidate) on the answer tokens, mean
    turns: int


def score_conversations(model: Any, batches: list[ConversationBatch], stages: Stages, seed: int = 0) -> MultiTurnScores | None:
    """Run a candidate over every conversation batch and compare with the full-cache references."""
    if not batches:
        return None
    oks, fulls, kls = [], [], []
    for b in batches:
        ok, lps, _cache = run_conversation(model, b.record, b.prompts, b.answers, stages, seed)
        oks.append(ok.cpu())
        fulls.append(b.full_correct.cpu())
        for ref, cand in zip(b.full_logprobs, lps):
            kls.append((ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0).flatten().cpu())
    ok, full = torch.cat(oks), torch.cat(fulls)  # (N, turns)
    cand = ok & full  # a turn the full cache fails cannot count

    def retention(cols: slice) -> float | None:
        n = int(full[:, cols].sum())
        return None if n == 0 else round(int(cand[:, cols].sum()) / n, 6)

    return MultiTurnScores(
        turn_accuracy=[round(float(x), 6) for x in cand.float().mean(0)],
        turn_accuracy_full=[round(float(x), 6) for x in full.float().mean(0)],
        turn1_retention=retention(slice(0, 1)),
        followup_retention=retention(slice(1, None)),
        kl_mean=round(float(torch.cat(kls).mean()), 6),
        turns=int(full.shape[1]),
    )
