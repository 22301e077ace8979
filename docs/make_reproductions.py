"""Generate docs/reproductions.md from the JSON output of one full `stabiliscope probe probes/` run.

Usage, from the repository root:

    stabiliscope probe probes/ --json > probes.json
    python docs/make_reproductions.py probes.json --out docs/reproductions.md

The page takes every number from the JSON file, so it matches what that run
printed. The setting of each probe and the published statement (the comment
block at the top of each probe file) are read from the probe files
themselves. The notes on claims that do not reproduce, and on what was tried,
are kept in NOTES below, keyed by file stem and claim id. A note quotes no
number of a particular run, because the page is regenerated from new runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from stabiliscope.experiments.probes import Experiment, Probe, load_probe  # noqa: E402

COMMAND = "stabiliscope probe probes/"

NOTES: dict[tuple[str, str], str] = {
    ("xiong2020_theorem1", "post-flat"): (
        "The slope is positive in every seed at this scale; the interval around 0 is the "
        "theorem's prediction and was not widened. With the embeddings at their Xavier "
        "scale instead of `sqrt_d` the slope is about the same."
    ),
    ("xiong2020_theorem1", "post-profile-rises"): (
        "Not reproduced: at initialization Post-LN's per-layer profile is close to flat in "
        "this byte-level decoder with rotary positions, and its rank correlation with the "
        "layer index changes sign between seeds."
    ),
    ("xiong2020_theorem1", "pre-profile-flat"): (
        "Not reproduced: Pre-LN's FFN gradient at initialization is largest in the first "
        "blocks and falls toward the output, the pattern Shleifer et al. 2021 report for "
        "Pre-LN (larger gradients at the bottom layers), rather than the flat profile of "
        "Figure 3. Tried in both settings."
    ),
    ("xiong2020_theorem1", "hybridnorm-setting-pre-inverse-sqrt"): (
        "Not reproduced in the HybridNorm paper's setting: with megatron init the "
        "embeddings are small next to the sublayer outputs, the theorem's assumption of "
        "token vectors with squared norm about d does not hold, and the last-block "
        "gradient shrinks more slowly than 1/sqrt(L)."
    ),
    ("xiong2020_theorem1", "hybridnorm-setting-post-profile-rises"): (
        "Not reproduced: Post-Norm's profile is flat at initialization in this setting too."
    ),
    ("xiong2020_theorem1", "hybridnorm-setting-pre-profile-flat"): (
        "Not reproduced: as in Xiong et al.'s setting, Pre-Norm's profile falls from the "
        "first block to the last."
    ),
    ("hybridnorm2025_balance", "hybrid-vs-post"): (
        "Not reproduced at initialization: HybridNorm's and Post-Norm's FFN output-weight "
        "gradients are both nearly flat across layers, and their max/min ratios are about "
        "equal; the difference the paper describes is against Pre-Norm."
    ),
    ("wortsman2023_qk_norm", "qk-norm-bounded"): (
        "Not reproduced with the factor of 3: with QK-Norm the max attention logit still "
        "grows several times during 60 steps at lr 0.3, though orders of magnitude less "
        "than without it. QK-Norm's learned gains can scale the logits, so bounded is not "
        "constant; the threshold is our reading and was not widened."
    ),
    ("li2024_mix_ln", "post-early-layers-shrink"): (
        "Tried at depth 12 and 24, megatron and N(0, 0.02) init, lr 1e-3 and 3e-3: Post-LN's "
        "first-block gradient is smaller than its last-block gradient at depth 24 in most "
        "seeds, but not at depth 12."
    ),
    ("li2024_mix_ln", "mix-more-uniform-than-post"): (
        "Mix-LN is much more uniform than Pre-LN, but only about as uniform as Post-LN at "
        "this depth; at depth 12 it was less uniform than Post-LN in some seeds."
    ),
    ("wang2022_deepnet_model_update", "deepnorm-update-bounded"): (
        "Not reproduced: DeepNorm's early model update is an order of magnitude smaller than "
        "Post-LN's, but it still grows with depth, at about half Post-LN's log-log slope. "
        "Tried with 5 and 30 steps and lr 1e-4 and 1e-3; at lr 1e-3 both updates saturate "
        "after a few steps, because Post-LN's and DeepNorm's outputs are normalized and can "
        "move by about their own RMS at most."
    ),
}
"""Notes on claims that do not reproduce (what was tried) or that need a caveat."""

FINDINGS: dict[str, str] = {}
"""A summary of what a probe found, for probes that go beyond a published claim."""

BEYOND_PAPER = ("beyond_hybridnorm_deep",)
"""Probe stems that extend a paper rather than reproduce it: a failed claim there is a finding."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="JSON output of `stabiliscope probe probes/ --json` (full grid)")
    parser.add_argument("--out", type=Path, default=None, help="page to write; standard output when omitted")
    args = parser.parse_args(argv)

    results = json.loads(args.results.read_text())
    reduced = [item["probe"] for item in results if item["reduced"]]
    if reduced:
        parser.error(f"the page needs a full-grid run, but {reduced[0]} was run with --reduced")

    page = render_page(results)
    if args.out is None:
        sys.stdout.write(page)
    else:
        args.out.write_text(page)
    return 0


