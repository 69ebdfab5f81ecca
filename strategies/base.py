"""The contracts every strategy implements.

Three axes, one base class each:

``Selector`` (selection / eviction)
    Implements only :meth:`Selector.score`, returning ``(batch, kv_heads, tokens)`` where higher means keep.
    The shared :meth:`Selector.select` turns scores into kept indices: the first ``sinks`` tokens and the last
    ``recent`` tokens are always kept, the rest of the budget goes to the top-scoring tokens in between. The
    number kept per head is exactly ``budget_tokens(T)`` (or ``T`` when the budget covers everything), and the
    indices come back sorted so that kept tokens stay in their original order.
    A selector runs once at the end of prefill. One with ``decode_time = True`` also re-selects whenever the
    cache grows past its budget during decoding (H2O, TOVA), from scores the runtime keeps for it: starting
    from :meth:`Selector.score` at the end of prefill, each decode step folds its attention in through
    :meth:`Selector.update_scores` (a running sum for H2O, the latest step only for TOVA). A prefill-time selector re-selects every ``recompress_every`` decoded tokens when that is > 0,
    scoring the stored tokens with the most recent queries as its window.
    Budgets per layer: :meth:`Selector.layer_keep` (PyramidKV overrides it; the layers' sum stays the
    uniform total). Budgets per head (Ada-KV, ``ragged = True``): :meth:`Selector.select_ragged` returns one
    index tensor per (batch, head) and the runtime stores each head's tokens separately (really freed).

``Codec`` (compression)
    Creates per-layer :class:`Store` objects that hold what the codec produced. A store appends new tokens,
    returns decoded keys/values for attention, drops tokens (``keep``), and reports ``nbytes()`` measured from
    the tensors it really holds. ``Codec.analytic_nbytes`` is the formula those bytes must equal (tested).

``Placement`` (hybrid memory) lives in :mod:`kvtune.strategies.placement`: it never changes numerics, only
where bytes live and what moving them costs.

Every strategy is a dataclass of its parameters with a class-level ``search_space(trial, scenario)`` that asks
an Optuna trial for them. Parameters are validated in ``__post_init__`` with ``ValueError`` naming the field.
Strategies hold no global state: the runtime passes everything they need in :class:`ScoreInputs`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar

import torch

Budget = float | int
MAX_TOKENS = 1 << 24  # a bound on every token count a parameter gives (longer than any model's context)


@dataclass
class ScoreInputs:
    """What a selector may look at for one layer. Shapes use B=batch, H=kv heads, Hq=query heads, T=tokens."""

    keys: torch.Tensor  # (B, H, T, D) keys as attention sees them (post-RoPE, decoded)
    values: torch.Tensor  # (B, H, T, D)
    layer_idx: int
    num_layers: int
    scaling: float  # softmax scale of the model's attention
    window_queries: torch.Tensor | None = None  # (B, Hq, W, D): the last W prompt queries (post-RoPE)
    attention_sums: torch.Tensor | None = None  # (B, H, T): attention each token received, summed over queries
    generator: torch.Generator | None = None  # seeded, for randomized selectors


def check_budget(budget: Budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a ratio in (0, 1] or a token count >= 1, got {budget!r}")
    if isinstance(budget, float) and not (0.0 < budget <= 1.0):
        raise ValueError(f"budget ratio must be in (0, 1], got {budget}")
    if isinstance(budget, int) and not 1 <= budget <= MAX_TOKENS:
        raise ValueError(f"budget token count must be in 1..{MAX_TOKENS}, got {budget}")


def budget_tokens(budget: Budget, tokens: int) -> int:
    """Tokens to keep out of ``tokens``: ``ceil(ratio * T)`` for a float ratio, ``min(count, T)`` for an int."""
    if isinstance(budget, float):
        return min(tokens, max(1, math.ceil(budget * tokens)))
    return min(tokens, int(budget))


class Strategy(ABC):
    """Shared behaviour: a name, a category, a citation, parameters as dataclass fields."""

    name: ClassVar[str]
    category: ClassVar[str]
    citation: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Parameters added after pipeline documents were written without them, whose default is not what those
    # documents meant: the value an omitted one takes when a stage is built from parameters (``build``), so an
    # older document means what it meant. kvtune writes these parameters in every document it produces.
    legacy_defaults: ClassVar[dict[str, Any]] = {}

    def params(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def multiturn_safe(cls) -> bool:
        """Never drops a token for good, so a later turn can still use every token (codecs and placements
        keep every token; selectors say so through ``drops_tokens``)."""
        return True

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def search_space_doc(cls) -> str:
        """One line describing what :meth:`search_space` explores (for ``kvtune strategies``)."""
        return ""

    @classmethod
    @abstractmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        """Ask ``trial`` (an ``optuna.Trial``) for this strategy's parameters; return them as a dict."""

    def check_model(self, spec: Any) -> None:
        """Raise ``ValueError`` naming the parameter if the model's shapes (a ``ModelSpec``) rule this strategy
        out; parameters that depend on no model are checked in ``__post_init__``. Default: any model."""


