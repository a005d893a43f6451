"""Evaluation of distilled speech models: a SUPERB-style phoneme-recognition probe and a speed table.

What this file holds, top to bottom (method reference: ../shared/SPEC.md, section 5):
  1. Greedy CTC decoding, edit distance and corpus-level error rates.
  2. Labels: the lexicon (`WORD ph ph ...`, first pronunciation wins), transcripts -> phones
     or characters, and the LibriSpeech-layout splits (audio + *.trans.txt) of the probe.
  3. Upstreams: what the probe listens to. A distill.py checkpoint, any teacher that
     model.load_teacher accepts, `random:...` (the untrained floor at equal size) or
     `cnn:...` (the conv front end alone), always frozen.
  4. Feature cache: the frozen upstream runs ONCE over every split; all of its layers are
     kept in memory in float16, so the probe's training steps cost only the small head.
  5. The probe: SUPERB's learned softmax-weighted sum of layers + a linear CTC head, Adam,
     dev-selected best state, test error rate with that state.
  6. The probe's command line.
  7. Measurements, apart from the evaluator: speed of the teacher, every student preset,
     torchaudio's own wav2vec2 at the maskhubert size and one distillation step per method,
     timed side by side on the same batch.
  8. Command line: the `probe` and `speed` sub-commands.

SUPERB PR in small: SUPERB (Yang et al. 2021) trains a downstream on LibriSpeech
train-clean-100 for 100k steps; this probe trains the same kind of head on whatever subset
you give it (cached features must fit in memory: about L x D x 50 x 2 bytes per second of
audio, 0.9 MB/s for a 12-layer 768-d model), which is enough to rank upstreams against each
other and against their `random:` floor, not to reproduce the papers' absolute PER.

Examples:
    # phoneme error rate of a distilled student (LibriSpeech layout dirs, CMUdict-style lexicon)
    python eval.py probe --upstream runs/armhubert/ckpt-00390600.pt \\
        --train data/LibriSpeech/train-clean-100 --train_limit 2000 \\
        --dev data/LibriSpeech/dev-clean --test data/LibriSpeech/test-clean \\
        --lexicon librispeech-lexicon.txt --out results/armhubert_pr.json
    # the floor: same architecture, random weights
    python eval.py probe --upstream random:runs/armhubert/ckpt-00390600.pt ...
    # speed table (random HuBERT Base-sized teacher, no download)
    python eval.py speed --seconds 4 --batch 8 --device cuda --out results/speed.json
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model

# ----------------------------------------------------------------------------
# 1. Greedy CTC decoding and error rates (SPEC 5)
# ----------------------------------------------------------------------------


def greedy_decode(logits_or_ids, lengths, blank=0):
    """Greedy CTC decoding: argmax per frame, collapse repeats, drop blanks.

    logits_or_ids: (B, T, V) scores or (B, T) integer ids; lengths: (B,) valid frames.
    Returns a list of B lists of unit ids. Example with blank = 0:
        ids [0, 1, 1, 0, 1, 2, 2, 0] -> collapse [0, 1, 0, 1, 2, 0] -> drop blanks [1, 1, 2]
    (the blank between the two 1s is what lets CTC emit a unit twice in a row).
    """
    ids = logits_or_ids.argmax(dim=-1) if logits_or_ids.is_floating_point() else logits_or_ids  # (B, T)
    out = []
    for b in range(ids.shape[0]):
        seq = ids[b, : int(lengths[b])].tolist()  # padded frames are never decoded
        hyp, prev = [], None
        for i in seq:
            if i != prev and i != blank:
                hyp.append(i)
            prev = i  # subtle: prev is updated on blanks too, so 1 0 1 gives two 1s
        out.append(hyp)
    return out


def edit_distance(ref, hyp):
    """Levenshtein distance between two sequences: fewest substitutions + insertions + deletions.

    Plain dynamic programme over a (len(ref)+1) x (len(hyp)+1) table, kept one row at a time:
    d[i][j] = edits to turn ref[:i] into hyp[:j].
    """
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
    """Corpus-level error rate in percent: 100 * sum of edits / sum of reference lengths.

    Not the mean of per-utterance rates (SPEC 5): a short utterance with one error would
    otherwise weigh as much as a long one. Returns (rate %, total edits, total ref length).
    """
    if len(refs) != len(hyps):
        raise ValueError(f"error_rate: {len(refs)} references but {len(hyps)} hypotheses")
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    ref_len = sum(len(r) for r in refs)
    if ref_len == 0:
        raise ValueError("error_rate: the references are all empty (total length 0)")
    return 100.0 * edits / ref_len, edits, ref_len


# ----------------------------------------------------------------------------
# 2. Labels: lexicon, transcripts -> units, LibriSpeech-layout splits
# ----------------------------------------------------------------------------

BLANK = "<blank>"  # CTC blank, always unit id 0
WORD_SEP = "|"  # word separator of the character unit (as in SUPERB's ASR and wav2letter)
# LibriSpeech transcripts use exactly these characters (upper-case letters, apostrophe, space).
CHARS = [WORD_SEP] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["'"]


def read_lexicon(path):
    """Read a pronunciation lexicon: {WORD: [phone, ...]}.

    One entry per line, `WORD ph ph ...`, separated by spaces or tabs (librispeech-lexicon.txt
    and CMUdict both fit). Words are upper-cased for lookup. A word listed more than once
    keeps its FIRST pronunciation, as SUPERB's lexicon reader does; later ones are counted and
    reported. Blank lines and CMUdict comments (`;;;`) are not entries. Phones are taken as
    written (stress digits such as AH0 / AH1 stay distinct units if the lexicon has them).
    """
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
            if word in lexicon:
                repeated += 1  # choice (SUPERB): first pronunciation wins
                continue
            lexicon[word] = parts[1:]
    if not lexicon:
        raise ValueError(f"--lexicon {path}: no entries found (expected lines 'WORD ph ph ...')")
    if repeated:
        print(f"lexicon: {path}: {len(lexicon)} words; {repeated} further pronunciations ignored (first one wins)")
    return lexicon


class UnknownWord(ValueError):
    """A transcript word that the lexicon does not have."""

    def __init__(self, word, where):
        super().__init__(f"word {word!r} of {where} is not in the lexicon "
                         "(pass --skip-unknown to leave such utterances out, counted)")
        self.word = word


def text_to_units(text, unit, lexicon=None, where="transcript"):
    """A transcript as a list of unit strings.

    unit "phone": every word (upper-cased) looked up in `lexicon`; a missing word raises
      UnknownWord naming the word and `where`.
    unit "char": letters with WORD_SEP between words, e.g. "AN APPLE" -> A N | A P P L E;
      a character outside CHARS is an error naming it.
    """
    words = text.upper().split()
    if not words:
        raise ValueError(f"{where}: empty transcript")
    if unit == "phone":
        units = []
        for w in words:
            if w not in lexicon:
                raise UnknownWord(w, where)
            units.extend(lexicon[w])
        return units
    if unit == "char":
        for w in words:
            bad = [c for c in w if c not in CHARS or c == WORD_SEP]
            if bad:
                raise ValueError(f"{where}: character {bad[0]!r} in word {w!r} is not in the character set "
                                 f"{''.join(CHARS[1:])!r} (letters and apostrophe)")
        return list(WORD_SEP.join(words))
    raise ValueError(f"--unit {unit!r}: expected 'phone' or 'char'")


def unit_vocabulary(unit, lexicon=None):
    """Unit strings by id; id 0 is the CTC blank (SPEC 5)."""
    if unit == "phone":
        # choice: the vocabulary is every phone of the lexicon, so it does not depend on
        # which words the splits happen to contain
        return [BLANK] + sorted({p for phones in lexicon.values() for p in phones})
    return [BLANK] + CHARS


def units_to_words(units):
    """Decoded characters back to words: split at WORD_SEP, drop empty words (for WER)."""
    return [w for w in "".join(units).split(WORD_SEP) if w]


@dataclass
class Split:
    """One LibriSpeech-layout split: utterances with audio paths and unit-id labels."""

    name: str  # "train" / "dev" / "test"
    root: str
    ids: List[str] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)
    num_samples: List[int] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)
    labels: List[List[int]] = field(default_factory=list)  # unit ids, blank (0) never appears
    skipped_unknown: int = 0  # utterances left out for an unknown word (--skip-unknown)
    unused_audio: int = 0  # audio files without a transcript line
    features: list = None  # filled by extract_features: per utterance (float16 (L, T, D), float32 scale (L, 1, 1))


def _trans_file_of(audio_path):
    """The *.trans.txt next to an audio file (LibriSpeech keeps one per chapter folder), for messages."""
    folder = os.path.dirname(audio_path)
    found = sorted(n for n in os.listdir(folder) if n.endswith(".trans.txt"))
    return os.path.join(folder, found[0]) if found else folder


def load_split(name, root, unit, lexicon, vocab, skip_unknown=False, limit=0):
    """Read a LibriSpeech-layout directory (`*/*/*.flac` + `*.trans.txt`) into a Split.

    Every transcript line needs its audio file (utterance id = file name without extension);
    a missing or unusable one is an error naming it. Audio files without a transcript line
    are counted and reported. With limit > 0 only the first `limit` utterances by id are used.
    """
    flag = f"--{name}"
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{flag} {root}: directory not found")
    texts = data.read_transcripts(root)  # raises on malformed or empty lines, naming file:line
    items, report = data.scan_audio(root, verbose=False)
    audio = {os.path.splitext(os.path.basename(p))[0]: (p, n) for p, n in items}
    bad = {os.path.splitext(os.path.basename(p))[0]: (p, why) for p, why in report}
    split = Split(name, root)
    split.unused_audio = len(set(audio) - set(texts))
    to_id = {u: i for i, u in enumerate(vocab)}
    utt_ids = sorted(texts)
    if limit and limit > 0:
        utt_ids = utt_ids[:limit]
    for utt in utt_ids:
        if utt in bad:
            raise ValueError(f"{flag} {root}: audio of utterance {utt!r} is unusable: {bad[utt][0]}: {bad[utt][1]}")
        if utt not in audio:
            raise FileNotFoundError(f"{flag} {root}: no audio file for utterance {utt!r} "
                                    f"(expected {utt}.flac or {utt}.wav under {root})")
        path, n = audio[utt]
        where = f"utterance {utt} in {_trans_file_of(path)}"
        try:
            units = text_to_units(texts[utt], unit, lexicon, where)
        except UnknownWord:
            if not skip_unknown:
                raise
            split.skipped_unknown += 1  # counted and reported, never silent
            continue
        missing = [u for u in units if u not in to_id]
        if missing:  # cannot happen for phones (vocabulary = lexicon phones); kept as a guard
            raise ValueError(f"{where}: unit {missing[0]!r} is not in the vocabulary")
        split.ids.append(utt)
        split.paths.append(path)
        split.num_samples.append(n)
        split.texts.append(texts[utt])
        split.labels.append([to_id[u] for u in units])
    if not split.ids:
        raise ValueError(f"{flag} {root}: no usable utterance ({split.skipped_unknown} skipped for unknown words)")
    hours = sum(split.num_samples) / data.SAMPLE_RATE / 3600
    print(f"{name}: {root}: {len(split.ids)} utterances, {hours:.2f} h"
          + (f", {split.skipped_unknown} skipped (word not in lexicon)" if split.skipped_unknown else "")
          + (f", {split.unused_audio} audio files without transcript (not used)" if split.unused_audio else "")
          + (f", limited to the first {limit} by id (--{name}_limit)" if limit else ""))
    return split


# ----------------------------------------------------------------------------
# 3. Upstreams: what the probe listens to
#
# Spec strings (--upstream of probe, --teacher of speed):
#   PATH.pt            a distill.py checkpoint (has a "student" key) -> its student (model.load_student)
#   tiny | NAME | PATH anything model.load_teacher accepts -> Teacher
#   random:NAME        a torchaudio bundle geometry (e.g. random:hubert_base) with random weights,
#                      no download; random:tiny = the tiny teacher drawn with --seed
#   random:PRESET[:T]  a student preset with random weights, fitted to teacher T
#                      (default: a HuBERT Base-sized description, nothing loaded)
#   random:CKPT        the config of a distill.py checkpoint with fresh weights: the floor row
#                      at exactly the same size
#   cnn:SPEC           only the conv front end of SPEC: one "layer", (B, T, C)
# ----------------------------------------------------------------------------


def _is_student_checkpoint(path):
    """True when `path` is a distill.py checkpoint; mmap avoids reading a large teacher file twice."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # pickle errors come in many types; model.load_teacher then reports the file's problem
        return False
    return isinstance(ckpt, dict) and "student" in ckpt and "config" in ckpt


