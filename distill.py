"""Distil a frozen speech SSL teacher into a compact student: the papers' recipes, one step per method, the loop.

  1. recipes: each paper's optimizer, schedule, batch and masking, the defaults of the flags
  2. one step per method (METHODS): its teacher passes, its mask, its loss (losses.py)
       DistilHuBERT       Chang et al., arXiv 2110.01900; s3prl's distiller
       ARMHuBERT          Jang et al., Recycle-and-Distill, arXiv 2305.11685; official code sungnyun/ARMHuBERT
       CoLLD              Chang et al., arXiv 2309.07707; its design as USAD describes it (arXiv 2506.18843, Sec. III)
       GenDistiller       Gao et al., arXiv 2310.13418 and 2406.09444
  3. the loop: setup, resume, steps (lr, accum micro-batches, clip, optimizer step), progress lines, validation,
     checkpoints; alone or under torchrun (DDP), never branching on the method
  4. checkpoints: atomic writes, exact resume, one run per folder
  5. the command line: recipe defaults, grouped flags, --FIELD=VALUE student overrides

Examples:
    python distill.py --method gendistiller      # offline quick start: tiny teacher, synthetic corpus, ~1 min on CPU
    python distill.py --method armhubert --teacher hubert_base --data /data/LibriSpeech/train-clean-100
    torchrun --nproc-per-node=4 distill.py --method distilhubert --teacher hubert_base --data /data/LibriSpeech
"""
import argparse
import contextlib
import dataclasses
import fcntl
import gc
import glob
import json
import math
import os
import re
import signal
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
# 1. Recipes: the papers' settings, the defaults of every flag
# ----------------------------------------------------------------------------

# LibriSpeech 960 h: 281,241 utterances, 12.3 s on average. Batches are given in seconds of audio per process and
# micro-step (--batch_seconds); utterance counts convert with 12.3 s.
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
    max_seconds: Optional[float] = None  # random crop of longer utterances (None: whole utterances)
    teacher_final_norm: bool = False  # pre-LN teachers: the last target includes the final LayerNorm
    # on GPUs: "fp32" (autocast off around the teacher, matmuls in TF32) or "auto" (under the student's autocast);
    # on a CPU both are float32 unless --precision bf16/fp16
    teacher_precision: str = "fp32"
    target_point: str = "block"  # of each teacher block: "block" (its output) or "ffn" (model.teacher_block)
    source: str = ""


RECIPES = {
    # DistilHuBERT paper: batch 24 utterances (~295 s), 200k steps, lr 2e-4, 7 % warm-up, clip 5.
    # Teacher in float32: s3prl switches autocast off around it (pretrain_expert.py), on a PyTorch whose float32
    # matmuls ran as TF32 on Ampere GPUs by default (setup_distributed enables TF32 likewise).
    # Weight decay 0.01: s3prl's distiller builds its AdamW with AdamW_with_schedule's parameter groups, 0.01 on
    # every parameter whose name lacks "bias" (as ARMHuBERT's below; see param_groups).
    # s3prl crops utterances to 250,000 samples (15.625 s, pretrain/distiller config sequence_length) and reads
    # teacher layers as its HuBERT upstream's hidden_states, whose last entry is the encoder output, after the
    # final LayerNorm of a pre-LN teacher.
    "distilhubert": Recipe("distilhubert", 2e-4, (0.9, 0.98), 1e-6, 0.01, 0.07, 5.0, 200_000, 295.0, 1, 0.0,
                           max_seconds=15.625, teacher_final_norm=True, source="DistilHuBERT paper / s3prl config"),
    # ARMHuBERT (Recycle-and-Distill, official armhubert-960.yaml): 144 utterances per update (~1770 s)
    # = 18 per GPU x 2 GPUs x accumulation 4, here 8 micro-steps of ~221 s; 200 epochs = 1953 updates x 200.
    # Weight decay: the yaml says 1e-6, but s3prl's AdamW_with_schedule overrides it in its two parameter groups:
    # 0.01 on every parameter whose name lacks "bias" (see param_groups), 0 on biases.
    # choice: clip 10.0 (fairseq's HuBERT value; the official config states none).
    # Masking: fairseq's compute_mask_indices as the official config sets it: p 0.8, span lengths uniform in
    # 0..2 x 10, at least 2 spans, no overlap, 1 frame between spans (draw_mask).
    # Targets: forward hooks on the teacher's layers, i.e. block outputs without a final LayerNorm.
    # Teacher under autocast: the official Lightning run (precision=16) wraps the teacher like the student.
    "armhubert": Recipe("armhubert", 5e-3, (0.9, 0.98), 1e-6, 0.01, 0.05, 10.0, 390_600, 221.0, 8, 0.8,
                        teacher_precision="auto", source="Recycle-and-Distill paper + official armhubert-960.yaml"),
    # CoLLD: no public recipe. Its targets are the teacher's FFN features (USAD, Sec. III-B). choice: ARMHuBERT's
    # optimizer, batch and masking, with the maskhubert geometry's lr 5e-4 (the default student), and 200k steps;
    # teacher under autocast.
    "colld": Recipe("colld", 5e-4, (0.9, 0.98), 1e-6, 0.01, 0.05, 10.0, 200_000, 221.0, 8, 0.8,
                    teacher_precision="auto", target_point="ffn", source="choice (no public recipe)"),
    # GenDistiller: no public recipe. choice: the DistilHuBERT recipe it compares to (float32 teacher).
    "gendistiller": Recipe("gendistiller", 2e-4, (0.9, 0.98), 1e-6, 0.01, 0.07, 5.0, 200_000, 295.0, 1, 0.0,
                           max_seconds=15.625, teacher_final_norm=True, source="choice: DistilHuBERT's recipe"),
}
# Recycle-and-Distill: MaskHuBERT (no attention-map reuse) trains with lr 5e-4 instead of ARMHuBERT's 5e-3.
PRESET_LR = {"maskhubert": 5e-4}

