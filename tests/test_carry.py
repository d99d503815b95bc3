"""Carrying a sweep's finished jobs to another machine (simfreeze.jobs.carry); the round trip through a
real sweep run again is in tests/test_experiment.py (the study across regimes' lane)."""

import gzip
import json

import pytest

from simfreeze.jobs.carry import main, pack, read_pack, unpack


def job(sweep, name, status="ok", **files):
    job_dir = sweep / name
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / "results.json").write_text(json.dumps({"status": status, "run_dir": str(job_dir), "best_val_acc": 0.5}))
    (job_dir / ".hydra" / "overrides.yaml").write_text(f"- seed={name}\n")
    for name, text in files.items():
        (job_dir / name).write_text(text)
    return job_dir


def test_pack_keeps_finished_jobs_and_their_records_but_no_weights(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    job(sweep, "0", **{"plan.json": "{}", "test_predictions.json": '{"predicted": [1], "labels": [1]}'})
    (sweep / "0" / "last.ckpt").write_bytes(b"weights")
    job(sweep, "1", status="failed")
    (sweep / "2").mkdir()  # killed before results.json
    assert pack(sweep, tmp_path / "jobs.gz") == 1
    header, jobs = read_pack(tmp_path / "jobs.gz")
    assert header["files"] == {"multirun.yaml": "hydra: {}\n"}
    assert [j["job"] for j in jobs] == ["0"]
    assert set(jobs[0]["files"]) == {"results.json", "plan.json", "test_predictions.json", ".hydra/overrides.yaml"}


def test_a_text_that_jobs_share_is_stored_once(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    split = json.dumps({"files": [f"dog/{i:05d}.jpg" for i in range(2000)]})
    for name in ("0", "1", "2"):
        job(sweep, name, **{"split.json": split})
    pack(sweep, tmp_path / "jobs.gz")
    with gzip.open(tmp_path / "jobs.gz", "rt") as f:
        assert f.read().count("dog/01999.jpg") == 1
    assert [j["files"]["split.json"] for j in read_pack(tmp_path / "jobs.gz")[1]] == [split] * 3


def test_unpack_writes_jobs_where_they_now_lie_and_keeps_what_this_machine_finished(tmp_path):
    sweep, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for name in ("0", "1", "2"):
        job(sweep, name, **{"plan.json": f'{{"job": {name}}}'})
    pack(sweep, tmp_path / "jobs.gz")
    mine = job(elsewhere, "1", **{"plan.json": '{"mine": true}'})  # finished here: wins
    killed = elsewhere / "2"
    killed.mkdir()
    (killed / "train.log").write_text("killed half-way")
    assert unpack(tmp_path / "jobs.gz", elsewhere) == (2, 1)
    assert (mine / "plan.json").read_text() == '{"mine": true}'
    assert not (killed / "train.log").exists() and (killed / "plan.json").read_text() == '{"job": 2}'
    results = json.loads((elsewhere / "0" / "results.json").read_text())
    assert results["run_dir"] == str((elsewhere / "0").resolve()) and results["best_val_acc"] == 0.5
    assert (elsewhere / "multirun.yaml").read_text() == "hydra: {}\n"
    assert unpack(tmp_path / "jobs.gz", elsewhere) == (0, 3)  # again: everything is finished here now


def test_a_file_that_is_not_carried_jobs_and_a_directory_that_is_not_a_sweep_are_refused(tmp_path, capsys):
    (tmp_path / "notes.gz").write_bytes(b"not gzip")
    with pytest.raises(SystemExit, match="is not a file of carried jobs"):
        main(["unpack", str(tmp_path / "notes.gz"), str(tmp_path / "sweep")])
    assert main(["pack", str(tmp_path), str(tmp_path / "jobs.gz")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_unpacking_into_a_sweep_that_is_running_is_refused(tmp_path):
    import fcntl

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    job(sweep, "0")
    pack(sweep, tmp_path / "jobs.gz")
    with open(sweep / "multirun.yaml", "a") as running:  # what simfreeze.runs.preflight holds while a sweep runs
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="a sweep is running"):
            unpack(tmp_path / "jobs.gz", sweep)
    assert unpack(tmp_path / "jobs.gz", sweep) == (0, 1)
