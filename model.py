"""Teachers, compact students and the GenDistiller generator, in plain PyTorch.

This file holds every network of the project (method reference: ../shared/SPEC.md):
  1. conventions shared by all methods (frame count, layer index, padding)   SPEC 0
  2. the frozen teacher: torchaudio bundles, torchaudio-format files, s3prl-converted
     fairseq checkpoints, and a `tiny` random teacher, all through one code path
  3. the student: one config dataclass, one model class, the paper presets     SPEC 1-4
     - DistilHuBERT (Chang et al. 2022): 2 layers + shared/split prediction heads
     - ARMHuBERT (Recycle-and-Distill, Jang et al. 2023): even layers have no query/key
       projections and reuse the previous layer's attention probabilities
     - CoLLD (Lee et al. 2024): a deep narrow student with per-layer heads
     - GenDistiller (Gao et al. 2023): a generator that emits the teacher's layers one
       after another, attention causal across layers and bidirectional across time
  4. initialisation from the teacher, saving and loading
  5. parameter and MAC counting, and the table printed by `python model.py`

Example:
    python model.py            # one row per preset: parameters, paper figure, MACs
"""
import ast
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# 1. Conventions shared by every method (SPEC section 0)
#
# Audio is mono float32 at 16 kHz. The HuBERT conv stack has a total stride of 320
# samples (20 ms) and a receptive field of 400 samples (25 ms), so an utterance of L
# samples gives floor((L - 400) / 320) + 1 frames, and none below 400 samples.
#
# Layer index: "teacher layer k" (k = 1..L) is the output of transformer block k,
# exactly what torchaudio's Wav2Vec2Model.extract_features returns at list index k - 1
# and what HF / s3prl call hidden_states[k]. Python lists in this project are 0-based,
# so teacher layer k is `layers[k - 1]`. Index 0 of HF/s3prl (the transformer input)
# is never a distillation target. test_all.py checks this against torchaudio.
#
# Padding: every batch carries `lengths` (samples) and every network returns
# `frame_lengths` (valid frames); padded frames never influence a valid frame of a
# student (the conv GroupNorm is masked, padded keys are masked in attention, padded
# frames are zeroed before the positional convolution). test_all.py checks that a
# padded batch equals per-utterance runs on the valid frames.
# ----------------------------------------------------------------------------

SAMPLE_RATE = 16000  # Hz


def conv_output_lengths(lengths, conv_layers):
    """Valid output frames of a conv stack for inputs of `lengths` samples (int or tensor)."""
    for _, kernel, stride in conv_layers:
        lengths = (lengths - kernel) // stride + 1
        lengths = lengths.clamp(min=0) if torch.is_tensor(lengths) else max(lengths, 0)
    return lengths


def padding_mask(frame_lengths, max_frames):
    """(B, T) bool, True on padded frames (t >= frame_lengths[b])."""
    t = torch.arange(max_frames, device=frame_lengths.device)
    return t[None, :] >= frame_lengths[:, None]  # (B, T)


def masked_instance_norm(x, valid, norm):
    """GroupNorm(C, C) over time that ignores padded steps.

    x: (B, C, T), valid: (B, 1, T) float (1 = real sample). fairseq/torchaudio normalise over
    the padded tail too, which makes a short utterance's features depend on what it was
    batched with; statistics over valid steps only make a padded batch equal to single runs.
    """
    dtype = x.dtype
    x, valid = x.float(), valid.float()  # statistics in float32 even under autocast, as nn.GroupNorm
    n = valid.sum(-1, keepdim=True).clamp(min=1)  # (B, 1, 1)
    mean = (x * valid).sum(-1, keepdim=True) / n  # (B, C, 1)
    var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / n  # (B, C, 1), biased like GroupNorm
    x = (x - mean) / torch.sqrt(var + norm.eps)
    return (x * norm.weight[None, :, None] + norm.bias[None, :, None]).to(dtype)


def standardize_waveform(wav, lengths):
    """Per-utterance zero mean, unit variance over the valid samples (what Large / XLS-R teachers
    were trained on; fairseq `normalize: True`). wav (B, S), lengths (B,) samples."""
    valid = (~padding_mask(lengths, wav.shape[1])).float()  # (B, S)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (wav * valid).sum(1, keepdim=True) / n
    var = (((wav - mean) * valid) ** 2).sum(1, keepdim=True) / n
    return (wav - mean) / torch.sqrt(var + 1e-5) * valid


def conv_front_end(blocks, wav, lengths):
    """Run a HuBERT-style conv stack on a padded batch; works on student and torchaudio blocks.

    blocks: sequence of modules with `.conv` (Conv1d) and `.layer_norm` (GroupNorm on the first
    block in "group_norm" mode, a LayerNorm over channels on every block in "layer_norm" mode,
    or None). wav: (B, S), lengths: (B,) samples. Returns features (B, T, C), frame_lengths (B,).
    """
    x = wav[:, None, :]  # (B, 1, S)
    for block in blocks:
        x = block.conv(x)  # (B, C, T')
        lengths = (lengths - block.conv.kernel_size[0]) // block.conv.stride[0] + 1
        lengths = lengths.clamp(min=0)
        norm = block.layer_norm
        if isinstance(norm, nn.GroupNorm):
            # note: the HuBERT GroupNorm has one group per channel, i.e. instance norm over time
            assert norm.num_groups == norm.num_channels, "only GroupNorm(C, C) is supported"
            valid = (~padding_mask(lengths, x.shape[-1]))[:, None, :].to(x.dtype)  # (B, 1, T')
            x = masked_instance_norm(x, valid, norm)
        elif norm is not None:  # per-frame LayerNorm over channels: padding cannot leak
            x = F.layer_norm(x.transpose(1, 2), norm.normalized_shape, norm.weight, norm.bias, norm.eps).transpose(1, 2)
        x = F.gelu(x)
    return x.transpose(1, 2), lengths  # (B, T, C), (B,)


# ----------------------------------------------------------------------------
# 2. The frozen teacher
#
# Every source ends in `teacher_from_checkpoint(ckpt)` with a torchaudio-format dict
#   {"config": kwargs of torchaudio.models.wav2vec2_model / wavlm_model,
#    "state_dict": torchaudio key names, optional "mask_emb": (D,), optional
#    "normalize_waveform": bool}
# so the `tiny` teacher of the tests takes the same path as a real checkpoint.
# ----------------------------------------------------------------------------

# torchaudio pipeline bundles usable as teachers (self-supervised ones; the ASR
# fine-tuned bundles also load but are not what the papers distil).
BUNDLES = {
    "hubert_base": "HUBERT_BASE", "hubert_large": "HUBERT_LARGE", "hubert_xlarge": "HUBERT_XLARGE",
    "wavlm_base": "WAVLM_BASE", "wavlm_base_plus": "WAVLM_BASE_PLUS", "wavlm_large": "WAVLM_LARGE",
    "wav2vec2_base": "WAV2VEC2_BASE", "wav2vec2_large": "WAV2VEC2_LARGE",
    "wav2vec2_large_lv60k": "WAV2VEC2_LARGE_LV60K",
    "xlsr53": "WAV2VEC2_XLSR53", "xlsr_300m": "WAV2VEC2_XLSR_300M",
    "xlsr_1b": "WAV2VEC2_XLSR_1B", "xlsr_2b": "WAV2VEC2_XLSR_2B",
}

