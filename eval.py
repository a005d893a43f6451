"""Evaluation of distilled speech models: a phoneme-recognition probe and, apart from it, a speed table.

The probe is SUPERB's phoneme recognition in small (Yang et al., arXiv 2105.01051): the upstream is
frozen, a learned softmax-weighted sum of ALL its layers feeds a linear CTC head, and the phone error
rate (PER) of greedy decoding is reported with the probe state that was best on dev. Sections 1-6:
labels (lexicon, units, splits), upstreams, the feature cache, the probe, decoding and error rates,
training and test. Section 7 times the teacher, the students and one distillation step per method.

SUPERB trains its head on train-clean-100 for 100k steps; this probe trains the same kind of head on
whatever subset you give it (the cached features must fit in memory: L x D x 50 x 2 bytes per second
of audio, 0.9 MB/s for 12 layers of 768). That ranks upstreams against each other and against their
`random:` floor; it does not reproduce the papers' absolute PER.

    python eval.py probe --upstream runs/armhubert/ckpt-00390600.pt \\
        --train LibriSpeech/train-clean-100 --train_limit 2000 --dev LibriSpeech/dev-clean \\
        --test LibriSpeech/test-clean --lexicon librispeech-lexicon.txt --out armhubert_pr.json
    python eval.py probe --upstream random:runs/armhubert/ckpt-00390600.pt ...   # the floor
    python eval.py speed --seconds 4 --batch 8 --device cuda
"""
import argparse
import copy
import json
import os
import random
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import distill
import model

# ----------------------------------------------------------------------------
# 1. Labels: the lexicon, transcripts -> units, LibriSpeech-layout splits
# ----------------------------------------------------------------------------

BLANK = "<blank>"  # the CTC blank, always unit id 0
WORD_SEP = "|"  # word separator of the character unit (as in SUPERB's ASR and wav2letter)
CHARS = [WORD_SEP] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["'"]  # LibriSpeech's characters


