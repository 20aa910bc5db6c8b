"""Archive scoring: decode pool, batching, scorer, committer, sinks and the score verb. Imports io,
api, checkpoints, findings, util (never segment, bench, cli, training).
"""
