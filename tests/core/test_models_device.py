"""--device parsing and the dtype a model runs in; prefill records moved between devices (no model needed)."""

from __future__ import annotations

import pytest
import torch

from kvtune.errors import UserError
from kvtune.measure.quality import _groups, rows_that_fit
from kvtune.models import compute_dtype, parse_device
from kvtune.runtime import LayerRecord, PrefillRecord


def test_parse_device_names():
    assert parse_device("cpu") == "cpu" and parse_device(" CPU ") == "cpu"
    assert parse_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert parse_device(None) == parse_device("auto")
    for bad in ("tpu", "cuda:x", "cuda:-1", "gpu"):
        with pytest.raises(UserError, match=f"--device {bad}: expected auto, cpu, cuda or cuda:N"):
            parse_device(bad)


def test_parse_device_checks_the_gpu_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: CUDA is not available here"):
        parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("auto") == "cuda:0" and parse_device("cuda") == "cuda:0" and parse_device("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match="--device cuda:2: this machine has 2 CUDA device"):
        parse_device("cuda:2")


def test_compute_dtype(monkeypatch):
    assert compute_dtype("cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("cuda:0") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert compute_dtype("cuda:1") == "float16"


def _record(b=3, t=5, sums=True):
    g = torch.Generator().manual_seed(0)
    layer = LayerRecord(torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g),
                        torch.randn(b, 6, t, 4, generator=g), torch.rand(b, 2, t, generator=g) if sums else None, 0.5)
    return PrefillRecord(torch.arange(b * t).view(b, t), torch.randn(b, 11, generator=g), [layer, layer])


def test_record_rows_are_views_and_bytes_add_up():
    rec = _record()
    row = rec.row(1)
    assert row.tokens == 5 and row.input_ids.shape == (1, 5) and row.last_logits.shape == (1, 11)
    assert torch.equal(row.layers[0].keys[0], rec.layers[0].keys[1])
    assert row.layers[1].values.data_ptr() == rec.layers[1].values[1:2].data_ptr()  # a view, no copy
    per_layer = (2 * 3 * 2 * 5 * 4 + 3 * 6 * 5 * 4) * 4 + 3 * 2 * 5 * 4
    assert rec.nbytes() == 3 * 5 * 8 + 3 * 11 * 4 + 2 * per_layer
    assert _record(sums=False).nbytes() == rec.nbytes() - 2 * 3 * 2 * 5 * 4
    assert rec.to("cpu") is rec  # already there


def test_groups_keep_order_and_cut_to_rows():
    items = list(range(7))
    assert _groups(items, lambda i: i % 2) == [[0, 2, 4, 6], [1, 3, 5]]
    assert _groups(items, lambda i: i % 2, rows=3) == [[0, 2, 4], [6], [1, 3, 5]]


def test_no_row_bound_on_a_cpu():
    class Fake:
        device = torch.device("cpu")

    assert rows_that_fit(Fake(), 1024) is None
