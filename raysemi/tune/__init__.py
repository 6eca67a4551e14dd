"""``raysemi tune``: Ray Tune over the pipeline, one trial per sampled config.

- ``space``: the YAML notation of ``tune_spaces/*.yaml``, parsed and validated against the config;
- ``search``: the search algorithm and scheduler, and how many trials fit at once;
- ``trial``: one trial (``run_pipeline`` reporting after every round);
- ``experiment``: ``run_tune`` (start, ``--resume``, refusing an earlier experiment);
- ``results`` / ``heatmap``: the per-trial table, the best trial and the files written.
"""

from raysemi.tune.experiment import SETUP, run_tune
from raysemi.tune.results import TuneSummary, pretrain_counts
from raysemi.tune.space import Space, SpaceError, load_space, parse_space, validate_space

__all__ = ["SETUP", "Space", "SpaceError", "TuneSummary", "load_space", "parse_space", "pretrain_counts",
           "run_tune", "validate_space"]