def render_page(results: list[dict[str, Any]]) -> str:
    """Return the Markdown page for the results of one `stabiliscope probe --json` run."""
    lines = [
        "# Reproductions of published gradient analyses",
        "",
        "Each section is one file of `probes/`: the published statement in our own words, the",
        "setting we ran it in, and every claim with the value measured here, its expected",
        "interval and the verdict. A claim that fails is reported as not reproduced, with what",
        "was tried; no interval was widened to make a claim pass.",
        "",
        "The numbers come from one full-grid run of",
        "",
        "```bash",
        f"{COMMAND} --json > probes.json",
        "python docs/make_reproductions.py probes.json --out docs/reproductions.md",
        "```",
        "",
        "on a 2-core CPU shared with other work, so the wall times are upper bounds; the CPU",
        "time (all threads of the process) is the better guide to the cost on a quiet machine.",
        "\"Measured\" is the mean over seeds with the half-width of its 95% confidence interval",
        "(Student's t); a single seed has no interval. Runs on another machine or torch version",
        "can differ in the last digits.",
        "",
        "| file | claims passed | wall time | CPU time |",
        "| --- | --- | --- | --- |",
    ]
    for item in results:
        passed = sum(1 for claim in item["claims"] if claim["verdict"] == "PASS")
        lines.append(
            f"| [{Path(item['probe']).stem}](#{_anchor(Path(item['probe']).stem)}) "
            f"| {passed} of {len(item['claims'])} | {_format_seconds(item['wall_time_s'])} "
            f"| {_format_seconds(item.get('cpu_time_s'))} |"
        )
    total = sum(len(item["claims"]) for item in results)
    total_passed = sum(1 for item in results for claim in item["claims"] if claim["verdict"] == "PASS")
    total_wall = sum(item["wall_time_s"] or 0.0 for item in results)
    total_cpu = sum(item.get("cpu_time_s") or 0.0 for item in results)
    lines.append(
        f"| all | {total_passed} of {total} | {_format_seconds(total_wall)} | {_format_seconds(total_cpu)} |"
    )
    lines.append("")

    for item in results:
        lines.extend(render_probe(item))
    return "\n".join(lines).rstrip() + "\n"


