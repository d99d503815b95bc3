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
