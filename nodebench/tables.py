"""The one mean ± std formatter and the generic run-record table of ``nodebench reproduce``.

Every report of nodebench formats "mean ± std over seeds" with :func:`mean_std` (pandas computes
the statistics: ``Series.mean`` and the sample standard deviation ``Series.std(ddof=1)``), so the
tables of all experiments read alike. :func:`collect_runs` and :func:`summary_table` build a
table from the run records (``summary.json`` of ``nodebench train``) alone: one row per value of
the preset's ``reproduce.report.by`` keys, mean ± std of its ``metrics`` over the ok runs, and the
counts of ok and failed runs (failed runs are counted, never averaged in).

This module imports nothing of nodebench: reports import it, never the other way round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd


def mean_std(values: Iterable[Any], fmt: str = ".3g", std_fmt: str | None = None,
             single: str = "{mean}", empty: str = "-", unit: str = "",
             count: bool = False) -> str:
    """'mean ± std' of the finite numbers in ``values`` (None, NaN and inf are left out).

    Args:
        values: numbers (a list, a pandas Series, ...).
        fmt: format spec of the mean (``".4f"``, ``".3g"``); ``std_fmt`` that of the standard
            deviation (default: ``fmt``).
        single: the text for exactly one value, ``{mean}`` being the formatted value (e.g.
            ``"{mean} (1 seed)"``).
        empty: the text when there is no value.
        unit: appended to the mean (e.g. ``"%"``).
        count: append the number of values, `` (n)``.

    Returns e.g. ``"0.1642 ± 0.0051"``. The standard deviation is the sample one (ddof = 1).
    """
    s = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float)
    s = s[s.map(math.isfinite)]
    if s.empty:
        return empty
    if len(s) == 1:
        return single.format(mean=f"{s.mean():{fmt}}{unit}")
    text = pm(s.mean(), s.std(ddof=1), fmt, std_fmt, unit)
    return f"{text} ({len(s)})" if count else text


def pm(mean: float, std: float, fmt: str = ".3g", std_fmt: str | None = None,
       unit: str = "") -> str:
    """``"mean ± std"`` of an already aggregated pair (e.g. from ``groupby().agg``), formatted as
    :func:`mean_std` does."""
    return f"{mean:{fmt}}{unit} ± {std:{std_fmt or fmt}}"


def collect_runs(root: Path | str) -> pd.DataFrame:
    """One row per run record (``summary.json``, searched recursively) under ``root``: the
    summary's fields, and every config key flattened (``config.dataset.n_obs``), plus ``run``
    (the folder, relative to ``root``). Raises FileNotFoundError when there is none."""
    from .train import _flat  # the trainer's config flattening (its resume check uses it)

    root = Path(root)
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        config = s.pop("config", None) or {}
        rows.append({**{k: v for k, v in s.items() if not isinstance(v, (dict, list))},
                     **{f"config.{k}": v for k, v in _flat(config).items()},
                     "run": str(path.parent.relative_to(root))})
    if not rows:
        raise FileNotFoundError(f"no run records (summary.json) under {root}/")
    return pd.DataFrame(rows)


def _column(frame: pd.DataFrame, key: str) -> str:
    """The column of ``key``: a summary field (model, dataset, seed) or a config key."""
    if key in frame:
        return key
    if f"config.{key}" in frame:
        return f"config.{key}"
    raise KeyError(f"report key {key!r} is neither a summary field nor a config key of the runs")


def summary_table(frame: pd.DataFrame, by: list[str], metrics: list[str],
                  fmt: str = ".4g") -> pd.DataFrame:
    """One row per value of the ``by`` keys (in the order the runs first show them): ``runs``
    ("3 ok, 1 failed"), mean ± std over the ok runs of each metric, and the failures' reasons.
    A metric no run has is left out."""
    cols = [_column(frame, key) for key in by]
    present = [m for m in metrics if m in frame]
    out = []
    for key, g in frame.groupby(cols, sort=False, dropna=False) if cols else [((), frame)]:
        key = key if isinstance(key, tuple) else (key,)
        ok, failed = g[g["status"] == "ok"], g[g["status"] != "ok"]
        row: dict[str, Any] = dict(zip(by, key))
        row["runs"] = f"{len(ok)} ok" + (f", {len(failed)} failed" if len(failed) else "")
        for m in present:
            row[m] = mean_std(ok[m], fmt)
        errors = failed["error"].dropna() if "error" in failed else []
        row["failures"] = "; ".join(sorted({str(e) for e in errors}))
        out.append(row)
    return pd.DataFrame(out)


def write_report(runs: Path, results: Path, title: str, by: list[str],
                 metrics: list[str], note: str = "") -> pd.DataFrame:
    """``table.md`` (Markdown, with ``title`` and ``note``), ``table.csv`` and ``runs.csv`` (one
    row per run) in ``results``, from the run records under ``runs``; returns the table."""
    frame = collect_runs(runs)
    table = summary_table(frame, by, metrics)
    results.mkdir(parents=True, exist_ok=True)
    table.to_csv(results / "table.csv", index=False)
    keep = [c for c in ("run", "status", "error", "model", "dataset", "seed", "params",
                        *metrics, "epochs_done", "wall_time_s") if c in frame]
    keep += [_column(frame, k) for k in by if _column(frame, k) not in keep]
    frame[keep].to_csv(results / "runs.csv", index=False)
    text = [f"# {title}", ""]
    if note:
        text += [note, ""]
    text += [(f"Mean ± sample std over the ok runs of each row ({len(frame)} runs in all); "
              "made from the run records (summary.json) only."), "",
             table.to_markdown(index=False, disable_numparse=True), ""]
    (results / "table.md").write_text("\n".join(text))
    return table


def quiet_verdict(results: Path | str) -> str | None:
    """The last verdict line (``quiet-run: QUIET ...`` or ``... CONTENDED ...``) of a
    ``quiet-run.log`` in ``results`` or its parent folder (written by ``shared/tools/quiet-run
    --log`` around the make target that produced the results), or None."""
    results = Path(results)
    for folder in (results, results.parent):
        log = folder / "quiet-run.log"
        if log.exists():
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("quiet-run:")
                     and ("QUIET" in ln or "CONTENDED" in ln)]
            if lines:
                return lines[-1]
    return None


def max_load(frame: pd.DataFrame) -> float:
    """The largest 1-min load average recorded at the start or end of the runs of ``frame``
    (columns ``load_start``, ``load_end``: summary.json's [1, 5, 15]-min triples); NaN if none."""
    values = [float(v[0]) for col in ("load_start", "load_end") if col in frame
              for v in frame[col] if isinstance(v, (list, tuple)) and v]
    return max(values, default=float("nan"))


def save_figure(fig, ax, path: Path | str, dpi: int = 120) -> str:
    """Finish a one-axes report figure (a small legend when anything is drawn, tight layout),
    save it as PNG at ``path`` and close it. Returns the file's name."""
    import matplotlib.pyplot as plt

    if ax.has_data():
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path).name


def shown_path(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies under it (no machine-specific
    paths in committed reports), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
