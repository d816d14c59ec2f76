"""The sweep's comparison: ``sweep.json`` (one record per member) and ``sweep.html`` with, per
layer, the Pareto plots researchers read (inference L0 against validation FVU; against the
spliced-in loss recovered and the tag-probing F1 where those evaluations exist beside a member),
the dead fraction, and the frontier marked.

A member's figures come from its own run directory: ``training_stats.json`` (final validation),
``eval.json`` (``python -m extractor.evaluate --out {run}/eval.json``) and ``best.real_eval.json``
(``python -m discovery.real_eval --sae_path {run}/best``)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from sae_core.errors import UsageError
from sae_core.files import write_json, write_text

from ..plots import pyplot

PAGE, SUMMARY = "sweep.html", "sweep.json"
POINTS = (("fvu", "validation FVU", False), ("loss_recovered", "loss recovered (spliced in)", True),
          ("probe_f1", "tag probing F1 (top-5 latents)", True), ("dead_fraction", "dead fraction", None))
"""The y of each panel against inference L0, and whether higher is better (None: no frontier)."""


def read_summary(out: str | Path) -> dict:
    """A sweep's ``sweep.json``; a missing or damaged one is named with the command that writes it."""
    path = Path(out) / SUMMARY
    try:
        summary = json.loads(path.read_text())
        summary["members"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"{path} is not a finished sweep's summary ({type(err).__name__}); run (or rerun) the "
                         "python -m jax_sae.sweep command that writes it") from None
    return summary


def finished(out: str | Path) -> bool:
    """Whether the sweep in ``out`` finished every member."""
    from ..run_dir import RunDir

    try:
        records = read_summary(out)["members"]
    except UsageError:
        return False
    return all(r.get("status") != "diverged" and RunDir(r["run_dir"]).finished() for r in records)


def member_point(record: dict) -> dict:
    """The figures of one member that the page plots (None where a figure does not exist)."""
    stats = record.get("stats") or {}
    val = stats.get("final_val") or {}
    run = Path(record["run_dir"])
    point = {"l0": val.get("l0"), "fvu": val.get("fvu"), "dead_fraction": val.get("dead_fraction"),
             "loss_recovered": None, "probe_f1": None}
    if (run / "eval.json").exists():
        from sae_core.eval_file import read_eval

        point["loss_recovered"] = read_eval(run / "eval.json")["overall"].get("loss_recovered_mean")
    probing = run / "best.real_eval.json"
    if probing.exists():
        from discovery.real_eval import read_result

        point["probe_f1"] = read_result(probing)["probing"]["mean"].get("top5", {}).get("f1")
    return point


def frontier(points: list[dict], key: str, higher_better: bool) -> list[bool]:
    """Whether each point is on the Pareto frontier of (lower L0, better ``key``): no other point is
    at most as dense and at least as good, and strictly better in one."""
    def better(a: float, b: float) -> bool:
        return a > b if higher_better else a < b

    def dominated(p: dict) -> bool:
        return any(q is not p and q["l0"] <= p["l0"] and not better(p[key], q[key])
                   and (q["l0"] < p["l0"] or better(q[key], p[key])) for q in valid)

    valid = [p for p in points if p["l0"] is not None and p[key] is not None]
    return [p in valid and not dominated(p) for p in points]


def layer_of(record: dict) -> str:
    stats = record.get("stats") or {}
    return str((stats.get("config") or {}).get("layer_idx", record["settings"].get("layer_idx", "?")))


def write_page(out: Path, summary: dict) -> Path:
    """Write ``sweep.json`` and ``sweep.html`` (and one PNG per layer) into ``out``; returns the page."""
    records = summary["members"]
    for record in records:
        record["point"] = member_point(record)
    layers = sorted({layer_of(r) for r in records}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s))
    sections = []
    for layer in layers:
        mine = [r for r in records if layer_of(r) == layer]
        points = [r["point"] for r in mine]
        marks = frontier(points, "fvu", False)
        for record, mark in zip(mine, marks):
            record["frontier"] = mark
        image = out / f"sweep-layer{layer}.png"
        plotted = _plot(mine, image, f"layer {layer}")
        sections.append(_section(layer, mine, image.name if plotted else None))
    write_json(out / SUMMARY, summary)
    page = out / PAGE
    write_text(page, _html(summary, sections))
    return page


