"""Stage 9, evaluation: the metrics (`run.py`) on the evaluation set (`evaluation_set.py`)."""

# The metrics a person reads first, by the names evaluation gives them: the flow's closing log line, the CLI's
# summary and a registered version's description quote those a run measured, on the reranked samples.
HEADLINE_PREFIXES = ("oracle_", "zero_shot_oracle_", "clip_score", "fid_", "fd_clip", "retrieval_top1")


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The headline metrics among `metrics`, by name."""
    return {name: metrics[name] for name in sorted(metrics)
            if name.startswith(HEADLINE_PREFIXES) and name.endswith("_reranked")}
