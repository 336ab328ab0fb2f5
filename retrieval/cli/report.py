"""Eval reports as text: the terminal table and the README (markdown) tables, from the report dict."""

from __future__ import annotations

from typing import Any


def recalls(d: dict[str, float]) -> str:
    """R@k figures as one short "R@1/R@5/R@10" string, in percent, for a training epoch's line."""
    return "/".join(f"{100 * v:.1f}" for k, v in d.items() if k.startswith("R@"))


def _directions(report: dict[str, Any]) -> list[str]:
    return [k for k in report if k.startswith(("text_to_", "image_to_"))]


def _table_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(label, figures) per row: each direction; for an index, what it returned and what exact search gives."""
    names = _directions(report)
    if "exact" not in report:
        return [(n.replace("_to_", "->"), report[n]) for n in names]
    return [
        row
        for n in names
        for row in (
            (f"{n.replace('_to_', '->')} ({report['index_type']})", report[n]),
            (f"{n.replace('_to_', '->')} (exact)", report["exact"][n]),
        )
    ]


def _index_recall_line(report: dict[str, Any]) -> str:
    """How much of the exact top k the index found, with its knobs and the depth the ranks were read to."""
    knobs = "".join(f", {k} {v}" for k, v in report["search_params"].items())
    found = " / ".join(f"{100 * v:.1f}%" for v in report["index_recall"].values())
    ks = " / ".join(k.removeprefix("R@") for k in report["index_recall"])
    return (
        f"  {report['index_type']} index{knobs}: found {found} of the exact top {ks}; "
        f"ranks read to depth {report['depth']} (a relevant item beyond it counts as not found)"
    )


def format_report(report: dict[str, Any]) -> str:
    """The terminal table: recall and ranks per direction, then counts, the θ figures and the fusion sweep."""
    names = _directions(report)
    rows = _table_rows(report)
    keys = [k for k in report[names[0]] if k.startswith("R@")] + ["median_rank", "mean_rank", "mAP"]
    cell = lambda d, k: f"{100 * d[k]:.1f}%" if k.startswith("R@") else f"{d[k]:.3f}" if k == "mAP" else f"{d[k]:.1f}"
    width = max(14, *(len(label) + 1 for label, _ in rows))
    lines = [f"  {'':<{width}}" + "".join(f"{k:>12}" for k in keys)]
    lines += [f"  {label:<{width}}" + "".join(f"{cell(d, k):>12}" for k in keys) for label, d in rows]
    if "index_recall" in report:
        lines.append(_index_recall_line(report))
    if "n_images" in report:
        lines.append(
            f"  ({report['n_images']} images, {report['n_texts']} captions"
            + (f", {report['skipped_images']} unreadable images skipped)" if report.get("skipped_images") else ")")
        )
    else:
        lines.append(
            f"  ({report['n_items']} items, {report['n_texts']} text queries"
            + (
                f", {report['unmatched_queries']} without a relevant item in the index)"
                if report["unmatched_queries"]
                else ")"
            )
        )
    if "threshold" in report:
        t = report["threshold"]
        lines.append(
            f"  R(q, D) text->{names[0].split('_to_')[1]}{' (exact scores)' if 'exact' in report else ''}: "
            f"best F1 {t['best_f1']:.3f} at theta {t['best_f1_theta']:.3f} "
            f"(precision {t['precision_at_best_f1']:.3f}, recall {t['recall_at_best_f1']:.3f})"
        )
        lines.append(
            f"  held out: flat theta F1 {t['flat_heldout_f1']:.3f}; "
            f"adaptive ({t['adaptive_rule']}) F1 {t['adaptive_f1']:.3f}"
        )
        if t.get("target_precision") is not None:
            got = t["target_precision_theta"]
            lines.append(
                f"  precision >= {t['target_precision']}: "
                + (
                    f"theta {got:.3f} (recall {t['recall_at_target_precision']:.3f})"
                    if got is not None
                    else "no theta reaches it"
                )
            )
    if "fusion" in report:
        lines += _fusion_lines(report["fusion"])
    return "\n".join(lines)


def _rule_label(rule: str, f: dict[str, Any]) -> str:
    """The rule's name; the weighted rule's with its best w, with all captions and with some removed."""
    if rule != "weighted":
        return rule
    w, removed = f["best_weight"], f["missing_captions"]["best_weight"]
    return f"weighted (w = {w:.1f})" if w == removed else f"weighted (w = {w:.1f} / {removed:.1f})"


def _best_f1(f: dict[str, Any], rule: str) -> str:
    """A rule's F1-best θ cutoff, or "-" without a θ report."""
    t = f.get("threshold", {}).get(rule)
    return f"{t['best_f1']:.3f} at {t['best_f1_theta']:.3f}" if t else "-"


