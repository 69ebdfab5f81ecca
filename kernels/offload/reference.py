"""Reference for offload transfers: a blocking copy of a layer's host tensors to the device."""

from __future__ import annotations

import torch


def fetch_layer_ref(host_tensors, device) -> list:
    """Each host tensor copied to ``device`` (blocking); what the prefetcher must deliver, bit for bit."""
    return [t.to(device, copy=True) for t in host_tensors]
