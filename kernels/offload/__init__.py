"""Offload transfers: pinned host buffers, >= 1 MiB chunks, layer prefetch on a side stream with events.

Public API::

    buf = pinned_empty(shape, dtype)                   # page-locked host tensor (plain host tensor without CUDA)
    chunk_ranges(nbytes, chunk_bytes=1 << 20)          # [(start, end), ...] byte ranges, each >= chunk_bytes
    copy_chunked(dst, src, chunk_bytes=1 << 20, non_blocking=False)
    pf = LayerPrefetcher(host_layers, device, chunk_bytes=1 << 20, depth=2)
    pf.prefetch(0)
    for layer in range(num_layers):
        kv = pf.get(layer)            # device tensors of this layer; the compute stream waits for their copy
        if layer + 1 < num_layers:
            pf.prefetch(layer + 1)    # next layer's host->device copy, on the side stream, overlaps compute
        ... attention over kv ...
        pf.release(layer)             # its device slot may be overwritten once the compute issued so far is done

Design: the copies run on the GPU's copy engines (``Tensor.copy_`` with ``non_blocking`` from pinned memory),
not on streaming multiprocessors, so there is no Triton kernel for this op: a kernel would take SMs away from
the attention it is meant to overlap. Copies are issued in chunks of at least ``chunk_bytes`` (1 MiB by default;
smaller PCIe transfers are dominated by per-copy latency) and only from pinned memory (pageable memory makes
``non_blocking`` copies synchronous). ``depth`` device slots are reused round-robin; a slot is refilled only
after the compute stream has passed the :meth:`LayerPrefetcher.release` of the layer that used it (an event),
and a layer is handed out only after its copy event (the compute stream waits on it, the host does not).

Without CUDA everything still works on CPU tensors, synchronously (no streams, no pinning), which is what the
CPU tests exercise; the overlap itself needs a GPU.
"""

from __future__ import annotations

import torch

from . import reference as _ref

__all__ = ["MIN_CHUNK_BYTES", "pinned_empty", "chunk_ranges", "copy_chunked", "LayerPrefetcher"]

MIN_CHUNK_BYTES = 1 << 20


def pinned_empty(shape, dtype) -> torch.Tensor:
    """A page-locked host tensor when CUDA is available (required for asynchronous host->device copies),
    an ordinary host tensor otherwise."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


def chunk_ranges(nbytes: int, chunk_bytes: int = MIN_CHUNK_BYTES) -> list:
    """Split ``[0, nbytes)`` into consecutive ranges of ``chunk_bytes``; a short tail is merged into the range
    before it, so every range holds at least ``chunk_bytes`` unless the whole transfer is smaller."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"chunk_ranges: nbytes must be a non-negative int, got {nbytes!r}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < MIN_CHUNK_BYTES:
        raise ValueError(f"chunk_ranges: chunk_bytes must be an int >= {MIN_CHUNK_BYTES} (1 MiB), got {chunk_bytes!r}")
    if nbytes == 0:
        return []
    starts = list(range(0, nbytes, chunk_bytes))
    if len(starts) > 1 and nbytes - starts[-1] < chunk_bytes:
        starts.pop()  # the tail joins the previous range
    return [(s, starts[i + 1] if i + 1 < len(starts) else nbytes) for i, s in enumerate(starts)]


def _bytes(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{where}: {name} must be contiguous (a chunked copy moves raw bytes)")
    return t.reshape(-1).view(torch.uint8)


def copy_chunked(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int = MIN_CHUNK_BYTES, non_blocking: bool = False):
    """Copy ``src`` into ``dst`` (same number of bytes, both contiguous, any devices) in chunks of at least
    ``chunk_bytes``. Returns ``dst``."""
    where = "copy_chunked"
    if not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor):
        raise ValueError(f"{where}: dst and src must be tensors")
    d, s = _bytes(dst, "dst", where), _bytes(src, "src", where)
    if d.numel() != s.numel():
        raise ValueError(f"{where}: dst holds {d.numel()} bytes, src {s.numel()}")
    for a, b in chunk_ranges(d.numel(), chunk_bytes):
        d[a:b].copy_(s[a:b], non_blocking=non_blocking)
    return dst


