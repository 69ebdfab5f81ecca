"""Running a pipeline inside a Hugging Face transformers model.

Two pieces, both through transformers' public extension points (no model class is patched, no model family
is special-cased):

* :class:`KVCache`, a ``transformers.Cache`` whose per-layer objects (:class:`PipelineLayer`) keep what the
  pipeline's codec produced and apply its selector. ``get_seq_length()`` counts tokens *seen*, so position ids
  keep counting after eviction; the stored tokens are ``len(layer.store)``.
* :func:`kvtune_attention`, registered with ``AttentionInterface`` as ``"kvtune"``. Each layer's ``update``
  hands its returned key tensor to a thread-local slot; the attention function claims the slot when it
  receives that very tensor (identity check), so it knows which cache layer it serves, computes attention,
  and gives the layer the queries or probabilities its selector needs: the prompt's last queries at prefill
  (SnapKV), accumulated attention (H2O). With another cache, it is plain SDPA.

Order within a layer at prefill: attention runs over the fresh full-precision K/V (as serving stacks do), then
the selector picks the tokens to keep and the codec encodes them. Later tokens are encoded on arrival and
attention reads the decoded stored form. Unpadded batches only: the causal mask is built here, aligned to the
end of the stored keys, which is what makes attention right after eviction.

"Prefill once, compress many": :func:`prefill_record` runs a prompt once with the full cache and keeps every
layer's K/V plus what selectors need (:class:`PrefillRecord`); :meth:`KVCache.from_record` builds a compressed
cache from it for any pipeline without running the model again.

Devices: the model's inputs are moved to the model's device. A record stays on that device, or is kept in
(pinned) host memory when ``store_on="cpu"`` (the caller's choice when GPU memory runs short);
:meth:`KVCache.from_record` moves it back to the device it is asked for, so caches always live with the model.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from kvtune.pipeline import Pipeline
from kvtune.strategies import ScoreInputs, Selector, Stages, build
from kvtune.strategies.base import Codec, Store, protected_topk
from kvtune.strategies.ragged import RaggedStore

ATTENTION_NAME = "kvtune"
WINDOW_MAX = 64  # prompt queries recorded for window-based selectors (SnapKV's window is <= 64)

_slot = threading.local()


@dataclass
class LayerRecord:
    keys: torch.Tensor  # (B, H, T, D)
    values: torch.Tensor  # (B, H, T, D)
    window_queries: torch.Tensor  # (B, Hq, min(T, WINDOW_MAX), D)
    attention_sums: torch.Tensor | None  # (B, H, T)
    scaling: float


@dataclass
class PrefillRecord:
    """One prompt prefilled once with the full cache: per-layer K/V and what selectors need."""

    input_ids: torch.Tensor  # (B, T)
    last_logits: torch.Tensor  # (B, V): the next-token distribution after the prompt (full cache)
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def nbytes(self) -> int:
        """Bytes of every tensor the record holds."""
        tensors = [self.input_ids, self.last_logits]
        for rec in self.layers:
            tensors += [rec.keys, rec.values, rec.window_queries]
            if rec.attention_sums is not None:
                tensors.append(rec.attention_sums)
        return sum(t.numel() * t.element_size() for t in tensors)

    def row(self, i: int) -> "PrefillRecord":
        """Batch row ``i`` as a record of batch 1 (views, no copy)."""
        layers = [LayerRecord(r.keys[i : i + 1], r.values[i : i + 1], r.window_queries[i : i + 1],
                              None if r.attention_sums is None else r.attention_sums[i : i + 1], r.scaling)
                  for r in self.layers]
        return PrefillRecord(self.input_ids[i : i + 1], self.last_logits[i : i + 1], layers)

    def to(self, device: torch.device | str) -> "PrefillRecord":
        """This record with every tensor on ``device`` (itself if already there); host copies are pinned when
        CUDA is available, so moving them back to the GPU is an asynchronous copy."""
        dev = torch.device(device)
        if self.last_logits.device == dev:
            return self
        pin = dev.type == "cpu" and torch.cuda.is_available()

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = t.to(dev, non_blocking=t.is_pinned() if dev.type == "cuda" else False)
            return out.pin_memory() if pin else out

        layers = [LayerRecord(move(r.keys), move(r.values), move(r.window_queries), move(r.attention_sums),  # type: ignore[arg-type]
                              r.scaling) for r in self.layers]
        return PrefillRecord(input_ids=move(self.input_ids), last_logits=move(self.last_logits), layers=layers)  # type: ignore[arg-type]


class PipelineLayer(CacheLayerMixin):
    """One model layer's cache under a pipeline: a codec store, a selector, explicit counters."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, stages: Stages, layer_idx: int, num_layers: int, *, record: bool = False,
                 record_sums: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.stages = stages
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.store: Store = self._new_store()
        self.tokens_seen = 0  # tokens that passed through this layer (positions)
        self.scores: torch.Tensor | None = None  # (B, H, N) accumulated attention, decode-time selectors
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # prompt K/V awaiting selection
        self.record = record
        self.record_sums = record_sums
        self.recorded: LayerRecord | None = None
        self.generator = torch.Generator().manual_seed(seed * 1009 + layer_idx)
        self.recent_queries: torch.Tensor | None = None  # (B, Hq, <=WINDOW_MAX, D), re-compression only
        self.since_compress = 0  # tokens decoded since the last (re-)selection
        self.turn_start = False  # set by KVCache.begin_turn: re-select after the next forward's attention

    def _new_store(self) -> Store:
        sel = self.stages.selector
        if sel is not None and sel.ragged:
            return RaggedStore(self.stages.codec, self.layer_idx, self.num_layers)
        codec, i, n = self.stages.codec, self.layer_idx, self.num_layers
        return codec.layer_store(i, n) if sel is None else sel.wrap_store(lambda: codec.layer_store(i, n))

    # -- transformers' layer protocol ------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.tokens_seen += key_states.shape[-2]
        if len(self.store) == 0 and self.pending is None:
            # prefill: attention runs on the fresh K/V; selection and encoding follow in after_attention
            self.pending = (key_states, value_states)
            keys, values = key_states, value_states
        else:
            self.store.append(key_states, value_states)
            if self.scores is not None:
                b, h, t = key_states.shape[0], key_states.shape[1], key_states.shape[-2]
                self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, t)], dim=-1)
            keys, values = self.store.decoded()
        _slot.claim = (self, keys)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return len(self.store) + query_length, 0

    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = self._new_store()
        self.tokens_seen = 0
        self.scores = None
        self.pending = None
        self.recent_queries = None
        self.since_compress = 0
        self.turn_start = False

    # -- kvtune ----------------------------------------------------------------------------------------------
    @property
    def wants_probs(self) -> bool:
        sel = self.stages.selector
        return self.pending is None and sel is not None and sel.decode_time

    def after_attention(self, query: torch.Tensor, scaling: float, probs: torch.Tensor | None) -> None:
        """Called by the attention function once this layer's attention is computed."""
        if self.pending is not None:
            keys, values = self.pending
            self.pending = None
            sel = self.stages.selector
            window = query[:, :, -WINDOW_MAX:]
            sums = None
            if self.record_sums or (sel is not None and "attention_sums" in sel.needs):
                sums = attention_column_sums(query, keys, scaling)
            if self.record:
                self.recorded = LayerRecord(keys, values, window, sums, scaling)
            self.compress(keys, values, window, sums, scaling)
        elif self.turn_start:  # a new turn's prompt: re-select with its queries (begin_turn)
            self.turn_start = False
            self._reselect(query[:, :, -WINDOW_MAX:], scaling)
        elif probs is not None and self.scores is not None:
            self.scores = self.stages.selector.update_scores(self.scores, probs)  # type: ignore[union-attr]
            self._evict_over_budget(scaling)
        elif self.stages.selector is not None and self.stages.selector.recompress_every:
            self._recompress(query, scaling)

    @property
    def ragged_lengths(self) -> torch.Tensor | None:
        """(B, H) tokens per head when this layer's store is ragged and holds tokens, else None."""
        if isinstance(self.store, RaggedStore) and self.pending is None and len(self.store):
            return self.store.lengths()
        return None

    def _recompress(self, query: torch.Tensor, scaling: float) -> None:
        """Prefill-time selectors with ``recompress_every``: re-select over the stored tokens every N decoded
        tokens, with the most recent queries (prompt tail + decoded) as the observation window."""
        sel = self.stages.selector
        assert sel is not None
        q = query if self.recent_queries is None else torch.cat([self.recent_queries, query], dim=2)
        self.recent_queries = q[:, :, -WINDOW_MAX:]
        self.since_compress += query.shape[2]
        if self.since_compress < sel.recompress_every:
            return
        self.since_compress = 0
        self._reselect(self.recent_queries, scaling)

    def _reselect(self, window: torch.Tensor, scaling: float) -> None:
        """Select again over the stored tokens (a tiered store: every token seen) with ``window`` as the latest
        queries. Per-head stores (Ada-KV) re-select only while every head holds the same tokens."""
        sel = self.stages.selector
        assert sel is not None
        keys, values = self.store.reselectable()
        inputs = ScoreInputs(keys, values, self.layer_idx, self.num_layers, scaling, window, None, self.generator)
        if isinstance(self.store, RaggedStore):
            lengths = self.store.lengths()
            per_head = sel.select_ragged(inputs, tokens_seen=self.tokens_seen) if bool(
                (lengths == lengths.max()).all()) else None
            if per_head is not None:
                self.store.keep_ragged(per_head)
            return
        idx = sel.select(inputs, tokens_seen=self.tokens_seen)
        if idx is not None:
            self.store.reselect(idx)

    def compress(self, keys: torch.Tensor, values: torch.Tensor, window: torch.Tensor | None,
                 sums: torch.Tensor | None, scaling: float) -> None:
        """Select (if any) and encode the prompt's K/V into the store."""
        sel = self.stages.selector
        if sel is not None:
            inputs = ScoreInputs(keys, values, self.layer_idx, self.num_layers, scaling, window, sums, self.generator)
            if sel.recompress_every:
                self.recent_queries = window
            if sel.ragged:
                per_head = sel.select_ragged(inputs)
                if per_head is None:
                    self.store.append(keys, values)
                else:
                    self.store.append_ragged(  # type: ignore[attr-defined]
                        [[keys[i, j, ix] for j, ix in enumerate(row)] for i, row in enumerate(per_head)],
                        [[values[i, j, ix] for j, ix in enumerate(row)] for i, row in enumerate(per_head)])
                return
            idx = sel.select(inputs)
            if sel.spills:  # every token is written; the unselected ones leave the GPU tier for the host tier
                self.store.append(keys, values)
                if idx is not None:
                    self.store.keep(idx)
                return
            if sel.decode_time:
                self.scores = sel.score(inputs).float()
            if idx is not None:
                gather = idx.unsqueeze(-1).expand(*idx.shape, keys.shape[-1])  # (B, H, K, D)
                keys, values = keys.gather(2, gather), values.gather(2, gather)
                if self.scores is not None:
                    self.scores = self.scores.gather(2, idx)
        self.store.append(keys, values)

    def _evict_over_budget(self, scaling: float) -> None:
        sel = self.stages.selector
        assert sel is not None and self.scores is not None
        keep = sel.layer_keep(self.tokens_seen, self.layer_idx, self.num_layers)
        if len(self.store) <= keep:
            return
        idx = protected_topk(self.scores, keep, sel.sinks, sel.recent)
        self.store.keep(idx)
        self.scores = self.scores.gather(2, idx)


