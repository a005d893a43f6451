#!/usr/bin/env python3
"""The benchmark kit's corpus: synthetic English speech from espeak-ng, in LibriSpeech layout.

What it builds (under OUT, 16 kHz mono 16-bit FLAC; the layout of LibriSpeech, so the project's
own corpus reader and transcript reader are the ones exercised):
  OUT/{split}/{spk}/0/{spk}-0-{j:05d}.flac   one utterance; j numbers the utterances of the corpus
  OUT/{split}/{spk}/0/{spk}-0.trans.txt      "{spk}-0-{j:05d} WORDS IN UPPER CASE", sorted by id
  OUT/lexicon.txt                            "WORD ph ph ..." (espeak-ng en-us phonemes, stress removed)

Sentences: the English prose of the license texts in /usr/share/common-licenses (every Debian
machine has them), cut at punctuation, kept when 4-16 words of plain letters. Speakers: an
espeak-ng accent x voice variant (7 x 25), each with its own speaker id (100 + its index in the
shuffled list). One random generator (seed 0) shuffles sentences and speakers and draws, for each
utterance, its speaker, speaking rate (135-185 words/min) and pitch (30-70).

Splits have disjoint sentences and disjoint speakers:
  test   the first 10 % of the sentences and 12 speakers (ids 100-111): held out, not generated
  dev    the next 10 % and 12 speakers (ids 112-123), one utterance per sentence
  train  the other 80 % and the other 151 speakers (ids 124-274), three utterances per sentence
The probe of the README divides the dev speakers in two (112-117 dev, 118-123 test).

The README's kit figures come from Debian 12's license texts, espeak-ng 1.51 and sox 14.4.2:
1015 train and 127 dev sentences, 3045 train and 127 dev utterances. If the license texts differ,
the script says so, since the corpus then differs from the README's.

Run (from the repository root; needs `apt-get install espeak-ng sox`, Python's standard library only):
    python3 kit/make_corpus.py bench/corpus        # 2-4 minutes
"""
import argparse
import glob
import hashlib
import os
import random
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

SEED = 0
LICENSES = "/usr/share/common-licenses/*"
# sha256 of the sorted sentence list that Debian 12's license texts give (1268 sentences)
SENTENCES_SHA256 = "f516481f6d1e776df72a34cf054d2abdcaeb9564a5d936117384b0712507f3e6"
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",  # espeak-ng voice variants
            "adam", "Andy", "Annie", "belinda", "benjamin", "caleb", "david", "ed", "edward", "john", "linda",
            "max", "michael"]
UTTERANCES_PER_SENTENCE = {"train": 3, "dev": 1}  # the test split is not generated


# ----------------------------------------------------------------------------- sentences and speakers
def read_sentences():
    """Sorted, distinct upper-case sentences of 4-16 words, each word 2-13 letters (or A, I)."""
    text = " ".join(open(f, errors="ignore").read() for f in sorted(glob.glob(LICENSES)))
    sentences = set()
    for piece in re.split(r"(?<=[.!?;:,])\s+", re.sub(r"\s+", " ", text)):
        words = re.sub(r"[^A-Za-z' ]", " ", piece).replace("'", "").split()  # "don't" -> "dont"
        if 4 <= len(words) <= 16 and all(2 <= len(w) < 14 or w.lower() in ("a", "i") for w in words):
            sentences.add(" ".join(words).upper())
    return sorted(sentences)