def build_upstream(spec, device="cpu", seed=0, flag="--upstream"):
    """Resolve an upstream spec (see the table above) to a frozen module in eval mode.

    Returns (module, cnn_only). The module has hidden_states(wav, lengths) and
    cnn_features(wav, lengths); cnn_only says which one the probe reads.
    """
    cnn_only = spec.startswith("cnn:")
    rest = spec[len("cnn:"):] if cnn_only else spec
    if rest.startswith("cnn:"):
        raise ValueError(f"{flag} {spec}: 'cnn:' given twice")
    if rest.startswith("random:"):
        what = rest[len("random:"):]
        if os.path.isfile(what):
            if not _is_student_checkpoint(what):
                raise ValueError(f"{flag} {spec}: {what} is not a distill.py checkpoint (no 'student'/'config' keys); "
                                 "random:FILE takes the architecture of a student checkpoint")
            ckpt = torch.load(what, map_location="cpu", weights_only=True)
            cfg = model.config_from_dict(ckpt["config"], ckpt["student"])
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                module, _ = model.build_student(cfg)  # same config, fresh weights: the floor at equal size
        else:
            preset, _, teacher_spec = what.partition(":")
            if preset in model.PRESETS:
                # choice: without ':TEACHER' the preset is fitted to HuBERT Base's geometry (the
                # papers' size), described from torchaudio's config so nothing is downloaded
                teacher = build_upstream(teacher_spec, "cpu", seed, flag)[0] if teacher_spec else model.bundle_description("hubert_base")
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    module, _ = model.build_student(preset, teacher, copy_weights=False)
            elif not teacher_spec:
                module = model.random_teacher(preset, seed)  # ValueError names the bundles
            else:
                raise ValueError(f"{flag} {spec}: {preset!r} is not a student preset ({', '.join(model.PRESETS)})")
    elif os.path.isfile(rest) and _is_student_checkpoint(rest):
        module = model.load_student(rest, "cpu")
    else:
        try:
            module = model.load_teacher(rest, "cpu")
        except ValueError as e:
            reason = re.sub(rf"^(--teacher )?'?{re.escape(rest)}'?: ", "", str(e))  # the loader names it too
            raise ValueError(f"{flag} {spec}: {reason}; also accepted: a distill.py checkpoint, random:NAME, "
                             f"random:PRESET[:TEACHER] (presets: {', '.join(model.PRESETS)}), random:CKPT, cnn:SPEC") from e
    module = module.to(device).eval()
    module.requires_grad_(False)  # frozen: the probe never changes the upstream
    return module, cnn_only


