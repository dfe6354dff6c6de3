"""A test-only output format, written the way a new sink is added: this module plus one line in
:data:`engine.formats.FORMATS` (the tests add that line with ``monkeypatch.setitem``).

``summary``: one small JSON file per input: frames, frames with a face, and how many batches
(``FrameResults``) the sink received.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.formats import format_spec
from engine.stages.sink import SinkContext, SinkHooks, discard, stage_bytes
from engine.structures import FrameResults, MediaInfo


class SummarySink:
    """Counts what it is handed; writes ``<out_base>.summary.json`` at the end."""

    def __init__(self, context: SinkContext) -> None:
        self.format = context.format
        self._path: Path | None = None
        self._staged: Path | None = None
        self._counts = {"frames": 0, "valid": 0, "batches": 0}

    def start(self, info: MediaInfo, out_base: Path) -> dict[str, Path]:
        self.abort()
        self._path = format_spec(self.format).path(out_base, info.kind)
        self._counts = {"frames": 0, "valid": 0, "batches": 0, "input": info.path.name}
        return {self.format: self._path}

    def add(self, results: FrameResults) -> None:
        self._counts["frames"] += len(results)
        self._counts["valid"] += int(results.valid.sum())
        self._counts["batches"] += 1

    def finish(self, hooks: SinkHooks) -> dict[str, Path]:
        self._staged = stage_bytes(self._path, json.dumps(self._counts).encode())
        return {self.format: self._staged}

    def abort(self) -> None:
        discard(self._staged)
        self._staged = None
