"""Audio data for speech SSL distillation: loading, corpus scanning, a synthetic corpus,
length-bucketed batching and HuBERT-style span masking.

What this file holds, top to bottom:
  1. Conventions: 16 kHz mono float32 audio and the conv front end's frame count (SPEC s.0).
  2. load_audio: read any file soundfile can read, average channels, resample to 16 kHz.
  3. Corpus scanning: scan_audio (LibriSpeech layout or any folder of audio files), the
     report of bad files, read_transcripts (LibriSpeech *.trans.txt, used by eval.py).
  4. SyntheticSpeech: a deterministic, speech-like corpus generated on the fly, so that the
     whole pipeline runs and is tested without downloading anything (`--data synthetic`).
  5. AudioDataset + LengthBucketSampler + collate + make_loader: random crops that are a
     pure function of (seed, epoch, index), batches of similar length whose padded size
     stays under a sample budget, a batch order that is a pure function of (seed, epoch),
     distributed sharding and mid-epoch resume.
  6. compute_mask_indices: span masking with fairseq semantics (HuBERT, ARMHuBERT s.2 of
     SPEC, CoLLD reuses it).

Example:
    import data
    items, report = data.scan_audio("/data/LibriSpeech/train-clean-100")  # prints the report
    ds = data.AudioDataset(items, max_samples=250_000, seed=0)            # or "synthetic"
    sampler = data.LengthBucketSampler(ds.lengths, max_batch_samples=24 * 250_000, seed=0)
    loader = data.make_loader(ds, sampler, num_workers=2)
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for wav, lengths in loader:          # wav (B, S_max) float32, lengths (B,) long
            frames = data.frame_count(lengths)                       # (B,) long
            mask = data.compute_mask_indices(frames, int(frames.max()), mask_prob=0.8)

Tests: python -m pytest -q test_all.py -k data
"""

import math
import os
import signal
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torchaudio

# ----------------------------------------------------------------------------
# 1. Conventions shared by every file (SPEC section 0): sample rate, frame count, padding
#
# The HuBERT conv stack has a total stride of 320 samples (20 ms) and a receptive field of
# 400 samples (25 ms), so an utterance of L samples gives floor((L - 400) / 320) + 1 frames,
# and none below 400 samples. Every network returns `frame_lengths` (valid frames per
# utterance); padding is always expressed by `valid_frames`, True on real frames.

SAMPLE_RATE = 16000  # Hz; every waveform in this project is mono float32 at this rate
# HuBERT / wav2vec 2.0 conv front end, (channels, kernel, stride) per layer: total stride
# 5*2*2*2*2*2*2 = 320 samples, receptive field 400. Students with other convs keep both.
HUBERT_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
MIN_SAMPLES = 400  # the shortest input that gives one frame (the receptive field)

# what scan_audio collects (case-insensitive): the audio formats soundfile (libsndfile) reads; a file its
# build cannot decode is reported as unreadable, not skipped in silence
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".sph")


