"""bench/conv_shapes.py on the CPU at toy sizes: every network measured, three timings each."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("facenet_pytorch")
conv_shapes = pytest.importorskip("bench.conv_shapes")


def test_every_network_gets_three_timings(caplog):
    rows = conv_shapes.measure("cpu", [1, 2])
    assert [r[0] for r in rows] == ["P-Net 384×216", "R-Net 24²", "O-Net 48²", "ResNet-50 224²"]
    for _, first, again, fresh in rows:
        assert all(math.isfinite(t) and t > 0 for t in (first, again, fresh))
    caplog.set_level("INFO")
    assert conv_shapes.main(["--device", "cpu", "--sizes", "1"]) == 0
    assert "| ResNet-50 224² |" in caplog.text and "same size, new thread" in caplog.text
