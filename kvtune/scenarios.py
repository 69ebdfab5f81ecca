"""Deployment scenarios: constraints on the search space plus a preference over the Pareto front.

A scenario is data, not a code path. It says which methods each axis may use, how much quality loss a
candidate may have and still count as feasible, and which measured figure decides among the feasible
Pareto-optimal candidates. The seven follow the deployment settings of the KV-cache survey literature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtune.errors import UserError
from kvtune.strategies import NONE, SELECTORS, multiturn_safe

BASELINES = ("random",)  # measured by benchmarks/strategies.py for every report, never worth searching
# every registered selector (built-in order), so a new strategy is searched wherever a scenario allows "any"
ALL_SELECTION = (NONE, *(name for name in SELECTORS if name not in BASELINES))
ALL_CODECS = ("fp16", "fp8", "int8", "kivi", "lowrank", "mixed")
LOSSLESS_CODECS = ("fp16",)
ALL_PLACEMENTS = ("gpu", "offload")

# what decides among feasible Pareto-optimal candidates (figures from kvtune.measure.serving)
PREFERENCES = {
    "throughput": "most output tokens/s at the TPOT target on the target hardware, prefill included (then lower "
                  "quality loss)",
    "memory": "fewest KV bytes per token, i.e. the longest context that fits (then lower quality loss)",
    "ttft": "shortest time to first token of the median prompt (then lower quality loss)",
    "quality": "lowest quality loss (then more tokens/s)",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    selection: tuple[str, ...]
    codecs: tuple[str, ...]
    placements: tuple[str, ...]
    max_quality_loss: float  # feasibility: quality_loss must be <= this
    prefer: str  # a key of PREFERENCES
    tpot_ms: float = 100.0  # default time-per-output-token target (--tpot-ms overrides)
    prefix_caching: bool = True
    why: str = ""
    advice: tuple[str, ...] = field(default=())
    offload_tiers: tuple[str, ...] = ("cpu",)  # where offload may put KV; recommend sets it from the hardware
    # follow-up turns: reject a candidate whose follow-up retention (1.0 for the full cache, by definition) is
    # lower than the full cache's by more than this; None = not checked
    max_followup_drop: float | None = None
    # the serving stack the search is narrowed to (kvtune.stacks.StackProfile, set by --stack); its variants fix
    # parameters that carry the stack's numerics. None: every method the scenario allows.
    stack: Any = None

    def allows(self, axis: str, method: str) -> bool:
        return method in {"selection": self.selection, "codec": self.codecs, "placement": self.placements}[axis]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "summary": self.summary, "selection": list(self.selection),
            "codecs": list(self.codecs), "placements": list(self.placements),
            "max_quality_loss": self.max_quality_loss, "prefer": self.prefer, "tpot_ms": self.tpot_ms,
            "prefer_means": PREFERENCES[self.prefer], "prefix_caching": self.prefix_caching, "why": self.why,
            "advice": list(self.advice), "max_followup_drop": self.max_followup_drop,
        }


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "long-context", "a single request beyond 1M tokens", ALL_SELECTION, ALL_CODECS, ALL_PLACEMENTS,
            max_quality_loss=0.5, prefer="memory", prefix_caching=False, tpot_ms=200.0,
            why="the KV of one sequence outgrows GPU memory: every byte per token counts, moderate loss accepted",
            advice=("Prefer models whose attention keeps KV small: GQA with few KV heads, MLA latent KV "
                    "(DeepSeek-V2/V3), or interleaved sliding-window layers (Gemma 2/3).",),
        ),
        Scenario(
            "minimal-change", "no model or kernel modification: stock serving-stack flags only",
            ("none",), ("fp16", "fp8"), ALL_PLACEMENTS,
            max_quality_loss=0.05, prefer="throughput",
            why="only what vLLM/SGLang/TensorRT-LLM support natively: fp8 KV and CPU offload, no eviction",
            advice=("Without runtime changes the remaining lever is the model: a GQA model with fewer KV heads "
                    "(Llama 3, Qwen 2.5) or an MLA model (DeepSeek-V2/V3) stores several times less KV per "
                    "token than an MHA one of the same size.",),
        ),
        Scenario(
            "datacenter", "high-throughput serving of many concurrent requests", ALL_SELECTION, ALL_CODECS,
            ("gpu",), max_quality_loss=0.1, prefer="throughput",
            why="throughput grows with batch size, which the KV memory per sequence bounds",
            advice=("If capacity is still short: MLA (DeepSeek-V2/V3) caches one latent per token instead of "
                    "per-head K/V; models with interleaved sliding-window layers (Gemma 2/3, Mistral's early "
                    "models) bound half the layers' KV; both need the model trained that way.",),
        ),
        Scenario(
            "edge", "memory-limited device", ALL_SELECTION, ALL_CODECS, ("gpu",),
            max_quality_loss=0.3, prefer="memory", tpot_ms=200.0,
            why="the memory budget is the binding constraint; no host tier to offload to",
            advice=("On very small memory, a smaller model with GQA/MQA often beats aggressive KV compression.",),
        ),
        Scenario(
            "multi-turn", "conversations that come back to earlier turns", multiturn_safe("selection"), ALL_CODECS,
            ALL_PLACEMENTS, max_quality_loss=0.1, prefer="throughput", tpot_ms=50.0, max_followup_drop=0.25,
            why="tokens evicted in one turn are gone for the next: only stages that never drop a token for good "
                "(spill-and-recall, codecs, placement), and follow-up answers must survive",
            advice=("Long conversations grow without bound under every lossless-or-compressed stage; hybrid "
                    "models with linear-attention or state-space layers (Jamba, Zamba, RecurrentGemma) keep a "
                    "fixed-size state for most layers, at the cost of exact recall of old turns.",),
        ),
        Scenario(
            "prefill-heavy", "long prompts, short answers: time to first token first",
            ("none", "streaming_llm", "snapkv", "pyramidkv", "knorm", "sliding_window"), ("fp16", "fp8", "int8"),
            ("gpu",),
            max_quality_loss=0.1, prefer="ttft",
            why="no stage that adds prefill work (H2O's full attention scores, multi-bit packing); light codecs only",
            advice=("Time to first token is set by prefill compute, which no KV stage removes; sliding-window "
                    "or linear-attention layers (Gemma 2/3, Mistral 7B v0.1, hybrid SSM models) cut it, but "
                    "only in models trained with them.",),
        ),
        Scenario(
            "accuracy-critical", "outputs must not change", ("none",), LOSSLESS_CODECS, ALL_PLACEMENTS,
            max_quality_loss=0.0, prefer="throughput",
            why="lossless stages only: the full cache, optionally offloaded (offload moves bytes, not values)",
            advice=("For more capacity without loss: prefix caching, a GQA/MLA model, or more GPU memory.",),
        ),
    )
}


def followup_ok(quality: Any, scenario: Scenario) -> bool:
    """Does a measured candidate keep the follow-up answers the scenario asks for? ``quality`` is a
    :class:`~kvtune.pipeline.QualityResult`. True when the scenario does not check follow-ups or no follow-up
    turn was counted (the full cache answered none)."""
    if scenario.max_followup_drop is None or quality.followup_retention is None:
        return True
    return 1.0 - quality.followup_retention <= scenario.max_followup_drop + 1e-12


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise UserError(f"--scenario {name}: unknown scenario (known: {', '.join(SCENARIOS)})")
    return SCENARIOS[name]