class LayerPrefetcher:
    """Double-buffered (``depth`` slots) host->device prefetch of per-layer tensors (see the module docstring).

    ``host_layers[l]`` is the list of host tensors of layer ``l`` (for instance its K and V blocks); every layer
    must have the same shapes and dtypes. Not thread-safe: call it from the thread that issues the compute.
    """

    def __init__(self, host_layers, device, chunk_bytes: int = MIN_CHUNK_BYTES, depth: int = 2):
        where = "LayerPrefetcher"
        self.host_layers = [list(layer) for layer in host_layers]
        if not self.host_layers or not self.host_layers[0]:
            raise ValueError(f"{where}: host_layers must hold at least one layer with at least one tensor")
        sig = [(t.shape, t.dtype) for t in self.host_layers[0]]
        for i, layer in enumerate(self.host_layers):
            if [(t.shape, t.dtype) for t in layer] != sig:
                raise ValueError(f"{where}: layer {i} has tensors {[(tuple(t.shape), t.dtype) for t in layer]}, "
                                 f"layer 0 has {[(tuple(s), d) for s, d in sig]}")
            for j, t in enumerate(layer):
                if t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"{where}: layer {i} tensor {j} must be a contiguous host tensor")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"{where}: depth must be a positive int, got {depth!r}")
        chunk_ranges(0, chunk_bytes)  # validates chunk_bytes
        self.device = torch.device(device)
        self.chunk_bytes = chunk_bytes
        self.depth = depth
        self.cuda = self.device.type == "cuda"
        self.pinned = all(t.is_pinned() for layer in self.host_layers for t in layer) if self.cuda else False
        self.slots = [[torch.empty(s, dtype=d, device=self.device) for s, d in sig] for _ in range(depth)]
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._ready = [None] * depth  # copy-done event per slot
        self._free = [None] * depth  # compute-done event per slot
        self._holder = [None] * depth  # layer whose data the slot holds or is receiving
        self.bytes_copied = 0  # explicit counter: bytes moved host->device

    @property
    def layer_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_layers[0])

    def _check_layer(self, layer: int, where: str) -> None:
        if not isinstance(layer, int) or not 0 <= layer < len(self.host_layers):
            raise ValueError(f"LayerPrefetcher.{where}: layer must be an int in [0, {len(self.host_layers)}), got {layer!r}")

    def prefetch(self, layer: int) -> None:
        """Start copying ``layer`` into its slot (``layer % depth``) on the side stream; returns at once on CUDA."""
        self._check_layer(layer, "prefetch")
        slot = layer % self.depth
        if self._holder[slot] == layer:
            return
        self._holder[slot] = layer
        if not self.cuda:
            for dst, src in zip(self.slots[slot], self.host_layers[layer]):
                copy_chunked(dst, src, self.chunk_bytes)
            self.bytes_copied += self.layer_nbytes
            return
        with torch.cuda.stream(self.stream):
            if self._free[slot] is not None:
                self.stream.wait_event(self._free[slot])  # the previous user of this slot is done with it
            for dst, src in zip(self.slots[slot], self.host_layers[layer]):
                copy_chunked(dst, src, self.chunk_bytes, non_blocking=self.pinned)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self._ready[slot] = ev
        self.bytes_copied += self.layer_nbytes

    def get(self, layer: int) -> list:
        """Device tensors of ``layer``; the current stream waits for their copy (the host does not block).
        Prefetches first if nobody did. The tensors stay valid until :meth:`release` and the next prefetch
        into the same slot."""
        self._check_layer(layer, "get")
        slot = layer % self.depth
        if self._holder[slot] != layer:
            self.prefetch(layer)
        if self.cuda and self._ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
            for t in self.slots[slot]:
                t.record_stream(torch.cuda.current_stream(self.device))
        return self.slots[slot]

    def release(self, layer: int) -> None:
        """Mark the compute issued so far on the current stream as the last use of ``layer``'s slot."""
        self._check_layer(layer, "release")
        slot = layer % self.depth
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._free[slot] = ev

    def fetch_blocking(self, layer: int) -> list:
        """Reference path: a plain blocking copy of ``layer`` (new tensors, no slots)."""
        self._check_layer(layer, "fetch_blocking")
        return _ref.fetch_layer_ref(self.host_layers[layer], self.device)
