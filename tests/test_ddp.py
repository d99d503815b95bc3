"""DDP for real on this CPU (two gloo processes), inside a sweep: the job runs in a process tree of
its own instead of Lightning relaunching the sweep; S and the plan are the single-process ones; each
process holds, caches and trains on its own share of the images; metrics are synced; files are
written once. Plus the pieces as functions: shards, the relaunch test, a failing process."""

from __future__ import annotations

import json
import re

import pytest
import torch

from simfreeze.data.splits import shard
from simfreeze.speed.distributed import gather_rows, relaunches_command, several_processes, sweep_job
from tests.helpers import compose_config, run_train

# resnet18 at 16×16; 21 per class → 17 train (odd: padded shares) and 4 val per class; 5 test each
# (15: shares of 9 and 6, which the synced metrics must count once each).
DDP_RUN = ["model.arch=resnet18", "data.image_size=null", "data.per_class=21", "trainer.max_epochs=2",
           "progress=lines", "arm=dynamic", "data.classes=[bird,cat,dog]", "data.positive=dog",
           "source.task={positive:cat,per_class:21}", "similarity.scores=true", "trainer.accelerator=cpu",
           "trainer.precision=32-true", "trainer.strategy=ddp"]


def test_a_ddp_sweep_runs_each_job_in_its_own_process_tree(cat_dog_folder, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train("-m", *DDP_RUN, "trainer.devices=1,2", f"data.root={cat_dog_folder}",
                       f"source.cache_dir={tmp_path / 'sources'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    # Lightning's own relaunch would have run the sweep again in each process: two jobs, each once.
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    assert result.stdout.count("[simfreeze] dynamic:dog") == 2, result.stdout
    one, two = (json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1"))
    assert one["status"] == two["status"] == "ok" and "trainer.devices=2" in two["overrides"]

    # S over every image, not one process's half: the centroids are gathered across processes.
    assert two["S"] == pytest.approx(one["S"], abs=1e-5) and two["l_freeze"] == one["l_freeze"]
    assert two["scores"]["logme"] == pytest.approx(one["scores"]["logme"], rel=1e-5)
    assert two["images"] == one["images"] == {"train": 51, "val": 12, "test": 15}

    # Each process decoded and cached only its share: 27 training images (26 + 1 repeated, for
    # equal batch counts), half the validation and test images.
    log = (sweep / "1" / "train_ddp_process_1.log").read_text()
    assert "DDP process 1 of 2 holds {'train': 27, 'val': 6, 'test': 6}" in log  # test: 3 + 2 per class
    cache_one, cache_two = one["prefix_cache"], two["prefix_cache"]  # rank 0's: 27 × 2 views + 6 + 9
    assert cache_one["used"] and cache_two["used"]
    assert cache_two["bytes"] * (51 * 2 + 12 + 15) == cache_one["bytes"] * (27 * 2 + 6 + 9)

    assert two["test_acc"] is not None  # the test split's shares (8 and 7 images) evaluated without a hang

    # Files once: one similarity.json, plan.json, results.json; the rank-1 process wrote no results line.
    for name in ("similarity.json", "plan.json", "split.json", "results.json"):
        assert (sweep / "1" / name).is_file()
    assert json.loads((sweep / "1" / "similarity.json").read_text())["S"] == pytest.approx(two["S"], abs=1e-6)
    assert len(list((sweep / "1" / "checkpoints").glob("*.ckpt"))) >= 1
    # The job's own process tree logs where the sweep's jobs log, named by what the sweep varies.
    assert (sweep / "tensorboard" / "trainer.devices=2" / "seed=0" / "hparams.yaml").is_file()
    assert (sweep / "tensorboard" / "trainer.devices=1" / "seed=0" / "hparams.yaml").is_file()


def test_ddp_validation_is_synced_across_processes(cat_dog_folder, tmp_path):
    """The synced val accuracy equals one process's evaluation of the same weights on every image."""
    import lightning as L

    from simfreeze.data.datamodule import TaskDataModule
    from simfreeze.networks.build import build_network
    from tests.helpers import sgd_classifier

    run = tmp_path / "run"
    run_train("model.arch=resnet18", "data.image_size=null", "data.per_class=21", "trainer.max_epochs=1",
              "progress=lines", "data.classes=[bird,cat,dog]", "data.positive=dog", "trainer.accelerator=cpu",
              "trainer.precision=32-true", "trainer.strategy=ddp", "trainer.devices=2", "test=false",
              f"data.root={cat_dog_folder}", f"hydra.run.dir={run}", cwd=tmp_path)
    results = json.loads((run / "results.json").read_text())
    data = TaskDataModule(root=str(cat_dog_folder), classes=["bird", "cat", "dog"], positive="dog", per_class=21,
                          image_size=None)
    net, _ = build_network("resnet18", 2)
    module = sgd_classifier(net)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=data, ckpt_path=str(run / "checkpoints" / "last.ckpt"),
                               verbose=False, weights_only=True)[0]
    assert results["final_val_acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)


def test_shards_split_each_class_and_pad_training_to_one_length():
    indices = list(range(10, 17))  # 7 images, 3 processes
    shares = [shard(indices, rank, 3, pad=True) for rank in range(3)]
    assert [len(held) for held, _ in shares] == [3, 3, 3]  # equal batch counts on every process
    assert [own for _, own in shares] == [3, 2, 2]
    assert sorted(i for held, own in shares for i in held[:own]) == indices  # every image once as its own
    assert [shard(indices, rank, 3, pad=False)[0] for rank in range(3)] == [[10, 13, 16], [11, 14], [12, 15]]
    assert shard(indices, 0, 1, pad=True) == (indices, 7)


class TwoProcesses:
    """Lightning's all_gather as two processes would answer it, this one being rank 0."""

    world_size, root_device = 2, torch.device("cpu")

    def __init__(self, other: torch.Tensor):
        self.other = other

    def all_gather(self, tensor):
        other = torch.tensor([len(self.other)]) if tensor.shape == (1,) else torch.zeros_like(tensor)
        if tensor.shape != (1,):
            other[:len(self.other)] = self.other
        return torch.stack([tensor, other])


def test_gather_rows_joins_unequal_shares_in_rank_order():
    mine, theirs = torch.arange(6.).view(3, 2), torch.arange(10., 14.).view(2, 2)
    assert torch.equal(gather_rows(mine, TwoProcesses(theirs)), torch.cat([mine, theirs]))


@pytest.mark.parametrize("trainer, environ, relaunches", [
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, {}, True),
    ({"accelerator": "cpu", "devices": 1, "strategy": "auto"}, {}, False),
    # One process, but its process group would outlive the job in the sweep's process.
    ({"accelerator": "cpu", "devices": 1, "strategy": "ddp"}, {}, True),
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, {}, False),  # spawns; argv untouched
    # srun started both processes: Lightning joins them instead of launching any
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
     {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train",
      "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
      "SLURM_NODELIST": "node1"}, False),
])
def test_which_trainers_relaunch_the_command(monkeypatch, trainer, environ, relaunches):
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    full = {"num_nodes": 1, "precision": "auto", **trainer}
    assert relaunches_command(full) is relaunches