def read_lexicon(path):
    """{WORD: [phone, ...]} from lines `WORD ph ph ...` (librispeech-lexicon.txt and CMUdict both fit).
    Words are upper-cased; a word listed twice keeps its FIRST pronunciation, as SUPERB's reader does.
    Blank lines and `;;;` comments are skipped; phones stay as written (AH0 and AH1 are two units)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lexicon {path}: file not found")
    lexicon, repeated = {}, 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts or parts[0].startswith(";;;"):
                continue
            if len(parts) < 2:
                raise ValueError(f"--lexicon {path}:{line_no}: expected 'WORD ph ph ...', "
                                 f"found the word {parts[0]!r} with no phones")
            word = parts[0].upper()
            repeated += word in lexicon
            lexicon.setdefault(word, parts[1:])  # the first pronunciation wins
    if not lexicon:
        raise ValueError(f"--lexicon {path}: no entries found (expected lines 'WORD ph ph ...')")
    if repeated:
        print(f"lexicon: {path}: {len(lexicon)} words; {repeated} further pronunciations ignored (first one wins)")
    return lexicon


class UnknownWord(ValueError):
    """A transcript word that the lexicon does not have (--skip-unknown counts and skips its utterance)."""


def text_to_units(text, unit, lexicon=None, where="transcript"):
    """A transcript as unit strings. "phone": the words' pronunciations; "char": the letters with
    WORD_SEP between words, "AN APPLE" -> A N | A P P L E."""
    words = text.upper().split()
    if not words:
        raise ValueError(f"{where}: empty transcript")
    if unit == "phone":
        for w in words:
            if w not in lexicon:
                raise UnknownWord(f"word {w!r} of {where} is not in the lexicon "
                                  "(pass --skip-unknown to leave such utterances out, counted)")
        return [p for w in words for p in lexicon[w]]
    bad = [(c, w) for w in words for c in w if c not in CHARS or c == WORD_SEP]
    if bad:
        raise ValueError(f"{where}: character {bad[0][0]!r} in word {bad[0][1]!r} is not in the character set "
                         f"{''.join(CHARS[1:])!r} (letters and apostrophe)")
    return list(WORD_SEP.join(words))


def unit_vocabulary(unit, lexicon=None):
    """Unit strings by id, id 0 the blank. Phones: every phone of the lexicon (choice: the vocabulary
    then does not depend on which words the splits happen to contain)."""
    return [BLANK] + (sorted({p for phones in lexicon.values() for p in phones}) if unit == "phone" else CHARS)


@dataclass
class Split:
    """One LibriSpeech-layout split: utterances, their audio and their unit ids."""
    name: str  # "train" / "dev" / "test"
    ids: List[str] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)
    num_samples: List[int] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)
    labels: List[List[int]] = field(default_factory=list)  # unit ids; the blank (0) never appears
    skipped_unknown: int = 0  # utterances with a word not in the lexicon (--skip-unknown)
    features: list = None  # per utterance: (float16 (L, T, D), float32 scale (L, 1, 1)), see extract_features


def load_split(name, root, unit, lexicon, vocab, skip_unknown=False, limit=0):
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
        try:
            units = text_to_units(texts[utt], unit, lexicon, where)
        except UnknownWord:
            if not skip_unknown:
                raise
            split.skipped_unknown += 1
            continue
        split.ids.append(utt)
        split.paths.append(path)
        split.num_samples.append(n)
        split.texts.append(texts[utt])
        split.labels.append([to_id[u] for u in units])
    if not split.ids:
        raise ValueError(f"--{name} {root}: no usable utterance ({split.skipped_unknown} skipped for unknown words)")
    unused = len(set(audio) - set(texts))
    print(f"{name}: {root}: {len(split.ids)} utterances, {sum(split.num_samples) / data.SAMPLE_RATE / 3600:.2f} h"
          + (f", {split.skipped_unknown} skipped (word not in lexicon)" if split.skipped_unknown else "")
          + (f", {unused} audio files without transcript (not used)" if unused else "")
          + (f", limited to the first {limit} by id (--{name}_limit)" if limit else ""))
    return split


# ----------------------------------------------------------------------------
# 2. Upstreams: what the probe listens to (--upstream of probe, --teacher of speed)
#   PATH.pt            a distill.py checkpoint -> its student (model.load_student)
#   tiny | NAME | PATH anything model.load_teacher accepts -> the teacher
#   random:NAME        a torchaudio bundle's geometry (random:hubert_base) or the tiny teacher, random weights
#   random:PRESET[:T]  a student preset with random weights fitted to teacher T (default: HuBERT Base's size)
#   random:CKPT        the config of a distill.py checkpoint with fresh weights: the floor at equal size
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
    if rest.startswith("cnn:"):
        raise ValueError(f"{flag} {spec}: 'cnn:' given twice")
    if rest.startswith("random:"):
        what = rest[len("random:"):]
        preset, _, teacher_spec = what.partition(":")
        if os.path.isfile(what):
            if not is_student_checkpoint(what):
                raise ValueError(f"{flag} {spec}: {what} is not a distill.py checkpoint (no 'student'/'config' keys); "
                                 "random:FILE takes the architecture of a student checkpoint")
            cfg = model.config_from_dict(torch.load(what, map_location="cpu", weights_only=True)["config"])
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                module, _ = model.build_student(cfg)  # the checkpoint's config, fresh weights
        elif preset in model.PRESETS:
            # without ':TEACHER' the preset is fitted to HuBERT Base's geometry (the papers' size),
            # described from torchaudio's config so that nothing is downloaded
            teacher = (build_upstream(teacher_spec, "cpu", seed, flag)[0] if teacher_spec
                       else model.bundle_description("hubert_base"))
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                module, _ = model.build_student(preset, teacher, copy_weights=False)
        elif not teacher_spec:
            module = model.random_teacher(preset, seed)  # its ValueError names the bundles
        else:
            raise ValueError(f"{flag} {spec}: {preset!r} is not a student preset ({', '.join(model.PRESETS)})")
    elif os.path.isfile(rest) and is_student_checkpoint(rest):
        module = model.load_student(rest, "cpu")
    else:
        try:
            module = model.load_teacher(rest, "cpu")
        except ValueError as e:
            reason = re.sub(rf"^(--teacher )?'?{re.escape(rest)}'?: ", "", str(e))  # the loader names it too
            raise ValueError(f"{flag} {spec}: {reason}; also accepted: a distill.py checkpoint, random:NAME, "
                             f"random:PRESET[:TEACHER] (presets: {', '.join(model.PRESETS)}), random:CKPT, "
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
        if cnn_only:
            conv, frame_lengths = module.cnn_features(wav.to(device), lengths.to(device))  # (B, T, C)
            layers = [conv]
        else:
            layers, frame_lengths = module.hidden_states(wav.to(device), lengths.to(device))  # L x (B, T, D)
        stacked = torch.stack(layers, dim=1).float()  # (B, L, T, D)
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
# 4. The probe: weighted sum of layers + linear CTC head
# ----------------------------------------------------------------------------


class WeightedSum(nn.Module):
    """SUPERB's featurizer: h = sum_l softmax(w)_l * layer_l, w = 0 at the start (a uniform average).
    normalize: LayerNorm without affine on each layer first (s3prl's option, off in SUPERB and here)."""

    def __init__(self, num_layers, normalize=False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))  # one scalar per layer
        self.normalize = normalize

    def forward(self, layers):  # (B, L, T, D) -> (B, T, D)
        if self.normalize:
            layers = F.layer_norm(layers, layers.shape[-1:])  # per layer and frame, over D
        return torch.einsum("l,bltd->btd", self.weights.softmax(dim=0), layers)