# `--data synthetic` is the smoke test: unless given, these replace the paper recipe so a run takes about a minute
# on a laptop CPU. Printed when applied.
SMOKE = dict(max_steps=60, batch_seconds=8.0, accum=1, warmup=0.1, log_every=10, save_every=30, val_every=20)

# `python distill.py --method M` with neither --teacher nor --data is the offline quick start: the random `tiny`
# teacher on the synthetic corpus with the smoke settings above. With --data alone the teacher is the papers'
# (HuBERT Base; a torchaudio bundle, downloaded once).
PAPER_TEACHER = "hubert_base"

# ----------------------------------------------------------------------------
# 2. One step per method: its teacher passes, its mask, its loss
#
# step_METHOD(args, teacher, student, wav, lengths, seeds) -> (loss, parts) of one micro-batch: wav (B, S), lengths
# (B,) samples; seeds = [seed, step, micro-step, rank] seed the masks and CoLLD's negatives, so a resumed run redraws
# them exactly. The teacher runs without grad, in float32 (--teacher_precision fp32: Teacher.exact) or under the
# caller's autocast like the student (auto). Targets: teacher layer k = layers[k - 1] (model.py, the teacher).
# ----------------------------------------------------------------------------


def unwrap(student):
    """The student module itself, also when DistributedDataParallel wraps it."""
    return student.module if hasattr(student, "module") else student


def draw_mask(args, teacher, lengths, seeds):
    """The span mask M (B, T) over the teacher's frames and the valid frames (B,) it was drawn on: the official
    ARMHuBERT masking (spans of uniform length, no overlap; see its recipe). Seeded by `seeds`: a resumed run redraws
    it, the micro-batches of one update differ."""
    frames = data.frame_count(lengths, teacher.conv_layers)  # (B,) valid frames
    mask = data.compute_mask_indices(frames.cpu(), int(frames.max()), args.mask_prob, args.mask_length, "uniform",
                                     no_overlap=True, same_count_rows=args.mask_same_rows or None,
                                     rng=np.random.default_rng(seeds))
    return mask.to(lengths.device), frames


def step_distilhubert(args, teacher, student, wav, lengths, seeds):
    """DistilHuBERT (Eq. 1, lambda = 1): clean teacher layers 4, 8, 12; L1 + cosine on the heads' predictions."""
    layers, frame_lengths = teacher(wav, lengths, final_norm=args.teacher_final_norm, point=args.target_point)
    targets = losses.teacher_targets(layers, unwrap(student).cfg.target_layers, args.target_norm)
    preds, _ = student(wav, lengths)
    return losses.distilhubert_loss(preds, targets, frame_lengths)


def step_armhubert(args, teacher, student, wav, lengths, seeds):
    """ARMHuBERT's masking distillation (Recycle-and-Distill, Sec. 3.2): one span mask M; the student sees the
    masked input; masked frames regress the teacher on clean input, unmasked frames the teacher on the same
    masked input (a second teacher pass, as the official code does); layers weigh 0.1, the last 1.0 (official)."""
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
    loss, parts = losses.masking_distillation_loss(preds, clean, masked, mask, frame_lengths)
    # logged, not a loss term: the share of valid frames the student saw masked
    return loss, {**parts, "mask_share": mask.sum() / frames.sum().clamp(min=1)}


def step_colld(args, teacher, student, wav, lengths, seeds):
    """CoLLD: one span mask M; the student sees the masked input; InfoNCE between the student's heads and every
    teacher layer's FFN feature on clean input (as USAD describes it, Sec. III-A/B), anchored at every valid
    frame (choice; --colld_include_unmasked=false: at the masked frames only)."""
    mask, frames = draw_mask(args, teacher, lengths, seeds)  # (B, T) bool, (B,)
    clean, frame_lengths = teacher(wav, lengths, final_norm=args.teacher_final_norm, point=args.target_point)
    targets = losses.teacher_targets(clean, unwrap(student).cfg.target_layers, args.target_norm)
    preds, _ = student(wav, lengths, mask=mask)
    # the negatives: a torch generator seeded from the same seed sequence as the mask
    seed = int(np.random.default_rng(seeds).integers(2 ** 62))
    gen = torch.Generator(device=wav.device).manual_seed(seed)  # drawn where the loss runs (GPU: no copy)
    if args.colld_objective == "l1_cosine":  # USAD's ablation: regression on the anchors InfoNCE would use
        anchors = None if args.colld_include_unmasked else mask
        loss, parts = losses.distilhubert_loss(preds, targets, frame_lengths, frames=anchors)
    else:
        loss, parts = losses.colld_loss(preds, targets, mask, frame_lengths, args.colld_negatives,
                                        args.colld_temperature, args.colld_include_unmasked, generator=gen)
    return loss, {**parts, "mask_share": mask.sum() / frames.sum().clamp(min=1)}


def step_gendistiller(args, teacher, student, wav, lengths, seeds):
    """GenDistiller: teacher forcing feeds the true layers l_1..l_{K-1} as history (--gen_feed teacher); --gen_feed
    self runs the generator free; DistilHuBERT's loss on each generated layer. Validation (eval mode) always runs
    free, as the deployed model does."""
    layers, frame_lengths = teacher(wav, lengths, final_norm=args.teacher_final_norm, point=args.target_point)
    targets = losses.teacher_targets(layers, unwrap(student).cfg.target_layers, args.target_norm)
    history = targets[:-1] if args.gen_feed == "teacher" and student.training else None
    preds, _ = student(wav, lengths, history=history)
    return losses.gendistiller_loss(preds, targets, frame_lengths)


@dataclass(frozen=True)
class Method:
    step: object  # step_METHOD above
    masks_input: bool  # the student sees span-masked input (it needs a mask embedding, --mask_prob applies)
    generator: bool  # the student is GenDistiller's generator (head "generator"); the others are not


METHODS = {"distilhubert": Method(step_distilhubert, masks_input=False, generator=False),
           "armhubert": Method(step_armhubert, masks_input=True, generator=False),
           "colld": Method(step_colld, masks_input=True, generator=False),
           "gendistiller": Method(step_gendistiller, masks_input=False, generator=True)}


