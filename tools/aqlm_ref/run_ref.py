"""Run the AQLM reference (github.com/Vahe1994/AQLM, its AQEngine.quantize, the
per-layer loop of its main.py) on one layer from .npy files, on the CPU.

Nothing of the reference is copied here: its checkout is only put on sys.path
and imported. Its files are not modified; timing wrappers are installed around
three of its methods at run time (init, beam search) to split the wall time.

    python run_ref.py REF_DIR W.npy H.npy MxBgG [options]

Options mirror bench_aqlm_side_by_side (docs/aqlm-reference.md, "Config mapping"):
  --rows N         first N rows of W, full H (default: all)
  --beam N         beam_size (8)
  --iters N        max_epochs = our max alternations (10)
  --rel-tol X      relative_mse_tolerance = our rel_tol (0.01)
  --steps N        steps_per_epoch = our adam_steps (100)
  --lr X           Adam lr (1e-4, main.py's default; codebooks are in units of
                   L2-normalised rows, so ours 1e-3 corresponds to 1e-3 / sqrt(d_in))
  --init-iters N   init_max_iter of the residual k-means (100, main.py's default)
  --threads N      torch.set_num_threads / OMP_NUM_THREADS / MKL_NUM_THREADS (1)
  --seed N         python random + torch seed (1)
  --pad            zero-pad d_in to a multiple of g (zero W columns and zero H
                   rows/columns, our padding rule); the reference asserts
                   d_in % in_group_size == 0 otherwise
  --out PATH       write the dequantized weight (rows, d_in) as float32 .npy

Prints one line with rows, config, bits per weight (the reference's
estimate_nbits_per_parameter), relative error after the init and at the end
(metric.py, numpy float64, identical to what is used for ours), epochs, seconds
(all, init, Adam, beam search), seconds per row, threads and load average.
"""
import argparse
import contextlib
import io
import os
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref_dir")
    ap.add_argument("w")
    ap.add_argument("h")
    ap.add_argument("config")
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rel-tol", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--init-iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pad", action="store_true")
    ap.add_argument("--out")
    return ap.parse_args()


def main():
    a = parse()
    # thread counts must be fixed before torch is imported
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference draws progress bars
    import random

    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from metric import rel_err

    sys.path.insert(0, os.path.abspath(a.ref_dir))
    import aq_engine  # noqa: E402  (the reference's module)
    from src import aq  # noqa: E402

    torch.set_num_threads(a.threads)
    M, rest = a.config.split("x")
    B, g = rest.split("g")
    M, B, g = int(M), int(B), int(g)

    W = np.load(a.w)
    H = np.load(a.h)
    rows = a.rows if 0 < a.rows < W.shape[0] else W.shape[0]
    W = np.ascontiguousarray(W[:rows])
    d_in = W.shape[1]
    d_pad = (d_in + g - 1) // g * g
    if d_pad != d_in:
        if not a.pad:
            sys.exit(f"run_ref: d_in {d_in} is not a multiple of g {g}; pass --pad")
        Wp = np.zeros((rows, d_pad), np.float32)
        Wp[:, :d_in] = W
        Hp = np.zeros((d_pad, d_pad), np.float32)
        Hp[:d_in, :d_in] = H
    else:
        Wp, Hp = W, H

    random.seed(a.seed)
    torch.manual_seed(a.seed)

    layer = torch.nn.Linear(d_pad, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(Wp))
    engine = aq_engine.AQEngine(layer)  # XTX buffer float64, as main.py accumulates it
    with torch.no_grad():
        engine.XTX.copy_(torch.from_numpy(Hp).double())

    # timing wrappers (the reference's code runs unchanged inside them)
    times = {"init": 0.0, "beam": 0.0, "metric": 0.0}
    hist = []
    orig_init = aq.QuantizedWeight.__init__
    orig_beam = aq_engine.AQEngine.beam_search_update_codes_

    def dequant():
        with torch.no_grad():
            return engine.quantized_weight().detach().float().numpy()[:, :d_in]

    def timed_init(self, *args, **kw):
        t = time.perf_counter()
        orig_init(self, *args, **kw)
        times["init"] += time.perf_counter() - t

    def timed_beam(self, *args, **kw):
        t = time.perf_counter()
        r = orig_beam(self, *args, **kw)
        times["beam"] += time.perf_counter() - t
        t = time.perf_counter()
        hist.append(rel_err(W, H, dequant()))  # not counted: our side logs this for free
        times["metric"] += time.perf_counter() - t
        return r

    aq.QuantizedWeight.__init__ = timed_init
    aq_engine.QuantizedWeight.__init__ = timed_init
    aq_engine.AQEngine.beam_search_update_codes_ = timed_beam

    args = argparse.Namespace(
        devices=[torch.device("cpu")],
        out_group_size=1,
        in_group_size=g,
        num_codebooks=M,
        nbits_per_codebook=B,
        codebook_value_nbits=16,
        codebook_value_num_groups=1,
        scale_nbits=0,
        init_max_iter=a.init_iters,
        init_max_points_per_centroid=None,
        lr=a.lr,
        max_epochs=a.iters,
        relative_mse_tolerance=a.rel_tol,
        steps_per_epoch=a.steps,
        beam_size=a.beam,
        print_frequency=10**9,
    )
    # rel err right after the init: taken when quantize() builds its Adam
    # optimizer, which it does once, between the init and the first step.
    init_rel = []
    orig_adam = torch.optim.Adam

    def adam_hook(*pa, **kw):
        t = time.perf_counter()
        init_rel.append(rel_err(W, H, dequant()))
        times["metric"] += time.perf_counter() - t
        return orig_adam(*pa, **kw)

    aq_engine.torch.optim.Adam = adam_hook
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # per-epoch loss prints
        qw = engine.quantize(args=args, verbose=False)
    wall = time.perf_counter() - t0 - times["metric"]
    aq_engine.torch.optim.Adam = orig_adam
    What = dequant()
    rel = rel_err(W, H, What)
    load = os.getloadavg()[0]
    adam_s = wall - times["init"] - times["beam"]
    print(
        f"ref rows {rows} d_in {d_in}{' (padded to %d)' % d_pad if d_pad != d_in else ''} "
        f"{a.config} beam {a.beam} bpw {qw.estimate_nbits_per_parameter():.4f} "
        f"rel_init {init_rel[0] if init_rel else float('nan'):.6f} rel {rel:.6f} "
        f"epochs {len(hist)} wall_s {wall:.2f} init_s {times['init']:.2f} adam_s {adam_s:.2f} "
        f"beam_s {times['beam']:.2f} s_per_row {wall / rows:.4g} threads {a.threads} load {load:.2f} "
        f"torch {torch.__version__}"
    )
    print("ref rel_err per epoch:", " ".join(f"{x:.6f}" for x in hist))
    if a.out:
        np.save(a.out, np.ascontiguousarray(What, dtype=np.float32))


if __name__ == "__main__":
    main()