# The `tiny` teacher: HuBERT's shape (post-LN, 12 layers, the same conv kernels and strides)
# at a width that runs anywhere in milliseconds. choice: the "layer_norm" conv order (HuBERT
# Large's): with random weights the group-norm order maps all frames of an utterance to nearly
# one direction (mean cosine 0.89 between frames at layer 1, 0.94 at layer 12), a degenerate
# target for CoLLD's contrastive loss; the layer-norm order keeps frames apart (0.45 / 0.66).
TINY_TEACHER_CONFIG = dict(
    extractor_mode="layer_norm",
    extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
    extractor_conv_bias=False, encoder_embed_dim=48, encoder_projection_dropout=0.0,
    encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=12,
    encoder_num_heads=4, encoder_attention_dropout=0.0, encoder_ff_interm_features=96,
    encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False,
    encoder_layer_drop=0.0, aux_num_out=None,
)


class Teacher(nn.Module):
    """A frozen torchaudio Wav2Vec2Model (HuBERT, WavLM, wav2vec 2.0) returning every layer.

    teacher(wav, lengths, mask=None, final_norm=False) -> (layers, frame_lengths)
      wav (B, S) float, lengths (B,) samples, mask (B, T) bool frames to replace by the
      teacher's mask embedding right after the feature projection (fairseq HuBERT order);
      layers: list of L tensors (B, T, D), layers[k-1] = output of transformer block k;
      final_norm: a pre-LN teacher's last layer goes through the encoder's final LayerNorm.
    The teacher is always in eval mode, without grad, layerdrop off, and runs in float32
    even inside an autocast region (SPEC section 0).
    """

    def __init__(self, model, config, mask_emb=None, normalize_waveform=False, name="teacher"):
        super().__init__()
        self.model = model
        self.config = dict(config)
        self.name = name
        self.is_wavlm = "encoder_num_buckets" in config
        self.normalize_waveform = normalize_waveform
        self.conv_layers = [tuple(c) for c in config["extractor_conv_layer_config"]]
        self.dim = config["encoder_embed_dim"]
        self.num_layers = config["encoder_num_layers"]
        if mask_emb is None:
            # choice (SPEC 2): torchaudio bundles drop fairseq's mask_emb; use zeros and say so
            warnings.warn(f"teacher {name!r} has no mask embedding (torchaudio bundles drop it, and this "
                          "checkpoint has no 'mask_emb'): masked frames get a zero vector (SPEC section 2)")
            mask_emb = torch.zeros(self.dim)
        self.register_buffer("mask_emb", mask_emb.float().reshape(self.dim))
        self.model.encoder.transformer.layer_drop = 0.0
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # A teacher never leaves eval mode: dropout in the targets would be noise.
        return super().train(False)

    @torch.no_grad()
    def cnn_features(self, wav, lengths):
        """Conv front end output (B, T, C) and frame_lengths: the `cnn:` floor of eval.py."""
        with torch.autocast(wav.device.type, enabled=False):
            wav = wav.float()
            if self.normalize_waveform:  # Large/XLS-R models were trained on per-utterance standardised audio
                wav = standardize_waveform(wav, lengths)
            return conv_front_end(self.model.feature_extractor.conv_layers, wav, lengths)

    @torch.no_grad()
    def forward(self, wav, lengths, mask=None, final_norm=False):
        with torch.autocast(wav.device.type, enabled=False):
            features, frame_lengths = self.cnn_features(wav, lengths)  # (B, T, C)
            encoder = self.model.encoder
            x = encoder.feature_projection(features)  # (B, T, D): LayerNorm, Linear, dropout
            pad = padding_mask(frame_lengths, x.shape[1])  # (B, T)
            if mask is not None:
                x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)  # (B, T, D)
            x = x.masked_fill(pad[..., None], 0.0)  # as torchaudio: padded frames are zero
            # torchaudio's Transformer._preprocess: x + pos_conv(x), then the LayerNorm for
            # post-LN (Base) models; pre-LN (Large) models apply it after the last block instead.
            x = encoder.transformer._preprocess(x)
            layers, position_bias = [], None
            for layer in encoder.transformer.layers:
                if self.is_wavlm:  # WavLM attention takes a key padding mask, not an additive mask
                    x, position_bias = layer(x, None, position_bias=position_bias, key_padding_mask=pad)
                else:
                    additive = (-10000.0 * pad[:, None, None, :].to(x.dtype)).expand(-1, 1, x.shape[1], -1)  # (B,1,T,T)
                    x, _ = layer(x, additive)
                layers.append(x)  # layers[k-1] = output of block k
            if final_norm and self.config["encoder_layer_norm_first"]:
                # pre-LN models apply one more LayerNorm after the last block (s3prl's hidden_states[L]
                # and transformers 4 include it; extract_features and the official ARMHuBERT hooks do not)
                layers[-1] = encoder.transformer.layer_norm(layers[-1])
        return layers, frame_lengths

    def hidden_states(self, wav, lengths):
        """Same signature as Student.hidden_states, so eval.py treats both alike."""
        return self(wav, lengths)


def teacher_from_checkpoint(ckpt, name="teacher"):
    """Build a Teacher from a torchaudio-format dict; the one path every source goes through."""
    import torchaudio

    config = dict(ckpt["config"])
    config["aux_num_out"] = None  # a CTC head, if any, is not part of the teacher
    config["extractor_conv_layer_config"] = [tuple(c) for c in config["extractor_conv_layer_config"]]
    build = torchaudio.models.wavlm_model if "encoder_num_buckets" in config else torchaudio.models.wav2vec2_model
    model = build(**config)
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("aux.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"teacher {name!r}: checkpoint does not fit its config.\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    return Teacher(model, config, ckpt.get("mask_emb"), ckpt.get("normalize_waveform", False), name)


def parse_conv_layers(spec):
    """fairseq's conv_feature_layers, e.g. "[(512,10,5)] + [(512,3,2)] * 4", parsed without eval().

    Only lists, tuples, integers, `+` and `*` are accepted.
    """
    if not isinstance(spec, str):
        return [tuple(c) for c in spec]

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)} in {spec!r}")

    return [tuple(c) for c in ev(ast.parse(spec, mode="eval"))]