def distillation_loss(args, teacher, student, wav, lengths, step, rank=0, micro=0):
    """(loss, parts) of one micro-batch: the --method's step.

    subtle: the frame counts of the two conv stacks are checked before any forward: the mask (masked methods) and
    the history (GenDistiller) have the teacher's frame count, so a student with another stride would otherwise
    stop inside its forward with a bare tensor-size error."""
    teacher_frames = data.frame_count(lengths, teacher.conv_layers)
    student_frames = data.frame_count(lengths, unwrap(student).cfg.conv_layers)
    if not torch.equal(teacher_frames, student_frames):
        raise RuntimeError(f"teacher and student frame counts differ: teacher {teacher_frames.tolist()}, student "
                           f"{student_frames.tolist()}; their conv stacks must have the same total stride (320) "
                           "and receptive field (400)")
    return METHODS[args.method].step(args, teacher, student, wav, lengths, [args.seed, step, micro, rank])


# ----------------------------------------------------------------------------
# 3. The loop, in the order it runs: setup, resume, then steps (lr, accum micro-batches, clip, optimizer step),
#    progress lines, validation, checkpoints
# ----------------------------------------------------------------------------


def setup_distributed(args):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; alone it is (0, 1)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {args.device}: CUDA is not available on this machine (use --device cpu)")
        if device.index is None:  # this process's GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        use_tf32(args.precision)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def use_tf32(precision):
    """On GPUs, float32 matmuls (an fp32 teacher, fp32 parts of the student) run on the tensor cores as TF32, as
    PyTorch < 1.12 did by default on Ampere GPUs; --precision fp32 keeps full float32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"


def autocast_dtype(args, device):
    """The student's autocast dtype; None: float32."""
    if args.precision == "fp32" or (args.precision == "auto" and device.type != "cuda"):
        return None
    if args.precision == "fp16":
        return torch.float16
    return torch.bfloat16 if args.precision == "bf16" or torch.cuda.is_bf16_supported() else torch.float16


def make_data(args, source, rank, world, seed, shuffle=True):
    """Dataset, length-bucketed sampler and DataLoader for --data / --val."""
    corpus = data.SyntheticSpeech(seed=seed) if source == "synthetic" else data.scan_audio(source, verbose=rank == 0)[0]
    max_samples = int(args.max_seconds * data.SAMPLE_RATE) if args.max_seconds else None
    dataset = data.AudioDataset(corpus, max_samples=max_samples, seed=seed, skip_bad=True)
    # batches pack the cropped lengths, ordered by the full ones (s3prl's order: see LengthBucketSampler)
    sampler = data.LengthBucketSampler(dataset.lengths, int(args.batch_seconds * data.SAMPLE_RATE), seed=seed,
                                       shuffle=shuffle, rank=rank, world_size=world, sort_lengths=dataset.full_lengths)
    loader = data.make_loader(dataset, sampler, num_workers=args.workers, collate_fn=data.collate_checked)
    return dataset, sampler, loader


def batches(loader, sampler, epoch, start_batch, bad_files, source):
    """Endless (epoch, position, wav, lengths): position = batches of this epoch consumed after this one.
    A file that fails to decode is named, added to `bad_files` and left out of its batch (never a crash in a
    worker, never silent); an epoch in which no file decoded stops the run (it would loop forever)."""
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


def param_groups(student, weight_decay):
    """AdamW's two groups, decayed then not, each in parameter order. choice: decay only matrices and conv kernels,
    not biases, norm gains, the mask and slot embeddings or weight-norm gains. (The official ARMHuBERT run, through
    s3prl's optimizer, decayed every parameter whose name lacks "bias": layer_norm gains and mask_emb too.)"""
    groups = ([], [])
    for name, p in student.named_parameters():
        groups[p.ndim < 2 or "original0" in name or "slot_emb" in name].append(p)
    return [{"params": groups[0], "weight_decay": weight_decay}, {"params": groups[1], "weight_decay": 0.0}]


def make_optimizer(student, args, device):
    """AdamW, with its fused kernel where torch has one (the per-parameter loop's update, tested, in one kernel)."""
    return torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr, betas=args.betas, eps=args.eps,
                             fused=device.type in ("cpu", "cuda") or None)


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
    say: object  # print on rank 0, nothing on the others
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch consumed
    skipped: int = 0  # non-finite steps skipped (--skip_nonfinite)


def build_student_for(args, teacher):
    """(student, notes): the --student preset with the --FIELD overrides, fitted to (and where the preset says so
    copied from) the teacher, checked against what the --method's step feeds it."""
    student, notes = model.build_student(args.student, teacher, args.overrides)  # ValueError: a bad field
    cfg, method = student.cfg, METHODS[args.method]
    if method.generator != (cfg.head == "generator"):
        need = "a generator student (--student gendistiller)" if method.generator else "a student, not a generator"
        raise ValueError(f"--method {args.method} trains {need}; --student {args.student} has head={cfg.head!r}")
    if method.masks_input and not cfg.mask_embedding:
        raise ValueError(f"--method {args.method} masks the student input; --mask_embedding=false is not allowed")
    if cfg.head == "generator" and (cfg.layer_grad_scale or cfg.official_reuse):
        raise ValueError("--layer_grad_scale and --official_reuse are ARMHuBERT's; the GenDistiller generator has "
                         "neither")
    return student, notes


def check_attention_memory(args, dataset, cfg, device):
    """On a CPU, refuse a recording whose attention maps cannot fit in memory (a CPU process out of memory is killed
    without a word): per student layer and head a (T x T) float32 map in 3 copies kept for the backward (scores,
    probabilities, dropout), for as many of the longest utterance as a batch holds; GenDistiller attends over K x T."""
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