class Probe(nn.Module):
    """WeightedSum + Linear(D -> V): frame scores over V = units + blank (id 0).

    choice: one Linear; SUPERB's PR downstream (s3prl libriphone.yaml) is Linear(D -> 256) then a
    linear frame-level layer, also linear, with a rank-256 bottleneck.
    choice (--head_init zero): every unit starts equally likely, so greedy decoding emits nothing (the
    untrained PER is exactly 100 %) and two runs differ only in batch order; PyTorch's random init
    (SUPERB's, `--head_init random`) made some seeds stall far above that on the tiny test task.
    note: a linear head emits a unit with one probability q on alike frames; over n >~ 5 of them the
    CTC likelihood has a local optimum at small q (only blanks decoded). Contextual features, which
    change across a phone, avoid it; a long stationary sound does not."""

    def __init__(self, num_layers, dim, vocab_size, normalize=False, head_init="zero"):
        super().__init__()
        self.featurizer = WeightedSum(num_layers, normalize)
        self.head = nn.Linear(dim, vocab_size)
        if head_init == "zero":
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


# ----------------------------------------------------------------------------
# 5. Greedy CTC decoding and error rates
# ----------------------------------------------------------------------------


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


def edit_distance(ref, hyp):
    """Levenshtein distance, the dynamic programme one row at a time: d[i][j] = edits from ref[:i] to hyp[:j]."""
    prev = list(range(len(hyp) + 1))  # d[0][j] = j insertions
    for i in range(1, len(ref) + 1):
        cur = [i] + [0] * len(hyp)  # d[i][0] = i deletions
        for j in range(1, len(hyp) + 1):
            cur[j] = min(prev[j] + 1,  # delete ref[i-1]
                         cur[j - 1] + 1,  # insert hyp[j-1]
                         prev[j - 1] + (ref[i - 1] != hyp[j - 1]))  # substitute (or match: +0)
        prev = cur
    return prev[-1]


def error_rate(refs, hyps):
    """(100 * total edits / total reference length, edits, length): corpus level, not the mean of
    per-utterance rates, where a short utterance with one error would weigh as much as a long one."""
    if len(refs) != len(hyps):
        raise ValueError(f"error_rate: {len(refs)} references but {len(hyps)} hypotheses")
    edits, ref_len = sum(edit_distance(r, h) for r, h in zip(refs, hyps)), sum(len(r) for r in refs)
    if ref_len == 0:
        raise ValueError("error_rate: the references are all empty (total length 0)")
    return 100.0 * edits / ref_len, edits, ref_len


@torch.no_grad()
def evaluate(probe, split, vocab, unit, device, batch_size=32):
    """Greedy-decode a split: {"per": %, "edits", "ref_len"}, for characters also "wer", "word_edits", "ref_words"."""
    probe.eval()
    hyps = []
    for k in range(0, len(split.ids), batch_size):
        x, lengths = pad_batch(split.features, range(k, min(k + batch_size, len(split.ids))), device)
        hyps.extend(greedy_decode(probe(x), lengths, blank=0))
    result = dict(zip(("per", "edits", "ref_len"), error_rate(split.labels, hyps)))
    if unit == "char":  # words: the decoded characters split at WORD_SEP, empty words dropped
        ref_words = [t.upper().split() for t in split.texts]
        hyp_words = [[w for w in "".join(vocab[i] for i in h).split(WORD_SEP) if w] for h in hyps]
        result.update(zip(("wer", "word_edits", "ref_words"), error_rate(ref_words, hyp_words)))
    probe.train()
    return result


