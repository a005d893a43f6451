#!/usr/bin/env bash
# Every row of the README's kit tables, then its probe. Run from the repository root; several hours on 2 CPU
# cores (each 1200-step line 25-35 minutes two at a time, each 300-step row 6-11). runs/ and bench/ are git-ignored.
set -euo pipefail
# needs: apt-get install espeak-ng sox
python3 kit/make_corpus.py bench/corpus                                # the corpus, a few minutes
mkdir -p bench/dev bench/test                                          # the kit's dev speakers, split in two
for s in 112 113 114 115 116 117; do ln -sfn ../corpus/dev/$s bench/dev/$s; done
for s in 118 119 120 121 122 123; do ln -sfn ../corpus/dev/$s bench/test/$s; done

T=kit/teacher.pt
KIT="--teacher $T --data bench/corpus/train --val bench/dev --val_batches 4 --batch_seconds 16 --accum 1 --log_every 25 --workers 1 --seed 0"
LONG="--max_steps 1200 --val_every 100 --save_every 400"
SCRATCH="--init_conv_from_teacher=true --target_norm layer_norm --lr 2e-3"
python distill.py --method distilhubert $KIT $LONG --out runs/k-distilhubert
python distill.py --method armhubert $KIT $LONG --dim=144 --ffn_dim=256 $SCRATCH --out runs/bench-armhubert
C="--method colld $KIT $LONG --dim=144 --ffn_dim=192 $SCRATCH"   # the colld kit line is runs/c-ffn-all
python distill.py $C --target_point block --colld_include_unmasked=false --out runs/c-block
python distill.py $C --target_point ffn --colld_include_unmasked=false --out runs/c-ffn
python distill.py $C --target_point ffn --colld_include_unmasked=true --out runs/c-ffn-all
python distill.py $C --target_point ffn --colld_include_unmasked=false --colld_objective l1_cosine --out runs/c-ffn-l1cos
G="--method gendistiller $KIT $LONG"
python distill.py $G --gen_feed self --out runs/k-gen-self
python distill.py $G --gen_feed teacher --out runs/k-gen-teacher
python distill.py $G --gen_feed self --num_layers=2 --out runs/k-gen-depth2
python distill.py $G --gen_feed self --gen_history=previous --out runs/k-gen-previous
python distill.py $G --gen_feed self --target_layers=3,6,9,12 --out runs/k-gen-targets4

# the ARMHuBERT ablation, 300 steps
A="--method armhubert $KIT --max_steps 300 --val_every 50 --save_every 100 --student armhubert --dim=144 --ffn_dim=256"
TC="--init_conv_from_teacher=true"
python distill.py $A $SCRATCH --out runs/abl-base
python distill.py $A $TC --lr 2e-3 --out runs/abl-raw-targets
python distill.py $A '--conv_layers=[(64,10,5),(128,1,1)]+[(128,3,2)]*4+[(144,1,1)]+[(144,2,2)]*2' --target_norm layer_norm --lr 2e-3 --out runs/abl-scratch-conv
python distill.py $A $TC --target_norm layer_norm --lr 5e-4 --out runs/abl-lr5e-4
python distill.py $A $TC --target_norm layer_norm --lr 5e-3 --out runs/abl-lr5e-3
python distill.py $A $SCRATCH --reuse=none --layer_grad_scale=false --ffn_dim=184 --out runs/abl-no-reuse
python distill.py $A $SCRATCH --mask_prob 0 --out runs/abl-mse-no-mask
python distill.py ${A/armhubert/colld} $SCRATCH --target_point block --out runs/abl-colld-loss
python distill.py ${A/armhubert/distilhubert} $SCRATCH --teacher_final_norm false --weight_decay 0.01 --warmup 0.05 --clip 10 --out runs/abl-l1-cos

PROBE="--train bench/corpus/train --dev bench/dev --test bench/test --lexicon bench/corpus/lexicon.txt --train_limit 600 --steps 1000 --eval_every 200 --threads 1 --seed 0"
python eval.py probe --upstream $T $PROBE --out runs/probe-teacher.json
python eval.py probe --upstream cnn:$T $PROBE --out runs/probe-cnn.json
for r in runs/k-* runs/bench-* runs/c-* runs/abl-*; do
  python eval.py probe --upstream $(ls $r/ckpt-*.pt | tail -n 1) $PROBE --out runs/probe-$(basename $r).json
done
