"""Shared pieces of the face-model tests (engine/face3d): one synthetic BFM per test session.

The model is written once into pytest's base temp folder; every test module that asks for
it reuses that file, whichever module builds it first.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from engine.avcompat import add_stream_like


@pytest.fixture(scope="session")
def synthetic_bfm(tmp_path_factory, bfm_index) -> Path:
    """A folder holding a synthetic ``BFM_model_front.mat`` (real index arrays, made-up bases)."""
    from engine.face3d.bfm import MODEL_NAME
    from engine.face3d.synthetic import write_synthetic_model

    folder = tmp_path_factory.getbasetemp() / "face3d_synthetic_bfm"
    if not (folder / MODEL_NAME).is_file():
        folder.mkdir(exist_ok=True)
        write_synthetic_model(bfm_index, folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def face_model(synthetic_bfm):
    from engine.face3d.model import ParametricFaceModel

    return ParametricFaceModel.from_dir(synthetic_bfm, "cpu")


def cut_clip(src: Path, dst: Path, frames: int) -> Path:
    """Stream-copy the first ``frames`` video frames of ``src`` and the audio up to their end."""
    with av.open(str(src)) as cin, av.open(str(dst), "w") as cout:
        vin, ain = cin.streams.video[0], cin.streams.audio[0]
        vout, aout = add_stream_like(cout, vin), add_stream_like(cout, ain)
        end = Fraction(frames, 1) / vin.average_rate
        count = 0
        for packet in cin.demux(vin, ain):
            if packet.dts is None:
                continue
            t = packet.pts * packet.time_base
            if packet.stream.index == vin.index:
                if count >= frames:
                    continue
                count += 1
                packet.stream = vout
            else:
                if t >= end:
                    continue
                packet.stream = aout
            cout.mux(packet)
    return dst


def random_coeff(n: int, seed: int = 0, pose: float = 0.25) -> np.ndarray:
    """(n, 257) float32 plausible coefficients for the synthetic model."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n, 257), dtype=np.float32)
    c[:, :224] = rng.normal(0, 1, (n, 224))
    c[:, 224:227] = rng.normal(0, pose, (n, 3))
    c[:, 227:254] = rng.normal(0, 0.1, (n, 27))
    c[:, 254:257] = rng.normal(0, 0.1, (n, 3))
    return c
