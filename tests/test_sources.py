"""The source cache: trained once, rebuilt when damaged, never written outside its folder."""

import json

import pytest

from simfreeze.runs.sources import cached_source


def fake_training(calls: list):
    def train(run_cfg, run_dir):
        calls.append(run_dir)
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        return {"name": "source:cat", "fit_seconds": 1.0}
    return train


CFG = {"seed": 0, "data": {"classes": ["cat", "dog"], "root": None}, "trainer": {}, "model": {}, "source": {}}


def test_a_source_is_trained_once_and_then_reused(tmp_path):
    calls = []
    first = cached_source(tmp_path, "source-cat", CFG, fake_training(calls))
    second = cached_source(tmp_path, "source-cat", CFG, fake_training(calls))
    assert first[2] is True and second[2] is False and first[0] == second[0] and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [first[0].name]


def test_names_never_lead_outside_the_cache_folder(tmp_path):
    cache = tmp_path / "cache"
    directory, _, _ = cached_source(cache, "source-../../../../tmp/x", CFG, fake_training([]))
    assert directory.parent == cache and ".." not in directory.name and "/" not in directory.name
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


@pytest.mark.parametrize("damage", ["no results.json", "truncated results.json", "no checkpoint"])
def test_a_damaged_entry_is_trained_again(tmp_path, damage):
    calls = []
    directory, _, _ = cached_source(tmp_path, "source-cat", CFG, fake_training(calls))
    if damage == "no results.json":
        (directory / "results.json").unlink()
    elif damage == "truncated results.json":
        (directory / "results.json").write_text('{"name": "sou')
    else:
        (directory / "checkpoints" / "last.ckpt").unlink()
    again, results, trained = cached_source(tmp_path, "source-cat", CFG, fake_training(calls))
    assert trained and again == directory and len(calls) == 2 and results["name"] == "source:cat"
    assert json.loads((directory / "results.json").read_text())["run_dir"] == str(directory)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_temporaries_of_killed_runs_are_removed_and_a_failed_source_leaves_none(tmp_path):
    (tmp_path / ".source-cat-x.tmp-1").mkdir(parents=True)  # another entry's: not touched

    def failing(run_cfg, run_dir):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_source(tmp_path, "source-cat", CFG, failing)
    assert [p.name for p in tmp_path.glob(".*.tmp-*")] == [".source-cat-x.tmp-1"]
    directory, _, _ = cached_source(tmp_path, "source-cat", CFG, fake_training([]))
    leftover = tmp_path / f".{directory.name}.tmp-12345"
    leftover.mkdir()
    (directory / "results.json").unlink()  # forces a rebuild, under the lock
    cached_source(tmp_path, "source-cat", CFG, fake_training([]))
    assert not leftover.exists() and (tmp_path / ".source-cat-x.tmp-1").exists()


def base_of(experiment: str, *overrides: str) -> tuple[dict, list[dict]]:
    """The resolved target config and its chain of source stages (nearest first) of one job."""
    from omegaconf import OmegaConf

    from simfreeze.runs.sources import source_chain
    from tests.helpers import compose_config

    cfg = OmegaConf.to_container(compose_config([f"+experiment={experiment}", "data.root=/data",
                                                 "trainer.precision=32-true", *overrides]), resolve=True)
    return cfg, source_chain(cfg)


def images(data: dict, held_out: bool = True) -> dict[str, set[int]]:
    """The images a task trains, selects and (``held_out``) tests on, per class of CIFAR-10's training split."""
    from simfreeze.data.splits import balanced_split

    sizes = {name: 5000 for name in data["classes"]}
    split = balanced_split(sizes, data["per_class"], data["val_fraction"], data["seed"],
                           holdout={n: data["holdout_per_class"] for n in sizes} if data["holdout_per_class"] else None,
                           skip=data["skip_per_class"])
    return {n: set(split.train[n]) | set(split.val[n]) | (set(split.holdout.get(n, [])) if held_out else set())
            for n in sizes}


