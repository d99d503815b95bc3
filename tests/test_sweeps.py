"""Sweeps: one summary per setting, the depth verdict, failure isolation, parallel jobs, launchers."""

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import joblib
import pytest
import torch

from simfreeze.speed.placement import claim_gpu, wants_one_gpu
from simfreeze.reports.depth import depth_verdict
from simfreeze.reports.stats import setting_keys
from simfreeze.reports.sweep import main, read_runs, summarise, write_summary
from tests.helpers import SMALL, compose_config, run_train


def run(job, seed, acc, seconds, *, arm="depth", policy="static", depth=None, transfer=True, extra=(), status="ok"):
    overrides = ["+experiment=depth_sweep", *extra, f"seed={seed}"] + ([f"freeze.l_freeze={depth}"] if depth is not None else [])
    return {"job": str(job), "status": status, "arm": arm, "name": f"{arm}:dog", "seed": seed, "overrides": overrides,
            "transfer": transfer, "policy": policy, "l_freeze": 0 if depth in (None, "dynamic") else depth,
            "n_layers": 50, "S": 0.98 if policy == "linear" else None, "best_val_acc": acc, "test_acc": None,
            "fit_seconds": seconds, "trainable_parameters": 10, "run_dir": f"/x/{job}"}


def depth_runs():
    runs = []
    for seed, accs in enumerate([(0.60, 0.64, 0.62, 0.61), (0.62, 0.66, 0.60, 0.63)]):
        for depth, acc in zip((0, 45, 49, "dynamic"), accs):
            r = run(len(runs), seed, acc, 100 - (depth if depth != "dynamic" else 39), depth=depth,
                    policy="linear" if depth == "dynamic" else "static")
            if depth == "dynamic":
                r["l_freeze"] = 39 + seed  # seeds' S differ a little
            runs.append(r)
    return runs


def test_settings_are_what_the_sweep_varies_besides_the_seed():
    runs = depth_runs()
    assert setting_keys(runs) == ["freeze.l_freeze"]
    rows = summarise(runs)
    assert [r["setting"] for r in rows] == ["freeze.l_freeze=0", "freeze.l_freeze=45", "freeze.l_freeze=49", "freeze.l_freeze=dynamic"]
    assert rows[1]["n"] == 2 and rows[1]["best_val_acc"][0] == pytest.approx(0.65)
    assert rows[1]["best_val_acc"][1] == pytest.approx(0.0141421, rel=1e-4)  # sample std of 0.64, 0.66
    assert rows[3]["l_freeze"] == [39, 40] and rows[3]["mean_l_freeze"] == 39.5
    # a threshold sweep: two swept keys make the setting; a key given once everywhere does not
    thresholds = [run(i, s, 0.6, 10, policy="threshold", extra=[f"freeze.low={lo}", "freeze.high=0.9", "arm=threshold"])
                  for i, (lo, s) in enumerate([(0.5, 0), (0.5, 1), (0.7, 0), (0.7, 1)])]
    assert [r["setting"] for r in summarise(thresholds)] == ["freeze.low=0.5", "freeze.low=0.7"]


def test_the_verdict_names_the_best_fixed_depth_and_how_far_dynamic_landed():
    verdict = depth_verdict(summarise(depth_runs()))
    assert verdict["best_depth"] == 45 and verdict["best_acc"][0] == pytest.approx(0.65)
    (dynamic,) = verdict["dynamic"]
    assert dynamic["points_below_best"] == pytest.approx(3.0) and dynamic["layers_from_best"] == -5.5


