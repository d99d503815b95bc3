"""The run's loggers (the ``logger`` config group: Lightning's TensorBoard, CSV, W&B and MLflow
loggers) and where they write.

``logs.dir`` is the folder the shared stores live in: in a sweep the sweep directory, so one
TensorBoard (``<sweep dir>/tensorboard``) and one MLflow store (``mlflow.db``) hold every job and
their HParams compare them; alone, the run directory. ``logs.name`` names the run there: what the
sweep varies and the seed (``arm=dynamic/seed=0``), a source stage trained by the job
``source:cat/seed=0``. The CSV logger writes into the run's own directory (``csv/metrics.csv``). A
key given in a logger's config wins over these.

A resume continues the run's logs: ``csv/metrics.csv`` keeps the rows of the steps before the
checkpoint's (``CSVLogger``; Lightning's would delete the file) and TensorBoard hides its events
from that step on (``purge_step``); the resumed part logs those steps again, so none is doubled.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from simfreeze.errors import ConfigError
from simfreeze.paths import safe_relative_path


def swept_keys(sweep_params: dict[str, Any] | None, task_overrides: list[str]) -> list[str]:
    """The keys a sweep varies: its sweeper's ``params`` and the command line's sweep overrides
    (``seed=0,1,2``, ``range(…)``, ``choice(…)``, ``interval(…)``), in that order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (sweep_params or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *task_overrides])
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def run_label(job_overrides: list[str], swept: list[str], arm: str) -> str:
    """A job's name among its sweep's: the values of the swept keys but the seed (``arm=dynamic``,
    ``arm=dynamic,model.arch=vgg16``); ``arm=<arm>`` where only the seed varies or alone.
    ``/`` inside a value would nest folders in TensorBoard, so it becomes ``_``."""
    values = dict(override.split("=", 1) for override in job_overrides if "=" in override)
    shown = [f"{key.lstrip('+~')}={values[key].replace('/', '_')}" for key in values
             if key.lstrip("+~") in swept and key.lstrip("+~") != "seed"]
    return ",".join(shown) or f"arm={arm}"


def job_logs(logs: dict[str, Any], run_dir: Path, seed: int, arm: str, sweep: tuple[Path, list[str], list[str]] | None
             ) -> dict[str, Any]:
    """``logs`` with its nulls filled for this job. ``sweep``: the sweep directory, the swept keys
    and the job's overrides (None alone)."""
    label = run_label(sweep[2], sweep[1], arm) if sweep else f"arm={arm}"
    return {"dir": logs["dir"] or str(sweep[0] if sweep else run_dir), "name": logs["name"] or f"{label}/seed={seed}"}


def logs_for_job(cfg: dict, run_dir: Path, overrides: list[str], multirun: bool) -> dict[str, Any]:
    """``logs`` filled for the job ``python -m train`` runs (``multirun``: a sweep job, whose sweep
    Hydra's config names): in a sweep, named by the keys the sweep varies, which its
    ``multirun.yaml`` (the command line's sweeps) and the sweeper's params tell."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not multirun:
        return job_logs(cfg["logs"], run_dir, cfg["seed"], cfg["arm"], None)
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    try:  # the command line's sweep overrides (seed=0,1,2) are in the sweep's saved config only
        task = list(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task)
    except Exception:  # another launcher's layout: the sweeper's params alone
        task = []
    swept = swept_keys(OmegaConf.to_container(hydra_cfg.sweeper).get("params"), task)
    return job_logs(cfg["logs"], run_dir, cfg["seed"], cfg["arm"], (sweep_dir, swept, overrides))


def stage_logs(logs: dict[str, Any], stage_name: str, seed: int) -> dict[str, Any]:
    """Where a source stage that a job trains logs: beside the job's runs, named by the stage."""
    return {**logs, "name": f"{stage_name}/seed={seed}"}


def rows_before(text: str, step: int) -> str:
    """``metrics.csv``'s text less the rows of ``step`` and later, each kept row as it was; a row
    cut short (a kill while it was written) is dropped too."""
    lines = text.splitlines(keepends=True)
    if not lines:
        return text
    header = next(csv.reader([lines[0]]))
    column = header.index("step")

    def before(line: str) -> bool:
        fields = next(csv.reader([line]), [])
        return (line.endswith("\n") and len(fields) == len(header) and fields[column].isdigit()
                and int(fields[column]) < step)
    return lines[0] + "".join(line for line in lines[1:] if before(line))


class ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, which, given ``continue_before`` (a resume's first step), keeps the
    rows of the steps before it in an existing ``metrics.csv`` and appends after them."""

    def __init__(self, log_dir: str, continue_before: int | None):
        self.continue_before = continue_before
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.continue_before is None or not path.is_file():
            super()._check_log_dir_exists()  # a new run: Lightning's (deletes an old file)
            return
        text = path.read_text()
        kept = rows_before(text, self.continue_before)
        if kept != text:  # replaced whole: a failure leaves the old file
            temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            temporary.write_text(kept)
            os.replace(temporary, path)
        self.metrics_keys = next(csv.reader(io.StringIO(kept)), [])  # the header: rows are appended under it


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` (conf/logger/csv.yaml), which continues ``metrics.csv`` on a resume
    (``continue_before``, set by ``build_loggers``) instead of deleting it."""

    continue_before: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedWriter(self.log_dir, self.continue_before)
        return self._experiment


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``epoch`` scalar Lightning adds to every logged step: TensorBoard's
    HParams tab would show it as the first metric column, the same number in every row, before the accuracies."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step)


def placement(target: type, logs: dict[str, Any], run_dir: Path, group: str | None,
              resume_step: int | None = None) -> dict[str, Any]:
    """Where a logger of class ``target`` writes (its keyword arguments), from ``logs`` (filled);
    makes the folder that W&B and SQLite need to exist. ``resume_step``: a resume's first step."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    root = Path(logs["dir"])
    if issubclass(target, TensorBoardLogger):
        # Events of that step on, from the stopped part, are hidden: the resumed part logs them again.
        purge = {} if resume_step is None else {"purge_step": resume_step}
        return {"save_dir": str(root / "tensorboard"), "name": safe_relative_path(logs["name"]), "version": "", **purge}
    if issubclass(target, CSVLogger):
        return {"save_dir": str(run_dir), "name": "csv", "version": ""}
    if issubclass(target, WandbLogger):
        root.mkdir(parents=True, exist_ok=True)  # wandb refuses a save_dir that does not exist
        return {"save_dir": str(root), "name": logs["name"], **({"group": group} if group else {})}
    if issubclass(target, MLFlowLogger):  # a local store MLflow still develops: SQLite, not ./mlruns
        root.mkdir(parents=True, exist_ok=True)
        return {"tracking_uri": f"sqlite:///{root.resolve() / 'mlflow.db'}", "run_name": logs["name"],
                "artifact_location": (root / "mlartifacts").resolve().as_uri()}
    return {}


def build_loggers(cfg: dict, run_dir: Path, resume_step: int | None = None) -> list:
    """The loggers ``cfg["logger"]`` selects, placed by ``cfg["logs"]`` (filled by ``logs_for_job``).
    ``resume_step``: the step a resume starts at (``simfreeze.runs.resume.checkpoint_step``)."""
    from hydra.utils import get_class
    from lightning.pytorch.loggers import WandbLogger

    # A run that python -m train did not start (the bench, a test) logs into its own directory.
    logs = {**job_logs({"dir": None, "name": None}, run_dir, cfg["seed"], cfg["arm"], None),
            **{key: value for key, value in (cfg.get("logs") or {}).items() if value is not None}}
    group = Path(logs["dir"]).name if Path(logs["dir"]) != run_dir else None  # a sweep's jobs, for W&B
    loggers = []
    for kind, node in (cfg.get("logger") or {}).items():
        node = dict(node)
        target = get_class(node.pop("_target_"))
        kwargs = {**placement(target, logs, run_dir, group, resume_step), **{k: v for k, v in node.items() if v is not None}}
        try:
            logger = target(**kwargs)
        except ModuleNotFoundError as err:  # Lightning's message names the package: `pip install wandb`
            raise ConfigError(f"logger={kind} needs a package this environment lacks: {err}") from None
        if isinstance(logger, CSVLogger):
            logger.continue_before = resume_step
        loggers.append(logger)
        if issubclass(target, WandbLogger) and not kwargs.get("offline"):
            start_wandb(logger, kind)
    return loggers


def start_wandb(logger, kind: str) -> None:
    """Start the W&B run now, before any training: without an API key (or with a wrong one) W&B
    refuses, which would otherwise end the fit with a traceback from deep inside Lightning."""
    import wandb

    try:
        logger.experiment  # noqa: B018 (a property: wandb.init on rank 0)
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError, wandb.errors.CommError) as err:
        raise ConfigError(f"logger={kind}: W&B refused to start ({' '.join(str(err).split())}); run `wandb login` "
                          f"or set WANDB_API_KEY, or log offline with logger.{kind}.offline=true") from None


def log_hparams(loggers: list, hparams: dict[str, Any], metrics: dict[str, float],
                columns: dict[str, Any] | None = None) -> None:
    """The run's hyperparameters with its final metrics, after the fit (S is known then). Values
    that are None are left out, not given a stand-in (-1 would read as a cosine). ``columns``: HParams'
    columns for TensorBoard's experiment summary, the same in every run — ``hparams`` (name → a value of
    its type) and ``metrics`` (tags) — so that a run without S does not hide the column and the metric
    columns are the ones named, not every scalar of the run (TensorBoard shows five of those)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    hparams = {key: value for key, value in hparams.items() if value is not None}
    metrics = {key: value for key, value in metrics.items() if value is not None}
    for logger in loggers:
        logger.log_hyperparams(hparams)  # TensorBoard: kept for its hparams.yaml, no summary without metrics
        logger.log_metrics(metrics)
        if isinstance(logger, TensorBoardLogger):
            _, start, end = hparams_summaries(hparams, metrics)
            writer = logger.experiment._get_file_writer()
            if columns:
                experiment, _, _ = hparams_summaries(columns["hparams"], dict.fromkeys(columns["metrics"], 0.0))
                writer.add_summary(experiment)
            writer.add_summary(start)
            writer.add_summary(end)
            (Path(logger.log_dir) / "hparams.yaml").unlink(missing_ok=True)  # written empty when the fit began
        logger.save()