@torch.no_grad()
def upstream_layers(module, cnn_only, wav, lengths):
    """(list of L tensors (B, T, D), frame_lengths): the layers the featurizer weights."""
    if cnn_only:
        feats, frame_lengths = module.cnn_features(wav, lengths)  # (B, T, C)
        return [feats], frame_lengths
    layers, frame_lengths = module.hidden_states(wav, lengths)
    # note: Teacher.hidden_states returns blocks 1..L (model.py's layer convention), while
    # SUPERB's weighted sum also includes hidden_states[0], the transformer input. Students of
    # the distilhubert preset return [input, layer 1, ..., layer N] as their SUPERB upstream does.
    return layers, frame_lengths


# ----------------------------------------------------------------------------
# 4. Feature cache: the frozen upstream runs once over each split
# ----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(module, cnn_only, split, device, batch_size=8, max_cache_gb=16.0, cached_before=0):
    """Run the frozen upstream over `split` once; store per utterance its (L, T, D) layers in float16.

    choice: float16 halves the cache; its 3-digit precision is far below the probe's noise, and
    each layer is stored scaled to max |x| = 1 (scale kept in float32) so that neither tiny
    (random conv) nor large (pre-LN) activations leave float16's range. The probe turns a
    batch back to float32 upstream values before the featurizer. Utterances run in batches of similar length
    (sorted by length: little padding); model.py checks that padding never changes a valid
    frame, so batching does not change the features. Returns the number of bytes cached.
    """
    order = sorted(range(len(split.ids)), key=lambda i: split.num_samples[i])
    split.features = [None] * len(split.ids)
    total, start = 0, time.time()  # bytes cached for this split
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        wav, lengths = data.collate([data.load_audio(split.paths[i]) for i in idx])  # (B, S), (B,)
        for i, n in zip(idx, lengths.tolist()):
            if n != split.num_samples[i]:
                raise ValueError(f"{split.paths[i]}: decoded {n} samples but the header said {split.num_samples[i]}")
        layers, frame_lengths = upstream_layers(module, cnn_only, wav.to(device), lengths.to(device))
        stacked = torch.stack(layers, dim=1).float()  # (B, L, T, D)
        for b, i in enumerate(idx):
            x = stacked[b, :, : int(frame_lengths[b])]  # (L, T_b, D) valid frames only
            # subtle: float16's smallest normal number is 6e-5 and a random conv stack's features
            # can be ~1e-4, so each layer is stored divided by its max |x| (float32 scale, (L, 1, 1))
            scale = x.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-30)  # (L, 1, 1)
            split.features[i] = ((x / scale).to("cpu", torch.float16), scale.cpu())
            total += x.numel() * 2
        if cached_before + total > max_cache_gb * 2 ** 30:
            raise MemoryError(f"{split.name}: the feature cache of all splits passed --max_cache_gb {max_cache_gb} after "
                              f"{k + len(idx)} of {len(order)} utterances; use --{split.name}_limit or a smaller split")
    L, _, D = split.features[0][0].shape
    print(f"{split.name}: cached {len(order)} utterances x {L} layers x {D} dims in float16: "
          f"{total / 2 ** 20:.1f} MB in {time.time() - start:.1f} s")
    # CTC cannot align a label sequence longer than its frames (plus one blank between repeats);
    # zero_infinity makes such utterances contribute zero loss; count them so it is not silent.
    too_short = sum(f.shape[1] < len(y) + sum(a == b for a, b in zip(y, y[1:]))
                    for (f, _), y in zip(split.features, split.labels))
    if too_short:
        print(f"{split.name}: warning: {too_short} utterances have fewer frames than CTC needs for their labels "
              "(zero loss in training, still scored in evaluation)")
    return total


def pad_batch(features, idx, device):
    """Cached utterances (float16 (L, T_b, D), scale (L, 1, 1)) -> (B, L, T_max, D) float32 zero-padded, lengths (B,)."""
    lengths = torch.tensor([features[i][0].shape[1] for i in idx], dtype=torch.long)
    L, _, D = features[idx[0]][0].shape
    x = torch.zeros(len(idx), L, int(lengths.max()), D)  # (B, L, T, D)
    for b, i in enumerate(idx):
        half, scale = features[i]
        x[b, :, : half.shape[1]] = half.float() * scale  # back to the upstream's own values
    return x.to(device), lengths.to(device)


# ----------------------------------------------------------------------------
# 5. The probe: weighted sum of layers + linear CTC head (SUPERB PR)
# ----------------------------------------------------------------------------


class WeightedSum(nn.Module):
    """SUPERB's featurizer: h = sum_l softmax(w)_l * layer_l, one learned scalar per layer.

    w starts at zero, i.e. a uniform average of the layers. normalize=True first applies a
    LayerNorm without affine parameters to each layer (s3prl's Featurizer `normalize` option,
    off by default in SUPERB, and here).
    """

    def __init__(self, num_layers, normalize=False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))  # softmax(0) = uniform
        self.normalize = normalize

    def forward(self, layers):
        """layers: (B, L, T, D) -> (B, T, D)."""
        if self.normalize:
            layers = F.layer_norm(layers, layers.shape[-1:])  # per layer and frame, over D
        w = self.weights.softmax(dim=0)  # (L,), sums to 1
        return torch.einsum("l,bltd->btd", w, layers)  # (B, T, D)


