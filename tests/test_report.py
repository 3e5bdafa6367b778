"""`mx report` on real jobs: gemm and complete on the local backend (and gemm on Ray), a
failed job, and an unknown job id. Every picture must be a real, non-blank PNG that the
HTML page points at."""

import json
import os
import re
import struct

import numpy as np
import pytest

import mx
from conftest import mx_cli, write_dense
from mx.errors import JobFailed
from mx.storage import generate
from mx.tasks import record, report

GEMM = """name: {name}
backend: {backend}
resources: {{workers: 4}}
steps:
  - id: c
    op: gemm
    inputs: {{a: a.zarr, b: b.zarr}}
    output: out/C.zarr
"""


def complete_job(observed="O.zarr", **params):
    return {"name": "cr", "backend": "local", "resources": {"workers": 2},
            "steps": [{"id": "f", "op": "complete", "inputs": {"observed": observed},
                       "output": "F.zarr",
                       "params": {"rank": 4, "method": "als", "tol": 1e-9, "max_iters": 30,
                                  "checkpoint": False, **params}}]}


def png_size(path):
    """Width and height from the PNG signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path}: first chunk is not IHDR"
    return struct.unpack(">II", head[16:24])


def pixels(path):
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(path))


def check_picture(path):
    width, height = png_size(path)
    assert width > 100 and height > 100, (path, width, height)
    image = pixels(path)
    assert image.shape[:2] == (height, width)
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert image.std() > 0.02 and len(colours) > 2, f"{path} looks blank"


def colour_pixels(path, name):
    """How many pixels have the category's colour exactly (bars and the legend's patch)."""
    image = pixels(path)[..., :3]
    want = np.array([int(report.COLOURS[name][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image - want).max(axis=-1) < 1.5 / 255).sum())


def check_page(paths, out_dir):
    page = os.path.join(out_dir, "index.html")
    assert paths[-1] == page and os.path.isfile(page)
    text = open(page).read()
    images = [p for p in paths if p.endswith(".png")]
    for path in images:
        assert os.path.dirname(path) == out_dir
        assert f"<img src='{os.path.basename(path)}'" in text, path
        check_picture(path)
    assert len(re.findall(r"<img ", text)) == len(images)
    return text


def cli_report(job_id, *args):
    proc = mx_cli("report", job_id[:12], *args, check=True)
    return proc.stdout.split()


def run_gemm(tmp_path, backend, name):
    # what `mx data random` writes, without two more interpreters starting
    generate.random_dense(str(tmp_path / "a.zarr"), (300, 200), (100, 100), seed=1)
    generate.random_dense(str(tmp_path / "b.zarr"), (200, 250), (100, 100), seed=2)
    return mx.submit(GEMM.format(name=name, backend=backend), base=str(tmp_path))


def check_gemm_report(job_id, paths):
    out_dir = record.path(job_id, "report")
    assert [os.path.basename(p) for p in paths] == ["c-timeline.png", "index.html"]
    text = check_page(paths, out_dir)
    assert job_id in text and "succeeded" in text and "gemm" in text
    # the bars, not just the legend: compute and I/O fill more than a legend patch (how much
    # more depends on how long each phase took on this machine)
    legend_patch = 40 * 15
    assert colour_pixels(paths[0], "compute") > legend_patch + 50
    assert colour_pixels(paths[0], "I/O") > legend_patch + 50


def test_gemm_report_on_the_local_backend(tmp_path):
    job_id = run_gemm(tmp_path, "local", "gr")
    paths = cli_report(job_id)
    check_gemm_report(job_id, paths)

    # the gang's bars are its wall time split by category: "rounds" encloses compute and
    # shift-wait, so it is not counted a second time
    with open(record.path(job_id, "timeline.json")) as f:
        tasks = json.load(f)["steps"]["c"]["tasks"]
    gang = [t for t in tasks if t["stats"]]
    assert len(gang) == 4 and all("rounds" in t["stats"] for t in gang)
    for t in gang:
        pieces = report.segments(t)
        assert {p[0] for p in pieces} <= {"compute", "communication"}
        assert sum(p[2] for p in pieces) == pytest.approx(t["seconds"])
        assert pieces[0][1] == 0 and all(a[1] + a[2] == pytest.approx(b[1])
                                         for a, b in zip(pieces, pieces[1:]))
    assert {report.category(t["label"]) for t in tasks if not t["stats"]} == {"I/O"}


def test_gemm_report_on_ray(tmp_path, ray_session):
    job_id = run_gemm(tmp_path, "ray", "gray")
    check_gemm_report(job_id, report.write(job_id))


def test_complete_report_with_convergence(tmp_path):
    generate.lowrank(str(tmp_path / "O.zarr"), (200, 150), 4, 0.35, seed=5)
    job_id = mx.submit(complete_job(), base=str(tmp_path))
    out_dir = str(tmp_path / "pictures")
    paths = cli_report(job_id, "--out", out_dir)
    assert [os.path.basename(p) for p in paths] == \
        ["f-timeline.png", "f-convergence.png", "index.html"]
    text = check_page(paths, out_dir)
    assert "complete" in text and "No convergence picture" not in text
    assert not os.path.exists(record.path(job_id, "report"))  # --out was used instead
    # the gang's bars are drawn, not only the legend
    assert colour_pixels(paths[0], "compute") > 5 * 40 * 15


def test_diffuse_report_with_image_and_step_timings(tmp_path):
    step = {"id": "img", "op": "diffuse", "inputs": {"model": "builtin:dit-tiny"},
            "output": "img.zarr", "params": {"height": 32, "width": 40, "steps": 6,
                                             "parallel": {"mode": "pcpp", "warmup": 2}}}
    job_id = mx.submit({"backend": "local", "resources": {"workers": 2}, "steps": [step]},
                       base=str(tmp_path))
    out_dir = str(tmp_path / "pictures")
    paths = cli_report(job_id, "--out", out_dir)
    assert [os.path.basename(p) for p in paths] == \
        ["img-timeline.png", "img-image.png", "img-steps.png", "index.html"]
    text = check_page(paths, out_dir)
    width, height = png_size(paths[1])  # scaled up by a whole factor to be seen
    assert "No image" not in text and width % 40 == 0 and width * 32 == height * 40 >= 256 * 32
    assert colour_pixels(paths[2], "compute") > 6 * 20  # the bars are drawn


def test_failed_jobs_get_a_page_that_says_why(tmp_path, rng):
    # gemm fails at its first read: nothing ran to the end, no timeline at all
    write_dense(tmp_path / "a.zarr", rng.random((120, 90)), chunks=(40, 90))
    write_dense(tmp_path / "b.zarr", rng.random((90, 70)))
    with open(tmp_path / "a.zarr" / "c" / "1" / "0", "wb") as f:
        f.write(b"definitely not zstd")
    with pytest.raises(JobFailed):
        mx.submit(GEMM.format(name="gf", backend="local"), base=str(tmp_path))
    job_id = record.find("gf-")
    paths = cli_report(job_id)
    assert [os.path.basename(p) for p in paths] == ["index.html"]
    text = check_page(paths, record.path(job_id, "report"))
    assert "failed" in text and "No timeline was recorded for this job" in text

    # complete fails inside its gang: no history to draw, and the page says so
    import scipy.sparse as sp

    from mx.storage import sparse

    # every row and column observed, but holding 90% out leaves some with nothing to train on:
    # found only inside the gang, once the held-out entries are drawn
    obs = sp.random(40, 30, density=0.4, format="csr", random_state=2)
    sparse.write_csr(str(tmp_path / "E.zarr"), sp.csr_array(obs))
    with pytest.raises(JobFailed, match="no observed entries left for training"):
        mx.submit(complete_job("E.zarr", holdout=0.9), base=str(tmp_path))
    job_id = record.find("cr-")
    paths = report.write(job_id)
    text = check_page(paths, record.path(job_id, "report"))
    assert paths == [record.path(job_id, os.path.join("report", "index.html"))]
    assert "No convergence picture: the step did not succeed (state failed)" in text


def test_unknown_job_is_a_clear_error(tmp_path):
    proc = mx_cli("report", "no-such-job")
    assert proc.returncode == 2
    assert "no job matches 'no-such-job'" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("out", ["a-file/report", "/proc/mx-report"])
def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, out):
    """--out below a file, or where no folder can be made, was a traceback."""
    job_id = run_gemm(tmp_path, "local", "ro")
    (tmp_path / "a-file").write_text("not a folder\n")
    proc = mx_cli("report", job_id, "--out", out if out.startswith("/") else tmp_path / out)
    assert proc.returncode == 2 and not proc.stdout, proc.stderr
    assert proc.stderr.startswith("mx: error: --out ") and len(proc.stderr.splitlines()) == 1


def test_a_job_whose_runner_died_reads_as_status_shows_it(tmp_path, rng):
    """The page read the bare record: a job whose runner was killed said its step was
    "running" with no error, where `mx status` says lost, and a rank's failure mark
    (an MPI rank that failed before the driver could record it) was not named."""
    import html
    import subprocess
    import sys

    from mx.tasks import jobs

    write_dense(tmp_path / "a.zarr", rng.random((12, 7)))
    write_dense(tmp_path / "b.zarr", rng.random((7, 5)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for mark in (None, "rank 1: task ('read-a', 'c', 1, 0) on worker 1 failed: boom"):
        job_id = jobs.prepare(GEMM.format(name="died", backend="local"), base=str(tmp_path))
        rec = record.load(job_id)
        rec["steps"][0]["state"] = "running"  # what a runner killed mid-step leaves
        record.update(job_id, rec, state="running", pid=dead.pid)
        if mark:
            record.mark_failed(job_id, mark)
        text = open(mx_cli("report", job_id, check=True).stdout.split()[-1]).read()
        want = "failed" if mark else "lost"
        assert f"State: <b>{want}</b>" in text
        assert "<td>running</td>" not in text and f"<td>{want}</td>" in text
        assert html.escape(mark or "its runner ended without recording an end") in text
