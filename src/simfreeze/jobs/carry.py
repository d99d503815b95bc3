"""Carry a sweep's finished jobs to another machine: ``pack`` writes what the reports and the sweep's
"kept, not run again" check read of each finished job into one compressed file of text (numbers and
settings; no weights, no images), ``unpack`` writes them back into a sweep directory elsewhere. Run the
sweep's own command on that directory afterwards and only the jobs not carried run.

For a study longer than one sitting on machines that do not keep their disk (a preempted cloud node, a
CI runner, a fresh session)::

    python -m simfreeze.jobs.carry pack outputs/multirun/regimes_full regimes_full.jobs.jsonl.gz
    python -m simfreeze.jobs.carry unpack regimes_full.jobs.jsonl.gz outputs/multirun/regimes_full

The sources and bases the unfinished jobs need are trained again on the new machine (their weights are
not carried); the reports say when a source's accuracy differs between its trainings."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from simfreeze.reports.records import finished

FORMAT = "simfreeze-carried-jobs/2"
# What the reports and the resume check read of a job; the rest (checkpoints, event files, train.log) stays.
JOB_FILES = ("results.json", "plan.json", "split.json", "similarity.json", "test_predictions.json",
             "csv/metrics.csv", ".hydra/overrides.yaml", ".hydra/config.yaml")
SWEEP_FILES = ("multirun.yaml",)


def finished_jobs(sweep_dir: Path) -> Iterator[Path]:
    """The sweep's job directories whose ``results.json`` says the job finished, in job-number order."""
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / "results.json").is_file()]
    for job_dir in sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        try:
            results = json.loads((job_dir / "results.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and finished(results):
            yield job_dir


def read_files(directory: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {name: (directory / name).read_text() for name in names if (directory / name).is_file()}


def pack(sweep_dir: Path, out: Path) -> int:
    """Write ``sweep_dir``'s finished jobs to ``out`` (gzip'd JSON lines: a header, then per job the texts
    not seen before, ``{"text": …, "sha": …}``, and the job, ``{"job": …, "files": {name: sha}}``); returns
    how many jobs. Each text is stored once: the jobs of one target and size share their ``split.json``
    (the image lists, most of a job's bytes), the rates of a depth often their ``plan.json``."""
    count, seen = 0, set()
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        header = {"format": FORMAT, "sweep": sweep_dir.name, "files": read_files(sweep_dir, SWEEP_FILES)}
        f.write(json.dumps(header) + "\n")
        for job_dir in finished_jobs(sweep_dir):
            files = {}
            for name, text in read_files(job_dir, JOB_FILES).items():
                files[name] = sha = hashlib.sha256(text.encode()).hexdigest()[:20]
                if sha not in seen:
                    f.write(json.dumps({"sha": sha, "text": text}) + "\n")
                    seen.add(sha)
            f.write(json.dumps({"job": job_dir.name, "files": files}) + "\n")
            count += 1
    return count


def read_pack(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the jobs, each ``{"job": name, "files": {name: text}}``."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, EOFError) as err:
        raise SystemExit(f"error: {path} is not a file of carried jobs ({err}); make one with "
                         f"python -m simfreeze.jobs.carry pack <sweep dir> {path}")
    if not lines or lines[0].get("format") != FORMAT:
        raise SystemExit(f"error: {path} is not a file of carried jobs (format {FORMAT})")
    texts = {line["sha"]: line["text"] for line in lines[1:] if "sha" in line}
    jobs = [{"job": line["job"], "files": {name: texts[sha] for name, sha in line["files"].items()}}
            for line in lines[1:] if "job" in line]
    return lines[0], jobs


@contextlib.contextmanager
def sweep_not_running(sweep_dir: Path):
    """Hold the lock a running sweep holds on its ``multirun.yaml`` (``simfreeze.runs.preflight``) while
    jobs are written: a sweep running on the directory must not see its job directories replaced."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"error: a sweep is running on {sweep_dir}; unpack once it has ended") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unpack(path: Path, sweep_dir: Path) -> tuple[int, int]:
    """Write the carried jobs into ``sweep_dir``: a job directory that already holds a finished job is
    left alone (what this machine computed wins), any other is replaced. Returns (written, kept)."""
    header, jobs = read_pack(path)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with sweep_not_running(sweep_dir):
        return write_jobs(header, jobs, sweep_dir)


def write_jobs(header: dict[str, Any], jobs: list[dict[str, Any]], sweep_dir: Path) -> tuple[int, int]:
    for name, text in header["files"].items():
        if not (sweep_dir / name).exists():
            (sweep_dir / name).write_text(text)
    local = {p.name for p in finished_jobs(sweep_dir)}
    written = 0
    for job in jobs:
        job_dir = sweep_dir / job["job"]
        if job["job"] in local:
            continue
        shutil.rmtree(job_dir, ignore_errors=True)  # a killed or failed attempt's leftovers
        for name, text in job["files"].items():
            target = job_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == "results.json":  # where it lies now: the reports find plan.json through it
                results = json.loads(text)
                results["run_dir"] = str(job_dir.resolve())
                text = json.dumps(results, indent=2, default=str) + "\n"
            target.write_text(text)
        written += 1
    return written, len(jobs) - written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simfreeze.jobs.carry", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write a sweep directory's finished jobs into one file")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("file", type=Path)
    u = sub.add_parser("unpack", help="write carried jobs into a sweep directory (finished local jobs win)")
    u.add_argument("file", type=Path)
    u.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        if not (args.sweep_dir / "multirun.yaml").is_file():
            print(f"error: {args.sweep_dir} is not a sweep directory (no multirun.yaml)", file=sys.stderr)
            return 2
        count = pack(args.sweep_dir, args.file)
        print(f"{count} finished jobs of {args.sweep_dir} → {args.file} ({args.file.stat().st_size / 1e3:.0f} kB)")
    else:
        written, kept = unpack(args.file, args.sweep_dir)
        print(f"{written} jobs written into {args.sweep_dir}; {kept} left as they were (finished here already)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