class Probe(nn.Module):
    """WeightedSum + Linear(D -> V): frame-level unit scores, V = units + blank (id 0).

    choice: one Linear. SUPERB's PR downstream (s3prl libriphone.yaml) stacks Linear(D -> 256)
    and a linear frame-level layer, which is also linear but with a rank-256 bottleneck.
    choice (--head_init): the head starts at zero, so every unit is equally likely, greedy
    decoding emits nothing (the untrained PER is exactly 100 %) and two runs differ only in
    batch order. PyTorch's default random init (what SUPERB uses, `--head_init random`) made
    some seeds stall far above that on the tiny test task.
    note: a linear CTC head emits a unit with the same probability q on frames whose features
    are alike; over n alike frames the CTC likelihood has a local optimum at small q (greedy
    decoding then outputs only blanks) once n >~ 5. Contextual upstream features, which change
    across a phone, avoid it; a stationary synthetic sound of many frames does not.
    """

    def __init__(self, num_layers, dim, vocab_size, normalize=False, head_init="zero"):
        super().__init__()
        self.featurizer = WeightedSum(num_layers, normalize)
        self.head = nn.Linear(dim, vocab_size)
        if head_init == "zero":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif head_init != "random":
            raise ValueError(f"--head_init {head_init!r}: expected 'zero' or 'random'")

    def forward(self, layers):
        return self.head(self.featurizer(layers))  # (B, T, V)


def ctc_loss(logits, frame_lengths, labels):
    """CTC loss of a batch: logits (B, T, V), frame_lengths (B,), labels list of B id lists.

    torch's ctc_loss wants time-major log-probs; the one transpose of this file is here.
    zero_infinity: an utterance CTC cannot align gives 0 instead of inf (as SUPERB).
    Reduction "mean": each utterance's loss divided by its label length, then the batch mean.
    """
    log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)  # (T, B, V)
    targets = torch.tensor([u for y in labels for u in y], dtype=torch.long, device=logits.device)
    target_lengths = torch.tensor([len(y) for y in labels], dtype=torch.long, device=logits.device)
    return F.ctc_loss(log_probs, targets, frame_lengths, target_lengths, blank=0, zero_infinity=True)


@torch.no_grad()
def evaluate(probe, split, vocab, unit, device, batch_size=32):
    """Greedy-decode a split; returns {"per": %, "edits", "ref_len"} (+ "wer" for --unit char)."""
    probe.eval()
    hyps = []
    for k in range(0, len(split.ids), batch_size):
        idx = list(range(k, min(k + batch_size, len(split.ids))))
        x, lengths = pad_batch(split.features, idx, device)  # (B, L, T, D), (B,)
        hyps.extend(greedy_decode(probe(x), lengths, blank=0))
    rate, edits, ref_len = error_rate(split.labels, hyps)
    result = {"per": rate, "edits": edits, "ref_len": ref_len}
    if unit == "char":
        ref_words = [t.upper().split() for t in split.texts]
        hyp_words = [units_to_words([vocab[i] for i in h]) for h in hyps]
        result["wer"], result["word_edits"], result["ref_words"] = error_rate(ref_words, hyp_words)
    probe.train()
    return result


