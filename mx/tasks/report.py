"""``mx report``: pictures of a finished (or failed) job, and an HTML page that holds them.

For every step that left a timeline (``timeline.json``, written by the job's driver) a
per-worker Gantt chart, ``<step>-timeline.png``; for a ``complete`` step whose output holds
a sweep history, ``<step>-convergence.png`` (held-out and training RMSE per sweep); for a
``diffuse`` step, the image (``<step>-image.png``) and ``<step>-steps.png`` (seconds per
denoising step). Then
``index.html`` with the job's state, a table of its steps and the pictures; where a picture
could not be drawn, the page says why instead.
"""

from __future__ import annotations

import html
import json
import os
import re

from mx.storage import commit
from mx.tasks import record

CATEGORIES = ("compute", "communication", "I/O")
COLOURS = {"compute": "#4C72B0", "communication": "#DD8452", "I/O": "#55A868"}

# substrings of a phase name that mark time spent moving data between workers or storage;
# "exchange" and "checkpoint" are added to the usual words because the complete op's gang
# reports "exchange-omega" and a "checkpoint" that is its largest I/O
COMM_WORDS = ("wait", "shift", "comm", "gather", "bcast", "send", "recv", "exchange")
IO_WORDS = ("read", "write", "checkpoint")
# "io" only as a whole word: as a substring it is in "iteration", "reduction", "rotation"
IO_TOKENS = ("io",)

# gang phases that time a span already split into other phases (cannon and summa wrap their
# "compute" and "shift-wait"/"bcast-wait" in "rounds", complete its "row-solves" and
# "factor-allgather" in "sweep"); counting them too would count twice
ENCLOSING = ("rounds", "sweep")