def frame_count(num_samples, conv_layers=HUBERT_CONV):
    """Frames a conv front end of `conv_layers` (channels, kernel, stride) gives for `num_samples`.

    Each unpadded conv maps n to floor((n - kernel) / stride) + 1 (0 when n < kernel); for
    HUBERT_CONV that is floor((L - 400) / 320) + 1 for L >= 400, else 0. The one frame-count
    formula of the project: the data pipeline, both conv stacks, the frame check of distill.py
    and the MAC count use it. Works on a Python int, a numpy integer array or a torch integer
    tensor (e.g. the `lengths` that collate returns) and returns the same kind.
    """
    if isinstance(num_samples, torch.Tensor):
        if num_samples.is_floating_point():
            raise TypeError(f"frame_count: expected an integer tensor of sample counts, got dtype {num_samples.dtype}")
        at_least_0 = lambda n: n.clamp(min=0)  # noqa: E731
    elif isinstance(num_samples, np.ndarray):
        if not np.issubdtype(num_samples.dtype, np.integer):
            raise TypeError(f"frame_count: expected an integer array of sample counts, got dtype {num_samples.dtype}")
        at_least_0 = lambda n: np.maximum(n, 0)  # noqa: E731
    elif isinstance(num_samples, (int, np.integer)) and not isinstance(num_samples, bool):
        num_samples, at_least_0 = int(num_samples), lambda n: max(n, 0)  # noqa: E731
    else:
        raise TypeError(f"frame_count: expected an int or integer tensor/array of sample counts, "
                        f"got {type(num_samples).__name__}")
    n = num_samples
    for _, kernel, stride in conv_layers:
        # note: floor division of a negative number rounds down, so n < kernel lands at <= 0
        # before the clamp; the clamp turns those into exactly 0
        n = at_least_0((n - kernel) // stride + 1)
    return n


def valid_frames(frame_lengths, max_frames):
    """(B, T) bool, True at the valid frames t < frame_lengths[b] of a padded batch, T = max_frames."""
    t = torch.arange(max_frames, device=frame_lengths.device)  # (T,)
    return t[None, :] < frame_lengths[:, None]  # (B, T)


def resampled_length(num_frames, sample_rate):
    """Samples that `num_frames` frames at `sample_rate` become at 16 kHz.

    subtle: this is exactly the length torchaudio.functional.resample returns, so a length that
    scan_audio computes from the file header equals the length load_audio later returns. That is
    ceil(new * N / orig) with both rates divided by their gcd, the quotient rounded to float32
    first (torch.as_tensor of a Python float), as torchaudio computes it: at 44.1, 22.05 and
    11.025 kHz that is sometimes one sample below the exact ceiling.
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
    """Read `path` as a mono float32 waveform at 16 kHz: FloatTensor (S,).

    Multichannel audio is averaged to mono (SPEC s.0); other sample rates are resampled
    with torchaudio.functional.resample (windowed-sinc, its defaults). Raises AudioError
    naming the file when it is missing, unreadable, empty or holds non-finite samples.
    """
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


def _find_audio_files(root):
    """Every audio file (AUDIO_EXTENSIONS) under `root` (recursive, symlinked folders followed), sorted."""
    found = []
    # note: LibriSpeech copies are often assembled from symlinked speaker folders, hence
    # followlinks=True. The LibriSpeech layout <speaker>/<chapter>/<utt>.flac is just one
    # case of "any folder of audio files", so it needs no special path.
    for folder, _subdirs, files in os.walk(root, followlinks=True):
        for name in files:
            if name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(os.path.join(folder, name))
    return sorted(found)


def scan_audio(root, min_samples=MIN_SAMPLES, verbose=True):
    """Find the usable audio files under `root`: returns (items, report).

    items:  [(path, num_samples_at_16k), ...] sorted by path, every file with at least
            `min_samples` samples after resampling to 16 kHz.
    report: [(path, reason), ...] every file left out, with why: "unreadable: ...",
            "empty", "shorter than one frame (N samples < 400)".
    choice: lengths come from the file header (soundfile.info), so scanning does not decode audio;
    a file whose header is fine but whose body is corrupt is caught later by load_audio,
    which then stops training with an error naming it.
    With verbose=True (default) the report is printed (print_scan_report): bad files are
    left out and counted, never silently. Raises FileNotFoundError when `root` is not a
    directory, and ValueError when it holds no audio file at all or no usable one.
    """
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"scan_audio: data directory {root!r} does not exist (or is not a directory)")
    paths = _find_audio_files(root)
    if not paths:
        raise ValueError(f"scan_audio: no audio files ({'/'.join(AUDIO_EXTENSIONS)}) found under {root!r}")

    items, report, rates, downmixed = [], [], {}, 0
    for path in paths:
        if os.path.getsize(path) == 0:
            report.append((path, "empty"))
            continue
        try:
            info = sf.info(path)
        except (sf.SoundFileError, RuntimeError) as e:
            report.append((path, f"unreadable: {e}"))
            continue
        if info.frames <= 0 or info.samplerate <= 0:
            report.append((path, "empty"))
            continue
        num_samples = resampled_length(info.frames, info.samplerate)
        if info.samplerate != SAMPLE_RATE:
            rates[info.samplerate] = rates.get(info.samplerate, 0) + 1
        downmixed += info.channels > 1
        if num_samples < min_samples:
            if min_samples == MIN_SAMPLES:
                report.append((path, f"shorter than one frame ({num_samples} samples < {min_samples})"))
            else:
                report.append((path, f"shorter than min_samples ({num_samples} samples < {min_samples})"))
            continue
        items.append((path, num_samples))

    if verbose:
        print_scan_report(report, root, num_kept=len(items))
        if rates or downmixed:
            print(f"data: {root}: {sum(rates.values())} file(s) resampled to 16 kHz (from "
                  f"{', '.join(f'{r} Hz: {n}' for r, n in sorted(rates.items())) or '-'}), {downmixed} averaged to mono")
        if items:
            path, n = max(items, key=lambda item: item[1])
            print(f"data: {root}: longest utterance {n / SAMPLE_RATE:.1f} s ({path})")
    if not items:
        raise ValueError(f"scan_audio: none of the {len(paths)} audio files under {root!r} is usable "
                         f"(first problem: {report[0][0]}: {report[0][1]})")
    return items, report


def print_scan_report(report, root, num_kept=None, max_shown=20):
    """Print how many files scan_audio left out and why (the first `max_shown` by name)."""
    kept = "" if num_kept is None else f"{num_kept} usable audio files, "
    if not report:
        print(f"data: {root}: {kept}no bad files")
        return
    print(f"data: {root}: {kept}{len(report)} bad files left out:")
    for path, reason in report[:max_shown]:
        print(f"  {path}: {reason}")
    if len(report) > max_shown:
        print(f"  ... and {len(report) - max_shown} more")


def read_transcripts(root):
    """LibriSpeech transcripts under `root`: {utterance_id: text} from every *.trans.txt.

    Each line reads "<utt-id> <TEXT ...>" (e.g. "103-1240-0000 CHAPTER ONE ..."); the id is
    the audio file's name without extension. Raises ValueError naming the file and line on
    a malformed line or a duplicated id, and when `root` holds no *.trans.txt at all.
    """
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"read_transcripts: directory {root!r} does not exist")
    files = []
    for folder, _subdirs, names in os.walk(root, followlinks=True):
        files.extend(os.path.join(folder, n) for n in names if n.endswith(".trans.txt"))
    if not files:
        raise ValueError(f"read_transcripts: no *.trans.txt files under {root!r} (expected the LibriSpeech layout)")
    texts = {}
    for path in sorted(files):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue  # a blank line carries nothing (trailing newline at end of file)
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise ValueError(f"{path}:{line_no}: expected '<utt-id> <text>', found {line!r}")
                utt_id, text = parts
                if utt_id in texts:
                    raise ValueError(f"{path}:{line_no}: utterance id {utt_id!r} appears twice")
                texts[utt_id] = text
    return texts


# ----------------------------------------------------------------------------
# 4. A synthetic, speech-like corpus (no downloads; used by tests and smoke runs)


class SyntheticSpeech:
    """A deterministic corpus of speech-like audio: utterance i is a function of (seed, i).

    Each utterance is a source-filter toy model of speech:
      - voiced source: a glottal pulse train whose pitch f0 starts in 80..250 Hz and drifts
        slowly (a few percent vibrato plus a gentle declination, as in read speech);
      - unvoiced source: white noise, used for fricative-like onsets of some syllables;
      - vocal tract: 3 formant resonances (F1 300-850, F2 850-2300, F3 2300-3200 Hz) whose
        targets change per syllable and glide between syllables; a fixed -6 dB/octave tilt;
      - prosody: syllables of 120-300 ms with a rise-fall envelope, short pauses between
        some of them, leading and trailing silence, and a little background noise.
    The filtering is done per 32 ms window in the frequency domain (FFT, multiply by the
    formant envelope of that window, inverse FFT, 50 % overlap-add), which costs a few
    ms per second of audio on one CPU core (far below the cost of a training step).
    choice: this is not meant to be realistic speech, only to give a conv front end input
    with speech-like statistics (harmonics, formants, 4-5 Hz syllable rhythm, silences) so
    that smoke runs and tests exercise every code path without downloading a corpus.
    """

    def __init__(self, num_utterances=256, seed=0, min_seconds=1.0, max_seconds=4.0):
        if num_utterances < 1:
            raise ValueError(f"SyntheticSpeech: num_utterances must be >= 1, got {num_utterances}")
        if not (MIN_SAMPLES / SAMPLE_RATE <= min_seconds <= max_seconds):
            raise ValueError(f"SyntheticSpeech: need {MIN_SAMPLES / SAMPLE_RATE} <= min_seconds <= max_seconds, "
                             f"got min_seconds={min_seconds}, max_seconds={max_seconds}")
        self.num_utterances = num_utterances
        self.seed = seed
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        # The length is the first draw of the utterance's own generator, so lengths are known
        # (for bucketing) without generating any audio, and do not depend on num_utterances.
        self.lengths = [self._length(self._rng(i)) for i in range(num_utterances)]
        self.names = [f"synthetic-{seed}-{i:06d}" for i in range(num_utterances)]

    def _rng(self, index):
        # note: numpy seeds from a sequence of ints, so (seed, index) pairs never collide the
        # way seed + index would.
        return np.random.default_rng([self.seed, index])

    def _length(self, rng):
        return int(round(rng.uniform(self.min_seconds, self.max_seconds) * SAMPLE_RATE))

    def __len__(self):
        return self.num_utterances

    def __getitem__(self, index):
        """Utterance `index` as a FloatTensor (S,) at 16 kHz, S = self.lengths[index]."""
        if not 0 <= index < self.num_utterances:
            raise IndexError(f"SyntheticSpeech: index {index} out of range 0..{self.num_utterances - 1}")
        rng = self._rng(index)
        num_samples = self._length(rng)  # same first draw as in __init__
        return torch.from_numpy(_synthesize(rng, num_samples))


_WIN = 512  # samples (32 ms) per filtering window
_HOP = _WIN // 2  # 50 % overlap: periodic Hann windows at this hop sum to exactly 1
_CTRL = 80  # samples (5 ms) per control point of the envelopes, pitch and formants


def _synthesize(rng, num_samples):
    """One speech-like waveform of `num_samples` samples (float32, peak <= 1) from `rng`."""
    sr = SAMPLE_RATE
    num_ctrl = num_samples // _CTRL + 2  # control points, one per 5 ms, covering the signal
    ctrl_t = np.arange(num_ctrl) * _CTRL  # (num_ctrl,) sample position of each control point

    # --- prosody plan: alternate syllables and optional pauses, at 5 ms resolution
    voiced_env = np.zeros(num_ctrl)  # (num_ctrl,) amplitude of the voiced source
    noise_env = np.zeros(num_ctrl)  # (num_ctrl,) amplitude of the fricative noise
    formant_points, formant_targets = [0], [_random_formants(rng)]
    pos = int(rng.uniform(0.05, 0.2) * sr / _CTRL)  # leading silence, in control steps
    while pos < num_ctrl:
        n = int(rng.uniform(0.12, 0.30) * sr / _CTRL)  # syllable length in control steps
        x = np.linspace(0.0, 1.0, n)
        env = np.sin(np.pi * x) ** 0.7 * rng.uniform(0.5, 1.0)  # rise-fall, per-syllable stress
        end = min(pos + n, num_ctrl)
        if rng.random() < 0.35:  # fricative-like onset: noise first, then the vowel
            k = max(1, int(n * rng.uniform(0.2, 0.4)))
            noise_env[pos:min(pos + k, end)] = rng.uniform(0.2, 0.5)
            env[:k] *= np.linspace(0.0, 1.0, k)
        voiced_env[pos:end] = env[: end - pos]
        formant_points.append(pos + n // 2)
        formant_targets.append(_random_formants(rng))
        pos += n
        if rng.random() < 0.25:  # a short pause between words
            pos += int(rng.uniform(0.05, 0.25) * sr / _CTRL)
    # trailing silence: fade the last 100 ms out so utterances end quietly
    tail = min(num_ctrl, int(0.1 * sr / _CTRL))
    voiced_env[-tail:] *= np.linspace(1.0, 0.0, tail)
    noise_env[-tail:] *= np.linspace(1.0, 0.0, tail)

    # --- pitch: base f0 with slow vibrato and declination, at sample resolution
    f0_base = rng.uniform(80.0, 250.0)
    seconds = ctrl_t / sr
    f0_ctrl = f0_base * (1.0 + 0.06 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * seconds + rng.uniform(0, 2 * np.pi))
                         - 0.04 * seconds / max(seconds[-1], 1e-9))
    t = np.arange(num_samples)
    f0 = np.interp(t, ctrl_t, f0_ctrl)  # (S,) Hz
    phase = np.cumsum(f0 / sr)  # (S,) cycles elapsed
    pulses = np.diff(np.floor(phase), prepend=0.0)  # (S,) 1 at each glottal closure, else 0
    voiced = pulses * np.interp(t, ctrl_t, voiced_env) * np.sqrt(f0 / 100.0)  # keep loudness ~ f0-independent
    noise = rng.standard_normal(num_samples) * np.interp(t, ctrl_t, noise_env) * 0.05

    # --- vocal tract: formant resonances that glide between syllable targets
    num_win = num_samples // _HOP + 2  # windows: every sample lies under exactly two of them
    win_centre = np.arange(num_win) * _HOP  # (W,) sample position of each window's centre
    points = np.asarray(formant_points) * _CTRL
    targets = np.asarray(formant_targets)  # (P, 3) formant frequencies in Hz
    formants = np.stack([np.interp(win_centre, points, targets[:, k]) for k in range(3)], axis=1)  # (W, 3)
    freqs = np.fft.rfftfreq(_WIN, 1.0 / sr)  # (F,) Hz, F = 257
    bandwidths = np.array([70.0, 100.0, 160.0])  # Hz, typical F1..F3 bandwidths
    # magnitude of a 2-pole resonance at Fk with bandwidth Bk, normalised to 1 at 0 Hz;
    # the cascade (product) of the three gives the vowel envelope.
    fk = formants[:, None, :]  # (W, 1, 3)
    f = freqs[None, :, None]  # (1, F, 1)
    resonance = fk**2 / np.sqrt((fk**2 - f**2) ** 2 + (bandwidths * f) ** 2)  # (W, F, 3)
    tilt = 1.0 / (1.0 + freqs / 300.0)  # (F,) glottal roll-off plus lip radiation, about -6 dB/oct
    vowel_filter = resonance.prod(axis=2) * tilt  # (W, F)
    fricative_filter = np.exp(-0.5 * ((freqs - rng.uniform(3500, 6000)) / 1200.0) ** 2)  # (F,) broad high band

    wav = _overlap_add_filter([(voiced, vowel_filter), (noise, fricative_filter[None, :])], num_win)  # (S,)
    wav = wav / (np.sqrt(np.mean(wav**2)) + 1e-8) * rng.uniform(0.05, 0.1)  # RMS level of read speech
    wav = wav + rng.standard_normal(num_samples) * 3e-4  # background noise, about -50 dB
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


def _random_formants(rng):
    """Formant targets (F1, F2, F3) in Hz of one random vowel."""
    return [rng.uniform(300, 850), rng.uniform(850, 2300), rng.uniform(2300, 3200)]


def _overlap_add_filter(parts, num_win):
    """Sum of filtered signals: parts = [(x (S,), gains (W or 1, F)), ...] -> (S,).

    Each 512-sample window of x is Hann-weighted and multiplied by that window's gains in
    the frequency domain; the filtered spectra of all parts are summed (one inverse FFT)
    and the windows are added back at hop 256. Periodic Hann windows at 50 % overlap sum to
    one, so a flat gain of 1 returns x unchanged. num_win must be S // 256 + 2, so that
    every sample lies under exactly two windows.
    """
    num_samples = parts[0][0].shape[0]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_WIN) / _WIN)  # periodic Hann
    spectra = 0.0
    for x, gains in parts:
        padded = np.zeros((num_win + 1) * _HOP)
        padded[_HOP : _HOP + num_samples] = x  # half a window of zeros in front: window w centres on sample w*hop
        frames = np.lib.stride_tricks.sliding_window_view(padded, _WIN)[::_HOP][:num_win]  # (W, 512)
        spectra = spectra + np.fft.rfft(frames * hann, axis=1) * gains  # (W, F)
    filtered = np.fft.irfft(spectra, n=_WIN, axis=1)  # (W, 512)
    out = np.zeros((num_win + 1, _HOP))  # (W + 1, hop): blocks of the output
    out[:num_win] += filtered[:, :_HOP]  # first half of window w lands in block w
    out[1:] += filtered[:, _HOP:]  # second half lands in block w + 1
    return out.reshape(-1)[_HOP : _HOP + num_samples]


# ----------------------------------------------------------------------------
# 5. Dataset, length-bucketed batches, collate, loader


class AudioDataset(torch.utils.data.Dataset):
    """Waveforms for training: dataset[(epoch, index)] -> FloatTensor (S,), S <= max_samples.

    source is one of:
      - a list of (path, num_samples) items from scan_audio;
      - a SyntheticSpeech corpus;
      - the string "synthetic" (a SyntheticSpeech with its defaults);
      - a directory path (scanned with scan_audio, whose report is printed).
    Utterances longer than max_samples are cut to a random window of max_samples samples.
    The window start is drawn from a generator seeded by (seed, epoch, index), so the same
    step of a resumed run sees exactly the same audio, in any worker process.
    choice: a plain int index means epoch 0 (handy for inspection and evaluation).
    """

    def __init__(self, source, max_samples=None, seed=0, skip_bad=False):
        # skip_bad: a file that passed scan_audio (header) but fails to decode is returned as a
        # BadFile instead of raising inside a DataLoader worker; collate_checked drops and names it
        self.skip_bad = skip_bad
        if isinstance(source, str):
            source = SyntheticSpeech() if source == "synthetic" else scan_audio(source)[0]
        if isinstance(source, SyntheticSpeech):
            self.synthetic = source
            self.paths = None
            full_lengths = list(source.lengths)
            self.names = list(source.names)
        elif isinstance(source, (list, tuple)):
            if not source:
                raise ValueError("AudioDataset: the list of items is empty (expected [(path, num_samples), ...] from scan_audio)")
            self.synthetic = None
            self.paths = [str(p) for p, _ in source]
            full_lengths = [int(n) for _, n in source]
            # LibriSpeech utterance id = file name without extension (the key of read_transcripts)
            self.names = [os.path.splitext(os.path.basename(p))[0] for p in self.paths]
        else:
            raise TypeError(f"AudioDataset: source must be a list of (path, num_samples), a SyntheticSpeech, "
                            f"'synthetic' or a directory; got {type(source).__name__}")
        if max_samples is not None and max_samples < MIN_SAMPLES:
            raise ValueError(f"AudioDataset: max_samples must be >= {MIN_SAMPLES} (one frame), got {max_samples}")
        self.max_samples = max_samples
        self.seed = seed
        self.full_lengths = full_lengths  # samples before cropping
        # lengths after cropping: what the sampler packs into batches
        self.lengths = [n if max_samples is None else min(n, max_samples) for n in full_lengths]

    def __len__(self):
        return len(self.lengths)

    def load(self, index):
        """The whole utterance `index`, uncropped: FloatTensor (S,)."""
        if self.synthetic is not None:
            return self.synthetic[index]
        wav = load_audio(self.paths[index])
        if wav.shape[0] < MIN_SAMPLES:
            # scan_audio read a longer length from the header than the body holds
            raise AudioError(f"{self.paths[index]}: decoded {wav.shape[0]} samples, fewer than one frame "
                             f"({MIN_SAMPLES}); the header said {self.full_lengths[index]}")
        return wav

    def __getitem__(self, key):
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        try:
            wav = self.load(index)  # (S,)
        except AudioError as e:
            if not self.skip_bad:
                raise
            return BadFile(self.paths[index], str(e))
        if self.max_samples is not None and wav.shape[0] > self.max_samples:
            # note: the generator is seeded by (seed, epoch, index) and nothing else, so the
            # crop does not depend on which worker loads it or on what was loaded before.
            rng = np.random.default_rng([self.seed, epoch, index])
            start = int(rng.integers(0, wav.shape[0] - self.max_samples + 1))
            wav = wav[start : start + self.max_samples]  # (max_samples,)
        return wav


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of utterances of similar length, as lists of (epoch, index) pairs.

    Batches: indices sorted by length, then cut greedily so that the padded size of each
    batch, B * (longest length in it), stays <= max_batch_samples; an utterance longer than
    the budget gets a batch of its own (it is never dropped).
    sort_lengths (optional): the lengths to sort by, when `lengths` are cropped: the full lengths,
    as s3prl sorts, so utterances longer than the crop keep their own order instead of tying in
    path order (speaker by speaker, which would make fixed batches of one or two speakers).
    Cropping is monotonic, so `lengths` ascend in that order too.
    choice: the batches are formed once and keep their members across epochs; only their
    ORDER is shuffled, by a generator seeded by (seed, epoch) (as fairseq, whose epoch
    iterator shuffles a fixed list of batches). Sorting by length keeps padding small.
    max_batch_size (optional) also caps the utterances per batch, for recipes that count
    utterances (DistilHuBERT: 24) rather than samples.
    Distributed: the epoch's batch order is cut so that rank r takes batches r, r+W, r+2W...
    When the count does not divide by W, batches from the start of the order are repeated
    so every rank gets the same count (DistributedSampler's rule). choice: drop_last=True
    drops the tail batches instead; it never drops utterances from inside a batch.
    Resume: set_epoch(epoch, start_batch=k) skips this rank's first k batches of the epoch.
    Each yielded batch carries its epoch in every pair, so the dataset's random crop knows
    the epoch even inside DataLoader worker processes.
    len(sampler) = batches this rank gets in a full epoch (a resumed epoch yields
    len - start_batch).
    """

    def __init__(self, lengths, max_batch_samples, seed=0, shuffle=True, rank=0, world_size=1, drop_last=False,
                 max_batch_size=None, sort_lengths=None):
        lengths = [int(n) for n in lengths]
        self.sort_lengths = lengths if sort_lengths is None else [int(n) for n in sort_lengths]
        if not lengths:
            raise ValueError("LengthBucketSampler: lengths is empty (no utterances to batch)")
        if max_batch_samples <= 0:
            raise ValueError(f"LengthBucketSampler: max_batch_samples must be > 0, got {max_batch_samples}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"LengthBucketSampler: max_batch_size must be >= 1 or None, got {max_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"LengthBucketSampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.lengths = lengths
        self.max_batch_samples = max_batch_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.max_batch_size = max_batch_size
        self.batches = self._make_batches()
        if drop_last and len(self.batches) < world_size:
            raise ValueError(f"LengthBucketSampler: drop_last with {len(self.batches)} batches and world_size "
                             f"{world_size} leaves no batch for some ranks; lower world_size or max_batch_samples")
        self.epoch = 0
        self.start_batch = 0

    def _make_batches(self):
        # stable sort: equal lengths keep index order, so the batches are reproducible
        order = sorted(range(len(self.lengths)), key=lambda i: self.sort_lengths[i])
        batches, current = [], []
        for i in order:
            # lengths ascend, so adding utterance i makes it the longest: padded size = (B+1) * len_i
            over_budget = (len(current) + 1) * self.lengths[i] > self.max_batch_samples
            full = self.max_batch_size is not None and len(current) == self.max_batch_size
            if current and (over_budget or full):
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        return batches

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's batch order; skip this rank's first `start_batch` batches (resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"LengthBucketSampler.set_epoch: start_batch must be in 0..{len(self)}, got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def _rank_batches(self, epoch):
        """This rank's batch ids for `epoch`, in order."""
        n = len(self.batches)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        w = self.world_size
        total = (n // w) * w if self.drop_last else math.ceil(n / w) * w
        # pad by wrapping around to the start of this epoch's order (possibly more than once
        # when there are fewer batches than ranks)
        order = [int(order[j % n]) for j in range(total)]
        return order[self.rank :: w]

    def __len__(self):
        n, w = len(self.batches), self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    def __iter__(self):
        epoch = self.epoch
        for b in self._rank_batches(epoch)[self.start_batch :]:
            yield [(epoch, i) for i in self.batches[b]]


class BadFile(NamedTuple):
    """An utterance that could not be decoded during training (see AudioDataset(skip_bad=True))."""
    path: str
    reason: str


def collate_checked(batch):
    """collate() for training: BadFile entries are left out and returned by name.

    -> (wav (B', S_max), lengths (B',), bad: list of BadFile); B' may be 0 if every file failed.
    """
    bad = [b for b in batch if isinstance(b, BadFile)]
    good = [b for b in batch if not isinstance(b, BadFile)]
    if not good:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), bad
    wav, lengths = collate(good)
    return wav, lengths, bad


def collate(batch):
    """List of B waveforms (S_b,) -> (wav (B, S_max) float32 zero-padded, lengths (B,) long)."""
    lengths = torch.tensor([w.shape[0] for w in batch], dtype=torch.long)  # (B,)
    wav = torch.zeros(len(batch), int(lengths.max()), dtype=torch.float32)  # (B, S_max)
    for b, w in enumerate(batch):
        wav[b, : w.shape[0]] = w
    return wav, lengths


def make_loader(dataset, sampler, num_workers=2, collate_fn=None):
    """DataLoader over `dataset` with `sampler` as batch sampler and `collate`.

    persistent_workers is off so that each epoch's iterator reads the sampler's current
    epoch and start_batch; pin_memory is on when CUDA is available (faster host->GPU copy).
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn or collate,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # subtle: without its own generator a DataLoader draws its workers' base seed from the
        # global torch RNG each time an iterator starts, i.e. at every epoch start. A run resumed
        # mid-epoch would then see a different dropout stream than one that ran straight through.
        # Our data is a pure function of (seed, epoch, index), so a fixed generator loses nothing.
        generator=torch.Generator().manual_seed(0),
        # Ctrl-C reaches every process of the terminal's group: workers ignore it, so the training
        # loop (distill.StopSignal) can finish its step with them and write a checkpoint
        worker_init_fn=ignore_sigint,
    )


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------
# 6. Span masking (HuBERT / wav2vec 2.0; fairseq's compute_mask_indices semantics)


def compute_mask_indices(frame_lengths, max_frames, mask_prob, mask_length=10, mask_type="static", min_masks=2,
                         no_overlap=False, min_space=1, require_same_masks=True, same_count_rows=None, rng=None):
    """Random spans of frames to mask: BoolTensor (B, max_frames) on CPU, True = masked.

    Per utterance b with T_b = frame_lengths[b] valid frames (fairseq semantics):
      num_spans = max(min_masks, int(mask_prob * T_b / mask_length + u)), u ~ U[0, 1)
      (probabilistic rounding: the expected span count is exactly mask_prob * T_b / mask_length);
      span lengths all mask_length ("static") or drawn uniformly from {0, ..., 2*mask_length}
      ("uniform", mean mask_length); spans then placed at random inside the valid frames.
    Padding frames (t >= T_b) are never masked.

    Arguments, with the defaults of HuBERT (fairseq hubert_base config) and of the
    official ARMHuBERT code:
      frame_lengths: (B,) valid frames per utterance (LongTensor, array or list).
      max_frames: T, the padded frame count of the batch (>= every frame length).
      mask_prob: fraction of valid frames to cover. HuBERT 0.8; ARMHuBERT 0.8 on 960 h,
        0.4 on 100 h. 0 gives no mask at all.
      mask_length: span length (mean span length for "uniform"). HuBERT 10, ARMHuBERT 10.
      mask_type: "static" (HuBERT) or "uniform" (ARMHuBERT: lengths 0..20).
      min_masks: at least this many spans per utterance. HuBERT 2, ARMHuBERT 2.
      no_overlap: place spans in free intervals so they never overlap. HuBERT False,
        ARMHuBERT True. Without it, span starts are distinct but spans may overlap, so
        fewer than mask_prob of the frames end up masked (about 1 - exp(-mask_prob)).
      min_space: with no_overlap, unmasked frames kept between two spans. HuBERT 1
        (unused since no_overlap is off), ARMHuBERT 1.
      require_same_masks: drop random masked frames until every utterance has the batch's
        smallest masked count (fairseq's default True, used by HuBERT and ARMHuBERT), so
        the masked frames of a batch stack into a rectangle.
      same_count_rows: with require_same_masks, equalise within groups of at most this many
        rows (rows taken in length order) instead of over the whole batch; None = the whole
        batch (fairseq, exactly). choice, with groups: a row shorter than half the group's
        longest keeps its own count and is left out of the group's minimum (in fairseq one
        0.1 s row among 10 s rows cuts every row's masks to its handful). The minimum over many rows masks far less than mask_prob: ARMHuBERT's
        official run equalised over its 18 utterances per GPU, so distill.py passes 18 and a
        batch of 60 short rows realises about the share of the paper's batches (see README).
      rng: numpy Generator; None -> np.random.default_rng() (fresh entropy).

    Edge cases and our choices where fairseq is odd:
      - choice: spans start anywhere a span of the shortest drawn length still fits, so the
        last frame can be masked (fairseq draws starts from range(T - len), one fewer).
      - utterance shorter than the spans (overlap mode): starts are drawn from the first
        max(num_spans, T - len + 1) positions and spans are cut at T (as fairseq), so
        min_masks distinct spans still start inside the utterance.
      - choice (no_overlap): a span that fits in no free interval is shortened to the
        longest free interval (which keeps min_space to its neighbours) instead of being
        dropped with every remaining span as fairseq does; this keeps min_masks on short
        utterances and only matters when the spans nearly fill the utterance.
      - choice: rows with 0 valid frames get no mask and do not count for
        require_same_masks (in fairseq one empty row would unmask the whole batch).
    """
    if mask_type not in ("static", "uniform"):
        raise ValueError(f"compute_mask_indices: mask_type must be 'static' or 'uniform', got {mask_type!r}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"compute_mask_indices: mask_prob must be in [0, 1], got {mask_prob}")
    if mask_length < 1:
        raise ValueError(f"compute_mask_indices: mask_length must be >= 1, got {mask_length}")
    if min_masks < 0 or min_space < 0:
        raise ValueError(f"compute_mask_indices: min_masks and min_space must be >= 0, got {min_masks}, {min_space}")
    lengths = np.asarray(frame_lengths.cpu() if isinstance(frame_lengths, torch.Tensor) else frame_lengths,
                         dtype=np.int64).reshape(-1)  # (B,)
    if (lengths < 0).any() or (lengths > max_frames).any():
        raise ValueError(f"compute_mask_indices: frame_lengths must lie in 0..max_frames={max_frames}, "
                         f"got {lengths.tolist()}")
    rng = np.random.default_rng() if rng is None else rng
    batch_size = lengths.shape[0]
    mask = np.zeros((batch_size, max_frames), dtype=bool)  # (B, T)
    if mask_prob == 0.0:
        # choice: fairseq would still place min_masks spans; callers asking for no masking mean none
        return torch.from_numpy(mask)

    masked = []  # per row: sorted array of masked frame indices, all < T_b
    for b in range(batch_size):
        sz = int(lengths[b])
        if sz == 0:
            masked.append(None)  # nothing to mask; left out of the batch minimum below
            continue
        # probabilistic rounding: E[num_spans] = mask_prob * sz / mask_length before the floor of min_masks
        num_spans = max(min_masks, int(mask_prob * sz / mask_length + rng.random()))
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
            idx = _place_spans_no_overlap(sz, span_lens, min_space, rng)
        else:
            idx = _place_spans_overlapping(sz, span_lens, rng)
        masked.append(idx)

    # require_same_masks: every (non-empty) row keeps its group's smallest masked count; a group
    # is the whole batch (fairseq) or, with same_count_rows = G, G rows of neighbouring lengths
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
    # a start at s is valid when the shortest (non-empty) span still fits: s <= sz - min_len
    num_starts = sz - max(int(span_lens.min()), 1) + 1
    # short utterance: too few valid starts for num_spans distinct ones; allow more starts
    # (spans then run past the end and are cut at sz), and never more spans than frames
    num_starts = max(num_starts, min(num_spans, sz))
    num_spans = min(num_spans, num_starts)
    starts = rng.choice(num_starts, num_spans, replace=False)  # (num_spans,) distinct
    offsets = np.arange(int(span_lens.max()))  # (max_len,)
    idx = starts[:, None] + offsets[None, :]  # (num_spans, max_len) frame of each span position
    keep = offsets[None, :] < span_lens[:num_spans, None]  # (num_spans, max_len) within that span's length
    idx = idx[keep]  # (total,) may repeat where spans overlap
    return np.unique(idx[idx < sz])  # cut at the utterance end, overlaps merged


def _place_spans_no_overlap(sz, span_lens, min_space, rng):
    """Place spans longest first in free intervals, keeping min_space frames between spans.

    free holds half-open intervals [lo, hi) in which every frame may still be masked. A
    span of length n goes into an interval with hi - lo >= n, chosen with probability
    proportional to the interval's size (as fairseq), at a uniform start inside it; the
    interval then splits into [lo, start - min_space) and [start + n + min_space, hi).
    """
    free = [(0, sz)]
    idx = []
    for n in sorted((int(x) for x in span_lens), reverse=True):
        if n == 0 or not free:
            continue
        sizes = [hi - lo for lo, hi in free]
        if max(sizes) < n:
            n = max(sizes)  # choice: shorten to the longest free interval (see compute_mask_indices)
        weights = [s if s >= n else 0 for s in sizes]  # only intervals the span fits in
        # weighted pick by inverse CDF (plain Python: these lists are short, and this is
        # several times faster than rng.choice(p=...) on a per-span basis)
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