def _plot(records: list[dict], path: Path, title: str) -> bool:
    panels = [(k, label, hb) for k, label, hb in POINTS
              if any(r["point"][k] is not None and r["point"]["l0"] is not None for r in records)]
    if not panels:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    types = sorted({r["settings"].get("sae_type") or (r.get("stats") or {}).get("sae", {}).get("sae_type", "sae")
                    for r in records})
    colours = {t: f"C{i}" for i, t in enumerate(types)}
    for ax, (key, label, higher) in zip(axes[0], panels):
        points = [r["point"] for r in records]
        marks = frontier(points, key, higher) if higher is not None else [False] * len(points)
        on = sorted((p["l0"], p[key]) for p, m in zip(points, marks) if m)
        if len(on) > 1:
            ax.plot(*zip(*on), color="0.6", lw=1, zorder=1, label="frontier")
        for r, p, m in zip(records, points, marks):
            if p["l0"] is None or p[key] is None:
                continue
            kind = _type(r)
            ax.scatter(p["l0"], p[key], color=colours.get(kind, "C0"), s=46 if m else 22,
                       edgecolors="black" if m else "none", zorder=2)
            ax.annotate(r["name"], (p["l0"], p[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("inference L0")
        ax.set_ylabel(label + (" (higher is better)" if higher else ""))
        ax.grid(alpha=0.3)
    for kind, colour in colours.items():
        axes[0][0].scatter([], [], color=colour, label=kind)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: {len(records)} members (frontier ringed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _lr(stats: dict) -> str:
    """The peak learning rate a member trained with (``--lr auto`` resolved)."""
    from ..config import auto_lr

    config = stats.get("config") or {}
    lr = config.get("lr")
    if lr == "auto" and config.get("hidden_dim") and config.get("batch_size"):
        lr = auto_lr(config["hidden_dim"], config["batch_size"])
    return "-" if lr is None else f"{lr:.2g}" if isinstance(lr, float) else html.escape(str(lr))


def _type(record: dict) -> str:
    return record["settings"].get("sae_type") or ((record.get("stats") or {}).get("sae") or {}).get("sae_type", "sae")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _section(layer: str, records: list[dict], image: str | None) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (r["point"]["l0"] is None, r["point"]["l0"] or 0)):
        p, stats = r["point"], r.get("stats") or {}
        sae = stats.get("sae") or {}
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            ("&#9733; " if r.get("frontier") else "") + html.escape(r["name"]), html.escape(_type(r)),
            _fmt(sae.get("hidden_dim")), _fmt(sae.get("top_k")), _lr(stats),
            _fmt(p["l0"], 1), _fmt(p["fvu"]), _fmt(p["dead_fraction"]), _fmt(p["loss_recovered"]),
            _fmt(p["probe_f1"]), _fmt(r.get("tokens_per_second"), 0), html.escape(r["status"]),
            f'<a href="{html.escape(r["run_dir"])}">{html.escape(r["run_dir"])}</a>')) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("member", "type", "latents", "k", "lr", "L0", "FVU", "dead",
                                               "loss recovered", "probe F1", "tokens/s", "status", "run"))
    figure = f'<img src="{html.escape(image)}" alt="Pareto plots of layer {layer}">' if image else ""
    return (f"<h2>Layer {html.escape(layer)}</h2>{figure}<table><tr>{head}</tr>{''.join(rows)}</table>")


def _html(summary: dict, sections: list[str]) -> str:
    facts = (f"{len(summary['members'])} members, {summary['steps']} steps of {summary['batch_size']} rows, "
             f"{summary['seconds']:.0f} s, {summary['bytes_read'] / 2**20:.1f} MiB read from the store")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>sweep</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>Sweep: {html.escape(str(summary['out']))}</h1><p>{html.escape(facts)}. &#9733; marks the members "
            "on the L0-FVU frontier of their layer (no other member is both sparser and more faithful).</p>"
            + "".join(sections) + "<details><summary>the sweep's settings (sweep.json)</summary><pre>"
            + html.escape(json.dumps({k: v for k, v in summary.items() if k != "members"}, indent=1))
            + "</pre></details></body></html>")