def test_one_base_serves_every_pair_seed_and_experiment_and_shares_no_image_with_their_tasks():
    from simfreeze.runs.sources import source_key

    jobs = [base_of("similarity_study", f"source.task.positive={source}", f"seed={seed}", "freeze.l_freeze=dynamic")
            for source in ("cat", "automobile") for seed in (0, 2)]
    jobs.append(base_of("cat_to_dog_pretrained", "arm=dynamic", "seed=1"))
    keys = {source_key(chain[-1]) for _, chain in jobs}
    assert len(keys) == 1, "the base is trained once, whatever the pair, seed or experiment"
    for target, (source, base) in jobs:
        assert base["seed"] == 0 and source["seed"] == target["seed"]  # the source model follows the run's seed
        assert source["data"]["classes"] == [source["data"]["positive"], *target["data"]["classes"][1:]] or \
            source["data"]["classes"] == ["cat", "dog"]
        for task in (target, source):
            task_images, base_images = images(task["data"]), images(base["data"], held_out=False)
            assert not any(task_images[n] & base_images.get(n, set()) for n in task_images)
    study_sources = {chain[0]["data"]["positive"] for cfg, chain in jobs[:-1]}
    assert study_sources == {"cat", "automobile"}


def test_a_stage_seed_must_be_an_integer():
    from simfreeze.config import check_values
    from simfreeze.errors import ConfigError

    cfg, _ = base_of("similarity_study", "freeze.l_freeze=dynamic")
    cfg["source"]["source"]["seed"] = "zero"
    with pytest.raises(ConfigError, match=r"source.source.seed=\"zero\" must be an integer in \[0, 2\*\*32-1\] or null"):
        check_values(cfg)


def test_every_source_stage_trains_on_the_sweep_jobs_own_gpu_and_keeps_its_cache_key():
    from simfreeze.runs.sources import source_chain, source_key

    # a sweep job pinned to cuda:3 by simfreeze.speed.placement (trainer.devices=[3])
    pinned_cfg, pinned = base_of("cat_to_dog_pretrained", "arm=dynamic", "trainer.accelerator=gpu", "trainer.devices=[3]")
    _, unpinned = base_of("cat_to_dog_pretrained", "arm=dynamic", "trainer.accelerator=gpu")
    assert pinned_cfg["trainer"]["devices"] == [3] and len(pinned) == 2  # the cat source and its base
    assert [stage["trainer"]["devices"] for stage in pinned] == [[3], [3]]  # not 1, i.e. cuda:0: another job's GPU
    assert [stage["trainer"]["devices"] for stage in unpinned] == [1, 1]  # devices=auto: one device
    assert [source_key(s) for s in pinned] == [source_key(s) for s in unpinned]  # one cache entry, any GPU
    ddp = source_chain({**pinned_cfg, "trainer": {**pinned_cfg["trainer"], "devices": [2, 3], "strategy": "ddp"}})
    assert ddp[0]["trainer"]["devices"] == [2] and ddp[0]["trainer"]["strategy"] == "auto"


def test_a_read_only_cache_serves_what_it_holds_and_refuses_to_train_in_place(tmp_path, monkeypatch):
    import os

    from simfreeze.config import check_writable_folder
    from simfreeze.errors import ConfigError

    cached_source(tmp_path, "source-cat", CFG, fake_training([]))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder looks (root writes anyway)
    check_writable_folder("source.cache_dir", str(tmp_path), writable=False)  # validation lets it through
    calls = []
    assert cached_source(tmp_path, "source-cat", CFG, fake_training(calls))[2] is False and calls == []
    with pytest.raises(ConfigError, match=r"source.cache_dir='.*' is not writable and holds no trained source-dog"):
        cached_source(tmp_path, "source-dog", {**CFG, "seed": 1}, fake_training(calls))
    assert calls == []


