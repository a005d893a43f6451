"""Audio data for speech SSL distillation: the frame and padding conventions, loading with resampling,
corpus scanning, a synthetic corpus, length-bucketed batches, and span masking with the semantics of
fairseq's compute_mask_indices (HuBERT, Hsu et al., arXiv 2106.07447; ARMHuBERT, Jang et al., arXiv
2305.11685; CoLLD, arXiv 2309.07707, reuses it). Crops and batch orders are pure functions of
(seed, epoch, index), so a resumed run sees exactly the audio of one that ran straight through.

    items, report = data.scan_audio("/data/LibriSpeech/train-clean-100")  # prints the report
    ds = data.AudioDataset(items, max_samples=250_000, seed=0)  # or data.AudioDataset(data.SyntheticSpeech())
    sampler = data.LengthBucketSampler(ds.lengths, max_batch_samples=24 * 250_000, seed=0)
    sampler.set_epoch(epoch)  # at the start of every epoch
    for wav, lengths in data.make_loader(ds, sampler):  # wav (B, S_max) float32, lengths (B,) long
        frames = data.frame_count(lengths)  # (B,) long
        mask = data.compute_mask_indices(frames, int(frames.max()), mask_prob=0.8)
"""
import math
import os
import signal
from typing import NamedTuple

import numpy as np
import torch

# soundfile and torchaudio are imported where audio is read, so the rest copies with torch and numpy alone

# ----------------------------------------------------------------------------
# 1. Conventions shared by every file: sample rate, frame count, padding (`valid_frames`, True on real
#    frames; every network returns `frame_lengths`, the valid frames per utterance)

SAMPLE_RATE = 16000  # Hz; every waveform in this project is mono float32 at this rate
# HuBERT / wav2vec 2.0 conv front end, (channels, kernel, stride) per layer: total stride
# 5*2*2*2*2*2*2 = 320 samples, receptive field 400. Students with other convs keep both.
HUBERT_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
MIN_SAMPLES = 400  # the shortest input that gives one frame (the receptive field)
# what scan_audio collects (any case): formats libsndfile reads; one its build cannot decode is reported
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64",
                    ".sph")


def frame_count(num_samples, conv_layers=HUBERT_CONV):
    """Frames a conv front end of `conv_layers` (channels, kernel, stride) gives for `num_samples`.

    Each unpadded conv maps n to floor((n - kernel) / stride) + 1, or 0 when n < kernel; for HUBERT_CONV
    that is floor((L - 400) / 320) + 1 for L >= 400, else 0. The one frame-count formula of the project.
    Takes an int (returns an int) or an integer tensor (returns a tensor).
    """
    is_tensor = isinstance(num_samples, torch.Tensor)
    if is_tensor and num_samples.is_floating_point():
        raise TypeError(f"frame_count: expected integer sample counts, got a tensor of {num_samples.dtype}")
    if not is_tensor and (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))):
        raise TypeError(f"frame_count: expected an int or an integer tensor, got {type(num_samples).__name__}")
    n = num_samples if is_tensor else int(num_samples)
    for _, kernel, stride in conv_layers:
        n = (n - kernel) // stride + 1  # note: floor division takes n < kernel to <= 0, the clamp to 0
        n = n.clamp(min=0) if is_tensor else max(n, 0)
    return n


def valid_frames(frame_lengths, max_frames):
    """(B, T) bool, True at the valid frames t < frame_lengths[b] of a padded batch, T = max_frames."""
    t = torch.arange(max_frames, device=frame_lengths.device)  # (T,)
    return t[None, :] < frame_lengths[:, None]  # (B, T)


