"""The config files are the schema: every experiment composes and passes validation, and the code's
defaults are the YAML's."""

import dataclasses
import inspect

import pytest
from omegaconf import OmegaConf

from simfreeze.config import schema
from simfreeze.data.datamodule import TaskDataModule
from simfreeze.method.plan import FreezeSpec
from simfreeze.runs.preflight import sweep_jobs, validate_sweep
from tests.helpers import REPO, compose_config

EXPERIMENTS = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml"))
JOBS = {"cat_to_dog": 6, "cat_to_dog_pretrained": 7, "similarity_study": 6 * 7 * 3, "depth_sweep": 12, "architectures": 4 * 3,
        "staged": 2 * 10, "regimes": 2 * 2 * 2 * 4 * 3, "regimes_controls": 2 * 2 * 2 * 3,
        "regimes_full": 2 * 3 * 2 * 3 * 9 * 3}  # the others: one run


def test_there_are_experiments_to_check():
    assert {"cat_to_dog", "depth_sweep", "architectures", "staged", "similarity_matrix"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_every_experiment_composes_and_validates(experiment):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [f"+experiment={experiment}"], return_hydra_config=True)
        jobs = sweep_jobs(cfg)
        validate_sweep(cfg)  # composes each job as the sweeper will and raises on an unknown key or value
    assert len(jobs) == JOBS.get(experiment, 1) and all(f"+experiment={experiment}" in job for job in jobs)


def test_the_experiments_on_the_cat_to_dog_task_share_it():
    for experiment in ("cat_to_dog", "depth_sweep", "architectures"):
        cfg = compose_config([f"+experiment={experiment}"], hydra=True)
        assert cfg.hydra.runtime.choices.task == "cat_to_dog"
        assert (list(cfg.data.classes), cfg.data.positive, cfg.source.task.positive) == (["cat", "dog"], "dog", "cat")
    assert compose_config(["+experiment=architectures"]).data.per_class == 400  # an experiment still overrides it
    assert compose_config(["task=cat_to_dog"]).data.positive == "dog"


def defaults_of(func) -> dict:
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if name != "self" and p.default is not inspect.Parameter.empty}


def test_the_datamodule_defaults_are_the_data_config():
    yaml = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / "cifar10.yaml"))
    yaml.pop("root")  # the CIFAR10_ROOT environment variable, or null
    code = defaults_of(TaskDataModule.__init__)
    assert set(code) - {"root"} == set(yaml) == schema()["data"] - {"root"}
    code["groups"] = code["groups"] or {}  # None: no groups (a mutable {} default would be shared)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in code.items() if k != "root"} == yaml


def test_the_freeze_spec_defaults_are_the_freeze_config():
    yaml = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "train.yaml"))["freeze"]
    shorthands = {"l_freeze", "depth"}  # turned into policy and k by FreezeSpec.from_config
    settings = [f for f in dataclasses.fields(FreezeSpec) if f.compare]  # k_key: which key set k, for messages
    assert {f.name: f.default for f in settings} == {k: v for k, v in yaml.items() if k not in shorthands}
    assert FreezeSpec.from_config(yaml) == FreezeSpec()


@pytest.mark.parametrize("override, changes_weights, free_on_resume", [
    ("model.channels_last=false", False, False),  # how the network runs: no other weights, yet not a resume's to change
    ("trainer.devices=2", False, True),
    ("data.root=/elsewhere", True, True),  # the images' digest is checked on resume instead
    ("freeze.k=10", False, False),  # a source stage that does not transfer freezes nothing
    ("optimizer.lr=0.1", True, False),
])
def test_the_cache_key_and_the_resume_check_read_one_table(override, changes_weights, free_on_resume):
    from simfreeze.config import key_role, settings_digest
    from simfreeze.runs.sources import source_chain, source_key

    def configs(*extra):
        cfg = OmegaConf.to_container(compose_config(["+source.task.positive=cat", "data.root=/data", *extra]), resolve=True)
        return cfg, source_chain(cfg)[0]

    (run, stage), (run2, stage2) = configs(), configs(override)
    assert key_role(override.split("=")[0]) == (changes_weights, free_on_resume)
    assert (source_key(stage) != source_key(stage2)) == changes_weights
    assert (settings_digest(run) == settings_digest(run2)) == free_on_resume