def test_folders_that_cannot_be_made_are_refused_in_one_line(tmp_path):
    from simfreeze.config import check_writable_folder
    from simfreeze.errors import ConfigError

    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    with pytest.raises(ConfigError, match="hydra.run.dir='.*loop_a/run' cannot be followed"):
        check_writable_folder("hydra.run.dir", str(tmp_path / "loop_a" / "run"))
    with pytest.raises(ConfigError, match="the name 'xxx.*' is 300 bytes; a file system allows 255 per name"):
        check_writable_folder("hydra.run.dir", str(tmp_path / ("x" * 300) / "run"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="a_file is a file, not a folder"):
        check_writable_folder("source.cache_dir", str(tmp_path / "a_file" / "sources"))


def test_a_stage_recipe_keeps_the_source_fixed_while_the_targets_learning_rate_and_size_are_swept():
    from simfreeze.runs.sources import source_key

    recipe = ["+source.recipe={optimizer: {lr: 0.002}, trainer: {max_epochs: 5}}", "+source.task.train_per_class=null"]
    chains = {(lr, size): base_of("similarity_study", "freeze.l_freeze=0", f"optimizer.lr={lr}",
                                  f"data.train_per_class={size}", *recipe)
              for lr in (0.0002, 0.002) for size in (50, 640)}
    assert len({source_key(chain[0]) for _, chain in chains.values()}) == 1
    target, (source, base) = chains[(0.0002, 50)]
    assert (target["optimizer"]["lr"], target["scheduler"]["max_lr"]) == (0.0002, 0.0002)
    # the one-cycle peak follows the recipe's rate, as it follows optimizer.lr in conf/scheduler/onecycle.yaml
    assert (source["optimizer"]["lr"], source["scheduler"]["max_lr"], source["trainer"]["max_epochs"]) == (0.002, 0.002, 5)
    assert source["data"]["train_per_class"] is None and base["trainer"]["max_epochs"] == 5
    # without the recipe, the source takes the target's learning rate (and trains anew for each)
    _, plain = base_of("similarity_study", "freeze.l_freeze=0", "optimizer.lr=0.0002")
    assert plain[0]["optimizer"]["lr"] == 0.0002 and source_key(plain[0]) != source_key(source)


@pytest.mark.parametrize("recipe, message", [
    ("{model: {arch: resnet18}}", r"unknown key source.recipe.model"),
    ("{trainer: {max_epoch: 3}}", r"unknown key source.recipe.trainer.max_epoch \(did you mean source.recipe.trainer.max_epochs\?\); allowed"),
    ("{optimizer: {lr: -1}}", r"source.recipe.optimizer.lr=-1 must be a number > 0"),
])
def test_a_stage_recipe_is_checked_like_the_run_itself(recipe, message):
    from simfreeze.config import validate_config
    from simfreeze.errors import ConfigError
    from tests.helpers import compose_config

    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(["+experiment=similarity_study", "data.root=/data", f"+source.recipe={recipe}"]))


def test_the_strong_base_and_the_regimes_tasks_share_no_image():
    for target in ("[dog,horse]", "[cat,ship]"):
        cfg, (source, base) = base_of("regimes_full", "base=cifar8_strong", f"data.classes={target}",
                                      "source.task.positive=truck", "freeze.l_freeze=0")
        assert base["data"]["per_class"] == 3000 and base["trainer"]["max_epochs"] == 15 and base["data"]["crop"] == 8
        assert base["optimizer"]["_target_"] == "torch.optim.SGD" and base["scheduler"]["max_lr"] == base["optimizer"]["lr"]
        assert source["data"]["classes"] == ["truck", cfg["data"]["classes"][1]] and source["trainer"]["max_epochs"] == 3
        base_images = images(base["data"], held_out=False)
        for task in (cfg, source):
            task_images = images(task["data"])
            assert not any(task_images[n] & base_images.get(n, set()) for n in task_images)