def render_probe(item: dict[str, Any]) -> list[str]:
    """Return the section of one probe file."""
    path = REPOSITORY / item["probe"] if not Path(item["probe"]).is_absolute() else Path(item["probe"])
    probe = load_probe(path)
    source = item["source"]
    stem = path.stem
    lines = [
        f"## {stem}",
        "",
        f"**Source.** {source['authors']} {source['year']}, \"{source['title']}\", {source['where']}.",
        "",
        "**Question, and how we read it.**" if stem in BEYOND_PAPER else "**Published statement, in our words, and how we read it.**",
        "",
        *_header_paragraphs(path),
        "**Setting.** " + describe_setting(probe),
        "",
        f"**Command.** `stabiliscope probe {item['probe']}` ({item['runs']} runs{_failed_runs(item)}; "
        f"{_format_seconds(item['wall_time_s'])} wall, {_format_seconds(item.get('cpu_time_s'))} CPU).",
        "",
        "| claim | statement | strategy | measured | expected | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    failed_verdict = "FAIL: does not hold here" if stem in BEYOND_PAPER else "FAIL: not reproduced"
    for claim, parsed in zip(item["claims"], probe.claims):
        verdict = claim["verdict"] if claim["verdict"] == "PASS" else failed_verdict
        lines.append(
            f"| `{claim['id']}` | {_cell(claim['statement'])} | {_cell(parsed.describe_subject())} "
            f"| {_format_measured(claim)} | {_format_expected(claim['expect'])} | {verdict} |"
        )
        note = NOTES.get((stem, claim["id"]))
        if note is not None:
            notes.append(f"- `{claim['id']}`: {note}")
        elif claim["verdict"] != "PASS" and stem not in BEYOND_PAPER:
            notes.append(f"- `{claim['id']}`: not reproduced at this scale; no other setting was tried.")
    if notes:
        lines.extend(["", "Notes:", "", *notes])
    if stem in FINDINGS:
        lines.extend(["", f"**What it finds.** {FINDINGS[stem]}"])
    lines.append("")
    return lines


def describe_setting(probe: Probe) -> str:
    """Return one paragraph with the experiment of `probe` and the changes each variant makes."""
    experiment = probe.experiment
    parts = [f"kind `{experiment.kind}`", f"strategies {', '.join(experiment.strategies)}"]
    parts.append(f"depths {', '.join(str(depth) for depth in experiment.depths)}")
    parts.append(f"width {experiment.width}, {experiment.heads} heads")
    parts.extend(_model_settings(experiment))
    if experiment.kind == "invariance":
        parts.append(f"one head scaled by {experiment.weight_scale:g} at a time, at initialization")
    elif experiment.steps == 0:
        parts.append("at initialization (gradients of the first batch)")
    else:
        parts.append(f"{experiment.steps} AdamW steps at lr {experiment.lr:g} with {experiment.warmup} warmup steps")
        if experiment.grad_clip is not None:
            parts.append(f"gradient clipping at {experiment.grad_clip:g}")
    parts.append(f"batch {experiment.batch_size} x {experiment.seq_len} bytes")
    parts.append(f"seeds {', '.join(str(seed) for seed in experiment.seeds)}")
    data = "the built-in corpus (CPython's pydoc topics)" if experiment.data is None else f"`{experiment.data}`"
    text = "; ".join(parts) + f"; data: {data}."
    for name, variant in probe.variants.items():
        changes = _variant_changes(experiment, variant)
        text += f" Variant `{name}`: {changes}."
    return text


def _model_settings(experiment: Experiment) -> list[str]:
    return [
        f"init `{experiment.init}`",
        f"FFN `{experiment.ffn}`",
        f"norm `{experiment.norm}`",
        f"embeddings `{experiment.embed_scale}`",
    ]


def _variant_changes(base: Experiment, variant: Experiment) -> str:
    changes = []
    for name in ("strategies", "init", "ffn", "norm", "embed_scale", "lr", "warmup", "grad_clip", "weight_scale"):
        value = getattr(variant, name)
        if value != getattr(base, name):
            changes.append(f"{name} {_format_setting(value)}")
    return ", ".join(changes) if changes else "same as the experiment"


def _format_setting(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _header_paragraphs(path: Path) -> list[str]:
    # The comment block at the top of a probe file states the claim and how
    # it is read. Its paragraphs are returned as Markdown lines, a blank line
    # after each, and its bullet lines stay bullets.
    lines: list[str] = []
    paragraph: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("- ") and paragraph:
            lines.append(" ".join(paragraph))
            paragraph = []
        if text:
            paragraph.append(text)
            continue
        if paragraph:
            lines.extend([" ".join(paragraph), ""])
            paragraph = []
    if paragraph:
        lines.extend([" ".join(paragraph), ""])
    return lines


def _format_number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}"


def _format_measured(claim: dict[str, Any]) -> str:
    if claim["error"] is not None:
        return f"not measured: {_cell(claim['error'])}"
    if claim["ci"] is None:
        return f"{_format_number(claim['mean'])} (n={claim['n']})"
    low, high = claim["ci"]
    if low is None or high is None:
        return f"{_format_number(claim['mean'])} (n={claim['n']})"
    return f"{_format_number(claim['mean'])} ± {_format_number((high - low) / 2)} (n={claim['n']})"


def _format_expected(expect: list[float | None]) -> str:
    low, high = expect
    open_end = 1e20
    if high is not None and high >= open_end:
        return f"≥ {_format_number(low)}"
    if low is not None and low <= -open_end:
        return f"≤ {_format_number(high)}"
    return f"[{_format_number(low)}, {_format_number(high)}]"


def _format_seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.0f} s"


def _failed_runs(item: dict[str, Any]) -> str:
    failed = item["failed_runs"]
    return f", failed: {', '.join(failed)}" if failed else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor(heading: str) -> str:
    return heading.lower().replace(" ", "-")


if __name__ == "__main__":
    raise SystemExit(main())
