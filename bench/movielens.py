"""Matrix completion on real ratings: MovieLens 100K, held-out RMSE beside published figures.

mx's ``complete`` op (a real job per fit) on the 100,000 ratings of 943 users × 1682 movies,
under the protocol of Surprise's published benchmark: 5-fold cross-validation, RMSE on each
fold's held-out ratings. The model is a baseline plus a low-rank residual, the model of
Surprise's "SVD": the global mean and regularised user and item biases (fitted here with a few
alternating passes, as Surprise's BaselineOnly does), then mx completes the residuals at rank k
with ridge ``reg``. A rating whose user or movie is not in the fold's training part is predicted
by the baseline alone. ``rank`` and ``reg`` are chosen on a validation split of the first
fold's training part only: the test folds never inform a choice.

The ratings come from any file holding them: GroupLens's ``u.data`` (tab-separated user, item,
rating, time), or RecBole's copy ``ml-100k.inter``, which its wheel ships, read from inside
the wheel:

    pip download --no-deps recbole==1.2.1 -d /tmp/rb
    python bench/movielens.py --ratings /tmp/rb/recbole-1.2.1-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

import numpy as np
import scipy.sparse as sp
import zarr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mx  # noqa: E402
from mx.storage import sparse  # noqa: E402

# Surprise's README, "Benchmarks", Movielens 100k, 5-fold cross-validation, default parameters
PUBLISHED = {"Surprise SVD (biased MF, SGD)": 0.934, "Surprise SVD++": 0.919,
             "Surprise NMF": 0.963, "Surprise BaselineOnly": 0.944, "Surprise k-NN Baseline": 0.931}


def load(path: str) -> np.ndarray:
    """(user, item, rating) rows from u.data, ml-100k.inter, or a wheel holding the latter."""
    if path.endswith(".whl") or path.endswith(".zip"):
        with zipfile.ZipFile(path) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith("ml-100k.inter"))
            text = wheel.read(name).decode()
    else:
        with open(path) as f:
            text = f.read()
    lines = [line for line in text.splitlines() if line and not line.startswith("user_id")]
    table = np.loadtxt(io.StringIO("\n".join(lines)), delimiter="\t", usecols=(0, 1, 2))
    _, users = np.unique(table[:, 0], return_inverse=True)
    _, items = np.unique(table[:, 1], return_inverse=True)
    return np.stack([users, items, table[:, 2]], axis=1)


def folds(n: int, count: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), count)


def baseline(train: np.ndarray, users: int, items: int, reg_u=15.0, reg_i=10.0, passes=10):
    """Global mean and regularised user and item biases (alternating least squares)."""
    u, i, r = train[:, 0].astype(int), train[:, 1].astype(int), train[:, 2]
    mu = r.mean()
    bu, bi = np.zeros(users), np.zeros(items)
    for _ in range(passes):
        bi = np.bincount(i, r - mu - bu[u], items) / (reg_i + np.bincount(i, minlength=items))
        bu = np.bincount(u, r - mu - bi[i], users) / (reg_u + np.bincount(u, minlength=users))
    return lambda uu, ii: mu + bu[uu] + bi[ii]


def fit(train: np.ndarray, folder: str, rank: int, reg: float, method: str, seed: int):
    """mx's complete op on the residuals of the baseline; returns a predictor of ratings."""
    users, items = int(train[:, 0].max()) + 1, int(train[:, 1].max()) + 1
    base = baseline(train, users, items)
    u, i = train[:, 0].astype(int), train[:, 1].astype(int)
    # mx needs every row and column observed: fit on the users and movies this part holds
    ru, rows = np.unique(u, return_inverse=True)
    ci, cols = np.unique(i, return_inverse=True)
    residual = train[:, 2] - base(u, i)
    observed = sp.csr_array((residual, (rows, cols)), shape=(ru.size, ci.size))
    obs_path, out_path = os.path.join(folder, "observed.zarr"), os.path.join(folder, "factors.zarr")
    for path in (obs_path, out_path):
        shutil.rmtree(path, ignore_errors=True)
    sparse.write_csr(obs_path, observed)
    job = {"name": "movielens", "backend": "local", "resources": {"workers": 1},
           "steps": [{"id": "f", "op": "complete", "inputs": {"observed": obs_path},
                      "output": out_path,
                      "params": {"rank": rank, "method": method, "reg": reg, "holdout": 0.0,
                                 "max_iters": 40, "tol": 1e-9, "seed": seed}}]}
    t0 = time.perf_counter()
    mx.submit(job, base=folder)
    seconds = time.perf_counter() - t0
    group = zarr.open_group(store=out_path, mode="r")
    uf, vf = np.asarray(group["u"][...]), np.asarray(group["v"][...])
    sweeps = len(group.attrs["history"])

    def predict(test: np.ndarray) -> np.ndarray:
        tu, ti = test[:, 0].astype(int), test[:, 1].astype(int)
        guess = np.full(len(test), train[:, 2].mean())
        ok = (tu < users) & (ti < items)
        guess[ok] = base(tu[ok], ti[ok])
        # the low-rank part where both the user and the movie were fitted
        r, c = np.searchsorted(ru, tu), np.searchsorted(ci, ti)
        fitted = (r < ru.size) & (c < ci.size)
        fitted[fitted] &= (ru[r[fitted]] == tu[fitted]) & (ci[c[fitted]] == ti[fitted])
        guess[fitted] += (uf[r[fitted]] * vf[c[fitted]]).sum(axis=1)
        return np.clip(guess, 1.0, 5.0)  # ratings are 1..5

    return predict, seconds, sweeps


