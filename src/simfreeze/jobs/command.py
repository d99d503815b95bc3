"""The command line's contract beside Hydra's: its composition errors and invalid YAML as one
``error:`` line with exit status 2, and what ``--cfg job`` cannot show of a sweep."""

from __future__ import annotations

from simfreeze.config import CONF


def yaml_error_line(err: Exception) -> str:
    """``conf/experiment/x.yaml, line 3, column 6: while parsing a flow sequence: expected ',' or ']'``."""
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = ": ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    return f"{where}{what or ' '.join(str(err).split())} (not valid YAML)"


def sweep_note(argv: list[str]) -> str | None:
    """After ``--cfg job`` of an experiment that sweeps (``hydra.sweeper.params``): what each of its
    jobs sets, which the printed config (one composition, before the sweep) cannot show."""
    from hydra import compose, initialize_config_dir

    takes_value = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp"}
    overrides = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in takes_value)]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        params = compose("train", overrides, return_hydra_config=True).hydra.sweeper.params or {}
    if not params:
        return None
    lines = [f"#   {key}: {value}" for key, value in params.items()]
    return "\n".join(["# This is a sweep: the config above is before its values; its jobs take every combination of", *lines])
