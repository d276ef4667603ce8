"""The Markdown report and the accuracy-vs-size plot (drawn with PIL) of ``benchmarks/cifar10.py``.

    python benchmarks/cifar10_report.py [benchmarks/results/cifar10.json]

re-renders cifar10.md and cifar10.png from the JSON (also a partial one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common

COLOURS = {"versatile": (31, 119, 180), "pruning": (214, 39, 40), "baseline": (90, 90, 90)}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def plot(record: dict[str, Any], path: Path) -> None:
    """Top-1 against whole-model stored-size ratio: versatile (circles), pruning (squares), baseline."""
    rows = [row for row in record["rows"] if row.get("top1") is not None]
    width, height, left, right, top, bottom = 760, 480, 70, 230, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    baseline = record.get("baseline", {}).get("top1")
    values = [row["top1"] for row in rows] + ([baseline] if baseline is not None else [])
    if not values:
        image.save(path)
        return
    x_max = max([row["stored_ratio"] for row in rows] + [2.0]) + 0.5
    y_low, y_high = min(values) - 2.0, max(values) + 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_xy(x: float, y: float) -> tuple[float, float]:
        return left + (x - 1.0) / (x_max - 1.0) * plot_w, top + (y_high - y) / (y_high - y_low) * plot_h

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    step = next(s for s in (0.5, 1.0, 2.0, 5.0, 10.0, 20.0) if (y_high - y_low) / s <= 12)
    tick = step * int(y_low / step + 1)
    while tick < y_high:
        _, y = to_xy(1.0, tick)
        draw.line([left, y, left + plot_w, y], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick:g}", fill="black", font=small, anchor="rm")
        tick += step
    tick_x = 1.0
    while tick_x <= x_max:
        x, _ = to_xy(tick_x, y_low)
        draw.line([x, top, x, top + plot_h], fill=(225, 225, 225))
        draw.text((x, top + plot_h + 6), f"{tick_x:g}x", fill="black", font=small, anchor="mt")
        tick_x += 0.5
    if baseline is not None:
        _, y = to_xy(1.0, baseline)
        for x in range(left, left + plot_w, 12):
            draw.line([x, y, min(x + 6, left + plot_w), y], fill=COLOURS["baseline"], width=2)
        label = f"dense baseline {baseline:.2f}"
        draw.text((left + 6, y + 4), label, fill=COLOURS["baseline"], font=small, anchor="lt")
    for row in rows:
        x, y = to_xy(row["stored_ratio"], row["top1"])
        colour = COLOURS[row["method"]]
        box = [x - 5, y - 5, x + 5, y + 5]
        (draw.ellipse if row["method"] == "versatile" else draw.rectangle)(box, fill=colour)
    labels = sorted(rows, key=lambda row: -row["top1"])
    for index, row in enumerate(labels):  # legend-like list at the right, one line per point
        x, y = to_xy(row["stored_ratio"], row["top1"])
        ly = top + 20 + index * 18
        colour = COLOURS[row["method"]]
        draw.line([x, y, left + plot_w + 4, ly], fill=(215, 215, 215))
        draw.text((left + plot_w + 8, ly), f"{row['setting']}: {row['top1']:.2f}", fill=colour, font=small, anchor="lm")
    draw.text((left + plot_w / 2, height - 22), "whole-model stored size, dense / stored (higher = smaller)",
              fill="black", font=font, anchor="mm")  # fmt: skip
    draw.text((left, 14), f"CIFAR-10 ResNet-20, top-1 of the exported ONNX ({record.get('mode')} run)",
              fill="black", font=font, anchor="lm")  # fmt: skip
    draw.text((left - 8, top - 4), "top-1 %", fill="black", font=small, anchor="rb")
    image.save(path)


def _find(rows: list[dict], name: str) -> dict | None:
    return next((row for row in rows if row["setting"] == name), None)


def targets(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 7's targets."""
    rows, base = record["rows"], record.get("baseline", {}).get("top1")
    out = []
    for name, ratio_goal, drop_goal in (("learned s=2", 1.8, 0.3), ("learned s=4", 3.4, 1.0)):
        row = _find(rows, name)
        goal = f"{name}: ≥ {ratio_goal}x smaller conv storage, top-1 within {drop_goal} of the dense baseline"
        if row is None or base is None:
            out.append((goal, "not run", "—"))
            continue
        drop = base - row["top1"]
        met = row["converted_conv_ratio"] >= ratio_goal and drop <= drop_goal
        out.append((goal, f"{row['converted_conv_ratio']:.2f}x converted convs ({row['all_conv_ratio']:.2f}x all "
                          f"convs, {row['stored_ratio']:.2f}x whole model); top-1 {row['top1']:.2f} vs {base:.2f} "
                          f"(Δ {-drop:+.2f})", "met" if met else "not met"))  # fmt: skip
    for size in ("2", "3"):
        versatile, pruning = _find(rows, f"target-ratio {size}"), _find(rows, f"torch-pruning @ target-ratio {size}")
        goal = f"at equal stored size ({size}x), versatile beats torch-pruning's top-1 by ≥ 1 point"
        if versatile is None or pruning is None:
            out.append((goal, "not run", "—"))
            continue
        gap = versatile["top1"] - pruning["top1"]
        out.append((goal, f"versatile {versatile['top1']:.2f} ({versatile['stored_ratio']:.2f}x) vs pruning "
                          f"{pruning['top1']:.2f} ({pruning['stored_ratio']:.2f}x): {gap:+.2f} points",
                    "met" if gap >= 1.0 else "not met"))  # fmt: skip
    return out