def run_probe(args):
    """The whole probe: labels, feature cache, training with dev selection, test. Returns the result dict."""
    start = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = check_device(args.device)
    # --- labels
    lexicon = read_lexicon(args.lexicon) if args.unit == "phone" else None
    if args.unit == "char" and args.lexicon:
        print("note: --unit char does not use --lexicon")
    vocab = unit_vocabulary(args.unit, lexicon)
    splits = {name: load_split(name, getattr(args, name), args.unit, lexicon, vocab, args.skip_unknown,
                               getattr(args, f"{name}_limit"))
              for name in ("train", "dev", "test")}
    # --- frozen upstream, run once per split
    module, cnn_only = build_upstream(args.upstream, device, args.seed)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"upstream: {args.upstream} ({type(module).__name__}, {n_params / 1e6:.2f}M parameters"
          f"{', conv front end only' if cnn_only else ''}), frozen")
    cache_bytes = 0
    for split in splits.values():
        cache_bytes += extract_features(module, cnn_only, split, device, args.extract_batch,
                                        args.max_cache_gb, cache_bytes)
    del module  # the probe never needs the upstream again
    extract_seconds = time.time() - start
    train, dev, test = splits["train"], splits["dev"], splits["test"]
    L, _, D = train.features[0][0].shape
    # --- probe
    probe = Probe(L, D, len(vocab), args.normalize, args.head_init).to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=args.lr)  # SUPERB PR: Adam, lr 1e-2, no schedule
    rng = random.Random(args.seed)  # batch order: a pure function of --seed
    order, pos = [], 0
    best = {"per": float("inf"), "step": 0, "state": None}
    history, losses, t_interval = [], [], time.time()
    print(f"probe: {L} layers x {D} dims -> {len(vocab)} units ({args.unit}s + blank); "
          f"{args.steps} steps, batch {args.batch_size}, Adam lr {args.lr}, eval every {args.eval_every}")
    for step in range(0, args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            dev_result = evaluate(probe, dev, vocab, args.unit, device, args.batch_size)
            if dev_result["per"] < best["per"]:  # strict: the earliest of equal states is kept
                best = {"per": dev_result["per"], "step": step, "state": copy.deepcopy(probe.state_dict())}
            train_loss = sum(losses) / len(losses) if losses else None  # None at step 0 (no step yet)
            ms = 1000 * (time.time() - t_interval) / max(len(losses), 1)
            loss_s = f"{train_loss:7.4f}" if train_loss is not None else "      -"
            line = (f"step {step:>6}/{args.steps} | train ctc {loss_s} | dev {args.unit[0]}er "
                    f"{dev_result['per']:6.2f}%" + (f" wer {dev_result['wer']:6.2f}%" if "wer" in dev_result else "")
                    + f" | best {best['per']:6.2f}% @ {best['step']} | {ms:6.1f} ms/step | {time.time() - start:7.1f} s"
                    + f" | eta {ms * (args.steps - step) / 1000:6.0f} s")
            print(line, flush=True)
            history.append({"step": step, "train_loss": train_loss, **{f"dev_{k}": v for k, v in dev_result.items()}})
            losses, t_interval = [], time.time()
        if step == args.steps:
            break
        # one training step on a random batch (each epoch a fresh permutation)
        if pos + args.batch_size > len(order):
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
    # --- test with the best dev state
    probe.load_state_dict(best["state"])
    dev_final = evaluate(probe, dev, vocab, args.unit, device, args.batch_size)
    test_result = evaluate(probe, test, vocab, args.unit, device, args.batch_size)
    layer_weights = probe.featurizer.weights.softmax(0).tolist()
    seconds = time.time() - start
    result = {
        "upstream": args.upstream, "unit": args.unit, "vocab_size": len(vocab),
        "dev_per": dev_final["per"], "test_per": test_result["per"],  # percent; for --unit char: CER
        "test_edits": test_result["edits"], "test_ref_len": test_result["ref_len"],
        "best_step": best["step"], "steps": args.steps, "seconds": seconds, "extract_seconds": extract_seconds,
        "layer_weights": layer_weights, "num_layers": L, "dim": D,
        "n_train": len(train.ids), "n_dev": len(dev.ids), "n_test": len(test.ids),
        "skipped_unknown": {n: s.skipped_unknown for n, s in splits.items()},
        "cache_mb": cache_bytes / 2 ** 20, "initial_dev_per": history[0]["dev_per"],
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "normalize": args.normalize,
        "head_init": args.head_init,
        "history": history,
    }
    if args.unit == "char":
        result["dev_wer"], result["wer"] = dev_final["wer"], test_result["wer"]  # "wer" = test WER
    er = "PER" if args.unit == "phone" else "CER"
    print(f"done: {args.upstream}: test {er} {result['test_per']:.2f}%"
          + (f", test WER {result['wer']:.2f}%" if "wer" in result else "")
          + f" (dev {er} {result['dev_per']:.2f}% at step {best['step']}; untrained {result['initial_dev_per']:.2f}%)"
          f" | {len(train.ids)}/{len(dev.ids)}/{len(test.ids)} utterances | {seconds:.1f} s")
    print("layer weights: " + " ".join(f"{w:.3f}" for w in layer_weights))
    if args.out:
        write_json(args.out, result)
    return result


def write_json(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}")


def check_device(device):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


# ----------------------------------------------------------------------------
# 6. The probe's command line (`python eval.py probe ...`)
# ----------------------------------------------------------------------------


def add_probe_command(sub):
    """The `probe` sub-command's flags (defaults: SUPERB PR, except the number of steps)."""
    pr = sub.add_parser("probe", help="SUPERB-style CTC probe on a frozen upstream (phones or characters)",
                        description="Train a weighted-sum + linear CTC probe on a frozen upstream. The upstream runs "
                                    "once over train/dev/test and ALL its layers are cached in memory in float16 "
                                    "(about L x D x 100 bytes per second of audio), so training steps are cheap on CPU.")
    g = pr.add_argument_group("upstream and data")
    g.add_argument("--upstream", required=True,
                   help="distill.py checkpoint | tiny | torchaudio bundle name | teacher file | random:NAME | "
                        "random:PRESET[:TEACHER] | random:CKPT (fresh weights, same config) | cnn:SPEC (conv features only)")
    g.add_argument("--train", required=True, help="LibriSpeech-layout directory (*/*/*.flac + *.trans.txt) to train the probe on")
    g.add_argument("--dev", required=True, help="LibriSpeech-layout directory used to pick the best probe state")
    g.add_argument("--test", required=True, help="LibriSpeech-layout directory for the final error rate")
    g.add_argument("--lexicon", default=None, help="'WORD ph ph ...' per line, first pronunciation wins (needed for --unit phone)")
    g.add_argument("--unit", choices=("phone", "char"), default="phone",
                   help="phone: PER via the lexicon; char: letters + '|' word separator, reports CER and WER")
    g.add_argument("--skip-unknown", "--skip_unknown", dest="skip_unknown", action="store_true",
                   help="leave out (and count) utterances with a word missing from the lexicon instead of failing")
    for name in ("train", "dev", "test"):
        g.add_argument(f"--{name}_limit", type=int, default=0,
                       help=f"use only the first N {name} utterances by id (0 = all): the cache must fit in memory")
    g = pr.add_argument_group("probe training (defaults: SUPERB PR, s3prl libriphone.yaml, except steps)")
    g.add_argument("--steps", type=int, default=2000,
                   help="training steps (SUPERB: 100k on train-clean-100; a small subset needs far fewer)")
    g.add_argument("--eval_every", "--eval-every", dest="eval_every", type=int, default=200,
                   help="evaluate on dev every N steps and keep the best state (SUPERB: 1000)")
    g.add_argument("--batch_size", type=int, default=32, help="utterances per step (SUPERB: 16 x 2 accumulation)")
    g.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (SUPERB PR: 1e-2)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping, 0 = off (SUPERB PR: 1)")
    g.add_argument("--normalize", action="store_true",
                   help="LayerNorm (no affine) on each layer before the weighted sum (s3prl option; SUPERB default off)")
    g.add_argument("--head_init", choices=("zero", "random"), default="zero",
                   help="zero: uniform output at start, untrained PER exactly 100%% (choice); random: PyTorch's default (SUPERB)")
    g = pr.add_argument_group("run")
    g.add_argument("--extract_batch", type=int, default=8, help="utterances per upstream forward while caching features")
    g.add_argument("--max_cache_gb", type=float, default=16.0,
                   help="stop with an error when the float16 feature cache (all layers, all splits) passes this many GiB")
    g.add_argument("--seed", type=int, default=0, help="seed of the probe init, batch order and random: upstreams")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (upstream extraction and probe)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default); 1 is often fastest for the small probe ops")
    g.add_argument("--out", default=None, help="write the result JSON here")


# What every numeric flag of `probe` allows: (test, the words of the error).
PROBE_RANGES = {
    "steps": (lambda v: v >= 1, ">= 1"), "eval_every": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"), "extract_batch": (lambda v: v >= 1, ">= 1"),
    "train_limit": (lambda v: v >= 0, ">= 0 (0 = all)"), "dev_limit": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "test_limit": (lambda v: v >= 0, ">= 0 (0 = all)"), "lr": (lambda v: v > 0, "> 0"),
    "clip": (lambda v: v >= 0, ">= 0 (0 = off)"), "max_cache_gb": (lambda v: v > 0, "> 0"),
    "seed": (lambda v: v >= 0, ">= 0"), "threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
}


def check_ranges(p, args, ranges):
    """Refuse a numeric flag outside its range (and NaN, inf): one line naming flag, value and range."""
    for name, (ok, allowed) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):  # None: unset
            p.error(f"--{name} {value}: expected {allowed}")


def check_probe_args(p, args):
    if args.unit == "phone" and not args.lexicon:
        p.error("--unit phone needs --lexicon FILE")
    check_ranges(p, args, PROBE_RANGES)


# ----------------------------------------------------------------------------
# 7. Measurements: speed. The same batch through every model, side by side. Separate from
#    the evaluator above; it times distill.py's steps, so it is the only part that imports distill.py
# ----------------------------------------------------------------------------

METHODS = ("distilhubert", "armhubert", "colld", "gendistiller")  # distill.py --method values


