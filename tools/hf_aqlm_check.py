#!/usr/bin/env python3
"""Load an `llmvq export --format hf-aqlm` directory with transformers + aqlm and
compare its logits with llmvq's own (docs/formats-hf-aqlm.md).

    hf_aqlm_check.py --model DIR --tokens tokens.json --logits logits.f32 [--tol T]

tokens.json and logits.f32 come from tests/hf_aqlm_logits (llmvq's tokenizer and
forward pass): {"vocab": V, "prompts": [[ids], ...]} and float32 (sum of the
prompt lengths, V). Prints the max abs logit difference per prompt and over all
of them; exits 1 when it exceeds --tol, 2 on a setup problem.

aqlm's CPU kernel for 8-bit codebooks (numba) adds into one output vector from
parallel loop iterations, so its sums depend on the thread schedule; unless
NUMBA_NUM_THREADS is set, it runs on one thread here for a reproducible result.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("NUMBA_NUM_THREADS", "1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF AQLM directory written by llmvq export")
    ap.add_argument("--tokens", required=True, help="token ids per prompt (JSON)")
    ap.add_argument("--logits", required=True, help="llmvq's logits, float32 (sum T, V)")
    ap.add_argument("--tol", type=float, default=1e-3, help="max abs logit difference (default 1e-3)")
    args = ap.parse_args()

    try:
        import numpy as np
        import torch
        import transformers
        import aqlm
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"hf_aqlm_check: cannot import torch/transformers/aqlm: {e}", file=sys.stderr)
        return 2
    from importlib.metadata import version

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"aqlm {version('aqlm')}, numba {version('numba')}")

    # transformers >= 4.56 names the argument `dtype`, older ones `torch_dtype`;
    # float32 because aqlm's CPU kernels need it.
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    qlin = model.model.layers[0].self_attn.q_proj
    if not isinstance(qlin, aqlm.QuantizedLinear):
        print(f"hf_aqlm_check: q_proj is {type(qlin).__name__}, not aqlm.QuantizedLinear: "
              "the quantization_config was not applied", file=sys.stderr)
        return 2
    if isinstance(model.lm_head, aqlm.QuantizedLinear):
        print("hf_aqlm_check: lm_head was replaced by aqlm.QuantizedLinear: "
              "linear_weights_not_to_quantize was not honoured", file=sys.stderr)
        return 2

    meta = json.load(open(args.tokens))
    V = meta["vocab"]
    ours = np.fromfile(args.logits, dtype="<f4")
    total = sum(len(p) for p in meta["prompts"])
    if ours.size != total * V:
        print(f"hf_aqlm_check: {args.logits} holds {ours.size} floats, expected {total} x {V}",
              file=sys.stderr)
        return 2
    ours = ours.reshape(total, V)

    worst, top, agree, at = 0.0, 0.0, 0, 0
    for i, ids in enumerate(meta["prompts"]):
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].float().numpy()
        mine = ours[at:at + len(ids)]
        at += len(ids)
        d = float(np.max(np.abs(theirs - mine)))
        agree += int(np.sum(theirs.argmax(-1) == mine.argmax(-1)))
        worst, top = max(worst, d), max(top, float(np.max(np.abs(mine))))
        print(f"prompt {i}: {len(ids)} tokens, max abs logit diff {d:.3g}")
    print(f"max abs logit diff {worst:.3g} over {len(meta['prompts'])} prompts ({total} positions, "
          f"max |logit| {top:.2f}); argmax agrees at {agree}/{total}; tolerance {args.tol:g}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
