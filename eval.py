"""Evaluation of distilled speech models: a phoneme-recognition probe and, apart from it, a speed table.

The probe is SUPERB's phoneme recognition in small (Yang et al., arXiv 2105.01051): the upstream is
frozen, a learned softmax-weighted sum of ALL its layers feeds a linear CTC head, and the phone error
rate (PER) of greedy decoding is reported with the probe state that was best on dev (sections 1-5).
Section 6 times the teacher, the students and one distillation step per method.

SUPERB trains its head on train-clean-100 for 100k steps; this probe trains the same kind of head on
whatever subset you give it (the cached features must fit in memory: L x D x 50 x 2 bytes per second
of audio, 0.9 MB/s for 12 layers of 768). That ranks upstreams against each other and against their
`cnn:` floor; it does not reproduce the papers' absolute PER.

    python eval.py probe --upstream runs/armhubert/ckpt-00390600.pt \\
        --train LibriSpeech/train-clean-100 --train_limit 2000 --dev LibriSpeech/dev-clean \\
        --test LibriSpeech/test-clean --lexicon librispeech-lexicon.txt --out armhubert_pr.json
"""
import argparse
import copy
import itertools
import json
import os
import random
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchaudio.functional import edit_distance  # Levenshtein distance of two sequences

import data
import distill
import model

# ----------------------------------------------------------------------------
# 1. Labels: the lexicon, transcripts -> phones, LibriSpeech-layout splits
# ----------------------------------------------------------------------------

BLANK = "<blank>"  # the CTC blank, always unit id 0


def read_lexicon(path):
    """{WORD: [phone, ...]} from lines `WORD ph ph ...` (librispeech-lexicon.txt and CMUdict both fit).
    Words are upper-cased; a word listed twice keeps its FIRST pronunciation, as SUPERB's reader does.
    Blank lines and `;;;` comments are skipped; phones stay as written (AH0 and AH1 are two units)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lexicon {path}: file not found")
    lexicon = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts or parts[0].startswith(";;;"):
                continue
            if len(parts) < 2:
                raise ValueError(f"--lexicon {path}:{line_no}: expected 'WORD ph ph ...', "
                                 f"found the word {parts[0]!r} with no phones")
            lexicon.setdefault(parts[0].upper(), parts[1:])  # the first pronunciation wins
    return lexicon


def text_to_units(text, lexicon, where="transcript"):
    """A transcript as its words' pronunciations: a list of phone strings."""
    words = text.upper().split()
    for w in words:
        if w not in lexicon:
            raise ValueError(f"word {w!r} of {where} is not in the lexicon")
    return [p for w in words for p in lexicon[w]]


def unit_vocabulary(lexicon):
    """Phone strings by id, id 0 the blank. choice: every phone of the lexicon, so the vocabulary does
    not depend on which words the splits happen to contain."""
    return [BLANK] + sorted({p for phones in lexicon.values() for p in phones})


@dataclass
class Split:
    """One LibriSpeech-layout split: utterances, their audio and their unit ids."""
    name: str  # "train" / "dev" / "test"
    ids: List[str] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)
    num_samples: List[int] = field(default_factory=list)
    labels: List[List[int]] = field(default_factory=list)  # unit ids; the blank (0) never appears
    features: list = None  # per utterance: (float16 (L, T, D), float32 scale (L, 1, 1)), see extract_features