def torchaudio_maskhubert(seed=0):
    """torchaudio's own wav2vec2_model at the maskhubert student's size (SPEC 2 table).

    Same conv list (armhubert_conv(480)), dim 480, FFN 640, 12 layers, 12 heads, post-LN: a
    reference implementation to compare our attention and conv code with. Differences that
    remain: torchaudio's feature projection is LayerNorm + Linear(480 -> 480) where our student
    has LayerNorm only, and our student also runs its 12 projection heads (480 -> teacher dim).
    """
    import torchaudio

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torchaudio.models.wav2vec2_model(
            extractor_mode="group_norm", extractor_conv_layer_config=model.armhubert_conv(480),
            extractor_conv_bias=False, encoder_embed_dim=480, encoder_projection_dropout=0.0,
            encoder_pos_conv_kernel=128, encoder_pos_conv_groups=16, encoder_num_layers=12,
            encoder_num_heads=12, encoder_attention_dropout=0.0, encoder_ff_interm_features=640,
            encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False,
            encoder_layer_drop=0.0, aux_num_out=None,
        )


def speed_rows(args, device, teacher, wav, lengths, only=None):
    """[(name, fn, parameters)] for every row of the table (or only the row named `only`): the
    teacher's forward, each preset's deployed forward, torchaudio's model at the maskhubert size,
    and one distillation step per method, each on the same batch."""
    import distill  # only the speed table needs the training code (its distillation steps)

    amp = distill.autocast_dtype(args, device)
    # the student side runs under autocast like distill.py (--precision auto: bf16 on GPUs that
    # support it, fp32 on CPU); the teacher computes in fp32 (model.Teacher disables autocast) except
    # in the distillation rows with --teacher_precision auto
    autocast = lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    rows, want = [], lambda name: only is None or name == only  # noqa: E731

    def forward(net, *call):  # inference: no grad, eval mode
        def fn():
            with torch.no_grad(), autocast():
                net(*call)
        return fn

    name = f"teacher {args.teacher} forward"
    if want(name):
        rows.append((name, forward(teacher, wav, lengths), sum(p.numel() for p in teacher.parameters()), None))
    for preset in args.presets:
        name = f"student {preset} forward"
        if want(name):
            student, _ = model.build_student(preset, teacher, copy_weights=False)  # preset fitted to the teacher
            student = student.to(device).eval()
            # note: hidden_states is the deployed path (what the probe reads): distilhubert without its
            # prediction heads, gendistiller free-running
            rows.append((name, forward(student.hidden_states, wav, lengths),
                         model.count_parameters(student, with_heads=preset != "distilhubert"), None))
    name = "student maskhubert layers, no heads"
    if want(name) and "maskhubert" in args.presets:
        # the computation of torchaudio's model below (its layer outputs), without the 12 heads
        student, _ = model.build_student("maskhubert", teacher, copy_weights=False)
        student = student.to(device).eval()
        rows.append((name, forward(lambda s=student: s.encode(*s.front_end(wav, lengths)[:2])),
                     model.count_parameters(student) - sum(p.numel() for p in student.heads.parameters()), None))
    name = "torchaudio wav2vec2_model @ maskhubert size"
    if want(name):
        ta = torchaudio_maskhubert(args.seed).to(device).eval()
        rows.append((name, forward(ta.extract_features, wav, lengths), sum(p.numel() for p in ta.parameters()), None))
    compiled_teacher = None
    for method, precision, compiled in [(m, p, c) for m in ([] if args.skip_distill else args.methods)
                                        for p in args.teacher_precision for c in args.compile]:
        name = f"distill step {method}, teacher {precision}" + (", compiled" if compiled == "on" else "")
        if not want(name):
            continue
        # the recipe of the method; "--data synthetic" is never read (the batch here is our own)
        d_args = distill.parse_args(["--method", method, "--data", "synthetic", "--seed", str(args.seed)])
        student, _ = distill.build_student_for(d_args, teacher)
        student = student.to(device).train()
        t = teacher
        if compiled == "on":  # as distill.py --compile: the student and the teacher's layers, in place
            student.compile()
            if compiled_teacher is None:
                compiled_teacher = copy.deepcopy(teacher)
                for layer in compiled_teacher.model.encoder.transformer.layers:
                    layer.compile()
            t = compiled_teacher
        opt = distill.make_optimizer(student, d_args, device)  # the method's recipe AdamW, as distill.py
        step = distill_step(distill, d_args, t, student, opt, wav, lengths, True, autocast)

        def fn(t=t, step=step, exact=precision == "fp32"):
            t.exact = exact
            try:
                step()
            finally:
                t.exact = True
        rows.append((name, fn, sum(p.numel() for p in student.parameters()),
                     args.batch * step_flops(method, teacher, student, args.seconds)))
    return rows


def step_flops(method, teacher, student, seconds):
    """FLOPs of one distillation step on one utterance of `seconds`, from the MAC counts (model.count_macs): 2 FLOPs per MAC; the
    teacher's forward (ARMHuBERT: a second pass without the conv front end, which the mask does not
    touch), the student's forward and its backward (2x the forward). GenDistiller counts its cached
    free-running forward (teacher forcing attends to a few more keys)."""
    cfg = model.fit_to_teacher(replace(model.HUBERT_BASE, init_from_teacher=True, num_layers=teacher.num_layers),
                               teacher)[0]
    teacher_macs = model.count_macs(cfg, seconds, with_heads=False)
    if method == "armhubert":
        front_end = model.count_macs(replace(cfg, num_layers=0, target_layers=()), seconds, with_heads=False)
        teacher_macs = 2 * teacher_macs - front_end
    return 2 * (teacher_macs + 3 * model.count_macs(student.cfg, seconds))


# Dense bf16 tensor-core peaks (TFLOP/s, the vendors' data sheets) by torch.cuda.get_device_name, for the
# MFU column; any other device needs --peak_tflops.
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA H200": 989.4,
               "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0,
               "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L4": 121.0}


def peak_tflops(args, device):
    """(peak TFLOP/s, where it comes from) of the device for the MFU column, or (None, why not)."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if name in PEAK_TFLOPS:
            return PEAK_TFLOPS[name], f"{name}: dense bf16 peak"
        return None, f"{name}: peak unknown, pass --peak_tflops"
    return None, "no peak for a CPU, pass --peak_tflops"


def distill_step(code, d_args, teacher, student, opt, wav, lengths, foreach, autocast=contextlib.nullcontext):
    """One distillation step as `code` (a distill module) takes it for one micro-batch: teacher,
    student, loss, backward, gradient clip, AdamW (note: no fp16 gradient scaler; it changes no
    timing that matters). foreach: the clip's form, as that distill.py has it."""
    step = [0]

    def fn():
        with autocast():
            loss, _ = code.distillation_loss(d_args, teacher, student, wav, lengths, step[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), d_args.clip, foreach=foreach)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1

    return fn