def test_failed_and_killed_jobs_are_listed_and_not_averaged(tmp_path):
    runs = depth_runs()
    runs[1] = {**runs[1], "status": "failed", "error": "RuntimeError: out of memory", "best_val_acc": None}
    for r in runs:
        (tmp_path / r["job"]).mkdir()
        (tmp_path / r["job"] / "results.json").write_text(json.dumps(r))
    (tmp_path / "9" / ".hydra").mkdir(parents=True)  # a job that never wrote results
    (tmp_path / "9" / ".hydra" / "overrides.yaml").write_text("- +experiment=depth_sweep\n- seed=2\n- freeze.l_freeze=45\n")
    summary = write_summary(tmp_path, "python -m train +experiment=depth_sweep")
    assert [r["job"] for r in summary["failed"]] == ["1", "9"]
    rows = {r["setting"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert rows["freeze.l_freeze=45"]["n"] == "1" and rows["freeze.l_freeze=45"]["failed"] == "2"
    assert float(rows["freeze.l_freeze=45"]["best_val_acc_mean"]) == pytest.approx(0.66)
    text, report = (tmp_path / "summary.md").read_text(), (tmp_path / "report.md").read_text()
    assert "RuntimeError: out of memory" in text and "## Failed jobs" in text
    assert "Best fixed depth (chosen on best val acc): **45**" in summary["verdict"] and summary["verdict"] in text and summary["verdict"] in report
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(open(tmp_path / "runs.csv")))) == 9


