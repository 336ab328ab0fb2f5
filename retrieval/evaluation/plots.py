"""Figures for evaluation reports: PNG files drawn with matplotlib's Agg backend (no screen needed).

Each function takes the plain lists of a report (see evaluate.py and thresholds.py) and writes one file,
with a title, axis labels and a legend. Imported only when plots are asked for: matplotlib is slow to load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def recall_at_k(curves: dict[str, Sequence[float]], path: Path, title: str) -> Path:
    """R@k for k = 1..len(curve), one line per direction, k on a log axis so R@1..10 stay readable."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, curve in curves.items():
        ks = np.arange(1, len(curve) + 1)
        marks = ", ".join(f"R@{k} {100 * curve[k - 1]:.1f}" for k in (1, 10, 100) if k <= len(curve))
        ax.plot(ks, 100 * np.asarray(curve), label=f"{name.replace('_to_', ' → ')} ({marks})")
    ax.set(xscale="log", xlabel="k", ylabel="recall@k (%)", ylim=(0, 100), title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def score_histograms(histogram: dict[str, Sequence[float]], path: Path, title: str, theta: float | None = None) -> Path:
    """Densities of the relevant and the other (query, item) scores; they overlap where no θ can separate them."""
    edges = np.asarray(histogram["edges"])
    width = np.diff(edges)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, label, colour in (("other", "other pairs", "tab:gray"), ("relevant", "relevant pairs", "tab:green")):
        counts = np.asarray(histogram[key], dtype=float)
        density = counts / max(counts.sum(), 1) / width
        ax.stairs(density, edges, fill=True, alpha=0.45, color=colour, label=f"{label} (n={int(counts.sum()):,})")
        ax.stairs(density, edges, color=colour, linewidth=1.2)
    if theta is not None:
        ax.axvline(theta, color="tab:red", linestyle="--", label=f"best-F1 θ = {theta:.3f}")
    used = np.nonzero(np.asarray(histogram["relevant"]) + np.asarray(histogram["other"]))[0]
    if len(used):
        ax.set_xlim(edges[used[0]], edges[used[-1] + 1])
    ax.set(xlabel="similarity sim(q, x)", ylabel="density", title=title)
    ax.legend()
    return _save(fig, path)


def threshold_sweep(curve: dict[str, Sequence[float]], path: Path, title: str, marks: dict[str, float]) -> Path:
    """Precision, recall and F1 of R(q, D) against θ, with the chosen θ values marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _sweep_axes(ax, curve, marks, title)
    return _save(fig, path)


def _sweep_axes(ax: Any, curve: dict[str, Sequence[float]], marks: dict[str, float], title: str) -> None:
    """One panel: precision, recall and F1 against θ, the marks as vertical lines, θ limited to where recall moves."""
    theta = np.asarray(curve["theta"])
    for key, colour in (("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green")):
        ax.plot(theta, curve[key], color=colour, label=key if key != "f1" else "F1")
    # a line style per mark: there are one or two marks, so the styles outlast them
    for (name, value), style in zip(marks.items(), ("--", ":", "-."), strict=False):
        ax.axvline(value, color="tab:red", linestyle=style, label=f"{name}: θ = {value:.3f}")
    moving = np.nonzero((np.asarray(curve["recall"]) > 0.001) & (np.asarray(curve["recall"]) < 0.999))[0]
    if len(moving):
        ax.set_xlim(theta[max(moving[0] - 2, 0)], theta[min(moving[-1] + 2, len(theta) - 1)])
    ax.set(xlabel="θ (cosine similarity)", ylabel="value", ylim=(0, 1.02), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _marks(t: dict[str, Any]) -> dict[str, float]:
    """The θ values a threshold report chose: the F1-best, and the lowest reaching the target precision."""
    marks = {"best F1": t["best_f1_theta"]}
    if t.get("target_precision_theta") is not None:
        marks[f"precision ≥ {t['target_precision']}"] = t["target_precision_theta"]
    return marks


def fusion(sweep: dict[str, Any], path: Path, title: str) -> Path:
    """Recall against the fusion weight w (w = 0: caption only, w = 1: image only), best w marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key in [k for k in sweep if k.startswith("R@")]:
        ax.plot(sweep["weights"], 100 * np.asarray(sweep[key]), marker="o", label=key)
    ax.axvline(sweep["best_weight"], color="tab:red", linestyle="--", label=f"best w = {sweep['best_weight']:.2f}")
    ax.set(
        xlabel="w in sim = w·cos(q, image) + (1 − w)·cos(q, caption)",
        ylabel="text → item recall (%)",
        ylim=(0, 100),
        title=title,
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def fusion_rules(
    curves: dict[str, Sequence[float]], missing: dict[str, Sequence[float]], path: Path, title: str
) -> Path:
    """Text->item R@k per fusion rule, a colour each: solid with every caption, dashed with some removed."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for (rule, curve), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        for values, style, note in ((curve, "-", ""), (missing[rule], "--", ", captions removed")):
            ks = np.arange(1, len(values) + 1)
            marks = "/".join(f"{100 * values[k - 1]:.1f}" for k in (1, 5, 10) if k <= len(values))
            ax.plot(
                ks, 100 * np.asarray(values), color=colour, linestyle=style, label=f"{rule}{note} (R@1/5/10 {marks})"
            )
    ax.set(xscale="log", xlabel="k", ylabel="text → item recall@k (%)", ylim=(0, 100), title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def fusion_thresholds(reports: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Precision, recall and F1 of R(q, D) against θ under each fusion rule, a panel each."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for ax, (rule, t) in zip(axes.ravel(), reports.items(), strict=False):
        _sweep_axes(ax, t["curve"], _marks(t), f"{rule}: best F1 {t['best_f1']:.3f}")
    fig.suptitle(title)
    return _save(fig, path)


def confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    """Rows: true label, columns: predicted; each row normalised to 1 so small classes stay visible."""
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rows[i, j] > 0.5 else "black",
                )
    ax.set(xlabel="predicted label", ylabel="true label", title=title)
    fig.colorbar(image, ax=ax, label="fraction of the true label's items")
    return _save(fig, path)


def report_plots(report: dict[str, Any], out: Path, name: str = "") -> list[Path]:
    """Every figure the report has data for, written into `out`; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}: " if name else ""
    files = []
    if "curves" in report:
        files.append(recall_at_k(report["curves"], out / "recall_at_k.png", f"{prefix}recall@k"))
    if "threshold" in report:
        t = report["threshold"]
        direction = next(k for k in report if k.startswith("text_to_")).replace("_to_", " → ")  # the queries' direction
        files.append(
            score_histograms(
                t["histogram"], out / "score_histograms.png", f"{prefix}{direction} scores", t["best_f1_theta"]
            )
        )
        files.append(
            threshold_sweep(
                t["curve"],
                out / "threshold_sweep.png",
                f"{prefix}R(q, D) against θ (best F1 {t['best_f1']:.3f})",
                _marks(t),
            )
        )
    if "fusion" in report:
        f, m = report["fusion"], report["fusion"]["missing_captions"]
        files.append(fusion(f, out / "fusion_weight.png", f"{prefix}recall against fusion weight"))
        if "curves" in f:
            removed = f"{m['n_missing']} of {f['n_items']} captions removed"
            title = f"{prefix}recall by fusion rule (dashed: {removed})"
            files.append(fusion_rules(f["curves"], m["curves"], out / "fusion_rules.png", title))
        for name, figures, note in (("", f, ""), ("_missing", m, f", {m['n_missing']} captions removed")):
            if "threshold" in figures:
                path = out / f"fusion_thresholds{name}.png"
                w = figures["rules"]["weighted"]["weight"]
                named = {
                    f"weighted (w = {w:.1f})" if r == "weighted" else r: t for r, t in figures["threshold"].items()
                }
                files.append(fusion_thresholds(named, path, f"{prefix}R(q, D) against θ by rule{note}"))
    return files