def setup(args):
    """Distributed init, teacher, student, data, optimizer, resume, in this order (main took the folder)."""
    for flag in ("data", "val"):  # before a teacher is loaded (or downloaded)
        path = getattr(args, flag)
        if path not in (None, "synthetic") and not os.path.isdir(path):
            raise ValueError(f"--{flag} {path}: {'is a file' if os.path.isfile(path) else 'does not exist'}; expected "
                             "a folder (LibriSpeech layout or any folder of audio files) or 'synthetic'")
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
        raw.compile()  # in place: parameter names, checkpoints and resume are those of eager mode
        for layer in teacher.model.encoder.transformer.layers:  # --target_point ffn calls the parts itself
            for part in ((layer,) if args.target_point == "block" else (layer.attention, layer.feed_forward)):
                part.compile()
    if rank > 0:  # from here on each rank draws its own dropout noise (rank 0 keeps a single process's stream)
        torch.manual_seed(args.seed + rank)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"method {args.method} (recipe: {RECIPES[args.method].source}), teacher {args.teacher} "
        f"({teacher.num_layers} layers, {teacher.dim}-d, {args.teacher_precision}), student {args.student}: "
        f"{model.count_parameters(raw) / 1e6:.2f}M parameters, targets = teacher layers {list(raw.cfg.target_layers)}")
    for note in args.applied + [f"student {n}" for n in fit_notes] + \
            [f"student {k}={v} (--{k})" for k, v in args.overrides.items()]:
        say(f"  override: {note}")
    if teacher.config["encoder_layer_norm_first"] and args.target_norm == "none" and METHODS[args.method].masks_input:
        # note: with a pre-LN teacher, ARMHuBERT's per-layer MSE on raw targets stayed near the loss of
        # predicting each dimension's mean in the README's kit ablation; normalised targets learned
        say("  warning: pre-LN teacher (its layers grow with depth) and raw targets; per-layer MSE on such "
            "targets barely learned in the README's kit ablation. Consider --target_norm layer_norm.")
    dataset, sampler, loader = make_data(args, args.data, rank, world, args.seed)
    # every rank validates on the whole held-out set (rank 0 prints it), not on a shard
    val_loader = make_data(args, args.val, 0, 1, seed=args.seed + 1, shuffle=False)[2] if args.val else None
    say(f"data: {len(dataset)} utterances, {len(sampler)} batches of <= {args.batch_seconds:g} s per rank per "
        f"epoch; {world} process(es) x accum {args.accum}")
    check_attention_memory(args, dataset, raw.cfg, device)
    amp = autocast_dtype(args, device)
    run = Run(args, rank, world, device, teacher, student, raw, sampler, loader, val_loader,
              make_optimizer(raw, args, device), torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
              amp, say)
    resume(run)
    if world > 1:
        run.student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    run.student.train()
    return run


