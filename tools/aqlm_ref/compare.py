"""Side-by-side driver: for each LAYER:CONFIG and thread count, run our
bench_aqlm_side_by_side and the reference (run_ref.py) on the same .npy files
and print one markdown table row per run (docs/aqlm-reference.md).

    python compare.py --data DIR --ref REF_DIR --bench BUILD/bench_aqlm_side_by_side \
        [--threads 1,2] [--rows N] [--ours-args "..."] [--ref-args "..."] \
        b0_wq:1x8g4 b2_w1:2x8g8 ...

LAYER names DIR/LAYER.W.npy and DIR/LAYER.H.npy (bench_dump_layers). Both
relative errors come from metric.py (numpy float64) on the dequantized weights
each side wrote. When g does not divide d_in the reference gets --pad (zero
columns, zero Hessian rows/columns: our padding rule) and the row says so.
Ours runs with OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = threads, the reference
with torch.set_num_threads(threads) and OMP/MKL_NUM_THREADS = threads. Load is
the 1-minute load average before / after each pair of runs.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from metric import rel_err  # noqa: E402


def field(line, name):
    m = re.search(r"\b%s (\S+)" % re.escape(name), line)
    return m.group(1) if m else "?"


def run(cmd, env=None):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"compare: failed: {shlex.join(cmd)}")
    sys.stderr.write(p.stdout)
    return p.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--ours-args", default="")
    ap.add_argument("--ref-args", default="")
    ap.add_argument("--skip-ref", action="store_true", help="ours only")
    ap.add_argument("cases", nargs="+")
    a = ap.parse_args()
    print("| layer | d_out x d_in | config | threads | ours rel | ref rel | ours s | ref s | ours/ref time "
          "| ours iters | ref epochs | load before/after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in a.cases:
        layer, cfg = case.split(":")
        wp, hp = (os.path.join(a.data, f"{layer}.{t}.npy") for t in ("W", "H"))
        W, H = np.load(wp), np.load(hp)
        g = int(cfg.split("g")[1])
        rows = a.rows if 0 < a.rows < W.shape[0] else W.shape[0]
        pad = W.shape[1] % g != 0
        for t in (int(x) for x in a.threads.split(",")):
            load0 = os.getloadavg()[0]
            env = dict(os.environ, OMP_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t))
            tag = f"{layer}_{cfg}_t{t}"
            o_out = os.path.join(a.data, f"out_{tag}_ours.npy")
            cmd = [a.bench, wp, hp, cfg, "--out", o_out] + shlex.split(a.ours_args)
            if a.rows:
                cmd += ["--rows", str(a.rows)]
            o = run(cmd, env)
            o_rel = rel_err(W, H, np.load(o_out))
            if a.skip_ref:
                r, r_rel = "", float("nan")
            else:
                r_out = os.path.join(a.data, f"out_{tag}_ref.npy")
                cmd = [sys.executable, os.path.join(HERE, "run_ref.py"), a.ref, wp, hp, cfg, "--threads", str(t),
                       "--out", r_out] + shlex.split(a.ref_args)
                if a.rows:
                    cmd += ["--rows", str(a.rows)]
                if pad:
                    cmd.append("--pad")
                r = run(cmd)
                r_rel = rel_err(W, H, np.load(r_out))
            load1 = os.getloadavg()[0]
            o_s = float(field(o, "wall_s"))
            r_s = float(field(r, "wall_s")) if r else float("nan")
            shape = f"{rows} x {W.shape[1]}" + (" (ref padded)" if pad and r else "")
            print(f"| {layer} | {shape} | {cfg} | {t} | {o_rel:.5f} | {r_rel:.5f} | {o_s:.2f} | {r_s:.2f} "
                  f"| {o_s / r_s:.3f} | {field(o, 'iters')} | {field(r, 'epochs') if r else '-'} "
                  f"| {load0:.1f} / {load1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
