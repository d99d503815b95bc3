"""The ``logger`` config group (TensorBoard, CSV, W&B, MLflow through Lightning's loggers) and where
each writes: a sweep's jobs named by what the sweep varies and the seed, in one TensorBoard."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import OmegaConf

from simfreeze.config import validate_config
from simfreeze.errors import ConfigError
from simfreeze.runs.loggers import build_loggers, job_logs, placement, run_label, stage_logs, swept_keys
from tests.helpers import compose_config, run_train

TINY = ["model.arch=resnet18", "data.image_size=null", "data.per_class=12", "trainer.max_epochs=1", "progress=lines",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "test=false"]


def test_the_swept_keys_are_the_sweepers_params_and_the_command_lines_sweeps():
    params = {"arm": "source,scratch,dynamic"}
    assert swept_keys(params, ["seed=0,1,2", "data.root=/x", "freeze.l_freeze=range(0,50,10)", "+o.lr=interval(0.1,1)"]
                      ) == ["arm", "seed", "freeze.l_freeze", "o.lr"]
    assert swept_keys(None, ["data.per_class=20"]) == []


def test_a_job_is_named_by_what_the_sweep_varies_and_its_seed(tmp_path):
    job = ["arm=dynamic", "seed=2", "data.root=/data/cifar", "model.arch=vgg16"]
    assert run_label(job, ["arm", "seed"], "dynamic") == "arm=dynamic"
    assert run_label(job, ["arm", "model.arch"], "dynamic") == "arm=dynamic,model.arch=vgg16"
    assert run_label(job, ["data.root"], "dynamic") == "data.root=_data_cifar"  # no nested folders
    assert run_label(["seed=1"], ["seed"], "scratch") == "arm=scratch"  # a seeds-only sweep
    sweep = (tmp_path / "sweep", ["arm", "seed"], job)
    assert job_logs({"dir": None, "name": None}, tmp_path / "sweep" / "3", 2, "dynamic", sweep) == {
        "dir": str(tmp_path / "sweep"), "name": "arm=dynamic/seed=2"}
    alone = job_logs({"dir": None, "name": None}, tmp_path / "run", 0, "scratch", None)
    assert alone == {"dir": str(tmp_path / "run"), "name": "arm=scratch/seed=0"}
    assert job_logs({"dir": "/logs", "name": "mine"}, tmp_path, 0, "scratch", sweep) == {"dir": "/logs", "name": "mine"}
    assert stage_logs(alone, "source:cat", 0) == {"dir": str(tmp_path / "run"), "name": "source:cat/seed=0"}


def test_each_logger_writes_where_logs_say(tmp_path):
    logs, run = {"dir": str(tmp_path / "sweep"), "name": "arm=dynamic/seed=0"}, tmp_path / "sweep" / "2"
    assert placement(TensorBoardLogger, logs, run, None) == {
        "save_dir": str(tmp_path / "sweep" / "tensorboard"), "name": "arm=dynamic/seed=0", "version": ""}
    assert placement(CSVLogger, logs, run, None) == {"save_dir": str(run), "name": "csv", "version": ""}
    assert placement(WandbLogger, logs, run, "sweep") == {
        "save_dir": str(tmp_path / "sweep"), "name": "arm=dynamic/seed=0", "group": "sweep"}
    assert placement(MLFlowLogger, logs, run, None) == {
        "tracking_uri": f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}", "run_name": "arm=dynamic/seed=0",
        "artifact_location": (tmp_path / "sweep" / "mlartifacts").as_uri()}


@pytest.mark.parametrize("choice, kinds", [
    ([], ["tensorboard", "csv"]), (["logger=none"], []), (["logger=wandb"], ["wandb"]),
    (["logger=[tensorboard,csv,wandb,mlflow]"], ["tensorboard", "csv", "wandb", "mlflow"]),
])
def test_every_logger_choice_composes_and_validates(choice, kinds):
    cfg = compose_config(choice)
    validate_config(cfg)
    assert list(cfg.logger) == kinds


@pytest.mark.parametrize("override, error", [
    ("+logger.csv.flush_every=5", "unknown key logger.csv.flush_every"),
    ("+logger.mine={_target_: no.such.Logger}", "logger.mine._target_=no.such.Logger: no such class"),
    ("+logger.mine={save_dir: x}", "logger.mine must name a Lightning logger class"),
    ("logs.dir=3", "logs.dir=3 must be a string or null"),
])
def test_a_bad_logger_setting_is_refused_in_one_line(override, error):
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(".", r"\.")):
        validate_config(compose_config([override]))


def test_w_and_b_takes_any_wandb_init_argument():
    validate_config(compose_config(["logger=wandb", "+logger.wandb.entity=team", "+logger.wandb.tags=[cat]"]))


def test_a_logger_whose_package_is_missing_is_one_line(tmp_path, monkeypatch):
    import lightning.pytorch.loggers.wandb as wandb_logger
    from lightning_utilities.core.imports import RequirementCache

    # as where wandb is not installed: Lightning's check of the requirement fails
    monkeypatch.setattr(wandb_logger, "_WANDB_AVAILABLE", RequirementCache("wandb>=999"))
    cfg = OmegaConf.to_container(compose_config(["logger=wandb"]), resolve=True)
    with pytest.raises(ConfigError, match="logger=wandb needs a package this environment lacks: .*pip install"):
        build_loggers(cfg, tmp_path)


def test_w_and_b_without_an_api_key_is_one_line_before_any_training(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = OmegaConf.to_container(compose_config(["logger=wandb"]), resolve=True)
    with pytest.raises(ConfigError, match=r"logger=wandb: W&B refused to start \(.*API key.*\); run `wandb login` "
                                          r"or set WANDB_API_KEY, or log offline with logger.wandb.offline=true"):
        build_loggers(cfg, tmp_path / "run")


def test_w_and_b_offline_and_mlflow_log_a_real_run(image_folder, tmp_path):
    """The online loggers in their offline modes: W&B's offline run, MLflow's local SQLite store."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_train(*TINY, "data.classes=[ant,bee]", f"data.root={image_folder}", "logger=[wandb,mlflow,csv]",
              "logger.wandb.offline=true", f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"WANDB_SILENT": "true"})
    results = json.loads((run_dir / "results.json").read_text())
    # W&B's offline run (`wandb sync` would upload it): its record file (protobuf, no reader in
    # wandb's API) holds the run's name, its hparams and the metrics by name.
    (record,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert all(text in data for text in (b"arm=scratch/seed=0", b"val/acc_best", b"val/acc", b"policy"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("simfreeze").experiment_id])
    assert run.info.run_name == "arm=scratch/seed=0"
    assert run.data.params["arm"] == "scratch" and "S" not in run.data.params
    assert run.data.metrics["val/acc_best"] == pytest.approx(results["best_val_acc"])
    assert not (run_dir / "tensorboard").exists() and (run_dir / "csv" / "metrics.csv").is_file()


def test_no_logger_gives_the_trainer_none(tmp_path):
    cfg = OmegaConf.to_container(compose_config(["logger=none"]), resolve=True)
    assert build_loggers(cfg, tmp_path) == []  # the trainer gets logger=False: results.json and train.log only


def test_a_run_name_that_climbs_folders_stays_inside_the_logs_folder(tmp_path):
    # A group or class name of an experiment file reaches a source stage's run name (source:<name>/seed=0).
    outside = tmp_path / "outside"
    name = "source:" + "../" * 20 + str(outside).lstrip("/") + "/seed=0"
    logs = tmp_path / "logs"
    logger = TensorBoardLogger(**placement(TensorBoardLogger, {"dir": str(logs), "name": name}, tmp_path / "run", None))
    logger.log_hyperparams({"seed": 0})
    logger.log_metrics({"val/acc": 0.5}, step=0)
    logger.save()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and all(path.resolve().is_relative_to(logs / "tensorboard") for path in written)
    assert not outside.exists()


def test_names_become_safe_folder_names_within_the_file_systems_limit():
    from simfreeze.paths import safe_name, safe_relative_path

    assert safe_relative_path("arm=dynamic,model.arch=vgg16/seed=0") == "arm=dynamic,model.arch=vgg16/seed=0"  # as before
    assert safe_relative_path("/../../etc/x/../seed=1") == "etc/x/seed=1"
    assert safe_relative_path("../..") == "run" and safe_name("..") == "run" and safe_name(".hidden") == "hidden"
    long_a, long_b = safe_name("a" * 300 + "1"), safe_name("a" * 300 + "2")
    assert long_a != long_b and len(long_a.encode()) <= 120 and len(safe_name("é" * 300).encode()) <= 120
