"""The reports' shared vocabulary: settings read from a job's overrides, and mean ± std over seeds.

Pure and light (no torch, no Lightning): every other module of ``simfreeze.reports`` imports it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


class MeanStd(tuple):
    """``(mean, std)`` of ``n`` values: a plain pair to unpack and index, that also knows whether its
    std is an estimate (n ≥ 2) or the 0 that stands in for none (n = 1)."""

    def __new__(cls, mean: float, std: float, n: int):
        pair = super().__new__(cls, (mean, std))
        pair.n = n
        return pair


def mean_std(values: list[float | None]) -> MeanStd | None:
    """Mean and sample std of the values present (std 0 for one value, with ``n`` 1 to say so); None
    when none is."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return MeanStd(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def one_value(value: tuple[float, float] | None) -> bool:
    """Whether a mean ± std stands for a single value (no std to show)."""
    return getattr(value, "n", None) == 1


def plus_minus(value: tuple[float, float] | None, digits: int = 3) -> str:
    """``mean ± std``; the value alone where it is one value: a "± 0" there would read as no variance."""
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.{digits}f}" if one_value(value) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# Student's t at 0.975 (two-sided 95 %) by degrees of freedom; between rows the lower df's (wider) value.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_975(df: float) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (a fraction rounds down: wider)."""
    if df < 1:
        return float("inf")
    return T_975[max(k for k in T_975 if k <= df)] if df < 1000 else 1.960


def welch_df(std_a: float, n_a: int, std_b: float, n_b: int) -> float:
    """Welch–Satterthwaite degrees of freedom of a difference of two means with their sample stds."""
    a, b = std_a ** 2 / n_a, std_b ** 2 / n_b
    denominator = a * a / (n_a - 1) + b * b / (n_b - 1)
    return (a + b) ** 2 / denominator if denominator else float(n_a + n_b - 2)


def binomial_se(accuracy: float, images: int) -> float:
    """The standard error of an accuracy measured on ``images`` independent images: sqrt(p(1 − p)/n)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / images) if images else float("nan")


def sampling_phrase(accuracy: float, images: int | None, chance: float | None, gap_points: float | None = None) -> str:
    """What one seed's accuracy can tell, when there is no seed noise to judge by: its sampling error
    on ``images`` images (one binomial SE), the gap in images, and the chance level."""
    if not images:
        return "1 seed: no estimate of seed noise to judge it against"
    se = 100 * binomial_se(accuracy, images)
    parts = [f"1 seed, so no seed noise to judge it by; measured on {images} images, an accuracy near "
             f"{accuracy:.2f} has a sampling error of {se:.1f} points (one binomial SE)"]
    if gap_points is not None:
        parts.append(f"the gap is {abs(gap_points) * images / 100:.0f} of {images} images")
    if chance:
        parts.append(f"chance is {100 * chance:.0f} %")
    return "; ".join(parts)


def paired_interval(correct_a: list[list[bool]], correct_b: list[list[bool]], draws: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Accuracy of A minus B in points, with a 95 % interval, from per-image outcomes on the same
    held-out images: ``correct_x[s][i]`` is whether seed ``s``'s run got image ``i`` right (the same
    seeds, in the same order, for both). The interval draws seeds and images with replacement
    (a two-way bootstrap), so it carries both the seed noise and the test set's sampling error, and
    pairs the two settings image by image. Fixed RNG: the same numbers every time."""
    import numpy as np

    difference = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)  # (seeds, images)
    n_seeds, n_images = difference.shape
    rng = np.random.default_rng(seed)
    # A draw's mean over its drawn seeds × drawn images is w·D·v / (S·I) with w, v the draw counts.
    w = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=draws).astype(np.float64)
    v = rng.multinomial(n_images, [1 / n_images] * n_images, size=draws).astype(np.float64)
    means = np.einsum("bs,si,bi->b", w, difference, v) / (n_seeds * n_images)
    low, high = np.quantile(means, [0.025, 0.975])
    return 100 * float(difference.mean()), 100 * float(low), 100 * float(high)


def seeds_phrase(counts: list[int]) -> str:
    """What a figure's points are, from the number of seeds per setting: "mean ± std over 3 seeds",
    "mean ± std over 1–3 seeds per setting" or "1 seed per setting"."""
    counts = [n for n in counts if n]
    if not counts or max(counts) == 1:
        return "1 seed per setting"
    low, high = min(counts), max(counts)
    return f"mean ± std over {high} seeds" if low == high else f"mean ± std over {low}–{high} seeds per setting"


def zoomed_label(axis, label: str, digits: int = 3) -> str:
    """``label`` with the axis's shown range, for a y axis that does not start at 0 (call after drawing)."""
    low, high = axis.get_ylim()
    return f"{label} (axis zoomed: {low:.{digits}f}–{high:.{digits}f})"


def parse_override(text: str) -> tuple[str, str]:
    """``key=value`` of a Hydra override, without its ``+`` / ``~`` prefix."""
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def setting_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs, in first-seen order (``seed`` aside)."""
    present = [dict(parse_override(o) for o in run["overrides"]) for run in runs if run.get("overrides")]
    keys = list(dict.fromkeys(key for overrides in present for key in overrides))
    values = {key: {overrides.get(key) for overrides in present} for key in keys}
    return [key for key, seen in values.items() if len(seen) > 1 and key != "seed"]


def setting_of(run: dict[str, Any], keys: list[str]) -> str:
    """A job's setting: its values of the swept keys (its arm and name when it has no overrides)."""
    present = dict(parse_override(o) for o in run.get("overrides") or [])
    return " ".join(f"{key}={present[key]}" for key in keys if key in present) or \
        f"{run.get('arm', '?')} {run.get('name', '')}".strip()


def start_of(run: dict[str, Any]) -> str | None:
    """The model a run starts from: its source's name (``source:cat``; ``source:ant-bee`` for a run
    with ``transfer_from=source.source``, such as ``arm=base_finetune``), else the weights it loaded
    (``IMAGENET1K_V2``); None when it records neither (scratch, runs made before)."""
    source = run.get("source")
    if isinstance(source, dict) and source.get("name"):
        return source["name"]
    weights = run.get("weights")
    return str(weights["weights"]) if isinstance(weights, dict) and weights.get("weights") else None


def architecture_of(run: dict[str, Any]) -> str | None:
    weights = run.get("weights")
    return weights.get("arch") if isinstance(weights, dict) else None


def effective_policy(run: dict[str, Any]) -> str | None:
    """The freeze policy a run trained with. Runs made before results.json recorded it wrote the
    config's ``freeze.policy`` even where the ``freeze.l_freeze`` shorthand, an override, set it."""
    values = dict(parse_override(o) for o in run.get("overrides") or [])
    depth = values.get("freeze.l_freeze", values.get("freeze.depth"))
    if depth == "dynamic":
        return "linear"
    if depth is not None and depth.isdigit():
        return "static"
    return run.get("policy")