@dataclass
class Selector(Strategy):
    """Base of the selection axis. Subclasses implement :meth:`score` only."""

    category: ClassVar[str] = "selection"
    needs: ClassVar[frozenset[str]] = frozenset()  # "window_queries" and/or "attention_sums"
    decode_time: ClassVar[bool] = False
    ragged: ClassVar[bool] = False  # per-head budgets: select_ragged, stored per head
    drops_tokens: ClassVar[bool] = True  # False: evicted tokens are kept off the GPU and may come back
    spills: ClassVar[bool] = False  # the store keeps unselected tokens in a host tier (see wrap_store)
    query_agnostic: ClassVar[bool] = False  # selects when the context is prefilled, before any question

    budget: Budget = 0.5
    sinks: int = 4
    recent: int = 32
    recompress_every: int = 0  # prefill-time selectors: re-select every N decoded tokens (0 = never)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not 0 <= self.sinks <= MAX_TOKENS:
            raise ValueError(f"sinks must be in 0..{MAX_TOKENS}, got {self.sinks}")
        if not 0 <= self.recent <= MAX_TOKENS:
            raise ValueError(f"recent must be in 0..{MAX_TOKENS}, got {self.recent}")
        if isinstance(self.recompress_every, bool) or not isinstance(self.recompress_every, int) or not (
            0 <= self.recompress_every <= 4096
        ):
            raise ValueError(f"recompress_every must be an int in 0..4096 (0 = never), got {self.recompress_every!r}")
        if self.recompress_every and self.decode_time:
            raise ValueError(f"recompress_every: {self.name} already re-selects at every decode step; leave it 0")

    @classmethod
    def multiturn_safe(cls) -> bool:
        return not cls.drops_tokens

    def wrap_store(self, gpu_factory: Callable[[], "Store"]) -> "Store":
        """The store one layer of this selector's cache uses, given a factory of the codec's store: that store
        by default; a spilling selector (``spills``) wraps it in a GPU tier over a host tier."""
        return gpu_factory()

    def host_codec_name(self) -> str | None:
        """The codec a spilling selector keeps *every* token in off the device (its host tier), or None."""
        return None

    def layer_keep(self, tokens: int, layer_idx: int, num_layers: int) -> int:
        """Tokens this layer keeps out of ``tokens`` seen. Uniform by default; summed over the layers it equals
        ``num_layers * budget_tokens(budget, tokens)`` for every selector (PyramidKV redistributes it)."""
        return budget_tokens(self.budget, tokens)

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Return ``(B, H, T)`` scores, higher = keep. Sinks and the recent window are handled by the base."""

    def select(self, inputs: ScoreInputs, tokens_seen: int | None = None) -> torch.Tensor | None:
        """Indices to keep, ``(B, H, K)`` sorted ascending; ``None`` when everything fits in the budget.

        ``tokens_seen`` is the context length the budget ratio applies to (defaults to the tokens present).
        """
        b, h, t, _ = inputs.keys.shape
        keep = self.layer_keep(tokens_seen if tokens_seen is not None else t, inputs.layer_idx, inputs.num_layers)
        if keep >= t:
            return None
        return protected_topk(self.score(inputs), keep, self.sinks, self.recent)

    def update_scores(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Decode-time selectors: fold one step's attention ``probs`` (B, H, N) into ``scores`` (B, H, N)."""
        return scores + probs

    def select_ragged(self, inputs: ScoreInputs, tokens_seen: int | None = None) -> list[list[torch.Tensor]] | None:
        """Per-head budgets (``ragged`` selectors): ``[b][h]`` -> sorted indices; ``None`` when all fit."""
        raise NotImplementedError(f"{self.name} has one budget for every head; use select()")


def protected_topk(scores: torch.Tensor, keep: int, sinks: int, recent: int) -> torch.Tensor:
    """Keep exactly ``keep`` tokens per head: sinks first, then the recent window, then the top scores.

    When ``sinks + recent`` exceed ``keep`` the recent window shrinks first, then the sinks.
    scores: (B, H, T) -> indices (B, H, keep), sorted ascending.
    """
    b, h, t = scores.shape
    if keep >= t:
        return torch.arange(t, device=scores.device).expand(b, h, t).clone()
    n_sink = min(sinks, keep)
    n_recent = min(recent, keep - n_sink)
    n_mid = keep - n_sink - n_recent
    parts = []
    if n_sink:
        parts.append(torch.arange(n_sink, device=scores.device).expand(b, h, n_sink))
    if n_mid:
        middle = scores[:, :, n_sink : t - n_recent]  # (B, H, T - sinks - recent)
        top = middle.topk(n_mid, dim=-1, sorted=False).indices + n_sink
        parts.append(top)
    if n_recent:
        parts.append(torch.arange(t - n_recent, t, device=scores.device).expand(b, h, n_recent))
    idx = torch.cat(parts, dim=-1)
    return idx.sort(dim=-1).values