# ----------------------------------------------------------------------------
# 6. Training with dev-based selection, then the test error rate
# ----------------------------------------------------------------------------


def run_probe(args):
    """The whole probe: labels, feature cache, training with dev selection, test. Returns the result dict."""
    start = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = check_device(args.device)
    lexicon = read_lexicon(args.lexicon) if args.unit == "phone" else None
    if args.unit == "char" and args.lexicon:
        print("note: --unit char does not use --lexicon")
    vocab = unit_vocabulary(args.unit, lexicon)
    splits = {name: load_split(name, getattr(args, name), args.unit, lexicon, vocab, args.skip_unknown,
                               getattr(args, f"{name}_limit")) for name in ("train", "dev", "test")}
    module, cnn_only = build_upstream(args.upstream, device, args.seed)
    print(f"upstream: {args.upstream} ({type(module).__name__}, {sum(p.numel() for p in module.parameters()) / 1e6:.2f}"
          f"M parameters{', conv front end only' if cnn_only else ''}), frozen")
    cache_bytes = 0
    for split in splits.values():
        cache_bytes += extract_features(module, cnn_only, split, device, args.extract_batch, args.max_cache_gb,
                                        cache_bytes)
    del module  # the probe never needs the upstream again
    extract_seconds = time.time() - start
    train, dev, test = splits["train"], splits["dev"], splits["test"]
    L, _, D = train.features[0][0].shape

    probe = Probe(L, D, len(vocab), args.normalize, args.head_init).to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=args.lr)  # SUPERB PR: Adam, lr 1e-2, no schedule
    rng = random.Random(args.seed)  # the batch order is a function of --seed alone
    order, pos = [], 0
    best = {"per": float("inf"), "step": 0, "state": None}
    history, losses, t_interval = [], [], time.time()
    print(f"probe: {L} layers x {D} dims -> {len(vocab)} units ({args.unit}s + blank); "
          f"{args.steps} steps, batch {args.batch_size}, Adam lr {args.lr}, eval every {args.eval_every}")
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            dev_result = evaluate(probe, dev, vocab, args.unit, device, args.batch_size)
            if dev_result["per"] < best["per"]:  # strict: the earliest of equal states is kept
                best = {"per": dev_result["per"], "step": step, "state": copy.deepcopy(probe.state_dict())}
            train_loss = sum(losses) / len(losses) if losses else None  # None at step 0
            ms = 1000 * (time.time() - t_interval) / max(len(losses), 1)
            print(f"step {step:>6}/{args.steps} | train ctc "
                  + (f"{train_loss:7.4f}" if train_loss is not None else "      -")
                  + f" | dev {args.unit[0]}er {dev_result['per']:6.2f}%"
                  + (f" wer {dev_result['wer']:6.2f}%" if "wer" in dev_result else "")
                  + f" | best {best['per']:6.2f}% @ {best['step']} | {ms:6.1f} ms/step | {time.time() - start:7.1f} s"
                  + f" | eta {ms * (args.steps - step) / 1000:6.0f} s", flush=True)
            history.append({"step": step, "train_loss": train_loss, **{f"dev_{k}": v for k, v in dev_result.items()}})
            losses, t_interval = [], time.time()
        if step == args.steps:
            break
        if pos + args.batch_size > len(order):  # each epoch a fresh permutation
            order, pos = list(range(len(train.ids))), 0
            rng.shuffle(order)
        idx = order[pos: pos + args.batch_size]
        pos += args.batch_size
        x, lengths = pad_batch(train.features, idx, device)  # (B, L, T, D), (B,)
        loss = ctc_loss(probe(x), lengths, [train.labels[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(probe.parameters(), args.clip)  # SUPERB PR clips at 1
        opt.step()
        losses.append(loss.item())

    probe.load_state_dict(best["state"])  # the test error rate is that of the best dev state
    dev_final = evaluate(probe, dev, vocab, args.unit, device, args.batch_size)
    test_result = evaluate(probe, test, vocab, args.unit, device, args.batch_size)
    layer_weights = probe.featurizer.weights.softmax(0).tolist()
    result = {
        "upstream": args.upstream, "unit": args.unit, "vocab_size": len(vocab),
        "dev_per": dev_final["per"], "test_per": test_result["per"],  # percent; for --unit char: CER
        "test_edits": test_result["edits"], "test_ref_len": test_result["ref_len"],
        "best_step": best["step"], "steps": args.steps, "seconds": time.time() - start,
        "extract_seconds": extract_seconds, "layer_weights": layer_weights, "num_layers": L, "dim": D,
        "n_train": len(train.ids), "n_dev": len(dev.ids), "n_test": len(test.ids),
        "skipped_unknown": {n: s.skipped_unknown for n, s in splits.items()},
        "cache_mb": cache_bytes / 2 ** 20, "initial_dev_per": history[0]["dev_per"],
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "normalize": args.normalize,
        "head_init": args.head_init, "history": history,
    }
    if args.unit == "char":
        result["dev_wer"], result["wer"] = dev_final["wer"], test_result["wer"]  # "wer" = test WER
    er = "PER" if args.unit == "phone" else "CER"
    print(f"done: {args.upstream}: test {er} {result['test_per']:.2f}%"
          + (f", test WER {result['wer']:.2f}%" if "wer" in result else "")
          + f" (dev {er} {result['dev_per']:.2f}% at step {best['step']}; untrained {result['initial_dev_per']:.2f}%)"
          f" | {len(train.ids)}/{len(dev.ids)}/{len(test.ids)} utterances | {result['seconds']:.1f} s")
    print("layer weights: " + " ".join(f"{w:.3f}" for w in layer_weights))
    if args.out:
        write_json(args.out, result)
    return result


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}")


def check_device(device):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


# ----------------------------------------------------------------------------
# 7. The speed table, apart from the probe: the same batch through every row, round-robin
# ----------------------------------------------------------------------------

METHODS = ("distilhubert", "armhubert", "colld", "gendistiller")  # distill.py --method values
# Dense bf16 tensor-core peaks (TFLOP/s, the vendors' data sheets) by torch.cuda.get_device_name, for MFU.
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA H200": 989.4,
               "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0,
               "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L4": 121.0}


def step_flops(method, teacher, student, seconds):
    """FLOPs of one distillation step on one utterance of `seconds` (model.count_macs, 2 FLOPs per MAC):
    the teacher's forward (ARMHuBERT: a second pass without the conv front end, which the mask does not
    touch), the student's forward and its backward (2x the forward). GenDistiller counts its cached
    free-running forward (teacher forcing attends to a few more keys)."""
    cfg = model.fit_to_teacher(replace(model.HUBERT_BASE, init_from_teacher=True, num_layers=teacher.num_layers),
                               teacher)[0]
    teacher_macs = model.count_macs(cfg, seconds, with_heads=False)
    if method == "armhubert":
        front_end = model.count_macs(replace(cfg, num_layers=0, target_layers=()), seconds, with_heads=False)
        teacher_macs = 2 * teacher_macs - front_end
    return 2 * (teacher_macs + 3 * model.count_macs(student.cfg, seconds))


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
    """[(name, fn, parameters, FLOPs or None)]: the teacher's forward, each preset's deployed forward
    (hidden_states: distilhubert without its prediction heads, gendistiller free-running) and one
    distillation step per method x teacher precision x compile setting, all on the same batch."""
    amp = distill.autocast_dtype(args, device)  # the students' autocast, as distill.py
    autocast = lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    params = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731

    def forward(net):
        def fn():
            with torch.no_grad(), autocast():  # note: model.Teacher turns autocast off for itself
                net(wav, lengths)
        return fn

    rows = [(f"teacher {args.teacher} forward", forward(teacher), params(teacher), None)]
    for preset in args.presets:
        student = model.build_student(preset, teacher, copy_weights=False)[0].to(device).eval()
        rows.append((f"student {preset} forward", forward(student.hidden_states),
                     model.count_parameters(student, with_heads=preset != "distilhubert"), None))
    compiled_teacher = None
    for method in [] if args.skip_distill else args.methods:
        for precision in args.teacher_precision:
            for compiled in args.compile:
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
                             params(student), args.batch * step_flops(method, teacher, student, args.seconds)))
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
    for name, fn, _, _ in rows:  # warm-up: allocation, autotuning, lazy init (and compiling)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            fn()
        sync()
        if cuda and args.warmup:
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    wall, cpu = {name: [] for name, *_ in rows}, {name: [] for name, *_ in rows}
    for r in range(args.repeats):
        for name, fn, _, _ in rows:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()  # kernels are asynchronous: wait before reading the clock
            wall[name].append(1000 * (time.perf_counter() - t0))
            cpu[name].append(1000 * (time.process_time() - c0))
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{w[-1]:.0f}" for w in wall.values()) + " ms",
              flush=True)
    gpu = torch.cuda.get_device_name(device) if cuda else "a CPU"
    peak = args.peak_tflops or PEAK_TFLOPS.get(gpu)
    table = []
    for name, _, n_params, flops in rows:
        ms = statistics.median(wall[name])
        table.append({"model": name, "params_m": n_params / 1e6, "ms": ms, "ms_min": min(wall[name]),
                      "ms_max": max(wall[name]), "cpu_ms": statistics.median(cpu[name]),
                      "audio_s_per_s": args.batch * args.seconds / (ms / 1000),
                      "x_teacher": statistics.median(w / t for w, t in zip(wall[name], wall[rows[0][0]])),
                      "peak_mem_mb": peaks.get(name),
                      "mfu": flops / (ms / 1000) / (peak * 1e12) if flops and peak else None})
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    head = ["model", "params (M)", "ms (median)", "ms min–max", "CPU ms", "audio s / s", "x teacher fwd", "MFU"]
    lines = ["| " + " | ".join(head + ["peak CUDA mem (MB)"] * cuda) + " |", "|---|" + "---:|" * (len(head) - 1 + cuda)]
    for r in table:
        cells = [r["model"], f"{r['params_m']:.2f}", f"{r['ms']:.1f}", f"{r['ms_min']:.0f}–{r['ms_max']:.0f}",
                 f"{r['cpu_ms']:.0f}", f"{r['audio_s_per_s']:.1f}", f"{r['x_teacher']:.2f}",
                 "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"]
        cells += ["-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"] * cuda
        lines.append("| " + " | ".join(cells) + " |")
    source = "--peak_tflops" if args.peak_tflops else f"{gpu}: dense bf16" if peak else f"{gpu}: pass --peak_tflops"
    print(f"\nBatch {args.batch} x {args.seconds} s, {device}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} round-robin rounds; teacher {args.teacher} (random weights unless loaded: timing does "
          "not need trained ones).\n" + "\n".join(lines)
          + f"\nMFU (distillation steps): FLOPs from the MAC counts (eval.step_flops) / time / peak ({source})."
          "\nx teacher fwd: median over rounds of (row time / teacher time in the same round). CPU ms: process "
          "CPU time (all threads)." + ("" if cuda else f" Peak RSS of the process (all rows): {rss_mb:.0f} MB."))
    if args.out:
        write_json(args.out, {"device": str(device), "batch": args.batch, "seconds": args.seconds,
                              "repeats": args.repeats, "teacher": args.teacher, "threads": torch.get_num_threads(),
                              "peak_rss_mb": rss_mb, "rows": table, "wall_ms": wall, "cpu_ms": cpu})
    return table