# fairseq (HuBERT / WavLM / wav2vec 2.0) key -> torchaudio key; first match wins.
_L = r"encoder\.layers\.(\d+)\."
_TL = r"encoder.transformer.layers.\1."
FAIRSEQ_TO_TORCHAUDIO = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # layer_norm mode
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # group_norm mode
    (r"layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)",
     r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)",
     r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.transformer.pos_conv_embed.conv.bias"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    (_L + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)", _TL + r"attention.\2.\3"),
    (_L + r"self_attn\.relative_attention_bias\.weight", _TL + r"attention.rel_attn_embed.weight"),  # WavLM
    (_L + r"self_attn\.grep_linear\.(weight|bias)", _TL + r"attention.gru_rel_pos_linear.\2"),  # WavLM
    (_L + r"self_attn\.grep_a", _TL + r"attention.gru_rel_pos_const"),  # WavLM
    (_L + r"self_attn_layer_norm\.(weight|bias)", _TL + r"layer_norm.\2"),
    (_L + r"fc1\.(weight|bias)", _TL + r"feed_forward.intermediate_dense.\2"),
    (_L + r"fc2\.(weight|bias)", _TL + r"feed_forward.output_dense.\2"),
    (_L + r"final_layer_norm\.(weight|bias)", _TL + r"final_layer_norm.\2"),
]
# Pre-training-only parameters a teacher does not need (HuBERT's label projection,
# wav2vec 2.0's quantizer); mask_emb is kept separately.
FAIRSEQ_DROPPED = re.compile(r"^(final_proj|label_embs_concat|label_embs|quantizer|project_q|project_inp|target_glu)\b")


def fairseq_to_torchaudio(weights, cfg, task_cfg=None):
    """Map an s3prl-converted / fairseq state dict and config to the torchaudio format dict."""
    task_cfg = task_cfg or {}
    config = dict(
        extractor_mode="layer_norm" if cfg.get("extractor_mode") == "layer_norm" else "group_norm",
        extractor_conv_layer_config=parse_conv_layers(
            cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")),
        extractor_conv_bias=bool(cfg.get("conv_bias", False)),
        encoder_embed_dim=cfg.get("encoder_embed_dim", 768),
        encoder_projection_dropout=0.0,  # dropouts are irrelevant for a frozen eval-mode teacher
        encoder_pos_conv_kernel=cfg.get("conv_pos", 128),
        encoder_pos_conv_groups=cfg.get("conv_pos_groups", 16),
        encoder_num_layers=cfg.get("encoder_layers", 12),
        encoder_num_heads=cfg.get("encoder_attention_heads", 12),
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=cfg.get("encoder_ffn_embed_dim", 3072),
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
        encoder_layer_norm_first=bool(cfg.get("layer_norm_first", False)),
        encoder_layer_drop=0.0, aux_num_out=None,
    )
    if cfg.get("relative_position_embedding", False):  # WavLM
        config["encoder_num_buckets"] = cfg.get("num_buckets", 320)
        config["encoder_max_distance"] = cfg.get("max_distance", 800)
    state, unmapped = {}, []
    for key, value in weights.items():
        if key == "mask_emb" or FAIRSEQ_DROPPED.match(key):
            continue
        for pattern, target in FAIRSEQ_TO_TORCHAUDIO:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, target, key)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"unknown fairseq keys ({len(unmapped)}), cannot map to torchaudio: {unmapped[:20]}")
    if "encoder_num_buckets" in config:
        # torchaudio's WavLM attention is an nn.MultiheadAttention: q, k, v are one in_proj.
        for i in range(config["encoder_num_layers"]):
            p = f"encoder.transformer.layers.{i}.attention."
            for kind in ("weight", "bias"):
                qkv = [state.pop(f"{p}{n}_proj.{kind}") for n in ("q", "k", "v")]
                state[f"{p}attention.in_proj_{kind}"] = torch.cat(qkv, 0)  # (3D, D) / (3D,)
                state[f"{p}attention.out_proj.{kind}"] = state.pop(f"{p}out_proj.{kind}")
    normalize = bool(task_cfg.get("normalize", cfg.get("normalize", False)))
    return {"config": config, "state_dict": state, "mask_emb": weights.get("mask_emb"),
            "normalize_waveform": normalize}


def bundle_config(name):
    """(torchaudio model kwargs, normalize_waveform) of a bundle in BUNDLES; nothing is downloaded."""
    import torchaudio

    bundle = getattr(torchaudio.pipelines, BUNDLES[name.lower()])
    config = dict(bundle._params)
    if bundle._model_type == "WavLM":  # the kwargs of wavlm_model: marked by encoder_num_buckets
        config.setdefault("encoder_num_buckets", 320)
    return config, bundle._normalize_waveform


def bundle_description(name):
    """What fit_to_teacher reads of a teacher (config, dim, num_layers, normalize_waveform), for a
    bundle, without building it."""
    import types

    config, normalize = bundle_config(name)
    return types.SimpleNamespace(config=config, dim=config["encoder_embed_dim"], num_layers=config["encoder_num_layers"],
                                 normalize_waveform=normalize)


def tiny_teacher_checkpoint(seed=0):
    """A seeded random `tiny` teacher in the torchaudio-format dict (mask_emb included)."""
    import torchaudio

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torchaudio.models.wav2vec2_model(**TINY_TEACHER_CONFIG)
        mask_emb = torch.rand(TINY_TEACHER_CONFIG["encoder_embed_dim"])  # fairseq inits it uniform
    return {"config": TINY_TEACHER_CONFIG, "state_dict": model.state_dict(), "mask_emb": mask_emb}


def load_teacher(name_or_path, device="cpu"):
    """A frozen Teacher from a bundle name, a checkpoint file or `tiny` (see module docstring)."""
    import os

    import torchaudio

    if name_or_path == "tiny":
        ckpt = tiny_teacher_checkpoint()
    elif name_or_path.lower() in BUNDLES:
        config, normalize = bundle_config(name_or_path)
        bundle = getattr(torchaudio.pipelines, BUNDLES[name_or_path.lower()])
        # the weights download from torchaudio's server on first use (cached by torch.hub)
        ckpt = {"config": config, "state_dict": bundle._get_state_dict(None), "normalize_waveform": normalize}
    elif os.path.isfile(name_or_path):
        try:
            raw = torch.load(name_or_path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; re-raise with the file name
            raise ValueError(f"--teacher {name_or_path}: cannot read as a torch checkpoint ({e})") from e
        if isinstance(raw, dict) and "config" in raw and "state_dict" in raw:  # torchaudio format
            ckpt = raw
        elif isinstance(raw, dict) and "model_weight" in raw and "model_cfg" in raw:  # s3prl-converted
            ckpt = fairseq_to_torchaudio(raw["model_weight"], raw["model_cfg"], raw.get("task_cfg"))
        elif isinstance(raw, dict) and "model" in raw and "cfg" in raw:  # fairseq / WavLM original
            cfg = raw["cfg"].get("model", raw["cfg"])
            ckpt = fairseq_to_torchaudio(raw["model"], cfg, raw["cfg"].get("task"))
        else:
            keys = list(raw)[:10] if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"--teacher {name_or_path}: unknown checkpoint format (top-level keys {keys}); "
                             "expected {'config','state_dict'} (torchaudio), {'model_cfg','model_weight'} "
                             "(s3prl-converted) or {'cfg','model'} (fairseq)")
    else:
        raise ValueError(f"--teacher {name_or_path!r}: not a file, not 'tiny' and not a bundle name "
                         f"(bundles: {', '.join(BUNDLES)})")
    return teacher_from_checkpoint(ckpt, name=name_or_path).to(device)


# ----------------------------------------------------------------------------
# 3. The student
# ----------------------------------------------------------------------------