class Store(ABC):
    """One layer's stored KV in a codec's form. Keeps explicit counters; never infers state from contents.

    Call order: ``append`` (the prompt, then each decoded chunk), ``decoded``/``attend`` any time after the first
    append, ``keep`` between appends. A store belongs to one layer of one cache and is not thread-safe.
    """

    # Attributes holding transient decoded copies (memoized so a forward pass does not dequantize unchanged
    # tokens again). They are not the stored form: nbytes() leaves them out, as a fused kernel never
    # materializes them.
    working_buffers: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add tokens: keys/values (B, H, T, D) in full precision."""

    @abstractmethod
    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held tokens, decoded to the input dtype: ((B, H, N, D), (B, H, N, D))."""

    @abstractmethod
    def keep(self, idx: torch.Tensor) -> None:
        """Drop every token not in ``idx`` (B, H, K), sorted ascending; the store really shrinks."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of every tensor this store holds (codes, scales, residual), measured, not computed."""

    @abstractmethod
    def __len__(self) -> int:
        """Tokens held per head."""

    def reselectable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens a re-selection chooses from, decoded: those held (a tiered store: every token seen)."""
        return self.decoded()

    def reselect(self, idx: torch.Tensor) -> None:
        """Keep ``idx`` (B, H, K), indices into :meth:`reselectable`, for attention."""
        self.keep(idx)

    def attend(self, query: torch.Tensor, scale: float, return_probs: bool = False):
        """One decode step's attention over the stored form: query (B, Hq, D) -> (out (B, Hq, D), probs).

        The default decodes and runs the dense kernel; codecs with a kernel that reads their stored form
        directly (KIVI, fp8) override this, so cost is measured on the path a deployment would run.
        """
        from kvtune.kernels.decode_attention import decode_attention

        keys, values = self.decoded()
        return decode_attention(query, keys, values, scale=scale, return_probs=return_probs)


@dataclass
class Codec(Strategy):
    """Base of the codec axis."""

    category: ClassVar[str] = "codec"
    lossless: ClassVar[bool] = False

    @abstractmethod
    def new_store(self) -> Store:
        """An empty per-layer store."""

    def layer_store(self, layer_idx: int, num_layers: int) -> Store:
        """The empty store for one given layer. Equal to :meth:`new_store` unless the codec differs per layer
        (``mixed``); the runtime always calls this one."""
        return self.new_store()

    def layer_nbytes(self, layer_idx: int, num_layers: int, batch: int, heads: int, tokens: int, head_dim: int,
                     dtype: torch.dtype) -> int:
        """:meth:`analytic_nbytes` for one given layer (differs from it only for per-layer codecs)."""
        return self.analytic_nbytes(batch, heads, tokens, head_dim, dtype)

    @abstractmethod
    def analytic_nbytes(self, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one layer's store holds after one append of ``tokens`` tokens (K and V together)."""

    def bytes_per_token(self, heads: int, head_dim: int, dtype: torch.dtype, tokens: int = 4096) -> float:
        """Per-layer K+V bytes per token at a long context (amortizes per-block scales and residuals)."""
        return self.analytic_nbytes(1, heads, tokens, head_dim, dtype) / tokens


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class TokenView:
    """A decoded (B, H, N, D) working buffer that grows by appending tokens in place: spare capacity along the
    token axis (half the length again, at least 256 tokens) absorbs later appends, so each append copies only the
    new tokens instead of the whole cache. :meth:`tensor` is a view of the first N tokens; positions below N are
    never written again, so a view handed out earlier stays valid after later appends."""

    def __init__(self, first: torch.Tensor) -> None:
        self._buf = first
        self.tokens = first.shape[2]

    def append(self, new: torch.Tensor) -> None:
        n, t = self.tokens, new.shape[2]
        if n + t > self._buf.shape[2]:
            b, h, _, d = new.shape
            grown = new.new_empty((b, h, n + t + max(256, (n + t) // 2), d))
            grown[:, :, :n] = self._buf[:, :, :n]
            self._buf = grown
        self._buf[:, :, n : n + t] = new
        self.tokens = n + t

    def tensor(self) -> torch.Tensor:
        return self._buf[:, :, : self.tokens]