def load_split(name, root, lexicon, vocab, limit=0):
    """Read `root` in LibriSpeech layout (`*/*/ID.flac` + `*.trans.txt`); limit > 0: the first `limit` ids.
    Every transcript line needs its audio file; audio without a transcript line is counted, not used."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--{name} {root}: directory not found")
    texts = data.read_transcripts(root)  # raises on malformed or empty lines, naming file:line
    items, report = data.scan_audio(root, verbose=False)
    utt_of = lambda path: os.path.splitext(os.path.basename(path))[0]  # noqa: E731
    audio, bad = {utt_of(p): (p, n) for p, n in items}, {utt_of(p): (p, why) for p, why in report}
    to_id = {u: i for i, u in enumerate(vocab)}
    split = Split(name)
    for utt in (sorted(texts)[:limit] if limit else sorted(texts)):
        if utt in bad:
            raise ValueError(f"--{name} {root}: audio of utterance {utt!r} is unusable: {bad[utt][0]}: {bad[utt][1]}")
        if utt not in audio:
            raise FileNotFoundError(f"--{name} {root}: no audio file for utterance {utt!r} "
                                    f"(expected {utt}.flac or {utt}.wav under {root})")
        path, n = audio[utt]
        folder = os.path.dirname(path)  # LibriSpeech keeps one *.trans.txt per chapter folder, beside the audio
        trans = sorted(f for f in os.listdir(folder) if f.endswith(".trans.txt"))
        where = f"utterance {utt} in {os.path.join(folder, trans[0]) if trans else folder}"
        split.labels.append([to_id[u] for u in text_to_units(texts[utt], lexicon, where)])
        split.ids.append(utt)
        split.paths.append(path)
        split.num_samples.append(n)
    if not split.ids:
        raise ValueError(f"--{name} {root}: its *.trans.txt files list no utterance")
    unused = len(set(audio) - set(texts))
    print(f"{name}: {root}: {len(split.ids)} utterances, {sum(split.num_samples) / data.SAMPLE_RATE / 3600:.2f} h"
          + (f", {unused} audio files without transcript (not used)" if unused else "")
          + (f", limited to the first {limit} by id (--{name}_limit)" if limit else ""))
    return split


# ----------------------------------------------------------------------------
# 2. Upstreams: what the probe listens to (--upstream of probe, --teacher of speed)
#   PATH.pt            a distill.py checkpoint -> its student (model.load_student)
#   tiny | NAME | PATH anything model.load_teacher accepts -> the teacher
#   random:NAME        a torchaudio bundle's geometry (random:hubert_base) or the tiny teacher, random weights
#   cnn:UPSTREAM       the conv front end of UPSTREAM alone: one "layer" (B, T, C)
# ----------------------------------------------------------------------------


def is_student_checkpoint(path):
    """True when `path` is a distill.py checkpoint (mmap: a large teacher file is not read twice)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # pickle errors come in many types; model.load_teacher then reports the file's problem
        return False
    return isinstance(ckpt, dict) and "student" in ckpt and "config" in ckpt


def build_upstream(spec, device="cpu", seed=0, flag="--upstream"):
    """(frozen module in eval mode, cnn_only) for a spec of the table above."""
    cnn_only = spec.startswith("cnn:")
    rest = spec[len("cnn:"):] if cnn_only else spec
    if os.path.isfile(rest) and is_student_checkpoint(rest):
        module = model.load_student(rest, "cpu")
    else:
        try:
            if rest.startswith("random:"):
                module = model.random_teacher(rest[len("random:"):], seed)
            else:
                module = model.load_teacher(rest, "cpu")
        except ValueError as e:
            reason = re.sub(rf"^(--teacher )?'?{re.escape(rest)}'?: ", "", str(e))  # the loader names it too
            raise ValueError(f"{flag} {spec}: {reason}; also accepted: a distill.py checkpoint, random:NAME, "
                             "cnn:UPSTREAM") from e
    module = module.to(device).eval()
    module.requires_grad_(False)  # frozen: the probe never changes the upstream
    return module, cnn_only


