#!/usr/bin/env bash
# quant.share_codebooks = model (the demo job's mode): byte-identical model on
# 1 process and 2 or 3 MPI ranks; resume after losing block files reuses the
# checkpointed shared AQLM step and gives the same bytes; a corrupt
# shared_aqlm.h5 is reported and recomputed; sharing with quantized
# propagation is refused naming the keys (quantize_shared_type.sh: the same for
# quant.share_codebooks = type).
. "$(dirname "$0")/lib.sh"
shared_small_ref && ok "1 process" || bad "1 process failed: $(tail -n 3 "$T/log1")"
for np in 2 3; do
  if mpirun -np $np "$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/np$np" >/dev/null 2>"$T/log$np"; then
    cmp -s "$T/np1/model.h5" "$T/np$np/model.h5" && ok "$np ranks: model.h5 byte-identical to 1 process" \
      || bad "$np ranks: model.h5 differs"
  else
    bad "$np ranks failed: $(tail -n 3 "$T/log$np")"
  fi
done
[ -f "$T/np1/checkpoint/shared_aqlm.h5" ] && ok "shared AQLM step checkpointed" || bad "no shared_aqlm.h5"

# lose two block files: the rerun resumes the shared AQLM step, recomputes, same bytes
rm -f "$T/np2/checkpoint/block_001.h5" "$T/np2/checkpoint/block_004.h5"
if mpirun -np 2 "$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/np2" >/dev/null 2>"$T/log2r"; then
  grep -q "shared AQLM resumed from" "$T/log2r" && ok "rerun resumed the shared AQLM step" \
    || bad "rerun did not resume shared_aqlm.h5: $(grep -i shared "$T/log2r" | head -3)"
  cmp -s "$T/np1/model.h5" "$T/np2/model.h5" && ok "resumed model.h5 byte-identical" || bad "resumed model.h5 differs"
else
  bad "rerun failed: $(tail -n 3 "$T/log2r")"
fi

# corrupt the shared step's checkpoint and lose a block: reported, recomputed, same bytes
SA=$T/np1/checkpoint/shared_aqlm.h5
printf 'garbage' | dd of="$SA" bs=1 seek=$(( $(stat -c %s "$SA") * 3 / 4 )) conv=notrunc 2>/dev/null
rm -f "$T/np1/checkpoint/block_002.h5"
if "$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/np1" >/dev/null 2>"$T/log1r"; then
  grep -q "shared_aqlm.h5: not used, recomputing" "$T/log1r" && ok "corrupt shared_aqlm.h5 reported and recomputed" \
    || bad "corrupt shared_aqlm.h5 not reported: $(tail -n 5 "$T/log1r")"
  cmp -s "$T/np1/model.h5" "$T/np3/model.h5" && ok "recomputed model.h5 byte-identical" || bad "recomputed model.h5 differs"
else
  bad "rerun after corruption failed: $(tail -n 3 "$T/log1r")"
fi

expect_error "sharing needs FP propagation" "share_codebooks.*propagation" \
  "$LLMVQ_BIN" quantize "$JOB" --quiet --set quant.propagation=quantized --set output.dir="$T/o3"
expect_error "bad share_codebooks value" "quant.share_codebooks" \
  "$LLMVQ_BIN" quantize "$JOB" --quiet --set quant.share_codebooks=block --set output.dir="$T/o3"
finish
