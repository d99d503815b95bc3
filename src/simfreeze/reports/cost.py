"""The cost model of Ivanov's 45/5 paper beside measured times: training k target models with or
without a source.

The paper counts layers trained: ``N_classic = L · k`` (every model from scratch, ResNet-50: L = 50)
and ``N_transfer = F + (L − F) · k`` (the F frozen layers trained once, in the source; its static
45/5 baseline: F = 45), and prices a layer at ``t`` = mean training time of one layer, so
``T = N · t``. Both are linear in k; transfer has the smaller slope. The measured counterpart: ``k · scratch seconds`` and
``source seconds + k · transfer seconds``.
"""

from __future__ import annotations

from typing import Sequence


def layers_trained(k: int, total: int = 50, frozen: int = 45) -> tuple[int, int]:
    """``(N_classic, N_transfer)`` for k target models."""
    return total * k, frozen + (total - frozen) * k


def cost_table(scratch_seconds: float, source_seconds: float, transfer_seconds: float,
               ks: Sequence[int] = range(1, 11), total: int = 50, frozen: int = 45) -> list[dict]:
    """Predicted (formula, ``t = scratch_seconds / total``) and measured seconds for each k."""
    per_layer = scratch_seconds / total
    rows = []
    for k in ks:
        classic, transfer = layers_trained(k, total, frozen)
        rows.append({"k": k, "layers_classic": classic, "layers_transfer": transfer,
                     "predicted_classic_s": classic * per_layer, "predicted_transfer_s": transfer * per_layer,
                     "measured_classic_s": k * scratch_seconds,
                     "measured_transfer_s": source_seconds + k * transfer_seconds})
    return rows


def sweep_costs(rows: list[dict], ks: Sequence[int] = range(1, 11)) -> tuple[dict[str, list[dict]], float | None]:
    """Cost tables for every transfer setting of a sweep summary (``simfreeze.reports.sweep.summarise``)
    that has a measured source, priced with its own frozen depth F, against the scratch arm.
    Returns the tables and the scratch seconds (None: no scratch arm, no tables)."""
    scratch = [r for r in rows if r["arm"] == "scratch" and r["fit_seconds"]]
    if not scratch:
        return {}, None
    scratch_s = scratch[0]["fit_seconds"][0]
    tables = {r["setting"]: cost_table(scratch_s, r["source_seconds"][0], r["fit_seconds"][0], ks,
                                       r["n_layers"], round(r["mean_l_freeze"]))
              for r in rows if r["transfer"] and r["fit_seconds"] and r.get("source_seconds") and r["mean_l_freeze"] is not None
              and r.get("n_layers")}
    return tables, scratch_s


def cost_markdown(tables: dict[str, list[dict]], scratch_s: float, shown: Sequence[int] = (1, 2, 3, 5, 10)) -> str:
    """The formula beside the measurement for a few k, and each line's slope in seconds per model."""
    if not tables:
        return ""
    first = next(iter(tables.values()))
    header = ["k", "classic s (formula = measured)"]
    for setting in tables:
        header += [f"{setting}: formula s", f"{setting}: measured s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, k_row in enumerate(first):
        if k_row["k"] not in shown:
            continue
        cells = [str(k_row["k"]), f"{k_row['measured_classic_s']:.0f}"]
        for table in tables.values():
            cells += [f"{table[i]['predicted_transfer_s']:.0f}", f"{table[i]['measured_transfer_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    total = first[0]["layers_classic"]
    slopes = [f"classic {scratch_s:.1f} s per model (the formula's too: it prices a layer at t = scratch ÷ {total})"]
    for setting, table in tables.items():
        slope = table[1]["measured_transfer_s"] - table[0]["measured_transfer_s"]
        once = table[0]["measured_transfer_s"] - slope
        predicted = table[1]["predicted_transfer_s"] - table[0]["predicted_transfer_s"]
        slopes.append(f"{setting} {slope:.1f} s per model after a one-off source of {once:.1f} s "
                      f"(formula: {predicted:.1f} s per model)")
    zero = [setting for setting, table in tables.items()
            if table[0]["layers_transfer"] - (table[1]["layers_transfer"] - table[0]["layers_transfer"]) == 0]
    same = (f" With F = 0 ({', '.join(zero)}) the formula is the classic line by construction: nothing is frozen, "
            f"so the source saves no layers." if zero else "")
    return ("\n".join(lines) + "\n\nBoth grow linearly in k — the transfer line is not logarithmic, it has a smaller "
            "slope: " + "; ".join(slopes) + "." + same)