def _fusion_lines(f: dict[str, Any]) -> list[str]:
    """Text->item figures per fusion rule, with all captions and with some removed, then the best w."""
    m = f["missing_captions"]
    ks = [k for k in f["best"] if k.startswith("R@")]
    cells = lambda d: "".join(f"{100 * d[k]:>7.1f}" for k in ks) + f"{d['mAP']:>7.3f}"
    head = "".join(f"{k:>7}" for k in [*ks, "mAP"])
    lines = [
        f"  text->item by fusion rule ({f['n_items']} items, each with its first caption; {f['n_queries']} queries; "
        f"then {m['n_missing']} captions removed, seed {m['seed']}):",
        f"  {'rule (R@k in %)':<25}{head}  {'best F1 at θ':>16}   |{head}  {'best F1 at θ':>16}   (captions removed)",
    ]
    for rule, d in f["rules"].items():
        lines.append(
            f"  {_rule_label(rule, f):<25}{cells(d)}  {_best_f1(f, rule):>16}   |"
            f"{cells(m['rules'][rule])}  {_best_f1(m, rule):>16}"
        )
    lines.append(
        f"  fusion: best w = {f['best_weight']:.1f} ("
        + ", ".join(f"{k} {100 * f['best'][k]:.1f}%" for k in ks)
        + f"); with captions removed, best w = {m['best_weight']:.1f}"
    )
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    """GitHub tables: recall and ranks per direction, then the θ figures, then the fusion sweep."""
    names = _directions(report)
    keys = [k for k in report[names[0]] if k.startswith("R@")]
    lines = [
        "| direction | " + " | ".join(keys) + " | median rank | mean rank | mAP | queries |",
        "|---|" + "---:|" * (len(keys) + 4),
    ]
    for label, d in _table_rows(report):
        lines.append(
            f"| {label.replace('->', ' → ')} | "
            + " | ".join(f"{100 * d[k]:.1f}%" for k in keys)
            + f" | {d['median_rank']:.0f} | {d['mean_rank']:.1f} | {d['mAP']:.3f} | {d['n_queries']} |"
        )
    if "index_recall" in report:
        lines += ["", _index_recall_line(report).strip()]
    if "threshold" in report:
        t = report["threshold"]
        lines += [
            "",
            "| R(q, D) cutoff | θ | F1 |",
            "|---|---:|---:|",
            f"| flat θ, F1-best on all queries | {t['best_f1_theta']:.3f} | {t['best_f1']:.3f} |",
            f"| flat θ, chosen on half, F1 on the other half "
            f"| {t['rules']['flat']['theta']:.3f} | {t['flat_heldout_f1']:.3f} |",
        ]
        for rule, r in t["rules"].items():
            if rule != "flat":
                lines.append(
                    f"| {rule}, chosen on half, F1 on the other half | {r['theta']:.3f} | {r['heldout_f1']:.3f} |"
                )
    if "fusion" in report:
        lines += _fusion_markdown(report["fusion"])
    return "\n".join(lines)


def _fusion_markdown(f: dict[str, Any]) -> list[str]:
    """The rules table (all captions, then with some removed), then the weighted rule's sweep of w."""
    m = f["missing_captions"]
    ks = [k for k in f if k.startswith("R@")]
    removed = f"{100 * m['fraction']:.0f}% of captions removed"
    lines = [
        "",
        "| fusion rule | "
        + " | ".join(ks)
        + " | mAP | best F1 at θ | "
        + " | ".join(f"{k}, {removed}" if i == 0 else k for i, k in enumerate(ks))
        + " | mAP | best F1 at θ |",
        "|---|" + "---:|" * (2 * len(ks) + 4),
    ]
    for rule, d in f["rules"].items():
        r = m["rules"][rule]
        lines.append(
            f"| {_rule_label(rule, f)} | "
            + " | ".join(f"{100 * d[k]:.1f}%" for k in ks)
            + f" | {d['mAP']:.3f} | {_best_f1(f, rule)} | "
            + " | ".join(f"{100 * r[k]:.1f}%" for k in ks)
            + f" | {r['mAP']:.3f} | {_best_f1(m, rule)} |"
        )
    lines += ["", "| w | " + " | ".join(ks) + f" | {ks[0]}, {removed} |", "|---:|" + "---:|" * (len(ks) + 1)]
    for i, w in enumerate(f["weights"]):
        lines.append(
            f"| {w:.1f}{' (best)' if w == f['best_weight'] else ''} | "
            + " | ".join(f"{100 * f[k][i]:.1f}%" for k in ks)
            + f" | {100 * m[ks[0]][i]:.1f}% |"
        )
    lines.append(
        f"\n{f['n_queries']} queries over {f['n_items']} items (each image with its first caption); "
        f"{m['n_missing']} captions removed at random (seed {m['seed']}), those items scored on their image alone; "
        "the weighted rule at the w with the best sum of R@k on these queries (w = a / b: a with all captions, "
        "b with some removed)."
    )
    return lines