# ----------------------------------------------------------------------------
# 8. Command line: `probe` (sections 1-6) and `speed` (section 7)
# ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, except that an error is one line (exit status 2; the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = Parser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe", help="SUPERB-style CTC probe on a frozen upstream (defaults: SUPERB PR, "
                        "s3prl libriphone.yaml, except the steps)")
    pr.add_argument("--upstream", required=True, help="distill.py checkpoint | tiny | bundle name | teacher file | "
                    "random:NAME | random:PRESET[:TEACHER] | random:CKPT | cnn:UPSTREAM (see eval.py section 2)")
    for name, role in (("train", "(*/*/*.flac + *.trans.txt) to train the probe on"),
                       ("dev", "to pick the best probe state"), ("test", "for the final error rate")):
        pr.add_argument(f"--{name}", required=True, help=f"directory in LibriSpeech layout {role}")
        pr.add_argument(f"--{name}_limit", type=distill.at_least(0), default=0,
                        help="only the first N utterances by id (0 = all): the feature cache must fit in memory")
    pr.add_argument("--lexicon", help="'WORD ph ph ...' per line, first pronunciation wins (for --unit phone)")
    pr.add_argument("--unit", choices=("phone", "char"), default="phone",
                    help="phone: PER via the lexicon; char: letters + '|' between words, reports CER and WER")
    pr.add_argument("--skip-unknown", "--skip_unknown", dest="skip_unknown", action="store_true",
                    help="leave out (and count) utterances with a word missing from the lexicon instead of failing")
    pr.add_argument("--steps", type=distill.at_least(1), default=2000, help="training steps (SUPERB: 100k)")
    pr.add_argument("--eval_every", "--eval-every", dest="eval_every", type=distill.at_least(1), default=200,
                    help="evaluate on dev every N steps, keep the best state (SUPERB: 1000)")
    pr.add_argument("--batch_size", type=distill.at_least(1), default=32, help="utterances per step (SUPERB: 16 x 2)")
    pr.add_argument("--lr", type=distill.positive, default=1e-2, help="Adam learning rate")
    pr.add_argument("--clip", type=distill.non_negative, default=1.0, help="gradient-norm clipping, 0 = off")
    pr.add_argument("--normalize", action="store_true", help="LayerNorm (no affine) on each layer before the sum")
    pr.add_argument("--head_init", choices=("zero", "random"), default="zero",
                    help="zero: uniform output at the start (choice); random: PyTorch's default (SUPERB)")
    pr.add_argument("--extract_batch", type=distill.at_least(1), default=8, help="utterances per upstream forward")
    pr.add_argument("--max_cache_gb", type=distill.positive, default=16.0,
                    help="stop with an error when the float16 feature cache of all splits passes this many GiB")

    sp = sub.add_parser("speed", help="time the teacher, the students and a distillation step per method")
    sp.add_argument("--teacher", default="random:hubert_base", help="tiny | bundle name | teacher file | "
                    "random:NAME (default: HuBERT Base's size with random weights: timing needs no trained ones)")
    sp.add_argument("--presets", nargs="+", default=list(model.PRESETS), choices=list(model.PRESETS),
                    help="student presets to time (each fitted to the teacher)")
    one_frame = data.MIN_SAMPLES / data.SAMPLE_RATE
    sp.add_argument("--seconds", type=distill.ranged(float, lambda v: v >= one_frame, f">= {one_frame} (one frame)"),
                    default=4.0, help="seconds of audio per utterance")
    sp.add_argument("--batch", type=distill.at_least(1), default=8, help="utterances per batch")
    sp.add_argument("--repeats", type=distill.at_least(1), default=5, help="timed rounds, each running every row once")
    sp.add_argument("--warmup", type=distill.at_least(0), default=1,
                    help="untimed runs of each row first (on a GPU, their peak is the row's memory)")
    sp.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="distill.py methods to time one training step of (with the method's default preset)")
    sp.add_argument("--skip_distill", action="store_true", help="do not time distillation steps")
    sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="student autocast as in distill.py: auto = bf16 on GPUs that support it, fp32 on CPU")
    sp.add_argument("--teacher_precision", nargs="+", default=["fp32"], choices=["fp32", "auto"],
                    help="distillation rows for each: the teacher in fp32 or under the student's autocast")
    sp.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                    help="distillation rows for each: eager, or torch.compile'd as distill.py --compile")
    sp.add_argument("--peak_tflops", type=distill.positive,
                    help="the device's peak TFLOP/s for the MFU column (default: dense bf16 of a known GPU)")
    for q in (pr, sp):
        q.add_argument("--seed", type=distill.at_least(0), default=0, help="seed (probe, random weights, audio)")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        q.add_argument("--threads", type=distill.at_least(0), default=0, help="CPU threads for torch (0 = its default)")
        q.add_argument("--out", help="also write the result as JSON here")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "probe" and args.unit == "phone" and not args.lexicon:
        p.error("--unit phone needs --lexicon FILE")
    return args


def main(argv=None):
    args = parse_args(argv)
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
