"""``bt-fast report RUN_DIR``: PNG plots of a run, written to RUN_DIR/report/.

From ``RUN_DIR/metrics.jsonl`` (written by the JSONL sink on rank 0):

- ``throughput.png``: global images/s over steps;
- ``step_time.png``: mean step time per phase, stacked, and the data-wait share;
- ``loss.png``: the loss and whatever named terms the run's method logs (Barlow Twins:
  on-diagonal and off-diagonal; VICReg: invariance, variance, covariance);
- ``dashboard.png``: the four above and the learning rate on one page;
- ``accuracy.png`` (runs with the monitor, bt_fast/monitor.py): kNN and online-linear
  top-1 against wall time and against images seen, over the dashed random-init and
  raw-pixel reference lines.

From ``RUN_DIR/checkpoints/last.pt``, if present and the run is Barlow Twins (skip with
``--no-crosscorr``):

- ``crosscorr.png``: the cross-correlation matrix c of one validation batch, for the
  model at random initialisation (same config and seed) and for the trained model.
  Barlow Twins drives c towards the identity. The two views are drawn with
  torchvision's version of the run's ``views`` recipe (crop, flip, colour jitter,
  grayscale, blur, solarize), not DALI, so the report needs no data pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from pathlib import Path

from bt_fast import safeio
from bt_fast.errors import UsageError
from bt_fast.pipelines.bounds import Range, flag_problem

PHASE_COLORS = {"data_wait": "tab:red", "forward": "tab:blue", "backward": "tab:orange",
                "comm": "tab:purple", "optimizer": "tab:green"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_jsonl(path: Path, key: str = "loss") -> list[dict]:
    """The records holding ``key`` (training logs: loss; monitors: eval_knn_top1), in
    step order; skips torn lines.

    Read as a user's file: undecodable bytes, lines that are not objects and records
    whose step or ``key`` is not a number are skipped, not trusted."""
    records = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # the last line of a killed run may be torn
        if (isinstance(rec, dict) and isinstance(rec.get(key), (int, float))
                and isinstance(rec.get("step"), int) and not isinstance(rec.get("step"), bool)):
            records.append(rec)
    return sorted(records, key=lambda r: r["step"])


def plot_accuracy(evals: list[dict], out: Path) -> Path:
    """Top-1 against wall time and against images seen, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    curves = [k for k in evals[-1] if k.startswith("eval_")]
    for ax, (x_key, x_label, scale) in zip(axes, (("elapsed_s", "wall time (min)", 60.0),
                                                  ("images_seen", "images seen (k)", 1000.0))):
        for key in curves:
            pts = [(r[x_key] / scale, r[key]) for r in evals
                   if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float))]
            label = key.removeprefix("eval_").replace("_top1", "").replace("knn_", "kNN ")
            ax.plot(*zip(*pts), marker="o", label=label if label != "knn" else "kNN (model.readout)")
        for key in (k for k in evals[-1] if k.startswith("baseline_knn_top1_")):
            ax.axhline(evals[-1][key], linestyle="--", color="gray",
                       label=key.removeprefix("baseline_knn_top1_").replace("_", " ", 1))
        ax.set(xlabel=x_label, ylabel="top-1 (%)", title=f"Representation quality vs {x_label.split(' (')[0]}")
        ax.legend(fontsize="small")
    return _save(fig, out / "accuracy.png")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
           and not isinstance(r[key], bool) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _number(value, default: float = 0.0) -> float:
    """A finite number from a log record, ``default`` for anything else (the log is input)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else default


def _phases(records: list[dict]) -> list[str]:
    present = {k[5:-2] for r in records for k in r if k.startswith("time_") and k != "time_step_s"}
    return [p for p in PHASE_COLORS if p in present] + sorted(present - set(PHASE_COLORS))


def plot_throughput(ax, records):
    ax.plot(*_series(records, "images_per_s"), color="tab:blue")
    ax.set(title="Throughput (all ranks)", xlabel="step", ylabel="images/s")
    ax.set_ylim(bottom=0)


def plot_step_time(ax, records):
    steps = [r["step"] for r in records]
    phases = _phases(records)
    ys = [[_number(r.get(f"time_{p}_s")) for r in records] for p in phases]
    if phases:
        ax.stackplot(steps, ys, labels=phases, colors=[PHASE_COLORS.get(p) for p in phases],
                     alpha=0.8)
    ax.set(title="Step-time breakdown (mean per step)", xlabel="step", ylabel="seconds")
    ax.legend(loc="upper left", fontsize="small")


def plot_data_wait(ax, records):
    s, share = _series(records, "data_wait_share")
    ax.plot(s, [100 * v for v in share], color="tab:red")
    ax.set(title="Data-wait share of step time", xlabel="step", ylabel="%", ylim=(0, 100))


def loss_labels(records: list[dict]) -> list[tuple[str, str]]:
    """(record key, plot label): the loss, then every ``loss_<term>`` the run logged,
    labelled in the paper's notation where a method declares it (``Method.terms``)."""
    from bt_fast.methods import METHODS

    known = {f"loss_{t}": label for cls in METHODS.values() for t, label in cls.terms.items()}
    keys = dict.fromkeys(k for r in records for k in r if k.startswith("loss_"))
    return [("loss", "loss")] + [(k, known.get(k, k.removeprefix("loss_"))) for k in keys]


