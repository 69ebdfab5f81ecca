"""Measurement: what a candidate pipeline costs and what it loses, read top to bottom as the data path.

* :mod:`~kvtune.measure.quality` — the candidate inside the real model against the full cache ("prefill once,
  compress many").
* :mod:`~kvtune.measure.kernels_cost` — the candidate's stored form at the target model's shapes through the
  kernels: bytes held (always measured), attention time where the kernels run on the target's own device.
* :mod:`~kvtune.measure.tiers` — every placement rule in one place: memory tiers (GPU pool, host RAM, disk)
  bounded by the profile, the link and disk rates, what prefetch hides.
* :mod:`~kvtune.measure.serving` — the serving model: decode step time (roofline, calibrated), prefill/TTFT,
  batch size, throughput at the scenario's latency target, each figure with its provenance.
* :mod:`~kvtune.measure.replay` — the workload trace replayed through a tiered LRU prefix cache.
"""
