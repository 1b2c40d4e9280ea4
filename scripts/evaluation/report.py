"""The evaluation's output: CSVs of every measurement, PNG figures, and the page.

`write(results, out)` writes out/data/*.csv, out/figures/*.png and out/evaluation.md (out is
docs/ for the committed page). The figures are drawn headless (Agg) at a size that keeps each
PNG well under 100 KB.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from protocol.session import NOISE_XX
from scripts.benchmarks.common import percentile
from scripts.evaluation.experiments import GB, MB, Plan

PEERD = "#1f5fa8"
PLAIN = "#c8702a"
COLORS = {"peerd": PEERD, "plaintext": PLAIN}
LABELS = {"peerd": "peerd (Noise sessions, end-to-end encrypted)", "plaintext": "plaintext MQTT"}


@dataclass
class Results:
    plan: Plan
    env: dict[str, str]
    handshakes: list[dict[str, Any]] = field(default_factory=list)
    handshake_summary: list[dict[str, Any]] = field(default_factory=list)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    fanout: list[dict[str, Any]] = field(default_factory=list)
    federated: list[dict[str, Any]] = field(default_factory=list)
    frame_sizes: tuple[int, int, int, int] = (0, 0, 0, 0)
    seconds: dict[str, float] = field(default_factory=dict)
    versions: list[dict[str, Any]] = field(default_factory=list)
    versions_model: str = ""


def write(results: Results, out: Path) -> list[Path]:
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    tables = {
        "handshakes": results.handshakes,
        "handshake_summary": results.handshake_summary,
        "handshake_scaling": results.scaling,
        "transfer": results.transfers,
        "fanout": results.fanout,
        "federated": results.federated,
        "versions": results.versions,
    }
    written = []
    for name, rows in tables.items():
        path = out / "data" / f"{name}.csv"
        _csv(path, rows)
        written.append(path)
    for name, draw in FIGURES.items():
        path = out / "figures" / f"{name}.png"
        draw(results, path)
        written.append(path)
    page = out / "evaluation.md"
    page.write_text(markdown(results))
    written.append(page)
    return written


VERSIONS_BEGIN = "<!-- versions: begin (scripts/evaluate --only versions rewrites this part) -->"
VERSIONS_END = "<!-- versions: end -->"


def write_versions(results: Results, out: Path) -> list[Path]:
    """`--only versions`: data/versions.csv, figures/versions.png, and that section of an
    existing out/evaluation.md (between its markers, or inserted before "## Data")."""
    page = out / "evaluation.md"
    if not page.exists():
        raise RuntimeError(f"{page} does not exist: run the whole evaluation once first")
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    data, figure = out / "data" / "versions.csv", out / "figures" / "versions.png"
    _csv(data, results.versions)
    fig_versions(results, figure)
    text, section = page.read_text(), versions_section(results)
    if VERSIONS_BEGIN in text and VERSIONS_END in text:
        head, rest = text.split(VERSIONS_BEGIN, 1)
        text = head + section + rest.split(VERSIONS_END, 1)[1]
    elif "\n## Data\n" in text:
        head, rest = text.split("\n## Data\n", 1)
        text = head + "\n" + section + "\n\n## Data\n" + rest
    else:
        raise RuntimeError(f"{page} has neither the versions markers nor a '## Data' section")
    page.write_text(text)
    return [data, figure, page]


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(value: Any) -> Any:
    # repr keeps every bit of a float (the federated curves are compared exactly).
    return repr(value) if isinstance(value, float) else value


# -- derived numbers ------------------------------------------------------------------------------


def _median(rows: Iterable[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def _by_mode(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["mode"] == mode]


def per_gb(results: Results) -> dict[str, dict[str, float]]:
    """Medians over the runs of the single-receiver transfer, per GB of model."""
    out = {}
    for mode in ("peerd", "plaintext"):
        rows = _by_mode(results.transfers, mode)
        size = rows[0]["bytes"] / GB
        out[mode] = {
            "mb_s": _median(rows, "mb_s"),
            "cpu_sender": _median(rows, "cpu_sender_s") / size,
            "cpu_receiver": _median(rows, "cpu_receivers_s") / size,
            "cpu_broker": _median(rows, "cpu_broker_s") / size,
            "sys_sender": _median(rows, "cpu_sender_system_s") / size,
            "sys_receiver": _median(rows, "cpu_receivers_system_s") / size,
            "sys_broker": _median(rows, "cpu_broker_system_s") / size,
            "up": statistics.median(
                (r["sender_sent_bytes"] + r["sender_received_bytes"]) for r in rows
            )
            / size
            / MB,
            "down": statistics.median(
                (r["receivers_sent_bytes"] + r["receivers_received_bytes"]) for r in rows
            )
            / size
            / MB,
        }
        out[mode]["cpu_total"] = (
            out[mode]["cpu_sender"] + out[mode]["cpu_receiver"] + out[mode]["cpu_broker"]
        )
        out[mode]["wire"] = out[mode]["up"] + out[mode]["down"]
    return out


def fanout_medians(results: Results, mode: str) -> list[dict[str, Any]]:
    """Per number of receivers, the median of every measured value over the runs."""
    out = []
    for k in sorted({r["receivers"] for r in results.fanout}):
        rows = [r for r in results.fanout if r["mode"] == mode and r["receivers"] == k]
        keys = [key for key, v in rows[0].items() if isinstance(v, int | float) and key != "run"]
        out.append({key: statistics.median(r[key] for r in rows) for key in keys})
    return out


def _summary(results: Results, mode: str) -> dict[str, Any]:
    return next(r for r in results.handshake_summary if r["mode"] == mode)


def _scaling_median(results: Results, mode: str, kind: str, n: int, key: str) -> float:
    rows = [r for r in results.scaling if r["mode"] == mode and r["peers"] == kind and r["n"] == n]
    return _median(rows, key)


def _fl(results: Results, mode: str, run: int = 1) -> list[dict[str, Any]]:
    return [r for r in results.federated if r["mode"] == mode and r["run"] == run]


def _rounds_to(rows: list[dict[str, Any]], target: float) -> int | None:
    return next((r["round"] for r in rows if r["accuracy"] >= target), None)


# -- figures --------------------------------------------------------------------------------------


def _figure(path: Path, draw: Callable[[list[Axes]], None], ncols: int = 2) -> None:
    """One row of `ncols` plots, saved as a PNG without a timestamp (reruns diff cleanly)."""
    fig, axes = plt.subplots(1, ncols, figsize=(9.0, 3.4), dpi=90)
    draw(list(axes))
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def fig_handshake_time(results: Results, path: Path) -> None:
    def draw(axes: list[Axes]) -> None:
        hist, cdf = axes
        series = {m: sorted(r["ms"] for r in _by_mode(results.handshakes, m)) for m in COLORS}
        top = max(percentile(v, 99) for v in series.values()) * 1.2
        bins = [top * i / 60 for i in range(61)]
        for mode, values in series.items():
            hist.hist(values, bins=bins, color=COLORS[mode], alpha=0.6, label=LABELS[mode])
            n = len(values)
            cdf.plot(values, [(i + 1) / n for i in range(n)], color=COLORS[mode], label=mode)
        _style(hist, "Handshake time, distribution", "milliseconds", "handshakes")
        hist.set_xlim(0, top)
        hist.legend(fontsize=7)
        _style(cdf, "Cumulative distribution", "milliseconds (log scale)", "fraction")
        cdf.set_xscale("log")
        low = min(v[0] for v in series.values())
        high = max(v[-1] for v in series.values())
        ticks = [x for x in (0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200) if low / 2 <= x <= high * 2]
        cdf.set_xticks(ticks, [f"{x:g}" for x in ticks])
        cdf.minorticks_off()
        cdf.legend(fontsize=8)

    _figure(path, draw)


def fig_handshake_scaling(results: Results, path: Path) -> None:
    plan = results.plan

    def draw(axes: list[Axes]) -> None:
        each, total = axes
        for mode, color in COLORS.items():
            for kind, marker, ns in (
                ("load generator", "o", plan.scaling_peers),
                ("daemons", "s", plan.scaling_daemons),
            ):
                label = f"{mode}, {'real daemons' if kind == 'daemons' else 'load generator'}"
                style = "-" if kind == "load generator" else ":"
                for ax, key in ((each, "p50_ms"), (total, "all_up_ms")):
                    ax.plot(
                        ns,
                        [_scaling_median(results, mode, kind, n, key) for n in ns],
                        style,
                        marker=marker,
                        color=color,
                        markersize=4,
                        label=label,
                    )
        _style(each, "Median handshake time, N at once", "peers N (log scale)", "milliseconds")
        _style(total, "Until all N sessions are up", "peers N (log scale)", "milliseconds")
        ticks = sorted({*plan.scaling_peers, *plan.scaling_daemons})
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(n) for n in ticks])
            ax.minorticks_off()
        total.legend(fontsize=7)

    _figure(path, draw)


def fig_cpu(results: Results, path: Path) -> None:
    g = per_gb(results)

    def draw(axes: list[Axes]) -> None:
        bars, scale = axes
        parts = [("cpu_sender", "sender"), ("cpu_receiver", "receiver"), ("cpu_broker", "broker")]
        for i, (mode, color) in enumerate(COLORS.items()):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(parts))]
            system = [g[mode]["sys" + k[3:]] for k, _ in parts]
            user = [g[mode][k] - s for (k, _), s in zip(parts, system, strict=True)]
            bars.bar(xs, user, 0.38, color=color, label=f"{mode}, user")
            bars.bar(
                xs,
                system,
                0.38,
                bottom=user,
                color=color,
                alpha=0.45,
                hatch="///",
                label=f"{mode}, system (kernel)",
            )
            for x, (k, _) in zip(xs, parts, strict=True):
                bars.text(x, g[mode][k], f"{g[mode][k]:.2f}", ha="center", va="bottom", fontsize=7)
        bars.set_xticks(range(len(parts)), [label for _, label in parts])
        _style(bars, "CPU seconds per GB (one receiver)", "", "CPU s / GB")
        top = max(g[m][k] for m in COLORS for k, _ in parts)
        bars.set_ylim(0, top * 1.45)
        bars.legend(fontsize=7, ncol=2, loc="upper center")
        for mode, color in COLORS.items():
            rows = fanout_medians(results, mode)
            scale.plot(
                [r["receivers"] for r in rows],
                [
                    (r["cpu_sender_s"] + r["cpu_receivers_s"] + r["cpu_broker_s"])
                    / (r["bytes"] * r["receivers"] / GB)
                    for r in rows
                ],
                "-o",
                color=color,
                markersize=4,
                label=mode,
            )
        _style(scale, "All processes, k receivers", "receivers k", "CPU s / GB delivered")
        scale.set_xticks(sorted({r["receivers"] for r in results.fanout}))
        scale.set_ylim(bottom=0)
        scale.legend(fontsize=8)

    _figure(path, draw)


def fig_wire(results: Results, path: Path) -> None:
    g = per_gb(results)
    model_mb = GB / MB

    def draw(axes: list[Axes]) -> None:
        total, extra, shake = axes
        parts = [("up", "sender's link"), ("down", "receiver's link")]
        for i, (mode, color) in enumerate(COLORS.items()):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(parts))]
            total.bar(xs, [g[mode][k] for k, _ in parts], 0.38, color=color, label=mode)
            over = [g[mode][k] - model_mb for k, _ in parts]
            extra.bar(xs, over, 0.38, color=color, label=mode)
            for x, v in zip(xs, over, strict=True):
                extra.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        for ax in (total, extra):
            ax.set_xticks(range(len(parts)), [label for _, label in parts])
        _style(total, "Per GB of model", "", "MB, both directions")
        total.legend(fontsize=7, loc="lower right")
        _style(extra, "Beyond the model's own bytes", "", "MB per GB")
        modes = list(COLORS)
        values = [_summary(results, m)["wire_bytes_per_handshake"] for m in modes]
        shake.bar(modes, values, color=[COLORS[m] for m in modes], width=0.5)
        for x, v in enumerate(values):
            shake.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        _style(shake, "Per handshake", "", "bytes, both peers' links")

    _figure(path, draw, ncols=3)


def fig_federated(results: Results, path: Path) -> None:
    def draw(axes: list[Axes]) -> None:
        acc, secs = axes
        runs = sorted({(r["mode"], r["run"]) for r in results.federated})
        styles = {("peerd", 1): "-", ("peerd", 2): "--", ("plaintext", 1): ":"}
        for mode, run in runs:
            rows = _fl(results, mode, run)
            acc.plot(
                [r["round"] for r in rows],
                [r["accuracy"] for r in rows],
                styles.get((mode, run), "-"),
                color=COLORS[mode],
                linewidth=2.2 if run == 1 and mode == "peerd" else 1.4,
                label=f"{mode}, run {run}",
            )
            secs.plot(
                [r["round"] for r in rows],
                [r["seconds"] * 1e3 for r in rows],
                styles.get((mode, run), "-"),
                color=COLORS[mode],
                label=f"{mode}, run {run}",
            )
        acc.axhline(results.plan.fl_target, color="grey", linewidth=0.8, linestyle="-.")
        _style(acc, "Test accuracy of the global model", "round", "accuracy")
        acc.legend(fontsize=8, loc="lower right")
        _style(secs, "Wall time per round (3 parties)", "round", "milliseconds")
        secs.set_yscale("log")
        every = [r["seconds"] * 1e3 for r in results.federated]
        ticks = [
            t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if min(every) / 2 <= t <= max(every) * 2
        ]
        secs.set_yticks(ticks, [str(t) for t in ticks])
        secs.minorticks_off()
        secs.legend(fontsize=8)

    _figure(path, draw)


def fig_fanout(results: Results, path: Path) -> None:
    def draw(axes: list[Axes]) -> None:
        time_ax, bytes_ax = axes
        for mode, color in COLORS.items():
            rows = fanout_medians(results, mode)
            ks = [r["receivers"] for r in rows]
            time_ax.plot(ks, [r["seconds"] for r in rows], "-o", color=color, label=mode)
            bytes_ax.plot(
                ks,
                [r["sender_sent_bytes"] / MB for r in rows],
                "-o",
                color=color,
                label=f"{mode}, sent by the sender",
            )
            bytes_ax.plot(
                ks,
                [r["receivers_received_bytes"] / MB for r in rows],
                ":s",
                color=color,
                markersize=4,
                label=f"{mode}, received by all",
            )
        size = results.fanout[0]["bytes"] / MB
        _style(time_ax, f"Time to deliver {size:.0f} MB to k receivers", "receivers k", "seconds")
        time_ax.legend(fontsize=8)
        _style(bytes_ax, "Bytes on the wire", "receivers k", "MB")
        bytes_ax.legend(fontsize=7)
        for ax in axes:
            ax.set_xticks(sorted({r["receivers"] for r in results.fanout}))

    _figure(path, draw)


DELTAS = "peerd, deltas on"
WHOLE = "peerd, deltas off (whole file)"
RSYNC = "rsync --no-whole-file, literal data"
VERSION_SERIES = {
    DELTAS: ("deltas_wire_bytes", PEERD),
    WHOLE: ("whole_wire_bytes", "#9bb5d6"),
    RSYNC: ("rsync_literal_bytes", "#3d8c40"),
}


def fig_versions(results: Results, path: Path) -> None:
    rows = results.versions

    def draw(axes: list[Axes]) -> None:
        mb, pct = axes
        xs = [r["version"] for r in rows]
        for i, (label, (key, color)) in enumerate(VERSION_SERIES.items()):
            mb.bar(
                [x + (i - 1) * 0.27 for x in xs],
                [r[key] / MB for r in rows],
                0.27,
                color=color,
                label=label,
            )
            pct.plot(
                xs,
                [100 * r[key] / r["file_bytes"] for r in rows],
                "-o" if key != "rsync_literal_bytes" else "--s",
                color=color,
                markersize=4,
                label=label,
            )
        size = rows[0]["file_bytes"] / MB
        _style(mb, f"Bytes on the wire per version ({size:.0f} MB model)", "version", "MB")
        mb.set_ylim(0, size * 1.15)
        _style(pct, "The same, share of the file", "version", "% of the file (symlog)")
        pct.set_yscale("symlog", linthresh=0.01)
        ticks = [0, 0.01, 0.1, 1, 10, 100]
        pct.set_yticks(ticks, [f"{t:g}" for t in ticks])
        pct.set_ylim(0, 300)
        pct.minorticks_off()
        pct.legend(fontsize=7, loc="lower left")
        for ax in axes:
            ax.set_xticks(xs, [f"v{x}" for x in xs])

    _figure(path, draw)


FIGURES: dict[str, Callable[[Results, Path], None]] = {
    "handshake_time": fig_handshake_time,
    "handshake_scaling": fig_handshake_scaling,
    "cpu_per_gb": fig_cpu,
    "wire_bytes": fig_wire,
    "federated": fig_federated,
    "fanout": fig_fanout,
    "versions": fig_versions,
}


def versions_section(results: Results) -> str:
    """The model-versions section, between markers so `--only versions` can rewrite it."""
    rows, env = results.versions, results.env
    size = rows[0]["file_bytes"]
    later = rows[1:]

    def pct(x: float) -> str:
        return f"{100 * x / size:.2f} %"

    def total(key: str) -> float:
        return float(sum(r[key] for r in later)) / MB

    worst = max(later, key=lambda r: r["deltas_wire_bytes"] - r["rsync_literal_bytes"])
    within = [
        f"v{r['version']}"
        for r in later
        if r["deltas_wire_bytes"] <= r["rsync_literal_bytes"] + 0.02 * size
    ]
    beyond = [f"v{r['version']}" for r in later if f"v{r['version']}" not in within]
    table = [
        "| version | what it updates of the version before | updated | peerd, deltas on |"
        " peerd, deltas off | rsync literal data |",
        "|---|---|---|---|---|---|",
        *(
            f"| v{r['version']} | {r['what']} | {pct(r['updated_bytes'])} |"
            f" {r['deltas_wire_bytes'] / MB:.2f} MB ({pct(r['deltas_wire_bytes'])}) |"
            f" {r['whole_wire_bytes'] / MB:.2f} MB ({pct(r['whole_wire_bytes'])}) |"
            f" {r['rsync_literal_bytes'] / MB:.2f} MB ({pct(r['rsync_literal_bytes'])}) |"
            for r in rows
        ),
    ]
    lines = [
        VERSIONS_BEGIN,
        "## Model versions: bytes on the wire per checkpoint",
        "",
        "![Bytes on the wire per version](figures/versions.png)",
        "",
        f"*Measured {env['date']} on {env['machine']}; load average {env['load_before']}"
        f" before the run; {env.get('others', 'n/a')}."
        + (" Reduced (--quick) run." if env.get("quick") == "yes" else "")
        + " The seconds in the CSV depend on the load, the bytes far less (see below).*",
        "",
        f"A series of {len(rows)} checkpoints of a {size / MB:.0f} MB safetensors model"
        f" ({results.versions_model}, random weights N(0, 0.02) in F16, norms 1 in F32)."
        " Each version after the first is a copy of the one before in which some tensors, or"
        " some rows of one, were updated in place: N(0, 0.002) added to every updated value,"
        " so nearly every 2-byte value of an updated tensor changes, as in a real fine-tune,"
        " while frozen tensors keep every bit; the file's size and layout stay the same. The"
        " series is synthetic, chosen to cover the patterns issue 15 names (frozen layers,"
        " partial and full fine-tunes, a resend), not taken from a real training run. Each"
        " version went from one daemon to a daemon that holds every earlier version"
        " (`[receive] deltas = true`, the default), and, in the same run, from one daemon to"
        " another with `[receive] deltas = false` on both (every send is the whole file, as"
        " before deltas); both pairs on a private Mosquitto configured as shipped, each"
        " transfer verified (the received file's hash equals the source's). rsync updated a"
        " copy of the version before to this version locally (`rsync --stats --no-whole-file"
        " --ignore-times`); its literal data is what it would send of the file's content, with"
        " the plaintext of both files in view. peerd's bytes are the kernel's TCP counters of"
        " the sender's connection to the broker during the transfer: everything, including MQTT"
        " headers, the recipe (the list of chunk hashes an offer carries), credits and"
        " acknowledgements. Regenerate this section alone with"
        " `./scripts/evaluate --only versions` (`--versions-mb N` sets the model size:"
        f" {results.plan.versions_mb} MB in this run, {Plan.versions_mb} MB by default).",
        "",
        *table,
        "",
        f"Over v2 to v{rows[-1]['version']}, peerd with deltas sent"
        f" {total('deltas_wire_bytes'):.0f} MB, against {total('whole_wire_bytes'):.0f} MB"
        " as whole files and"
        f" {total('rsync_literal_bytes'):.0f} MB of rsync literal data. peerd stays within 2 %"
        " of the file of rsync's literal data (issue 15's goal for a v2) for"
        + (
            f" every version from v2 to v{rows[-1]['version']}"
            if not beyond
            else f" {', '.join(within) or 'no version'}"
        )
        + (f", not for {', '.join(beyond)}" if beyond else "")
        + "; an identical resend costs its offer, its recipe and the one chunk a delta"
        " candidate sends before the receiver's answer (SPEC 7.7). peerd is furthest above"
        " rsync for"
        f" v{worst['version']} ({pct(worst['deltas_wire_bytes'])} against"
        f" {pct(worst['rsync_literal_bytes'])}): a changed tensor costs at least the"
        " content-defined chunks it touches (about 64 KiB on average, restarting at each"
        " tensor) and the 256 KiB transfer chunks those fall in (a transfer chunk is fetched"
        " whole), so small tensors spread through the file cost far more than their own"
        " bytes, while rsync matches blocks of about the square root of the file size"
        f" ({math.isqrt(size) / 1024:.0f} KiB here) against the old plaintext. peerd's counts"
        " are not exactly repeatable: between two runs a version can cost a few percent of the"
        " file more while the receiver holds exactly the same bytes, so what varies is how many"
        " chunks the receiver held that the sender published anyway (a matter of timing;"
        " compare deltas_published_bytes and deltas_held_bytes across runs). The data, one"
        " row per version with peerd's published payload bytes, what the receiver already held"
        " and the seconds: [data/versions.csv](data/versions.csv).",
        VERSIONS_END,
    ]
    return "\n".join(lines)


# -- the page -------------------------------------------------------------------------------------


def _pct_more(a: float, b: float, digits: int = 0) -> str:
    return f"{(a / b - 1) * 100:+.{digits}f} %" if b else "n/a"


def markdown(results: Results) -> str:
    plan, env = results.plan, results.env
    g = per_gb(results)
    hp, hq = _summary(results, "peerd"), _summary(results, "plaintext")
    n_max = max(plan.scaling_peers)
    k_max = max(plan.fanout)
    fl_peerd, fl_plain = _fl(results, "peerd"), _fl(results, "plaintext")
    identical = all(
        (a["accuracy"], a["model_sha256"]) == (b["accuracy"], b["model_sha256"])
        for a, b in zip(fl_peerd, fl_plain, strict=True)
    ) and len({(r["round"], r["model_sha256"]) for r in results.federated}) == len(fl_peerd)
    r_peerd = _rounds_to(fl_peerd, plan.fl_target)
    r_plain = _rounds_to(fl_plain, plan.fl_target)
    fan = {(m, r["receivers"]): r for m in COLORS for r in fanout_medians(results, m)}
    fs = results.frame_sizes
    scaled_up = _scaling_median(results, "peerd", "load generator", n_max, "all_up_ms")
    scaled_plain = _scaling_median(results, "plaintext", "load generator", n_max, "all_up_ms")
    lines = [
        "# Evaluation: what security costs, measured",
        "",
        "peerd comes from a research paper on secure key exchange for encrypted AI model sharing,"
        " which claims that the key exchange adds only slight time, the encryption moderate"
        " computation and minimal communication, and that federated training keeps its accuracy"
        " and convergence. This page measures each claim on one machine, each time against the"
        " same work done without security: the same messages, files and updates published in"
        " plaintext MQTT through the same broker, in the same run. Regenerate it with"
        " `./scripts/evaluate` (about three minutes; `--quick` is the reduced run CI makes).",
        "",
        f"*Measured {env['date']} on {env['machine']}. {env['versions']}."
        f" Load average {env['load_before']} before the run; {env['others']}."
        + (" Reduced (--quick) run." if env.get("quick") == "yes" else "")
        + "*",
        "",
        "## Results at a glance",
        "",
        "| claim | peerd | plaintext MQTT | difference |",
        "|---|---|---|---|",
        f"| key exchange, median (p99) | {hp['p50_ms']:.2f} ms ({hp['p99_ms']:.2f} ms) |"
        f" {hq['p50_ms']:.2f} ms ({hq['p99_ms']:.2f} ms) |"
        f" +{hp['p50_ms'] - hq['p50_ms']:.2f} ms |",
        f"| {n_max} sessions opened at once, until all are up | {scaled_up:.0f} ms |"
        f" {scaled_plain:.0f} ms | +{scaled_up - scaled_plain:.0f} ms |",
        f"| CPU per GB, sender + receiver + broker | {g['peerd']['cpu_total']:.2f} s |"
        f" {g['plaintext']['cpu_total']:.2f} s |"
        f" {_pct_more(g['peerd']['cpu_total'], g['plaintext']['cpu_total'])} |",
        f"| transfer rate, one receiver | {g['peerd']['mb_s']:.0f} MB/s |"
        f" {g['plaintext']['mb_s']:.0f} MB/s |"
        f" {_pct_more(g['peerd']['mb_s'], g['plaintext']['mb_s'])} |",
        f"| bytes on the wire per GB of model (into and out of the broker) |"
        f" {g['peerd']['wire']:.1f} MB | {g['plaintext']['wire']:.1f} MB |"
        f" {_pct_more(g['peerd']['wire'], g['plaintext']['wire'], 2)} |",
        f"| bytes on the wire per handshake | {hp['wire_bytes_per_handshake']:.0f} |"
        f" {hq['wire_bytes_per_handshake']:.0f} |"
        f" {hp['wire_bytes_per_handshake'] - hq['wire_bytes_per_handshake']:+.0f} |",
        f"| federated averaging: accuracy after {plan.fl_rounds} rounds |"
        f" {fl_peerd[-1]['accuracy']:.4f} | {fl_plain[-1]['accuracy']:.4f} |"
        f" {'identical curves, bit for bit' if identical else 'DIFFERENT'} |",
        f"| rounds to {plan.fl_target:.0%} test accuracy | {r_peerd or 'not reached'} |"
        f" {r_plain or 'not reached'} | {'same' if r_peerd == r_plain else 'different'} |",
        f"| federated round, median wall time | {_median(fl_peerd, 'seconds') * 1e3:.0f} ms |"
        f" {_median(fl_plain, 'seconds') * 1e3:.1f} ms |"
        f" +{(_median(fl_peerd, 'seconds') - _median(fl_plain, 'seconds')) * 1e3:.0f} ms |",
        f"| fan-out to {k_max}: bytes the sender uploads |"
        f" {fan['peerd', k_max]['sender_sent_bytes'] / MB:.0f} MB |"
        f" {fan['plaintext', k_max]['sender_sent_bytes'] / MB:.0f} MB |"
        f" {fan['peerd', k_max]['sender_sent_bytes'] / fan['peerd', 1]['sender_sent_bytes']:.2f}"
        f" x its 1-receiver upload |",
        "",
        f"In short, on this machine: a handshake takes {hp['p50_ms'] - hq['p50_ms']:.1f} ms"
        " more than the same four messages in plaintext, and as many bytes on the wire"
        f" ({hp['wire_bytes_per_handshake'] - hq['wire_bytes_per_handshake']:+.0f});"
        " a GB of model costs"
        f" {g['peerd']['cpu_total'] - g['plaintext']['cpu_total']:.2f} CPU seconds more, summed"
        f" over sender, receiver and broker, and"
        f" {_pct_more(g['peerd']['wire'], g['plaintext']['wire'], 2)} bytes on the wire; federated"
        " training gives "
        + ("the same model, bit for bit" if identical else "DIFFERENT models (a bug)")
        + "; and the sender uploads a file once whatever the number of receivers. Absolute"
        " values move with the machine and its load; the comparisons are within one run.",
        "",
        "## Setup",
        "",
        "One private Mosquitto runs the configuration peerd ships (`systemd/mosquitto-peerd.conf`:"
        " every client logs in with its peer id as user name, the ACL confines it to its own"
        " inbox, the same limits), with one change: the per-client queue limits are lifted,"
        " because the plaintext baselines have no flow control of their own and would otherwise"
        " lose messages when a subscriber falls behind (peerd's credit window keeps the broker's"
        " queue far below those limits, so it is unaffected). The daemons are real `peerd run`"
        " processes, paired by invite; the baselines are separate processes that use the same"
        " MQTT client code (`peerd.mqtt.MqttLink`) with nothing on top: no handshake, no"
        " encryption, no hashing, no acknowledgements beyond MQTT's. All processes share the"
        f" machine's {env['cores']} cores.",
        "",
        "What is counted: CPU seconds are user + system time of the processes from"
        " `/proc/<pid>/stat`; bytes on the wire are the kernel's TCP counters (`ss -ti`:"
        " bytes_sent, bytes_received) of each client's connection to the broker, so they include"
        " every MQTT header, topic, acknowledgement and keepalive, but not TCP/IP headers."
        " Handshake times are the daemon's own (`v1.handshakes` / `session.up`: from its first"
        " handshake message to the responder's confirmation, as the initiator sees it).",
        "",
        "## Key exchange time",
        "",
        "![Handshake time distribution](figures/handshake_time.png)",
        "",
        f"One daemon opened {plan.handshakes} sessions one after the other with two real"
        f" daemons, alternating, {plan.handshake_interval * 1e3:.0f} ms apart (each a complete"
        f" {NOISE_XX} handshake, X25519 and ML-KEM-768, with certificate checks: HELLO, REPLY,"
        " FINISH and the responder's confirmation), and two plaintext processes exchanged four"
        f" messages of exactly the same sizes ({fs[0]}, {fs[1]}, {fs[2]} and {fs[3]} bytes)"
        " the same way."
        f" peerd's median is {hp['p50_ms']:.2f} ms against {hq['p50_ms']:.2f} ms in plaintext"
        f" (p99 {hp['p99_ms']:.2f} against {hq['p99_ms']:.2f} ms): the"
        f" {hp['p50_ms'] - hq['p50_ms']:.2f} ms between them are the public-key cryptography,"
        " the trust decisions and the daemon's own handling.",
        "",
        "![Handshake time with the number of peers](figures/handshake_scaling.png)",
        "",
        "The daemon under test opened sessions with N peers at once, peers played by a load"
        " generator (one process running the same protocol library, each peer with its own"
        " identity, MQTT login and session state machine, pinned by fingerprint in the daemon's"
        f" trust store) for N up to {n_max} and real daemons for N up to"
        f" {max(plan.scaling_daemons)}, while the baseline ran N plaintext four-message"
        f" exchanges at once ({plan.scaling_reps} repetitions, medians)."
        " Left is the median time of one handshake among the N, right the time from the first"
        f" HELLO to the last session up ({scaled_up:.0f} ms against {scaled_plain:.0f} ms for"
        f" {n_max} peers), which grows about linearly with N because one daemon does every"
        " handshake's public-key work on one core (and receives the N `connect` requests on its"
        " control socket).",
        "",
        "## Computational overhead",
        "",
        "![CPU seconds per GB](figures/cpu_per_gb.png)",
        "",
        f"A {results.transfers[0]['bytes'] / MB:.0f} MB safetensors model went from one daemon"
        " to another ("
        + (
            f"{plan.transfer_runs} runs after a warm-up, medians"
            if plan.transfer_runs > 1
            else "one run after a warm-up"
        )
        + ") and, as the baseline, from one plaintext process to another in"
        " 256 KiB QoS 1 publishes, 16 in flight, written at their offsets and fsynced at the"
        " end; left is the CPU time per GB of each side and of the broker, split into user time"
        " (encryption, decryption, hashing, the protocol) and kernel time, right the sum over all"
        f" processes per GB delivered for 1 to {k_max} receivers of one transfer."
        f" peerd costs {g['peerd']['cpu_sender']:.2f} / {g['peerd']['cpu_receiver']:.2f} /"
        f" {g['peerd']['cpu_broker']:.2f} s per GB (sender / receiver / broker) against"
        f" {g['plaintext']['cpu_sender']:.2f} / {g['plaintext']['cpu_receiver']:.2f} /"
        f" {g['plaintext']['cpu_broker']:.2f} s; the receiver's kernel time"
        f" ({g['peerd']['sys_receiver']:.2f} against {g['plaintext']['sys_receiver']:.2f} s)"
        " includes making its progress durable as it goes (an fdatasync every few MB, so that"
        " a transfer resumes after a crash), which puts part of the kernel's writeback on the"
        " daemon's clock instead of the kernel's background threads.",
        "",
        "## Communication overhead",
        "",
        "![Bytes on the wire](figures/wire_bytes.png)",
        "",
        "Left and middle: the bytes that crossed the sender's and the receiver's connections"
        " per GB of model, both directions, in total and beyond the model's own bytes (MQTT"
        " headers and topics in both cases, plus peerd's chunk headers, authentication tags,"
        " offer, credits and acknowledgements); right: the bytes per handshake over both"
        " peers' connections."
        f" peerd adds {(g['peerd']['wire'] / g['plaintext']['wire'] - 1) * 100:.2f} % to the"
        " bytes"
        f" of a transfer ({g['peerd']['wire'] - 2 * GB / MB:.1f} MB per GB beyond the model"
        f" against {g['plaintext']['wire'] - 2 * GB / MB:.1f} MB), and a handshake costs its"
        f" four messages and nothing more ({hp['wire_bytes_per_handshake']:.0f} bytes against"
        f" {hq['wire_bytes_per_handshake']:.0f} for the same sizes in plaintext; the difference"
        " is MQTT keepalives).",
        "",
        "## Federated training",
        "",
        "![Federated averaging](figures/federated.png)",
        "",
        "Three daemons ran federated averaging of a small multilayer perceptron (64-32-10) on"
        " scikit-learn's bundled digits (1,797 images that ship with the package, 30 % held"
        f" out) for {plan.fl_rounds} rounds, each party training one epoch per round on its"
        " third of the training set and sending its model (a"
        f" {fl_peerd[0]['update_bytes']:,}-byte safetensors file) in a peerd message to the two"
        " others, which averaged the three by sample count; the baseline exchanged the same"
        " bytes as plaintext MQTT messages, and all three runs (two through peerd) used the"
        f" seed {plan.seed}."
        " The accuracy curves lie on each other because they are equal to the last bit (the"
        " evaluation checks accuracy, loss and a hash of every party's global model at every"
        " round; "
        + (
            f"{r_peerd} rounds to {plan.fl_target:.0%} in every run"
            if r_peerd
            else f"{plan.fl_target:.0%} is not reached in so few rounds"
        )
        + f"), while a round takes {_median(fl_peerd, 'seconds') * 1e3:.0f} ms against"
        f" {_median(fl_plain, 'seconds') * 1e3:.1f} ms because a peerd message is stored"
        " durably until its receiver acknowledges it.",
        "",
        "## Scalability of fan-out",
        "",
        "![Fan-out](figures/fanout.png)",
        "",
        f"One {fan['peerd', 1]['bytes'] / MB:.0f} MB model went to k ="
        f" {', '.join(str(k) for k in plan.fanout)} receivers in one transfer, against one"
        " plaintext publish to k subscribers"
        f" ({plan.fanout_runs} run{'s, medians' if plan.fanout_runs > 1 else ''})."
        " peerd encrypts each chunk once and publishes it once on a topic all its receivers"
        f" read, so the sender uploads {fan['peerd', k_max]['sender_sent_bytes'] / MB:.0f} MB"
        f" for {k_max} receivers as for one, like the plaintext publisher (right), while the"
        " time grows with k in both because each receiver is a process of its own on the"
        f" machine's {env['cores']} cores, and peerd's also decrypt and verify (left).",
        "",
        versions_section(results),
        "",
        "## Data",
        "",
        "Every figure is drawn from these files (one row per measurement):",
        "",
        "- [data/handshakes.csv](data/handshakes.csv): each handshake's time;"
        " [data/handshake_summary.csv](data/handshake_summary.csv): percentiles, bytes;",
        "- [data/handshake_scaling.csv](data/handshake_scaling.csv): N peers at once, each"
        " repetition;",
        "- [data/transfer.csv](data/transfer.csv): single-receiver transfers, CPU and bytes of"
        " each process;",
        "- [data/fanout.csv](data/fanout.csv): 1 to k receivers;",
        "- [data/federated.csv](data/federated.csv): accuracy, loss, time and model hash of each"
        " round.",
        "",
        f"Experiment durations: {', '.join(f'{k} {v:.0f} s' for k, v in results.seconds.items())}.",
        "",
    ]
    return "\n".join(lines)
