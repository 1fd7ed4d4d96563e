#!/usr/bin/env bash
# Bad inputs to `llmvq eval` give one clear error line naming the file and the
# problem, exit status 1, and no crash (the suite also runs under ASan/UBSan).
. "$(dirname "$0")/lib.sh"
M=$LLMVQ_DEMO_DIR/stories260K.bin
TOK=$LLMVQ_DEMO_DIR/tok512.bin
TXT=$T/text.txt
printf 'Once upon a time, there was a little cat.\n' >"$TXT"
PY=$(command -v python3)

ev() { "$LLMVQ_BIN" eval --quiet --tokenizer "$TOK" --data "$TXT" --model "$@"; }

# .bin checkpoints
head -c 500000 "$M" >"$T/trunc.bin"
expect_error "truncated .bin" "trunc.bin.*(size|truncated|bytes)" ev "$T/trunc.bin"
head -c 20 "$M" >"$T/short.bin"
expect_error "header-only .bin" "short.bin" ev "$T/short.bin"
{ printf '\xff\xff\xff\xff'; tail -c +5 "$M"; } >"$T/negdim.bin"
expect_error "negative dim in .bin header" "negdim.bin" ev "$T/negdim.bin"
expect_error "missing model" "nonexistent.bin" ev "$T/nonexistent.bin"
"$PY" - "$M" "$T/nan.bin" <<'PYEOF'
import sys, struct
b = bytearray(open(sys.argv[1], 'rb').read())
struct.pack_into('<f', b, 28 + 4 * 40000, float('nan'))
open(sys.argv[2], 'wb').write(b)
PYEOF
expect_error "NaN in .bin weights" "nan.bin.*NaN" ev "$T/nan.bin"

# HF directories, made by convert and then damaged
"$LLMVQ_BIN" convert --model "$M" --to hf --out "$T/hf" 2>/dev/null || bad "convert failed"
cp "$TOK" "$T/hf/tok512.bin"
mkhf() { rm -rf "$T/$1"; cp -r "$T/hf" "$T/$1"; }
ST=model.safetensors

mkhf trunc; f=$T/trunc/$ST; head -c $(( $(stat -c %s "$f") - 1000 )) "$f" >"$f.x"; mv "$f.x" "$f"
expect_error "truncated safetensors" "trunc/model.safetensors" ev "$T/trunc"

mkhf hdrlen; "$PY" - "$T/hdrlen/$ST" <<'PYEOF'
import sys, struct
p = sys.argv[1]; b = bytearray(open(p, 'rb').read())
struct.pack_into('<Q', b, 0, len(b) * 4)
open(p, 'wb').write(b)
PYEOF
expect_error "header length past end of file" "hdrlen/model.safetensors" ev "$T/hdrlen"

mkhf garbage; "$PY" - "$T/garbage/$ST" <<'PYEOF'
import sys
p = sys.argv[1]; b = bytearray(open(p, 'rb').read())
b[8:40] = b'{"this is": not json at all!!!!!'
open(p, 'wb').write(b)
PYEOF
expect_error "header JSON garbage" "garbage/model.safetensors.*(JSON|json)" ev "$T/garbage"

# rewrite_header DIR PYTHON-EXPR-ON-h: edit the safetensors header dict h
rewrite_header() {
  "$PY" - "$1/$ST" "$2" <<'PYEOF'
import sys, json, struct
p, expr = sys.argv[1], sys.argv[2]
b = open(p, 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
h = json.loads(b[8:8 + n]); data = b[8 + n:]
exec(expr)
s = json.dumps(h).encode(); s += b' ' * ((8 - len(s) % 8) % 8)
open(p, 'wb').write(struct.pack('<Q', len(s)) + s + data)
PYEOF
}
mkhf offsets; rewrite_header "$T/offsets" "t=h['model.norm.weight']; t['data_offsets']=[len(data)-4, len(data)+252]"
expect_error "data offsets past end of file" "offsets/model.safetensors.*model.norm.weight" ev "$T/offsets"

mkhf missing; rewrite_header "$T/missing" "del h['model.layers.2.mlp.up_proj.weight']"
expect_error "missing tensor" "missing.*model.layers.2.mlp.up_proj.weight" ev "$T/missing"

mkhf dtype; rewrite_header "$T/dtype" "h['model.layers.0.self_attn.q_proj.weight']['dtype']='I8'"
expect_error "wrong dtype" "dtype.*(I8|dtype)" ev "$T/dtype"

mkhf shape; "$PY" - "$T/shape/config.json" <<'PYEOF'
import sys, json
p = sys.argv[1]; c = json.load(open(p)); c['intermediate_size'] = 200
json.dump(c, open(p, 'w'))
PYEOF
expect_error "shape mismatch with config.json" "shape.*(shape|expected)" ev "$T/shape"

mkhf nocfg; echo '{"hidden_size": 64,' >"$T/nocfg/config.json"
expect_error "config.json garbage" "nocfg/config.json" ev "$T/nocfg"

# data files
: >"$T/empty.txt"
expect_error "empty text" "empty.txt.*empty" "$LLMVQ_BIN" eval --quiet --model "$M" --tokenizer "$TOK" --data "$T/empty.txt"
expect_error "missing text" "nothere.txt" "$LLMVQ_BIN" eval --quiet --model "$M" --tokenizer "$TOK" --data "$T/nothere.txt"
mkdir "$T/adir"
expect_error "directory as text" "adir" "$LLMVQ_BIN" eval --quiet --model "$M" --tokenizer "$TOK" --data "$T/adir"
head -c 100 "$TOK" >"$T/tok.bin"
expect_error "truncated tokenizer" "tok.bin" "$LLMVQ_BIN" eval --quiet --model "$M" --tokenizer "$T/tok.bin" --data "$TXT"
expect_error "ctx beyond seq_len" "ctx|seq_len" "$LLMVQ_BIN" eval --quiet --model "$M" --tokenizer "$TOK" --data "$TXT" --ctx 4096

# usage errors exit 2
rc=0; "$LLMVQ_BIN" eval --model "$M" --bogus 1 >/dev/null 2>&1 || rc=$?
[ "$rc" -eq 2 ] && ok "unknown option exits 2" || bad "unknown option exits $rc"
rc=0; "$LLMVQ_BIN" frobnicate >/dev/null 2>&1 || rc=$?
[ "$rc" -eq 2 ] && ok "unknown command exits 2" || bad "unknown command exits $rc"

finish