class KVCache(Cache):
    """A transformers ``Cache`` that runs a kvtune pipeline in every layer."""

    def __init__(self, pipeline: Pipeline | Stages, num_layers: int, *, record: bool = False,
                 record_sums: bool = False, seed: int = 0) -> None:
        stages = pipeline if isinstance(pipeline, Stages) else Stages.of(pipeline)
        layers = [PipelineLayer(stages, i, num_layers, record=record, record_sums=record_sums, seed=seed)
                  for i in range(num_layers)]
        super().__init__(layers=layers)
        self.stages = stages

    @classmethod
    def for_prompt(cls, pipeline: Pipeline, prompt_tokens: int, num_layers: int, *, seed: int = 0) -> "KVCache":
        """The cache for one request: a per-bucket pipeline (``buckets``, schema version 2) runs the stages of the
        bucket the prompt's length falls in (:meth:`Pipeline.route`); any other pipeline runs its own stages."""
        return cls(pipeline.route(prompt_tokens), num_layers, seed=seed)

    def nbytes(self) -> int:
        """Bytes held by every layer's store, measured from the stored tensors."""
        return sum(layer.store.nbytes() for layer in self.layers)

    def stored_tokens(self) -> list[int]:
        return [len(layer.store) for layer in self.layers]

    def begin_turn(self) -> None:
        """The next forward is a new turn's prompt (a follow-up question): prefill-time selectors re-select after
        its attention with its queries as the window (a spilling selector recalls the top pages); decode-time
        selectors keep evicting on their own schedule; query-agnostic selectors never see a question (what they
        kept from the context stays, the conversation's new tokens are kept)."""
        sel = self.stages.selector
        if sel is not None and not sel.decode_time and not sel.query_agnostic:
            for layer in self.layers:
                layer.turn_start = True

    @classmethod
    def from_record(cls, record: PrefillRecord, pipeline: Pipeline | Stages, *, seed: int = 0,
                    device: torch.device | str | None = None, defer_selection: bool = False) -> "KVCache":
        """Build the cache a pipeline would hold after this prompt, without running the model. The cache lives
        on ``device`` (default: where the record is); a record kept in host memory is copied there.
        ``defer_selection`` (a shared context whose question comes in the next turn): prefill-time selectors
        that read the question store every token now and select at the first :meth:`begin_turn`; decode-time
        and query-agnostic selectors select here as usual."""
        if device is not None:
            record = record.to(device)
        cache = cls(pipeline, len(record.layers), seed=seed)
        for layer, rec in zip(cache.layers, record.layers):
            layer.lazy_initialization(rec.keys, rec.values)
            layer.tokens_seen = rec.keys.shape[-2]
            sel = cache.stages.selector
            if sel is not None and "attention_sums" in sel.needs and rec.attention_sums is None:
                raise ValueError(f"{sel.name} needs attention sums; prefill_record(..., attention_sums=True)")
            if defer_selection and sel is not None and not sel.decode_time and not sel.query_agnostic:
                layer.store.append(rec.keys, rec.values)
                continue
            layer.compress(rec.keys, rec.values, rec.window_queries, rec.attention_sums, rec.scaling)
        return cache


