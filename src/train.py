"""`python -m train [overrides]`: validate → run (the similarity analysis, the source arm, or a fit:
build → fit → test) → results.json.

Examples::

    python -m train                                   # cat vs dog from scratch, ResNet-50, 3 epochs
    python -m train +experiment=cat_to_dog            # the paper's protocol: every arm, one summary
    python -m train arm=dynamic data.positive=dog +source.task.positive=cat
    python -m train --cfg job                         # print the composed config

The story is ``train`` (one run); how a job runs around it (a sweep run again, GPUs, DDP, failures) is
``simfreeze.jobs``; the pieces live in ``simfreeze`` (docs/architecture.md, "How the code is laid out").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from omegaconf import DictConfig

from simfreeze.config import register_resolvers

register_resolvers()  # before Hydra composes; submitit's job processes import this module too


def train(cfg: dict, run_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """One run of a resolved config into ``run_dir``; returns what its ``results.json`` holds."""
    from simfreeze import analysis
    from simfreeze.runs.fit import fit, report_source
    from simfreeze.runs.rate_search import search_rates

    if cfg["similarity"]["analysis"]:  # no training: embed every class, write the paper's figures
        return analysis.run(cfg, run_dir, overrides, train_source=fit)
    if cfg["source_only"]:  # the source arm: train (or reuse) the source task and report it
        return report_source(cfg, run_dir, overrides)
    if (cfg.get("lr_search") or {}).get("rates"):  # every rate to its first validation, the best one on to the end
        return search_rates(cfg, run_dir, overrides, fit)
    return fit(cfg, run_dir, overrides)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from simfreeze.jobs.job import run_job

    return run_job(cfg, train)  # around the run: a sweep run again, the job's GPUs, DDP trees, failures


def cli() -> None:
    """``python -m train``: Hydra's composition errors (an unknown group option or key, override
    syntax) end like ours, with one ``error:`` line and exit status 2, instead of Hydra's report."""
    from hydra.errors import CompactHydraException

    from simfreeze.jobs.command import sweep_note, yaml_error_line
    from simfreeze.runs.preflight import hydra_error_line

    if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for Hydra's full report
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach this function
    try:
        main()
        if "job" in sys.argv[1:] and {"--cfg", "-c"} & set(sys.argv[1:]):
            note = sweep_note(sys.argv[1:])
            if note:
                print(note)
    except CompactHydraException as err:
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except yaml.YAMLError as err:  # a config file that is not valid YAML (conf/, an experiment, --config-dir)
        print(f"error: {yaml_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    cli()