def resume(run):
    """Load --resume (auto: the newest checkpoint in --out, if any): weights, optimizer, scaler, step, data position,
    this rank's RNG."""
    args, path = run.args, run.args.resume
    if path == "auto":
        path = (checkpoint_paths(args.out) or [None])[-1]
        if path is None:
            print(f"note: --resume auto: no checkpoint in {args.out}; starting a new run", flush=True)
    if path is None:
        return
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, damaged or not a torch file: name it
        raise SystemExit(f"error: --resume {path}: cannot be read as a checkpoint ({type(e).__name__}: "
                         f"{one_line(e)[:200]}); it may be truncated: delete it, or name an earlier one")
    check_resumable(ckpt, path, args, run.raw, run.world)
    run.raw.load_state_dict(ckpt["student"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    for group in run.optimizer.param_groups:  # this device's kernel, whichever device wrote the checkpoint
        group["fused"] = run.optimizer.defaults["fused"]
    run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.epoch, run.position = ckpt["step"], ckpt["epoch"], ckpt["position"][run.rank]
    rng = ckpt["rng"][run.rank]
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.say(f"resumed from {path} at step {run.step} (epoch {run.epoch}, batch {run.position})")
    old_max = ckpt["args"]["max_steps"]
    if old_max != args.max_steps:  # note: a continuation, not an exact resume: the schedule is the new length's
        before = lr_at(run.step, argparse.Namespace(**{**vars(args), "max_steps": old_max}))
        run.say(f"  --max_steps {old_max} -> {args.max_steps}: the learning-rate schedule is recomputed (lr at step "
                f"{run.step}: {before:.2e} -> {lr_at(run.step, args):.2e}); data order, masks and RNG continue exactly")


def optimizer_step(run, stream, lr):
    """One update: `accum` micro-batches forward/backward, unscale, clip, then the optimizer step (or a skip of a
    non-finite one). Returns (loss, parts, grad norm, audio seconds, stepped)."""
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
                # choice: each micro-batch's loss is already a mean over its own valid frames; micro-batches
                # (and, through DDP's gradient mean, ranks) then weigh equally, as in s3prl and the official
                # ARMHuBERT code (fairseq divides by the update's total frame count instead)
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
    # note: with fp16 an inf gradient is the scaler's business (it skips the step and lowers its scale);
    # a non-finite loss, or a non-finite gradient in bf16/fp32, is a real divergence
    bad = not math.isfinite(step_loss) or (not math.isfinite(float(grad_norm)) and amp != torch.float16)
    bad = any_rank(bad, run)  # decided together: one rank stopping alone would leave the others waiting
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


def any_rank(flag, run):
    """`flag` alone; under torchrun, true on every rank when it is true on one."""
    if run.world == 1:
        return flag
    flag = torch.tensor(float(flag), device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption notice) ask the loop to stop after the current step: it
    writes a checkpoint and exits, so `--resume auto` continues bit-exactly. A second SIGINT stops at once."""

    def __enter__(self):
        self.name = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.name and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.name = signal.Signals(signum).name


def train(run, stop):
    """Steps until --max_steps: a progress line (and a train_log.jsonl row) every --log_every steps, a validation
    loss every --val_every, a checkpoint every --save_every and at the end; after SIGINT / SIGTERM (`stop`; under
    torchrun one rank's signal stops every rank at the same step), a checkpoint and exit."""
    args = run.args
    bad_files = {}  # path -> reason, files that failed to decode during training
    stream = batches(run.loader, run.sampler, run.epoch, run.position, bad_files, args.data)
    log = open_log(run) if run.rank == 0 else None
    t_log, audio_s, sums, since_log, warned_share = time.time(), 0.0, {}, 0, False
    while run.step < args.max_steps:
        lr = lr_at(run.step, args)
        loss, parts, grad_norm, audio, stepped = optimizer_step(run, stream, lr)
        audio_s += audio
        if stepped:
            for k, v in {**parts, "loss": loss, "grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + v
            since_log += 1
        step, last = run.step, run.step == args.max_steps
        if (step % args.log_every == 0 or last) and since_log:
            n, dt = since_log, time.time() - t_log
            row = {k: v / n for k, v in sums.items()}
            ms, eta = 1000 * dt / n, time.strftime("%H:%M:%S", time.gmtime((args.max_steps - step) * dt / n))
            line = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "grad_norm" and not k.startswith("_"))
            run.say(f"step {step}/{args.max_steps} | {line} | gnorm {row['grad_norm']:.2f} | lr {lr:.2e} | "
                    f"{ms:.0f} ms/step | {audio_s / dt:.1f} audio s/s | ETA {eta}")
            if row.get("mask_share", 1.0) < 0.5 * args.mask_prob and not warned_share:
                warned_share = True
                run.say(f"  warning: the student saw {row['mask_share']:.2f} of its frames masked, far below "
                        f"--mask_prob {args.mask_prob} (many very short utterances, or --mask_same_rows too large?)")
            if log:
                log.write(json.dumps({"step": step, "lr": lr, "ms_per_step": ms, "audio_s_per_s": audio_s / dt,
                                      **row}) + "\n")
            sums, t_log, audio_s, since_log = {}, time.time(), 0.0, 0
        if run.val_loader is not None and (step % args.val_every == 0 or last):
            val = validate(args, run.teacher, run.raw, run.val_loader, run.device)  # unwrapped: no DDP collectives
            run.say(f"step {step}/{args.max_steps} | validation loss {val:.4f}")
            if log:
                log.write(json.dumps({"step": step, "val_loss": val}) + "\n")
        saved = step % args.save_every == 0 or last
        if saved:
            save_checkpoint(run)
        if any_rank(stop.name is not None, run):
            if not saved:
                save_checkpoint(run)
            run.say(f"stopped by {stop.name or 'another rank'} after step {step}: checkpoint "
                    f"{os.path.join(args.out, f'ckpt-{step:08d}.pt')} written; continue with the same command "
                    "and --resume auto")
            raise SystemExit(128 + (signal.SIGINT if stop.name == "SIGINT" else signal.SIGTERM))
    run.say(f"done: {run.step} steps, {run.skipped} skipped, {len(bad_files)} undecodable file(s) left out; student in "
            f"{os.path.join(args.out, f'ckpt-{run.step:08d}.pt')} (load with model.load_student)")
    if log:
        log.close()


@torch.no_grad()
def validate(args, teacher, student, val_loader, device):
    """Mean held-out distillation loss over the fixed validation batches (eval mode, fixed masks)."""
    student.eval()
    total, n = 0.0, 0
    val_loader.batch_sampler.set_epoch(0)
    for i, (wav, lengths, _) in enumerate(val_loader):  # undecodable files: named by the training loop
        if i >= args.val_batches:
            break
        if len(lengths):  # note: validation masks/negatives use steps 10^9 + i, never a training step's seed
            loss, _ = distillation_loss(args, teacher, student, wav.to(device), lengths.to(device), 10 ** 9 + i, 0)
            total, n = total + float(loss), n + 1
    student.train()
    return total / max(n, 1)


# ----------------------------------------------------------------------------
# 4. Checkpoints and the run folder: atomic writes, exact resume, one run per folder
# ----------------------------------------------------------------------------


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename: a kill at any moment leaves either the old files or the
    complete new one, never a half-written checkpoint under a final name."""
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
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def checkpoint_paths(out):
    """Complete checkpoints in `out`, oldest first (temporary files are never matched)."""
    return sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))


def simple_args(args):
    """The flags as JSON-able values (for checkpoints and the log)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None), tuple))}


