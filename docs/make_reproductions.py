"""Generate docs/reproductions.md from the JSON output of one full `stabiliscope probe probes/` run.

Usage, from the repository root:

    stabiliscope probe probes/ --json > docs/reproductions.json
    python docs/make_reproductions.py docs/reproductions.json --out docs/reproductions.md

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
MACHINE = "a 2-core x86_64 AMD EPYC CPU with 24 GiB, Python 3.11.7 and torch 2.13.0+cpu (2 threads)"
"""The machine of the run behind the committed page; change it with the run."""

NOTES: dict[tuple[str, str], str] = {
    ("xiong2020_theorem1", "pre-inverse-sqrt"): (
        "The `sqrt_d` embeddings matter for Pre-LN: with the embeddings at their Xavier scale, "
        "an earlier run of the same grid measured a steeper slope, about -0.58, still inside "
        "the interval. Post-LN's slope hardly changed."
    ),
    ("xiong2020_theorem1", "post-profile-rises"): (
        "Not reproduced: at initialization Post-LN's per-layer profile is close to flat in this "
        "byte-level decoder with rotary positions, and its rank correlation with the layer "
        "index changes sign between seeds."
    ),
    ("xiong2020_theorem1", "pre-profile-flat"): (
        "Not reproduced: Pre-LN's FFN gradient at initialization is largest in the first blocks "
        "and falls toward the output, rather than the flat profile of Figure 3. The DeepNet "
        "paper's introduction describes this pattern for Pre-LN: larger gradients at the "
        "bottom layers than at the top. The same holds in both settings."
    ),
    ("xiong2020_theorem1", "hybridnorm-setting-pre-inverse-sqrt"): (
        "Not reproduced in the HybridNorm paper's setting. With megatron init the embeddings "
        "are small next to the sublayer outputs, so the theorem's assumption of token vectors "
        "with squared norm about d does not hold. The last-block gradient then shrinks more "
        "slowly than 1/sqrt(L)."
    ),
    ("xiong2020_theorem1", "hybridnorm-setting-post-profile-rises"): (
        "Not reproduced: in this setting Post-Norm's profile at initialization falls toward "
        "the output in every seed (a negative rank correlation), instead of rising."
    ),
    ("xiong2020_theorem1", "hybridnorm-setting-pre-profile-flat"): (
        "Not reproduced: as in Xiong et al.'s setting, Pre-Norm's profile falls from the "
        "first block to the last."
    ),
    ("xiong2020_warmup", "post-needs-warmup"): (
        "Not reproduced with our threshold: Post-LN ends worse without warmup in every seed, "
        "but by about 5%, not the 10% we read as much worse. Also tried, with 2 seeds and "
        "200 steps at depth 12: (1) Xavier init, ReLU and LayerNorm with the embeddings at "
        "their Xavier scale, at lr 1e-3, 3e-3 and 1e-2 with a 40-step warmup. Post-LN's "
        "validation loss stayed at about 3.2 nats with and without warmup, close to the "
        "corpus's byte unigram entropy of 3.26 nats. (2) The HybridNorm paper's setting "
        "(megatron, SwiGLU, RMSNorm). Post-Norm trained as well without warmup at lr 3e-3. At "
        "lr 1e-2 it stayed near the unigram loss with and without warmup, while Pre-Norm ended "
        "much worse without warmup than with it."
    ),
    ("hybridnorm2025_balance", "hybrid-vs-post"): (
        "Not reproduced at initialization: HybridNorm's and Post-Norm's FFN output-weight "
        "gradients are both nearly flat across layers, and their max/min ratios are about "
        "equal. The difference at initialization is against Pre-Norm."
    ),
    ("wortsman2023_qk_norm", "qk-norm-bounded"): (
        "Not reproduced with the factor of 3: with QK-Norm the max attention logit still grows "
        "several times during 60 steps at lr 0.3, though orders of magnitude less than without "
        "it. The norms' learned gains scale the logits, so bounded does not mean constant. The "
        "threshold is our reading and was not widened. This probe trains without the gradient "
        "clipping, weight decay and z-loss of the paper's default recipe."
    ),
    ("li2024_mix_ln", "post-early-layers-shrink"): (
        "Depth matters: in a 2-seed exploration at depth 12 (megatron and N(0, 0.02) init, lr "
        "1e-3 and 3e-3), Post-LN's first-block gradient was smaller than its last-block gradient "
        "in some seeds only."
    ),
    ("li2024_mix_ln", "mix-more-uniform-than-post"): (
        "Not reproduced: Mix-LN's gradients are far more uniform than Pre-LN's, but only about "
        "as uniform as Post-LN's: its max/min ratio is below Post-LN's in two seeds of three "
        "and above it in the third. The depth-12 exploration gave the same picture."
    ),
    ("sun2025_curse_of_depth", "pre-variance-grows"): (
        "Not reproduced: Pre-LN's residual-stream RMS rises with the layer index in every "
        "seed, but after 200 steps its variance grows more slowly than linearly. The exponent "
        "is lower than at initialization, where the variance grows about linearly, as in "
        "Xiong et al.'s Lemma 2. The LNS paper advises against scaled output projections, so "
        "the default megatron init was not used here. In a 2-seed exploration with it, the "
        "RMS exponent after training was above 0.6."
    ),
    ("wang2022_deepnet_model_update", "deepnorm-update-bounded"): (
        "Not reproduced: DeepNorm's early model update is an order of magnitude smaller than "
        "Post-LN's, but it still grows with depth, at a log-log slope close to Post-LN's mean. "
        "Also tried 30 steps at lr 1e-3: there both updates saturate within a few steps, "
        "because Post-LN's and DeepNorm's outputs are normalized and cannot move much further "
        "than their own RMS."
    ),
    ("wang2022_deepnet_model_update", "post-update-grows"): (
        "The mean passes, but one seed of three has a slope below 0.5, so the interval across "
        "seeds is wide."
    ),
}
"""Notes on claims that do not reproduce (what was tried) or that need a caveat."""

FINDINGS: dict[str, str] = {
    "beyond_hybridnorm_deep": (
        "At 64 layers and initialization, HybridNorm's FFN gradient profile is more even than "
        "Pre-Norm's, as the paper argues for shallower models, but not more even than "
        "Post-Norm's. After 60 training steps the picture turns around. In some seeds, the "
        "first blocks of HybridNorm, HybridNorm* and Post-Norm get FFN gradients several "
        "orders of magnitude below those of their last blocks, the vanishing-gradient pattern "
        "of Post-LN. Pre-Norm's profile stays within a much narrower range. The max/min "
        "ratio is then set by the smallest block gradient, which is why its mean over two "
        "seeds has a very wide interval. HybridNorm's residual stream grows far less than "
        "Pre-Norm's, no strategy diverged in 60 steps at lr 2e-3, and the final losses were "
        "within a few percent of each other. At this depth and width, HybridNorm keeps "
        "activations bounded but does not keep the gradients across layers balanced once "
        "training starts."
    ),
}
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
        f"{COMMAND} --json > docs/reproductions.json",
        "python docs/make_reproductions.py docs/reproductions.json --out docs/reproductions.md",
        "```",
        "",
        f"on {MACHINE},",
        "while only a few short test runs at low priority shared the machine. The CPU time counts",
        "all threads of the process, so it can exceed the wall time.",
        "",
        "\"Measured\" is the mean over seeds with the half-width of its 95% confidence interval",
        "(Student's t); a single seed has no interval. A claim passes when the mean lies in the",
        "expected interval, as `stabiliscope probe` decides; the confidence interval shows how",
        "far the seeds agree but does not enter the verdict. Runs on another machine or torch",
        "version can differ in the last digits.",
        "",
        "\"Quantity\" names how each seed's runs are reduced to one number, and the metric read:",
        "",
        "- `loglog_slope_vs_depth`: least-squares slope of log(value) against log(depth) over the",
        "  grid's depths, for the last block unless another block is named;",
        "- `loglog_slope_vs_layer`: slope of log(value) against log(l + 1) over the blocks of one run;",
        "- `last_over_first`: the last block's value over the first block's;",
        "- `max_over_min`: the largest block value over the smallest;",
        "- `spearman_vs_layer`: rank correlation of the per-block values with the block index;",
        "- `growth_from_init`: the max over blocks at the step read, over the max at initialization;",
        "- `final_loss`: the final training loss; `diverged_step`: the step where the run diverged,",
        "  or its step count when it did not;",
        "- `value`: one number computed per run, for the probes that measure rather than train.",
        "",
        "\"init\" reads step 0 and \"final\" the last recorded step. Where the strategy column",
        "reads `a / b`, the number is a's value over b's, seed by seed.",
        "",
        "In the files that reproduce a paper, a failed claim reads \"FAIL: not reproduced\" and",
        "has a note on what was tried. The `beyond_hybridnorm_deep` file asks a question the",
        "paper left open, so a failed claim there reads \"FAIL: does not hold here\": it is a",
        "result, which the file's \"What it finds\" paragraph discusses.",
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


def _shown_path(path: Path) -> str:
    """Return `path` relative to the repository root when it lies inside it."""
    try:
        return path.resolve().relative_to(REPOSITORY).as_posix()
    except ValueError:
        return str(path)


def render_probe(item: dict[str, Any]) -> list[str]:
    """Return the section of one probe file."""
    # The page documents this repository's probe files, wherever the run read them from.
    path = REPOSITORY / "probes" / Path(item["probe"]).name
    probe = load_probe(path)
    source = item["source"]
    stem = path.stem
    if stem in BEYOND_PAPER:
        statement_heading = "**Question, and how we read it.**"
    else:
        statement_heading = "**Published statement, in our words, and how we read it.**"

    lines = [
        f"## {stem}",
        "",
        f"**Source.** {source['authors']} {source['year']}, \"{source['title']}\", {source['where']}.",
        "",
        statement_heading,
        "",
        *_header_paragraphs(path),
        "**Setting.**",
        "",
        *describe_setting(probe),
        "",
        f"**Command.** `stabiliscope probe {_shown_path(path)}` ({item['runs']} runs{_failed_runs(item)}; "
        f"{_format_seconds(item['wall_time_s'])} wall, {_format_seconds(item.get('cpu_time_s'))} CPU).",
        "",
        "| claim | statement | strategy | quantity | measured | expected | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    notes = []
    failed_verdict = "FAIL: does not hold here" if stem in BEYOND_PAPER else "FAIL: not reproduced"
    for claim, parsed in zip(item["claims"], probe.claims):
        verdict = claim["verdict"] if claim["verdict"] == "PASS" else failed_verdict
        lines.append(
            f"| `{claim['id']}` | {_cell(claim['statement'])} | {_cell(parsed.describe_subject())} "
            f"| {_cell(parsed.describe_quantity())} | {_format_measured(claim)} | {_format_expected(claim['expect'])} | {verdict} |"
        )
        note = NOTES.get((stem, claim["id"]))
        if note is not None:
            notes.append(f"- `{claim['id']}`: {note}")
        elif claim["verdict"] != "PASS" and stem not in BEYOND_PAPER:
            notes.append(f"- `{claim['id']}`: not reproduced at this scale. No other setting was tried.")

    if notes:
        lines.extend(["", "Notes:", "", *notes])
    if stem in FINDINGS:
        lines.extend(["", f"**What it finds.** {FINDINGS[stem]}"])
    lines.append("")
    return lines


def describe_setting(probe: Probe) -> list[str]:
    """Return Markdown list lines with the experiment of `probe` and the changes each variant makes."""
    experiment = probe.experiment
    strategies = ", ".join(experiment.strategies)
    depths = ", ".join(str(depth) for depth in experiment.depths)
    seeds = ", ".join(str(seed) for seed in experiment.seeds)
    lines = [f"- Grid: kind `{experiment.kind}`, strategies [{strategies}], depths [{depths}], seeds [{seeds}]."]
    if probe.variants:
        lines.append(f"- Model: width {experiment.width}, {experiment.heads} heads, the rest set by each variant.")
    else:
        lines.append(
            f"- Model: width {experiment.width}, {experiment.heads} heads, " + ", ".join(_model_settings(experiment)) + "."
        )

    if experiment.kind == "invariance":
        run = f"one head's rows scaled by {experiment.weight_scale:g} at a time, at initialization"
    elif experiment.steps == 0:
        run = "at initialization (the gradients of the first batch)"
    else:
        run = f"{experiment.steps} AdamW steps at lr {experiment.lr:g} with {experiment.warmup} warmup steps"
        if experiment.grad_clip is not None:
            run += f", gradient clipping at {experiment.grad_clip:g}"
    data = "the built-in corpus (CPython's pydoc topics)" if experiment.data is None else f"`{experiment.data}`"
    lines.append(f"- Run: {run}, batches of {experiment.batch_size} x {experiment.seq_len} bytes from {data}.")

    for name, variant in probe.variants.items():
        settings = ", ".join(_model_settings(variant))
        changes = _variant_changes(experiment, variant)
        lines.append(f"- Variant `{name}`: {settings}" + (f", {changes}." if changes else "."))
    return lines


def _model_settings(experiment: Experiment) -> list[str]:
    return [
        f"init `{experiment.init}`",
        f"FFN `{experiment.ffn}`",
        f"norm `{experiment.norm}`",
        f"embeddings `{experiment.embed_scale}`",
    ]


def _variant_changes(base: Experiment, variant: Experiment) -> str:
    changes = []
    # The model settings are listed for every variant, so only the others are compared here.
    for name in ("strategies", "lr", "warmup", "grad_clip", "weight_scale"):
        value = getattr(variant, name)
        if value != getattr(base, name):
            changes.append(f"{name} {_format_setting(value)}")
    return ", ".join(changes)


def _format_setting(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
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
