#!/usr/bin/env bash
# Accuracy grid of `multipole eval` on the GPU machine (no internet there), staged in 50 MB
# folders because a device call carries at most 64 MiB (shared/ASSETS.md):
#   here, once per model:  bash benchmarks/eval_gpu.sh pack smollm2-135m   (or qwen2.5-0.5b)
#     splits the cached GGUF into .stage/<model>-NN/ (the first folder also holds the gguf
#     wheel and the essays JSON; .stage/ is git-ignored, so it travels only when carried);
#   on the GPU machine, one call per folder while it stays warm (30 s idle):
#     carry [".stage/<model>-00"]: bash benchmarks/eval_gpu.sh stage   ... and so on, then
#     carry the last folder:       bash benchmarks/eval_gpu.sh run NAME [NAME ...]
# `run` assembles every fully staged GGUF into the cache (the library checks its sha256).
set -euo pipefail
export MULTIPOLE_CACHE=/tmp/mpcache PYTHONPATH=src:/tmp/site
case "${1:-}" in
  pack)
    model=$2 cache=${MULTIPOLE_HOME_CACHE:-$HOME/.cache/multipole}
    [[ -f $cache/gguf/$model.gguf ]] || { echo "no $cache/gguf/$model.gguf: run multipole once here"; exit 2; }
    rm -rf .stage/"$model"-* && mkdir -p .stage/tmp
    split -b 50000000 -d "$cache/gguf/$model.gguf" ".stage/tmp/$model.part-"
    for part in .stage/tmp/"$model".part-*; do
      dir=.stage/$model-${part##*-} && mkdir -p "$dir" && mv "$part" "$dir/"
    done
    rmdir .stage/tmp
    first=.stage/$model-00
    ls .stage/"$model"-*/ | grep -c part- > "$first/$model.parts"
    cp "$cache/data/PaulGrahamEssays.json" "$first/"
    pip download -q --no-deps gguf==0.19.0 -d "$first"
    du -sh .stage/"$model"-*
    exit 0 ;;
  stage) mkdir -p /tmp/m && cp .stage/*/* /tmp/m/ && ls /tmp/m | tail -3; exit 0 ;;
  run) ;;
  *) echo "usage: eval_gpu.sh pack MODEL | stage | run NAME..."; exit 2 ;;
esac
cp .stage/*/* /tmp/m/ 2>/dev/null || true  # the folder carried by this call
mkdir -p "$MULTIPOLE_CACHE/gguf" "$MULTIPOLE_CACHE/data"
for count in /tmp/m/*.parts; do
  model=$(basename "$count" .parts) gguf=$MULTIPOLE_CACHE/gguf/$(basename "$count" .parts).gguf
  if [[ ! -f $gguf && $(ls /tmp/m/"$model".part-* | wc -l) -eq $(cat "$count") ]]; then
    cat /tmp/m/"$model".part-* > "$gguf"
  fi
done
[[ -f "$MULTIPOLE_CACHE/data/PaulGrahamEssays.json" ]] || cp /tmp/m/PaulGrahamEssays.json "$MULTIPOLE_CACHE/data/"
[[ -d /tmp/site/gguf ]] || pip install -q --no-index --no-deps --target /tmp/site /tmp/m/gguf-*.whl
mkdir -p /tmp/evalout
eval_run() {  # name, seconds, then options of multipole eval; each run writes its own folder
  local name=$1 seconds=$2 model=smollm2-135m; shift 2
  [[ $name != qwen_* ]] || model=qwen2.5-0.5b
  timeout "$seconds" python -m multipole.cli eval --model "$model" --quiet \
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
    qwen_retrieval16k) eval_run qwen_retrieval16k 500 --tasks retrieval --context 16384 \
      --retrieval-samples 3 --retrieval-tasks niah_single,niah_multikey,variable_tracking \
      --fractions 1/16 ;;
    qwen_ppl16k) eval_run qwen_ppl16k 540 --tasks perplexity --context 16384 --windows 2 \
      --decode-tokens 2048 --fractions 1/16 --methods multipole,centroid_only,quest ;;
    qwen_fidelity16k) eval_run qwen_fidelity16k 300 --tasks fidelity --context 16384 \
      --windows 2 --fidelity-steps 64 --fractions 1/64,1/32,1/16,1/8 ;;
    qwen_retrieval16k_low) eval_run qwen_retrieval16k_low 440 --tasks retrieval \
      --context 16384 --retrieval-samples 3 \
      --retrieval-tasks niah_single,niah_multikey,variable_tracking --fractions 1/64,1/32 \
      --methods multipole,multipole_2level,centroid_only,quest,window ;;
    qwen_ppl16k_32) eval_run qwen_ppl16k_32 500 --tasks perplexity --context 16384 --windows 2 \
      --decode-tokens 2048 --fractions 1/32 --methods multipole,centroid_only,quest ;;
    qwen_ppl16k_partial) eval_run qwen_ppl16k_partial 560 --tasks perplexity --context 16384 \
      --windows 2 --decode-tokens 2048 --fractions 1/32,1/16 \
      --methods multipole_partial,centroid_only ;;
    qwen_ppl16k_partial_bins) eval_run qwen_ppl16k_partial_bins 420 --tasks perplexity \
      --context 16384 --windows 2 --decode-tokens 2048 --fractions 1/32,1/16 \
      --methods multipole_partial ;;
    partial_retrieval) eval_run partial_retrieval 300 --tasks retrieval --context 4096 \
      --retrieval-samples 3 --retrieval-tasks niah_single,niah_multikey,variable_tracking \
      --fractions 1/32,1/16 --methods multipole_partial,centroid_only ;;
    qwen_partial_retrieval) eval_run qwen_partial_retrieval 500 --tasks retrieval \
      --context 16384 --retrieval-samples 3 \
      --retrieval-tasks niah_single,niah_multikey,variable_tracking --fractions 1/32,1/16 \
      --methods multipole_partial,centroid_only ;;
    gsm) eval_run gsm 300 --tasks gsm --gsm-samples 8 --gsm-new-tokens 320 --fractions 1/16 \
      --methods multipole,multipole_2level,centroid_only,quest,window ;;
    *) echo "unknown run: $name"; exit 2 ;;
  esac
done
