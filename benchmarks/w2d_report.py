"""The markdown tables of the W2D benchmark: one line per record, then the per-round ratios
of the fmjax lines to the faster peer."""

from __future__ import annotations

from harness import fmt

NOTES = (  # record key -> label in the notes column, in this order
    ("compile_s_est", "compile~"),
    ("nfe_counted", "counted NFE"),
    ("max_abs_diff_x_vs_first", "max|dx|"),
    ("mean_logp", "mean logp"),
    ("max_abs_diff_logp_vs_first", "max|dlogp|"),
    ("gflops", "GFLOP/s"),
    ("fraction_of_matmul", "of matmul"),
    ("loss", "loss"),
    ("nll", "NLL"),
    ("nll_sem", "+-"),
    ("nll_seed_sd", "seed sd"),
    ("mmd2", "MMD^2"),
    ("mmd2_seed_sd", "seed sd"),
    ("nll_nfe", "NLL NFE"),
    ("sample_nfe", "sample NFE"),
    ("steps_per_s", "train steps/s"),
    ("train_s", "train s"),
    ("final_loss", "final loss"),
    ("note", ""),
)


def ratio_text(r):
    return f"{r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"


def notes(r):
    out = []
    if "error" in r:
        out.append(f"ERROR {r['error']}")
    for k, label in NOTES:
        if r.get(k) is not None:
            v = r[k]
            if k == "fraction_of_matmul":
                out.append(f"{100 * v:.1f}% {label}")
            else:
                out.append(f"{label} {fmt(v)}".strip())
    if r.get("ratio_median") is not None:
        out.insert(0, f"vs faster peer {ratio_text(r)}")
    return out


def markdown(records, meta):
    loads = [r["loadavg_1m"] for r in records if "loadavg_1m" in r]
    lines = [
        (
            f"W2D benchmark ({'quick' if meta['quick'] else 'full'}), {meta['date']}, "
            f"{meta['cpu']}, {meta['nproc']} cores, repeats={meta['repeats']}, 1-min load average "
            f"{meta['loadavg_start']:.2f} at start, max {max(loads, default=0.0):.2f} at a row's "
            f"end"
        ),
        "",
        "| row | case | framework | median | min-max | unit | NFE | first call (s) | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        mm = "" if r.get("min") is None else f"{fmt(r['min'])}-{fmt(r['max'])}"
        lines.append(
            f"| {r['row']} | {r['case']} | {r['framework']} | {fmt(r.get('median'))} "
            f"| {mm} | {r.get('unit', '')} | {fmt(r.get('nfe'))} "
            f"| {fmt(r.get('first_call_s'))} | {'; '.join(notes(r))} |"
        )
    ratio_rows = [r for r in records if r.get("ratio_median") is not None]
    if ratio_rows:
        lines += [
            "",
            (
                "Per-round ratios: the faster peer's time over the fmjax line's time in "
                "the same round (> 1: fmjax is faster), median (min-max) over the rounds."
            ),
            "",
            "| row | case | fmjax line | ratio | rounds |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['row']} | {r['case']} | {r['framework']} | {ratio_text(r)} "
            f"| {len(r['ratio_samples'])} |"
            for r in ratio_rows
        ]
    return "\n".join(lines)