def plan(rng, sentences):
    """The utterances to synthesise, in id order: (split, speaker id, accent, variant, sentence, rate, pitch).
    note: the order of the rng calls fixes the corpus; shuffles first, then three draws per utterance."""
    rng.shuffle(sentences)
    n = len(sentences)
    split_sentences = {"test": sentences[: n // 10], "dev": sentences[n // 10: n // 5], "train": sentences[n // 5:]}
    speakers = [(a, v) for a in ACCENTS for v in VARIANTS]
    rng.shuffle(speakers)
    split_speakers = {"test": speakers[:12], "dev": speakers[12:24], "train": speakers[24:]}
    jobs = []
    for split in ("train", "dev"):
        for sentence in split_sentences[split]:
            for _ in range(UTTERANCES_PER_SENTENCE[split]):
                accent, variant = split_speakers[split][rng.randrange(len(split_speakers[split]))]
                speaker = 100 + speakers.index((accent, variant))
                jobs.append((split, speaker, accent, variant, sentence, rng.randint(135, 185), rng.randint(30, 70)))
    return split_sentences, jobs


# ----------------------------------------------------------------------------- audio, transcripts, lexicon
def synthesise(out, j, job):
    """espeak-ng writes a 22.05 kHz wav; sox turns it into 16 kHz mono 16-bit FLAC at 0.9 of its amplitude
    (headroom for the resampler). note: sox dithers when it rounds to 16 bits (+-1-2 of 32768); -R seeds its
    dither with a fixed number, so that every build of the corpus is the same file for file."""
    split, speaker, accent, variant, sentence, rate, pitch = job
    folder = os.path.join(out, split, str(speaker), "0")
    os.makedirs(folder, exist_ok=True)
    uid = f"{speaker}-0-{j:05d}"
    wav = os.path.join(folder, uid + ".wav")
    subprocess.run(["espeak-ng", "-v", f"{accent}+{variant}", "-s", str(rate), "-p", str(pitch), "-w", wav,
                    sentence.lower()], check=True)
    flac = os.path.join(folder, uid + ".flac")
    subprocess.run(["sox", "-R", "-v", "0.9", wav, "-r", "16000", "-c", "1", "-b", "16", flac], check=True)
    os.remove(wav)
    return split, speaker, uid, sentence


def write_transcripts(out, done):
    """One {spk}-0.trans.txt per speaker folder, lines sorted by utterance id."""
    lines = {}
    for split, speaker, uid, sentence in done:
        lines.setdefault((split, speaker), []).append(f"{uid} {sentence}")
    for (split, speaker), rows in lines.items():
        with open(os.path.join(out, split, str(speaker), "0", f"{speaker}-0.trans.txt"), "w") as f:
            f.write("\n".join(sorted(rows)) + "\n")


def write_lexicon(out, sentences):
    """Every word of every sentence (the held-out test sentences too), with its espeak-ng en-us phonemes:
    stress and syllable marks dropped, and a trailing variant digit ("@2" -> "@"), so that one phone set
    serves every accent."""
    words = sorted({w for s in sentences for w in s.split()})
    phonemes = subprocess.run(["espeak-ng", "-v", "en-us", "-q", "-x", "--sep= "],
                              input="\n".join(w.lower() for w in words),
                              capture_output=True, text=True, check=True).stdout.strip().split("\n")
    assert len(phonemes) == len(words), f"espeak-ng gave {len(phonemes)} lines for {len(words)} words"
    with open(os.path.join(out, "lexicon.txt"), "w") as f:
        for word, line in zip(words, phonemes):
            phones = [re.sub(r"(?<=\D)\d$", "", re.sub(r"[',%=_;!]", "", p)) for p in line.split()]
            f.write(f"{word} {' '.join(p for p in phones if p)}\n")
    return words


# ----------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="corpus", help="output folder (the README uses bench/corpus)")
    parser.add_argument("--threads", type=int, default=4, help="synthesis processes run at once (the output "
                        "does not depend on it)")
    args = parser.parse_args()
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"make_corpus.py: {' and '.join(missing)} not found; "
                         "install them with: apt-get install espeak-ng sox")
    sentences = read_sentences()
    if not sentences:
        raise SystemExit(f"make_corpus.py: no license texts at {LICENSES} to take sentences from")
    if hashlib.sha256("\n".join(sentences).encode()).hexdigest() != SENTENCES_SHA256:
        print(f"make_corpus.py: note: the license texts at {LICENSES} give {len(sentences)} sentences, not the "
              "1268 of Debian 12; the corpus will differ from the README's kit")

    split_sentences, jobs = plan(random.Random(SEED), sentences)
    with ThreadPoolExecutor(args.threads) as pool:
        done = list(pool.map(lambda j: synthesise(args.out, j, jobs[j]), range(len(jobs))))
    write_transcripts(args.out, done)
    words = write_lexicon(args.out, sentences)
    print({k: len(split_sentences[k]) for k in ("train", "dev")}, len(jobs), "utterances,", len(words), "words")


if __name__ == "__main__":
    main()
