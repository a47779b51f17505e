#!/usr/bin/env bash
# Accuracy grid of `multipole eval` on the GPU machine with SmolLM2-135M (no internet there).
# Staged transfer (shared/ASSETS.md): call 1 carries .stage/a (GGUF part 00, the gguf wheel,
# the essays JSON) and runs `bash benchmarks/eval_gpu.sh stage`; call 2, while the machine is
# still warm, carries .stage/b (part 01) and runs `bash benchmarks/eval_gpu.sh run`.
set -euo pipefail
export MULTIPOLE_CACHE=/tmp/mpcache PYTHONPATH=src:/tmp/site
if [[ "${1:-}" == stage ]]; then
  mkdir -p /tmp/m && cp .stage/a/* /tmp/m/ && ls -la /tmp/m
  exit 0
fi
if [[ ! -f "$MULTIPOLE_CACHE/gguf/smollm2-135m.gguf" ]]; then  # a later call on a warm machine skips this
  cp .stage/b/* /tmp/m/
  mkdir -p "$MULTIPOLE_CACHE/gguf" "$MULTIPOLE_CACHE/data"
  cat /tmp/m/part-* > "$MULTIPOLE_CACHE/gguf/smollm2-135m.gguf"
  cp /tmp/m/smollm2-135m.gguf.verified "$MULTIPOLE_CACHE/gguf/"
  cp /tmp/m/PaulGrahamEssays.json "$MULTIPOLE_CACHE/data/"
  pip install -q --no-index --no-deps --target /tmp/site /tmp/m/gguf-*.whl
fi
mkdir -p /tmp/evalout
eval_run() {  # name, seconds, then options of multipole eval; each run writes its own folder
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" python -m multipole.cli eval --model smollm2-135m --quiet \
    --out "/tmp/evalout/$name" "$@" 2>&1 | tail -25 || echo "$name: stopped (timeout or error)"
  tar czf "$OUT/eval_results.tgz" -C /tmp/evalout .  # at most 8 files come back: one archive
}
# `bash benchmarks/eval_gpu.sh run [NAME ...]` runs the named runs (default: the first three)
runs=("${@:2}")
[[ ${#runs[@]} -gt 0 ]] || runs=(fidelity perplexity retrieval)
for name in "${runs[@]}"; do
  case $name in
    fidelity) eval_run fidelity 60 --tasks fidelity --context 4096 --windows 4 \
      --fidelity-steps 128 --fractions 1/64,1/32,1/16,1/8 ;;
    perplexity) eval_run perplexity 150 --tasks perplexity --context 4096 --windows 4 \
      --decode-tokens 512 --fractions 1/32,1/16 ;;
    retrieval) eval_run retrieval 120 --tasks retrieval --context 4096 --retrieval-samples 3 \
      --retrieval-tasks niah_single,niah_multikey,variable_tracking --fractions 1/16 ;;
    perplexity2k) eval_run perplexity2k 470 --tasks perplexity --context 2048 --windows 2 \
      --decode-tokens 2048 --fractions 1/16 \
      --methods multipole,multipole_2level,centroid_only,quest,window ;;
    ppl4k_a) eval_run ppl4k_a 520 --tasks perplexity --context 4096 --windows 4 \
      --decode-tokens 2048 --fractions 1/16 --methods multipole,multipole_2level,centroid_only ;;
    ppl4k_b) eval_run ppl4k_b 470 --tasks perplexity --context 4096 --windows 4 \
      --decode-tokens 2048 --fractions 1/16 --methods quest,oracle_topk,window ;;
    ppl2k_mp) eval_run ppl2k_mp 230 --tasks perplexity --context 4096 --windows 4 \
      --decode-tokens 2048 --fractions 1/16 --methods multipole ;;
    ppl2k) eval_run ppl2k 540 --tasks perplexity --context 4096 --windows 4 \
      --decode-tokens 2048 --fractions 1/16 --methods multipole,centroid_only,quest ;;
    fidelity2) eval_run fidelity2 120 --tasks fidelity --context 4096 --windows 4 \
      --fidelity-steps 128 --fractions 1/64,1/32,1/16,1/8 ;;
    retrieval2) eval_run retrieval2 200 --tasks retrieval --context 4096 --retrieval-samples 3 \
      --retrieval-tasks niah_single,niah_multikey,variable_tracking --fractions 1/16 ;;
    gsm) eval_run gsm 300 --tasks gsm --gsm-samples 8 --gsm-new-tokens 320 --fractions 1/16 \
      --methods multipole,multipole_2level,centroid_only,quest,window ;;
    *) echo "unknown run: $name"; exit 2 ;;
  esac
done