def attention_column_sums(query: torch.Tensor, keys: torch.Tensor, scaling: float, chunk: int = 256) -> torch.Tensor:
    """Attention each key receives from every (causal) prompt query, summed over queries and the query heads
    of its KV head. query (B, Hq, T, D), keys (B, H, T, D) -> (B, H, T). O(T^2) in chunks of queries."""
    b, hq, t, d = query.shape
    h = keys.shape[1]
    g = hq // h
    q = query.view(b, h, g, t, d)
    total = keys.new_zeros(b, h, t, dtype=torch.float32)
    pos_k = torch.arange(t, device=keys.device)
    for start in range(0, t, chunk):
        stop = min(t, start + chunk)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, start:stop].float(), keys.float()) * scaling
        future = pos_k.view(1, t) > torch.arange(start, stop, device=keys.device).view(-1, 1)  # (q, T)
        probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
        total += probs.sum(dim=(2, 3))
    return total


@functools.lru_cache(maxsize=4)
def _end_aligned_causal(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Bool mask (tq, tk): query i (the i-th of the last tq positions) sees keys up to tk - tq + i. Memoized:
    every layer of a forward asks for the same one (read only; never written to)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def kvtune_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for transformers' ``AttentionInterface``: query (B, Hq, Tq, D), key/value (B, H, Tk, D)."""
    claim = getattr(_slot, "claim", None)
    layer = None
    if claim is not None and claim[1] is key:
        layer = claim[0]
        _slot.claim = None
    b, hq, tq, d = query.shape
    h, tk = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    probs = None
    if layer is not None and layer.wants_probs:
        g = hq // h
        logits = torch.einsum("bhgqd,bhkd->bhgqk", query.view(b, h, g, tq, d), key) * scale
        if tq > 1:
            logits = logits.masked_fill(~_end_aligned_causal(tq, tk, query.device), float("-inf"))
        p = logits.softmax(dim=-1)  # (B, H, G, Tq, Tk)
        out = torch.einsum("bhgqk,bhkd->bhgqd", p, value).reshape(b, hq, tq, d)
        probs = p.sum(dim=(2, 3))  # (B, H, Tk)
    elif layer is not None and layer.ragged_lengths is not None:
        # per-head lengths (Ada-KV): right-padded view; key j is visible to the i-th new query iff
        # j < length - tq + i + 1 for that head, which also masks the padding
        lengths = layer.ragged_lengths.to(query.device)  # (B, H)
        limit = lengths.view(b, h, 1, 1) - tq + 1 + torch.arange(tq, device=query.device).view(1, 1, tq, 1)
        mask = torch.arange(tk, device=query.device).view(1, 1, 1, tk) < limit  # (B, H, Tq, Tk)
        mask = mask.repeat_interleave(hq // h, dim=1)  # (B, Hq, Tq, Tk)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=(hq != h))
    else:
        mask = None
        if attention_mask is not None and attention_mask.shape[-1] == tk:
            mask = attention_mask
        elif tq > 1 and tq != tk:
            mask = _end_aligned_causal(tq, tk, query.device)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=(mask is None and tq == tk and tq > 1),
            scale=scale, enable_gqa=(hq != h),
        )
    if layer is not None:
        layer.after_attention(query, scale, probs)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_attention() -> None:
    """Make ``attn_implementation="kvtune"`` available to transformers (idempotent)."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTENTION_NAME, kvtune_attention)
        _registered = True


def prefill_record(model: Any, input_ids: torch.Tensor, *, attention_sums: bool = False,
                   store_on: torch.device | str | None = None) -> PrefillRecord:
    """Run ``input_ids`` (B, T) once with the full cache and keep what every later trial needs. The record's
    tensors stay on the model's device unless ``store_on`` names another (``"cpu"``: pinned host memory)."""
    identity = Stages(selector=None, codec=build("codec", "fp16", {}), placement=build("placement", "gpu", {}))  # type: ignore[arg-type]
    cache = KVCache(identity, model.config.num_hidden_layers, record=True, record_sums=attention_sums)
    input_ids = input_ids.to(model.device)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    layers = []
    for layer in cache.layers:
        if layer.recorded is None:
            raise RuntimeError("the model did not call kvtune attention; load it with attn_implementation='kvtune'")
        layers.append(layer.recorded)
    record = PrefillRecord(input_ids=input_ids, last_logits=out.logits[:, -1].float(), layers=layers)
    return record if store_on is None else record.to(store_on)
