"""The fast path's stages: what :class:`~engine.pipeline.Engine` is composed of when
``config.mode`` is :attr:`~engine.config.Mode.FAST`.

The fast path is the same engine with other stages swapped in (a keyframe tracker, batched GPU
landmarks, GPU crops, an fp16 regressor); a stage handed to ``Engine(...)`` always wins over the
one built here.
"""

from __future__ import annotations

from engine.config import EngineConfig

#: The keys :func:`fast_stages` may return (``Engine.__init__`` keyword names).
STAGE_KEYS = ("detector", "tracker", "landmarker", "aligner", "regressor")


def fast_stages(config: EngineConfig, device: str) -> dict:
    """The fast path's stages for ``config`` on ``device`` (a resolved torch device string).

    Returns:
        a dict with any of :data:`STAGE_KEYS` (stage objects, as ``Engine`` takes them); the
        stages it leaves out are the exact path's defaults. ``Engine.__init__`` calls it only when
        a stage it could supply was not handed in, and hands the result's stages on to the
        per-input engines of :meth:`~engine.pipeline.Engine.run_many` through
        :attr:`~engine.pipeline.Engine.components`, so it is called once per engine, not per input.

    TODO(lead): fill in from the helpers' parts (plan: ``fast-path``): the keyframe tracker
    (``detect_every`` from ``config``), the batched GPU FAN / MTCNN refinement on tracked boxes
    and their downscaled-keyframe detectors, the Pillow-exact ``TorchAligner``, the fp16
    channels-last regressor. Until then the fast path runs the exact path's stages.
    """
    return {}