def plot_loss(ax, records):
    for key, label in loss_labels(records):
        s, v = _series(records, key)
        if s:
            ax.plot(s, v, label=label)
    ax.set(title="Loss terms", xlabel="step", yscale="log")
    ax.legend(fontsize="small")


def plot_lr(ax, records):
    for key, label in (("lr", "weights"), ("lr_biases", "biases / BN")):
        s, v = _series(records, key)
        if s:
            ax.plot(s, v, label=label)
    ax.set(title="Learning rate", xlabel="step")
    ax.legend(fontsize="small")


def _save(fig, path: Path, tight: bool = True) -> Path:
    """A figure as PNG through the write gate; closes it."""
    if tight:
        fig.tight_layout()
    safeio.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def metric_plots(records: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, fns in (("throughput", [plot_throughput]), ("step_time", [plot_step_time, plot_data_wait]),
                      ("loss", [plot_loss])):
        fig, axes = plt.subplots(1, len(fns), figsize=(6 * len(fns), 4), squeeze=False)
        for fn, ax in zip(fns, axes[0]):
            fn(ax, records)
        written.append(_save(fig, out / f"{name}.png"))
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for fn, ax in zip((plot_throughput, plot_data_wait, plot_step_time, plot_loss, plot_lr),
                      axes.flat):
        fn(ax, records)
    axes.flat[-1].axis("off")
    last = records[-1]
    axes.flat[-1].text(0, 0.5, "\n".join(
        [title, f"step {last['step']}", f"{_number(last.get('images_per_s'), math.nan):.1f} images/s",
         f"data wait {100 * _number(last.get('data_wait_share'), math.nan):.0f}% of step time",
         f"loss {last['loss']:.4g}"]), fontsize=12, va="center", family="monospace")
    fig.suptitle(f"bt_fast run: {title}")
    written.append(_save(fig, out / "dashboard.png"))
    return written


# ---------------------------------------------------------------- cross-correlation


def validation_views(cfg, val_dir: Path, batch: int, seed: int = 0):
    """Two augmented views [B, 3, H, W] of up to ``batch`` images spread over val_dir."""
    import torch

    from bt_fast import config
    from bt_fast.pipelines import filelist
    from bt_fast.pipelines.images import load_rgb
    from bt_fast.pipelines.spec import expand
    from bt_fast.pipelines.torchvision_recipe import view_transform

    # The checked list when there is one (the read gate: inside the root, DALI's formats);
    # a bare folder otherwise, each file still opened through pipelines/images.py.
    if (val_dir / filelist.FILELIST).is_file():
        files = [val_dir / p for p in filelist.read(val_dir).paths]
    else:
        files = sorted(p for p in val_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise UsageError(f"{val_dir}: need validation images for the cross-correlation "
                         f"(set --val-dir, or --no-crosscorr)")
    files = files[:: max(1, len(files) // batch)][:batch]
    specs = expand(config.resolved_views(cfg))[:2]
    torch.manual_seed(seed)
    random.seed(seed)  # the recipe's blur and solarization draw from Python's RNG
    tfs = [view_transform(s) for s in specs]
    images = [load_rgb(f) for f in files]  # the read gate: pixel limit, DALI's formats
    return [torch.stack([tf(im) for im in images]) for tf in tfs]


def cross_correlations(ckpt_path: Path, val_dir: Path | None, batch: int):
    """(c at random init, c trained, step, D) on one validation batch; c is [D, D].

    None when the run's method does not draw it (``Method.crosscorr``: only Barlow
    Twins' loss is about c).
    """
    import torch

    from bt_fast import checkpoint, config, methods
    from bt_fast.kernels.reference import cross_correlation

    ckpt = checkpoint.load(ckpt_path)
    cfg = config.from_saved(ckpt["config"], str(ckpt_path))
    if not methods.METHODS[cfg.method.name].crosscorr:
        return None
    if not (val_dir or cfg.data.val_dir):  # "" would be Path("."): every image under the cwd
        raise UsageError(f"{ckpt_path}: its config names no data.val_dir; pass --val-dir or --no-crosscorr")
    views = validation_views(cfg, Path(val_dir or cfg.data.val_dir), batch)
    torch.manual_seed(cfg.train.seed)
    model = methods.build(cfg).eval()
    cs = []
    for state in (None, ckpt["model"]):
        if state is not None:
            model.load_state_dict(checkpoint.strip_wrappers(state))
        with torch.no_grad():
            z1, z2 = model(views)
        cs.append(cross_correlation(z1, z2, model.cfg.eps))
    return cs[0], cs[1], int(ckpt["step"]), model.embed_dim


def plot_crosscorr(c_init, c_trained, step: int, out: Path, dims: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    for ax, c, name in ((axes[0], c_init, "random init"), (axes[1], c_trained, f"step {step}")):
        d = c.shape[0]
        off = c[~torch.eye(d, dtype=torch.bool)]
        im = ax.imshow(c[:dims, :dims].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"{name}: mean c_ii {c.diagonal().mean():.2f}, "
                     f"mean |c_ij| {off.abs().mean():.2f}", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"Cross-correlation of two views' embeddings (first {min(dims, c_init.shape[0])} "
                 f"of {c_init.shape[0]} dims); Barlow Twins drives it to the identity")
    return _save(fig, out / "crosscorr.png", tight=False)  # constrained layout already


# ---------------------------------------------------------------- CLI


def default_out(run_dir: Path) -> Path:
    """RUN_DIR/report, or, when the run folder is read-only (another user's run, a
    read-only mount), a folder under the user's cache (bt_fast.safeio.cache_home)."""
    if safeio.writable_dir(run_dir / "report"):
        return run_dir / "report"
    resolved = run_dir.resolve()
    tag = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    out = safeio.cache_home() / "reports" / f"{resolved.name}-{tag}"
    print(f"{run_dir} is read-only: writing the report to {out}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (train.run_dir)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/report)")
    parser.add_argument("--no-crosscorr", action="store_true", help="skip the checkpoint heatmap")
    parser.add_argument("--val-dir", type=Path, default=None,
                        help="validation ImageFolder for the heatmap (default: the run's data.val_dir)")
    parser.add_argument("--batch", type=int, default=256, help="validation images for the heatmap")
    parser.add_argument("--dims", type=int, default=64, help="embedding dims shown in the heatmap")


FLAG_RANGES = {"batch": Range(lo=2, hi=65536), "dims": Range(lo=1, hi=65536)}
"""Valid values of the numeric flags (a heatmap needs at least two images)."""


def run(args) -> int:
    problem = flag_problem(args, FLAG_RANGES)
    if problem:
        raise UsageError(problem)
    jsonl = args.run_dir / "metrics.jsonl"
    if not jsonl.is_file():
        raise UsageError(f"{jsonl}: not found; is {args.run_dir} a run folder?")
    records = read_jsonl(jsonl)
    if not records:
        raise UsageError(f"{jsonl}: no training records yet")
    out = safeio.make_dir(args.out or default_out(args.run_dir))
    written = metric_plots(records, out, args.run_dir.name)
    evals = read_jsonl(jsonl, "eval_knn_top1")
    if evals:
        written.append(plot_accuracy(evals, out))
    ckpt = args.run_dir / "checkpoints" / "last.pt"
    if not args.no_crosscorr:
        if ckpt.is_file():
            found = cross_correlations(ckpt, args.val_dir, args.batch)
            if found is None:
                print("this run's method is not Barlow Twins: no cross-correlation heatmap")
            else:
                c0, c1, step, _ = found
                written.append(plot_crosscorr(c0, c1, step, out, args.dims))
        else:
            print(f"no {ckpt}: skipping the cross-correlation heatmap")
    for path in written:
        print(path)
    return 0