def resampled_length(num_frames, sample_rate):
    """Samples that `num_frames` frames at `sample_rate` become at 16 kHz.

    subtle: exactly what torchaudio.functional.resample returns (so scan_audio's header length is what
    load_audio returns): ceil(new * N / orig), rates divided by their gcd, the quotient rounded to float32
    first (at 44.1, 22.05 and 11.025 kHz sometimes one sample below the exact ceiling).
    """
    if sample_rate == SAMPLE_RATE:  # not resampled
        return num_frames
    g = math.gcd(sample_rate, SAMPLE_RATE)
    return int(torch.ceil(torch.tensor(SAMPLE_RATE // g * num_frames / (sample_rate // g), dtype=torch.float32)))


# ----------------------------------------------------------------------------
# 2. Loading one file


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file and the problem."""


def load_audio(path):
    """Read `path` as a mono float32 waveform at 16 kHz, FloatTensor (S,): channels averaged, other rates
    resampled (torchaudio.functional.resample, its defaults). AudioError naming the file when it is
    missing, unreadable, empty or holds non-finite samples."""
    import soundfile as sf
    import torchaudio

    path = str(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: audio file not found")
    try:
        samples, sample_rate = sf.read(path, dtype="float32", always_2d=True)  # (N, C)
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioError(f"{path}: unreadable audio ({e})") from e
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    wav = torch.from_numpy(samples.mean(axis=1))  # (N,) channels averaged; a copy, so writable
    if sample_rate != SAMPLE_RATE:
        wav = torchaudio.functional.resample(wav, sample_rate, SAMPLE_RATE)  # (resampled_length(N, sr),)
    if not torch.isfinite(wav).all():
        raise AudioError(f"{path}: audio holds NaN or infinite samples")
    return wav.contiguous()


# ----------------------------------------------------------------------------
# 3. Corpus scanning: which files are usable, and why the others are not


def scan_audio(root, verbose=True):
    """Find the usable audio files under `root` (recursive, symlinked folders followed): (items, report).

    items:  [(path, num_samples_at_16k), ...] sorted by path, every file with at least one frame.
    report: [(path, reason), ...] every file left out and why: "unreadable: ...", "empty",
            "shorter than one frame (N samples < 400)"; printed with verbose=True (the first 20).
    choice: lengths come from the file header, so scanning decodes nothing; a corrupt body is caught later
    by load_audio. FileNotFoundError when `root` is not a directory, ValueError when it holds no usable file.
    """
    import soundfile as sf

    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"scan_audio: data directory {root!r} does not exist (or is not a directory)")
    # note: LibriSpeech copies are often assembled from symlinked speaker folders, hence followlinks
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                   for name in names if name.lower().endswith(AUDIO_EXTENSIONS))
    if not paths:
        raise ValueError(f"scan_audio: no audio files ({'/'.join(AUDIO_EXTENSIONS)}) found under {root!r}")
    items, report = [], []
    for path in paths:
        try:
            info = sf.info(path) if os.path.getsize(path) > 0 else None
        except (sf.SoundFileError, RuntimeError) as e:
            report.append((path, f"unreadable: {e}"))
            continue
        if info is None or info.frames <= 0 or info.samplerate <= 0:
            report.append((path, "empty"))
            continue
        num_samples = resampled_length(info.frames, info.samplerate)
        if num_samples < MIN_SAMPLES:
            report.append((path, f"shorter than one frame ({num_samples} samples < {MIN_SAMPLES})"))
            continue
        items.append((path, num_samples))
    if verbose:
        print(f"data: {root}: {len(items)} usable audio files, "
              + (f"{len(report)} bad files left out:" if report else "no bad files"))
        for path, reason in report[:20]:
            print(f"  {path}: {reason}")
        if len(report) > 20:
            print(f"  ... and {len(report) - 20} more")
        if items:
            path, n = max(items, key=lambda item: item[1])
            print(f"data: {root}: longest utterance {n / SAMPLE_RATE:.1f} s ({path})")
    if not items:
        raise ValueError(f"scan_audio: none of the {len(paths)} audio files under {root!r} is usable "
                         f"(first problem: {report[0][0]}: {report[0][1]})")
    return items, report


def read_transcripts(root):
    """LibriSpeech transcripts under `root`: {utterance_id: text} from every *.trans.txt, whose lines read
    "<utt-id> <TEXT ...>" (the id: the audio file's name without extension). ValueError naming the file
    and line on a malformed line or a duplicated id, and when `root` holds no *.trans.txt."""
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"read_transcripts: directory {root!r} does not exist")
    files = sorted(os.path.join(folder, n) for folder, _, names in os.walk(root, followlinks=True)
                   for n in names if n.endswith(".trans.txt"))
    if not files:
        raise ValueError(f"read_transcripts: no *.trans.txt files under {root!r} (expected the LibriSpeech layout)")
    texts = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue  # a blank line carries nothing (trailing newline at end of file)
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise ValueError(f"{path}:{line_no}: expected '<utt-id> <text>', found {line!r}")
                if parts[0] in texts:
                    raise ValueError(f"{path}:{line_no}: utterance id {parts[0]!r} appears twice")
                texts[parts[0]] = parts[1]
    return texts


# ----------------------------------------------------------------------------
# 4. A synthetic, speech-like corpus (no downloads; the quick start, the tests and smoke runs)


class SyntheticSpeech:
    """A deterministic corpus of speech-like audio: utterance i is a function of (seed, i) alone.

    A toy source-filter model: a glottal pulse train (f0 from 80..250 Hz with slow vibrato and declination)
    and noise onsets, shaped by 3 formants (F1 300-850, F2 850-2300, F3 2300-3200 Hz) that glide between
    per-syllable targets, with a -6 dB/octave tilt; syllables of 120-300 ms, pauses, a little background
    noise. Filtering is per 32 ms window in the frequency domain with 50 % overlap-add (a few ms per
    second of audio). choice: not realistic speech, only a conv front end's input with speech-like
    statistics (harmonics, formants, 4-5 Hz syllable rhythm, silences), so every code path runs offline.
    """

    def __init__(self, num_utterances=256, seed=0, min_seconds=1.0, max_seconds=4.0):
        self.seed, self.min_seconds, self.max_seconds = seed, min_seconds, max_seconds
        self.lengths = [self._start(i)[1] for i in range(num_utterances)]  # known without making the audio
        self.names = [f"synthetic-{seed}-{i:06d}" for i in range(num_utterances)]

    def _start(self, index):
        """(the generator of utterance `index`, its length in samples: the generator's first draw)."""
        # note: numpy seeds from a sequence of ints, so (seed, index) pairs never collide as seed + index would
        rng = np.random.default_rng([self.seed, index])
        return rng, int(round(rng.uniform(self.min_seconds, self.max_seconds) * SAMPLE_RATE))

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        """Utterance `index` as a FloatTensor (S,) at 16 kHz, S = self.lengths[index]."""
        if not 0 <= index < len(self):
            raise IndexError(f"SyntheticSpeech: index {index} out of range 0..{len(self) - 1}")
        return torch.from_numpy(_synthesize(*self._start(index)))


_WIN = 512  # samples (32 ms) per filtering window
_HOP = _WIN // 2  # 50 % overlap: periodic Hann windows at this hop sum to exactly 1
_CTRL = 80  # samples (5 ms) per control point of the envelopes, pitch and formants


def _synthesize(rng, num_samples):
    """One speech-like waveform of `num_samples` samples (float32, peak <= 1) from `rng`."""
    def random_formants():  # (F1, F2, F3) in Hz of one random vowel
        return [rng.uniform(300, 850), rng.uniform(850, 2300), rng.uniform(2300, 3200)]

    sr = SAMPLE_RATE
    num_ctrl = num_samples // _CTRL + 2  # control points, one per 5 ms, covering the signal
    ctrl_t = np.arange(num_ctrl) * _CTRL  # (num_ctrl,) sample position of each control point

    # prosody: syllables (rise-fall envelopes, some with a noise onset) and pauses, at 5 ms resolution
    voiced_env, noise_env = np.zeros(num_ctrl), np.zeros(num_ctrl)  # (num_ctrl,) source amplitudes
    formant_points, formant_targets = [0], [random_formants()]
    pos = int(rng.uniform(0.05, 0.2) * sr / _CTRL)  # leading silence, in control steps
    while pos < num_ctrl:
        n = int(rng.uniform(0.12, 0.30) * sr / _CTRL)  # syllable length in control steps
        env = np.sin(np.pi * np.linspace(0.0, 1.0, n)) ** 0.7 * rng.uniform(0.5, 1.0)  # rise-fall, stress
        end = min(pos + n, num_ctrl)
        if rng.random() < 0.35:  # fricative-like onset: noise first, then the vowel
            k = max(1, int(n * rng.uniform(0.2, 0.4)))
            noise_env[pos:min(pos + k, end)] = rng.uniform(0.2, 0.5)
            env[:k] *= np.linspace(0.0, 1.0, k)
        voiced_env[pos:end] = env[: end - pos]
        formant_points.append(pos + n // 2)
        formant_targets.append(random_formants())
        pos += n
        if rng.random() < 0.25:  # a short pause between words
            pos += int(rng.uniform(0.05, 0.25) * sr / _CTRL)
    tail = min(num_ctrl, int(0.1 * sr / _CTRL))  # the last 100 ms fade out
    voiced_env[-tail:] *= np.linspace(1.0, 0.0, tail)
    noise_env[-tail:] *= np.linspace(1.0, 0.0, tail)

    # pitch: base f0 with slow vibrato and declination; glottal pulses at sample resolution
    f0_base = rng.uniform(80.0, 250.0)
    seconds = ctrl_t / sr
    f0_ctrl = f0_base * (1.0 + 0.06 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * seconds + rng.uniform(0, 2 * np.pi))
                         - 0.04 * seconds / max(seconds[-1], 1e-9))
    t = np.arange(num_samples)
    f0 = np.interp(t, ctrl_t, f0_ctrl)  # (S,) Hz
    pulses = np.diff(np.floor(np.cumsum(f0 / sr)), prepend=0.0)  # (S,) 1 at each glottal closure, else 0
    voiced = pulses * np.interp(t, ctrl_t, voiced_env) * np.sqrt(f0 / 100.0)  # loudness ~ independent of f0
    noise = rng.standard_normal(num_samples) * np.interp(t, ctrl_t, noise_env) * 0.05

    # vocal tract: a cascade of three 2-pole resonances (1 at 0 Hz) gliding between the syllable targets
    num_win = num_samples // _HOP + 2  # windows: every sample lies under exactly two of them
    win_centre = np.arange(num_win) * _HOP  # (W,) sample position of each window's centre
    points, targets = np.asarray(formant_points) * _CTRL, np.asarray(formant_targets)  # (P,), (P, 3) Hz
    formants = np.stack([np.interp(win_centre, points, targets[:, k]) for k in range(3)], axis=1)  # (W, 3)
    freqs = np.fft.rfftfreq(_WIN, 1.0 / sr)  # (F,) Hz, F = 257
    bandwidths = np.array([70.0, 100.0, 160.0])  # Hz, typical F1..F3 bandwidths
    fk, f = formants[:, None, :], freqs[None, :, None]  # (W, 1, 3), (1, F, 1)
    resonance = fk**2 / np.sqrt((fk**2 - f**2) ** 2 + (bandwidths * f) ** 2)  # (W, F, 3)
    tilt = 1.0 / (1.0 + freqs / 300.0)  # (F,) glottal roll-off plus lip radiation, about -6 dB/oct
    vowel_filter = resonance.prod(axis=2) * tilt  # (W, F)
    fricative_filter = np.exp(-0.5 * ((freqs - rng.uniform(3500, 6000)) / 1200.0) ** 2)  # (F,) broad high band

    # filtering: each Hann-weighted window of a source is multiplied by its gains in the frequency domain;
    # the spectra of both sources are summed, inverted once and added back at hop 256 (a flat gain returns x)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_WIN) / _WIN)  # periodic Hann
    spectra = 0.0
    for x, gains in ((voiced, vowel_filter), (noise, fricative_filter[None, :])):
        padded = np.zeros((num_win + 1) * _HOP)
        padded[_HOP : _HOP + num_samples] = x  # half a window of zeros in front: window w centres on sample w*hop
        frames = np.lib.stride_tricks.sliding_window_view(padded, _WIN)[::_HOP][:num_win]  # (W, 512)
        spectra = spectra + np.fft.rfft(frames * hann, axis=1) * gains  # (W, F)
    filtered = np.fft.irfft(spectra, n=_WIN, axis=1)  # (W, 512)
    out = np.zeros((num_win + 1, _HOP))  # (W + 1, hop): blocks of the output
    out[:num_win] += filtered[:, :_HOP]  # first half of window w lands in block w
    out[1:] += filtered[:, _HOP:]  # second half lands in block w + 1
    wav = out.reshape(-1)[_HOP : _HOP + num_samples]  # (S,)
    wav = wav / (np.sqrt(np.mean(wav**2)) + 1e-8) * rng.uniform(0.05, 0.1)  # RMS level of read speech
    wav = wav + rng.standard_normal(num_samples) * 3e-4  # background noise, about -50 dB
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------
# 5. Dataset, length-bucketed batches, collate, loader


class BadFile(NamedTuple):
    """An utterance that could not be decoded during training (see AudioDataset(skip_bad=True))."""
    path: str
    reason: str


class AudioDataset(torch.utils.data.Dataset):
    """Waveforms for training: dataset[(epoch, index)] -> FloatTensor (S,), S <= max_samples.

    source: a list of (path, num_samples) items from scan_audio, or a SyntheticSpeech corpus.
    An utterance longer than max_samples is cut to a random window of max_samples samples whose start is
    drawn from a generator seeded by (seed, epoch, index): the same step of a resumed run sees the same
    audio, in any worker process. A plain int index means epoch 0. skip_bad: a file that passed the scan
    but fails to decode comes back as a BadFile (collate_checked names it) instead of raising in a worker.
    """

    def __init__(self, source, max_samples=None, seed=0, skip_bad=False):
        if isinstance(source, SyntheticSpeech):
            self.synthetic, self.paths, self.names = source, None, list(source.names)
            self.full_lengths = list(source.lengths)  # samples before cropping
        else:
            self.synthetic, self.paths = None, [str(p) for p, _ in source]
            self.full_lengths = [int(n) for _, n in source]
            # LibriSpeech utterance id = file name without extension (the key of read_transcripts)
            self.names = [os.path.splitext(os.path.basename(p))[0] for p in self.paths]
        self.max_samples, self.seed, self.skip_bad = max_samples, seed, skip_bad
        # lengths after cropping: what the sampler packs into batches
        self.lengths = [n if max_samples is None else min(n, max_samples) for n in self.full_lengths]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, key):
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        if self.synthetic is not None:
            wav = self.synthetic[index]  # (S,)
        else:
            try:
                wav = load_audio(self.paths[index])  # (S,)
                if wav.shape[0] < MIN_SAMPLES:  # the header promised more than the body holds
                    raise AudioError(f"{self.paths[index]}: decoded {wav.shape[0]} samples, fewer than one frame "
                                     f"({MIN_SAMPLES}); the header said {self.full_lengths[index]}")
            except AudioError as e:
                if not self.skip_bad:
                    raise
                return BadFile(self.paths[index], str(e))
        if self.max_samples is not None and wav.shape[0] > self.max_samples:
            # note: seeded by (seed, epoch, index) only, so the crop does not depend on the worker
            rng = np.random.default_rng([self.seed, epoch, index])
            start = int(rng.integers(0, wav.shape[0] - self.max_samples + 1))
            wav = wav[start : start + self.max_samples]  # (max_samples,)
        return wav


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of utterances of similar length, as lists of (epoch, index) pairs (the crop needs the epoch).

    Indices sorted by length are cut greedily so that each batch's padded size, B * (its longest length),
    stays <= max_batch_samples (an utterance over the budget gets a batch of its own). sort_lengths: the
    full lengths when `lengths` are cropped (s3prl's order), so long utterances do not tie in path order
    (batches of one speaker). choice: the batches are formed once; only their ORDER changes, drawn from
    (seed, epoch) (as fairseq). Rank r of W takes batches r, r+W, ...; a count not divisible by W repeats
    batches from the start (DistributedSampler's rule). set_epoch(epoch, start_batch=k) skips this rank's
    first k batches (resume). len(sampler) = this rank's batches in a full epoch.
    """

    def __init__(self, lengths, max_batch_samples, seed=0, shuffle=True, rank=0, world_size=1, sort_lengths=None):
        if max_batch_samples <= 0:
            raise ValueError(f"LengthBucketSampler: max_batch_samples must be > 0, got {max_batch_samples}")
        self.lengths = [int(n) for n in lengths]
        self.sort_lengths = self.lengths if sort_lengths is None else [int(n) for n in sort_lengths]
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.start_batch = 0, 0
        # stable sort: equal lengths keep index order, so the batches are reproducible
        self.batches, current = [], []
        for i in sorted(range(len(self.lengths)), key=lambda i: self.sort_lengths[i]):
            # lengths ascend, so adding utterance i makes it the longest: padded size = (B + 1) * len_i
            if current and (len(current) + 1) * self.lengths[i] > max_batch_samples:
                self.batches.append(current)
                current = []
            current.append(i)
        self.batches.append(current)

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's batch order; skip this rank's first `start_batch` batches (resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"LengthBucketSampler.set_epoch: start_batch must be in 0..{len(self)}, got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return math.ceil(len(self.batches) / self.world_size)

    def __iter__(self):
        epoch, n, w = self.epoch, len(self.batches), self.world_size
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        # pad by wrapping around to the start of this epoch's order (more than once with fewer batches than ranks)
        order = [int(order[j % n]) for j in range(len(self) * w)]
        for b in order[self.rank :: w][self.start_batch :]:
            yield [(epoch, i) for i in self.batches[b]]


def collate(batch):
    """List of B waveforms (S_b,) -> (wav (B, S_max) float32 zero-padded, lengths (B,) long)."""
    lengths = torch.tensor([w.shape[0] for w in batch], dtype=torch.long)  # (B,)
    wav = torch.zeros(len(batch), int(lengths.max()), dtype=torch.float32)  # (B, S_max)
    for b, w in enumerate(batch):
        wav[b, : w.shape[0]] = w
    return wav, lengths


def collate_checked(batch):
    """collate() leaving out BadFile entries: (wav (B', S_max), lengths (B',), [BadFile]); B' may be 0."""
    bad = [b for b in batch if isinstance(b, BadFile)]
    good = [b for b in batch if not isinstance(b, BadFile)]
    if not good:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), bad
    return (*collate(good), bad)


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, sampler, num_workers=2, collate_fn=None):
    """DataLoader over `dataset` with `sampler` as batch sampler and `collate` (or collate_fn); workers are
    not persistent, so each epoch's iterator reads the sampler's current epoch and start_batch."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn or collate, num_workers=num_workers,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
        # subtle: without its own generator a DataLoader draws its workers' base seed from the global torch
        # RNG at every epoch start, so a run resumed mid-epoch would see another dropout stream than one
        # that ran straight through. The data is a pure function of (seed, epoch, index): nothing is lost.
        generator=torch.Generator().manual_seed(0),
        # Ctrl-C reaches every process of the terminal's group: workers ignore it, so the training loop
        # (distill.StopSignal) can finish its step with them and write a checkpoint
        worker_init_fn=ignore_sigint,
    )


# ----------------------------------------------------------------------------
# 6. Span masking (HuBERT / wav2vec 2.0; the semantics of fairseq's compute_mask_indices)


def compute_mask_indices(frame_lengths, max_frames, mask_prob, mask_length=10, mask_type="static", min_masks=2,
                         no_overlap=False, min_space=1, require_same_masks=True, same_count_rows=None, rng=None):
    """Random spans of frames to mask: BoolTensor (B, max_frames) on CPU, True = masked (never a padded frame).

    Per utterance of T_b = frame_lengths[b] valid frames (fairseq semantics):
        num_spans = max(min_masks, int(mask_prob * T_b / mask_length + u)), u ~ U[0, 1)
    (probabilistic rounding: E = mask_prob * T_b / mask_length); span lengths all mask_length ("static") or
    uniform on {0, ..., 2 * mask_length} ("uniform"); spans placed at random inside the valid frames.

    HuBERT (fairseq hubert_base) lets spans overlap (no_overlap=False: they cover only about
    1 - exp(-mask_prob)); the official ARMHuBERT code keeps min_space frames between them (no_overlap=True).
    require_same_masks (fairseq's default): drop random masked frames until every row has the smallest
    count, so a batch's masked frames stack into a rectangle. same_count_rows = G: take that minimum within
    groups of G rows of neighbouring lengths (None: over the batch, as fairseq); ARMHuBERT's official run
    equalised over its 18 utterances per GPU, so distill.py passes 18 (see README). rng: a numpy Generator.

    Our choices where fairseq is odd:
      - a row shorter than half its group's longest keeps its own count (in fairseq one 0.1 s row among
        10 s rows cuts every row to its handful); rows of 0 frames get no mask and do not count at all;
      - spans start anywhere the shortest drawn span still fits (fairseq: range(T - len), one fewer);
      - no_overlap: a span that fits in no free interval is shortened to the longest one, not dropped
        with every later span (this keeps min_masks on short utterances);
      - mask_prob 0 masks nothing (fairseq still places min_masks spans).
    As fairseq, an utterance shorter than the spans draws starts from max(num_spans, T - len + 1) positions.
    """
    if mask_type not in ("static", "uniform"):
        raise ValueError(f"compute_mask_indices: mask_type must be 'static' or 'uniform', got {mask_type!r}")
    lengths = np.asarray(frame_lengths.cpu() if isinstance(frame_lengths, torch.Tensor) else frame_lengths,
                         dtype=np.int64).reshape(-1)  # (B,)
    if (lengths < 0).any() or (lengths > max_frames).any():
        raise ValueError(f"compute_mask_indices: frame_lengths must lie in 0..max_frames={max_frames}, "
                         f"got {lengths.tolist()}")
    rng = np.random.default_rng() if rng is None else rng
    batch_size = lengths.shape[0]
    mask = np.zeros((batch_size, max_frames), dtype=bool)  # (B, T)
    if mask_prob == 0.0:
        return torch.from_numpy(mask)

    masked = []  # per row: sorted masked frame indices, all < T_b; None for an empty row
    for sz in lengths.tolist():
        if sz == 0:
            masked.append(None)  # nothing to mask; left out of the batch minimum below
            continue
        num_spans = max(min_masks, int(mask_prob * sz / mask_length + rng.random()))  # probabilistic rounding
        if num_spans == 0:
            masked.append(np.zeros(0, dtype=np.int64))
            continue
        if mask_type == "static":
            span_lens = np.full(num_spans, mask_length)
        else:  # uniform on {0, ..., 2 * mask_length}: mean mask_length; zero-length spans mask nothing
            span_lens = rng.integers(0, 2 * mask_length + 1, size=num_spans)
        span_lens = np.minimum(span_lens, sz)  # (num_spans,) no span longer than the utterance
        if span_lens.sum() == 0:
            span_lens[0] = min(mask_length, sz)  # as fairseq: at least one frame gets masked
        if no_overlap:
            masked.append(_place_spans_no_overlap(sz, span_lens, min_space, rng))
        else:
            masked.append(_place_spans_overlapping(sz, span_lens, rng))

    # require_same_masks: every non-empty row keeps its group's smallest masked count; a group is the whole
    # batch (fairseq) or, with same_count_rows = G, G rows of neighbouring lengths
    rows = sorted((b for b in range(batch_size) if masked[b] is not None), key=lambda b: (lengths[b], b))
    G = len(rows) if not same_count_rows else int(same_count_rows)
    for g in range(0, len(rows), max(G, 1)):
        group = rows[g : g + G]
        floor = max(lengths[b] for b in group) / 2 if same_count_rows else 0  # shorter rows: left out
        target = min(len(masked[b]) for b in group if lengths[b] >= floor)
        for b in group:
            idx = masked[b]
            if require_same_masks and len(idx) > target and lengths[b] >= floor:
                # note: as fairseq, frames are dropped at random, which can split a span in two
                idx = rng.choice(idx, target, replace=False)
            mask[b, idx] = True
    return torch.from_numpy(mask)


def _place_spans_overlapping(sz, span_lens, rng):
    """Span starts drawn without replacement; spans may overlap. Returns masked frame ids (< sz)."""
    num_spans = len(span_lens)
    # a start at s is valid when the shortest (non-empty) span still fits: s <= sz - min_len; a short
    # utterance allows more starts (spans then run past the end and are cut at sz), never more spans than frames
    num_starts = max(sz - max(int(span_lens.min()), 1) + 1, min(num_spans, sz))
    num_spans = min(num_spans, num_starts)
    starts = rng.choice(num_starts, num_spans, replace=False)  # (num_spans,) distinct
    offsets = np.arange(int(span_lens.max()))  # (max_len,)
    idx = starts[:, None] + offsets[None, :]  # (num_spans, max_len) frame of each span position
    keep = offsets[None, :] < span_lens[:num_spans, None]  # (num_spans, max_len) within that span's length
    idx = idx[keep]  # (total,) may repeat where spans overlap
    return np.unique(idx[idx < sz])  # cut at the utterance end, overlaps merged


def _place_spans_no_overlap(sz, span_lens, min_space, rng):
    """Place spans longest first in free intervals [lo, hi), keeping min_space frames between spans: a span
    of length n goes into an interval with hi - lo >= n, picked with probability proportional to its size
    (as fairseq), at a uniform start; the interval splits into [lo, start - min_space) and
    [start + n + min_space, hi). Returns the masked frame ids."""
    free, idx = [(0, sz)], []
    for n in sorted((int(x) for x in span_lens), reverse=True):
        if n == 0 or not free:
            continue
        sizes = [hi - lo for lo, hi in free]
        n = min(n, max(sizes))  # choice: shorten to the longest free interval (see compute_mask_indices)
        weights = [s if s >= n else 0 for s in sizes]  # only intervals the span fits in
        # weighted pick by inverse CDF (plain Python: several times faster than rng.choice(p=...) per span)
        r = rng.random() * sum(weights)
        k = 0
        while r >= weights[k] or weights[k] == 0:
            r -= weights[k]
            k += 1
        lo, hi = free.pop(k)
        start = int(rng.integers(lo, hi - n + 1))
        idx.extend(range(start, start + n))
        if start - min_space > lo:
            free.append((lo, start - min_space))
        if start + n + min_space < hi:
            free.append((start + n + min_space, hi))
    return np.array(sorted(idx), dtype=np.int64)
