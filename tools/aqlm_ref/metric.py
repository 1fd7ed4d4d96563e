"""Relative layer error used for BOTH implementations in docs/aqlm-reference.md.

    rel = tr(dW H dW^T) / tr(W H W^T),   dW = W - What,

in numpy float64 from the float32 W, H (bench_dump_layers) and the dequantized
What each implementation wrote (bench_aqlm_side_by_side --out, run_ref.py --out).
Only the first What.shape[0] rows of W are used (row subsets).

    python3 metric.py W.npy H.npy What.npy
"""
import sys

import numpy as np


def rel_err(W, H, What):
    """tr(dW H dW^T) / tr(W H W^T) in float64; W (rows, d_in) may have more rows than What."""
    What = np.asarray(What, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)[: What.shape[0]]
    H = np.asarray(H, dtype=np.float64)
    dW = W - What
    num = np.einsum("ij,ij->", dW @ H, dW)
    den = np.einsum("ij,ij->", W @ H, W)
    return float(num / den)


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    W, H, What = (np.load(p) for p in argv[1:4])
    print(f"rel_err {rel_err(W, H, What):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
