"""Per-length-bucket pipelines: one pipeline per part of the workload's prompt-length distribution.

A short prompt and a 30K-token one want different KV pipelines: at short context the weights dominate the decode
step and a lossy codec buys little, at long context the KV read dominates and eviction or a narrow codec pays.
This module splits the workload's requests by prompt length, searches each bucket on its own and recommends one
pipeline per bucket plus the routing rule (a prompt goes to the first bucket whose bound it does not exceed).

1. **Split** (:func:`split`). ``auto``: quantiles of the prompt lengths, three buckets when the trace spans more
   than a 16x range between its 10th and 90th percentile, two when more than 4x, else one (nothing to route).
   ``N``: N equal-count quantile buckets. Each bucket's *representative length* is its median prompt.
2. **Measure** (:func:`search_buckets`). Per bucket: an evaluation set at the representative length, *capped* at
   what the model answers reliably (:data:`QUALITY_CAP_TOKENS`; the bundled SmolLM2-135M finds a pass key up to
   about 4K tokens) or a quick run's cap (:data:`QUICK_CAP_TOKENS`), and the cap is reported; cost and the
   serving model priced over the bucket's own requests (its sub-mix; the trace replay keeps only them, so prefix
   reuse across buckets is not counted). Then a study per bucket (``--trials`` each).
3. **Cross-measure and pick.** Every bucket's pick is measured in every other bucket, so each bucket chooses
   among the same candidates: two buckets recommend different pipelines only when their measurements differ.
4. **Aggregate** (:func:`aggregate`) over the workload mix, for the routed set and for every single candidate:
   output tokens/s = total output tokens over the time each bucket's requests take at its pipeline's tokens/s
   (``sum(out) / sum(out_b / tps_b)``); quality loss, KV bytes per token and TTFT as request-share-weighted means.
   The best single pipeline is the candidate feasible in every bucket that the scenario prefers on these
   aggregates; the gain is the routed set's against it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from kvtune.errors import UserError
from kvtune.measure.quality import EvalConfig, EvalSet, build_eval_set
from kvtune.measure.replay import Replay
from kvtune.measure.serving import ServingModel, WorkloadMix
from kvtune.pipeline import Bucket, Pipeline
from kvtune.scenarios import Scenario
from kvtune.search import SearchContext, StudyOutcome, choose, feasible, measure, run_study

QUALITY_CAP_TOKENS = 4096  # the bundled model answers passkey reliably up to ~4K tokens
QUICK_CAP_TOKENS = 512  # --quick: seconds per trial on a CPU
MAX_AUTO = 3


@dataclass(frozen=True)
class LengthBucket:
    index: int
    max_input_tokens: int | None  # None: the last bucket (no bound)
    requests: tuple[tuple[int, int], ...]  # (input, output) tokens
    share: float  # fraction of the workload's requests
    representative: int  # median prompt length of the bucket
    measured_at: int  # the length quality is measured at (representative, capped)
    cap_reason: str | None  # why measured_at < representative

    @property
    def tokens(self) -> int:
        """Prompt plus output tokens of the bucket's requests."""
        return sum(i + o for i, o in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(o for _i, o in self.requests)

    def label(self, low: int) -> str:
        hi = f"{self.max_input_tokens:,}" if self.max_input_tokens is not None else "inf"
        return f"({low:,}, {hi}]" if self.index else f"[1, {hi}]"


def parse_buckets(value: str) -> int | None:
    """``auto`` -> None (decide from the trace), else a bucket count 1..16; :class:`UserError` otherwise."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--buckets {value}: expected 'auto' or a bucket count (1-16)") from None
    if not 1 <= n <= 16:
        raise UserError(f"--buckets {value}: expected 'auto' or a bucket count (1-16)")
    return n


def auto_count(inputs: list[int]) -> int:
    """How many buckets ``auto`` makes: 3 over a 16x p10-p90 range, 2 over 4x, else 1."""
    xs = sorted(inputs)
    p10, p90 = xs[int(0.1 * (len(xs) - 1))], xs[int(0.9 * (len(xs) - 1))]
    spread = p90 / max(1, p10)
    return MAX_AUTO if spread > 16 else 2 if spread > 4 else 1


def split(requests: list[tuple[int, int]], count: int | None, cap: int, cap_reason: str) -> list[LengthBucket]:
    """Quantile buckets of the prompt lengths (``count`` None: :func:`auto_count`). Equal lengths never straddle a
    bound; empty buckets are merged away, so fewer than ``count`` may come back."""
    if not requests:
        raise UserError("--buckets: the workload has no requests to split")
    xs = sorted(i for i, _ in requests)
    n = auto_count(xs) if count is None else count
    bounds = sorted({xs[min(len(xs) - 1, math.ceil(k * len(xs) / n) - 1)] for k in range(1, n)})
    out: list[LengthBucket] = []
    low = 0
    for hi in [*bounds, None]:
        members = tuple(r for r in requests if r[0] > low and (hi is None or r[0] <= hi))
        if not members:
            continue
        rep = int(statistics.median(i for i, _ in members))
        at = min(rep, cap)
        out.append(LengthBucket(index=len(out), max_input_tokens=hi, requests=members,
                                share=len(members) / len(requests), representative=rep, measured_at=at,
                                cap_reason=cap_reason if at < rep else None))
        low = hi if hi is not None else low
    if out[-1].max_input_tokens is not None:  # the last bucket routes every longer prompt
        out[-1] = dataclasses.replace(out[-1], max_input_tokens=None)
    return out


def bucket_eval_config(base: EvalConfig, tokens: int) -> EvalConfig:
    """The base evaluation set with every context at ``tokens`` (the continuation and item counts kept)."""
    return dataclasses.replace(base, context_tokens=tokens, passkey_tokens=tokens, kv_tokens=tokens,
                               multiturn_tokens=tokens)


def bucket_context(ctx: SearchContext, bucket: LengthBucket, tokenizer: Any, attention_sums: bool,
                   progress: Callable[[str], None] | None = None,
                   shared: dict[int, tuple[EvalSet, EvalConfig, dict[str, Any]]] | None = None) -> SearchContext:
    """A search context for one bucket: its evaluation set at the measured length, cost at its representative
    length, the serving model over its own requests. ``shared`` (measured length -> evaluation set, its config and
    quality memo) lets buckets measured at the same length (capped ones) prefill once and measure each pipeline's
    quality once: quality depends on the evaluation set only, cost and serving on the bucket."""
    t = ctx.target
    shared = {} if shared is None else shared
    if bucket.measured_at not in shared:
        cfg = bucket_eval_config(ctx.eval_config, bucket.measured_at)
        started = time.perf_counter()
        evalset = build_eval_set(ctx.model, tokenizer, cfg, attention_sums=attention_sums, progress=progress)
        if progress:
            progress(f"evaluation set at {bucket.measured_at:,} tokens: {len(evalset.text)} text prompts, "
                     f"{len(evalset.probes)} probes (the full cache answers {sum(p.full_correct for p in evalset.probes)}), "
                     f"prefilled once in {time.perf_counter() - started:.0f} s")
        shared[bucket.measured_at] = (evalset, cfg, {})
    evalset, cfg, memo = shared[bucket.measured_at]
    sv = t.serving
    members = set(bucket.requests)
    replay = None if sv.replay is None else Replay(
        [r for r in sv.replay.requests if (r.input_tokens, r.output_tokens) in members],
        f"{sv.replay.name} bucket {bucket.index + 1}")
    mix = WorkloadMix.from_requests(list(bucket.requests), f"bucket {bucket.index + 1}")
    serving = ServingModel(sv.spec, params=sv.params, weights_bytes=sv.weights_bytes, device=sv.device,
                           tiers=sv.tiers, mix=mix, tpot_ms=sv.tpot_ms, replay=replay, prefix_caching=sv.prefix_caching)
    cost = dataclasses.replace(t.cost, context_tokens=bucket.representative)
    return dataclasses.replace(ctx, evalset=evalset, eval_config=cfg, quality_memo=memo,
                               target=dataclasses.replace(t, serving=serving, cost=cost))


@dataclass
class Aggregate:
    tokens_per_s: float
    quality_loss: float
    bytes_per_token: float
    ttft_ms: float
    feasible: bool  # feasible in every bucket


def aggregate(per_bucket: list[Pipeline], buckets: list[LengthBucket], scenario: Scenario) -> Aggregate:
    """Figures over the workload mix of running ``per_bucket[i]`` (measured in bucket i) on bucket i's requests."""
    out_tokens = [b.output_tokens for b in buckets]
    time_s = 0.0
    for p, out in zip(per_bucket, out_tokens):
        tps = p.measured.serving.tokens_per_s if p.measured and p.measured.serving else 0.0
        time_s = math.inf if tps <= 0 else time_s + out / tps
    share = [b.share for b in buckets]

    def mean(f: Callable[[Pipeline], float]) -> float:
        return sum(s * f(p) for s, p in zip(share, per_bucket))

    return Aggregate(
        tokens_per_s=0.0 if math.isinf(time_s) else sum(out_tokens) / time_s,
        quality_loss=mean(lambda p: p.measured.quality.quality_loss),  # type: ignore[union-attr]
        bytes_per_token=mean(lambda p: p.measured.cost.bytes_per_token),  # type: ignore[union-attr]
        ttft_ms=mean(lambda p: p.measured.serving.ttft_ms if p.measured.serving else math.inf),  # type: ignore[union-attr]
        feasible=all(feasible(p, scenario) for p in per_bucket),
    )


def preference_key(a: Aggregate, prefer: str) -> tuple:
    """Smaller is better, as :func:`kvtune.search.choose` orders a front."""
    q, sp, b = a.quality_loss, (a.ttft_ms if prefer == "ttft" else -a.tokens_per_s), a.bytes_per_token
    return {"throughput": (sp, q, b), "ttft": (sp, q, b), "memory": (b, q, sp), "quality": (q, sp, b)}[prefer]


@dataclass
class BucketResult:
    buckets: list[LengthBucket]
    outcomes: list[StudyOutcome]
    measured: list[dict[str, Pipeline]]  # per bucket: label -> candidate measured in that bucket
    pool: list[str]  # labels every bucket chooses among (each bucket's pick and the full cache), measured in every one
    picks: list[Pipeline]  # per bucket, measured there
    single: Pipeline | None  # the best single pipeline (its label; measured per bucket in ``measured``)
    routed: Aggregate
    single_agg: Aggregate | None
    notes: list[str] = field(default_factory=list)

    def token_share(self, bucket: LengthBucket) -> float:
        """The bucket's share of the workload's prompt plus output tokens."""
        return bucket.tokens / max(1, sum(b.tokens for b in self.buckets))

    @property
    def gain(self) -> float | None:
        """Routed tokens/s over the best single pipeline's, minus 1 (None without a feasible single one)."""
        if self.single_agg is None or self.single_agg.tokens_per_s <= 0:
            return None
        return self.routed.tokens_per_s / self.single_agg.tokens_per_s - 1.0

    def document(self, single: Pipeline) -> Pipeline:
        """The per-bucket pipeline document (schema version 2): top-level stages = the best single pipeline (what
        a stack that cannot route runs), ``buckets`` = each bucket's pick and its measurements."""
        return single.model_copy(update={"schema_version": 2, "buckets": [
            Bucket(max_input_tokens=b.max_input_tokens, selection=p.selection, codec=p.codec, placement=p.placement,
                   share=round(b.share, 6), measured_at_tokens=b.measured_at, measured=p.measured)
            for b, p in zip(self.buckets, self.picks)]})


def search_buckets(ctx: SearchContext, buckets: list[LengthBucket], tokenizer: Any, *, trials: int, storage: str,
                   study_name: str, model_source: str, attention_sums: bool,
                   on_trial: Callable[[int, Pipeline | None, str, bool], None] | None = None,
                   progress: Callable[[str], None] | None = None) -> BucketResult:
    """Steps 2-4 of the module docstring."""
    shared: dict[int, tuple[EvalSet, EvalConfig, dict[str, Any]]] = {}
    contexts = [bucket_context(ctx, b, tokenizer, attention_sums, progress, shared) for b in buckets]
    outcomes, measured = [], []
    for b, bctx in zip(buckets, contexts):
        if progress:
            progress(f"bucket {b.index + 1}/{len(buckets)} ({b.share:.0%} of requests): {trials} trials, quality at "
                     f"{b.measured_at:,} tokens, cost and serving at its median prompt {b.representative:,} over its "
                     f"{len(b.requests):,} requests")
        out = run_study(bctx, trials=trials, storage=storage, study_name=f"{study_name}/bucket-{b.index + 1}-of-"
                        f"{len(buckets)}", model_source=model_source, on_trial=on_trial)
        outcomes.append(out)
        measured.append({p.label(): p for p in out.trials})
    candidates: dict[str, Pipeline] = {}
    for out, bctx in zip(outcomes, contexts):
        pick, _ok = choose(out.trials, bctx.scenario)
        if pick is not None:
            candidates.setdefault(pick.label(), pick)
    for full in (p for out in outcomes for p in out.trials if p.is_identity()):
        candidates.setdefault(full.label(), full)  # the full cache: always a single-pipeline candidate
        break
    for i, bctx in enumerate(contexts):  # every candidate measured in every bucket
        for label, p in candidates.items():
            if label not in measured[i]:
                if progress:
                    progress(f"bucket {i + 1}: cross-measuring {label}")
                measured[i][label] = measure(bctx, p.model_copy(update={"measured": None}))
    scen = ctx.scenario
    picks = []
    for i in range(len(buckets)):
        pool = [measured[i][label] for label in candidates]
        picks.append(choose(pool, scen)[0])
    routed = aggregate(picks, buckets, scen)
    singles = {label: aggregate([measured[i][label] for i in range(len(buckets))], buckets, scen)
               for label in candidates}
    ok = {k: a for k, a in singles.items() if a.feasible}
    best = min(ok, key=lambda k: preference_key(ok[k], scen.prefer)) if ok else None
    notes = [f"bucket {b.index + 1}: quality measured at {b.measured_at:,} tokens, not its median "
             f"{b.representative:,} ({b.cap_reason})" for b in buckets if b.cap_reason]
    return BucketResult(buckets=buckets, outcomes=outcomes, measured=measured, pool=list(candidates), picks=picks,
                        single=candidates[best] if best else None, routed=routed,
                        single_agg=ok[best] if best else None, notes=notes)
