"""The stages of :class:`~engine.pipeline.Engine`, one small protocol per module.

=========================  =========================================  ==============================
stage                      in → out                                   default
=========================  =========================================  ==============================
:mod:`.source`             file → MediaInfo, FrameBatch…              MediaSource (PyAV, Pillow)
:mod:`.detect`             FrameBatch → Detections (all faces)        the landmark backend's own
:mod:`.track`              FrameBatch, Detector → Detections (≤1)     DetectEveryFrame
:mod:`.landmark`           FrameBatch, Detections → Landmarks         ``config.landmarks``
:mod:`.temporal`           Landmarks → AlignPlan                      NoFacePolicyStage
:mod:`.align`              FrameBatch, AlignPlan → AlignedBatch       Deep3DAligner (TorchAligner)
:mod:`.regress`            crops → coefficients (B, 257)              ResNet-50 of the checkpoint
:mod:`.sink`               FrameResults per batch → files             ``config.formats``
=========================  =========================================  ==============================

The dataclasses that flow between them are in :mod:`engine.structures`; the picture and
where to add a backend, a sink or a setting are in ``docs/architecture.md``.
"""

from __future__ import annotations

from engine.stages.align import Aligner, Deep3DAligner, TorchAligner
from engine.stages.detect import Detector, best_face_per_frame
from engine.stages.landmark import Landmarker
from engine.stages.regress import Regressor
from engine.stages.sink import Sink, SinkContext, SinkHooks
from engine.stages.source import MediaSource, Source
from engine.stages.temporal import NoFacePolicyStage, TemporalPolicy
from engine.stages.track import DetectEveryFrame, Tracker

__all__ = [
    "Aligner",
    "Deep3DAligner",
    "DetectEveryFrame",
    "Detector",
    "Landmarker",
    "MediaSource",
    "NoFacePolicyStage",
    "Regressor",
    "Sink",
    "SinkContext",
    "SinkHooks",
    "Source",
    "TemporalPolicy",
    "TorchAligner",
    "Tracker",
    "best_face_per_frame",
]