HUBERT_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2  # total stride 320 (20 ms), field 400
# ARMHuBERT's conv (official code): narrower, the 1x1 convs only change channel counts, so
# stride (320) and receptive field (400) are HuBERT's. The last two need channels == dim.
def armhubert_conv(dim):
    return [(128, 10, 5), (256, 1, 1)] + [(256, 3, 2)] * 4 + [(dim, 1, 1)] + [(dim, 2, 2)] * 2


@dataclass
class StudentConfig:
    # front end
    conv_layers: List[Tuple[int, int, int]] = field(default_factory=lambda: list(HUBERT_CONV))  # (channels, kernel, stride)
    conv_norm: str = "group_norm"  # "group_norm": GroupNorm after the first conv only (HuBERT Base); "layer_norm": after each
    conv_bias: bool = False
    feature_projection: bool = True  # LayerNorm(C) + Linear(C -> dim); False: LayerNorm(dim) only (ARMHuBERT)
    mask_embedding: bool = True  # a learned (dim,) vector for masked frames (masking methods)
    pos_conv_kernel: int = 128  # frames (2.56 s)
    pos_conv_groups: int = 16
    # transformer
    dim: int = 768
    ffn_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 2
    reuse: str = "none"  # "none" | "alternate": layers 2, 4, ... reuse the previous layer's attention map
    layer_norm_first: bool = False  # post-LN (HuBERT Base, the papers' students); True = pre-LN (Large)
    dropout: float = 0.1
    attention_dropout: float = 0.1  # on the attention probabilities of layers that compute their own map
    # official ARMHuBERT: a reuse layer multiplies the previous layer's map with the values without
    # any dropout of its own (the map it receives is the pre-dropout probability)
    reuse_attention_dropout: float = 0.0
    activation_dropout: float = 0.1
    input_dropout: float = 0.0  # on the projected features, before masking (fairseq dropout_input; presets set it)
    feature_grad_mult: float = 1.0  # gradient into the conv front end is scaled by this (fairseq/s3prl; forward unchanged)
    # ARMHuBERT official `layer_grad_scale` (see layer_grad_scales for the exact factors)
    layer_grad_scale: bool = False
    # "bert": fairseq/official: transformer Linears N(0, 0.02) with zero bias (init_bert_params),
    # kaiming-normal conv kernels; "pytorch": nn defaults there (this project before 2026-12); the
    # positional conv and mask embedding keep their fairseq inits in both
    init: str = "bert"
    fused_attention: bool = True  # scaled_dot_product_attention where no map is needed; False = explicit path
    official_reuse: bool = False  # re-apply softmax to the reused map like the official code (to load its checkpoints)
    # heads: "distilhubert" (shared + split heads on the last layer), "per_layer" (one Linear per
    # layer), "generator" (the layers run as GenDistiller's generator over K slots x T frames)
    head: str = "per_layer"
    teacher_dim: int = 768
    target_layers: Tuple[int, ...] = ()  # teacher layer (1-based) predicted by each output; set by fit_to_teacher
    init_from_teacher: bool = False  # copy conv, projection, pos conv and the first layers from the teacher
    # copy only the teacher's conv front end and its LayerNorm (the student keeps its own width, a
    # Linear(C -> dim) projection is added); kit recipe for scratch students, not in the papers
    # (ignored when init_from_teacher copies the whole front end anyway)
    init_conv_from_teacher: bool = False
    # standardise each utterance before the conv: set by fit_to_teacher when the conv comes from a
    # teacher that expects it (Large / XLS-R models)
    normalize_waveform: bool = False


# Presets: the papers' numbers for a HuBERT Base teacher (768-d, 12 layers).
PRESETS = {
    # DistilHuBERT, Chang et al. 2022, Table 1 / s3prl config: 2 layers, teacher-initialised, heads -> 4, 8, 12
    # (s3prl config_model.yaml: no input dropout, feature_grad_mult 0.1)
    "distilhubert": StudentConfig(head="distilhubert", num_layers=2, mask_embedding=False,
                                  target_layers=(4, 8, 12), init_from_teacher=True, feature_grad_mult=0.1),
    # Recycle-and-Distill Table 1 (ARMHuBERT): D 480, FFN 864, 12 layers, alternate reuse;
    # official armhubert-960.yaml: dropout_input 0.05, layer_grad_scale True
    "armhubert": StudentConfig(conv_layers=armhubert_conv(480), feature_projection=False, dim=480,
                               ffn_dim=864, num_layers=12, reuse="alternate", input_dropout=0.05,
                               layer_grad_scale=True),
    # Recycle-and-Distill Table 1 (ARMHuBERT-S): D 432, FFN 816 (official armhubert-S yaml as above)
    "armhubert-s": StudentConfig(conv_layers=armhubert_conv(432), feature_projection=False, dim=432,
                                 ffn_dim=816, num_layers=12, reuse="alternate", input_dropout=0.05,
                                 layer_grad_scale=True),
    # Recycle-and-Distill Table 1 (MaskHuBERT, the no-reuse ablation): D 480, FFN 640;
    # official maskhubert yaml: dropout_input 0.05, layer_grad_scale False
    "maskhubert": StudentConfig(conv_layers=armhubert_conv(480), feature_projection=False, dim=480,
                                ffn_dim=640, num_layers=12, input_dropout=0.05),
    # CoLLD: no size in the paper; choice (SPEC 3): the maskhubert geometry and settings, to
    # compare with ARMHuBERT at equal size
    "colld": StudentConfig(conv_layers=armhubert_conv(480), feature_projection=False, dim=480,
                           ffn_dim=640, num_layers=12, input_dropout=0.05),
    # GenDistiller: choice (SPEC 4): DistilHuBERT front end (and its settings), a 2-layer
    # 768-d generator over slots
    "gendistiller": StudentConfig(head="generator", num_layers=2, mask_embedding=False,
                                  target_layers=(4, 8, 12), init_from_teacher=True, feature_grad_mult=0.1),
}
# The papers' parameter figures (millions) and what they count.
PAPER_PARAMS = {"distilhubert": (23.49, "without prediction heads"), "armhubert": (26.45, "with heads"),
                "armhubert-s": (22.39, "with heads"), "maskhubert": (26.64, "with heads"),
                "colld": (None, "with heads"), "gendistiller": (None, "with output projections")}


