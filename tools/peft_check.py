#!/usr/bin/env python3
"""Load an ApiQ model's adapters (`llmvq export --format peft-lora`) with PEFT onto
its base (`llmvq convert --no-lora --to hf`) and compare the logits with llmvq's
own of the model with its adapters (docs/apiq.md).

    peft_check.py --base DIR --adapter DIR --tokens tokens.json --logits logits.f32 [--tol T]

tokens.json and logits.f32 come from tests/hf_aqlm_logits logits --model model.h5
(llmvq's tokenizer and forward pass, What + B A): {"vocab": V, "prompts": [[ids],
...]} and float32 (sum of the prompt lengths, V). Prints the max abs logit
difference per prompt and over all of them, then the same with PEFT's adapters
disabled (the base alone), which must differ from llmvq's by more than
--min-effect x --tol, so that a silently unapplied adapter cannot pass. Exits 1
when a check fails, 2 on a setup problem.
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="HF directory of What (llmvq convert --no-lora)")
    ap.add_argument("--adapter", required=True, help="PEFT directory (llmvq export --format peft-lora)")
    ap.add_argument("--tokens", required=True, help="token ids per prompt (JSON)")
    ap.add_argument("--logits", required=True, help="llmvq's logits, float32 (sum T, V)")
    ap.add_argument("--tol", type=float, default=1e-3, help="max abs logit difference (default 1e-3)")
    ap.add_argument("--min-effect", type=float, default=100.0,
                    help="adapters disabled must differ by more than this x --tol (default 100)")
    args = ap.parse_args()

    try:
        import numpy as np
        import torch
        import transformers
        import peft
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from transformers import LlamaForCausalLM
    except ImportError as e:
        print(f"peft_check: cannot import torch/transformers/peft: {e}", file=sys.stderr)
        return 2

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")

    # transformers >= 4.56 names the argument `dtype`, older ones `torch_dtype`
    try:
        base = LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    except TypeError:
        base = LlamaForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    cfg = model.peft_config["default"]
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not lora:
        print("peft_check: PEFT injected no LoRA layer", file=sys.stderr)
        return 2
    scaling = model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    print(f"{len(lora)} LoRA layers, r {cfg.r}, lora_alpha {cfg.lora_alpha}, scaling {scaling:g}")

    meta = json.load(open(args.tokens))
    V = meta["vocab"]
    ours = np.fromfile(args.logits, dtype="<f4")
    total = sum(len(p) for p in meta["prompts"])
    if ours.size != total * V:
        print(f"peft_check: {args.logits} holds {ours.size} floats, expected {total} x {V}",
              file=sys.stderr)
        return 2
    ours = ours.reshape(total, V)

    worst, off, top, agree, at = 0.0, float("inf"), 0.0, 0, 0
    for i, ids in enumerate(meta["prompts"]):
        x = torch.tensor([ids])
        with torch.no_grad():
            theirs = model(x).logits[0].float().numpy()
            with model.disable_adapter():
                bare = model(x).logits[0].float().numpy()
        mine = ours[at:at + len(ids)]
        at += len(ids)
        d = float(np.max(np.abs(theirs - mine)))
        e = float(np.max(np.abs(bare - mine)))
        agree += int(np.sum(theirs.argmax(-1) == mine.argmax(-1)))
        worst, off, top = max(worst, d), min(off, e), max(top, float(np.max(np.abs(mine))))
        print(f"prompt {i}: {len(ids)} tokens, max abs logit diff {d:.3g} (adapters disabled {e:.3g})")
    print(f"adapters disabled: max abs logit diff at least {off:.3g} per prompt; "
          f"must exceed {args.min_effect:g} x tolerance")
    print(f"max abs logit diff {worst:.3g} over {len(meta['prompts'])} prompts ({total} positions, "
          f"max |logit| {top:.2f}); argmax agrees at {agree}/{total}; tolerance {args.tol:g}")
    if off <= args.min_effect * args.tol:
        print(f"peft_check: the adapters barely matter ({off:.3g}): the check would not see them "
              "unapplied", file=sys.stderr)
        return 1
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