def save_checkpoint(run):
    """Write ckpt-STEP.pt atomically on rank 0 with every rank's RNG state and data position (gathered), so each
    rank resumes exactly; keep the newest --keep."""
    args = run.args
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    states = [{"rng": rng, "position": run.position}]
    if run.world > 1:
        states = [None] * run.world
        dist.all_gather_object(states, {"rng": rng, "position": run.position})
    if run.rank == 0:
        atomic_save({"format": 1, "method": args.method, "teacher": args.teacher, "step": run.step, "epoch": run.epoch,
                     "position": [s["position"] for s in states], "rng": [s["rng"] for s in states],
                     "config": dataclasses.asdict(run.raw.cfg), "student": run.raw.state_dict(),
                     "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                     "args": {k: v for k, v in simple_args(args).items() if not isinstance(v, tuple)}},
                    os.path.join(args.out, f"ckpt-{run.step:08d}.pt"))
        # a checkpoint of a later step (from a run this one resumed before it) is never this run's to delete
        mine = [p for p in checkpoint_paths(args.out) if int(os.path.basename(p)[5:-3]) <= run.step]
        for old in mine[:-args.keep]:
            os.remove(old)
    if run.world > 1:
        dist.barrier()


# The flags a resumed run may change; every other flag, teacher and data included, must be the run's own.
RESUME_MAY_CHANGE = ("max_steps", "resume", "out", "workers", "device", "log_every", "save_every", "val_every",
                     "val", "val_batches", "keep", "skip_nonfinite", "compile", "traceback", "quick_start")


def check_resumable(ckpt, path, args, student, world):
    """Refuse a checkpoint of another run, or of another format, naming every mismatch."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise SystemExit(f"error: --resume {path}: not a distill.py training checkpoint")
    try:
        saved = dataclasses.asdict(model.config_from_dict(ckpt["config"]))
    except (TypeError, ValueError) as e:  # fields this model.py does not have, or lacks
        raise SystemExit(f"error: --resume {path}: {one_line(e)}")
    problems, ours = [], dataclasses.asdict(student.cfg)  # a different --method: among the flags below
    if saved != ours:
        problems.append(f"student config differs in {[k for k, v in ours.items() if saved.get(k) != v]}")
    elif ckpt["student"].keys() != student.state_dict().keys():
        problems.append("its student weights are named differently from this model.py's")
    if len(ckpt["position"]) != world:
        problems.append(f"written by {len(ckpt['position'])} process(es), resumed with {world}")
    if args.max_steps < ckpt["step"]:
        problems.append(f"--max_steps {args.max_steps} is below the checkpoint's step {ckpt['step']}")
    for name, value in simple_args(args).items():
        old = ckpt["args"].get(name, "(absent)")
        if name not in RESUME_MAY_CHANGE and not isinstance(value, tuple) and old != value:  # tuples: not saved
            problems.append(f"--{name} {old} != {value}")
    if problems:
        raise SystemExit(f"error: --resume {path} belongs to a different run: {'; '.join(problems)}. "
                         "Resume with the same flags, or use a fresh --out.")


def open_log(run):
    """OUT/train_log.jsonl, one JSON object per line: first {"run": method, teacher, flags, student config}, then
    a row per progress line and per validation. A resumed run drops the rows after its checkpoint's step (they are
    logged again, so each step keeps one row) and adds a {"resume": ...} row. Opened line-buffered (row by row)."""
    args, path = run.args, os.path.join(run.args.out, "train_log.jsonl")
    if run.step == 0 or not os.path.exists(path):  # fresh (an old log here had no checkpoint: it started over)
        rows = [{"run": {"method": args.method, "teacher": args.teacher, "student": args.student,
                         "processes": run.world, "config": dataclasses.asdict(run.raw.cfg), "args": simple_args(args)}}]
    else:
        rows = []
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):  # the last line of a run killed mid-write
                    rows.append(json.loads(line))
        rows = [r for r in rows if r.get("step", 0) <= run.step]
    if run.step > 0:  # a resume, with the flags it resumed with (--max_steps may have grown)
        rows.append({"resume": {"step": run.step, "args": simple_args(args)}})
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    return open(path, "a", buffering=1)


def take_out_dir(out, resume):
    """One run per folder, checked before any teacher is loaded. A folder that holds a run needs --resume auto or a
    --resume PATH inside it (another folder's run would write over this one's). An exclusive POSIX lock on OUT/.lock
    is held by this process (not by its DataLoader workers: fork does not pass it on); the kernel releases it when
    the process ends, however it ends (SIGKILL too), so a dead run never blocks the next one (the empty file
    stays). Returns (lock descriptor, folder, created)."""
    held = checkpoint_paths(out) + [p for p in [os.path.join(out, "train_log.jsonl")] if os.path.exists(p)]
    if held and resume not in (None, "auto") and os.path.dirname(os.path.abspath(resume)) != os.path.abspath(out):
        raise SystemExit(f"error: --resume {resume} is not in --out {out}, which holds another run; resume into "
                         "an empty --out (or into the checkpoint's own folder)")
    if held and resume is None:
        raise SystemExit(f"error: --out {out} already holds a run ({', '.join(os.path.basename(p) for p in held[-3:])}"
                         f"{', ...' if len(held) > 3 else ''}); continue it with --resume auto (a larger --max_steps "
                         "extends it), or choose another --out")
    created, path = not os.path.isdir(out), os.path.join(out, ".lock")
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    except OSError as e:  # a file in the way, or not writable
        raise ValueError(f"--out {out}: cannot create {path} ({e.strerror}); expected a writable folder") from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        os.close(fd)
        raise SystemExit(f"error: --out {out} is in use by another run; wait for it to end or choose another --out")
    except OSError as e:  # a file system without locks (some network mounts)
        print(f"warning: --out {out}: cannot lock {path} ({e.strerror}); make sure no other run uses it", flush=True)
    for stale in glob.glob(os.path.join(out, "ckpt-*.pt.tmp.*")):  # a run killed mid-save: never loaded
        os.remove(stale)
    return fd, out, created


def release_out_dir(lock):
    """Unlock; a folder this run created and left empty but for the lock (a failed start) is removed."""
    fd, out, created = lock
    if created and os.listdir(out) == [".lock"]:
        os.remove(os.path.join(out, ".lock"))
        os.rmdir(out)
    os.close(fd)


# ----------------------------------------------------------------------------
# 5. The command line: recipe defaults, grouped flags, --FIELD=VALUE student overrides
# ----------------------------------------------------------------------------


def one_line(error):
    """An error's message on one line (a multi-line one joined with '; ', long ones cut)."""
    text = "; ".join(line.strip() for line in str(error).strip().splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


def usage_error(message):
    """`distill.py: error: MESSAGE` on stderr and exit status 2, as argparse, on one line and without a traceback;
    the SystemExit's str is the message, for callers that catch it."""
    print(f"distill.py: error: {message}", file=sys.stderr, flush=True)
    stop = SystemExit(f"error: {message}")
    stop.code = 2
    raise stop


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (the usage is in --help)
        usage_error(message)


def ranged(kind, ok, expected):
    """An argparse `type=`: the text as `kind` (int or float), finite and `ok`, else argparse's one-line error
    naming the flag, e.g. "argument --keep: expected an integer >= 1, got 0"."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return convert


def true_false(text):
    """An argparse `type=` for switches written --FLAG=true / --FLAG=false (also 1 / 0)."""
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text}")
    return text.lower() in ("true", "1")


def at_least(low):
    return ranged(int, lambda v: v >= low, f"an integer >= {low}")


positive = ranged(float, lambda v: v > 0, "a number > 0")
non_negative = ranged(float, lambda v: v >= 0, "a number >= 0")
fraction = ranged(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
below_1 = ranged(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
crop_seconds = ranged(float, lambda v: v == 0 or v >= data.MIN_SAMPLES / data.SAMPLE_RATE,
                      f"0 (never crop) or seconds >= {data.MIN_SAMPLES / data.SAMPLE_RATE} (one frame)")


def conv_layers(text):
    """--conv_layers=[(512,10,5)] + [(512,3,2)] * 4 ...: (channels, kernel, stride) triples of integers >= 1."""
    layers = model.parse_conv_layers(text)
    if not (layers and all(c >= 1 and k >= 1 and s >= 1 for c, k, s in layers)):
        raise ValueError("expected (channels, kernel, stride) triples of integers >= 1")
    return layers


# How --FIELD=VALUE reads and checks a student field (model.StudentConfig); the other fields by their default's type
# (bool: true_false).
STUDENT_FIELD_TYPES = {
    **dict.fromkeys(("dim", "ffn_dim", "num_heads", "num_layers", "pos_conv_kernel", "pos_conv_groups",
                     "teacher_dim", "rel_pos_max_distance"), at_least(1)),
    **dict.fromkeys(("dropout", "attention_dropout", "reuse_attention_dropout", "activation_dropout",
                     "input_dropout"), below_1),
    "feature_grad_mult": non_negative,
    "rel_pos_buckets": ranged(int, lambda v: v == 0 or (v >= 4 and v % 2 == 0),
                              "0 (no WavLM bias) or an even integer >= 4"),
    "conv_layers": conv_layers,
    **dict.fromkeys(("target_layers", "head_layers"), lambda text: tuple(int(v) for v in text.split(","))),
}

# The flags of one method's objective and the methods that use it: set (to another value than the default) with
# another --method they would be ignored, so they are refused.
METHOD_FLAGS = {
    **dict.fromkeys(("mask_prob", "mask_length", "mask_same_rows"), ("armhubert", "colld")),
    **dict.fromkeys(("colld_negatives", "colld_temperature", "colld_include_unmasked", "colld_objective"), ("colld",)),
    "gen_feed": ("gendistiller",),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a None default is the recipe's, filled after parsing
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    p = Parser(prog="distill.py", formatter_class=HelpFormatter,
               description="Distil a speech SSL teacher into a compact student (DistilHuBERT, ARMHuBERT, CoLLD, "
                           "GenDistiller). Flags left unset take the --method's paper recipe. Student config fields "
                           "are set with --FIELD=VALUE (see model.StudentConfig), e.g. --dim=384 --reuse=none.")
    g = p.add_argument_group("what to distil")
    g.add_argument("--method", required=True, choices=list(RECIPES), help="objective, default student and recipe")
    g.add_argument("--teacher", help="torchaudio bundle (hubert_base, wavlm_base_plus, ...), checkpoint (torchaudio "
                   f"or s3prl .pt) or 'tiny' (random); default {PAPER_TEACHER} with --data, 'tiny' without")
    g.add_argument("--student", choices=list(model.PRESETS), help="student preset (default: the method's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="LibriSpeech-layout folder, any folder of audio files or 'synthetic'; without --data "
                   "and --teacher: the offline quick start")
    g.add_argument("--val", help="held-out data (same forms as --data) for a validation loss")
    g.add_argument("--val_batches", type=at_least(1), default=8, help="validation batches (fixed, same every time)")
    g.add_argument("--batch_seconds", type=positive, help="seconds of audio per process per micro-step")
    g.add_argument("--accum", type=at_least(1), help="micro-steps (gradient accumulation) per optimizer step")
    g.add_argument("--max_seconds", type=crop_seconds, help="random-crop longer utterances to this; 0 = never "
                   "(default: s3prl's 15.625 s for distilhubert and gendistiller, never for armhubert and colld)")
    g.add_argument("--workers", type=at_least(0), default=2, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation (default: the method's recipe; AdamW betas and eps are the recipe's)")
    g.add_argument("--lr", type=positive, help="peak learning rate")
    g.add_argument("--weight_decay", type=non_negative, help="AdamW weight decay on matrices and conv kernels")
    g.add_argument("--warmup", type=fraction, help="fraction of steps of linear warm-up (then linear decay)")
    g.add_argument("--clip", type=positive, help="max global gradient norm")
    g.add_argument("--max_steps", type=at_least(1), help="optimizer steps")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="student autocast: "
                   "auto = bf16 on GPUs that support it, fp32 on CPU; fp16 uses a gradient scaler. On GPUs float32 "
                   "matmuls use TF32 unless this is fp32")
    g.add_argument("--teacher_precision", choices=["auto", "fp32"], help="auto: the teacher under the student's "
                   "autocast; fp32: autocast off around it (default: fp32 for distilhubert and gendistiller)")
    g.add_argument("--traceback", action="store_true", help="an error at start shows its traceback")
    g.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher's layers")
    g.add_argument("--skip_nonfinite", action="store_true",
                   help="skip (and count) a step whose loss or gradient is not finite instead of stopping")
    g = p.add_argument_group("masking (ARMHuBERT, CoLLD: the official spans of uniform length, no overlap)")
    g.add_argument("--mask_prob", type=fraction, help="share of valid frames covered by spans")
    g.add_argument("--mask_length", type=at_least(1), default=10, help="mean span length (frames)")
    g.add_argument("--mask_same_rows", type=at_least(0), default=18, help="rows of neighbouring lengths equalised to "
                   "one masked count (official: its 18 utterances per GPU); 0 = the whole batch (fairseq)")
    g = p.add_argument_group("teacher targets")
    g.add_argument("--target_norm", default="none", choices=["none", "layer_norm"], help="layer_norm: each target "
                   "normalised per frame without parameters (data2vec), for pre-LN teachers; none: as the papers")
    g.add_argument("--teacher_final_norm", type=true_false, help="pre-LN teachers: the last target includes the "
                   "final LayerNorm (true: s3prl, HF hidden_states; false: torchaudio, the official ARMHuBERT hooks); "
                   "default: true for distilhubert and gendistiller")
    g.add_argument("--target_point", choices=["block", "ffn"], help="each teacher block's output, or its FFN output "
                   "before the residual addition (data2vec; CoLLD's targets as USAD describes them; default for colld)")
    g = p.add_argument_group("method details (choices the papers leave open)")
    g.add_argument("--colld_negatives", type=at_least(1), default=100, help="CoLLD negatives per anchor (K)")
    g.add_argument("--colld_temperature", type=positive, default=0.1, help="CoLLD softmax temperature (tau)")
    g.add_argument("--colld_include_unmasked", type=true_false, nargs="?", const=True, default=True,
                   help="CoLLD: every valid frame an anchor (the kit ablation's best); false: the masked frames only")
    g.add_argument("--colld_objective", default="infonce", choices=["infonce", "l1_cosine"], help="CoLLD: InfoNCE, "
                   "or DistilHuBERT's L1-cosine on the same anchors (USAD's ablation, arXiv 2506.18843 Table VI)")
    g.add_argument("--gen_feed", default="teacher", choices=["teacher", "self"],
                   help="GenDistiller history during training: teacher forcing or its own predictions (free-running)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (default runs/METHOD-TEACHER); one that holds a run needs --resume")
    g.add_argument("--resume", help="'auto' (the newest checkpoint in --out, or start fresh) or a checkpoint path")
    g.add_argument("--seed", type=at_least(0), default=0, help="seed of init, data order, crops, masks, dropout")
    g.add_argument("--log_every", type=at_least(1), help="steps between progress lines (default 100)")
    g.add_argument("--save_every", type=at_least(1), help="steps between checkpoints (default 5000)")
    g.add_argument("--val_every", type=at_least(1), help="steps between validation losses (default 5000)")
    g.add_argument("--keep", type=at_least(1), default=2, help="checkpoints kept in --out (older ones deleted)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    return p


def student_overrides(items, parser):
    """['--dim=384', '--reuse=none'] -> {'dim': 384, 'reuse': 'none'}, type- and range-checked."""
    fields = [f.name for f in dataclasses.fields(model.StudentConfig)]
    out = {}
    for item in items:
        key, is_set, value = item[2:].partition("=")
        if not item.startswith("--") or not is_set:
            parser.error(f"unrecognised argument {item!r} (student fields are set as --FIELD=VALUE)")
        if key not in fields:
            parser.error(f"unknown flag or student field {key!r}; student fields: {', '.join(fields)}")
        default = getattr(model.StudentConfig(), key)
        convert = STUDENT_FIELD_TYPES.get(key, true_false if isinstance(default, bool) else type(default))
        try:
            out[key] = convert(value)
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f"--{key}={value}: {e}")
    return out


def parse_args(argv=None):
    """Parse the flags, fill the unset ones from the recipe, keep the student overrides in args.overrides."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.overrides = student_overrides(rest, parser)
    args.quick_start = args.teacher is None and args.data is None
    if args.quick_start:
        args.teacher, args.data = "tiny", "synthetic"
    elif args.data is None:
        parser.error(f"--teacher {args.teacher} needs --data: a LibriSpeech-layout folder, a folder of audio files, "
                     "or 'synthetic'")
    args.teacher = args.teacher or PAPER_TEACHER
    recipe = RECIPES[args.method]
    args.student = args.student or recipe.student
    for name, methods in METHOD_FLAGS.items():
        value = getattr(args, name)
        if value != parser.get_default(name) and args.method not in methods:
            shown = "" if value is True else f" {value}"  # a switch has no value to show
            parser.error(f"--{name}{shown} belongs to --method {' / '.join(methods)}; --method {args.method} "
                         "does not use it")
    args.applied = []  # what changed from the paper recipe, printed at start
    for name, value in SMOKE.items():
        if getattr(args, name) is None and args.data == "synthetic":
            setattr(args, name, value)
            args.applied.append(f"{name}={value} (synthetic smoke run)")
    defaults = dict(dataclasses.asdict(recipe), lr=PRESET_LR.get(args.student, recipe.lr), log_every=100,
                    save_every=5000, val_every=5000)
    for name, value in defaults.items():  # betas and eps have no flag: always the recipe's
        if name not in ("student", "source") and getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.out is None:  # each method and teacher its own folder: the quick-start runs do not overwrite each other
        teacher = os.path.splitext(os.path.basename(args.teacher.rstrip("/")))[0]
        args.out = os.path.join("runs", f"{args.method}-{re.sub(r'[^A-Za-z0-9._-]', '_', teacher)}")
    if METHODS[args.method].masks_input and args.mask_prob == 0:
        if args.method == "colld" and not args.colld_include_unmasked:
            parser.error(f"--mask_prob {args.mask_prob}: --method colld with --colld_include_unmasked=false needs "
                         "a share in (0, 1]: no frame would be an anchor")
        args.applied.append("mask_prob=0: no masking (ablation, not the paper's method)")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.quick_start and rank0:
        print(f"quick start: the random 'tiny' teacher on a synthetic corpus, smoke settings; a smoke test, not a "
              f"distillation. A real run: python distill.py --method {args.method} --teacher {PAPER_TEACHER} "
              "--data /path/to/LibriSpeech/train-clean-100 --val /path/to/LibriSpeech/dev-clean", flush=True)
    run, lock = None, None
    try:
        try:
            lock = take_out_dir(args.out, args.resume) if rank0 else None  # first: before any teacher is loaded
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
        # subtle: a process whose gloo process group is still alive at interpreter shutdown can abort in C++
        # (SIGABRT) as gloo's threads are torn down, and the DDP wrapper's reducer keeps the group alive until the
        # wrapper is freed. So, on every way out: drop the wrapper (also from an error's frames), collect, destroy.
        if run is not None:
            run.student = run.raw = run.optimizer = None
        if sys.exc_info()[2] is not None:
            traceback.clear_frames(sys.exc_info()[2])
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
