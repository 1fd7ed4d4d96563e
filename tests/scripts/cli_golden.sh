#!/usr/bin/env bash
# Golden values of the real stories260K model through the llmvq program:
# perplexity on the TinyStories validation text (../shared/data/README.md:
# 4.742), the same through the converted HF form, the greedy sample, --json.
. "$(dirname "$0")/lib.sh"
M=$LLMVQ_DEMO_DIR/stories260K.bin
TOK=$LLMVQ_DEMO_DIR/tok512.bin
TXT=$LLMVQ_DEMO_DIR/tinystories_val_subset.txt
PY=$(command -v python3)

json_get() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

if "$LLMVQ_BIN" eval --quiet --json --model "$M" --tokenizer "$TOK" --data "$TXT" --ctx 512 >"$T/bin.json"; then
  ppl=$(json_get "$T/bin.json" ppl)
  if "$PY" -c "import sys; p=float(sys.argv[1]); sys.exit(0 if abs(p/4.742-1) < 0.005 else 1)" "$ppl"; then
    ok "stories260K ppl $ppl within 0.5 % of 4.742"
  else
    bad "stories260K ppl $ppl not within 0.5 % of 4.742"
  fi
  for k in nll n_tokens ctx; do json_get "$T/bin.json" $k >/dev/null 2>&1 && ok "--json has $k" || bad "--json lacks $k"; done
else
  bad "eval of stories260K failed: $(cat "$T/bin.json")"
fi

# Default tokenizer discovery (tok512.bin beside the model) and default ctx (= seq_len 512).
if "$LLMVQ_BIN" eval --quiet --json --model "$M" --data "$TXT" --max-tokens 3000 >"$T/def.json"; then
  [ "$(json_get "$T/def.json" ctx)" = 512 ] && ok "default ctx is seq_len 512" || bad "default ctx $(json_get "$T/def.json" ctx)"
  [ "$(json_get "$T/def.json" n_tokens)" = 3000 ] && ok "--max-tokens 3000" || bad "--max-tokens gave $(json_get "$T/def.json" n_tokens)"
else
  bad "eval with default tokenizer failed"
fi

# The converted HF directory gives the same perplexity (logits agree to 1e-4: see test_io_logits).
if "$LLMVQ_BIN" convert --model "$M" --to hf --out "$T/hf" 2>/dev/null \
   && "$LLMVQ_BIN" eval --quiet --json --model "$T/hf" --tokenizer "$TOK" --data "$TXT" --ctx 512 >"$T/hf.json"; then
  a=$(json_get "$T/bin.json" ppl); b=$(json_get "$T/hf.json" ppl)
  "$PY" -c "import sys; a,b=map(float,sys.argv[1:]); sys.exit(0 if abs(a-b) <= 1e-4*a else 1)" "$a" "$b" \
    && ok "HF form ppl $b equals .bin ppl $a" || bad "HF form ppl $b differs from .bin ppl $a"
else
  bad "convert + eval of the HF form failed"
fi

# Greedy sample from BOS (data/README.md, llama2.c doc/stories260K.md).
want="Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."
"$LLMVQ_BIN" generate --model "$M" --tokenizer "$TOK" --temperature 0 --steps 256 >"$T/gen.txt" 2>/dev/null
if grep -qF "$want" "$T/gen.txt" && [ "$(head -c ${#want} "$T/gen.txt")" = "$want" ]; then
  ok "greedy sample matches the documented text"
else
  bad "greedy sample differs: $(head -c 200 "$T/gen.txt")"
fi
# Same seed, same text; --help works.
"$LLMVQ_BIN" generate --model "$M" --seed 7 --steps 64 >"$T/s1.txt" 2>/dev/null
"$LLMVQ_BIN" generate --model "$M" --seed 7 --steps 64 >"$T/s2.txt" 2>/dev/null
cmp -s "$T/s1.txt" "$T/s2.txt" && [ -s "$T/s1.txt" ] && ok "sampling is deterministic per seed" || bad "sampling differs for one seed"
"$LLMVQ_BIN" eval --help | grep -q -- '--ctx' && ok "eval --help" || bad "eval --help"

# docs/jobfile.md carries the schema's key table as --help-keys prints it
if [ -n "${LLMVQ_SOURCE_DIR:-}" ]; then
  "$LLMVQ_BIN" quantize --help-keys >"$T/keys.md" 2>&1
  missing=$(grep -vxF -f "$LLMVQ_SOURCE_DIR/docs/jobfile.md" "$T/keys.md" | head -n 3)
  [ -z "$missing" ] && ok "docs/jobfile.md has every --help-keys row" \
    || bad "docs/jobfile.md is stale (regenerate its table from quantize --help-keys): $missing"
fi

# synth writes a model that loads and evaluates (random weights: ppl near vocab size).
if "$LLMVQ_BIN" synth --preset stories260K --out "$T/synth.bin" --seed 3 2>/dev/null \
   && "$LLMVQ_BIN" eval --quiet --json --model "$T/synth.bin" --tokenizer "$TOK" --data "$TXT" --max-tokens 2000 >"$T/synth.json"; then
  p=$(json_get "$T/synth.json" ppl)
  "$PY" -c "import sys; p=float(sys.argv[1]); sys.exit(0 if 300 < p < 800 else 1)" "$p" \
    && ok "synthetic model ppl $p near vocab 512" || bad "synthetic model ppl $p"
else
  bad "synth + eval failed"
fi
finish