def _fmt(value: Any, pattern: str = "{:.2f}") -> str:
    return "—" if value is None else pattern.format(value)


def write_report(record: dict[str, Any], md_path: Path, png_path: Path, quoted: list[tuple]) -> None:
    """Write the Markdown report (and the plot beside it) for a complete or partial ``record``."""
    plot(record, png_path)
    base = record.get("baseline", {})
    published = record.get("published_baseline_top1_full_test_set")
    m = record["machine"]
    status = ("complete run" if record.get("complete") else
              "**PARTIAL run: the script had not finished when this was written; rows and latencies may be "
              "missing**")  # fmt: skip
    lines = [
        f"# CIFAR-10: accuracy vs stored size, versatile filters vs torch-pruning ({record['mode']} mode)",
        "",
        f"{status}. Command: `{record['command']}`",
        "",
        f"- Network: {record['network']}"
        + (f"; its published top-1 on the full 10,000-image JPEG test set is {published}%." if published else "."),
        f"- Every row: {record['epochs']} fine-tune epochs on {record['train_images']:,} training images "
        f"(batch {record['batch_size']}, lr {record['lr']}, KD from the original, seed {record['seed']}), "
        f"BN recalibration on {record['calib_images']} images; top-1 measured by `vconvert evaluate` on the "
        f"exported ONNX file in onnxruntime on {record['eval_images']:,} test images (the same subset, seed 0, "
        "for every row and the baseline).",
        f"- Device: {record['device']}. Machine: {m['cpu']}, {m['cpu_count']} cores, {m['platform']}; "
        f"load average {m['load_average_start'][0]:.1f} at the start"
        + (f", {m['load_average_end'][0]:.1f} at the end" if m.get("load_average_end") else "")
        + (
            " (the cores are shared with other jobs: wall times and latencies are noisy)."
            if record["device"].startswith("cpu")
            else f" ({record.get('jobs', 1)} settings ran side by side on the GPU, so the wall times per row include "
            "sharing it; latencies are onnxruntime on this machine's CPU, measured while other jobs ran)."
        ),
        f"- Versions: Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"torch-pruning {m['torch_pruning']}."
        + (f" Wall time: {record['wall_s']:.0f} s." if record.get("wall_s") else ""),
    ]
    if record.get("cpu_s") and record["device"].startswith("cpu"):
        lines.append(
            f"- CPU time of the whole run, all processes: {record['cpu_s']:.0f} s, i.e. about "
            f"{record['cpu_s'] / 2 / 60:.1f} min of wall time on 2 otherwise idle cores"
            + (f" ({record['cpu_s_note']})." if record.get("cpu_s_note") else ".")
        )
    if record["mode"] == "quick":
        lines.append(
            "- This is the `--quick` CPU preset: a training subset and few epochs, so absolute accuracies are "
            "below what the full budget gives. The full mode (50,000 images, 15 epochs, 10,000 test images) is "
            "meant for a GPU; none was available for this run."
        )
    lines += [
        "",
        "## Results",
        "",
        "Stored ratio = whole-model stored bits, dense / compressed (same accounting for both methods; "
        "pruning is matched to be no larger than the versatile `--target-ratio` row). MACs of the exported "
        "graph per image; latency = median onnxruntime CPU latency, all files measured interleaved in one "
        "process at the end.",
        "",
        "| setting | method | stored ratio | conv ratio (converted / all) | stored KiB | ONNX KB (format) | MACs (M) "
        "| latency b1 / b32 (ms) | top-1 | Δ vs dense | FT val top-1 per epoch | times (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if base:
        lines.append(
            f"| dense baseline | — | 1.00x | 1.00x | {base['stored_kib']:.1f} | "
            f"{base['onnx_bytes'] / 1e3:.0f} (dense) | "
            f"{base['macs'] / 1e6:.1f} | {_fmt(base.get('latency_ms'), '{:.3f}')} / "
            f"{_fmt(base.get('latency_ms_b32'), '{:.2f}')} | {base['top1']:.2f} | — | — | — |"
        )
    for r in record["rows"]:
        conv = (f"{r['converted_conv_ratio']:.2f}x / {r['all_conv_ratio']:.2f}x" if "converted_conv_ratio" in r
                else f"— / {r['all_conv_ratio']:.2f}x")  # fmt: skip
        times = ", ".join(f"{k[:-2]} {v:.0f}" for k, v in r["times_s"].items())
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['stored_ratio']:.2f}x | {conv} | {r['stored_kib']:.1f} | "
            f"{r['onnx_bytes'] / 1e3:.0f} ({r['onnx_format']}) | {r['macs'] / 1e6:.1f} | "
            f"{_fmt(r.get('latency_ms'), '{:.3f}')} / {_fmt(r.get('latency_ms_b32'), '{:.2f}')} | {r['top1']:.2f} | "
            f"{r['top1'] - r['baseline_top1']:+.2f} | {r['finetune_val_top1']} | {times} |"
        )
    lines += [
        "",
        f"![accuracy vs stored size]({png_path.name})",
        "",
        "FT val top-1 is vconvert finetune's own per-epoch check on 500 test images (not the reported top-1).",
        "",
        "## Targets (issue 7) and measured values",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {goal} | {measured} | {verdict} |" for goal, measured, verdict in targets(record)],
        "",
        "One seed: differences under ~0.5 point are within run-to-run noise (METHOD.md §6); in the quick "
        "mode the evaluation subset adds about ±1 point of sampling noise at 2,000 images.",
        "",
        *(
            ["## Reading (notes added to the JSON after the run)", "", *[f"- {n}" for n in record["notes"]], ""]
            if record.get("notes")
            else []
        ),
        "## Published and prototype reference rows (QUOTED from ../shared/METHOD.md, not measured here)",
        "",
        "| source (quoted) | model / variant | size | top-1 (or mAP) |",
        "|---|---|---|---|",
        *[f"| {src} | {variant} | {size} | {acc} |" for src, variant, size, acc in quoted],
        "",
        "## What was run",
        "",
        "Pruning rows: `torch_pruning.pruner.MagnitudePruner` with `MagnitudeImportance(p=2)`, one channel "
        "ratio for every layer (bisection to the smallest ratio whose stored size is ≤ the versatile row's), "
        "`fc` outputs kept; fine-tuned by `vconvert.train.finetune.finetune` with the same `FinetuneConfig` as the "
        "CLI rows (teacher: the original network), exported by `vconvert.export.pipeline.export`, evaluated with "
        "`vconvert evaluate`. `$WORK` is a temporary folder (nothing trained is kept).",
        "",
        "| command | wall s |",
        "|---|---|",
        *[f"| `{c['command']}` | {c['seconds']} |" for c in record.get("commands", [])],
    ]
    for row in record["rows"]:
        if row["method"] == "pruning":
            lines.append(f"\n{row['setting']}: {row['pruning']}.")
    common.write_markdown(md_path, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-render a cifar10.py result's .md and .png from its JSON.")
    parser.add_argument("source", type=Path, nargs="?", default=common.RESULTS / "cifar10.json", help="results JSON")
    source = parser.parse_args().source
    from benchmarks.cifar10 import QUOTED

    data = json.loads(source.read_text())
    write_report(data, source.with_suffix(".md"), source.with_suffix(".png"), QUOTED)


if __name__ == "__main__":
    main()