def write(job_id: str, out_dir: str | None = None) -> list[str]:
    """Write the job's pictures and ``index.html`` into ``out_dir`` (default: the job's
    ``report/`` folder); returns the paths written, the page last."""
    from mx.tasks import jobs

    # as `mx status` shows it: a job whose runner died reads lost, its running step too, and
    # the error a rank left is named (the bare record still said "running", with no error)
    rec = jobs.settled(record.load(job_id))
    out_dir = os.path.abspath(out_dir or record.path(job_id, "report"))
    # --out below a file, in a place that cannot hold folders, read-only: one line, by the
    # probe outputs get (os.access says yes to root on read-only mounts)
    commit.check_folder(os.path.join(out_dir, "index.html"), f"--out {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    timeline = load_timeline(job_id)
    written: list[str] = []
    sections = []
    for step in rec.get("steps", []):
        pictures, notes = step_pictures(job_id, rec, step, timeline, out_dir)
        written += [p for p, _ in pictures]
        sections.append((step, pictures, notes))
    page = os.path.join(out_dir, "index.html")
    with open(page, "w") as f:
        f.write(render_html(rec, timeline, sections, out_dir))
    written.append(page)
    return written


def load_timeline(job_id: str) -> dict | None:
    """The job's timeline by step, or None when no step got as far as writing one."""
    try:
        with open(record.path(job_id, "timeline.json")) as f:
            return json.load(f).get("steps", {})
    except FileNotFoundError:
        return None


def step_pictures(job_id: str, rec: dict, step: dict, timeline: dict | None,
                  out_dir: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The pictures drawn for one step as (path, caption), and a note for each one that
    could not be drawn."""
    pictures, notes = [], []
    tasks = (timeline or {}).get(step["id"], {}).get("tasks", [])
    if tasks:
        path = os.path.join(out_dir, f"{safe_name(step['id'])}-timeline.png")
        draw_timeline(path, job_id, step["id"], step["op"], tasks)
        pictures.append((path, "Tasks per worker over time. A gang program's bar is split by "
                               "the share of its time spent in each kind of phase, not by when."))
    elif step.get("state") == "succeeded":
        notes.append("No timeline: the job's driver recorded no task timings for this step.")
    else:
        notes.append(f"No timeline: the step did not finish (state {step.get('state', '?')}), "
                     f"so its tasks' timings were not recorded.")
    if step["op"] == "complete":
        history, why = convergence_history(job_id, rec, step)
        if history is None:
            notes.append(f"No convergence picture: {why}.")
        else:
            path = os.path.join(out_dir, f"{safe_name(step['id'])}-convergence.png")
            why = draw_convergence(path, job_id, step["id"], history)
            if why is None:
                pictures.append((path, "Held-out and training RMSE after each sweep."))
            else:
                notes.append(f"No convergence picture: {why}.")
    if step["op"] == "diffuse":
        drawn, why = diffuse_pictures(job_id, rec, step, out_dir)
        if drawn is None:
            notes.append(f"No image: {why}.")
        else:
            pictures.extend(drawn)
    return pictures, notes


def safe_name(step_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", step_id).strip("-") or "step"


def category(name: str) -> str:
    """compute, communication or I/O for a task label or a gang phase name."""
    lower = name.lower()
    if any(word in lower for word in COMM_WORDS):
        return "communication"
    tokens = re.split(r"[^a-z0-9]+", lower)
    if any(word in lower for word in IO_WORDS) or any(t in IO_TOKENS for t in tokens):
        return "I/O"
    return "compute"


def segments(task: dict) -> list[tuple[str, float, float]]:
    """(category, offset, length) pieces of one task's bar, in seconds from the task's start.

    A task without inner phases is one piece in its label's category. A gang task's wall time
    is shared among the categories of its phases in proportion to their seconds.
    """
    stats = phase_seconds(task.get("stats") or {})
    total = sum(stats.values())
    if total <= 0:
        return [(category(task.get("label", "other")), 0.0, task["seconds"])]
    by_category = {c: 0.0 for c in CATEGORIES}
    for phase, seconds in stats.items():
        by_category[category(phase)] += seconds
    pieces, offset = [], 0.0
    for name in CATEGORIES:
        length = task["seconds"] * by_category[name] / total
        if length > 0:
            pieces.append((name, offset, length))
            offset += length
    return pieces


def phase_seconds(stats: dict) -> dict[str, float]:
    """The phases to draw: enclosing phases dropped when the phases inside them are there."""
    inner = {k: float(v) for k, v in stats.items() if k not in ENCLOSING and v and v > 0}
    if inner:
        return inner
    return {k: float(v) for k, v in stats.items() if v and v > 0}


def draw_timeline(path: str, job_id: str, step_id: str, op: str, tasks: list[dict]) -> None:
    """A Gantt chart: one row per worker (by rank), bars coloured by category."""
    plt = pyplot()
    t0 = min(t["start"] for t in tasks)
    wall = max(t["start"] + t["seconds"] for t in tasks) - t0
    names = {}
    for t in tasks:
        names.setdefault(t["worker"], t.get("name") or f"worker({t['worker']})")
    ranks = sorted(names)
    row = {rank: i for i, rank in enumerate(ranks)}
    # one broken_barh per (row, category) keeps thousands of tasks cheap to draw
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for t in tasks:
        start = t["start"] - t0
        for name, offset, length in segments(t):
            bars.setdefault((row[t["worker"]], name), []).append((start + offset, length))
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.45 * len(ranks) + 1.6)))
    try:
        for (i, name), spans in bars.items():
            ax.broken_barh(spans, (i - 0.4, 0.8), facecolors=COLOURS[name], edgecolor="white",
                           linewidth=0.3)
        ax.set_yticks(range(len(ranks)), [names[r] for r in ranks])
        ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
        ax.set_xlim(0, wall * 1.02 if wall > 0 else 1.0)
        ax.set_xlabel("seconds since the step's first task started")
        ax.set_title(f"job {job_id} · step {step_id} ({op}) · wall {wall:.3g} s", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[c]) for c in CATEGORIES]
        ax.legend(handles, CATEGORIES, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def stored_attributes(job_id: str, rec: dict, step: dict) -> tuple[dict | None, str, str]:
    """The attributes of the step's committed output, its path, and why there are none."""
    import zarr

    from mx.tasks.spec import resolve_path

    output = resolve_path(step["output"], rec.get("base") or os.getcwd())
    if step.get("state") != "succeeded":
        return None, output, f"the step did not succeed (state {step.get('state', '?')}), so " \
                             f"no output was committed"
    try:
        attrs = dict(zarr.open(store=output, mode="r").attrs)
    except Exception as exc:  # gone, moved or not Zarr: the page says so, no traceback
        return None, output, f"cannot open the output {output} ({type(exc).__name__}: {exc})"
    # a later job may have replaced the output; what it holds is not this job's
    writer = (attrs.get("mx") or {}).get("job")
    if writer not in (None, job_id):
        return None, output, f"the output {output} was since rewritten by job {writer}"
    return attrs, output, ""


def convergence_history(job_id: str, rec: dict, step: dict) -> tuple[list | None, str]:
    """The sweep history stored in the step's output, or None and why there is none."""
    attrs, output, why = stored_attributes(job_id, rec, step)
    if attrs is None:
        return None, why
    history = attrs.get("history")
    if not history:
        return None, f"the output {output} holds no sweep history"
    return history, ""


def diffuse_pictures(job_id: str, rec: dict, step: dict, out_dir: str):
    """The generated image and a chart of seconds per denoising step, as (path, caption)
    pairs, or None and why."""
    from mx.storage.image import PREVIEW

    attrs, output, why = stored_attributes(job_id, rec, step)
    info = (attrs or {}).get("diffuse")
    if attrs is None or not info:
        return None, why or f"the output {output} holds no diffusion record"
    name = safe_name(step["id"])
    image = os.path.join(out_dir, f"{name}-image.png")
    from PIL import Image

    with Image.open(os.path.join(output, PREVIEW)) as picture:
        factor = -(-256 // max(picture.size))  # small images scaled up, pixels kept sharp
        if factor > 1:
            picture = picture.resize((picture.width * factor, picture.height * factor),
                                     Image.NEAREST)
        picture.save(image)
    seconds = info["step_seconds"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    try:
        ax.bar(range(1, len(seconds) + 1), [x * 1e3 for x in seconds], color=COLOURS["compute"])
        ax.set_xlabel("denoising step")
        ax.set_ylabel("ms (slowest worker)")
        ax.set_title(f"job {job_id} · step {step['id']} (diffuse, {info['mode']}, "
                     f"{len(info['bands'])} band(s)) · steady {info['steady_step_seconds'] * 1e3:.1f}"
                     f" ms/step · {info['bytes_per_step_per_worker'] / 1e6:.3g} MB sent/step",
                     fontsize=9)
        fig.tight_layout()
        chart = os.path.join(out_dir, f"{name}-steps.png")
        fig.savefig(chart, dpi=110)
    finally:
        plt.close(fig)
    return [(image, f"The generated image ({info['height']}×{info['width']}, {info['steps']} "
                    f"steps, mode {info['mode']})."),
            (chart, "Seconds per denoising step; the first steps of distrifusion and pcpp are "
                    "the synchronous warmup.")], ""


def draw_convergence(path: str, job_id: str, step_id: str, history: list[dict]) -> str | None:
    """RMSE per sweep on a log axis; returns why it could not be drawn, or None."""
    curves = {}
    for key, label in (("holdout_rmse", "held-out RMSE"), ("train_rmse", "training RMSE")):
        points = [(h["sweep"], h[key]) for h in history
                  if isinstance(h.get(key), (int, float)) and h[key] > 0]
        if points:
            curves[label] = points
    if not curves:
        return "the history has no positive RMSE to draw on a log axis"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        for (label, points), style in zip(curves.items(), ("o-", "s--")):
            ax.plot(*zip(*points), style, label=label, markersize=4)
        ax.set_yscale("log")
        ax.set_xlabel("sweep")
        ax.set_ylabel("RMSE")
        seconds = history[-1].get("seconds")
        took = f", {seconds:.3g} s" if isinstance(seconds, (int, float)) else ""
        ax.set_title(f"job {job_id} · step {step_id} (complete) · {len(history)} sweeps{took}",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return None


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed; imported here
    so that ``import mx`` does not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_html(rec: dict, timeline: dict | None, sections: list, out_dir: str) -> str:
    e = html.escape
    state = record.effective_state(rec)
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>mx report {e(rec['id'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}img{max-width:100%;border:1px solid #eee}"
        ".note{color:#8a4b00}</style></head><body>",
        f"<h1>Job {e(rec['id'])}</h1>",
        f"<p>State: <b>{e(state)}</b>",
    ]
    if rec.get("seconds") is not None:
        parts.append(f" · {e(str(rec['seconds']))} s")
    if rec.get("backend"):
        parts.append(f" · backend {e(rec['backend'])}")
    parts.append("</p>")
    if rec.get("error"):
        parts.append(f"<p class='note'>Error: {e(str(rec['error']))}</p>")
    if timeline is None:
        parts.append("<p class='note'>No timeline was recorded for this job: no step finished, "
                     "so there are no timings to draw.</p>")
    parts.append(step_table(rec.get("steps", [])))
    if not sections:
        parts.append("<p class='note'>The job has no steps.</p>")
    for step, pictures, notes in sections:
        parts.append(f"<h2>Step {e(step['id'])} ({e(step['op'])})</h2>")
        for path, caption in pictures:
            rel = os.path.relpath(path, out_dir)
            parts.append(f"<figure><img src='{e(rel)}' alt='{e(os.path.basename(path))}'>"
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        for note in notes:
            parts.append(f"<p class='note'>{e(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def step_table(steps: list[dict]) -> str:
    e = html.escape
    rows = ["<table><tr><th>step</th><th>op</th><th>state</th><th>seconds</th>"
            "<th>phases (s)</th></tr>"]
    for s in steps:
        phases = "<br>".join(f"{e(k)} {v:.3f}" for k, v in (s.get("phases") or {}).items())
        seconds = "" if s.get("seconds") is None else e(str(s["seconds"]))
        rows.append(f"<tr><td>{e(s['id'])}</td><td>{e(s['op'])}</td>"
                    f"<td>{e(s.get('state', '?'))}</td><td>{seconds}</td><td>{phases}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)