def test_several_processes_and_sweep_job_read_the_environment():
    assert several_processes({"WORLD_SIZE": "2"}) and several_processes({"SLURM_NTASKS": "4"})
    assert not several_processes({}) and not several_processes({"SLURM_NTASKS": "1"})
    assert sweep_job({}) is None
    assert sweep_job({"SIMFREEZE_SWEEP_JOB": '{"num": 3, "overrides": ["seed=1"]}'}) == {"num": 3, "overrides": ["seed=1"]}


def test_a_failing_process_of_a_multi_process_job_exits_with_an_error(image_folder, tmp_path):
    """One failed process must end the job (the launcher then ends the others, which would otherwise
    wait in a collective until its timeout), after recording the failure from rank 0."""
    sweep = tmp_path / "sweep"
    result = run_train("-m", "data.classes=[ant,zebra]", "model.arch=resnet18", "trainer.accelerator=cpu",
                       f"data.root={image_folder}", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False,
                       env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode != 0 and "Traceback" in result.stderr
    failed = json.loads((sweep / "0" / "results.json").read_text())
    assert failed["status"] == "failed" and "unknown class ['zebra']" in failed["error"]


def test_slurm_jobs_end_every_task_when_one_fails():
    setup = compose_config(["hydra/launcher=slurm"], hydra=True).hydra.launcher.setup
    assert any(re.fullmatch(r"export SLURM_KILL_BAD_EXIT=1", line) for line in setup)


def test_a_sweep_jobs_own_process_tree_runs_on_the_gpu_the_job_claimed(tmp_path):
    """The new process reads the job's saved config, where devices is still ``auto``: without the
    claimed device it would try to claim a GPU again, and wait for the lock its own job holds."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from simfreeze.speed.distributed import own_process_tree_command

    saved = tmp_path / "job" / ".hydra"
    saved.mkdir(parents=True)
    OmegaConf.save(compose_config(["arm=dynamic", "task=cat_to_dog", "trainer.strategy=ddp"]), saved / "config.yaml")
    command = own_process_tree_command(tmp_path / "job", {"devices": [3], "accelerator": "gpu"})
    assert command[command.index("--config-path") + 1] == str(saved.resolve())
    overrides = [arg for arg in command[command.index("config") + 1:] if not arg.startswith("hydra.")]
    with initialize_config_dir(str(saved), version_base="1.3"):
        trainer = compose("config", overrides).trainer
    assert (trainer.devices, trainer.accelerator, trainer.strategy) == ([3], "gpu", "ddp")