# ----------------------------------------------------------------------------
# 3. Feature cache: the frozen upstream runs once over each split
# ----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(module, cnn_only, split, device, batch_size=8, max_cache_gb=16.0, cached_before=0):
    """Run the frozen upstream over `split` once; keep each utterance's (L, T, D) layers in float16
    (half the memory; its 3 digits are far below the probe's noise). Utterances run sorted by length:
    little padding, and model.py's padding never changes a valid frame. Returns the bytes cached.
    note: a teacher returns blocks 1..L (model.py's convention), while SUPERB's weighted sum also
    includes the transformer input; the distilhubert preset returns [input, 1..N] as its upstream does."""
    order = sorted(range(len(split.ids)), key=lambda i: split.num_samples[i])
    split.features = [None] * len(split.ids)
    total, start = 0, time.time()
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        wav, lengths = data.collate([data.load_audio(split.paths[i]) for i in idx])  # (B, S), (B,)
        for i, n in zip(idx, lengths.tolist()):
            if n != split.num_samples[i]:
                raise ValueError(f"{split.paths[i]}: decoded {n} samples but the header said {split.num_samples[i]}")
        run = module.cnn_features if cnn_only else module.hidden_states
        out, frame_lengths = run(wav.to(device), lengths.to(device))  # (B, T, C) or L x (B, T, D)
        stacked = torch.stack([out] if cnn_only else out, dim=1).float()  # (B, L, T, D)
        for b, i in enumerate(idx):
            x = stacked[b, :, : int(frame_lengths[b])]  # (L, T_b, D) valid frames only
            # subtle: float16's smallest normal number is 6e-5 and a random conv stack's features can be
            # ~1e-4, so each layer is stored divided by its max |x| (the scale kept in float32)
            scale = x.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-30)  # (L, 1, 1)
            split.features[i] = ((x / scale).to("cpu", torch.float16), scale.cpu())
            total += x.numel() * 2
        if cached_before + total > max_cache_gb * 2 ** 30:
            raise MemoryError(f"{split.name}: the feature cache of all splits passed --max_cache_gb {max_cache_gb} "
                              f"after {k + len(idx)} of {len(order)} utterances; use --{split.name}_limit or a "
                              "smaller split")
    L, _, D = split.features[0][0].shape
    print(f"{split.name}: cached {len(order)} utterances x {L} layers x {D} dims in float16: "
          f"{total / 2 ** 20:.1f} MB in {time.time() - start:.1f} s")
    # CTC cannot align labels longer than the frames (plus a blank between repeats); zero_infinity gives
    # such utterances zero loss, so they are counted here rather than lost silently
    too_short = sum(f.shape[1] < len(y) + sum(a == b for a, b in zip(y, y[1:]))
                    for (f, _), y in zip(split.features, split.labels))
    if too_short:
        print(f"{split.name}: warning: {too_short} utterances have fewer frames than CTC needs for their labels "
              "(zero loss in training, still scored in evaluation)")
    return total


def pad_batch(features, idx, device):
    """Cached utterances idx -> (B, L, T_max, D) float32 in the upstream's own values, zero-padded; lengths (B,)."""
    lengths = torch.tensor([features[i][0].shape[1] for i in idx], dtype=torch.long)
    L, _, D = features[idx[0]][0].shape
    x = torch.zeros(len(idx), L, int(lengths.max()), D)  # (B, L, T, D)
    for b, i in enumerate(idx):
        half, scale = features[i]
        x[b, :, : half.shape[1]] = half.float() * scale
    return x.to(device), lengths.to(device)


# ----------------------------------------------------------------------------
# 4. The probe (weighted sum of layers + linear CTC head), greedy decoding, error rates
# ----------------------------------------------------------------------------


class WeightedSum(nn.Module):
    """SUPERB's featurizer: h = sum_l softmax(w)_l * layer_l, w = 0 at the start (a uniform average)."""

    def __init__(self, num_layers):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))  # one scalar per layer

    def forward(self, layers):  # (B, L, T, D) -> (B, T, D)
        return torch.einsum("l,bltd->btd", self.weights.softmax(dim=0), layers)


class Probe(nn.Module):
    """WeightedSum + Linear(D -> V): frame scores over V = units + blank (id 0).

    choice: one Linear; SUPERB's PR downstream (s3prl libriphone.yaml) is Linear(D -> 256) then a
    linear frame-level layer, also linear, with a rank-256 bottleneck.
    choice: a zero head, so every unit starts equally likely, greedy decoding emits nothing (the
    untrained PER is exactly 100 %) and two runs differ only in batch order; PyTorch's random init
    (SUPERB's) made some seeds stall far above that on the tiny test task.
    note: a linear head emits a unit with one probability q on alike frames; over n >~ 5 of them the
    CTC likelihood has a local optimum at small q (only blanks decoded). Contextual features, which
    change across a phone, avoid it; a long stationary sound does not."""

    def __init__(self, num_layers, dim, vocab_size):
        super().__init__()
        self.featurizer = WeightedSum(num_layers)
        self.head = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, layers):  # (B, L, T, D) -> (B, T, V)
        return self.head(self.featurizer(layers))


def ctc_loss(logits, frame_lengths, labels):
    """CTC of logits (B, T, V) against B id lists: each utterance's loss over its label length, then the
    batch mean; zero_infinity: an utterance CTC cannot align gives 0, not inf (as SUPERB)."""
    log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)  # (T, B, V): torch's CTC is time-major
    targets = torch.tensor([u for y in labels for u in y], dtype=torch.long, device=logits.device)
    target_lengths = torch.tensor([len(y) for y in labels], dtype=torch.long, device=logits.device)
    return F.ctc_loss(log_probs, targets, frame_lengths, target_lengths, blank=0, zero_infinity=True)


