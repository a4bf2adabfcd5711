"""The results page and the README's results table, from the stages' outputs (the last DVC stage).

Every notebook's ``metrics.json`` carries a ``headline`` list written by
``pfcrepro.report.headline``: the claim, the paper's figure, the figure measured here and a verdict
(one of ``pfcrepro.report.VERDICTS``; an unknown verdict is an error). This script collects them in
notebook order and writes ``results/RESULTS.md``: the table, then one section per notebook with a
link to its executed copy (plots inline) and every figure it saved, embedded; and it replaces the
block between the ``results-table`` markers of ``README.md``. Nothing in either is typed by hand.

    python -m pfcrepro.results_page
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pfcrepro.report import VERDICTS

ROOT = Path.cwd()
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
BENCH_START, BENCH_END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"
CKPT_START, CKPT_END = "<!-- checkpoint-memory:start -->", "<!-- checkpoint-memory:end -->"


def collect(results_dir: Path) -> list[dict]:
    rows = []
    for metrics_path in sorted(results_dir.glob("[0-9][0-9]_*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        for item in metrics.get("headline", []):
            missing = {"claim", "paper", "measured", "verdict"} - set(item)
            if missing:
                raise ValueError(f"{metrics_path}: headline entry {item!r} lacks {sorted(missing)}")
            if item["verdict"] not in VERDICTS:
                raise ValueError(
                    f"{metrics_path}: verdict {item['verdict']!r} of {item['claim']!r} is not one of {VERDICTS}"
                )
            rows.append({**item, "source": metrics_path.parent.name, "profile": metrics.get("profile", "?")})
    return rows


def render(rows: list[dict]) -> str:
    if not rows:
        return "_No results yet: run `make reproduce`._"
    lines = [
        "| notebook | claim | paper | measured here | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"`{r['source']}` ({r['profile']})",
            r["claim"],
            r["paper"],
            r["measured"],
            f"**{r['verdict']}**",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if any(r["verdict"] == "extrapolated" for r in rows):
        lines.append("")
        lines.append(
            "**extrapolated**: the claim is about a scale not run here; a figure extrapolated from the "
            "measured ones agrees with it (weaker than reproduced)."
        )
    return "\n".join(lines)


def render_figures(results_dir: Path, page_dir: Path) -> str:
    """One section per notebook output folder: a link to its executed notebook and its figures,
    embedded with paths relative to ``page_dir`` (where the page is written), so a clone shows them."""
    sections = []
    for folder in sorted(p for p in results_dir.glob("[0-9][0-9]_*") if p.is_dir()):
        figures = sorted([*folder.glob("figures/*.png"), *folder.glob("figures/*.svg")])
        executed = folder / f"{folder.name}.ipynb"
        if not figures and not executed.is_file():
            continue
        lines = [f"## {folder.name}", ""]
        if executed.is_file():
            lines += [f"Executed notebook (plots inline): [{executed.name}]({_rel(executed, page_dir)})", ""]
        for fig in figures:
            lines += [f"![{folder.name}: {fig.stem}]({_rel(fig, page_dir)})", ""]
        sections.append("\n".join(lines))
    return "\n".join(sections)


def _rel(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def render_benchmark(bench: dict | None) -> str:
    """The head benchmark (benchmarks/head.py JSON) as a markdown table plus its target checks."""
    if not bench:
        return "_No benchmark yet: run `make reproduce`._"
    lines = [
        "| method | classes C | r | k | step (ms) | peak memory (MiB) | peak / (C·D·4 B) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in bench["records"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['num_classes']:,} | {r['sample_rate']} | – | error | – | – |")
            continue
        cd4 = r["num_classes"] * r["embedding_size"] * 4
        lines.append(
            f"| {r['method']} | {r['num_classes']:,} | {r['sample_rate']:g} | {r['k']:,} | {r['step_ms']:.0f} "
            f"| {r['peak_bytes'] / 2**20:,.0f} | {r['peak_bytes'] / cd4:.2f} |"
        )
    first = next((r for r in bench["records"] if "error" not in r), {})
    lines.append("")
    lines.append(
        f"D = {first.get('embedding_size')}, B = {first.get('batch_size')}, SGD with momentum, "
        f"{first.get('device')}, {first.get('threads', '?')} threads, torch {bench.get('torch')}; "
        "step = forward + backward + optimizer step (median of repeats)."
    )
    for t in bench.get("targets", []):
        text = (
            f"- Sparse head at C = {t['num_classes']:,}, k = {t['k']:,}: peak {t['peak_bytes'] / 2**20:,.0f} MiB "
            f"vs budget 2.2·C·D·4 = {t['peak_budget_bytes'] / 2**20:,.0f} MiB → "
            f"{'met' if t['memory_ok'] else 'NOT met'}"
        )
        if "time_ratio" in t:
            text += (
                f"; step time vs C = {t['reference_classes']:,} at the same k: ×{t['time_ratio']:.2f} "
                f"(target ≤ ×1.2) → {'met' if t['time_ok'] else 'NOT met'}"
            )
        lines.append(text)
    if bench.get("default_targets"):
        from pfcrepro.headbench import describe_default_targets

        lines.extend(describe_default_targets(bench["default_targets"]))
    return "\n".join(lines)


def render_checkpoint_memory(data: dict | None) -> str:
    """benchmarks/checkpoint_memory.py's JSON as a markdown table: one row per layout, C and ranks
    (the largest extra over the ranks)."""
    if not data:
        return "_Not measured yet: run `python benchmarks/checkpoint_memory.py`._"
    mib, gib = 2**20, 2**30
    lines = [
        "| layout | C | ranks | state per rank | extra at save | extra at load | save / load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in data["records"]:
        ranks = rec["ranks"]
        lines.append(
            f"| {rec['layout']} | {rec['num_classes']:,} | {rec['world']} "
            f"| {max(r['shard_state_bytes'] for r in ranks) / gib:.1f} GiB "
            f"| +{max(r['save_extra_anon'] for r in ranks) / mib:,.1f} MiB "
            f"| +{max(r['load_extra_anon'] for r in ranks) / mib:,.1f} MiB "
            f"| {max(r['save_s'] for r in ranks):.1f} s / {max(r['load_s'] for r in ranks):.1f} s |"
        )
    first = data["records"][0] if data["records"] else {}
    lines.append("")
    lines.append(
        f"D = {first.get('dim')}, the default SGD state (centers and momentum), torch "
        f"{data.get('meta', {}).get('torch')}, {data.get('meta', {}).get('cpus')} CPUs; the worst rank of each row."
    )
    return "\n".join(lines)


def splice(readme: str, table: str, start: str = START, end: str = END) -> str:
    if start not in readme or end not in readme:
        raise ValueError(f"README lacks the markers {start} ... {end}")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--out", default=str(ROOT / "results" / "RESULTS.md"))
    parser.add_argument("--benchmark", default=str(ROOT / "results/benchmarks/head.json"))
    parser.add_argument(
        "--checkpoint-memory", default=str(ROOT / "results/benchmarks/checkpoint_memory.json")
    )
    args = parser.parse_args(argv)
    table = render(collect(Path(args.results)))
    bench_path = Path(args.benchmark)
    bench = render_benchmark(json.loads(bench_path.read_text()) if bench_path.is_file() else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(
        "# Results\n\nGenerated by `python -m pfcrepro.results_page` (the last DVC stage) from "
        "results/*/metrics.json and the figures the notebooks saved.\n\n"
        + table
        + "\n\n"
        + render_figures(Path(args.results), out.parent)
        + "\n"
    )
    tmp.replace(out)
    readme = Path(args.readme)
    ckpt_path = Path(args.checkpoint_memory)
    ckpt = render_checkpoint_memory(json.loads(ckpt_path.read_text()) if ckpt_path.is_file() else None)
    new = splice(splice(readme.read_text(), table), bench, BENCH_START, BENCH_END)
    new = splice(new, ckpt, CKPT_START, CKPT_END) if CKPT_START in new else new
    if new != readme.read_text():
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