def write_plan(sweep, task, params=None, sweeper="hydra._internal.core_plugins.basic_sweeper.BasicSweeper"):
    """The part of Hydra's multirun.yaml the summary reads: the sweeper, its params and the command's overrides."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(json.dumps({"hydra": {  # JSON is YAML
        "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
        "sweeper": {"_target_": sweeper, "max_batch_size": None, "params": params},
        "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task}}}))


def write_job(sweep, job, overrides, results=None):
    """A job directory as Hydra leaves it; ``results``: a dict, raw text, or None (killed: no results.json)."""
    (sweep / str(job) / ".hydra").mkdir(parents=True)
    (sweep / str(job) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        text = results if isinstance(results, str) else json.dumps(results)
        (sweep / str(job) / "results.json").write_text(text)


def depth_sweep(sweep, skip=(), killed=(), broken=None):
    """``+experiment=depth_sweep seed=0,1 freeze.l_freeze=0,45`` (jobs 0-3) by hand; ``broken``: job → results text."""
    write_plan(sweep, ["+experiment=depth_sweep", "seed=0,1", "freeze.l_freeze=0,45"])
    for job, (seed, depth) in enumerate([(0, 0), (0, 45), (1, 0), (1, 45)]):
        r = run(job, seed, 0.6 + depth / 1000, 100 - depth, depth=depth)
        r["overrides"] = ["+experiment=depth_sweep", f"seed={seed}", f"freeze.l_freeze={depth}"]
        r["run_dir"] = str(sweep / str(job))
        if job not in skip:
            write_job(sweep, job, r["overrides"], None if job in killed else (broken or {}).get(job, r))


def test_a_truncated_or_empty_results_json_is_a_broken_job_with_its_overrides(tmp_path, capsys):
    full = json.dumps(run(1, 0, 0.7, 50, depth=45))
    depth_sweep(tmp_path, broken={1: full[:len(full) // 2], 3: ""})
    assert main([str(tmp_path)]) == 1
    runs = {r["job"]: r for r in read_runs(tmp_path)}
    assert [r["status"] for r in runs.values()] == ["ok", "broken", "ok", "broken"]
    assert runs["1"]["error"].startswith("results.json is not valid JSON: ")
    assert runs["3"]["error"] == "results.json is not valid JSON: the file is empty"
    assert (runs["1"]["seed"], runs["3"]["seed"]) == (0, 1)
    rows = {r["setting"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert (rows["freeze.l_freeze=45"]["n"], rows["freeze.l_freeze=45"]["failed"]) == ("0", "2")
    text = (tmp_path / "summary.md").read_text()
    assert "- job 1 (freeze.l_freeze=45, seed 0): results.json is not valid JSON" in text
    assert "- job 3 (freeze.l_freeze=45, seed 1): results.json is not valid JSON: the file is empty" in text
    assert "FAILED job 3" in capsys.readouterr().err


def test_a_killed_job_takes_its_seed_and_arm_from_its_overrides(tmp_path):
    # arm and seed swept: job 3 was killed; its .hydra/overrides.yaml says arm=dynamic seed=1
    write_plan(tmp_path, ["+experiment=cat_to_dog", "arm=scratch,dynamic", "seed=0,1"])
    for job, (arm, seed) in enumerate([("scratch", 0), ("scratch", 1), ("dynamic", 0), ("dynamic", 1)]):
        r = {**run(job, seed, 0.6, 50, arm=arm), "overrides": ["+experiment=cat_to_dog", f"arm={arm}", f"seed={seed}"]}
        write_job(tmp_path, job, r["overrides"], None if job == 3 else r)
    killed = read_runs(tmp_path)[3]
    assert (killed["status"], killed["seed"], killed["arm"]) == ("killed", 1, "dynamic")
    assert [(r["setting"], r["n"], r["failed"]) for r in summarise(read_runs(tmp_path))] == [
        ("arm=scratch", 2, 0), ("arm=dynamic", 1, 1)]
    assert main([str(tmp_path)]) == 1
    assert "- job 3 (arm=dynamic, seed 1): no results.json" in (tmp_path / "summary.md").read_text()
    # seeds only: the setting is the arm and name, which a killed job takes from a job with its other overrides
    seeds = tmp_path / "seeds"
    write_plan(seeds, ["+experiment=cat_to_dog", "seed=0,1,2"])
    for seed in range(3):
        r = {**run(seed, seed, 0.6, 50, arm="dynamic"), "overrides": ["+experiment=cat_to_dog", f"seed={seed}"]}
        write_job(seeds, seed, r["overrides"], None if seed == 2 else r)
    killed = read_runs(seeds)[2]
    assert (killed["status"], killed["seed"], killed["arm"], killed["name"]) == ("killed", 2, "dynamic", "dynamic:dog")
    assert [(r["setting"], r["n"], r["failed"]) for r in summarise(read_runs(seeds))] == [("dynamic dynamic:dog", 2, 1)]


def test_a_planned_job_without_a_folder_is_listed_as_missing(tmp_path, capsys):
    depth_sweep(tmp_path, skip=(2,))  # job 2 (seed=1 freeze.l_freeze=0) never started
    assert main([str(tmp_path)]) == 1
    runs = read_runs(tmp_path)
    assert [(r["job"], r["status"]) for r in runs] == [("0", "ok"), ("1", "ok"), ("2", "missing"), ("3", "ok")]
    missing = runs[2]
    assert missing["error"] == "never started (no job folder)" and missing["seed"] == 1
    assert missing["overrides"] == ["+experiment=depth_sweep", "seed=1", "freeze.l_freeze=0"]
    rows = {r["setting"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert (rows["freeze.l_freeze=0"]["n"], rows["freeze.l_freeze=0"]["failed"]) == ("1", "1")
    assert "- job 2 (freeze.l_freeze=0, seed 1): never started (no job folder)" in (tmp_path / "summary.md").read_text()
    assert "FAILED job 2: never started" in capsys.readouterr().err
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "runs.csv"))] == ["ok", "ok", "missing", "ok"]


def test_the_plan_expands_as_the_basic_sweeper_does_and_is_unknown_otherwise(tmp_path):
    from simfreeze.reports.sweep import planned_jobs

    write_plan(tmp_path / "a", ["+experiment=cat_to_dog", "data.classes=[cat,dog]", "seed=range(3)"],
               params={"arm": "scratch,dynamic"})
    jobs = planned_jobs(tmp_path / "a")
    assert len(jobs) == 6 and jobs[4] == ["arm=dynamic", "+experiment=cat_to_dog", "data.classes=[cat,dog]", "seed=1"]
    write_plan(tmp_path / "b", ["seed=0,1"], sweeper="hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    write_plan(tmp_path / "c", ["seed=0,1", "model=glob(*)"])  # glob() needs the config groups
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "multirun.yaml").write_text("hydra: {sweeper: [")  # truncated
    assert [planned_jobs(tmp_path / x) for x in "bcde"] == [None] * 4  # e: no multirun.yaml at all


def test_a_sweep_where_no_job_started_is_summarised_and_fails(tmp_path, capsys):
    depth_sweep(tmp_path, skip=(0, 1, 2, 3))
    (tmp_path / "3").mkdir()  # set up, then killed before Hydra wrote .hydra/
    assert main([str(tmp_path)]) == 1
    assert [(r["job"], r["status"], r["seed"]) for r in read_runs(tmp_path)] == [
        ("0", "missing", 0), ("1", "missing", 0), ("2", "missing", 1), ("3", "killed", 1)]
    text = (tmp_path / "summary.md").read_text()
    assert "## Failed jobs" in text and "4 job(s) failed" in capsys.readouterr().err


def test_parallel_jobs_claim_different_gpus_and_wait_when_all_are_taken(tmp_path):
    assert wants_one_gpu("auto", "auto", True, 4) and not wants_one_gpu(2, "auto", True, 4)
    assert not wants_one_gpu("auto", "auto", False, 4) and not wants_one_gpu("auto", "cpu", True, 4)
    got = []
    with claim_gpu(tmp_path, 2, first=1) as a, claim_gpu(tmp_path, 2, first=1) as b:
        assert (a, b) == (1, 0)
        waiter = threading.Thread(target=lambda: got.append(claim_gpu(tmp_path, 2, poll_seconds=0.05).__enter__()))
        waiter.start()
        waiter.join(0.3)
        assert got == []  # both GPUs held: the third job waits
    waiter.join(5)
    assert got == [0]  # both freed: the waiter tries GPU 0 first


def test_a_lock_failure_other_than_busy_takes_the_jobs_gpu_without_a_lock(tmp_path, monkeypatch, caplog):
    import errno

    def no_flock(handle, flags):  # Lustre mounted without -o flock
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr("simfreeze.speed.placement.fcntl.flock", no_flock)
    with claim_gpu(tmp_path, 4, first=6) as index:
        assert index == 2  # job 6 of 4 GPUs: 6 mod 4
    assert "without a lock" in caplog.text


def test_a_slurm_job_takes_its_allocations_gpu_without_a_lock(tmp_path, monkeypatch):
    from simfreeze.speed import placement

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a SLURM job sees its own allocation only
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SIMFREEZE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    trainer = {"devices": "auto", "accelerator": "auto"}
    with placement.job_devices(trainer, job=7, multirun=True):
        assert trainer == {"devices": [0], "accelerator": "gpu"}
    assert not (tmp_path / "locks").exists()  # no lock file
    assert placement.in_slurm_job({"SLURM_JOB_ID": "1"}) and not placement.in_slurm_job({})


UUID_2, UUID_3 = "GPU-8f3b5c1e-0a4d-6b2e-9c7f-1d2e3f4a5b6c", "GPU-1a2b3c4d-5e6f-7a8b-9c0d-e1f2a3b4c5d6"
MIG = "MIG-0d3c6f8a-27b1-5e9d-8c4f-6a7b8c9d0e1f"


def test_gpus_are_named_by_their_physical_identity_not_the_process_local_index():
    from simfreeze.speed.placement import physical_gpus, visible_devices

    assert visible_devices({}) is None  # unset: every GPU
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []  # empty: none
    assert visible_devices({"CUDA_VISIBLE_DEVICES": f" 2, 3 ,{UUID_2[:6]},{MIG}"}) == ["2", "3", UUID_2[:6], MIG]
    assert physical_gpus(2, None) == ["0", "1"]
    assert physical_gpus(2, ["2", "3"]) == ["2", "3"]  # cuda:0 of this process is GPU 2 of the machine
    assert physical_gpus(2, [UUID_3, MIG]) == [UUID_3, MIG]
    assert physical_gpus(0, []) == []
    # With the UUID known, every way of naming a GPU (index, partial UUID, another CUDA_DEVICE_ORDER)
    # gives one name; a MIG slice keeps its own id (its GPU's UUID is its sibling slices' too).
    machine = {"2": UUID_2, "3": UUID_3, UUID_3[:6]: UUID_3, MIG: UUID_2}
    for visible in (["2", "3"], [UUID_3[:6]], [MIG, "3"]):
        names = physical_gpus(len(visible), visible, lambda i: machine[visible[i]])
        assert names == [MIG if v == MIG else machine[v] for v in visible]


def test_two_sweeps_on_one_machine_take_different_gpus(tmp_path, monkeypatch):
    from simfreeze.speed import placement

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(placement, "cuda_uuid", lambda index: None, raising=False)  # no UUIDs: the entries
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("SIMFREEZE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    first, second = {"devices": "auto", "accelerator": "auto"}, {"devices": "auto", "accelerator": "gpu"}
    with placement.job_devices(first, job=0, multirun=True), \
            placement.job_devices(second, job=0, multirun=True):
        assert (first["devices"], second["devices"]) == ([0], [1])  # job 0 of each sweep: not both on GPU 2
        assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["gpu-2.lock", "gpu-3.lock"]
    assert placement.gpu_lock_dir({}) == Path(tempfile.gettempdir()) / "simfreeze-gpu-locks"  # machine-wide


def test_a_user_whose_gpus_overlap_a_running_jobs_waits_for_them(tmp_path):
    from simfreeze.speed.placement import physical_gpus

    machine = {"2": UUID_2, "3": UUID_3, UUID_3[:6]: UUID_3}
    one = physical_gpus(2, ["2", "3"], lambda i: machine[["2", "3"][i]])  # CUDA_VISIBLE_DEVICES=2,3
    other = physical_gpus(1, [UUID_3[:6]], lambda i: UUID_3)  # another user's CUDA_VISIBLE_DEVICES=GPU-1a
    got = []
    with claim_gpu(tmp_path, one, first=1) as index:
        assert index == 1  # GPU 3
        waiter = threading.Thread(target=lambda: got.append(claim_gpu(tmp_path, other, poll_seconds=0.05).__enter__()))
        waiter.start()
        waiter.join(0.3)
        assert got == []  # its only GPU is GPU 3, held
    waiter.join(5)
    assert got == [0]


@pytest.mark.parametrize("visible", ["2,3", f"{UUID_3},{MIG}", None])
def test_a_local_queue_job_sees_the_gpus_the_users_environment_allowed(visible, tmp_path, monkeypatch):
    """hydra/launcher=local_queue through the real plugin and submitit's local executor: the job, a
    process of its own, reads its CUDA_VISIBLE_DEVICES (None: unset, every GPU)."""
    import functools
    import os

    import submitit
    from hydra.utils import instantiate

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cfg = compose_config(["hydra/launcher=local_queue", f"hydra.sweep.dir={tmp_path}"], hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg

    def submit_probe(executor, task, *job_args):  # instead of the Hydra jobs: one job that reports its variable
        return [executor.submit(functools.partial(os.getenv, "CUDA_VISIBLE_DEVICES"))]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit_probe)
    assert launcher.launch([["seed=0"]], initial_job_idx=0) == [visible]


def test_keep_visible_devices_hands_any_value_through_a_shell(tmp_path):
    import subprocess

    from simfreeze.speed.placement import keep_visible_devices

    for value in ("2,3", f"{UUID_3},{MIG}", "", "0; touch pwned", None):
        environ = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
        script = " && ".join([*keep_visible_devices(environ), 'echo "${CUDA_VISIBLE_DEVICES-unset}"'])
        out = subprocess.run(script, shell=True, env={"CUDA_VISIBLE_DEVICES": "0,1"}, cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout
        assert out == ("unset" if value is None else value) + "\n"
    assert not (tmp_path / "pwned").exists()


def test_auto_precision_picks_bf16_only_on_gpus_that_compute_it_natively(monkeypatch):
    from simfreeze.speed.precision import cuda_precision, default_precision

    assert [cuda_precision(c) for c in ((7, 0), (7, 5), (8, 0), (8, 6), (9, 0))] == [
        "16-mixed", "16-mixed", "bf16-mixed", "bf16-mixed", "bf16-mixed"]  # V100, T4, A100, RTX 30xx, H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation counts
    assert default_precision("cuda") == "16-mixed"


def test_the_scale_out_pages_two_node_recipe_allocates_what_the_trainer_expects():
    from tests.helpers import REPO

    line = next(l for l in (REPO / "docs" / "scale-out.md").read_text().splitlines() if "hydra.launcher.nodes=" in l)
    overrides = line.split("python -m train", 1)[1].split()
    assert overrides[0] == "-m"  # a launcher only submits a multirun; without -m the run stays here
    cfg = compose_config(overrides[1:], hydra=True)
    launcher, trainer = cfg.hydra.launcher, cfg.trainer
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == trainer.num_nodes  # else Lightning: SLURM_NNODES != num_nodes
    assert launcher.tasks_per_node == launcher.gpus_per_node == trainer.devices  # one task per GPU


@pytest.mark.parametrize("launcher, target, gpus", [
    ("parallel", "JoblibLauncher", None), ("local_queue", "LocalLauncher", "visible"), ("slurm", "SlurmLauncher", 1)])
def test_launcher_configs_compose(launcher, target, gpus):
    cfg = compose_config([f"hydra/launcher={launcher}"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if gpus == "visible":  # submitit shows a local job every GPU of the machine
        assert cfg.hydra.launcher.gpus_per_node == torch.cuda.device_count()
    elif gpus is not None:
        assert cfg.hydra.launcher.gpus_per_node == gpus


def test_a_failing_job_does_not_stop_the_sweep_and_the_sweep_exits_non_zero(image_folder, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train("-m", "data.classes=[ant,bee],[ant,zebra]", *SMALL, "trainer.precision=16-mixed", "trainer.accelerator=cpu",
                       f"data.root={image_folder}",
                       f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    ok, failed = (json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1"))
    assert ok["status"] == "ok" and ok["best_val_acc"] is not None
    assert ok["precision"] == "bf16-mixed"  # what ran: Lightning has no fp16 autocast on a CPU
    assert failed["status"] == "failed" and "unknown class ['zebra']" in failed["error"]
    assert "FAILED job 1" in result.stderr and "data.classes=[ant,zebra]" in (sweep / "summary.md").read_text()


def test_two_seeds_by_two_arms_in_parallel_jobs(cat_dog_folder, tmp_path):
    sweep, sources = tmp_path / "sweep", tmp_path / "sources"
    run_train("+experiment=cat_to_dog", "hydra/launcher=parallel", "arm=scratch,dynamic", "seed=0,1",
              *SMALL, f"data.root={cat_dog_folder}", f"hydra.sweep.dir={sweep}", f"source.cache_dir={sources}", cwd=tmp_path)
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    threads = max(1, joblib.cpu_count() // 2)  # joblib gives each of its 2 workers its share of the cores
    assert all(f"{threads} threads" in r["device"] for r in runs)
    assert sum(not r["source"]["cached"] for r in runs if r["source"]) <= 2
    assert len(list(sources.glob("source-cat-*"))) == 2  # one cat model per seed, each trained once
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["setting"], r["n"]) for r in rows] == [("arm=scratch", "2"), ("arm=dynamic", "2")]


def test_runs_that_recorded_the_configs_policy_are_read_with_the_policy_that_ran(tmp_path):
    """results.json used to hold ``freeze.policy`` ("none") even where ``freeze.l_freeze`` set the policy."""
    for job, depth in enumerate((0, 45, "dynamic")):
        r = run(job, 0, 0.6, 50, depth=depth, policy="none")
        write_job(tmp_path, job, r["overrides"], r)
    runs = read_runs(tmp_path)
    assert [r["policy"] for r in runs] == ["static", "static", "linear"]
    verdict = depth_verdict(summarise(runs))
    assert [d["setting"] for d in verdict["dynamic"]] == ["freeze.l_freeze=dynamic"]



def doc_commands(page: str, first: str, last: str | None = None) -> list[str]:
    """The ``python -m train`` commands of a docs page's code blocks and inline code between two headings
    (``last`` None: to the end of the page)."""
    from tests.helpers import REPO

    text = (REPO / "docs" / page).read_text()
    text = text[text.index(first):None if last is None else text.index(last)]
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("python -m train ")]
    commands += re.findall(r"`(python -m train [^`]+)`", text)
    return [command.split("  #")[0].split(" # ")[0] for command in commands if "…" not in command]


def first_point(override: str) -> str:
    """A sweep override (``seed=0,1,2``) as its first point, which ``compose`` accepts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([override])[0]
    if not parsed.is_sweep_override():
        return override
    return f"{parsed.get_key_element()}={next(parsed.sweep_string_iterator())}"