def rmse(predict, test: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predict(test) - test[:, 2]) ** 2)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratings", required=True, help="u.data, ml-100k.inter, or a wheel holding it")
    ap.add_argument("--ranks", default="5,10,20,40")
    ap.add_argument("--regs", default="3,10,20,40")
    ap.add_argument("--methods", default="als,altmin-sketch,als-cg")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="movielens.json")
    args = ap.parse_args(argv)
    data = load(args.ratings)
    print(f"{len(data)} ratings, {int(data[:, 0].max()) + 1} users × {int(data[:, 1].max()) + 1} "
          f"movies", flush=True)
    parts = folds(len(data), args.folds, args.seed)
    folder = tempfile.mkdtemp(prefix="mx-movielens-")
    os.environ.setdefault("MX_HOME", os.path.join(folder, "mx-home"))

    # choose rank and reg on a validation split of the first fold's training part (exact ALS)
    train0 = data[np.concatenate(parts[1:])]
    inner = folds(len(train0), 10, args.seed + 1)
    fit_part, valid = train0[np.concatenate(inner[1:])], train0[inner[0]]
    grid = []
    for rank, reg in itertools.product(map(int, args.ranks.split(",")), map(float, args.regs.split(","))):
        predict, _, _ = fit(fit_part, folder, rank, reg, "als", args.seed)
        grid.append({"rank": rank, "reg": reg, "valid_rmse": rmse(predict, valid)})
        print(f"  validation: rank {rank:3d} reg {reg:5g}: RMSE {grid[-1]['valid_rmse']:.4f}", flush=True)
    best = min(grid, key=lambda g: g["valid_rmse"])
    print(f"chosen on validation: rank {best['rank']}, reg {best['reg']:g}", flush=True)

    results = {"baseline only": []}
    for f, test_idx in enumerate(parts):
        train = data[np.concatenate([p for g, p in enumerate(parts) if g != f])]
        test = data[test_idx]
        users, items = int(train[:, 0].max()) + 1, int(train[:, 1].max()) + 1
        base = baseline(train, users, items)
        tu, ti = test[:, 0].astype(int), test[:, 1].astype(int)
        ok = (tu < users) & (ti < items)
        guess = np.full(len(test), train[:, 2].mean())
        guess[ok] = base(tu[ok], ti[ok])
        results["baseline only"].append({"rmse": float(np.sqrt(np.mean((np.clip(guess, 1, 5) - test[:, 2]) ** 2)))})
        for method in args.methods.split(","):
            predict, seconds, sweeps = fit(train, folder, best["rank"], best["reg"], method, args.seed)
            results.setdefault(method, []).append({"rmse": rmse(predict, test), "seconds": seconds,
                                                   "sweeps": sweeps})
            print(f"  fold {f + 1}: {method:14s} RMSE {results[method][-1]['rmse']:.4f} "
                  f"({sweeps} sweeps, {seconds:.1f} s job)", flush=True)
    summary = {name: float(np.mean([r["rmse"] for r in rows])) for name, rows in results.items()}
    with open(args.out, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:],
                            "ratings": len(data)}, "grid": grid, "chosen": best,
                   "folds": results, "mean_rmse": summary, "published": PUBLISHED}, f, indent=1)
    print(f"\nMovieLens 100K, {args.folds}-fold cross-validation, held-out RMSE (lower is better)")
    for name, value in summary.items():
        print(f"  mx {name:16s} {value:.4f}")
    for name, value in PUBLISHED.items():
        print(f"  {name:30s} {value:.3f}  (published)")


if __name__ == "__main__":
    main()
