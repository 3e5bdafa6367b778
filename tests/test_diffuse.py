"""Patch-parallel diffusion on CPU workers: the DiT against an independent float64 reference,
every parallel mode on real Ray actors with the trained dit-tiny (sync equals none, the stale
modes beat naive), uneven bands, a user's checkpoint, and clear errors for bad models."""

import math
import os

import numpy as np
import pytest
from PIL import Image

import mx
from mx.errors import UserError
from mx.kernels import dit, sampler
from mx.storage import image, safetensors


def diffuse_step(step_id, height, width, mode="none", model="builtin:dit-tiny", **extra):
    params = {"height": height, "width": width, "steps": extra.pop("steps", 10), "seed": 5,
              "parallel": {"mode": mode, **extra}}
    return {"id": step_id, "op": "diffuse", "inputs": {"model": model},
            "output": f"out/{step_id}.zarr", "params": params}


def job(backend, workers, *steps):
    return {"backend": backend, "resources": {"workers": workers}, "steps": list(steps)}


# ------------------------------------------------------------------ a float64 reference
def reference_eps(w, heads, x, t):
    """DiT's forward on the whole image in float64, written from the paper with PyTorch's
    weight layout: a strided convolution, per-head softmax attention, adaLN-Zero."""
    c_in, h, wd = x.shape
    d, _, p, _ = w["x_embedder.proj.weight"].shape
    lin = lambda v, name: v @ w[name + ".weight"].T + w[name + ".bias"]  # noqa: E731
    gh, gw = h // p, wd // p
    tokens = np.empty((gh * gw, d))
    for i in range(gh):
        for j in range(gw):
            patch = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
            tokens[i * gw + j] = np.tensordot(w["x_embedder.proj.weight"], patch, axes=3)
    tokens += w["x_embedder.proj.bias"]

    def sincos(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
        return np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1)

    cols, rows = np.meshgrid(np.arange(gw), np.arange(gh))
    tokens += np.concatenate([sincos(d // 2, cols.ravel()), sincos(d // 2, rows.ravel())], 1)
    half = 128
    args = t * np.exp(-math.log(10000) * np.arange(half) / half)
    feats = np.concatenate([np.cos(args), np.sin(args)])
    hidden = lin(feats, "t_embedder.mlp.0")
    cond = lin(hidden / (1 + np.exp(-hidden)), "t_embedder.mlp.2")
    silu = cond / (1 + np.exp(-cond))

    def norm(v):
        return (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + 1e-6)

    hd = d // heads
    for b in range(sum(k.endswith("attn.qkv.weight") for k in w)):
        mod = np.split(lin(silu, f"blocks.{b}.adaLN_modulation.1"), 6)
        a = norm(tokens) * (1 + mod[1]) + mod[0]
        qkv = lin(a, f"blocks.{b}.attn.qkv")
        out = np.empty_like(a)
        for head in range(heads):
            q, k, v = (qkv[:, s * d + head * hd:s * d + (head + 1) * hd] for s in range(3))
            s = q @ k.T / math.sqrt(hd)
            e = np.exp(s - s.max(1, keepdims=True))
            out[:, head * hd:(head + 1) * hd] = (e / e.sum(1, keepdims=True)) @ v
        tokens = tokens + mod[2] * lin(out, f"blocks.{b}.attn.proj")
        a = norm(tokens) * (1 + mod[4]) + mod[3]
        f = lin(a, f"blocks.{b}.mlp.fc1")
        f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
        tokens = tokens + mod[5] * lin(f, f"blocks.{b}.mlp.fc2")
    shift, scale = np.split(lin(silu, "final_layer.adaLN_modulation.1"), 2)
    out = lin(norm(tokens) * (1 + scale) + shift, "final_layer.linear")
    c_out = out.shape[1] // (p * p)
    img = np.empty((c_out, h, wd))
    for i in range(gh):
        for j in range(gw):
            img[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = \
                out[i * gw + j].reshape(p, p, c_out).transpose(2, 0, 1)
    return img[:c_in]


def small_checkpoint(path, rng, hidden=48, depth=2, heads=3, channels=3):
    cfg = dit.Config(hidden=hidden, depth=depth, heads=heads, patch=2, in_channels=channels,
                     out_channels=2 * channels)  # learned sigma, as DiT
    tensors = {k: (v.astype(np.float32) * (1 + rng.random(v.shape)))
               for k, v in dit.random_weights(cfg, int(rng.integers(1 << 30))).items()}
    safetensors.write(str(path), tensors, {"num_heads": str(heads), "vae_factor": "1"})
    return {k: v.astype(np.float64) for k, v in tensors.items()}


def test_dit_matches_a_float64_reference(tmp_path, rng):
    weights = small_checkpoint(tmp_path / "m.safetensors", rng)
    h, w = 2 * int(rng.integers(3, 9)), 2 * int(rng.integers(3, 9))
    x = rng.standard_normal((3, h, w))
    t = int(rng.integers(0, 1000))
    want = reference_eps(weights, 3, x, t)
    model = dit.load(str(tmp_path / "m.safetensors"), np, np.float32)
    c = dit.condition(model, np, t, None)
    got = dit.forward_band(model, np, x.astype(np.float32), (0, h // 2), (h // 2, w // 2), c,
                           dit.own_kv)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_a_users_checkpoint_runs_as_a_job(tmp_path, rng):
    weights = small_checkpoint(tmp_path / "m.safetensors", rng)
    h, w = 2 * int(rng.integers(4, 8)), 2 * int(rng.integers(4, 8))
    steps = 3
    x = sampler.initial_noise((3, h, w), 5).astype(np.float64)
    times = sampler.timesteps(steps)
    for i, t in enumerate(times):
        eps = reference_eps(weights, 3, x, t)
        x = sampler.ddim_step(np, x, eps, t, times[i + 1] if i + 1 < steps else None).astype(np.float64)
    mx.submit(job("local", 1, diffuse_step("m", h, w, model="m.safetensors", steps=steps)),
              base=str(tmp_path))
    got, attrs = image.read(str(tmp_path / "out/m.zarr"))
    assert got.shape == (3, h, w)
    assert np.linalg.norm(got - x) / np.linalg.norm(x) < 1e-4
    assert attrs["diffuse"]["steps"] == steps and len(attrs["diffuse"]["step_seconds"]) == steps


def psnr(a, b):
    return 10 * np.log10(4.0 / max(np.mean((a - b) ** 2), 1e-30))  # images in [-1, 1]


def test_parallel_modes_on_ray_actors(tmp_path, ray_session):
    """Three bands of 7/7/6 token rows (the height is not a multiple of the band count)."""
    h, w = 40, 36
    modes = ("none", "naive", "sync", "distrifusion", "pcpp")
    steps = [diffuse_step(m, h, w, m, steps=12, **({"warmup": 2} if m in ("distrifusion", "pcpp")
                                                   else {})) for m in modes]
    job_id = mx.submit(job("ray", 3, *steps), base=str(tmp_path))
    out = {m: image.read(str(tmp_path / f"out/{m}.zarr")) for m in modes}
    ref = out["none"][0]
    assert ref.shape == (3, h, w) and np.isfinite(ref).all() and ref.std() > 0.05
    assert np.abs(out["sync"][0] - ref).max() < 1e-4
    err = {m: float(np.abs(out[m][0] - ref).mean()) for m in modes}
    assert 0 < err["distrifusion"] < err["naive"], err
    assert 0 < err["pcpp"] < err["naive"], err
    info = {m: out[m][1]["diffuse"] for m in modes}
    assert [b for b in info["pcpp"]["bands"]] == [[0, 7], [7, 14], [14, 20]]
    assert info["naive"]["bytes_per_step_per_worker"] == 0
    assert 0 < info["pcpp"]["bytes_per_step_per_worker"] < 0.6 * info["distrifusion"][
        "bytes_per_step_per_worker"]
    assert info["distrifusion"]["buffer_bytes_per_worker"] > info["pcpp"]["buffer_bytes_per_worker"] > 0
    for m in modes:  # the preview beside the output: a PNG of the image's size
        from PIL import Image

        with Image.open(tmp_path / f"out/{m}.png") as png:
            assert png.format == "PNG" and png.size == (w, h)
    assert "mode pcpp" in mx.logs(job_id)
    print({m: round(psnr(out[m][0], ref), 1) for m in modes if m != "none"})


def test_bad_models_and_shapes_give_clear_errors(tmp_path, rng):
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(UserError, match="junk.safetensors: not a safetensors file"):
        mx.submit(job("local", 1, diffuse_step("a", 32, 32, model="junk.safetensors")),
                  base=str(tmp_path))
    with pytest.raises(UserError, match="no model file at"):
        mx.submit(job("local", 1, diffuse_step("a", 32, 32, model="missing.safetensors")),
                  base=str(tmp_path))
    small_checkpoint(tmp_path / "m.safetensors", rng)
    tensors, meta = safetensors.read(str(tmp_path / "m.safetensors"))
    tensors["blocks.1.mlp.fc1.weight"] = tensors["blocks.1.mlp.fc1.weight"][:, :-1]
    safetensors.write(str(tmp_path / "bad.safetensors"), tensors, meta)
    with pytest.raises(UserError, match=r"blocks.1.mlp.fc1.weight has shape \(192, 47\), expected"):
        mx.submit(job("local", 1, diffuse_step("a", 32, 32, model="bad.safetensors")),
                  base=str(tmp_path))
    del tensors["blocks.1.mlp.fc1.weight"]
    safetensors.write(str(tmp_path / "bad.safetensors"), tensors, meta)
    with pytest.raises(UserError, match="blocks.1.mlp.fc1.weight is missing"):
        mx.submit(job("local", 1, diffuse_step("a", 32, 32, model="bad.safetensors")),
                  base=str(tmp_path))
    with pytest.raises(UserError, match="height: 33 is not a multiple of 2.*use 32 or 34"):
        mx.submit(job("local", 1, diffuse_step("a", 33, 32)), base=str(tmp_path))
    with pytest.raises(UserError, match="4 bands need 4 workers but the job has 2"):
        mx.submit(job("local", 2, diffuse_step("a", 32, 32, "pcpp", patches=4)), base=str(tmp_path))
    with pytest.raises(UserError, match="5 bands but the latent has only 4 rows of tokens"):
        mx.submit(job("local", 5, diffuse_step("a", 8, 32, "sync")), base=str(tmp_path))
    with pytest.raises(UserError, match="unknown builtin model 'builtin:sdxl'"):
        mx.submit(job("local", 1, diffuse_step("a", 32, 32, model="builtin:sdxl")),
                  base=str(tmp_path))
    with pytest.raises(UserError, match="parallel.mode"):
        mx.submit(job("local", 1, diffuse_step("a", 32, 32, "ring")), base=str(tmp_path))
    for key, value in (("vae_factor", "0"), ("num_heads", "abc")):
        safetensors.write(str(tmp_path / "meta.safetensors"), *safetensors.read(
            str(tmp_path / "m.safetensors"))[:1], {**meta, key: value})
        with pytest.raises(UserError, match=f"inputs.model .*metadata {key} = '{value}' is not"):
            mx.submit(job("local", 1, diffuse_step("a", 32, 32, model="meta.safetensors")),
                      base=str(tmp_path))
    step = diffuse_step("a", 32, 32)
    step["params"]["label"] = 3  # dit-tiny has no classes: the label must not be dropped silently
    with pytest.raises(UserError, match="params.label: builtin:dit-tiny is not class-conditional"):
        mx.submit(job("local", 1, step), base=str(tmp_path))
    for seed in (-1, 2**62):
        step = diffuse_step("a", 32, 32)
        step["params"]["seed"] = seed
        with pytest.raises(UserError, match="params.seed"):
            mx.submit(job("local", 1, step), base=str(tmp_path))
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_the_preview_never_replaces_what_mx_did_not_write(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/a.png").write_text("a user's file")
    (tmp_path / "out/b.png").mkdir()
    for name in ("a", "b"):
        with pytest.raises(UserError, match=f"preview .*out/{name}.png would replace"):
            mx.submit(job("local", 1, diffuse_step(name, 16, 16, steps=2)), base=str(tmp_path))
        assert not os.path.exists(tmp_path / f"out/{name}.zarr")
    assert (tmp_path / "out/a.png").read_text() == "a user's file"
    (tmp_path / "out/a.png").unlink()
    for _ in range(2):  # the second run replaces mx's own preview
        mx.submit(job("local", 1, diffuse_step("a", 16, 16, steps=2)), base=str(tmp_path))
        with Image.open(tmp_path / "out/a.png") as png:
            assert png.size == (16, 16)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "a.zarr", "b.png"]


def test_non_finite_weights_are_bad_input_refused_before_anything_is_written(tmp_path, rng):
    """Weights holding NaN or infinite values failed the job when its worker loaded them
    (exit 1), after the job was recorded and its output's temporary made. `mx submit` now
    reads the checkpoint first: one line naming the step, the file and the tensor, exit 2,
    no job record and no output folder."""
    from click.testing import CliRunner
    import yaml

    from mx.cli.main import cli

    small_checkpoint(tmp_path / "m.safetensors", rng)
    tensors, meta = safetensors.read(str(tmp_path / "m.safetensors"))
    half = {name: t.astype(np.float16) for name, t in tensors.items()}  # F16, as many ship
    half["final_layer.linear.weight"][1, 2:4] = [np.inf, -np.inf]
    model = tmp_path / "inf.safetensors"
    safetensors.write(str(model), half, meta)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        job("local", 1, diffuse_step("a", 16, 16, model="inf.safetensors", steps=2))))
    result = CliRunner().invoke(cli, ["submit", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"mx: error: steps[0] (id: a).inputs.model: {model}: tensor final_layer.linear.weight "
        f"holds 2 NaN or infinite values; the checkpoint is damaged (or saved from a diverged "
        f"training run): use another one"), result.output
    assert not (tmp_path / "out").exists()
    home = os.environ["MX_HOME"]
    assert not os.path.exists(os.path.join(home, "jobs")) or not os.listdir(os.path.join(home, "jobs"))


def test_non_finite_weights_or_results_are_never_committed(tmp_path, rng):
    from mx.errors import JobFailed

    small_checkpoint(tmp_path / "m.safetensors", rng)
    tensors, meta = safetensors.read(str(tmp_path / "m.safetensors"))
    bad = {**tensors, "blocks.0.attn.qkv.weight": tensors["blocks.0.attn.qkv.weight"].copy()}
    bad["blocks.0.attn.qkv.weight"][3, 5] = np.nan
    safetensors.write(str(tmp_path / "nan.safetensors"), bad, meta)
    with pytest.raises(UserError, match=r"nan.safetensors: tensor blocks.0.attn.qkv.weight holds "
                                        r"1 NaN or infinite value"):
        mx.submit(job("local", 1, diffuse_step("a", 16, 16, model="nan.safetensors", steps=2)),
                  base=str(tmp_path))
    # finite weights so large that the sampler overflows: the result is not committed either
    huge = {**tensors, "final_layer.linear.bias": np.full_like(tensors["final_layer.linear.bias"], 3e38)}
    safetensors.write(str(tmp_path / "huge.safetensors"), huge, meta)
    with pytest.raises(JobFailed, match="NaN or infinite values; nothing is committed"):
        mx.submit(job("local", 1, diffuse_step("a", 16, 16, model="huge.safetensors", steps=2)),
                  base=str(tmp_path))
    assert not os.path.exists(tmp_path / "out")  # nor the folder made for them


def test_an_image_too_large_for_memory_is_refused_when_submitted(tmp_path):
    """A diffuse image too large for its workers' memory failed only at run time (a
    MemoryError in the worker, or the OOM killer). It is now bad input when the job is
    submitted: one line naming the size, the patches and the fix, nothing written."""
    from mx.tasks import plan as planning, spec

    huge = 2**20  # terabytes of activations: no machine has that memory
    with pytest.raises(UserError, match=rf"steps\[0\] \(id: a\).params: height {huge} × width "
                                        rf"{huge} in 1 patch\(es\) needs about .* TiB per worker, "
                                        rf"but .* is there \(this machine's .* shared by 1 "
                                        rf"worker\(s\)\); use fewer pixels \(height, width\)"):
        mx.submit(job("local", 1, diffuse_step("a", huge, huge, steps=1)), base=str(tmp_path))

    # declared memory: 64² in one patch needs more than 48 MiB, in four pcpp patches less
    step = diffuse_step("b", 64, 64, steps=2)
    step["params"]["memory"] = "48MiB"
    with pytest.raises(UserError, match=r"height 64 × width 64 in 1 patch\(es\) needs about "
                                        r".* MiB per worker, but 48.00 MiB is there "
                                        r"\(params.memory\); use fewer pixels \(height, width\), "
                                        r"or more patches and workers \(params.parallel.patches"):
        mx.submit(job("local", 4, step), base=str(tmp_path))
    assert not os.path.exists(tmp_path / "out")
    home = os.environ["MX_HOME"]
    assert not os.path.exists(os.path.join(home, "jobs")) or not os.listdir(os.path.join(home, "jobs"))
    step = diffuse_step("b", 64, 64, "pcpp", steps=2, patches=4, warmup=1)
    step["params"]["memory"] = "48MiB"
    mx.submit(job("local", 4, step), base=str(tmp_path))
    assert image.read(str(tmp_path / "out/b.zarr"))[0].shape == (3, 64, 64)

    # a cluster's memory cannot be seen from here: without params.memory there is no check
    remote = spec.validate(spec.Job, {**job("ray", 1, diffuse_step("a", huge, huge)),
                                      "resources": {"address": "http://10.0.0.1:8265"}})
    assert not planning.runs_here(remote, None)
    assert planning.runs_here(spec.validate(spec.Job, job("local", 1, diffuse_step("a", 8, 8))), None)