def fit_to_teacher(cfg, teacher):
    """Adapt a preset to a teacher: output size, targets and, for teacher-initialised students,
    the geometry of the copied parts. Returns (new config, list of 'field: old -> new' notes).

    - teacher_dim always follows the teacher.
    - target_layers: per_layer heads map student layer i to teacher layer phi(i) = round(i * L_t / L_s)
      (SPEC 3), rounding halves up (Python's round() rounds them to even) and never below layer 1;
      the distilhubert/generator default (4, 8, 12) is scaled to L_t layers (choice: (8, 16, 24)
      for a 24-layer teacher), unless the user set them.
    - init_from_teacher: DistilHuBERT's student IS the teacher's front end and first layers,
      so conv, width, FFN, heads, positional conv and layer order come from the teacher.
    - init_conv_from_teacher: only the conv stack (and its norm mode) comes from the teacher; the
      student keeps its width and gets a LayerNorm(C) + Linear(C -> dim) projection.
    """
    c = teacher.config
    new = dict(teacher_dim=teacher.dim)
    L_t = teacher.num_layers
    if cfg.head == "per_layer":
        new["target_layers"] = tuple(max(1, math.floor(i * L_t / cfg.num_layers + 0.5)) for i in range(1, cfg.num_layers + 1))
    elif any(t > L_t for t in cfg.target_layers) or cfg.target_layers == (4, 8, 12):
        new["target_layers"] = tuple(max(1, math.floor(t * L_t / 12 + 0.5)) for t in (4, 8, 12))
    if cfg.init_conv_from_teacher or cfg.init_from_teacher:  # the conv is the teacher's, fed what it expects
        new.update(conv_layers=[tuple(x) for x in c["extractor_conv_layer_config"]],
                   conv_norm=c["extractor_mode"], conv_bias=c["extractor_conv_bias"], feature_projection=True,
                   normalize_waveform=teacher.normalize_waveform)
    if cfg.init_from_teacher:
        new.update(dim=teacher.dim, ffn_dim=c["encoder_ff_interm_features"],
                   num_heads=c["encoder_num_heads"], pos_conv_kernel=c["encoder_pos_conv_kernel"],
                   pos_conv_groups=c["encoder_pos_conv_groups"], layer_norm_first=c["encoder_layer_norm_first"])
    notes = [f"{k}: {getattr(cfg, k)} -> {v} (fitted to teacher)" for k, v in new.items() if getattr(cfg, k) != v]
    return replace(cfg, **new), notes


class ConvBlock(nn.Module):
    """One conv of the front end; `.conv` / `.layer_norm` named as torchaudio's so conv_front_end runs both."""

    def __init__(self, c_in, c_out, kernel, stride, bias, norm):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = norm  # GroupNorm(C, C), LayerNorm(C) or None


class SelfAttention(nn.Module):
    """Multi-head self-attention; a reuse layer (ARMHuBERT) has no query/key projections.

    forward(x, allowed, prev_attn) -> (out, attn)
      x (B, T, D); allowed: bool, broadcastable to (B, H, T, T), True where query t may look at
      key t'; prev_attn (B, H, T, T): the previous layer's attention probabilities (reuse only).
      attn is returned when `need_attn` (the next layer reuses it), else None.
    """

    def __init__(self, dim, num_heads, dropout, reuse=False, fused=True, official_reuse=False):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.reuse, self.fused, self.official_reuse = reuse, fused, official_reuse
        self.dropout = dropout
        if not reuse:  # the parameters ARMHuBERT saves: no W_Q, W_K in a reuse layer
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, allowed, prev_attn=None, need_attn=False):
        B, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        p = self.dropout if self.training else 0.0
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        if self.reuse:
            # Recycle-and-Distill: A_l = A_{l-1}, the previous layer's softmax probabilities for the
            # same sample and head, used as they are (no renormalisation); gradients flow into the
            # previous layer's Q/K through it.
            attn = prev_attn  # (B, H, T, T)
            if self.official_reuse:
                # note: the official code applies softmax a second time to the already normalised map;
                # kept only to reproduce its released checkpoints (SPEC 2)
                attn = attn.softmax(dim=-1)
        else:
            q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            k = self.k_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            if self.fused and not need_attn:
                # fast path, tested equal to the explicit one below
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, H, T, Dh)
                return self.out_proj(out.transpose(1, 2).reshape(B, T, D)), None
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(Dh)  # (B, H, T, T)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            attn = scores.softmax(dim=-1)  # (B, H, T, T), each row sums to 1 over allowed keys
        # dropout acts on a copy; the map handed to the next (reuse) layer is the clean, pre-dropout
        # probability (the paper says "the attention map"; the official code hands on the pre-dropout one)
        out = F.dropout(attn, p, self.training) @ v  # (B, H, T, Dh)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(out), (attn if need_attn else None)