def test_the_scale_out_pages_commands_compose():
    commands = doc_commands("scale-out.md", "# Sweeps, the depth oracle and scale-out")
    assert len(commands) >= 8 and any("trainer.strategy=ddp" in c for c in commands)
    for command in commands:
        overrides = [o for o in command.removeprefix("python -m train ").split() if o != "-m"]
        cfg = compose_config([first_point(o) for o in overrides], hydra=True)
        assert cfg.trainer is not None, command


def test_optuna_searches_the_depth_and_the_summary_lists_its_trials(cat_dog_folder, tmp_path):
    """hparams_search=depth: Optuna's trials are sweep jobs like any other (run dirs, TensorBoard runs,
    the summary), and python -m train's return value (best val acc) is what it maximises."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the optuna extra: pip install -e '.[optuna]'")
    sweep, sources = tmp_path / "sweep", tmp_path / "sources"
    result = run_train("hparams_search=depth", "task=cat_to_dog", *SMALL, "hydra.sweeper.n_trials=2",
                       'hydra.sweeper.params={freeze.l_freeze:"int(interval(0,13))"}', f"data.root={cat_dog_folder}",
                       f"hydra.sweep.dir={sweep}", f"source.cache_dir={sources}", cwd=tmp_path)
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(runs) == 2 and all(r["status"] == "ok" and r["arm"] == "static45" for r in runs)
    assert all(0 <= r["l_freeze"] <= 13 and r["source"]["name"] == "source:cat" for r in runs)
    best = max(r["best_val_acc"] for r in runs)
    assert f"Best value: {best}" in result.stdout + result.stderr  # Optuna's objective: the returned accuracy
    rows = list(csv.DictReader(open(sweep / "runs.csv")))
    assert len(rows) == 2 and all(r["setting"].startswith("freeze.l_freeze=") for r in rows)
    names = sorted(p.parent.name for p in (sweep / "tensorboard").glob("freeze.l_freeze=*/seed=0"))
    assert len(names) == 2 and all(",optimizer.lr=" in n for n in names)


def test_a_search_whose_sweeper_is_not_installed_names_the_extra():
    from hydra.errors import MissingConfigException

    from simfreeze.runs.preflight import hydra_error_line

    err = MissingConfigException("Could not find 'hydra/sweeper/optuna'", "hydra/sweeper/optuna", ["basic"])
    assert hydra_error_line(err) == ("hydra/sweeper=optuna: no such option; hydra/sweeper is one of basic "
                                     "(the Optuna sweeper: .venv/bin/pip install -e '.[optuna]')")


def test_a_sweep_stopped_by_sigterm_summarises_what_finished_and_its_command_finishes_it(image_folder, tmp_path):
    import signal

    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "train", "-m", "trainer.max_epochs=1,8,2", "model=small_cnn", "data.image_size=32",
               "data.per_class=12", "progress=lines", "test=false", "data.classes=[ant,bee]",
               f"data.root={image_folder}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    for line in process.stdout:  # job 1's first epoch line: its fit (and Lightning's SIGTERM handler) is on
        output.append(line)
        if line.startswith("epoch 1/8"):
            break
    process.send_signal(signal.SIGTERM)
    output = "".join(output) + process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    runs = {row["job"]: row for row in csv.DictReader(open(sweep / "runs.csv"))}
    assert runs["0"]["status"] == "ok" and runs["1"]["status"] == "stopped" and runs["2"]["status"] == "missing"
    last = sweep / "1" / "checkpoints" / "last.ckpt"
    assert f"STOPPED job 1: stopped by SIGTERM; the sweep's command run again resumes it from {last}" in output
    assert "never started" in (sweep / "summary.md").read_text()
    first_job = (sweep / "0" / "results.json").read_bytes()

    # the same command again finishes the sweep in place: job 0 kept, job 1 resumed, job 2 run
    again = subprocess.run(command, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith(f"continuing the sweep in {sweep}")
    assert (sweep / "0" / "results.json").read_bytes() == first_job
    resumed = json.loads((sweep / "1" / "results.json").read_text())
    assert resumed["status"] == "ok" and resumed["epochs"] == 8 and "epoch 2/8" in again.stdout
    assert "epoch 1/1" not in again.stdout  # job 0 did not train again
    runs = {row["job"]: row for row in csv.DictReader(open(sweep / "runs.csv"))}
    assert [runs[job]["status"] for job in "012"] == ["ok", "ok", "ok"]
    # another sweep on that directory is still refused, and says how to finish the one there
    other = subprocess.run([*command, "seed=3"], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    assert other.returncode == 2 and other.stderr.strip().endswith("to finish that sweep, run its own command again")