def import_checkout(folder):
    """The model and distill modules of another checkout of this project (e.g. a `git worktree` of an
    older commit), imported beside ours under the same names without replacing ours."""
    import importlib

    names = ("data", "losses", "model", "distill")
    ours = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, os.path.abspath(folder))
    try:
        theirs = {n: importlib.import_module(n) for n in names}  # they import each other by these names
    finally:
        sys.path.pop(0)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(ours)
    return theirs["model"], theirs["distill"]


def against_rows(args, device, teacher, wav, lengths):
    """The rows of `--against DIR`: the same teacher weights, forwards and distillation steps run by
    the other checkout's code, each named '... [DIR]'. A student's weights may differ from ours
    (another init), its shapes and the batch do not. Older checkouts' APIs: build_student returned
    the module alone and distill.py had no make_optimizer (plain AdamW) and a plain gradient clip."""
    their_model, their_distill = import_checkout(args.against)
    tag = f" [{args.against}]"
    ckpt = {"config": teacher.config, "state_dict": teacher.model.state_dict(), "mask_emb": teacher.mask_emb,
            "normalize_waveform": teacher.normalize_waveform}
    their_teacher = their_model.teacher_from_checkpoint(ckpt, name=teacher.name).to(device)
    first = lambda built: built[0] if isinstance(built, tuple) else built  # noqa: E731
    rows = [(f"teacher {args.teacher} forward" + tag, torch.no_grad()(lambda: their_teacher(wav, lengths)),
             sum(p.numel() for p in their_teacher.parameters()), None)]
    for preset in args.presets:
        student = first(their_model.build_student(preset, their_teacher)).to(device).eval()
        rows.append((f"student {preset} forward" + tag, torch.no_grad()(lambda s=student: s.hidden_states(wav, lengths)),
                     sum(p.numel() for p in student.parameters()), None))
    for method in ([] if args.skip_distill else args.methods):
        d_args = their_distill.parse_args(["--method", method, "--data", "synthetic", "--seed", str(args.seed)])
        student = first(their_distill.build_student_for(d_args, their_teacher)).to(device).train()
        if hasattr(their_distill, "make_optimizer"):
            opt, foreach = their_distill.make_optimizer(student, d_args, device), True
        else:
            opt, foreach = torch.optim.AdamW(their_distill.param_groups(student, d_args.weight_decay), lr=d_args.lr,
                                             betas=d_args.betas, eps=d_args.eps), None
        rows.append((f"distill step {method}, teacher fp32" + tag,
                     distill_step(their_distill, d_args, their_teacher, student, opt, wav, lengths, foreach),
                     sum(p.numel() for p in student.parameters()), None))
    return rows