class TransformerLayer(nn.Module):
    """A wav2vec 2.0 / HuBERT encoder block, post-LN (Base) or pre-LN (Large)."""

    def __init__(self, cfg: StudentConfig, reuse=False):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        attention_dropout = cfg.reuse_attention_dropout if reuse else cfg.attention_dropout
        self.attention = SelfAttention(cfg.dim, cfg.num_heads, attention_dropout, reuse,
                                       cfg.fused_attention, cfg.official_reuse)
        self.layer_norm = nn.LayerNorm(cfg.dim)  # after attention (post-LN) / before it (pre-LN)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def ffn(self, x):
        x = F.dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)  # (B, T, F)
        return F.dropout(self.fc2(x), self.dropout, self.training)  # (B, T, D)

    def forward(self, x, allowed, prev_attn=None, need_attn=False):
        residual = x
        if self.layer_norm_first:
            x = self.layer_norm(x)
        x, attn = self.attention(x, allowed, prev_attn, need_attn)
        x = residual + F.dropout(x, self.dropout, self.training)
        if self.layer_norm_first:
            x = x + self.ffn(self.final_layer_norm(x))
        else:
            x = self.layer_norm(x)
            x = self.final_layer_norm(x + self.ffn(x))
        return x, attn


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` backward (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def layer_grad_scales(num_layers):
    """Official ARMHuBERT `layer_grad_scale` factors m_i = (N - i) / (N + 1 - i), i = 0..N-1 (0-based):
    12/13, 11/12, ..., 1/2 for N = 12. After layer i the output x_i is replaced by GradMultiply(x_i, m_i),
    which feeds layer i + 1, and layer i's head reads GradMultiply(that, 1 - m_i). The head's copy is
    built on the already scaled tensor (as the official code), so the gradient reaching x_i is
    m_i * (gradient from above) + m_i * (1 - m_i) * (gradient from head i)."""
    return [(num_layers - i) / (num_layers + 1 - i) for i in range(num_layers)]


def init_bert_params(module):
    """fairseq's init_bert_params, as the official ARMHuBERT code and s3prl apply it to the transformer
    encoder only: every Linear weight N(0, 0.02), zero bias. (The conv front end gets fairseq's
    kaiming-normal kernels in Student.__init__; the positional conv keeps its N(0, sqrt(4 / (k * D)));
    the projection, heads and mask embedding keep PyTorch's defaults, as in the official code.)"""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Student(nn.Module):
    """Every student of the four methods; `cfg.head` picks how the layers are read out.

    forward(wav, lengths, mask=None, history=None) -> (preds, frame_lengths)
      preds[j] (B, T, teacher_dim) predicts teacher layer cfg.target_layers[j].
      mask (B, T) bool: frames replaced by the learned mask embedding (ARMHuBERT, CoLLD).
      history (generator only): list of K-1 teacher layers for teacher forcing; None = free-running.
    hidden_states(wav, lengths) -> (list of (B, T, D') tensors, frame_lengths), for SUPERB-style probes:
      distilhubert: [transformer input, layer 1, ..., layer N] (dim D, heads dropped as in the paper)
      per_layer (armhubert, maskhubert, colld): the N projected layers head_i(layer i) (teacher_dim),
        as ARMHuBERT's SUPERB upstream returns them
      generator: the K generated teacher layers, free-running (teacher_dim)
    """

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        # --- conv front end, written out from cfg.conv_layers
        if cfg.conv_norm not in ("group_norm", "layer_norm"):
            raise ValueError(f"conv_norm={cfg.conv_norm!r}: expected 'group_norm' or 'layer_norm'")
        blocks, c_in = [], 1
        for i, (c, k, s) in enumerate(cfg.conv_layers):
            if cfg.conv_norm == "layer_norm":
                norm = nn.LayerNorm(c)
            else:  # "group_norm": fairseq's GroupNorm(C, C) after the first conv only
                norm = nn.GroupNorm(c, c) if i == 0 else None
            blocks.append(ConvBlock(c_in, c, k, s, cfg.conv_bias, norm))
            c_in = c
        self.conv_layers = nn.ModuleList(blocks)
        C = c_in
        if cfg.feature_projection:
            # choice: a LayerNorm on the conv features before the projection, as HuBERT (teacher-initialised
            # students copy the teacher's); s3prl's DistilHuBERT has none and feeds raw features to the copy
            self.feature_norm = nn.LayerNorm(C)
            self.feature_proj = nn.Linear(C, D)
        else:
            if C != D:
                raise ValueError(f"feature_projection=False needs the last conv to have dim={D} channels, got {C}")
            self.feature_norm = nn.LayerNorm(D)
            self.feature_proj = None
        self.mask_emb = nn.Parameter(torch.empty(D).uniform_()) if cfg.mask_embedding else None
        # --- convolutional positional embedding (weight norm over the kernel axis, as fairseq)
        pos_conv = nn.Conv1d(D, D, cfg.pos_conv_kernel, padding=cfg.pos_conv_kernel // 2, groups=cfg.pos_conv_groups)
        nn.init.normal_(pos_conv.weight, mean=0.0, std=math.sqrt(4.0 / (cfg.pos_conv_kernel * D)))
        nn.init.zeros_(pos_conv.bias)
        self.pos_conv = nn.utils.parametrizations.weight_norm(pos_conv, name="weight", dim=2)
        self.pos_norm = None if cfg.layer_norm_first else nn.LayerNorm(D)  # pre-LN models normalise in the blocks
        # --- transformer layers; with reuse="alternate" layers 2, 4, ... (1-based) reuse
        if cfg.reuse not in ("none", "alternate"):
            raise ValueError(f"reuse={cfg.reuse!r}: expected 'none' or 'alternate'")
        self.reuses = [cfg.reuse == "alternate" and i % 2 == 1 for i in range(cfg.num_layers)]  # 0-based i
        self.layers = nn.ModuleList(TransformerLayer(cfg, reuse=r) for r in self.reuses)
        # --- heads
        K, Dt = len(cfg.target_layers), cfg.teacher_dim
        if cfg.head == "distilhubert":
            # s3prl: shared Linear(D -> K * Dt) + GELU, then K independent Linear(Dt -> Dt)
            self.pred_shared = nn.Linear(D, K * Dt)
            self.pred_split = nn.ModuleList(nn.Linear(Dt, Dt) for _ in range(K))
        elif cfg.head == "per_layer":
            if K != cfg.num_layers:
                raise ValueError(f"per_layer heads need one target per layer: {K} targets, {cfg.num_layers} layers "
                                 "(build with a teacher, model.build_student(preset, teacher), or set target_layers)")
            self.heads = nn.ModuleList(nn.Linear(D, Dt) for _ in range(cfg.num_layers))
        elif cfg.head == "generator":
            self.slot_emb = nn.Parameter(torch.randn(K, D) * 0.02)  # learned embedding of slot 0..K-1
            # choice: teacher layers enter history slots unchanged when widths match, else via a Linear
            self.history_proj = nn.Linear(Dt, D) if Dt != D else None
            # choice: one output projection per generated layer (like DistilHuBERT's split heads)
            self.out_proj = nn.ModuleList(nn.Linear(D, Dt) for _ in range(K))
        else:
            raise ValueError(f"head={cfg.head!r}: expected 'distilhubert', 'per_layer' or 'generator'")
        if cfg.init == "bert":
            self.layers.apply(init_bert_params)
            for block in self.conv_layers:  # fairseq ConvFeatureExtractionModel
                nn.init.kaiming_normal_(block.conv.weight)
        elif cfg.init != "pytorch":
            raise ValueError(f"init={cfg.init!r}: expected 'bert' or 'pytorch'")

    # --- front end: wav -> features -> transformer input X0
    def cnn_features(self, wav, lengths):
        """(B, T, C) conv features and frame_lengths (the `cnn:` floor in eval.py)."""
        if self.cfg.normalize_waveform:
            wav = standardize_waveform(wav.float(), lengths).to(wav.dtype)
        return conv_front_end(self.conv_layers, wav, lengths)

    def front_end(self, wav, lengths, mask=None):
        """X0 (B, T, D), pad (B, T) bool, frame_lengths (B,)."""
        features, frame_lengths = self.cnn_features(wav, lengths)  # (B, T, C)
        if self.cfg.feature_grad_mult != 1.0:
            features = ScaleGrad.apply(features, self.cfg.feature_grad_mult)  # (fairseq feature_grad_mult)
        x = self.feature_norm(features)
        if self.feature_proj is not None:
            x = self.feature_proj(x)  # (B, T, D)
        x = F.dropout(x, self.cfg.input_dropout, self.training)
        if mask is not None:
            if self.mask_emb is None:
                raise ValueError("this student has no mask embedding (mask_embedding=False) but got a mask")
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)  # masked frames -> learned vector
        pad = padding_mask(frame_lengths, x.shape[1])  # (B, T)
        x = x.masked_fill(pad[..., None], 0.0)  # padded frames must not enter the positional conv
        pos = self.pos_conv(x.transpose(1, 2))  # (B, D, T + 1) for an even kernel
        pos = pos[..., : x.shape[1]]  # drop the extra frame of the even kernel: (B, D, T)
        x = x + F.gelu(pos).transpose(1, 2)  # (B, T, D)
        if self.pos_norm is not None:
            x = self.pos_norm(x)
        x = F.dropout(x, self.cfg.dropout, self.training)
        return x, pad, frame_lengths

    # --- encoder: the transformer layers with attention-map reuse
    def encode(self, x, pad):
        """Run the layers over time; returns the N layer outputs, each (B, T, D)."""
        allowed = ~pad[:, None, None, :]  # (B, 1, 1, T): every query may look at every valid key
        scales = layer_grad_scales(len(self.layers)) if self.cfg.layer_grad_scale else None
        hiddens, attn = [], None
        for i, layer in enumerate(self.layers):
            next_reuses = i + 1 < len(self.layers) and self.reuses[i + 1]
            x, attn = layer(x, allowed, prev_attn=attn, need_attn=next_reuses)
            if scales is None:
                hiddens.append(x)
            else:  # same values, gradients rescaled exactly as the official code (layer_grad_scales)
                x = ScaleGrad.apply(x, scales[i])  # feeds layer i + 1
                hiddens.append(ScaleGrad.apply(x, 1.0 - scales[i]))  # feeds head i, built on the scaled x
        return hiddens

    # --- GenDistiller generator (SPEC 4)
    def embed_history(self, layer):
        """A teacher (or generated) layer (B, T, Dt) as a generator slot input (B, T, D)."""
        return layer if self.history_proj is None else self.history_proj(layer)

    def run_generator(self, slots, pad):
        """One parallel pass of the generator over S slots.

        slots: list of S inputs (B, T, D): slot 0 = X0, slot k = history for step k+1.
        Token (k, t) attends to (k', t') iff k' <= k and t' is valid: causal over layers,
        bidirectional over time. Returns the S outputs (B, T, D), skip connection included.
        """
        S = len(slots)
        B, T, D = slots[0].shape
        inputs = torch.stack(slots, dim=1)  # (B, S, T, D)
        x = (inputs + self.slot_emb[:S, None, :]).reshape(B, S * T, D)  # (B, S*T, D): slot-major tokens
        slot_of = torch.arange(S, device=x.device).repeat_interleave(T)  # (S*T,) slot of each token
        causal = slot_of[None, :] <= slot_of[:, None]  # (S*T, S*T): query row, key column
        allowed = causal[None, None] & ~pad.repeat(1, S)[:, None, None, :]  # (B, 1, S*T, S*T)
        for layer in self.layers:
            x, _ = layer(x, allowed)
        return list((x.view(B, S, T, D) + inputs).unbind(dim=1))  # skip: each slot's input added back

    def generate(self, x0, pad, history=None):
        """Predict the K target layers; teacher-forced when `history` is given, else free-running."""
        K = len(self.cfg.target_layers)
        if history is not None:  # training with teacher forcing: all K steps in one parallel pass
            if len(history) != K - 1:
                raise ValueError(f"generator needs {K - 1} history layers, got {len(history)}")
            outs = self.run_generator([x0] + [self.embed_history(h) for h in history], pad)
            return [proj(o) for proj, o in zip(self.out_proj, outs)]
        preds, slots = [], [x0]
        for k in range(K):  # free-running: slot k's output predicts layer k+1, then is fed back
            outs = self.run_generator(slots, pad)
            preds.append(self.out_proj[k](outs[k]))  # (B, T, Dt)
            slots.append(self.embed_history(preds[-1]))
        return preds

    def forward(self, wav, lengths, mask=None, history=None):
        x, pad, frame_lengths = self.front_end(wav, lengths, mask)
        if self.cfg.head == "generator":
            return self.generate(x, pad, history), frame_lengths
        hiddens = self.encode(x, pad)
        if self.cfg.head == "distilhubert":
            B, T, _ = hiddens[-1].shape
            K, Dt = len(self.pred_split), self.cfg.teacher_dim
            shared = F.gelu(self.pred_shared(hiddens[-1])).view(B, T, K, Dt)  # (B, T, K, Dt)
            return [split(shared[:, :, j]) for j, split in enumerate(self.pred_split)], frame_lengths
        return [head(h) for head, h in zip(self.heads, hiddens)], frame_lengths

    def hidden_states(self, wav, lengths):
        x, pad, frame_lengths = self.front_end(wav, lengths)
        if self.cfg.head == "generator":
            return self.generate(x, pad), frame_lengths
        hiddens = self.encode(x, pad)
        if self.cfg.head == "distilhubert":
            return [x] + hiddens, frame_lengths
        return [head(h) for head, h in zip(self.heads, hiddens)], frame_lengths


def build_student(preset_or_cfg, teacher=None, **overrides):
    """A Student from a preset name or config, fitted to `teacher` when given."""
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in PRESETS:
            raise ValueError(f"unknown student preset {preset_or_cfg!r}; choose from {', '.join(PRESETS)}")
        cfg = PRESETS[preset_or_cfg]
    else:
        cfg = preset_or_cfg
    cfg = replace(cfg, **overrides)
    if teacher is not None:
        cfg, _ = fit_to_teacher(cfg, teacher)
    return Student(cfg)


# ----------------------------------------------------------------------------
# 4. Initialisation from the teacher, saving and loading
# ----------------------------------------------------------------------------

def teacher_to_student_keys(teacher, num_layers):
    """Student key -> teacher key for the parts DistilHuBERT copies (and GenDistiller, choice)."""
    t = teacher.model
    keys = {}
    for i, block in enumerate(t.feature_extractor.conv_layers):
        for name, _ in block.named_parameters():
            keys[f"conv_layers.{i}.{name}"] = f"feature_extractor.conv_layers.{i}.{name}"
    keys.update({
        "feature_norm.weight": "encoder.feature_projection.layer_norm.weight",
        "feature_norm.bias": "encoder.feature_projection.layer_norm.bias",
        "feature_proj.weight": "encoder.feature_projection.projection.weight",
        "feature_proj.bias": "encoder.feature_projection.projection.bias",
        "pos_conv.bias": "encoder.transformer.pos_conv_embed.conv.bias",
        "pos_conv.parametrizations.weight.original0": "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0",
        "pos_conv.parametrizations.weight.original1": "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1",
    })
    if not teacher.config["encoder_layer_norm_first"]:  # post-LN: the LayerNorm after the pos conv
        keys["pos_norm.weight"] = "encoder.transformer.layer_norm.weight"
        keys["pos_norm.bias"] = "encoder.transformer.layer_norm.bias"
    for i in range(num_layers):
        s, tl = f"layers.{i}.", f"encoder.transformer.layers.{i}."
        for p in ("weight", "bias"):
            for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
                keys[f"{s}attention.{n}.{p}"] = f"{tl}attention.{n}.{p}"
            keys[f"{s}layer_norm.{p}"] = f"{tl}layer_norm.{p}"
            keys[f"{s}fc1.{p}"] = f"{tl}feed_forward.intermediate_dense.{p}"
            keys[f"{s}fc2.{p}"] = f"{tl}feed_forward.output_dense.{p}"
            keys[f"{s}final_layer_norm.{p}"] = f"{tl}final_layer_norm.{p}"
    return keys


@torch.no_grad()
def init_from_teacher(student, teacher):
    """Copy the teacher's conv, projection, positional conv and first layers into the student.

    DistilHuBERT (SPEC 1) does this; GenDistiller's front end and generator layers too (choice).
    Raises if any copied tensor does not fit, listing every mismatch.
    """
    if teacher.is_wavlm:
        raise ValueError("init_from_teacher copies HuBERT-style layers; WavLM attention differs "
                         "(gated relative position bias). Pass --init_from_teacher=false.")
    mapping = teacher_to_student_keys(teacher, min(student.cfg.num_layers, teacher.num_layers))
    return copy_from_teacher(student, teacher, mapping, "init_from_teacher: student and teacher shapes")


@torch.no_grad()
def init_conv_from_teacher(student, teacher):
    """Copy only the teacher's conv front end and the LayerNorm on its features (kit recipe for
    scratch students: --init_conv_from_teacher=true). The projection to the student's width, the
    positional conv and the layers stay as initialised. Returns the copied student keys."""
    mapping = {s: t for s, t in teacher_to_student_keys(teacher, 0).items()
               if s.startswith(("conv_layers.", "feature_norm."))}
    return copy_from_teacher(student, teacher, mapping, "init_conv_from_teacher: student and teacher conv shapes")


@torch.no_grad()
def copy_from_teacher(student, teacher, mapping, what):
    """Copy teacher tensors into the student by `mapping` (student key -> teacher key), after checking
    every shape; raises "`what` do not fit", listing the mismatches. Returns the copied student keys."""
    s_state, t_state = student.state_dict(), teacher.model.state_dict()
    bad = [f"{s} {tuple(s_state[s].shape) if s in s_state else 'missing'} <- {t} "
           f"{tuple(t_state[t].shape) if t in t_state else 'missing'}"
           for s, t in mapping.items() if s not in s_state or t not in t_state or s_state[s].shape != t_state[t].shape]
    if bad:
        raise ValueError(f"{what} do not fit:\n  " + "\n  ".join(bad[:20]))
    for s, t in mapping.items():
        s_state[s].copy_(t_state[t])
    return sorted(mapping)


def load_student(path, device="cpu"):
    """A Student (eval mode) from a distill.py checkpoint: the config travels with the weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "student" not in ckpt:
        raise ValueError(f"{path}: not a distill.py checkpoint (expected keys 'config' and 'student')")
    student = Student(config_from_dict(ckpt["config"]))
    student.load_state_dict(ckpt["student"])
    return student.to(device).eval()


# Fields added in 2026-12 (issue 9), with the behaviour a checkpoint written before them had.
LEGACY_CONFIG = dict(init="pytorch", feature_grad_mult=1.0, layer_grad_scale=False, init_conv_from_teacher=False,
                     normalize_waveform=False)


def config_from_dict(d):
    """StudentConfig from its asdict() form (tuples come back as lists from a checkpoint).
    A checkpoint written before a field existed gets the behaviour it was trained with."""
    d = {**LEGACY_CONFIG, "reuse_attention_dropout": d.get("attention_dropout", 0.1), **d}
    d["conv_layers"] = [tuple(c) for c in d["conv_layers"]]
    d["target_layers"] = tuple(d["target_layers"])
    return StudentConfig(**d)


def config_to_dict(cfg):
    return asdict(cfg)


# ----------------------------------------------------------------------------
# 5. Parameters and MACs
# ----------------------------------------------------------------------------

def head_parameter_names(student):
    """Names of parameters that exist only for distillation and are dropped afterwards.

    Only DistilHuBERT's prediction heads are dropped (SPEC 1). ARMHuBERT/CoLLD per-layer heads
    stay in the deployed model (its upstream returns projected layers), and so do the
    generator's output projections (they produce GenDistiller's output).
    """
    return [n for n, _ in student.named_parameters() if n.startswith(("pred_shared.", "pred_split."))]


def count_parameters(student, with_heads=True):
    drop = set() if with_heads else set(head_parameter_names(student))
    return sum(p.numel() for n, p in student.named_parameters() if n not in drop)


def count_macs(cfg: StudentConfig, seconds=10.0, with_heads=True):
    """Multiply-accumulates of one forward pass on `seconds` of audio, from the architecture.

    Counted: every conv, Linear and attention matmul (QK^T and AV). Not counted: norms,
    activations, softmax, additions, biases (small and the same for every model).
    The generator counts free-running inference (K passes over 1..K slots, full S*T x S*T
    attention as the code computes it); DistilHuBERT's heads are excluded when with_heads=False.
    """
    T, c_in, macs = int(seconds * SAMPLE_RATE), 1, 0
    for c, k, s in cfg.conv_layers:
        T = (T - k) // s + 1
        macs += T * c * c_in * k
        c_in = c
    D, F_, K = cfg.dim, cfg.ffn_dim, len(cfg.target_layers)
    if cfg.feature_projection:
        macs += T * c_in * D
    macs += T * D * (D // cfg.pos_conv_groups) * cfg.pos_conv_kernel

    def layer_macs(tokens, reuse):
        proj = (2 if reuse else 4) * tokens * D * D  # V, out (+ Q, K)
        attn = (1 if reuse else 2) * tokens * tokens * D  # AV (+ QK^T)
        return proj + attn + 2 * tokens * D * F_

    if cfg.head == "generator":
        for S in range(1, K + 1):  # free-running step S runs the generator over S slots
            macs += sum(layer_macs(S * T, False) for _ in range(cfg.num_layers))
            macs += (S - 1) * T * cfg.teacher_dim * D if cfg.teacher_dim != D else 0  # history_proj
        macs += K * T * D * cfg.teacher_dim  # output projections
        return macs
    reuses = [cfg.reuse == "alternate" and i % 2 == 1 for i in range(cfg.num_layers)]
    macs += sum(layer_macs(T, r) for r in reuses)
    if with_heads and cfg.head == "per_layer":
        macs += cfg.num_layers * T * D * cfg.teacher_dim
    if with_heads and cfg.head == "distilhubert":
        macs += T * D * K * cfg.teacher_dim + K * T * cfg.teacher_dim ** 2
    return macs


# HuBERT Base as a config of the same family, for its MACs (its parameters are counted on
# torchaudio's own model). The papers' 94.70M is the fairseq model: torchaudio's encoder
# plus mask_emb (768), final_proj (768 x 256 + 256) and the label embeddings (504 x 256).
HUBERT_BASE = StudentConfig(num_layers=12, head="per_layer", target_layers=tuple(range(1, 13)))
HUBERT_BASE_FAIRSEQ_EXTRA = 768 + (768 * 256 + 256) + 504 * 256


def main():
    import torchaudio

    hubert = torchaudio.models.hubert_base()  # random weights: only the count is needed
    hubert_params = sum(p.numel() for p in hubert.parameters())
    hubert_paper = hubert_params + HUBERT_BASE_FAIRSEQ_EXTRA
    hubert_macs = count_macs(HUBERT_BASE, with_heads=False)

    base = bundle_description("hubert_base")  # a HuBERT Base-sized teacher, for fit_to_teacher
    print("Students fitted to a HuBERT Base teacher (768-d, 12 layers). MACs: one forward on 10 s of audio.")
    print("% of HuBERT Base uses the papers' 94.70M (fairseq count) and HuBERT Base's MACs from the same formula.")
    print(f"{'model':<14}{'params (M)':>11}{'paper (M)':>10}  {'counted':<24}{'GMACs/10s':>10}{'params %':>10}{'MACs %':>8}")
    for name in PRESETS:
        student = build_student(name, base)
        paper, what = PAPER_PARAMS[name]
        with_heads = what != "without prediction heads"
        n = count_parameters(student, with_heads=with_heads)
        m = count_macs(student.cfg, with_heads=with_heads)
        paper_s = f"{paper:.2f}" if paper else "-"
        print(f"{name:<14}{n / 1e6:>11.2f}{paper_s:>10}  {what:<24}{m / 1e9:>10.2f}"
              f"{100 * n / hubert_paper:>9.1f}%{100 * m / hubert_macs:>7.1f}%")
    print(f"{'hubert_base':<14}{hubert_params / 1e6:>11.2f}{hubert_paper / 1e6:>10.2f}  "
          f"{'torchaudio; paper=fairseq':<24}{hubert_macs / 1e9:>10.2f}{100 * hubert_params / hubert_paper:>9.1f}%{100.0:>7.1f}%")


if __name__ == "__main__":
    main()
