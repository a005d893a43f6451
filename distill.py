"""Distil a frozen speech SSL teacher into a compact student: the training loop and command line.

One file, read top to bottom (method reference: ../shared/SPEC.md):
  1. the papers' recipes (optimizer, schedule, batch, masking) per --method        SPEC 1-4
  2. the command line: recipe defaults, grouped flags, --key=value student overrides
  3. one step per method (step_distilhubert, step_armhubert, step_colld, step_gendistiller):
     its teacher passes, its mask, its loss (losses.py), chosen from the METHODS table
  4. checkpoints: atomic writes, exact resume
  5. the loop, in the order it runs: setup (teacher, student, data, optimizer, resume), then
     per step: lr schedule, accum micro-batches (teacher no grad, float32 or autocast; student under
     autocast), clip, optimizer step; progress, validation, checkpoints. Runs alone or under
     torchrun (DDP); the loop never branches on the method.

Examples:
    python distill.py --method gendistiller      # offline quick start: tiny teacher, synthetic corpus, ~1 min on CPU
    python distill.py --method armhubert --teacher hubert_base --data /data/LibriSpeech/train-clean-100
    torchrun --nproc-per-node=4 distill.py --method distilhubert --teacher hubert_base --data /data/LibriSpeech
"""
import argparse
import contextlib
import dataclasses
import gc
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

import data
import losses
import model

# ----------------------------------------------------------------------------
# 1. Recipes: the papers' settings, the defaults of every flag below
# ----------------------------------------------------------------------------

# LibriSpeech 960 h: 281,241 utterances, 12.3 s on average. Batches are given in seconds of
# audio per process and micro-step (--batch_seconds); utterance counts convert with 12.3 s.
@dataclass
class Recipe:
    student: str  # default preset
    lr: float
    betas: Tuple[float, float]
    eps: float
    weight_decay: float
    warmup: float  # fraction of max_steps with linear warm-up, then linear decay to 0
    clip: float  # max global grad norm
    max_steps: int
    batch_seconds: float  # audio per process per micro-step
    accum: int  # micro-steps per optimizer step
    mask_prob: float  # 0 = the student never sees masked input
    mask_type: str = "uniform"
    max_seconds: Optional[float] = None  # random crop of longer utterances (None: whole utterances)
    # pre-LN teachers: does the last target include the encoder's final LayerNorm? (no-op for post-LN)
    teacher_final_norm: bool = False
    # the teacher's precision on GPUs: "fp32" (autocast off around it, matmuls in TF32) or "auto" (under
    # the student's autocast, bf16/fp16); on a CPU both are float32 unless --precision bf16/fp16
    teacher_precision: str = "fp32"
    # what of each teacher block is the target: "block" (its output) or "ffn" (its FFN feature before
    # the last residual addition, model.teacher_block)
    target_point: str = "block"
    source: str = ""


RECIPES = {
    # DistilHuBERT (SPEC 1): batch 24 utterances (~295 s), 200k steps, lr 2e-4, 7 % warm-up, clip 5.
    # Teacher in float32: s3prl switches autocast off around it (pretrain_expert.py), on a PyTorch whose
    # float32 matmuls ran as TF32 on Ampere GPUs by default (setup_distributed enables TF32 likewise).
    # Weight decay 0.01: s3prl's distiller builds its AdamW with AdamW_with_schedule's parameter groups,
    # 0.01 on every parameter whose name lacks "bias" (as ARMHuBERT's below; see param_groups).
    # s3prl crops utterances to 250,000 samples (15.625 s, pretrain/distiller config sequence_length)
    # and reads teacher layers as its HuBERT upstream's hidden_states, whose last entry is the
    # encoder output, after the final LayerNorm of a pre-LN teacher.
    "distilhubert": Recipe("distilhubert", 2e-4, (0.9, 0.98), 1e-6, 0.01, 0.07, 5.0, 200_000, 295.0, 1, 0.0,
                           max_seconds=15.625, teacher_final_norm=True, source="DistilHuBERT paper / s3prl config"),
    # ARMHuBERT (SPEC 2): 144 utterances per update (~1770 s) = 18 per GPU x 2 GPUs x accumulation 4
    # in the official 960 h config, here 8 micro-steps of ~221 s; 200 epochs = 1953 updates x 200.
    # Weight decay: the yaml says 1e-6, but s3prl's AdamW_with_schedule overrides it in its two
    # parameter groups: 0.01 on every parameter whose name lacks "bias" (see param_groups), 0 on biases.
    # choice: clip 10.0 (fairseq's HuBERT value; the official config states none).
    # Targets: forward hooks on the teacher's layers, i.e. block outputs without a final LayerNorm.
    # Teacher under autocast: the official Lightning run (precision=16) wraps the teacher like the student.
    "armhubert": Recipe("armhubert", 5e-3, (0.9, 0.98), 1e-6, 0.01, 0.05, 10.0, 390_600, 221.0, 8, 0.8,
                        teacher_precision="auto", source="Recycle-and-Distill paper + official armhubert-960.yaml"),
    # CoLLD: no public recipe. Its targets are the teacher's FFN features (its first author in USAD,
    # arXiv 2506.18843, Sec. III-B). choice: ARMHuBERT's optimizer, batch and masking, with the
    # maskhubert geometry's lr 5e-4 (the default student), and 200k steps; teacher under autocast.
    "colld": Recipe("colld", 5e-4, (0.9, 0.98), 1e-6, 0.01, 0.05, 10.0, 200_000, 221.0, 8, 0.8,
                    teacher_precision="auto", target_point="ffn", source="choice (no public recipe)"),
    # GenDistiller (SPEC 4): no public recipe. choice: the DistilHuBERT recipe it compares to (float32 teacher).
    "gendistiller": Recipe("gendistiller", 2e-4, (0.9, 0.98), 1e-6, 0.01, 0.07, 5.0, 200_000, 295.0, 1, 0.0,
                           max_seconds=15.625, teacher_final_norm=True, source="choice: DistilHuBERT's recipe"),
}
# SPEC 2: MaskHuBERT (no reuse) trains with lr 5e-4 instead of ARMHuBERT's 5e-3.
PRESET_LR = {"maskhubert": 5e-4}

# `--data synthetic` is the smoke test: unless given, these replace the paper recipe so a
# run takes about a minute on a laptop CPU. Printed when applied.
SMOKE = dict(max_steps=60, batch_seconds=8.0, accum=1, warmup=0.1, log_every=10, save_every=30, val_every=20)

# `python distill.py --method M` with neither --teacher nor --data is the offline quick start:
# the random `tiny` teacher on the synthetic corpus with the smoke settings above. With --data
# alone the teacher is the papers' (HuBERT Base; a torchaudio bundle, downloaded once).
PAPER_TEACHER = "hubert_base"

# ----------------------------------------------------------------------------
# 2. Command line
# ----------------------------------------------------------------------------