def peak_rss_mb():
    """This process's peak resident set size so far, MB.
    subtle: Linux keeps getrusage's ru_maxrss across exec, so a child started by a large parent would
    report the parent's peak; /proc/self/status VmHWM belongs to this program alone."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def row_peak_memory_mb(args, name):
    """Peak memory of one row, measured alone. CUDA: max_memory_allocated over a warm-up and a run
    of that row, in this process. CPU: a process's high-water mark does not reset between rows, so
    the row runs in a fresh process (`eval.py speed --row NAME`) holding the teacher and that row's
    model only; its peak RSS while running the row is reported (on Linux the mark is restarted after
    the models are built)."""
    if args.device.startswith("cuda"):
        return None  # measured in place by run_speed
    argv = [sys.executable, os.path.abspath(__file__), "speed", "--row", name, "--teacher", args.teacher,
            "--seconds", str(args.seconds), "--batch", str(args.batch), "--seed", str(args.seed),
            "--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
            "--teacher_precision", *args.teacher_precision, "--compile", *args.compile]
    proc = subprocess.run(argv, capture_output=True, text=True)
    found = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("peak rss mb ")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"speed: measuring the memory of {name!r} failed:\n{proc.stderr[-2000:]}")
    return float(found[-1])


def run_speed(args):
    """Time every row on one batch of synthetic audio, round-robin: each round runs every row once,
    so slow and fast periods of the machine fall on all rows alike, and a row's `x teacher` is the
    median over rounds of its time divided by the teacher's time in the same round. Prints a
    markdown table; returns the rows."""
    device = check_device(args.device)
    if device.type == "cuda":
        import distill
        distill.use_tf32(args.precision)  # as distill.py
    torch.manual_seed(args.seed)
    S = int(args.seconds * data.SAMPLE_RATE)
    if S < data.MIN_SAMPLES:
        raise ValueError(f"--seconds {args.seconds}: needs at least {data.MIN_SAMPLES} samples (one frame)")
    # synthetic noise: timing depends on the shape, not the content
    wav = 0.1 * torch.randn(args.batch, S, device=device)  # (B, S)
    lengths = torch.full((args.batch,), S, dtype=torch.long, device=device)  # (B,)
    teacher, cnn_only = build_upstream(args.teacher, device, args.seed, flag="--teacher")
    if cnn_only or not isinstance(teacher, model.Teacher):
        raise ValueError(f"--teacher {args.teacher}: expected a teacher (tiny, a bundle name, a teacher file or "
                         f"random:NAME), got a {type(teacher).__name__}")
    rows = speed_rows(args, device, teacher, wav, lengths, only=args.row)
    if args.against and not args.row:
        if device.type != "cpu" or args.precision not in ("auto", "fp32"):
            raise ValueError("--against: fp32 on a CPU only (the other checkout's autocast is not mirrored)")
        rows += against_rows(args, device, teacher, wav, lengths)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # noqa: E731
    if args.row:  # a child of row_peak_memory_mb: this row alone, then its peak
        (name, fn, _, _), = rows
        try:  # Linux: restart the high-water mark at the current RSS, so building the models does not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # elsewhere the peak includes building the models
        for _ in range(max(args.warmup, 1) + 1):
            fn()
        print(f"peak rss mb {peak_rss_mb():.1f}")
        return rows
    print(f"speed: batch {args.batch} x {args.seconds} s of noise on {device}, {len(rows)} rows round-robin, "
          f"{args.warmup} warm-up + {args.repeats} timed rounds", flush=True)
    peaks = {}
    for name, fn, _, _ in rows:  # warm-up: allocation, autotuning, lazy init (and compiling)
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            fn()
        sync()
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    wall = {name: [] for name, _, _, _ in rows}
    cpu = {name: [] for name, _, _, _ in rows}
    for r in range(args.repeats):
        for name, fn, _, _ in rows:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()  # kernels are asynchronous: wait before reading the clock
            wall[name].append(1000 * (time.perf_counter() - t0))
            cpu[name].append(1000 * (time.process_time() - c0))
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{w[-1]:.0f}" for w in wall.values()) + " ms", flush=True)
    teacher_name = rows[0][0]
    audio_seconds = args.batch * args.seconds
    table = []
    peak, peak_source = peak_tflops(args, device)
    for name, _, params, flops in rows:
        ms = statistics.median(wall[name])
        table.append({"model": name, "params_m": params / 1e6, "ms": ms, "ms_min": min(wall[name]),
                      "ms_max": max(wall[name]), "cpu_ms": statistics.median(cpu[name]),
                      "audio_s_per_s": audio_seconds / (ms / 1000),
                      "x_teacher": statistics.median(w / t for w, t in zip(wall[name], wall[teacher_name])),
                      "peak_mem_mb": peaks.get(name),
                      "mfu": flops / (ms / 1000) / (peak * 1e12) if flops and peak else None})
    if device.type != "cuda" and not args.no_memory:
        for r in table:
            if not r["model"].endswith("]"):  # --against rows: their code, no child process of ours
                print(f"  peak memory of {r['model']} ...", flush=True)
                r["peak_mem_mb"] = row_peak_memory_mb(args, r["model"])
    print(markdown_table(table, device, args, peak_source))
    if args.against:
        # speed-up of this checkout over the other one, per round (same batch, same machine moment)
        print(f"\nSpeed-up over {args.against} (median over rounds of their time / ours in the same round):")
        for name in wall:
            theirs = wall.get(f"{name} [{args.against}]")
            if theirs:
                ratios = [t / w for t, w in zip(theirs, wall[name])]
                print(f"  {name}: {statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    if args.out:
        write_json(args.out, {"device": str(device), "batch": args.batch, "seconds": args.seconds,
                              "repeats": args.repeats, "teacher": args.teacher, "threads": torch.get_num_threads(),
                              "rows": table, "wall_ms": wall, "cpu_ms": cpu})
    return table


def markdown_table(rows, device, args, peak_source):
    mem = "peak CUDA mem (MB)" if device.type == "cuda" else "peak RSS alone (MB)"
    lines = [f"| model | params (M) | ms (median) | ms min–max | CPU ms | audio s / s | {mem} | x teacher fwd | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | {r['ms']:.1f} | {r['ms_min']:.0f}–{r['ms_max']:.0f} | "
                     f"{r['cpu_ms']:.0f} | {r['audio_s_per_s']:.1f} | {peak} | {r['x_teacher']:.2f} | {mfu} |")
    note = (f"\nMFU (distillation steps): FLOPs from the MAC counts (eval.step_flops) / time / peak ({peak_source})."
            "\nx teacher fwd: median over rounds of (row time / teacher time in the same round). "
            + ("" if device.type == "cuda" else "CPU ms: process CPU time (all threads). Peak RSS: the row run "
               "alone in a fresh process holding the teacher and that row's model, peak while it runs."))
    return (f"\nBatch {args.batch} x {args.seconds} s, {device}, {torch.get_num_threads()} threads, median of "
            f"{args.repeats} round-robin rounds; teacher {args.teacher} (random weights unless loaded: timing "
            f"does not need trained ones).\n" + "\n".join(lines) + note)


def add_speed_command(sub):
    """The `speed` sub-command's flags."""
    sp = sub.add_parser("speed", help="time teacher, students, torchaudio reference and distillation steps")
    sp.add_argument("--teacher", default="random:hubert_base",
                    help="tiny | bundle name | teacher file | random:NAME (default: HuBERT Base size, random weights, "
                         "no download: timing does not need trained weights)")
    sp.add_argument("--presets", nargs="+", default=list(model.PRESETS), choices=list(model.PRESETS),
                    help="student presets to time (each fitted to the teacher)")
    sp.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    sp.add_argument("--batch", type=int, default=8, help="utterances per batch")
    sp.add_argument("--repeats", type=int, default=5,
                    help="timed rounds; each round runs every row once (round-robin), the median is reported")
    sp.add_argument("--warmup", type=int, default=1, help="untimed runs of each row before the timed rounds")
    sp.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="distill.py methods to time one training step of (student = the method's default preset)")
    sp.add_argument("--skip_distill", action="store_true", help="do not time distillation steps (reported as skipped)")
    sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="student autocast as in distill.py: auto = bf16 on GPUs that support it, fp32 on CPU")
    sp.add_argument("--teacher_precision", nargs="+", default=["fp32"], choices=["fp32", "auto"],
                    help="distillation rows for each: the teacher in fp32 or under the student's autocast")
    sp.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                    help="distillation rows for each: eager, or torch.compile'd as distill.py --compile")
    sp.add_argument("--peak_tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for the MFU column (default: dense bf16 of a known GPU)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random weights and audio")
    sp.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    sp.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    sp.add_argument("--out", default=None, help="also write the rows as JSON here")
    sp.add_argument("--no_memory", action="store_true",
                    help="CPU: skip the per-row peak memory (each row is re-run alone in a fresh process)")
    sp.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row alone, for its memory
    sp.add_argument("--against", default=None, metavar="DIR",
                    help="also time another checkout of this project (e.g. `git worktree add DIR COMMIT`) in the "
                         "same rounds, and print our speed-up over it row by row (CPU, fp32)")


SPEED_RANGES = {
    "seconds": (lambda v: v * data.SAMPLE_RATE >= data.MIN_SAMPLES, f">= {data.MIN_SAMPLES / data.SAMPLE_RATE} s (one frame)"),
    "batch": (lambda v: v >= 1, ">= 1"), "repeats": (lambda v: v >= 1, ">= 1"), "warmup": (lambda v: v >= 0, ">= 0"),
    "seed": (lambda v: v >= 0, ">= 0"), "threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    "peak_tflops": (lambda v: v > 0, "> 0"),
}


def check_speed_args(p, args):
    check_ranges(p, args, SPEED_RANGES)


# ----------------------------------------------------------------------------
# 8. Command line: `probe` (sections 1-6) and `speed` (section 7)
# ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, except that an error is one line (exit status 2; the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = Parser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_probe_command(sub)
    add_speed_command(sub)
    args = p.parse_args(argv)
    (check_probe_args if args.command == "probe" else check_speed_args)(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        # note: with more threads than free cores, OpenMP workers spin and wait on each other;
        # small ops (the probe's) can then run tens of times slower than on one thread
        torch.set_num_threads(args.threads)
    return run_probe(args) if args.command == "probe" else run_speed(args)


if __name__ == "__main__":
    # an ordinary mistake (a path, a file that is not what the flag expects) is one line, exit status 2;
    # --traceback shows where it was raised
    show = "--traceback" in sys.argv
    try:
        main([a for a in sys.argv[1:] if a != "--traceback"])
    except (ValueError, OSError, EOFError) as e:
        if show:
            raise
        import distill  # its one-line form of an error
        print(f"eval.py: error: {distill.one_line(e)} (--traceback shows where)", file=sys.stderr)
        sys.exit(2)