def greedy_decode(logits_or_ids, lengths, blank=0):
    """(B, T, V) scores or (B, T) ids, (B,) valid frames -> B id lists: argmax per frame, collapse
    repeats, drop blanks. [0, 1, 1, 0, 1, 2, 2, 0] -> [1, 1, 2]: a blank between two 1s keeps both."""
    ids = logits_or_ids.argmax(dim=-1) if logits_or_ids.is_floating_point() else logits_or_ids  # (B, T)
    out = []
    for b in range(ids.shape[0]):
        hyp, prev = [], None
        for i in ids[b, : int(lengths[b])].tolist():  # padded frames are never decoded
            if i != prev and i != blank:
                hyp.append(i)
            prev = i  # subtle: updated on blanks too, so 1 0 1 gives two 1s
        out.append(hyp)
    return out


def error_rate(refs, hyps):
    """(100 * total edits / total reference length, edits, length): edits are the Levenshtein distance
    (substitutions, deletions, insertions); corpus level, not the mean of per-utterance rates, where a
    short utterance with one error would weigh as much as a long one."""
    edits, ref_len = sum(edit_distance(r, h) for r, h in zip(refs, hyps)), sum(len(r) for r in refs)
    if ref_len == 0:
        raise ValueError("error_rate: the references are all empty (total length 0)")
    return 100.0 * edits / ref_len, edits, ref_len


@torch.no_grad()
def evaluate(probe, split, device, batch_size=32):
    """Greedy-decode a split: {"per": %, "edits", "ref_len"}."""
    probe.eval()
    hyps = []
    for k in range(0, len(split.ids), batch_size):
        x, lengths = pad_batch(split.features, range(k, min(k + batch_size, len(split.ids))), device)
        hyps.extend(greedy_decode(probe(x), lengths, blank=0))
    probe.train()
    return dict(zip(("per", "edits", "ref_len"), error_rate(split.labels, hyps)))


# ----------------------------------------------------------------------------
# 5. Training with dev-based selection, then the test error rate
# ----------------------------------------------------------------------------