def one_line(error):
    """An error's message on one line (a multi-line one joined with '; ', long ones cut)."""
    text = "; ".join(line.strip() for line in str(error).strip().splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


def usage_error(message):
    """Print `distill.py: error: MESSAGE` (one line) and stop with a FlagError (exit status 2)."""
    print(f"distill.py: error: {message}", file=sys.stderr, flush=True)
    raise FlagError(f"error: {message}")


class FlagError(SystemExit):
    """A bad command line: one line on stderr, exit status 2 (argparse's convention), no traceback."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except a None one: the recipe or METHOD_FLAG_DEFAULTS fills it later."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, except that an error is one line (the usage is in --help) and a FlagError."""

    def error(self, message):
        usage_error(message)


# What every numeric flag allows: (test, the words of the error). Checked once the recipe has
# filled the unset ones, so each flag is named with the value it really has.
def _at_least(low):
    return (lambda v: v >= low, f">= {low}")


FLAG_RANGES = {
    "val_batches": _at_least(1), "accum": _at_least(1), "max_steps": _at_least(1), "workers": _at_least(0),
    "log_every": _at_least(1), "save_every": _at_least(1), "val_every": _at_least(1), "keep": _at_least(1),
    "seed": _at_least(0), "mask_length": _at_least(1), "mask_min_space": _at_least(0),
    "mask_min_masks": _at_least(0), "mask_same_rows": _at_least(0), "colld_negatives": _at_least(1),
    "batch_seconds": (lambda v: v > 0, "seconds > 0"),
    "max_seconds": (lambda v: v is None or v == 0 or v >= data.MIN_SAMPLES / data.SAMPLE_RATE,
                    f"0 (never crop) or >= {data.MIN_SAMPLES / data.SAMPLE_RATE} s (one frame)"),
    "lr": (lambda v: v > 0, "> 0"), "eps": (lambda v: v > 0, "> 0"), "clip": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"), "warmup": (lambda v: 0 <= v <= 1, "a fraction of the steps in [0, 1]"),
    "betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "mask_prob": (lambda v: 0 <= v <= 1, "a share of the frames in [0, 1]"),
    "cos_weight": (lambda v: v >= 0, ">= 0"), "last_layer_weight": (lambda v: v >= 0, ">= 0"),
    "layer_weight": (lambda v: v >= 0, ">= 0"), "colld_temperature": (lambda v: v > 0, "> 0"),
}
# The numeric student fields set with --FIELD=VALUE (model.StudentConfig), checked the same way.
_DROPOUT = (lambda v: 0 <= v < 1, "a probability in [0, 1)")
STUDENT_RANGES = {
    "dim": _at_least(1), "ffn_dim": _at_least(1), "num_heads": _at_least(1), "num_layers": _at_least(1),
    "pos_conv_kernel": _at_least(1), "pos_conv_groups": _at_least(1), "teacher_dim": _at_least(1),
    "dropout": _DROPOUT, "attention_dropout": _DROPOUT, "reuse_attention_dropout": _DROPOUT,
    "activation_dropout": _DROPOUT, "input_dropout": _DROPOUT,
    "feature_grad_mult": (lambda v: v >= 0, ">= 0"),
    "rel_pos_buckets": (lambda v: v == 0 or (v >= 4 and v % 2 == 0), "0 (no WavLM bias) or an even number >= 4"),
    "rel_pos_max_distance": _at_least(1),
}
# Flags of one method's objective: given with another --method they would be ignored, so they are refused.
METHOD_FLAGS = {
    "mask_prob": ("armhubert", "colld"), "mask_length": ("armhubert", "colld"), "mask_type": ("armhubert", "colld"),
    "mask_min_space": ("armhubert", "colld"), "mask_min_masks": ("armhubert", "colld"),
    "mask_overlap": ("armhubert", "colld"), "mask_same_rows": ("armhubert", "colld"),
    "cos_weight": ("distilhubert", "gendistiller"), "last_layer_weight": ("armhubert",), "layer_weight": ("armhubert",),
    "colld_negatives": ("colld",), "colld_temperature": ("colld",), "colld_include_unmasked": ("colld",),
    "colld_objective": ("colld",), "gen_feed": ("gendistiller",),
}
# Their values when not given (the ones with a recipe value are filled from RECIPES).
METHOD_FLAG_DEFAULTS = dict(mask_length=10, mask_min_space=1, mask_min_masks=2, mask_overlap=False,
                            mask_same_rows=18, cos_weight=1.0, last_layer_weight=1.0, layer_weight=0.1,
                            colld_negatives=100, colld_temperature=0.1, colld_include_unmasked=False,
                            colld_objective="infonce", gen_feed="teacher")


def build_parser():
    p = Parser(
        prog="distill.py", description="Distil a speech SSL teacher into a compact student (DistilHuBERT, ARMHuBERT, CoLLD, "
                    "GenDistiller). Flags left unset take the --method's paper recipe. Student config fields "
                    "are set with --FIELD=VALUE (see model.StudentConfig), e.g. --dim=384 --reuse=none.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("what to distil")
    g.add_argument("--method", required=True, choices=list(RECIPES), help="objective, default student and recipe")
    g.add_argument("--teacher", default=None,
                   help="torchaudio bundle name (hubert_base, wavlm_base_plus, ...), a checkpoint file "
                        "(torchaudio-format or s3prl-converted .pt) or 'tiny' (random, for smoke runs); "
                        f"default {PAPER_TEACHER} with --data, 'tiny' without (the quick start)")
    g.add_argument("--student", default=None, help=f"student preset ({', '.join(model.PRESETS)}); default: the method's")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="LibriSpeech-layout directory or any folder of audio files (.flac, .wav, .ogg, ...), or 'synthetic'; "
                        "without --data and --teacher: the offline quick start")
    g.add_argument("--val", default=None, help="held-out data (same forms as --data) for a validation loss")
    g.add_argument("--val_batches", type=int, default=8, help="validation batches (fixed, same every time)")
    g.add_argument("--batch_seconds", type=float, default=None, help="seconds of audio per process per micro-step")
    g.add_argument("--accum", type=int, default=None, help="micro-steps (gradient accumulation) per optimizer step")
    g.add_argument("--max_seconds", type=float, default=None,
                   help="random-crop utterances longer than this (distilhubert/gendistiller: 15.625 s = s3prl's "
                        "250,000 samples; armhubert/colld: whole utterances in length buckets, as the official code); "
                        "0 = never crop")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation (default: the method's recipe)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--betas", type=float, nargs=2, default=None, help="AdamW betas")
    g.add_argument("--eps", type=float, default=None, help="AdamW epsilon")
    g.add_argument("--weight_decay", type=float, default=None,
                   help="AdamW weight decay on matrices/conv kernels (choice: never on biases, norms, embeddings)")
    g.add_argument("--warmup", type=float, default=None, help="fraction of steps of linear warm-up (then linear decay)")
    g.add_argument("--clip", type=float, default=None, help="max global gradient norm")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="student autocast: auto = bf16 on GPUs that support it, fp32 on CPU; fp16 uses a "
                        "gradient scaler. On GPUs float32 matmuls use TF32 unless this is fp32")
    g.add_argument("--teacher_precision", default=None, choices=["auto", "fp32"],
                   help="auto: the teacher runs under the student's autocast; fp32: autocast off around it "
                        "(float32 targets; TF32 matmuls on GPUs unless --precision fp32) "
                        "(default: the recipe's: fp32 for distilhubert/gendistiller, auto for armhubert/colld)")
    g.add_argument("--traceback", action="store_true",
                   help="an error at start (a teacher, data folder or file that cannot be used) shows its full "
                        "traceback instead of one line")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the teacher's layers (off: eager, the readable path)")
    g.add_argument("--skip_nonfinite", action="store_true",
                   help="skip (and count) a step whose loss or gradient is not finite instead of stopping")
    g = p.add_argument_group("masking (ARMHuBERT, CoLLD; fairseq compute_mask_indices semantics)")
    g.add_argument("--mask_prob", type=float, default=None, help="share of valid frames covered by spans")
    g.add_argument("--mask_length", type=int, default=None, help=f"mean span length (frames) (default {METHOD_FLAG_DEFAULTS['mask_length']})")
    g.add_argument("--mask_type", default=None, choices=["static", "uniform"],
                   help="span lengths: static = mask_length; uniform = 0..2*mask_length (official ARMHuBERT)")
    g.add_argument("--mask_min_space", type=int, default=None, help=f"unmasked frames kept between spans (default {METHOD_FLAG_DEFAULTS['mask_min_space']})")
    g.add_argument("--mask_min_masks", type=int, default=None, help=f"minimum spans per utterance (default {METHOD_FLAG_DEFAULTS['mask_min_masks']})")
    g.add_argument("--mask_overlap", action="store_true", default=None,
                   help="allow spans to overlap (HuBERT) instead of no-overlap")
    g.add_argument("--mask_same_rows", type=int, default=None,
                   help="rows equalised to the same masked count, in length order (fairseq equalises the whole "
                        "batch, which was the official 18 utterances per GPU); 0 = the whole batch "
                        f"(default {METHOD_FLAG_DEFAULTS['mask_same_rows']})")
    g = p.add_argument_group("teacher targets")
    g.add_argument("--target_norm", default="none", choices=["none", "layer_norm"],
                   help="layer_norm: normalise every teacher target per frame over its dimension, without "
                        "parameters (as data2vec's targets); for pre-LN teachers, whose layers grow with depth. "
                        "none: the layers as they are (the papers, with post-LN HuBERT Base)")
    g.add_argument("--teacher_final_norm", default=None, choices=["true", "false"],
                   help="pre-LN teachers only: the last layer's target includes the encoder's final LayerNorm "
                        "(true: s3prl hidden_states, transformers 4 hidden_states, 5 last_hidden_state; false: "
                        "fairseq/torchaudio extract_features and the official ARMHuBERT hooks). Default: true for "
                        "distilhubert/gendistiller, false for armhubert/colld")
    g.add_argument("--target_point", default=None, choices=["block", "ffn"],
                   help="what of each teacher block is the target: its output (block) or its feed-forward "
                        "network's output before the residual addition (ffn: data2vec's target point, CoLLD's "
                        "targets as USAD describes them). Default: ffn for colld, block for the others")
    g = p.add_argument_group("method details (choices the papers leave open, SPEC)")
    g.add_argument("--cos_weight", type=float, default=None,
                   help=f"lambda of the -log sigmoid(cos) term (DistilHuBERT, GenDistiller) (default {METHOD_FLAG_DEFAULTS['cos_weight']})")
    g.add_argument("--last_layer_weight", type=float, default=None,
                   help=f"ARMHuBERT weight of the last layer (default {METHOD_FLAG_DEFAULTS['last_layer_weight']})")
    g.add_argument("--layer_weight", type=float, default=None,
                   help=f"ARMHuBERT weight of layers 1..L-1 (default {METHOD_FLAG_DEFAULTS['layer_weight']})")
    g.add_argument("--colld_negatives", type=int, default=None,
                   help=f"CoLLD negatives per anchor (K) (default {METHOD_FLAG_DEFAULTS['colld_negatives']})")
    g.add_argument("--colld_temperature", type=float, default=None,
                   help=f"CoLLD softmax temperature (tau) (default {METHOD_FLAG_DEFAULTS['colld_temperature']})")
    g.add_argument("--colld_include_unmasked", action="store_true", default=None, help="CoLLD: unmasked frames are anchors too")
    g.add_argument("--colld_objective", default=None, choices=["infonce", "l1_cosine"],
                   help="CoLLD: its InfoNCE, or DistilHuBERT's L1-cosine on the same anchors (USAD's ablation, "
                        f"arXiv 2506.18843 Table VI) (default {METHOD_FLAG_DEFAULTS['colld_objective']})")
    g.add_argument("--gen_feed", default=None, choices=["teacher", "self"],
                   help="GenDistiller history during training: teacher forcing or its own predictions (free-running) "
                        f"(default {METHOD_FLAG_DEFAULTS['gen_feed']})")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help="output directory (checkpoints, train_log.jsonl); default runs/METHOD-TEACHER. A folder that "
                        "already holds a run is refused unless --resume is given")
    g.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint in --out, or start fresh) or a checkpoint path")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order, crops, masks, dropout")
    g.add_argument("--log_every", type=int, default=None, help="steps between progress lines (default 100)")
    g.add_argument("--save_every", type=int, default=None, help="steps between checkpoints (default 5000)")
    g.add_argument("--val_every", type=int, default=None, help="steps between validation losses (default 5000)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept in --out (older ones deleted)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    return p


def student_overrides(items, parser):
    """['--dim=384', '--reuse=none'] -> {'dim': 384, 'reuse': 'none'}, type-checked against StudentConfig."""
    fields = {f.name: f for f in dataclasses.fields(model.StudentConfig)}
    out = {}
    for item in items:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognised argument {item!r} (student fields are set as --FIELD=VALUE)")
        key, value = item[2:].split("=", 1)
        if key not in fields:
            parser.error(f"unknown flag or student field {key!r}; student fields: {', '.join(fields)}")
        default = getattr(model.StudentConfig(), key)
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            elif key == "conv_layers":
                out[key] = model.parse_conv_layers(value)
            elif key == "target_layers":
                out[key] = tuple(int(v) for v in value.split(","))
            else:
                out[key] = value
        except ValueError as e:
            parser.error(f"--{key}={value}: {e} (type of {key}: {type(default).__name__})")
        if key in STUDENT_RANGES:
            ok, allowed = STUDENT_RANGES[key]
            if not (math.isfinite(out[key]) and ok(out[key])):
                parser.error(f"--{key}={value}: expected {allowed}")
        if key == "conv_layers" and not (out[key] and all(c >= 1 and k >= 1 and s >= 1 for c, k, s in out[key])):
            parser.error(f"--{key}={value}: expected (channels, kernel, stride) triples of integers >= 1")
    return out


def parse_args(argv=None):
    """Parse flags, fill unset ones from the recipe, and keep the student overrides in args.overrides."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.overrides = student_overrides(rest, parser)
    args.quick_start = args.teacher is None and args.data is None
    if args.quick_start:
        args.teacher, args.data = "tiny", "synthetic"
    elif args.data is None:
        parser.error(f"--teacher {args.teacher} needs --data: a LibriSpeech-layout folder, a folder of "
                     "audio files, or 'synthetic'")
    elif args.teacher is None:
        args.teacher = PAPER_TEACHER
    recipe = RECIPES[args.method]
    args.student = args.student or recipe.student
    if args.student not in model.PRESETS:
        parser.error(f"--student {args.student!r}: unknown preset; choose from {', '.join(model.PRESETS)}")
    for name, methods in METHOD_FLAGS.items():
        if getattr(args, name) is not None and args.method not in methods:
            value = getattr(args, name)
            shown = "" if value is True else f" {value}"  # a switch has no value to show
            parser.error(f"--{name}{shown} belongs to --method {' / '.join(methods)}; --method {args.method} "
                         "does not use it")
        if getattr(args, name) is None and name in METHOD_FLAG_DEFAULTS:
            setattr(args, name, METHOD_FLAG_DEFAULTS[name])
    args.applied = []  # what changed from the paper recipe, printed at start
    smoke = args.data == "synthetic"
    for name in ("max_steps", "batch_seconds", "accum", "warmup", "log_every", "save_every", "val_every"):
        if getattr(args, name) is None and smoke:
            setattr(args, name, SMOKE[name])
            args.applied.append(f"{name}={SMOKE[name]} (synthetic smoke run)")
    defaults = dict(lr=PRESET_LR.get(args.student, recipe.lr), betas=recipe.betas, eps=recipe.eps,
                    weight_decay=recipe.weight_decay, warmup=recipe.warmup, clip=recipe.clip,
                    max_steps=recipe.max_steps, batch_seconds=recipe.batch_seconds, accum=recipe.accum,
                    mask_prob=recipe.mask_prob, mask_type=recipe.mask_type, max_seconds=recipe.max_seconds,
                    teacher_final_norm="true" if recipe.teacher_final_norm else "false",
                    teacher_precision=recipe.teacher_precision, target_point=recipe.target_point,
                    log_every=100, save_every=5000, val_every=5000)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.betas = tuple(args.betas)
    args.teacher_final_norm = args.teacher_final_norm == "true"
    if args.out is None:  # each method and teacher its own folder: the quick-start runs do not overwrite each other
        teacher = os.path.splitext(os.path.basename(args.teacher.rstrip("/")))[0]
        args.out = os.path.join("runs", f"{args.method}-{re.sub(r'[^A-Za-z0-9._-]', '_', teacher)}")
    for name, (ok, allowed) in FLAG_RANGES.items():
        value = getattr(args, name)
        finite = all(math.isfinite(v) for v in (value if isinstance(value, tuple) else [value]) if v is not None)
        if not (finite and ok(value)):
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            parser.error(f"--{name} {shown}: expected {allowed}")
    if METHODS[args.method].masks_input and args.mask_prob == 0:
        if args.method == "colld" and not args.colld_include_unmasked:
            parser.error(f"--mask_prob {args.mask_prob}: --method {args.method} needs a share in (0, 1] "
                         "(0, no masking, is allowed as an ablation for armhubert, and for colld with "
                         "--colld_include_unmasked)")
        args.applied.append("mask_prob=0: no masking (ablation, not the paper's method)")
    return args


# ----------------------------------------------------------------------------
# 3. One step of each method: its teacher passes, its mask, its loss
#
# Each step_METHOD(args, teacher, student, wav, lengths, seeds) returns (loss, parts) for one
# micro-batch: wav (B, S), lengths (B,) samples; seeds = [seed, step, micro-step, rank] seeds
# the masks and CoLLD's negatives, so a resumed run redraws them exactly. The teacher runs
# without grad, in float32 (--teacher_precision fp32: Teacher.exact) or in the caller's autocast
# region like the student (auto). Targets: teacher layer k = layers[k - 1] (model.py section 1).
# ----------------------------------------------------------------------------


def unwrap(student):
    """The student module itself, also when DistributedDataParallel wraps it."""
    return student.module if hasattr(student, "module") else student


def draw_mask(args, teacher, lengths, seeds):
    """The micro-batch's span mask M (B, T) over the teacher's frames, seeded by `seeds` = [seed, step,
    micro-step, rank] (a resumed run redraws it exactly; the micro-batches of one update differ), and
    the valid frames (B,) it was drawn on."""
    frames = data.frame_count(lengths, teacher.conv_layers)  # (B,) valid frames
    rng = np.random.default_rng(seeds)
    mask = data.compute_mask_indices(frames.cpu(), int(frames.max()), args.mask_prob, args.mask_length,
                                     args.mask_type, min_masks=args.mask_min_masks,
                                     no_overlap=not args.mask_overlap, min_space=args.mask_min_space,
                                     same_count_rows=args.mask_same_rows or None, rng=rng)
    return mask.to(lengths.device), frames


def mask_share(mask, frames):
    """Logged with the loss parts, not part of the loss: the share of valid frames the student saw masked."""
    return mask.sum() / frames.sum().clamp(min=1)


def step_distilhubert(args, teacher, student, wav, lengths, seeds):
    """DistilHuBERT (SPEC 1): clean teacher layers 4, 8, 12; L1 + cosine on the heads' predictions."""
    layers, frame_lengths = teacher(wav, lengths, final_norm=args.teacher_final_norm, point=args.target_point)
    targets = losses.teacher_targets(layers, unwrap(student).cfg.target_layers, args.target_norm)
    preds, _ = student(wav, lengths)
    return losses.distilhubert_loss(preds, targets, frame_lengths, args.cos_weight)


def step_gendistiller(args, teacher, student, wav, lengths, seeds):
    """GenDistiller (SPEC 4): teacher forcing feeds the true layers l_1..l_{K-1} as history
    (--gen_feed teacher); --gen_feed self runs the generator free; DistilHuBERT's loss on each output.
    Validation (eval mode) always runs free, as the deployed model does."""
    layers, frame_lengths = teacher(wav, lengths, final_norm=args.teacher_final_norm, point=args.target_point)
    targets = losses.teacher_targets(layers, unwrap(student).cfg.target_layers, args.target_norm)
    history = targets[:-1] if args.gen_feed == "teacher" and student.training else None
    preds, _ = student(wav, lengths, history=history)
    return losses.gendistiller_loss(preds, targets, frame_lengths, args.cos_weight)


def step_armhubert(args, teacher, student, wav, lengths, seeds):
    """ARMHuBERT masking distillation (SPEC 2): one span mask M; the student sees the masked input;
    masked frames regress the teacher on clean input, unmasked frames the teacher on the same
    masked input (a second teacher pass)."""
    mask, frames = draw_mask(args, teacher, lengths, seeds)  # (B, T) bool, (B,)
    features, frame_lengths = teacher.features(wav, lengths)  # computed once: the mask does not touch it
    clean, _ = teacher.encode(features, frame_lengths, None, args.teacher_final_norm, args.target_point)
    # with no frame masked (the --mask_prob 0 ablation) both passes would be the same
    masked = teacher.encode(features, frame_lengths, mask, args.teacher_final_norm, args.target_point)[0] \
        if mask.any() else clean
    target_layers = unwrap(student).cfg.target_layers
    clean = losses.teacher_targets(clean, target_layers, args.target_norm)
    masked = losses.teacher_targets(masked, target_layers, args.target_norm)
    preds, _ = student(wav, lengths, mask=mask)
    weights = [args.layer_weight] * (len(preds) - 1) + [args.last_layer_weight]
    loss, parts = losses.masking_distillation_loss(preds, clean, masked, mask, frame_lengths, weights)
    return loss, {**parts, "mask_share": mask_share(mask, frames)}


def step_colld(args, teacher, student, wav, lengths, seeds):
    """CoLLD (SPEC 3): one span mask M; the student sees the masked input; InfoNCE between the
    student's heads and every teacher layer's FFN feature on clean input, at the masked frames."""
    mask, frames = draw_mask(args, teacher, lengths, seeds)  # (B, T) bool, (B,)
    clean, frame_lengths = teacher(wav, lengths, final_norm=args.teacher_final_norm, point=args.target_point)
    targets = losses.teacher_targets(clean, unwrap(student).cfg.target_layers, args.target_norm)
    preds, _ = student(wav, lengths, mask=mask)
    # the negatives: a torch generator seeded from the same seed sequence as the mask
    seed = int(np.random.default_rng(seeds).integers(2 ** 62))
    gen = torch.Generator(device=wav.device).manual_seed(seed)  # drawn where the loss runs (GPU: no copy)
    if args.colld_objective == "l1_cosine":  # the ablation: regression on the anchors InfoNCE would use
        anchors = None if args.colld_include_unmasked else mask
        loss, parts = losses.distilhubert_loss(preds, targets, frame_lengths, frames=anchors)
    else:
        loss, parts = losses.colld_loss(preds, targets, mask, frame_lengths, args.colld_negatives,
                                        args.colld_temperature, args.colld_include_unmasked, generator=gen)
    return loss, {**parts, "mask_share": mask_share(mask, frames)}


@dataclass(frozen=True)
class Method:
    step: object  # step_METHOD above
    masks_input: bool  # the student sees span-masked input (it needs a mask embedding, --mask_prob applies)
    generator: bool  # the student is GenDistiller's generator (head "generator"); the others are not


METHODS = {"distilhubert": Method(step_distilhubert, masks_input=False, generator=False),
           "armhubert": Method(step_armhubert, masks_input=True, generator=False),
           "colld": Method(step_colld, masks_input=True, generator=False),
           "gendistiller": Method(step_gendistiller, masks_input=False, generator=True)}


def check_frames(teacher_lengths, student_lengths):
    if not torch.equal(teacher_lengths, student_lengths):
        raise RuntimeError(f"teacher and student frame counts differ: teacher {teacher_lengths.tolist()}, "
                           f"student {student_lengths.tolist()}; their conv stacks must have the same total "
                           "stride (320) and receptive field (400)")


def distillation_loss(args, teacher, student, wav, lengths, step, rank=0, micro=0):
    """(loss, parts) of one micro-batch for args.method: the method's step from METHODS.

    subtle: the frame counts of the two conv stacks are checked before any forward: the mask
    (masked methods) and the history (GenDistiller) have the teacher's frame count, so a student
    with another stride would otherwise stop inside its forward with a bare tensor-size error.
    """
    check_frames(data.frame_count(lengths, teacher.conv_layers),
                 data.frame_count(lengths, unwrap(student).cfg.conv_layers))
    return METHODS[args.method].step(args, teacher, student, wav, lengths, [args.seed, step, micro, rank])


# ----------------------------------------------------------------------------
# 4. Checkpoints: written atomically, resumed exactly
# ----------------------------------------------------------------------------


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename: a kill at any moment leaves either the
    old file set or the complete new file, never a half-written checkpoint under a final name."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupt: remove the partial file, keep the old ones, re-raise
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def checkpoint_paths(out):
    """Complete checkpoints in `out`, oldest first (temporary files are never matched)."""
    return sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))


