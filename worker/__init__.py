"""Background workers of 3DMM Studio: ``python -m engine worker`` serves the job queue.

See :mod:`worker.loop` (the loop), :mod:`worker.monitor` (heartbeats), :mod:`worker.cli`
(the registry commands) and :mod:`worker.launch` (one worker per GPU plus the dashboard).
"""