def run_probe(args):
    """The whole probe: labels, feature cache, training with dev selection, test. Returns the result dict."""
    start = time.time()
    torch.manual_seed(args.seed)
    device = check_device(args.device)
    lexicon = read_lexicon(args.lexicon)
    vocab = unit_vocabulary(lexicon)
    splits = [load_split(name, getattr(args, name), lexicon, vocab, getattr(args, f"{name}_limit"))
              for name in ("train", "dev", "test")]
    module, cnn_only = build_upstream(args.upstream, device, args.seed)
    print(f"upstream: {args.upstream} ({type(module).__name__}, {sum(p.numel() for p in module.parameters()) / 1e6:.2f}"
          f"M parameters{', conv front end only' if cnn_only else ''}), frozen")
    cache_bytes = 0
    for split in splits:
        cache_bytes += extract_features(module, cnn_only, split, device, args.extract_batch, args.max_cache_gb,
                                        cache_bytes)
    del module  # the probe never needs the upstream again
    train, dev, test = splits
    L, _, D = train.features[0][0].shape

    probe = Probe(L, D, len(vocab)).to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=args.lr)  # SUPERB PR: Adam, lr 1e-2, no schedule
    rng = random.Random(args.seed)  # the batch order is a function of --seed alone
    order, best, history, losses, t_interval = [], {"per": float("inf")}, [], [], time.time()
    print(f"probe: {L} layers x {D} dims -> {len(vocab)} units (phones + blank); "
          f"{args.steps} steps, batch {args.batch_size}, Adam lr {args.lr}, eval every {args.eval_every}")
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            dev_result = evaluate(probe, dev, device, args.batch_size)
            if dev_result["per"] < best["per"]:  # strict: the earliest of equal states is kept
                best = {"per": dev_result["per"], "step": step, "state": copy.deepcopy(probe.state_dict())}
            train_loss = sum(losses) / len(losses) if losses else None  # None at step 0
            ms = 1000 * (time.time() - t_interval) / max(len(losses), 1)
            print(f"step {step:>6}/{args.steps} | train ctc "
                  + (f"{train_loss:7.4f}" if train_loss is not None else "      -")
                  + f" | dev per {dev_result['per']:6.2f}% | best {best['per']:6.2f}% @ {best['step']} | {ms:6.1f} "
                  f"ms/step | {time.time() - start:7.1f} s | eta {ms * (args.steps - step) / 1000:6.0f} s", flush=True)
            history.append({"step": step, "train_loss": train_loss, **{f"dev_{k}": v for k, v in dev_result.items()}})
            losses, t_interval = [], time.time()
        if step == args.steps:
            break
        if len(order) < args.batch_size:  # each epoch a fresh permutation (its remainder is left out)
            order = list(range(len(train.ids)))
            rng.shuffle(order)
        idx, order = order[: args.batch_size], order[args.batch_size:]
        x, lengths = pad_batch(train.features, idx, device)  # (B, L, T, D), (B,)
        loss = ctc_loss(probe(x), lengths, [train.labels[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(probe.parameters(), args.clip)  # SUPERB PR clips at 1
        opt.step()
        losses.append(loss.item())

    probe.load_state_dict(best["state"])  # the test error rate is that of the best dev state
    dev_final = evaluate(probe, dev, device, args.batch_size)
    test_result = evaluate(probe, test, device, args.batch_size)
    result = {"upstream": args.upstream, "dev_per": dev_final["per"], "test_per": test_result["per"],  # percent
              "best_step": best["step"], "initial_dev_per": history[0]["dev_per"], "steps": args.steps,
              "layer_weights": probe.featurizer.weights.softmax(0).tolist(), "n_train": len(train.ids),
              "n_dev": len(dev.ids), "n_test": len(test.ids), "seconds": time.time() - start, "history": history}
    print(f"done: {args.upstream}: test PER {result['test_per']:.2f}% (dev PER {result['dev_per']:.2f}% at step "
          f"{best['step']}; untrained {result['initial_dev_per']:.2f}%) | {len(train.ids)}/{len(dev.ids)}/"
          f"{len(test.ids)} utterances | {result['seconds']:.1f} s")
    print("layer weights: " + " ".join(f"{w:.3f}" for w in result["layer_weights"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


def check_device(device):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


# ----------------------------------------------------------------------------
# 6. The speed table, apart from the probe: the same batch through every row, round-robin
# ----------------------------------------------------------------------------


def distill_step(d_args, teacher, student, opt, wav, lengths, autocast, exact):
    """One distillation step as distill.py takes it for one micro-batch: teacher, student, loss, backward,
    clip, AdamW (no fp16 gradient scaler: it changes no timing that matters). exact=False: the teacher
    runs under the student's autocast (--teacher_precision auto)."""
    step = [0]

    def fn():
        teacher.exact = exact
        try:
            with autocast():
                loss, _ = distill.distillation_loss(d_args, teacher, student, wav, lengths, step[0])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), d_args.clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step[0] += 1
        finally:
            teacher.exact = True
    return fn


def speed_rows(args, device, teacher, wav, lengths):
    """[(name, fn, parameters)]: the teacher's forward, each preset's deployed forward (hidden_states:
    distilhubert without its prediction heads, gendistiller free-running) and one distillation step per
    method x teacher precision x compile setting, all on the same batch."""
    amp = distill.autocast_dtype(args, device)  # the students' autocast, as distill.py
    autocast = lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    params = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731

    def forward(net):
        def fn():
            with torch.no_grad(), autocast():  # note: model.Teacher turns autocast off for itself
                net(wav, lengths)
        return fn

    rows = [(f"teacher {args.teacher} forward", forward(teacher), params(teacher))]
    for preset in args.presets:
        student = model.build_student(preset, teacher, copy_weights=False)[0].to(device).eval()
        rows.append((f"student {preset} forward", forward(student.hidden_states),
                     model.count_parameters(student, with_heads=preset != "distilhubert")))
    compiled_teacher = None
    for method, precision, compiled in itertools.product(args.methods, args.teacher_precision, args.compile):
        # the method's recipe ("--data synthetic" is never read: the batch is ours) and its AdamW
        d_args = distill.parse_args(["--method", method, "--data", "synthetic", "--seed", str(args.seed)])
        student = distill.build_student_for(d_args, teacher)[0].to(device).train()
        t = teacher
        if compiled == "on":  # as distill.py --compile: the student and the teacher's layers, in place
            student.compile()
            if compiled_teacher is None:
                compiled_teacher = copy.deepcopy(teacher)
                for layer in compiled_teacher.model.encoder.transformer.layers:
                    layer.compile()
            t = compiled_teacher
        opt = distill.make_optimizer(student, d_args, device)
        rows.append((f"distill step {method}, teacher {precision}" + (", compiled" if compiled == "on" else ""),
                     distill_step(d_args, t, student, opt, wav, lengths, autocast, exact=precision == "fp32"),
                     params(student)))
    return rows


def run_speed(args):
    """Time every row on one batch of noise, round-robin: each round runs every row once, so slow and
    fast moments of the machine fall on all rows alike, and `x teacher` is the median over rounds of a
    row's time over the teacher's in the same round. Peak memory: on a GPU, CUDA's allocator peak over
    a row's warm-up runs; on a CPU, the process's peak RSS (all rows). Prints a markdown table."""
    device = check_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        distill.use_tf32(args.precision)  # as distill.py
    torch.manual_seed(args.seed)
    S = int(args.seconds * data.SAMPLE_RATE)
    wav = 0.1 * torch.randn(args.batch, S, device=device)  # (B, S): timing depends on the shape, not the content
    lengths = torch.full((args.batch,), S, dtype=torch.long, device=device)  # (B,)
    teacher, cnn_only = build_upstream(args.teacher, device, args.seed, flag="--teacher")
    if cnn_only or not isinstance(teacher, model.Teacher):
        raise ValueError(f"--teacher {args.teacher}: expected a teacher (tiny, a bundle name, a teacher file or "
                         f"random:NAME), got a {type(teacher).__name__}")
    rows = speed_rows(args, device, teacher, wav, lengths)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # noqa: E731
    print(f"speed: batch {args.batch} x {args.seconds} s of noise on {device}, {len(rows)} rows round-robin, "
          f"{args.warmup} warm-up + {args.repeats} timed rounds", flush=True)
    peaks = {}
    for name, fn, _ in rows:  # warm-up: allocation, autotuning, lazy init (and compiling)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            fn()
        sync()
        if cuda and args.warmup:
            peaks[name] = f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}"
    wall = {name: [] for name, _, _ in rows}  # ms per round
    for r in range(args.repeats):
        for name, fn, _ in rows:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()  # kernels are asynchronous: wait before reading the clock
            wall[name].append(1000 * (time.perf_counter() - t0))
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{w[-1]:.0f}" for w in wall.values()) + " ms",
              flush=True)
    teacher_ms = wall[rows[0][0]]
    table = [{"model": name, "params_m": n / 1e6, "ms": statistics.median(wall[name]), "wall_ms": wall[name],
              "x_teacher": statistics.median(w / t for w, t in zip(wall[name], teacher_ms)),
              "peak_mem_mb": peaks.get(name, "-")} for name, _, n in rows]
    head = ["model", "params (M)", "ms (median)", "ms min–max", "audio s / s", "x teacher fwd", "peak CUDA mem (MB)"]
    lines = ["| " + " | ".join(head[: 6 + cuda]) + " |", "|---|" + "---:|" * (5 + cuda)]  # the last: GPU only
    for r in table:
        w = r["wall_ms"]
        cells = [r["model"], f"{r['params_m']:.2f}", f"{r['ms']:.1f}", f"{min(w):.0f}–{max(w):.0f}",
                 f"{args.batch * args.seconds * 1000 / r['ms']:.1f}", f"{r['x_teacher']:.2f}", r["peak_mem_mb"]]
        lines.append("| " + " | ".join(cells[: 6 + cuda]) + " |")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    print(f"\nBatch {args.batch} x {args.seconds} s, {device}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} round-robin rounds; teacher {args.teacher} (random weights unless loaded: timing does "
          "not need trained ones).\n" + "\n".join(lines)
          + "\nx teacher fwd: median over rounds of (row time / teacher time in the same round)."
          + ("" if cuda else f" Peak RSS of the process (all rows): {rss_mb:.0f} MB."))
    return table


# ----------------------------------------------------------------------------
# 7. Command line: `probe` (sections 1-5) and `speed` (section 6)
# ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, except that an error is one line (exit status 2; the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = Parser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe", help="SUPERB-style phoneme-recognition probe on a frozen upstream (defaults: "
                        "SUPERB PR, s3prl libriphone.yaml, except the steps)")
    pr.add_argument("--upstream", required=True, help="distill.py checkpoint | tiny | bundle name | teacher file | "
                    "random:NAME | cnn:UPSTREAM (see eval.py section 2)")
    for name, role in (("train", "to train the probe on"), ("dev", "to pick the best probe state"),
                       ("test", "for the final error rate")):
        pr.add_argument(f"--{name}", required=True, help=f"directory in LibriSpeech layout {role}")
        pr.add_argument(f"--{name}_limit", type=distill.at_least(0), default=0,
                        help="only the first N utterances by id (0 = all): the feature cache must fit in memory")
    pr.add_argument("--lexicon", required=True, help="'WORD ph ph ...' per line, the first pronunciation wins")
    pr.add_argument("--steps", type=distill.at_least(1), default=2000, help="training steps (SUPERB: 100k)")
    pr.add_argument("--eval_every", type=distill.at_least(1), default=200, help="dev evaluations (SUPERB: 1000)")
    pr.add_argument("--batch_size", type=distill.at_least(1), default=32, help="utterances per step (SUPERB: 16 x 2)")
    pr.add_argument("--lr", type=distill.positive, default=1e-2, help="Adam learning rate")
    pr.add_argument("--clip", type=distill.non_negative, default=1.0, help="gradient-norm clipping, 0 = off")
    pr.add_argument("--extract_batch", type=distill.at_least(1), default=8, help="utterances per upstream forward")
    pr.add_argument("--max_cache_gb", type=distill.positive, default=16.0,
                    help="stop with an error when the float16 feature cache of all splits passes this many GiB")
    pr.add_argument("--out", help="also write the result as JSON here")

    sp = sub.add_parser("speed", help="time the teacher, the students and a distillation step per method")
    sp.add_argument("--teacher", default="random:hubert_base", help="tiny | bundle name | teacher file | random:NAME")
    sp.add_argument("--presets", nargs="+", default=list(model.PRESETS), choices=list(model.PRESETS))
    one_frame = data.MIN_SAMPLES / data.SAMPLE_RATE
    sp.add_argument("--seconds", type=distill.ranged(float, lambda v: v >= one_frame, f">= {one_frame} (one frame)"),
                    default=4.0, help="seconds of audio per utterance")
    sp.add_argument("--batch", type=distill.at_least(1), default=8, help="utterances per batch")
    sp.add_argument("--repeats", type=distill.at_least(1), default=5, help="timed rounds, each running every row once")
    sp.add_argument("--warmup", type=distill.at_least(0), default=1, help="untimed runs of each row first")
    sp.add_argument("--methods", nargs="*", default=list(distill.METHODS), choices=list(distill.METHODS),
                    help="distill.py methods to time one training step of (none: no distillation rows)")
    sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="student autocast as in distill.py: auto = bf16 on GPUs that support it, fp32 on CPU")
    sp.add_argument("--teacher_precision", nargs="+", default=["fp32"], choices=["fp32", "auto"],
                    help="distillation rows for each: the teacher in fp32 or under the student's autocast")
    sp.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                    help="distillation rows for each: eager, or torch.compile'd as distill.py --compile")
    for q in (pr, sp):
        q.add_argument("--seed", type=distill.at_least(0), default=0, help="seed (probe, random weights, audio)")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        q.add_argument("--threads", type=distill.at_least(0), default=0, help="CPU threads for torch (0 = its default)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        # note: with more threads than free cores, OpenMP workers spin and wait on each other;
        # small ops (the probe's) can then run tens of times slower than on one thread
        torch.set_num_threads(args.threads)
    return run_probe(args) if args.command == "probe" else run_speed(args)


if __name__ == "__main__":
    # an ordinary mistake (a path, a file that is not what a flag expects) is one line, exit status 2;
    # --traceback shows where it was raised
    try:
        main([a for a in sys.argv[1:] if a != "--traceback"])
    except (ValueError, OSError, EOFError) as e:
        if "--traceback" in sys.argv:
            raise
        print(f"eval.py: error: {distill.one_line(e)} (--traceback shows where)", file=sys.stderr)
        sys.exit(2)