def checkpoint_step(path):
    """The step in a checkpoint's name, ckpt-STEP.pt."""
    return int(os.path.basename(path)[len("ckpt-"):-len(".pt")])


def find_resume(args):
    """The checkpoint to resume from: --resume PATH, or the newest loadable one in --out for 'auto'."""
    if args.resume is None:
        return None
    if args.resume != "auto":
        if not os.path.isfile(args.resume):
            raise SystemExit(f"error: --resume {args.resume}: no such file")
        try:
            torch.load(args.resume, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated or not a torch file: name it
            raise SystemExit(f"error: --resume {args.resume}: cannot be read as a checkpoint ({type(e).__name__}: "
                             f"{str(e)[:200]}); it may be truncated. --resume auto picks the newest complete one")
        return args.resume
    for path in reversed(checkpoint_paths(args.out)):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as e:  # a damaged file (disk error): say so and fall back to the one before
            print(f"warning: skipping unreadable checkpoint {path} (truncated or damaged: {type(e).__name__}: "
                  f"{one_line(e)[:120]}); trying the one before", flush=True)
    print(f"note: --resume auto: no checkpoint in {args.out}; starting a new run", flush=True)
    return None


# The flags a resumed run may change (README: Training); every other flag, teacher and data included,
# must be the run's own.
RESUME_MAY_CHANGE = ("max_steps", "resume", "out", "workers", "device", "log_every", "save_every", "val_every",
                     "val", "val_batches", "keep", "skip_nonfinite", "compile", "traceback", "quick_start")


def check_resumable(ckpt, path, args, cfg, world):
    """Refuse to resume a checkpoint of another run: every mismatch is named."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise SystemExit(f"error: --resume {path}: not a distill.py training checkpoint")
    problems = []
    if ckpt["method"] != args.method:
        problems.append(f"method {ckpt['method']} != {args.method}")
    saved = dataclasses.asdict(model.config_from_dict(ckpt["config"], ckpt["student"]))  # older: fields filled in
    if saved != dataclasses.asdict(cfg):
        diff = [k for k, v in dataclasses.asdict(cfg).items() if saved.get(k) != v]
        problems.append(f"student config differs in {diff}")
    if len(ckpt["position"]) != world:
        problems.append(f"written by {len(ckpt['position'])} process(es), resumed with {world}")
    # flags newer than some checkpoints: a checkpoint without them ran with these values
    legacy = dict(mask_same_rows=0, target_norm="none", teacher_final_norm=False)
    if args.max_steps < ckpt["step"]:
        problems.append(f"--max_steps {args.max_steps} is below the checkpoint's step {ckpt['step']}")
    for name, value in simple_args(args).items():
        if name in RESUME_MAY_CHANGE or isinstance(value, tuple):  # tuples (betas) are not in checkpoints
            continue
        old = ckpt["args"].get(name, legacy.get(name, value))  # a flag newer than the checkpoint: accepted
        if old != value:
            problems.append(f"--{name} {old} != {value}")
    if problems:
        raise SystemExit(f"error: --resume {path} belongs to a different run: {'; '.join(problems)}. "
                         "Resume with the same flags, or use a fresh --out.")


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def lock_out_dir(out):
    """One run per folder: OUT/.lock, created atomically (O_EXCL) with this process's id. A lock whose
    process is gone (killed, crashed) is taken over; a live one refuses the run. Returns (lock path,
    whether this call created the folder); release_out_dir undoes both."""
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot be created ({e.strerror}); expected a writable folder") from e
    path, host = os.path.join(out, ".lock"), socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid, held_by = f.read().split(maxsplit=1)
                pid = int(pid)
            except (OSError, ValueError):
                pid, held_by = 0, host  # half-written by a process that died at that moment
            if held_by.strip() != host:  # another machine (a shared file system): its processes are not ours to see
                raise SystemExit(f"error: --out {out} is in use by process {pid} on {held_by.strip()}; if that run is "
                                 f"gone, delete {path}")
            # our own id is a previous life of this process id (a restarted container), never a live run
            if pid and pid != os.getpid() and pid_alive(pid):
                raise SystemExit(f"error: --out {out} is in use by another run (process {pid}); wait for it to end "
                                 "or choose another --out")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}")
        return path, created
    raise SystemExit(f"error: --out {out}: could not take {path}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return True


def release_out_dir(lock):
    """Remove the lock; a folder this run created and left empty (a failed start) goes too."""
    path, created = lock
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    folder = os.path.dirname(path)
    if created and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption notice) ask the loop to stop after the current
    step: it writes a checkpoint and exits, so `--resume auto` continues bit-exactly. A second SIGINT
    stops at once. Under torchrun the ranks agree on the step (requested() reduces the flag)."""

    def __init__(self):
        self.name, self.previous = None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.name and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.name = signal.Signals(signum).name

    def requested(self, world, device):
        if world == 1:
            return self.name is not None
        flag = torch.tensor([self.name is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank signalled: every rank stops at this step
        return bool(flag.item())


def check_not_another_run(out, resume):
    """Fail at once (before any teacher is loaded) if --out holds a run and --resume does not continue
    it: no --resume, or a --resume PATH from another folder (its run would write over this one's)."""
    held = checkpoint_paths(out) + [p for p in [os.path.join(out, "train_log.jsonl")] if os.path.exists(p)]
    elsewhere = resume not in (None, "auto") and \
        os.path.dirname(os.path.abspath(resume)) != os.path.abspath(out)
    if held and elsewhere:
        raise SystemExit(f"error: --resume {resume} is not in --out {out}, which holds another run; resume into "
                         "an empty --out (or into the checkpoint's own folder)")
    if held and resume is None:
        raise SystemExit(f"error: --out {out} already holds a run ({', '.join(os.path.basename(p) for p in held[-3:])}"
                         f"{', ...' if len(held) > 3 else ''}); continue it with --resume auto (a larger --max_steps "
                         "extends it), or choose another --out")


def check_output_dir(out, student):
    """Fail before training if --out is unwritable or the disk cannot hold two checkpoints."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: --out {out} is not writable: {e}")
    # weights + AdamW's two moments, float32, plus slack; two may exist at once during a save
    need = 2 * 3 * 4 * sum(p.numel() for p in student.parameters()) + (64 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        raise SystemExit(f"error: --out {out}: {free / 2**20:.0f} MiB free, checkpoints need about "
                         f"{need / 2**20:.0f} MiB; free space or choose another --out")


# ----------------------------------------------------------------------------
# 5. The training loop, in the order it runs: setup, then steps (each: lr, accum micro-batches,
#    clip, optimizer step), progress lines, validation, checkpoints
# ----------------------------------------------------------------------------


def setup_distributed(args):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; alone it is (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {args.device}: CUDA is not available on this machine (use --device cpu)")
        if device.type == "cuda" and device.index is None:  # --device cuda: this process's GPU
            device = torch.device("cuda", local)
    else:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_tf32(args.precision)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_attention_memory(args, dataset, cfg, device):
    """On a CPU, refuse before training a recording whose attention maps would not fit in memory: they
    grow with the square of its frames, and a CPU process out of memory is killed without a word (a
    GPU's out-of-memory error is caught and explained in optimizer_step). Estimate for the longest
    (cropped) utterance, as many of them as a batch holds: per student layer and head a (T x T) float32
    map in 3 copies kept for the backward pass (scores, probabilities, dropout: training on a CPU takes
    the explicit attention path); GenDistiller's teacher-forced pass attends over K slots x T frames."""
    if device.type != "cpu":
        return
    n, longest = max(enumerate(dataset.lengths), key=lambda item: item[1])
    tokens = data.frame_count(longest) * (len(cfg.target_layers) if cfg.head == "generator" else 1)
    per_batch = max(1, int(args.batch_seconds * data.SAMPLE_RATE) // longest)
    need = 3 * 4 * per_batch * cfg.num_layers * cfg.num_heads * tokens ** 2  # bytes
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        name = dataset.paths[n] if dataset.paths else dataset.names[n]
        raise ValueError(f"--data: {name} is {longest / data.SAMPLE_RATE:.0f} s long; the student's attention maps for "
                         f"it need about {need / 2 ** 30:.0f} GB ({cfg.num_layers} layers x {cfg.num_heads} heads x "
                         f"{tokens}^2 frames), more than this machine's {have / 2 ** 30:.0f} GB: "
                         "crop long recordings with --max_seconds (e.g. --max_seconds 30)")


def use_tf32(precision):
    """On GPUs, float32 matmuls (an fp32 teacher, fp32 parts of the student) run on the tensor cores as
    TF32, as PyTorch < 1.12 did by default on Ampere GPUs; --precision fp32 keeps full float32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"


def make_data(args, source, rank, world, seed, shuffle=True):
    """Dataset + length-bucketed sampler + DataLoader for --data / --val."""
    if source == "synthetic":
        corpus = data.SyntheticSpeech(seed=seed)
    else:
        corpus, _ = data.scan_audio(source, verbose=rank == 0)  # bad files: counted and named
    max_samples = int(args.max_seconds * data.SAMPLE_RATE) if args.max_seconds else None
    dataset = data.AudioDataset(corpus, max_samples=max_samples, seed=seed, skip_bad=True)
    # batches pack the cropped lengths, ordered by the full ones (s3prl's order: see LengthBucketSampler)
    sampler = data.LengthBucketSampler(dataset.lengths, int(args.batch_seconds * data.SAMPLE_RATE), seed=seed,
                                       shuffle=shuffle, rank=rank, world_size=world, sort_lengths=dataset.full_lengths)
    loader = data.make_loader(dataset, sampler, num_workers=args.workers, collate_fn=data.collate_checked)
    return dataset, sampler, loader


def batches(loader, sampler, epoch, start_batch, bad_files, source):
    """Endless (epoch, position, wav, lengths): position = batches of this epoch consumed after this one.

    A file that passed the scan but fails to decode is named, added to `bad_files` and left out
    of its batch (never a crash inside a worker, never silent); an empty batch is passed over.
    An epoch in which no file decoded at all stops the run (it would otherwise loop forever).
    """
    while True:
        sampler.set_epoch(epoch, start_batch=start_batch)
        yielded = False
        for position, (wav, lengths, bad) in enumerate(loader, start=start_batch + 1):
            for f in bad:
                if f.path not in bad_files:
                    print(f"warning: left out undecodable audio: {f.reason}", flush=True)
                bad_files[f.path] = f.reason
            if len(lengths):
                yielded = True
                yield epoch, position, wav, lengths
        if not yielded and start_batch == 0:
            raise SystemExit(f"error: --data {source}: no audio file could be decoded in a whole epoch "
                             f"({len(bad_files)} file(s) failed, e.g. {next(iter(bad_files.values()), '?')}); "
                             "the headers were readable, the audio is not")
        epoch, start_batch = epoch + 1, 0


def lr_at(step, args):
    """Linear warm-up over warmup * max_steps, then linear decay to 0 (all four recipes)."""
    warm = max(1, int(args.warmup * args.max_steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * max(0.0, (args.max_steps - step) / max(1, args.max_steps - warm))


def decayed(name, p):
    # choice: weight decay only on matrices and conv kernels; biases, norm gains, the mask and
    # slot embeddings and weight-norm gains (all 1-D or gain-shaped) are not decayed. (The official
    # ARMHuBERT run, through s3prl's optimizer, decayed every parameter whose name lacks "bias",
    # so fairseq's `layer_norm` gains, mask_emb and the weight-norm gain too.)
    return p.ndim >= 2 and "original0" not in name and "slot_emb" not in name


def decay_split(names, params):
    """(decayed names, the other names), each in the order of `names`: AdamW's two groups."""
    return [n for n in names if decayed(n, params[n])], [n for n in names if not decayed(n, params[n])]


def optimizer_order(names, params):
    """Parameter names in AdamW's index order: the decayed group, then the rest (param_groups)."""
    decay, rest = decay_split(names, params)
    return decay + rest


def param_groups(student, weight_decay):
    params = dict(student.named_parameters())
    decay, rest = decay_split(list(params), params)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in rest], "weight_decay": 0.0}]


def fast_optimizer_flags(device):
    """AdamW's fused kernel where torch has one (CPU, CUDA): the same update as the per-parameter
    loop (tested within fp tolerance), in one kernel instead of one per parameter; on this
    project's CPU it beat both the loop and foreach in a micro-benchmark."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def make_optimizer(student, args, device):
    return torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr, betas=args.betas, eps=args.eps,
                             **fast_optimizer_flags(device))


def autocast_dtype(args, device):
    if args.precision == "fp32" or (args.precision == "auto" and device.type != "cuda"):
        return None
    if args.precision == "fp16":
        return torch.float16
    if args.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass
class Run:
    """What one training run holds; setup() makes it, train() advances it, save_checkpoint() writes it."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    teacher: model.Teacher
    student: torch.nn.Module  # DistributedDataParallel-wrapped under torchrun
    raw: torch.nn.Module  # the student itself: checkpoints store its state_dict
    sampler: object
    loader: object
    val_loader: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Optional[torch.dtype]  # student autocast dtype, None = fp32
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch consumed
    skipped: int = 0  # non-finite steps skipped (--skip_nonfinite)
    say: object = print  # prints on rank 0 only (setup)


def build_student_for(args, teacher):
    """The run's student: model.build_student with the --student preset and --FIELD overrides,
    fitted to (and, where the preset says so, copied from) the teacher, checked against what the
    --method's step feeds it. Returns (student, notes)."""
    student, notes = model.build_student(args.student, teacher, args.overrides)  # ValueError: a bad field
    cfg, method = student.cfg, METHODS[args.method]
    if method.generator != (cfg.head == "generator"):
        need = "a generator student (--student gendistiller)" if method.generator else "a student that is not a generator"
        raise ValueError(f"--method {args.method} trains {need}; --student {args.student} has head={cfg.head!r}")
    if method.masks_input and not cfg.mask_embedding:
        raise ValueError(f"--method {args.method} masks the student input; --mask_embedding=false is not allowed")
    if cfg.head == "generator" and (cfg.layer_grad_scale or cfg.official_reuse):
        raise ValueError("--layer_grad_scale and --official_reuse are ARMHuBERT's; the GenDistiller generator has "
                         "neither")
    return student, notes


def setup(args):
    """Output folder check, distributed init, teacher, student, data, optimizer, resume, in this order."""
    check_not_another_run(args.out, args.resume)
    for flag in ("data", "val"):  # before a teacher is loaded (or downloaded)
        path = getattr(args, flag)
        if path not in (None, "synthetic") and not os.path.isdir(path):
            what = "is a file" if os.path.isfile(path) else "does not exist"
            raise ValueError(f"--{flag} {path}: {what}; expected a folder (LibriSpeech layout or any folder of "
                             "audio files) or 'synthetic'")
    rank, world, device = setup_distributed(args)
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    teacher = model.load_teacher(args.teacher, device)
    teacher.exact = args.teacher_precision == "fp32"
    student, fit_notes = build_student_for(args, teacher)
    raw = student.to(device)
    if args.compile:
        if device.type == "cpu":
            # note: torch 2.11's inductor writes C++ that does not compile (a vectorised blend of a scalar)
            # for one of ARMHuBERT's backward kernels on a CPU; scalar kernels compile. GPUs are unaffected.
            from torch._inductor import config as inductor_config
            inductor_config.cpp.simdlen = 0
        # in place (nn.Module.compile): parameter names, checkpoints and resume are those of eager mode
        raw.compile()
        for layer in teacher.model.encoder.transformer.layers:  # --target_point ffn calls the parts itself
            for part in ((layer,) if args.target_point == "block" else (layer.attention, layer.feed_forward)):
                part.compile()
    if rank > 0:
        # every rank built the same initial weights from args.seed; from here on each rank draws
        # its own dropout noise (rank 0 keeps exactly the stream of a single-process run)
        torch.manual_seed(args.seed + rank)
    check_output_dir(args.out, raw)
    if rank == 0:  # partial files of a run killed mid-save: never loaded, safe to delete
        for stale in glob.glob(os.path.join(args.out, "ckpt-*.pt.tmp.*")):
            os.remove(stale)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"method {args.method} (recipe: {RECIPES[args.method].source}), teacher {args.teacher} "
        f"({teacher.num_layers} layers, {teacher.dim}-d, {args.teacher_precision}), student {args.student}: "
        f"{model.count_parameters(raw) / 1e6:.2f}M parameters, targets = teacher layers {list(raw.cfg.target_layers)}")
    for note in args.applied + [f"student {n}" for n in fit_notes] + \
            [f"student {k}={v} (--{k})" for k, v in args.overrides.items()]:
        say(f"  override: {note}")
    if teacher.config["encoder_layer_norm_first"] and args.target_norm == "none" and METHODS[args.method].masks_input:
        # note: the README's kit ablation: with a pre-LN teacher, ARMHuBERT's per-layer MSE on raw
        # targets stayed near the loss of predicting each dimension's mean; normalised targets learned
        say("  warning: pre-LN teacher (its layers grow with depth) and raw targets; per-layer MSE on such "
            "targets barely learned in the README's kit ablation. Consider --target_norm layer_norm.")

    dataset, sampler, loader = make_data(args, args.data, rank, world, args.seed)
    val_loader = None
    if args.val:
        # every rank validates on the whole held-out set (rank 0 prints it), not on a shard
        _, _, val_loader = make_data(args, args.val, 0, 1, seed=args.seed + 1, shuffle=False)
    say(f"data: {len(dataset)} utterances, {len(sampler)} batches of <= {args.batch_seconds:g} s per rank per "
        f"epoch; {world} process(es) x accum {args.accum}")
    check_attention_memory(args, dataset, raw.cfg, device)

    optimizer = make_optimizer(raw, args, device)
    amp = autocast_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    run = Run(args, rank, world, device, teacher, student, raw, sampler, loader, val_loader, optimizer, scaler, amp,
              say=say)
    resume(run)
    if world > 1:
        run.student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    run.student.train()
    return run


def resume(run):
    """Load the --resume checkpoint (if any) into the run: weights, optimizer, scaler, step, data
    position and this rank's RNG state."""
    path = find_resume(run.args)
    if not path:
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    check_resumable(ckpt, path, run.args, run.raw.cfg, run.world)
    saved = model.upgrade_state_dict(ckpt["student"], run.raw.cfg)
    run.raw.load_state_dict(saved)
    run.optimizer.load_state_dict(optimizer_state_for(ckpt["optimizer"], list(saved), run.raw))
    for group in run.optimizer.param_groups:  # a checkpoint's own flags (older ones: the slow loop) give way
        group.update(fast_optimizer_flags(run.device))
    run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.epoch, run.position = ckpt["step"], ckpt["epoch"], ckpt["position"][run.rank]
    set_rng_state(ckpt["rng"][run.rank])
    run.say(f"resumed from {path} at step {run.step} (epoch {run.epoch}, batch {run.position})")
    old_max = ckpt["args"].get("max_steps", run.args.max_steps)
    if old_max != run.args.max_steps:
        # note: a continuation, not an exact resume: the schedule is the one of the new length
        before = argparse.Namespace(**{**vars(run.args), "max_steps": old_max})
        run.say(f"  --max_steps {old_max} -> {run.args.max_steps}: the learning-rate schedule is recomputed for "
                f"{run.args.max_steps} steps (lr at step {run.step}: {lr_at(run.step, before):.2e} -> "
                f"{lr_at(run.step, run.args):.2e}); data order, masks and RNG continue exactly")


def optimizer_state_for(opt_state, saved_names, student):
    """AdamW's state re-indexed for `student`'s parameter order. A checkpoint lists its parameters
    in `saved_names` order (its state dict, in today's names); GenDistiller checkpoints written
    from earlier versions listed the slot embedding first, so its moments must follow it by name."""
    params = dict(student.named_parameters())
    old, new = optimizer_order(saved_names, params), optimizer_order(list(params), params)
    if old == new:
        return opt_state
    where = {name: i for i, name in enumerate(old)}
    state = {i: opt_state["state"][where[n]] for i, n in enumerate(new) if where[n] in opt_state["state"]}
    return {**opt_state, "state": state}


def optimizer_step(run, stream, lr):
    """One update: `accum` micro-batches forward/backward, unscale, clip, then the optimizer step
    (or a skip of a non-finite one). Returns (loss, parts, grad norm, audio seconds, stepped)."""
    args, device, amp = run.args, run.device, run.amp
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss, step_parts, audio_s = 0.0, {}, 0.0  # this update's loss and its parts, over micro-steps
    for micro in range(args.accum):
        run.epoch, run.position, wav, lengths = next(stream)
        wav, lengths = wav.to(device, non_blocking=True), lengths.to(device, non_blocking=True)
        sync = contextlib.nullcontext() if run.world == 1 or micro == args.accum - 1 else run.student.no_sync()
        try:
            with sync, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, parts = distillation_loss(args, run.teacher, run.student, wav, lengths, run.step, run.rank, micro)
                # choice: each micro-batch's loss is already a mean over its own valid frames;
                # micro-batches (and, through DDP's gradient mean, ranks) then weigh equally,
                # as in s3prl and the official ARMHuBERT code (fairseq divides by the update's
                # total frame count instead)
                run.scaler.scale(loss / args.accum).backward()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise  # a CPU's out-of-memory is a RuntimeError of the allocator; other errors are not ours
            if run.world > 1:
                dist.destroy_process_group()  # the other ranks fail instead of waiting forever
            raise SystemExit(f"error: out of memory at step {run.step} on a batch of {len(lengths)} utterances, "
                             f"{float(lengths.sum()) / data.SAMPLE_RATE:.0f} s of audio; lower --batch_seconds "
                             f"(now {args.batch_seconds:g}) and raise --accum (now {args.accum}) to keep the "
                             "effective batch, or set --max_seconds")
        for k, v in parts.items():
            step_parts[k] = step_parts.get(k, 0.0) + float(v) / args.accum
        step_loss += loss.item() / args.accum
        audio_s += float(lengths.sum()) / data.SAMPLE_RATE * run.world
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.clip, foreach=True)
    # note: with fp16 an inf gradient is the scaler's business (it skips the step and lowers its
    # scale); a non-finite loss, or a non-finite gradient in bf16/fp32, is a real divergence
    bad = not math.isfinite(step_loss) or (not math.isfinite(float(grad_norm)) and amp != torch.float16)
    if run.world > 1:  # decide together: one rank stopping alone would leave the others waiting
        flag = torch.tensor(float(bad), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        detail = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
        if not args.skip_nonfinite:
            last = checkpoint_paths(args.out)
            raise SystemExit(f"error: non-finite loss or gradient at step {run.step} (loss {step_loss:.4g}, "
                             f"{detail}, grad norm {float(grad_norm):.4g}); stopped without saving. Last good "
                             f"checkpoint: {last[-1] if last else 'none'}. Lower --lr or use --skip_nonfinite.")
        run.skipped += 1
        run.say(f"warning: step {run.step}: non-finite loss/gradient ({detail}); skipped ({run.skipped} so far)")
    else:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return step_loss, step_parts, float(grad_norm), audio_s, not bad


@torch.no_grad()
def validate(args, teacher, student, val_loader, device):
    """Mean held-out distillation loss over the fixed validation batches (eval mode, fixed masks)."""
    student.eval()
    total, n = 0.0, 0
    val_loader.batch_sampler.set_epoch(0)
    for i, (wav, lengths, _) in enumerate(val_loader):  # undecodable files: named by the training loop
        if i >= args.val_batches:
            break
        if not len(lengths):
            continue
        # note: validation masks/negatives use steps 10^9 + i, never a training step's seed
        loss, _ = distillation_loss(args, teacher, student, wav.to(device), lengths.to(device), 10 ** 9 + i, 0)
        total, n = total + float(loss), n + 1
    student.train()
    return total / max(n, 1)


def save_checkpoint(run):
    """Write ckpt-STEP.pt atomically on rank 0 with every rank's RNG state and data position (gathered)
    so each rank resumes exactly; keep the newest --keep."""
    args = run.args
    state = {"rng": rng_state(), "position": run.position}
    states = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(states, state)
    else:
        states = [state]
    if run.rank == 0:
        atomic_save({"format": 1, "method": args.method, "teacher": args.teacher, "step": run.step, "epoch": run.epoch,
                     "position": [s["position"] for s in states], "rng": [s["rng"] for s in states],
                     "config": dataclasses.asdict(run.raw.cfg), "student": run.raw.state_dict(),
                     "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                     "args": {k: v for k, v in simple_args(args).items() if not isinstance(v, tuple)}},
                    os.path.join(args.out, f"ckpt-{run.step:08d}.pt"))
        # keep the newest --keep up to this step; a checkpoint of a later step (from a run this one
        # resumed before it) is never this run's to delete
        mine = [p for p in checkpoint_paths(args.out) if checkpoint_step(p) <= run.step]
        for old in mine[:-args.keep]:
            os.remove(old)
    if run.world > 1:
        dist.barrier()


def simple_args(args):
    """The flags as JSON-able values (for checkpoints and the log)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None), tuple))}


def open_log(run):
    """OUT/train_log.jsonl, one JSON object per line: first {"run": method, teacher, flags, student
    config}, then one row per progress line and one per validation. A resumed run drops the rows
    after its checkpoint's step (they are logged again), so each step keeps one row."""
    args, path = run.args, os.path.join(run.args.out, "train_log.jsonl")
    first = {"run": {"method": args.method, "teacher": args.teacher, "student": args.student, "processes": run.world,
                     "config": dataclasses.asdict(run.raw.cfg), "args": simple_args(args)}}
    if run.step == 0 or not os.path.exists(path):  # fresh (an old log here had no checkpoint: it started over)
        with open(path, "w") as f:
            f.write(json.dumps(first) + "\n")
    else:
        rows = []
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a run killed mid-write
                    pass
        if not any("run" in r for r in rows):  # a log of an older version: the run row first
            rows.insert(0, first)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= run.step)
        os.replace(path + ".tmp", path)
    if run.step > 0:  # a resume: say so in the log, with the flags it resumed with (--max_steps may have grown)
        with open(path, "a") as f:
            f.write(json.dumps({"resume": {"step": run.step, "args": simple_args(args)}}) + "\n")
    return open(path, "a")


def train(run, stop):
    """Steps until --max_steps: a progress line every --log_every steps (and a train_log.jsonl row),
    a validation loss every --val_every, a checkpoint every --save_every and at the end; after a
    SIGINT / SIGTERM (`stop`), a checkpoint and exit."""
    args = run.args
    bad_files = {}  # path -> reason, files that failed to decode during training
    stream = batches(run.loader, run.sampler, run.epoch, run.position, bad_files, args.data)
    log_file = open_log(run) if run.rank == 0 else None
    t_log, audio_s, sums, since_log, warned_share = time.time(), 0.0, {}, 0, False
    while run.step < args.max_steps:
        lr = lr_at(run.step, args)
        loss, parts, grad_norm, audio, stepped = optimizer_step(run, stream, lr)
        audio_s += audio
        if stepped:
            for k, v in {**parts, "loss": loss, "grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + v
            since_log += 1
        step = run.step
        if (step % args.log_every == 0 or step == args.max_steps) and since_log:
            n, dt = since_log, time.time() - t_log
            row = {k: v / n for k, v in sums.items()}
            ms = 1000 * dt / n
            eta = (args.max_steps - step) * dt / n
            line = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "grad_norm" and not k.startswith("_"))
            run.say(f"step {step}/{args.max_steps} | {line} | gnorm {row['grad_norm']:.2f} | lr {lr:.2e} | "
                    f"{ms:.0f} ms/step | {audio_s / dt:.1f} audio s/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            if row.get("mask_share", 1.0) < 0.5 * args.mask_prob and not warned_share:
                warned_share = True
                run.say(f"  warning: the student saw {row['mask_share']:.2f} of its frames masked, far below "
                        f"--mask_prob {args.mask_prob} (many very short utterances, or --mask_same_rows too large?)")
            if log_file:
                log_file.write(json.dumps({"step": step, "lr": lr, "ms_per_step": ms, "audio_s_per_s": audio_s / dt, **row}) + "\n")
                log_file.flush()
            sums, t_log, audio_s, since_log = {}, time.time(), 0.0, 0
        if run.val_loader is not None and (step % args.val_every == 0 or step == args.max_steps):
            val = validate(args, run.teacher, run.raw, run.val_loader, run.device)  # unwrapped: no DDP collectives
            run.say(f"step {step}/{args.max_steps} | validation loss {val:.4f}")
            if log_file:
                log_file.write(json.dumps({"step": step, "val_loss": val}) + "\n")
                log_file.flush()
        saved = step % args.save_every == 0 or step == args.max_steps
        if saved:
            save_checkpoint(run)
        if stop.requested(run.world, run.device):
            if not saved:
                save_checkpoint(run)
            run.say(f"stopped by {stop.name or 'another rank'} after step {step}: checkpoint "
                    f"{os.path.join(args.out, f'ckpt-{step:08d}.pt')} written; continue with the same command "
                    "and --resume auto")
            raise SystemExit(128 + (signal.SIGINT if stop.name == "SIGINT" else signal.SIGTERM))
    run.say(f"done: {run.step} steps, {run.skipped} skipped, {len(bad_files)} undecodable file(s) left out; student in "
            f"{os.path.join(args.out, f'ckpt-{run.step:08d}.pt')} (load with model.load_student)")
    if log_file:
        log_file.close()


def main(argv=None):
    args = parse_args(argv)
    if args.quick_start and int(os.environ.get("RANK", "0")) == 0:
        print(f"quick start: the random 'tiny' teacher on a synthetic corpus, smoke settings; a smoke test, not a "
              f"distillation. A real run: python distill.py --method {args.method} --teacher {PAPER_TEACHER} "
              "--data /path/to/LibriSpeech/train-clean-100 --val /path/to/LibriSpeech/dev-clean", flush=True)
    run, lock = None, None
    try:
        try:
            if int(os.environ.get("RANK", "0")) == 0:
                lock = lock_out_dir(args.out)  # before anything else: a second run on this folder stops here
            run = setup(args)
        except (ValueError, OSError, EOFError) as e:  # bad input at start: a teacher, a folder, a file
            if args.traceback:
                raise
            usage_error(f"{one_line(e)} (--traceback shows where)")
        with StopSignal() as stop:  # from the first step on: Ctrl-C while loading simply stops
            train(run, stop)
    finally:
        if lock:
            release_out_dir(lock)
        # subtle: a process whose gloo process group is still alive when the interpreter shuts down can
        # abort in C++ ("terminate called without an active exception", SIGABRT) as gloo's threads are
        # torn down. destroy_process_group alone is not enough: the DDP wrapper's reducer keeps the group
        # alive until the wrapper is freed. So, on every way out: drop the wrapper, collect it, destroy.
        if run is not None:
            run.student = run.raw = run.optimizer = None
        if sys.exc_info()[2] is not None:  # an error's frames hold the wrapper too (a forward's `student`)
            traceback.clear_frames(sys.exc_info()[2])
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
