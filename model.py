"""The networks of the project, in plain PyTorch, in reading order (method reference: ../shared/SPEC.md).

  1. conventions: layer index, the conv front end both teacher and student run        SPEC 0
  2. the student, the subject of the papers: one config, a front end, the transformer with
     ARMHuBERT's attention-map reuse (Recycle-and-Distill, Jang et al. 2023), the presets  SPEC 1-3
  3. heads and the GenDistiller generator (Gao et al. 2023, 2024): DistilHuBERT's shared + split
     heads, per-layer heads (ARMHuBERT, CoLLD), and a generator that emits the teacher's
     layers one after another, causal across layers and bidirectional across time      SPEC 1-4
     (student layers are WavLM layers, gated relative position bias, when copied from WavLM)
  4. building a student: which teacher layer each output targets, fitting a preset to a
     teacher, the one builder (distill.py, eval.py and load_student use it), loading
  5. the frozen teacher: torchaudio bundles, torchaudio-format files, s3prl-converted and
     fairseq checkpoints (also as released, without fairseq), Hugging Face model folders,
     random teachers (`tiny`), all through one code path
  6. initialisation from the teacher (DistilHuBERT copies its first layers)
  7. parameter and MAC counting, and the table printed by `python model.py`
  8. export: a DistilHuBERT student as a Hugging Face HubertModel folder (`python model.py export-hf`)

Frame counts and padding follow data.py's conventions: data.frame_count is the one frame
formula, data.valid_frames (True on real frames) the one padding mask.

Example:
    python model.py            # one row per preset: parameters, paper figure, MACs
    python model.py export-hf runs/distilhubert-hubert_base/ckpt-00200000.pt distilhubert-hf/
"""
import ast
import contextlib
import math
import re
import types
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# ----------------------------------------------------------------------------
# 1. Conventions shared by every method (SPEC section 0)
#
# Layer index: "teacher layer k" (k = 1..L) is the output of transformer block k,
# exactly what torchaudio's Wav2Vec2Model.extract_features returns at list index k - 1
# and what HF / s3prl call hidden_states[k]. Python lists in this project are 0-based,
# so teacher layer k is `layers[k - 1]`. Index 0 of HF/s3prl (the transformer input)
# is never a distillation target. test_all.py checks this against torchaudio.
#
# Frames and padding (data.py): an utterance of L samples gives data.frame_count(L) frames;
# every network returns `frame_lengths` and no padded frame influences a valid frame of a
# student (the conv GroupNorm is masked, padded keys are masked in attention, padded frames
# are zeroed before the positional convolution). test_all.py checks that a padded batch
# equals per-utterance runs on the valid frames.
# ----------------------------------------------------------------------------


def masked_instance_norm(x, lengths, norm):
    """GroupNorm(C, C) over time that ignores padded steps: each utterance normalised over its own
    valid steps. x: (B, C, T), lengths: (B,) valid steps. fairseq/torchaudio normalise over the padded
    tail too, which makes a short utterance's features depend on what it was batched with; statistics
    over valid steps only make a padded batch equal to single runs. Padded steps come out as zeros.
    note: one F.group_norm per utterance (one call when nothing is padded) replaces masked sums that
    passed over the largest tensor of the network about nine times (tested equal to them).
    """
    dtype, T = x.dtype, x.shape[-1]
    x = x.float()  # statistics in float32 even under autocast, as nn.GroupNorm
    lengths = lengths.tolist()
    if all(n == T for n in lengths):
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps).to(dtype)
    out = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        if n > 0:
            out[b, :, :n] = F.group_norm(x[b:b + 1, :, :n], norm.num_groups, norm.weight, norm.bias, norm.eps)[0]
    return out.to(dtype)


def standardize_waveform(wav, lengths):
    """Per-utterance zero mean, unit variance over the valid samples (what Large / XLS-R teachers
    were trained on; fairseq `normalize: True`). wav (B, S), lengths (B,) samples."""
    valid = data.valid_frames(lengths, wav.shape[1]).float()  # (B, S): valid samples
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
        conv = block.conv
        lengths = data.frame_count(lengths, [(conv.out_channels, conv.kernel_size[0], conv.stride[0])])
        norm = block.layer_norm
        if isinstance(norm, nn.GroupNorm):
            # note: the HuBERT GroupNorm has one group per channel, i.e. instance norm over time
            assert norm.num_groups == norm.num_channels, "only GroupNorm(C, C) is supported"
            x = masked_instance_norm(x, lengths, norm)
        elif norm is not None:  # per-frame LayerNorm over channels: padding cannot leak
            x = F.layer_norm(x.transpose(1, 2), norm.normalized_shape, norm.weight, norm.bias, norm.eps).transpose(1, 2)
        x = F.gelu(x)
    return x.transpose(1, 2), lengths  # (B, T, C), (B,)


# ----------------------------------------------------------------------------
# 2. The student (SPEC 1-3)
#
# Recycle-and-Distill (ARMHuBERT, Sec. 3.1), layer l = 1..N, H heads of width d_h, x = layer input:
#   A_l = softmax(x W_Q,l (x W_K,l)^T / sqrt(d_h))   for odd l (and every l with reuse="none")
#   A_l = A_{l-1}                                     for even l: the layer has no W_Q, W_K
#   MHSA_l(x) = concat_h(A_l^h x W_V,l^h) W_O,l
# Everything else is a wav2vec 2.0 / HuBERT encoder: conv front end, feature projection,
# convolutional positional embedding, post-LN (or pre-LN) blocks. DistilHuBERT and CoLLD
# students are the same network without reuse; GenDistiller shares the front end (section 3).
#
# WavLM layers (Chen et al. 2022, arXiv 2110.13900, "gated relative position bias"), used when a
# student copies a WavLM teacher's layers:
#   A = softmax(q k^T / sqrt(d_h) + g(x) * r(t' - t)),  per head,
#   r: one learned value per head and bucket of the offset t' - t (the first layer's embedding,
#      handed to every layer), buckets exact for small offsets, log-spaced up to max_distance;
#   g(x) = a (b c - 1) + 2, (a, b) = sigmoid of sums of W_g x_h (x_h: the layer input's head slice),
#      c a learned constant per head: each layer gates the shared bias by its own input.
# ----------------------------------------------------------------------------

# ARMHuBERT's conv (official code): narrower, the 1x1 convs only change channel counts, so
# stride (320) and receptive field (400) are HuBERT's. The last two need channels == dim.
def armhubert_conv(dim):
    return [(128, 10, 5), (256, 1, 1)] + [(256, 3, 2)] * 4 + [(dim, 1, 1)] + [(dim, 2, 2)] * 2


@dataclass
class StudentConfig:
    """Every student of the four methods, as one flat record: the command line sets any field with
    --FIELD=VALUE and checkpoints carry it. `head` picks the network: "distilhubert" and "per_layer"
    build a Student, "generator" a GenDistiller (its generator config is derived from these fields)."""
    # front end
    conv_layers: List[Tuple[int, int, int]] = field(default_factory=lambda: list(data.HUBERT_CONV))  # (channels, kernel, stride)
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
    # kaiming-normal conv kernels; "pytorch": nn defaults there (this project's earlier checkpoints); the
    # positional conv and mask embedding keep their fairseq inits in both
    init: str = "bert"
    # WavLM's gated relative position bias (section 2): buckets of the first layer's relative position
    # embedding (0 = none, HuBERT / wav2vec 2.0; WavLM: 320) and the distance of the last bucket (800 frames).
    # fit_to_teacher sets them when a teacher-initialised student copies a WavLM teacher.
    rel_pos_buckets: int = 0
    rel_pos_max_distance: int = 800
    fused_attention: bool = True  # scaled_dot_product_attention where no map is needed; False = explicit path
    official_reuse: bool = False  # re-apply softmax to the reused map like the official code (to load its checkpoints)
    # heads (section 3): "distilhubert" (shared + split heads on the last layer), "per_layer" (one
    # Linear per layer), "generator" (GenDistiller: the layers run as a generator over K slots x T frames)
    head: str = "per_layer"
    # GenDistiller (section 3): the earlier slots a slot may attend to: "all" (2310.13418's two-dimensional
    # attention, causal over layers) or "previous" (2406.09444: "takes the previous hidden layer as history";
    # per block, so a generator of N blocks reaches N slots back)
    gen_history: str = "all"
    gen_shared_proj: bool = True  # one output projection for every generated layer; False: one per layer
    teacher_dim: int = 768
    target_layers: Tuple[int, ...] = ()  # teacher layer (1-based) predicted by each output; set by fit_to_teacher
    # per_layer heads: the student layer (1-based) each head reads, one per target; () = head i on layer i.
    # Set by fit_to_teacher.
    head_layers: Tuple[int, ...] = ()
    # per_layer heads: predict every teacher layer (CoLLD, as its first author describes it: USAD,
    # arXiv 2506.18843, Sec. III-A), not only one per student layer (rule: target_layers_for)
    every_teacher_layer: bool = False
    init_from_teacher: bool = False  # copy conv, projection, pos conv and the first layers from the teacher
    # copy only the teacher's conv front end and its LayerNorm (the student keeps its own width, a
    # Linear(C -> dim) projection is added); kit recipe for scratch students, not in the papers
    # (ignored when init_from_teacher copies the whole front end anyway)
    init_conv_from_teacher: bool = False
    # standardise each utterance before the conv: set by fit_to_teacher when the conv comes from a
    # teacher that expects it (Large / XLS-R models)
    normalize_waveform: bool = False


class ConvBlock(nn.Module):
    """One conv of the front end; `.conv` / `.layer_norm` named as torchaudio's so conv_front_end runs both."""

    def __init__(self, c_in, c_out, kernel, stride, bias, norm):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = norm  # GroupNorm(C, C), LayerNorm(C) or None


# POS_CONV_FP32: the positional conv (one conv, a few % of the MACs) always runs in float32, also under
# autocast: PyTorch's CPU bf16 grouped conv1d returns wrong values (errors ~100 %) for some groups of
# fewer than 16 channels (seen with torch 2.11, e.g. 192-d / 16 groups, the kit teacher's shape).
class FrontEnd(nn.Module):
    """wav -> X0, the transformer input: conv stack, feature LayerNorm (+ projection), input dropout,
    mask embedding, convolutional positional embedding. Shared by Student and GenDistiller.

    forward(wav, lengths, mask=None) -> (x0 (B, T, D), valid (B, T) bool, frame_lengths (B,))
    """

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        # --- conv stack, written out from cfg.conv_layers
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

    def cnn_features(self, wav, lengths):
        """(B, T, C) conv features and frame_lengths (the `cnn:` floor in eval.py)."""
        if self.cfg.normalize_waveform:
            wav = standardize_waveform(wav.float(), lengths).to(wav.dtype)
        return conv_front_end(self.conv_layers, wav, lengths)

    def forward(self, wav, lengths, mask=None):
        features, frame_lengths = self.cnn_features(wav, lengths)  # (B, T, C)
        if self.cfg.feature_grad_mult != 1.0:
            features = ScaleGrad.apply(features, self.cfg.feature_grad_mult)  # (fairseq feature_grad_mult)
        x = self.feature_norm(features)
        if self.feature_proj is not None:
            x = self.feature_proj(x)  # (B, T, D)
        x = dropout(x, self.cfg.input_dropout, self.training)
        if mask is not None:
            if self.mask_emb is None:
                raise ValueError("this student has no mask embedding (mask_embedding=False) but got a mask")
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)  # masked frames -> learned vector
        valid = data.valid_frames(frame_lengths, x.shape[1])  # (B, T)
        x = x.masked_fill(~valid[..., None], 0.0)  # padded frames must not enter the positional conv
        with torch.autocast(x.device.type, enabled=False):  # see POS_CONV_FP32
            pos = self.pos_conv(x.float().transpose(1, 2)).to(x.dtype)  # (B, D, T + 1) for an even kernel
        pos = pos[..., : x.shape[1]]  # drop the extra frame of the even kernel: (B, D, T)
        x = x + F.gelu(pos).transpose(1, 2)  # (B, T, D)
        if self.pos_norm is not None:
            x = self.pos_norm(x)
        x = dropout(x, self.cfg.dropout, self.training)
        return x, valid, frame_lengths


class SelfAttention(nn.Module):
    """Multi-head self-attention; a reuse layer (ARMHuBERT) has no query/key projections.

    forward(x, allowed, prev_attn, need_attn) -> (out, attn)
      x (B, T, D); allowed: bool, broadcastable to (B, H, T, T), True where query t may look at
      key t' (the valid keys; for the generator also causal over slots); prev_attn (B, H, T, T):
      the previous layer's attention probabilities (reuse only). attn is returned when
      `need_attn` (the next layer reuses it), else None.
    """

    def __init__(self, dim, num_heads, dropout, reuse=False, fused=True, official_reuse=False,
                 rel_pos_buckets=0, rel_pos_max_distance=800, first=False):
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
        # WavLM (section header): the first layer owns r, every layer its gate W_g (Dh -> 8) and c.
        # Names as torchaudio's, so init_from_teacher copies them by name.
        self.rel_pos_buckets, self.rel_pos_max_distance = rel_pos_buckets, rel_pos_max_distance
        self.rel_attn_embed = nn.Embedding(rel_pos_buckets, num_heads) if rel_pos_buckets and first else None
        if rel_pos_buckets:
            self.gru_rel_pos_linear = nn.Linear(self.head_dim, 8)
            self.gru_rel_pos_const = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def relative_bias(self, q_times, k_times):
        """WavLM's r (H, Tq, Tk) for query frames q_times (Tq,) and key frames k_times (Tk,) (first layer only).
        Buckets: n/2 per direction (offset <= 0, offset > 0); within one, exact below n/4 frames, then
        log-spaced so that max_distance frames reaches the last bucket."""
        offset = k_times[None, :] - q_times[:, None]  # (Tq, Tk): t' - t
        half = self.rel_pos_buckets // 2
        exact, dist = half // 2, offset.abs()
        far = exact + (torch.log(dist.float() / exact) / math.log(self.rel_pos_max_distance / exact)
                       * (half - exact)).long()  # log(0) is never selected below
        bucket = torch.where(dist < exact, dist, far.clamp(max=half - 1)) + (offset > 0).long() * half
        return self.rel_attn_embed(bucket).permute(2, 0, 1)  # (H, Tq, Tk)

    def gated_bias(self, x, bias):
        """g(x) * r: (B, H, T, Tk) for this layer's input x (B, T, D) and the shared r (H, T, Tk)."""
        B, T, _ = x.shape
        H = self.num_heads
        g = self.gru_rel_pos_linear(x.view(B, T, H, self.head_dim))  # (B, T, H, 8)
        a, b = torch.sigmoid(g.view(B, T, H, 2, 4).sum(-1)).unbind(-1)  # (B, T, H) each
        gate = a * (b * self.gru_rel_pos_const.view(H) - 1.0) + 2.0  # (B, T, H)
        return gate.transpose(1, 2)[..., None] * bias  # (B, H, T, 1) * (H, T, Tk) -> (B, H, T, Tk)

    def forward(self, x, allowed, prev_attn=None, need_attn=False, cache=None, bias=None):
        B, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        p = self.dropout if self.training else 0.0
        if bias is not None:  # WavLM: the mask becomes additive, g(x) * r on allowed keys
            allowed = self.gated_bias(x, bias).masked_fill(~allowed, torch.finfo(x.dtype).min)  # (B, H, T, Tk)
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        if self.reuse:
            # Recycle-and-Distill: A_l = A_{l-1}, the previous layer's softmax probabilities for the
            # same sample and head, used as they are (no renormalisation); gradients flow into the
            # previous layer's Q/K through it.
            attn = prev_attn  # (B, H, T, T)
            if self.official_reuse:
                # note: the official code applies softmax a second time to the already normalised map,
                # padded keys masked to -inf first (so they stay at weight 0); kept only to reproduce
                # its released checkpoints (SPEC 2)
                attn = attn.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        else:
            q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            k = self.k_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
            if cache is not None:
                # GenDistiller free-running (Generator.forward): the keys and values of the earlier
                # slots, which never change, come first; T' = all cached tokens + these T
                if cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, T', Dh)
                cache["k"], cache["v"] = k, v
            # fast path, tested equal to the explicit one below. note: on a CPU, SDPA with dropout takes
            # a slow path; there the explicit path with `dropout` below is faster
            if self.fused and not need_attn and (p == 0.0 or x.device.type != "cpu"):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, H, T, Dh)
                return self.out_proj(out.transpose(1, 2).reshape(B, T, D)), None
            # subtle: q is scaled before the product (as fairseq): under fp16, q k^T of large activations
            # overflows 65504 before a later division could bring it back
            scores = (q * Dh ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T')
            if allowed.dtype == torch.bool:
                scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            else:  # WavLM's additive mask (above)
                scores = scores + allowed
            attn = scores.softmax(dim=-1)  # (B, H, T, T'), each row sums to 1 over allowed keys
        # dropout acts on a copy; the map handed to the next (reuse) layer is the clean, pre-dropout
        # probability (the paper says "the attention map"; the official code hands on the pre-dropout one)
        out = dropout(attn, p) @ v  # (B, H, T, Dh); p = 0 outside training
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(out), (attn if need_attn else None)


def dropout(x, p, training=True):
    """Inverted dropout, x * Bernoulli(1 - p) / (1 - p), as F.dropout, in its fastest form here.
    note: on a CPU this form (uniform >= p, one multiply) was faster forward + backward than
    F.dropout's Bernoulli sampler in a micro-benchmark (same distribution,
    another random stream); on a GPU F.dropout's fused kernel."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = (torch.rand_like(x) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * keep


class TransformerLayer(nn.Module):
    """A wav2vec 2.0 / HuBERT encoder block, post-LN (Base) or pre-LN (Large). `cfg` is a StudentConfig
    or a GeneratorConfig (sizes, dropouts, layer order); `attention_dropout` is this layer's own."""

    def __init__(self, cfg, attention_dropout, reuse=False, official_reuse=False, first=False):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.attention = SelfAttention(cfg.dim, cfg.num_heads, attention_dropout, reuse, cfg.fused_attention,
                                       official_reuse, cfg.rel_pos_buckets, cfg.rel_pos_max_distance, first)
        self.layer_norm = nn.LayerNorm(cfg.dim)  # after attention (post-LN) / before it (pre-LN)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def ffn(self, x):
        x = dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)  # (B, T, F)
        return dropout(self.fc2(x), self.dropout, self.training)  # (B, T, D)

    def forward(self, x, allowed, prev_attn=None, need_attn=False, cache=None, bias=None):
        residual = x
        if self.layer_norm_first:
            x = self.layer_norm(x)
        x, attn = self.attention(x, allowed, prev_attn, need_attn, cache, bias)
        x = residual + dropout(x, self.dropout, self.training)
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
    encoder only: every Linear weight N(0, 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_weights(cfg, front_end, layers):
    """fairseq's initialisation, applied once the whole network exists (as fairseq does): init "bert"
    gives the transformer `layers` init_bert_params and the conv kernels kaiming-normal; the positional
    conv keeps its N(0, sqrt(4 / (k * D))), the mask embedding its U(0, 1) and GenDistiller's slot
    embedding its N(0, 0.02); the projection and heads keep PyTorch's defaults, as in the official
    code. init "pytorch" keeps nn defaults for the Linears and conv kernels."""
    if cfg.init == "bert":
        layers.apply(init_bert_params)
        for block in front_end.conv_layers:  # fairseq ConvFeatureExtractionModel
            nn.init.kaiming_normal_(block.conv.weight)
    elif cfg.init != "pytorch":
        raise ValueError(f"init={cfg.init!r}: expected 'bert' or 'pytorch'")


def reuse_pattern(cfg):
    """Which layers reuse the previous map: with reuse="alternate", the paper's layers 2, 4, ...
    (0-based odd i); with "none", none."""
    if cfg.reuse not in ("none", "alternate"):
        raise ValueError(f"reuse={cfg.reuse!r}: expected 'none' or 'alternate'")
    if cfg.reuse != "none" and cfg.rel_pos_buckets:
        raise ValueError("reuse='alternate' with WavLM layers (rel_pos_buckets > 0): a reused map has no "
                         "position bias of its own; set --reuse=none or --rel_pos_buckets=0")
    return [cfg.reuse == "alternate" and i % 2 == 1 for i in range(cfg.num_layers)]


def position_bias(layers, q_times, k_times):
    """WavLM: the first layer's r (H, Tq, Tk), handed to every layer (torchaudio and the WavLM code compute
    it in layer 1 and pass it on); None for HuBERT-style layers."""
    first = layers[0].attention
    return None if first.rel_attn_embed is None else first.relative_bias(q_times, k_times)


class Student(nn.Module):
    """The DistilHuBERT, ARMHuBERT, MaskHuBERT and CoLLD students: front end, N transformer layers
    (with reuse="alternate", layers 2, 4, ... reuse the previous map), heads (section 3).

    forward(wav, lengths, mask=None) -> (preds, frame_lengths)
      preds[j] (B, T, teacher_dim) predicts teacher layer cfg.target_layers[j].
      mask (B, T) bool: frames replaced by the learned mask embedding (ARMHuBERT, CoLLD).
    hidden_states(wav, lengths) -> (list of (B, T, D') tensors, frame_lengths), for SUPERB-style probes:
      distilhubert: [transformer input, layer 1, ..., layer N] (dim D, heads dropped as in the paper)
      per_layer (armhubert, maskhubert, colld): the N projected layers head_i(layer i) (teacher_dim),
        as ARMHuBERT's SUPERB upstream returns them
    """

    layers_key = "layers."  # where the transformer layers sit in the state dict (init_from_teacher)

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        if cfg.head == "generator":
            raise ValueError("head='generator' is GenDistiller: build it with GenDistiller(cfg) or model.build_student")
        self.cfg = cfg
        self.front_end = FrontEnd(cfg)
        self.reuses = reuse_pattern(cfg)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, cfg.reuse_attention_dropout if r else cfg.attention_dropout, r, cfg.official_reuse,
                             first=i == 0)
            for i, r in enumerate(self.reuses))
        if cfg.head == "distilhubert":
            self.heads = DistilHuBERTHeads(cfg.dim, cfg.teacher_dim, len(cfg.target_layers))
        elif cfg.head == "per_layer":
            self.heads = PerLayerHeads(cfg.dim, cfg.teacher_dim, cfg.head_layers or range(1, cfg.num_layers + 1),
                                       len(cfg.target_layers))
        else:
            raise ValueError(f"head={cfg.head!r}: expected 'distilhubert', 'per_layer' or 'generator'")
        init_weights(cfg, self.front_end, self.layers)

    def cnn_features(self, wav, lengths):
        return self.front_end.cnn_features(wav, lengths)

    def encode(self, x, valid):
        """Run the layers over time; returns the N layer outputs, each (B, T, D)."""
        allowed = valid[:, None, None, :]  # (B, 1, 1, T): every query may look at every valid key
        times = torch.arange(x.shape[1], device=x.device)  # (T,) frame of each token
        bias = position_bias(self.layers, times, times)  # (H, T, T) for WavLM layers, else None
        scales = layer_grad_scales(len(self.layers)) if self.cfg.layer_grad_scale else None
        hiddens, attn = [], None
        for i, layer in enumerate(self.layers):
            next_reuses = i + 1 < len(self.layers) and self.reuses[i + 1]
            x, attn = layer(x, allowed, prev_attn=attn, need_attn=next_reuses, bias=bias)
            if scales is None:
                hiddens.append(x)
            else:  # same values, gradients rescaled exactly as the official code (layer_grad_scales)
                x = ScaleGrad.apply(x, scales[i])  # feeds layer i + 1
                hiddens.append(ScaleGrad.apply(x, 1.0 - scales[i]))  # feeds head i, built on the scaled x
        return hiddens

    def forward(self, wav, lengths, mask=None):
        x, valid, frame_lengths = self.front_end(wav, lengths, mask)
        return self.heads(self.encode(x, valid)), frame_lengths

    def hidden_states(self, wav, lengths):
        x, valid, frame_lengths = self.front_end(wav, lengths)
        return self.heads.deployed(x, self.encode(x, valid)), frame_lengths


# DistilHuBERT's prediction heads target teacher layers 4, 8, 12 of 12 (GenDistiller's outputs too, choice);
# target_layers_for scales them to other depths.
DEFAULT_TARGETS = (4, 8, 12)
# Presets: the papers' numbers for a HuBERT Base teacher (768-d, 12 layers). The "gendistiller" preset
# builds a GenDistiller (section 3), the others a Student.
PRESETS = {
    # DistilHuBERT, Chang et al. 2022, Table 1 / s3prl config: 2 layers, teacher-initialised, heads -> 4, 8, 12
    # (s3prl config_model.yaml: no input dropout, feature_grad_mult 0.1)
    "distilhubert": StudentConfig(head="distilhubert", num_layers=2, mask_embedding=False,
                                  target_layers=DEFAULT_TARGETS, init_from_teacher=True, feature_grad_mult=0.1),
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
                           ffn_dim=640, num_layers=12, input_dropout=0.05, every_teacher_layer=True),
    # GenDistiller: DistilHuBERT's front end (and its settings) and ONE teacher-width generator block
    # with one shared output projection: 2406.09444's "33 % fewer parameters" than the baseline and
    # "reduces WavLM by 82 %" (README: Students and their sizes); depth, targets and history: choices
    "gendistiller": StudentConfig(head="generator", num_layers=1, mask_embedding=False,
                                  target_layers=DEFAULT_TARGETS, init_from_teacher=True, feature_grad_mult=0.1),
}
# The papers' parameter figures (millions) and what they count. GenDistiller's is derived from its
# abstract (2406.09444: "reduces the size of WavLM by 82 %"): 18 % of the 94.70M of the papers' tables.
PAPER_PARAMS = {"distilhubert": (23.49, "without prediction heads"), "armhubert": (26.45, "with heads"),
                "armhubert-s": (22.39, "with heads"), "maskhubert": (26.64, "with heads"),
                "colld": (None, "with heads"), "gendistiller": (0.18 * 94.70, "with output projection")}


# ----------------------------------------------------------------------------
# 3. Heads and the GenDistiller generator (SPEC 1, 2, 4)
#
# DistilHuBERT (Sec. 2): K heads on the last layer h_N, p_j = W_j GELU(W_s h_N)_j, j = 1..K, where
#   W_s: D -> K * D_t is shared and W_j: D_t -> D_t; dropped after distillation.
# ARMHuBERT / CoLLD: one head per layer, p_i = W_i h_i, kept in the deployed model.
# GenDistiller (2310.13418, 2406.09444; what the papers fix and what is ours: README): slot 0 holds
#   X0 (the front end output), slot k the teacher layer l_k (training, teacher forcing) or the
#   generator's own prediction of it (inference, and training with --gen_feed self); token (k, t)
#   attends to (k', t') iff t' is valid and k' <= k (gen_history "all": causal across layers,
#   bidirectional across time) or k - 1 <= k' <= k ("previous"), so output slot k depends on X0 and
#   layers l_1..l_k only:
#   p_{k+1} = W (g_k(X0, l_1, ..., l_k) + slot_k input),  k = 0..K-1,
#   the slot's input added back (skip connection) and one output projection W shared by every step.
#   With WavLM layers, r depends on the frame offset t' - t only, the same for every pair of slots
#   (choice: the slots are layers of one utterance, not a longer sequence).
# ----------------------------------------------------------------------------


class DistilHuBERTHeads(nn.Module):
    """s3prl's prediction heads: shared Linear(D -> K * Dt) + GELU, then K independent Linear(Dt -> Dt)."""

    def __init__(self, dim, teacher_dim, num_targets):
        super().__init__()
        self.shared = nn.Linear(dim, num_targets * teacher_dim)
        self.split = nn.ModuleList(nn.Linear(teacher_dim, teacher_dim) for _ in range(num_targets))

    def forward(self, hiddens):
        """The N layer outputs (B, T, D) -> K predictions (B, T, Dt), all from the last layer."""
        B, T, _ = hiddens[-1].shape
        shared = F.gelu(self.shared(hiddens[-1])).view(B, T, len(self.split), -1)  # (B, T, K, Dt)
        return [split(shared[:, :, j]) for j, split in enumerate(self.split)]

    def deployed(self, x0, hiddens):
        """What the distilled model serves (SPEC 1): the heads are dropped; [X0, layer 1, ..., layer N]."""
        return [x0] + hiddens


class PerLayerHeads(nn.ModuleList):
    """One Linear(D -> Dt) per target (ARMHuBERT, MaskHuBERT, CoLLD), head j reading student layer
    head_layers[j] (1-based): one head per layer, or several when a shallower student predicts every
    teacher layer (CoLLD). Part of the deployed model."""

    def __init__(self, dim, teacher_dim, head_layers, num_targets):
        self.head_layers = list(head_layers)
        if num_targets != len(self.head_layers):
            raise ValueError(f"per_layer heads need one target per head: {num_targets} targets, "
                             f"{len(self.head_layers)} heads (build with a teacher, model.build_student(preset, "
                             "teacher), or set target_layers and head_layers)")
        super().__init__(nn.Linear(dim, teacher_dim) for _ in self.head_layers)

    def forward(self, hiddens):
        return [head(hiddens[i - 1]) for head, i in zip(self, self.head_layers)]

    def deployed(self, x0, hiddens):
        """ARMHuBERT's SUPERB upstream returns the projected layers head_i(layer i); with several heads
        per layer (CoLLD, every teacher layer) one output per head, in the teacher's layer order."""
        return self(hiddens)


@dataclass
class GeneratorConfig:
    """The generator's own settings; GenDistiller derives them from its StudentConfig (from_student)."""
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    num_outputs: int  # K generated teacher layers
    teacher_dim: int
    history: str = "all"  # the earlier slots a slot sees: "all" or "previous" (StudentConfig.gen_history)
    shared_proj: bool = True  # StudentConfig.gen_shared_proj
    layer_norm_first: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    rel_pos_buckets: int = 0
    rel_pos_max_distance: int = 800
    fused_attention: bool = True

    @classmethod
    def from_student(cls, cfg: StudentConfig):
        if cfg.reuse != "none":
            raise ValueError(f"reuse={cfg.reuse!r}: the GenDistiller generator has no attention-map reuse "
                             "(ARMHuBERT's); set --reuse=none")
        if cfg.gen_history not in ("all", "previous"):
            raise ValueError(f"gen_history={cfg.gen_history!r}: expected 'all' or 'previous'")
        return cls(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                   num_outputs=len(cfg.target_layers), teacher_dim=cfg.teacher_dim, history=cfg.gen_history,
                   shared_proj=cfg.gen_shared_proj,
                   layer_norm_first=cfg.layer_norm_first, dropout=cfg.dropout,
                   attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
                   rel_pos_buckets=cfg.rel_pos_buckets, rel_pos_max_distance=cfg.rel_pos_max_distance,
                   fused_attention=cfg.fused_attention)


class Generator(nn.Module):
    """GenDistiller's generator over K slots x T frames (the rule at the top of this section).

    forward(x0, valid, history=None) -> K predictions (B, T, Dt)
      x0 (B, T, D) the front end output, valid (B, T) bool; history: the K-1 teacher layers
      l_1..l_{K-1} (B, T, Dt) for teacher forcing (one parallel pass), None = free-running.
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        D, Dt, K = cfg.dim, cfg.teacher_dim, cfg.num_outputs
        self.layers = nn.ModuleList(TransformerLayer(cfg, cfg.attention_dropout, first=i == 0)
                                    for i in range(cfg.num_layers))
        self.slot_emb = nn.Parameter(torch.randn(K, D) * 0.02)  # learned embedding of slot 0..K-1
        # choice: teacher layers enter history slots unchanged when widths match, else via a Linear
        self.history_proj = nn.Linear(Dt, D) if Dt != D else None
        # choice: ONE output projection shared by the K steps (2406.09444 names "a projection output
        # layer"; with one block and one projection the size fits both published figures, README)
        self.out_proj = nn.Linear(D, Dt) if cfg.shared_proj else nn.ModuleList(nn.Linear(D, Dt) for _ in range(K))

    def project(self, x, k):
        """Slot k's output (B, T, D) as its teacher layer (B, T, Dt)."""
        return self.out_proj(x) if self.cfg.shared_proj else self.out_proj[k](x)

    def visible(self, S, device):
        """(S, S) bool: may slot k (row) attend to slot k' (column): causal, and gen_history 'previous'
        keeps only the slot itself and the one before it."""
        k = torch.arange(S, device=device)
        ok = k[None, :] <= k[:, None]
        if self.cfg.history == "previous":
            ok &= k[None, :] >= k[:, None] - 1
        return ok

    def embed_history(self, layer):
        """A teacher (or generated) layer (B, T, Dt) as a slot input (B, T, D)."""
        return layer if self.history_proj is None else self.history_proj(layer)

    def run(self, slots, valid):
        """One parallel pass over S slots: slots[0] = X0, slots[k] = history for step k + 1, each
        (B, T, D). Returns the S outputs (B, T, D), each slot's input added back (skip connection)."""
        S = len(slots)
        B, T, D = slots[0].shape
        inputs = torch.stack(slots, dim=1)  # (B, S, T, D)
        x = (inputs + self.slot_emb[:S, None, :]).reshape(B, S * T, D)  # (B, S*T, D): slot-major tokens
        causal = self.visible(S, x.device).repeat_interleave(T, 0).repeat_interleave(T, 1)  # (S*T, S*T): query, key
        allowed = causal[None, None] & valid.repeat(1, S)[:, None, None, :]  # (B, 1, S*T, S*T)
        times = torch.arange(T, device=x.device).repeat(S)  # (S*T,) frame of each token
        bias = position_bias(self.layers, times, times)  # WavLM layers: (H, S*T, S*T), else None
        for layer in self.layers:
            x, _ = layer(x, allowed, bias=bias)
        return list((x.view(B, S, T, D) + inputs).unbind(dim=1))

    def forward(self, x0, valid, history=None):
        K = self.cfg.num_outputs
        if history is not None:  # training with teacher forcing: all K steps in one parallel pass
            if len(history) != K - 1:
                raise ValueError(f"generator needs {K - 1} history layers, got {len(history)}")
            outs = self.run([x0] + [self.embed_history(h) for h in history], valid)
            return [self.project(o, k) for k, o in enumerate(outs)]
        # free-running: step k runs the generator over its new slot only. Attention is causal over
        # slots, so the keys and values of the earlier slots at every layer are those computed at
        # their own steps: they are kept in a cache (one per layer) instead of recomputed.
        caches = [{} for _ in self.layers]
        B, T, _ = x0.shape
        times = torch.arange(T, device=x0.device)  # (T,) frame of each new token
        preds, slot = [], x0  # slot: this step's input (B, T, D), X0 first, then the last prediction
        for k in range(K):
            seen = min(k + 1, 2) if self.cfg.history == "previous" else k + 1  # slots in the cache after this step
            x = slot + self.slot_emb[k]  # (B, T, D)
            allowed = valid.repeat(1, seen)[:, None, None, :]  # (B, 1, 1, seen*T): valid frames of the seen slots
            bias = position_bias(self.layers, times, times.repeat(seen))  # WavLM layers: (H, T, seen*T)
            for layer, cache in zip(self.layers, caches):
                x, _ = layer(x, allowed, cache=cache, bias=bias)
                if self.cfg.history == "previous":  # the next step sees this slot and its own only
                    cache["k"], cache["v"] = cache["k"][:, :, -T:], cache["v"][:, :, -T:]
            preds.append(self.project(x + slot, k))  # (B, T, Dt), the slot's input added back
            slot = self.embed_history(preds[-1])
        return preds


class GenDistiller(nn.Module):
    """GenDistiller: the student front end (DistilHuBERT's, choice SPEC 4) and the generator.

    forward(wav, lengths, history=None) -> (preds, frame_lengths), preds[k] (B, T, Dt) predicts teacher
      layer cfg.target_layers[k]; history = the K-1 teacher layers (teacher forcing), None = free-running.
    hidden_states(wav, lengths) -> the K generated teacher layers, free-running (no teacher needed).
    """

    layers_key = "generator.layers."  # where the transformer layers sit in the state dict (init_from_teacher)

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        if cfg.head != "generator":
            raise ValueError(f"GenDistiller needs head='generator', got {cfg.head!r}")
        self.cfg = cfg
        self.front_end = FrontEnd(cfg)
        self.generator = Generator(GeneratorConfig.from_student(cfg))
        init_weights(cfg, self.front_end, self.generator.layers)

    def cnn_features(self, wav, lengths):
        return self.front_end.cnn_features(wav, lengths)

    def forward(self, wav, lengths, history=None):
        x0, valid, frame_lengths = self.front_end(wav, lengths)
        return self.generator(x0, valid, history), frame_lengths

    def hidden_states(self, wav, lengths):
        return self(wav, lengths)


# ----------------------------------------------------------------------------
# 4. Building a student: target layers, fitting to a teacher, the one builder, loading
#
# Target-layer rule (SPEC 1-4), for a teacher of L_t layers:
#   per-layer heads (ARMHuBERT, CoLLD): student layer i -> teacher layer phi(i) = round(i * L_t / L_s),
#     halves rounded up, never below layer 1 (layer 0, the transformer input, is never a target);
#   DistilHuBERT heads and GenDistiller outputs: teacher layers (4, 8, 12), scaled to L_t layers
#     (choice: (8, 16, 24) for a 24-layer teacher) unless set explicitly.
# ----------------------------------------------------------------------------


def target_layers_for(cfg: StudentConfig, num_teacher_layers):
    """The teacher layer (1-based) each output of the student `cfg` targets, by the rule above, and for
    per_layer heads the student layer each head reads: (target_layers, head_layers)."""
    L_t, L_s = num_teacher_layers, cfg.num_layers
    if cfg.head == "per_layer":
        phi = [0] + [max(1, math.floor(i * L_t / L_s + 0.5)) for i in range(1, L_s + 1)]
        if not cfg.every_teacher_layer:
            return tuple(phi[1:]), ()
        # choice (CoLLD: "each and every layer of the teacher", USAD Sec. III-A): student layer i predicts
        # teacher layers phi(i-1)+1 .. phi(i), contiguous groups in depth order (24 -> 12: layers 2i-1 and
        # 2i), or phi(i) alone when that range is empty (a teacher shallower than the student)
        pairs = [(k, i) for i in range(1, L_s + 1) for k in (range(phi[i - 1] + 1, phi[i] + 1) or [phi[i]])]
        heads = tuple(i for _, i in pairs)
        return tuple(k for k, _ in pairs), (() if heads == tuple(range(1, L_s + 1)) else heads)
    if any(t > L_t for t in cfg.target_layers) or cfg.target_layers == DEFAULT_TARGETS:
        return tuple(max(1, math.floor(t * L_t / 12 + 0.5)) for t in DEFAULT_TARGETS), ()
    return cfg.target_layers, ()


def fit_to_teacher(cfg, teacher):
    """Adapt a config to a teacher: output size, targets and, for teacher-initialised students,
    the geometry of the copied parts. Returns (new config, list of 'field: old -> new' notes).

    `teacher` is a Teacher or anything with its `config`, `dim`, `num_layers` and
    `normalize_waveform` (bundle_description: a teacher's geometry without its weights).
    - teacher_dim always follows the teacher; target_layers follow target_layers_for.
    - init_from_teacher: DistilHuBERT's student IS the teacher's front end and first layers,
      so conv, width, FFN, heads, positional conv and layer order come from the teacher.
    - init_conv_from_teacher: only the conv stack (and its norm mode) comes from the teacher; the
      student keeps its width and gets a LayerNorm(C) + Linear(C -> dim) projection.
    """
    c = teacher.config
    target_layers, head_layers = target_layers_for(cfg, teacher.num_layers)
    new = dict(teacher_dim=teacher.dim, target_layers=target_layers, head_layers=head_layers)
    if cfg.init_conv_from_teacher or cfg.init_from_teacher:  # the conv is the teacher's, fed what it expects
        new.update(conv_layers=[tuple(x) for x in c["extractor_conv_layer_config"]],
                   conv_norm=c["extractor_mode"], conv_bias=c["extractor_conv_bias"], feature_projection=True,
                   normalize_waveform=teacher.normalize_waveform)
    if cfg.init_from_teacher:  # the copied layers are the teacher's kind: WavLM layers from a WavLM teacher
        new.update(dim=teacher.dim, ffn_dim=c["encoder_ff_interm_features"],
                   num_heads=c["encoder_num_heads"], pos_conv_kernel=c["encoder_pos_conv_kernel"],
                   pos_conv_groups=c["encoder_pos_conv_groups"], layer_norm_first=c["encoder_layer_norm_first"],
                   rel_pos_buckets=c.get("encoder_num_buckets", 0),
                   rel_pos_max_distance=c.get("encoder_max_distance", cfg.rel_pos_max_distance))
    notes = [f"{k}: {getattr(cfg, k)} -> {v} (fitted to teacher)" for k, v in new.items() if getattr(cfg, k) != v]
    if len(set(new["target_layers"])) < len(new["target_layers"]):
        notes.append(f"target_layers {new['target_layers']} repeat a layer: the teacher has only {teacher.num_layers}")
    return replace(cfg, **new), notes


def build_student(preset_or_cfg, teacher=None, overrides=None, copy_weights=True):
    """The one way a student is made (distill.py, eval.py and load_student all come here).

    preset_or_cfg: a PRESETS name or a StudentConfig; overrides: {field: value} set by the user
    (--FIELD=VALUE), which win over fitting; teacher: a Teacher (or a description, see
    fit_to_teacher) the config is fitted to; copy_weights: copy the teacher parts the config asks
    for (init_from_teacher / init_conv_from_teacher) when the teacher has weights; False gives the
    random-weight floor. Returns (Student or GenDistiller, notes on what was changed and why).
    """
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in PRESETS:
            raise ValueError(f"unknown student preset {preset_or_cfg!r}; choose from {', '.join(PRESETS)}")
        preset_or_cfg = PRESETS[preset_or_cfg]
    overrides = dict(overrides or {})
    cfg, notes = replace(preset_or_cfg, **overrides), []
    if "dim" in overrides and "conv_layers" not in overrides and not cfg.feature_projection:
        # ARMHuBERT-style front ends end in `dim` channels: resize the conv list with the width
        cfg = replace(cfg, conv_layers=armhubert_conv(cfg.dim))
        notes.append(f"conv_layers -> {cfg.conv_layers} (follows --dim)")
    if teacher is not None:
        cfg, fit_notes = fit_to_teacher(cfg, teacher)
        notes += fit_notes
        cfg = replace(cfg, **overrides)  # a user's explicit choice wins over fitting (init then checks shapes)
        bad = [k for k in cfg.target_layers if not 1 <= k <= teacher.num_layers]
        if bad:
            raise ValueError(f"--target_layers {list(cfg.target_layers)}: layers {bad} do not exist; the teacher "
                             f"has layers 1..{teacher.num_layers} (layer k = output of block k; 0, the transformer "
                             "input, is never a target)")
    bad = [f"{k}={getattr(cfg, k)}" for k in ("num_heads", "pos_conv_groups") if cfg.dim % getattr(cfg, k)]
    if bad:
        raise ValueError(f"--dim={cfg.dim}: must be divisible by {' and '.join(bad)} (or set those fields too)")
    student = GenDistiller(cfg) if cfg.head == "generator" else Student(cfg)
    if copy_weights and isinstance(teacher, Teacher):
        if cfg.init_from_teacher:
            init_from_teacher(student, teacher)
        elif cfg.init_conv_from_teacher:
            init_conv_from_teacher(student, teacher)
    return student, notes


def load_student(path, device="cpu"):
    """A student (eval mode) from a distill.py checkpoint: the config travels with the weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise ValueError(f"{path}: not a distill.py checkpoint: it cannot be read as a torch file "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "student" not in ckpt:
        raise ValueError(f"{path}: not a distill.py checkpoint (expected keys 'config' and 'student')")
    student, _ = build_student(config_from_dict(ckpt["config"], ckpt["student"]))
    student.load_state_dict(upgrade_state_dict(ckpt["student"], student.cfg))
    return student.to(device).eval()


# Fields newer than some checkpoints, with the behaviour a checkpoint written without them had.
LEGACY_CONFIG = dict(init="pytorch", feature_grad_mult=1.0, layer_grad_scale=False, init_conv_from_teacher=False,
                     normalize_waveform=False, gen_shared_proj=False)


def config_from_dict(d, state=None):
    """StudentConfig from its asdict() form (tuples come back as lists from a checkpoint).
    A checkpoint written before a field existed gets the behaviour it was trained with; where its
    weights say which (one or K GenDistiller output projections), `state` decides."""
    legacy = dict(LEGACY_CONFIG)
    if state is not None:
        legacy["gen_shared_proj"] = "generator.out_proj.weight" in state
    d = {**legacy, "reuse_attention_dropout": d.get("attention_dropout", 0.1), **d}
    d["conv_layers"] = [tuple(c) for c in d["conv_layers"]]
    d["target_layers"] = tuple(d["target_layers"])
    d["head_layers"] = tuple(d.get("head_layers", ()))
    return StudentConfig(**d)


def config_to_dict(cfg):
    return asdict(cfg)


# Parameter names of checkpoints from before the front end, heads and generator were modules of their own.
_OLD_FRONT_END = ("conv_layers.", "feature_norm.", "feature_proj.", "mask_emb", "pos_conv.", "pos_norm.")


def upgrade_state_dict(state, cfg):
    """A student state dict in today's parameter names; earlier checkpoints had the
    front end, DistilHuBERT's heads (pred_shared, pred_split) and the generator at the top level."""
    if not any(k.startswith("conv_layers.") for k in state):
        return state
    generator = cfg.head == "generator"

    def new_name(k):
        if k.startswith(_OLD_FRONT_END):
            return "front_end." + k
        if k.startswith("pred_shared."):
            return "heads.shared." + k[len("pred_shared."):]
        if k.startswith("pred_split."):
            return "heads.split." + k[len("pred_split."):]
        if generator and k.startswith(("layers.", "slot_emb", "history_proj.", "out_proj.")):
            return "generator." + k
        return k

    return {new_name(k): v for k, v in state.items()}


# ----------------------------------------------------------------------------
# 5. The frozen teacher
#
# Rule: teacher layer k = output of transformer block k (section 1), computed with the same
# padding-exact conv front end as the students, without grad, in float32.
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
# target for CoLLD's contrastive loss; the layer-norm order keeps frames apart (0.52 / 0.74; synthetic speech).
# Like HuBERT / WavLM Large (layer-norm order, convs without bias), it standardises each utterance
# (normalize_waveform): without that, a window of digital silence (exact zeros) is a zero vector into
# each conv's LayerNorm, whose gradient at zero variance is ~1/sqrt(eps) per layer (a first-step grad
# norm of 1e11 for students copying its conv, on audio with exact-zero leading silence). Standardised,
# silence is a constant that the convs spread over channels. Every real layer-norm-order teacher
# either standardises (HuBERT/WavLM Large) or has conv biases (wav2vec 2.0 Large LV-60, XLS-R).
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
      = teacher.encode(*teacher.features(wav, lengths), mask, final_norm)
      wav (B, S) float, lengths (B,) samples, mask (B, T) bool frames to replace by the
      teacher's mask embedding right after the feature projection (fairseq HuBERT order);
      layers: list of L tensors (B, T, D), layers[k-1] = output of transformer block k;
      final_norm: a pre-LN teacher's last layer goes through the encoder's final LayerNorm.
    The teacher is always in eval mode, without grad, layerdrop off. `exact` (distill.py
    --teacher_precision fp32, the default here): it runs in float32 even inside an autocast
    region (SPEC section 0); exact=False (--teacher_precision auto): it runs under the caller's
    autocast like the student (bf16/fp16 matmuls; autocast keeps norms and softmax in float32).
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
        self.exact = True
        self.requires_grad_(False)
        self.eval()

    def precision(self, device_type):
        """The region the teacher computes in: autocast off (exact float32) or the caller's own."""
        return torch.autocast(device_type, enabled=False) if self.exact else contextlib.nullcontext()

    def train(self, mode=True):
        # A teacher never leaves eval mode: dropout in the targets would be noise.
        return super().train(False)

    @torch.no_grad()
    def cnn_features(self, wav, lengths):
        """Conv front end output (B, T, C) and frame_lengths: the `cnn:` floor of eval.py."""
        with self.precision(wav.device.type):
            wav = wav.float()
            if self.normalize_waveform:  # Large/XLS-R models were trained on per-utterance standardised audio
                wav = standardize_waveform(wav, lengths)
            return conv_front_end(self.model.feature_extractor.conv_layers, wav, lengths)

    @torch.no_grad()
    def forward(self, wav, lengths, mask=None, final_norm=False, point="block"):
        return self.encode(*self.features(wav, lengths), mask, final_norm, point)

    @torch.no_grad()
    def features(self, wav, lengths):
        """The front end: conv + feature projection, (B, T, D) and frame_lengths. The mask does not
        touch it, so ARMHuBERT's clean and masked teacher passes share it (distill.step_armhubert)."""
        with self.precision(wav.device.type):
            features, frame_lengths = self.cnn_features(wav, lengths)  # (B, T, C)
            return self.model.encoder.feature_projection(features), frame_lengths  # LayerNorm, Linear, dropout

    @torch.no_grad()
    def encode(self, x, frame_lengths, mask=None, final_norm=False, point="block"):
        """The transformer on features x (B, T, D): mask embedding, positional conv, the L blocks.
        point "block": each block's output; "ffn": each block's FFN feature (teacher_block)."""
        if point not in ("block", "ffn"):
            raise ValueError(f"point={point!r}: expected 'block' or 'ffn'")
        with self.precision(x.device.type):
            encoder = self.model.encoder
            pad = ~data.valid_frames(frame_lengths, x.shape[1])  # (B, T): torchaudio's layers take padding masks
            if mask is not None:
                x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)  # (B, T, D)
            x = x.masked_fill(pad[..., None], 0.0)  # as torchaudio: padded frames are zero
            # torchaudio's Transformer._preprocess: x + pos_conv(x), then the LayerNorm for
            # post-LN (Base) models; pre-LN (Large) models apply it after the last block instead.
            with torch.autocast(x.device.type, enabled=False):  # see POS_CONV_FP32
                x = encoder.transformer._preprocess(x.float())
            if self.is_wavlm:  # WavLM attention takes a key padding mask, additive as its bias
                kw = dict(key_padding_mask=torch.zeros_like(pad, dtype=x.dtype).masked_fill(pad, float("-inf")))
            else:  # (B, 1, T, T)
                kw = dict(attention_mask=(-10000.0 * pad[:, None, None, :].to(x.dtype)).expand(-1, 1, x.shape[1], -1))
            layers, position_bias = [], None
            for layer in encoder.transformer.layers:
                if point == "ffn":
                    x, ffn, position_bias = teacher_block(layer, x, position_bias=position_bias, **kw)
                    layers.append(ffn)  # the FFN feature of block k
                else:
                    x, position_bias = layer(x, position_bias=position_bias, **kw)
                    layers.append(x)  # layers[k-1] = output of block k
            if final_norm and point == "block" and self.config["encoder_layer_norm_first"]:
                # pre-LN models apply one more LayerNorm after the last block (s3prl's hidden_states[L]
                # and transformers 4 include it, transformers 5 only in last_hidden_state; extract_features
                # and the official ARMHuBERT hooks do not)
                layers[-1] = encoder.transformer.layer_norm(layers[-1])
        return layers, frame_lengths

    def hidden_states(self, wav, lengths):
        """Same signature as Student.hidden_states, so eval.py treats both alike."""
        return self(wav, lengths)


def teacher_block(layer, x, attention_mask=None, position_bias=None, key_padding_mask=None):
    """torchaudio's EncoderLayer.forward written out to expose the FFN feature: the output of the
    block's feed-forward network before the residual addition that follows it (data2vec's target
    point, arXiv 2202.03555 Sec. 3.3; CoLLD's targets as USAD, arXiv 2506.18843 Sec. III-B, describes
    them). Returns (block output, FFN feature, position bias); the block output is torchaudio's.
      post-LN (HuBERT Base): x = LN(x + attn(x)); out = LN'(x + ffn(x))
      pre-LN (Large, WavLM Large): x = x + attn(LN(x)); out = x + ffn(LN'(x))
    WavLM blocks are the same with their attention (relative position bias) in place of attn."""
    residual = x
    if layer.layer_norm_first:
        x = layer.layer_norm(x)
    x, position_bias = layer.attention(x, attention_mask=attention_mask, position_bias=position_bias,
                                       key_padding_mask=key_padding_mask)
    x = residual + layer.dropout(x)
    if layer.layer_norm_first:
        ffn = layer.feed_forward(layer.final_layer_norm(x))
        return x + ffn, ffn, position_bias
    x = layer.layer_norm(x)
    ffn = layer.feed_forward(x)
    return layer.final_layer_norm(x + ffn), ffn, position_bias


def torchaudio_model(config):
    """torchaudio's model for a config: wavlm_model when it has WavLM's relative position buckets,
    else wav2vec2_model (HuBERT and wav2vec 2.0 share it)."""
    import torchaudio

    build = torchaudio.models.wavlm_model if "encoder_num_buckets" in config else torchaudio.models.wav2vec2_model
    return build(**config)


def teacher_from_checkpoint(ckpt, name="teacher"):
    """Build a Teacher from a torchaudio-format dict; the one path every source goes through."""
    config = dict(ckpt["config"])
    config["aux_num_out"] = None  # a CTC head, if any, is not part of the teacher
    config["extractor_conv_layer_config"] = [tuple(c) for c in config["extractor_conv_layer_config"]]
    model = torchaudio_model(config)
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("aux.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"teacher {name!r}: checkpoint does not fit its config.\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    return Teacher(model, config, ckpt.get("mask_emb"), ckpt.get("normalize_waveform", False), name)


def load_teacher(name_or_path, device="cpu"):
    """A frozen Teacher from a bundle name, `tiny`, a Hugging Face model folder or a checkpoint file
    (torchaudio format, s3prl-converted, fairseq as released); see the README's Teachers section."""
    import os

    import torchaudio

    if name_or_path == "tiny":
        ckpt = random_teacher_checkpoint("tiny", seed=0)
    elif name_or_path.lower() in BUNDLES:
        config, normalize = bundle_config(name_or_path)
        bundle = getattr(torchaudio.pipelines, BUNDLES[name_or_path.lower()])
        # the weights download from torchaudio's server on first use (cached by torch.hub)
        try:
            state = bundle._get_state_dict(None)
        except OSError as e:  # no network, a proxy, a full disk
            raise ValueError(f"--teacher {name_or_path}: torchaudio could not download the bundle ({e}); without "
                             "a network pass a local teacher file or folder (README: Teachers)") from e
        ckpt = {"config": config, "state_dict": state, "normalize_waveform": normalize}
    elif os.path.isdir(name_or_path):
        ckpt = hf_to_torchaudio(name_or_path)
    elif os.path.isfile(name_or_path):
        raw = read_checkpoint(name_or_path)
        if isinstance(raw, dict) and "config" in raw and "state_dict" in raw:  # torchaudio format
            ckpt = raw
        elif isinstance(raw, dict) and "model_weight" in raw and "model_cfg" in raw:  # s3prl-converted
            ckpt = fairseq_to_torchaudio(raw["model_weight"], raw["model_cfg"], raw.get("task_cfg"))
        elif isinstance(raw, dict) and "model" in raw and raw.get("cfg"):  # fairseq (hydra) / WavLM original
            cfg = raw["cfg"].get("model", raw["cfg"])
            ckpt = fairseq_to_torchaudio(raw["model"], cfg, raw["cfg"].get("task"))
        elif isinstance(raw, dict) and "model" in raw and raw.get("args"):  # fairseq before hydra: an args namespace
            ckpt = fairseq_to_torchaudio(raw["model"], raw["args"], raw["args"])
        else:
            keys = list(raw)[:10] if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"--teacher {name_or_path}: unknown checkpoint format (top-level keys {keys}); "
                             "expected {'config','state_dict'} (torchaudio), {'model_cfg','model_weight'} "
                             "(s3prl-converted), {'cfg' or 'args','model'} (fairseq) or a Hugging Face folder")
    elif "shared/bench" in name_or_path.replace("\\", "/"):
        raise ValueError(f"--teacher {name_or_path}: no such file. The benchmark kit (../shared/bench) is not part "
                         "of a clone of this repository; see the README's 'Proof on speech' for where it comes from")
    elif os.sep in name_or_path or name_or_path.endswith((".pt", ".pth", ".ckpt")):
        raise ValueError(f"--teacher {name_or_path}: no such file")
    else:
        raise ValueError(f"--teacher {name_or_path!r}: not a file, not 'tiny' and not a bundle name "
                         f"(bundles: {', '.join(BUNDLES)})")
    return teacher_from_checkpoint(ckpt, name=name_or_path).to(device)


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
    config, normalize = bundle_config(name)
    return types.SimpleNamespace(config=config, dim=config["encoder_embed_dim"], num_layers=config["encoder_num_layers"],
                                 normalize_waveform=normalize)


def random_teacher_checkpoint(name="tiny", seed=0):
    """A seeded random teacher as a torchaudio-format dict (mask_emb included): `tiny`, or the
    geometry of a bundle in BUNDLES (nothing is downloaded; timing and floors need no trained weights)."""
    if name == "tiny":
        config = TINY_TEACHER_CONFIG
    elif name.lower() in BUNDLES:
        config, _ = bundle_config(name)
    else:
        raise ValueError(f"random:{name}: not a teacher bundle name ({', '.join(BUNDLES)}) nor 'tiny'")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torchaudio_model(config)
        mask_emb = torch.rand(config["encoder_embed_dim"])  # fairseq inits mask_emb uniform
    return {"config": config, "state_dict": model.state_dict(), "mask_emb": mask_emb,
            "normalize_waveform": name == "tiny" or (name.lower() in BUNDLES and bundle_config(name)[1])}


def random_teacher(name="tiny", seed=0):
    """A Teacher with random weights (see random_teacher_checkpoint), named `random:NAME`."""
    return teacher_from_checkpoint(random_teacher_checkpoint(name, seed), name=f"random:{name}")


# fairseq / s3prl checkpoints: key names and config mapped to torchaudio's, in plain code (no fairseq)


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


def pos_conv_keys(prefix):
    """(pattern, torchaudio key) of the weight-normed positional conv under `prefix`: its gain and direction
    by the old names (weight_g, weight_v) or the parametrization's (original0, original1), and its bias."""
    t = "encoder.transformer.pos_conv_embed.conv."
    return [(prefix + r"(?:weight_g|parametrizations\.weight\.original0)", t + "parametrizations.weight.original0"),
            (prefix + r"(?:weight_v|parametrizations\.weight\.original1)", t + "parametrizations.weight.original1"),
            (prefix + r"bias", t + "bias")]


# fairseq (HuBERT / WavLM / wav2vec 2.0) key -> torchaudio key; first match wins.
_L = r"encoder\.layers\.(\d+)\."
_TL = r"encoder.transformer.layers.\1."
FAIRSEQ_TO_TORCHAUDIO = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # layer_norm mode
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # group_norm mode
    (r"layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    *pos_conv_keys(r"encoder\.pos_conv\.0\."),
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


def rename_keys(weights, table):
    """(state with each key renamed by the first matching (pattern, target) of `table`, unmatched keys)."""
    state, unmapped = {}, []
    for key, value in weights.items():
        for pattern, target in table:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, target, key)] = value
                break
        else:
            unmapped.append(key)
    return state, unmapped


def join_wavlm_qkv(state, num_layers):
    """torchaudio's WavLM attention is an nn.MultiheadAttention: q, k, v become one in_proj (in place)."""
    for i in range(num_layers):
        p = f"encoder.transformer.layers.{i}.attention."
        for kind in ("weight", "bias"):
            state[f"{p}attention.in_proj_{kind}"] = torch.cat([state.pop(f"{p}{n}_proj.{kind}") for n in "qkv"])
            state[f"{p}attention.out_proj.{kind}"] = state.pop(f"{p}out_proj.{kind}")  # in_proj: (3D, D) / (3D,)


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
    state, unmapped = rename_keys({k: v for k, v in weights.items()
                                   if k != "mask_emb" and not FAIRSEQ_DROPPED.match(k)}, FAIRSEQ_TO_TORCHAUDIO)
    if unmapped:
        raise ValueError(f"unknown fairseq keys ({len(unmapped)}), cannot map to torchaudio: {unmapped[:20]}")
    if "encoder_num_buckets" in config:
        join_wavlm_qkv(state, config["encoder_num_layers"])
    normalize = bool(task_cfg.get("normalize", cfg.get("normalize", False)))
    return {"config": config, "state_dict": state, "mask_emb": weights.get("mask_emb"),
            "normalize_waveform": normalize}


# Checkpoints as people keep them: fairseq files as released, Hugging Face model folders.


class PickledObject:
    """Stands in for a class a pickle names but this program does not import (argparse.Namespace,
    omegaconf containers, fairseq enums): it keeps the constructor arguments and the state the
    pickle gives it, and nothing of it runs. plain_data turns it into dicts, lists and strings."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def plain_data(x, _path=()):
    """PickledObjects (recursively) as plain data: an omegaconf container as its content, an omegaconf
    value node as its value, a namespace as its attributes, an enum as its value. A structure that
    contains itself is refused."""
    if isinstance(x, (PickledObject, dict, list, tuple)):
        if id(x) in _path:
            raise ValueError("a pickled config that contains itself cannot be read as plain data")
        _path = _path + (id(x),)
    plain = lambda v: plain_data(v, _path)  # noqa: E731
    if isinstance(x, PickledObject):
        state = x.state[0] if isinstance(x.state, tuple) and len(x.state) == 2 else x.state
        if isinstance(state, dict):
            if "_content" in state:  # omegaconf DictConfig / ListConfig (its _parent/_metadata point back up)
                return plain(state["_content"])
            if "_val" in state:  # omegaconf value node
                return plain(state["_val"])
            return {k: plain(v) for k, v in state.items()}  # argparse.Namespace and other plain objects
        if state is None and len(x.args) == 1:  # an enum member, pickled as Class(value)
            return plain(x.args[0])
        return [plain(a) for a in x.args]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def read_checkpoint(path):
    """torch.load with weights_only=True; a file whose pickle names classes that this safe loader
    refuses (a fairseq checkpoint as released: argparse.Namespace, omegaconf, fairseq enums) is read
    again with each such class replaced by a PickledObject, so it loads without fairseq or omegaconf
    and without running code from the pickle, with a warning that says so. The refused names are
    taken from the loader's own errors, one at a time, so both torch file formats (zip and the
    legacy one of torch < 1.6) work."""
    try:  # zip files list their globals up front; the loop below finds the rest one by one
        stubs = [(type(n.rpartition(".")[2], (PickledObject,), {}), n)
                 for n in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
    except Exception:  # the legacy format, or not a torch file at all (the loop says which)
        stubs = []
    first = None
    for _ in range(200):  # a checkpoint names a handful of classes
        try:
            with torch.serialization.safe_globals(stubs):
                raw = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # pickle errors come in many types
            first = first or e
            found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
            if not found or found.group(1) in [n for _, n in stubs]:
                # note: torch's own message advises weights_only=False, wrong advice for an untrusted file
                reason = str(first).strip().splitlines()[0][:160] if str(first).strip() else ""
                if reason.startswith("Weights only load failed"):
                    reason = "its pickle holds objects the safe loader refuses"
                raise ValueError(f"{path}: not a readable torch checkpoint ({type(first).__name__}: {reason})") from e
            name = found.group(1)
            stubs.append((type(name.rpartition(".")[2], (PickledObject,), {}), name))
    else:
        raise ValueError(f"--teacher {path}: its pickle names too many classes the safe loader refuses")
    if not stubs:
        return raw
    names = ", ".join(n for _, n in stubs)
    warnings.warn(f"{path}: its pickle names classes the safe loader refuses ({names}); they were read as plain "
                  "data (dicts, lists, strings), without importing or running them")
    return plain_data(raw)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""
    import json
    import struct

    import sys

    if sys.byteorder != "little":
        raise ValueError(f"{path}: safetensors holds little-endian tensors; this machine is big-endian")
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = memoryview(blob)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name}: dtype {info['dtype']} is not supported")
        start, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[start:end]), dtype=SAFETENSORS_DTYPES[info["dtype"]]) if end > start \
            else torch.empty(0, dtype=SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def write_safetensors(tensors, path):
    """The inverse of read_safetensors (float32 and the other dtypes above), header padded to 8 bytes."""
    import json
    import struct

    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for c in chunks:
            f.write(c)


# Hugging Face (transformers) key -> torchaudio key, after the model prefix ("hubert.", "wav2vec2.",
# "wavlm.") of a ...ForCTC folder is removed; first match wins. WavLM's q/k/v are joined below.
HF_TO_TORCHAUDIO = [
    (r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.\2.\3"),
    (r"feature_projection\.(layer_norm|projection)\.(weight|bias)", r"encoder.feature_projection.\1.\2"),
    *pos_conv_keys(r"encoder\.pos_conv_embed\.conv\."),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.(.+)", r"encoder.transformer.layers.\1.\2"),
]
HF_MODEL_TYPES = ("hubert", "wav2vec2", "wavlm")


def hf_to_torchaudio(folder):
    """A Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin, as saved by
    save_pretrained or downloaded from the Hub) of HuBERT, WavLM or wav2vec 2.0, post-LN (Base) or
    "stable layer norm" pre-LN (Large), as the torchaudio-format dict. masked_spec_embed is kept as
    the mask embedding; preprocessor_config.json's do_normalize says whether audio is standardised.
    Teacher layer k then equals HF hidden_states[k] (transformers 5; a pre-LN model's final LayerNorm
    is in last_hidden_state only, which final_norm=True gives as the last layer)."""
    import json
    import os

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--teacher {folder}: a folder without config.json (expected a Hugging Face model folder)")
    with open(path) as f:
        hf = json.load(f)
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"--teacher {folder}: model_type {kind!r} in config.json; expected one of {HF_MODEL_TYPES}")
    problems = [f"{k}={hf.get(k)!r}" for k, ok in [("hidden_act", "gelu"), ("feat_extract_activation", "gelu"),
                                                    ("layer_norm_eps", 1e-5)] if hf.get(k, ok) != ok]
    if kind == "hubert" and not hf.get("feat_proj_layer_norm", True):
        problems.append("feat_proj_layer_norm=False")
    if hf.get("conv_pos_batch_norm"):
        problems.append("conv_pos_batch_norm=True")
    if problems:
        raise ValueError(f"--teacher {folder}: {', '.join(problems)} in config.json has no torchaudio counterpart")
    needed = ["conv_dim", "conv_kernel", "conv_stride", "hidden_size", "num_conv_pos_embeddings",
              "num_conv_pos_embedding_groups", "num_hidden_layers", "num_attention_heads", "intermediate_size"] + \
        (["num_buckets", "max_bucket_distance"] if kind == "wavlm" else [])
    missing = [k for k in needed if k not in hf]
    if missing:
        raise ValueError(f"--teacher {folder}: config.json lacks {missing} (a {kind} config written by "
                         "save_pretrained has them)")
    config = dict(
        extractor_mode="group_norm" if hf.get("feat_extract_norm", "group") == "group" else "layer_norm",
        extractor_conv_layer_config=[tuple(c) for c in zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"])],
        extractor_conv_bias=bool(hf.get("conv_bias", False)), encoder_embed_dim=hf["hidden_size"],
        encoder_projection_dropout=0.0, encoder_pos_conv_kernel=hf["num_conv_pos_embeddings"],
        encoder_pos_conv_groups=hf["num_conv_pos_embedding_groups"], encoder_num_layers=hf["num_hidden_layers"],
        encoder_num_heads=hf["num_attention_heads"], encoder_attention_dropout=0.0,
        encoder_ff_interm_features=hf["intermediate_size"], encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
        encoder_layer_norm_first=bool(hf.get("do_stable_layer_norm", False)), encoder_layer_drop=0.0,
        aux_num_out=None)
    if kind == "wavlm":
        config.update(encoder_num_buckets=hf["num_buckets"], encoder_max_distance=hf["max_bucket_distance"])
    files = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")]
    if os.path.isfile(files[0]):
        weights = read_safetensors(files[0])
    elif os.path.isfile(files[1]):
        weights = torch.load(files[1], map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"--teacher {folder}: no model.safetensors or pytorch_model.bin (sharded checkpoints "
                         "are not supported)")
    weights = {re.sub(r"^(wav2vec2|hubert|wavlm)\.", "", k): v for k, v in weights.items()}  # ...ForCTC prefix
    mask_emb = weights.get("masked_spec_embed")
    # heads of ...ForCTC / ...ForPreTraining (lm_head, quantizer, project_q, ...) are not the teacher
    state, unmapped = rename_keys({k: v for k, v in weights.items()
                                   if k.startswith(("feature_extractor.", "feature_projection.", "encoder."))},
                                  HF_TO_TORCHAUDIO)
    if unmapped:
        raise ValueError(f"--teacher {folder}: unknown Hugging Face keys ({len(unmapped)}): {unmapped[:20]}")
    if kind == "wavlm":
        join_wavlm_qkv(state, config["encoder_num_layers"])
    normalize = False
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            normalize = bool(json.load(f).get("do_normalize", False))
    return {"config": config, "state_dict": state, "mask_emb": mask_emb, "normalize_waveform": normalize}



# ----------------------------------------------------------------------------
# 6. Initialisation from the teacher
#
# DistilHuBERT (Sec. 2): the student's conv front end, projection, positional conv and its N layers
# start as the teacher's front end and first N layers (GenDistiller: the same, choice SPEC 4).
# ----------------------------------------------------------------------------

def teacher_to_student_keys(teacher, num_layers, layers="layers."):
    """Student key -> teacher key for the parts DistilHuBERT copies (and GenDistiller, choice):
    the front end (under `front_end.`) and `num_layers` transformer layers (under `layers`:
    "layers." in a Student, "generator.layers." in a GenDistiller)."""
    t = teacher.model
    keys = {}
    for i, block in enumerate(t.feature_extractor.conv_layers):
        for name, _ in block.named_parameters():
            keys[f"front_end.conv_layers.{i}.{name}"] = f"feature_extractor.conv_layers.{i}.{name}"
    keys.update({
        "front_end.feature_norm.weight": "encoder.feature_projection.layer_norm.weight",
        "front_end.feature_norm.bias": "encoder.feature_projection.layer_norm.bias",
        "front_end.feature_proj.weight": "encoder.feature_projection.projection.weight",
        "front_end.feature_proj.bias": "encoder.feature_projection.projection.bias",
        "front_end.pos_conv.bias": "encoder.transformer.pos_conv_embed.conv.bias",
        "front_end.pos_conv.parametrizations.weight.original0":
            "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0",
        "front_end.pos_conv.parametrizations.weight.original1":
            "encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1",
    })
    if not teacher.config["encoder_layer_norm_first"]:  # post-LN: the LayerNorm after the pos conv
        keys["front_end.pos_norm.weight"] = "encoder.transformer.layer_norm.weight"
        keys["front_end.pos_norm.bias"] = "encoder.transformer.layer_norm.bias"
    for i in range(num_layers):
        s, tl = f"{layers}{i}.", f"encoder.transformer.layers.{i}."
        for p in ("weight", "bias"):
            for n in ("q_proj", "k_proj", "v_proj", "out_proj"):  # WavLM's: split by teacher_state
                keys[f"{s}attention.{n}.{p}"] = f"{tl}attention.{n}.{p}"
            keys[f"{s}layer_norm.{p}"] = f"{tl}layer_norm.{p}"
            keys[f"{s}fc1.{p}"] = f"{tl}feed_forward.intermediate_dense.{p}"
            keys[f"{s}fc2.{p}"] = f"{tl}feed_forward.output_dense.{p}"
            keys[f"{s}final_layer_norm.{p}"] = f"{tl}final_layer_norm.{p}"
        if teacher.is_wavlm:  # the gate of every layer, the relative position embedding of the first
            for n in ("gru_rel_pos_linear.weight", "gru_rel_pos_linear.bias", "gru_rel_pos_const") + \
                    (("rel_attn_embed.weight",) if i == 0 else ()):
                keys[f"{s}attention.{n}"] = f"{tl}attention.{n}"
    return keys


def teacher_state(teacher):
    """The teacher's state dict, WavLM attention in HuBERT's names: torchaudio keeps WavLM's q, k, v as one
    fused in_proj of nn.MultiheadAttention (rows q, k, v) under attention.attention; here they are
    attention.{q,k,v}_proj and attention.out_proj, as in HuBERT layers and the student."""
    state = dict(teacher.model.state_dict())
    for key in [k for k in state if ".attention.attention." in k]:
        value, (layer, name) = state.pop(key), key.split(".attention.attention.")
        if name.startswith("in_proj_"):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                state[f"{layer}.attention.{proj}.{name[len('in_proj_'):]}"] = part
        else:  # out_proj.weight / out_proj.bias
            state[f"{layer}.attention.{name}"] = value
    return state


@torch.no_grad()
def init_from_teacher(student, teacher):
    """Copy the teacher's conv, projection, positional conv and first layers into the student.

    DistilHuBERT (SPEC 1) does this; GenDistiller's front end and generator layers too (choice). From a
    WavLM teacher the student's layers are WavLM layers (fit_to_teacher) and take its gates and bias.
    Raises if any copied tensor does not fit, listing every mismatch.
    """
    if teacher.is_wavlm and not student.cfg.rel_pos_buckets:
        raise ValueError("init_from_teacher from a WavLM teacher needs WavLM layers in the student "
                         "(rel_pos_buckets > 0; model.build_student sets it from the teacher)")
    mapping = teacher_to_student_keys(teacher, min(student.cfg.num_layers, teacher.num_layers), student.layers_key)
    return copy_from_teacher(student, teacher, mapping, "init_from_teacher: student and teacher shapes")


@torch.no_grad()
def init_conv_from_teacher(student, teacher):
    """Copy only the teacher's conv front end and the LayerNorm on its features (kit recipe for
    scratch students: --init_conv_from_teacher=true). The projection to the student's width, the
    positional conv and the layers stay as initialised. Returns the copied student keys."""
    mapping = {s: t for s, t in teacher_to_student_keys(teacher, 0).items()
               if s.startswith(("front_end.conv_layers.", "front_end.feature_norm."))}
    return copy_from_teacher(student, teacher, mapping, "init_conv_from_teacher: student and teacher conv shapes")


@torch.no_grad()
def copy_from_teacher(student, teacher, mapping, what):
    """Copy teacher tensors into the student by `mapping` (student key -> teacher key), after checking
    every shape; raises "`what` do not fit", listing the mismatches. Returns the copied student keys."""
    s_state, t_state = student.state_dict(), teacher_state(teacher)
    bad = [f"{s} {tuple(s_state[s].shape) if s in s_state else 'missing'} <- {t} "
           f"{tuple(t_state[t].shape) if t in t_state else 'missing'}"
           for s, t in mapping.items() if s not in s_state or t not in t_state or s_state[s].shape != t_state[t].shape]
    if bad:
        raise ValueError(f"{what} do not fit:\n  " + "\n  ".join(bad[:20]))
    for s, t in mapping.items():
        s_state[s].copy_(t_state[t])
    return sorted(mapping)


# ----------------------------------------------------------------------------
# 7. Parameters and MACs
# ----------------------------------------------------------------------------

def head_parameter_names(student):
    """Names of parameters that exist only for distillation and are dropped afterwards.

    Only DistilHuBERT's prediction heads are dropped (SPEC 1). ARMHuBERT/CoLLD per-layer heads
    stay in the deployed model (its upstream returns projected layers), and so do the
    generator's output projections (they produce GenDistiller's output).
    """
    if not isinstance(getattr(student, "heads", None), DistilHuBERTHeads):
        return []
    return [n for n, _ in student.named_parameters() if n.startswith("heads.")]


def count_parameters(student, with_heads=True):
    drop = set() if with_heads else set(head_parameter_names(student))
    return sum(p.numel() for n, p in student.named_parameters() if n not in drop)


def count_macs(cfg: StudentConfig, seconds=10.0, with_heads=True):
    """Multiply-accumulates of one forward pass on `seconds` of audio, from the architecture.

    Counted: every conv, Linear and attention matmul (QK^T and AV). Not counted: norms,
    activations, softmax, additions, biases (small and the same for every model).
    The generator counts free-running inference as the code runs it: K steps, each over its own T
    new tokens, attending to the S * T tokens of slots 1..S (key/value cache); DistilHuBERT's heads
    are excluded when with_heads=False.
    """
    T, c_in, macs = int(seconds * data.SAMPLE_RATE), 1, 0
    for c, k, s in cfg.conv_layers:
        T = data.frame_count(T, [(c, k, s)])
        macs += T * c * c_in * k
        c_in = c
    D, F_, K = cfg.dim, cfg.ffn_dim, len(cfg.target_layers)
    if cfg.feature_projection:
        macs += T * c_in * D
    macs += T * D * (D // cfg.pos_conv_groups) * cfg.pos_conv_kernel

    def layer_macs(queries, reuse, keys=None):
        keys = queries if keys is None else keys
        proj = (2 if reuse else 4) * queries * D * D  # V, out (+ Q, K) of the new tokens
        attn = (1 if reuse else 2) * queries * keys * D  # AV (+ QK^T)
        return proj + attn + 2 * queries * D * F_

    if cfg.head == "generator":
        for S in range(1, K + 1):  # free-running step S: the T tokens of slot S attend to the S * T cached ones
            macs += sum(layer_macs(T, False, keys=S * T) for _ in range(cfg.num_layers))
        macs += (K - 1) * T * cfg.teacher_dim * D if cfg.teacher_dim != D else 0  # history_proj, once per prediction
        macs += K * T * D * cfg.teacher_dim  # output projections
        return macs
    reuses = reuse_pattern(cfg)
    macs += sum(layer_macs(T, r) for r in reuses)
    if with_heads and cfg.head == "per_layer":
        macs += K * T * D * cfg.teacher_dim  # one head per target
    if with_heads and cfg.head == "distilhubert":
        macs += T * D * K * cfg.teacher_dim + K * T * cfg.teacher_dim ** 2
    return macs


# HuBERT Base as a config of the same family, for its MACs (its parameters are counted on
# torchaudio's own model). The papers' 94.70M is the fairseq model: torchaudio's encoder
# plus mask_emb (768), final_proj (768 x 256 + 256) and the label embeddings (504 x 256).
HUBERT_BASE = StudentConfig(num_layers=12, head="per_layer", target_layers=tuple(range(1, 13)))
HUBERT_BASE_FAIRSEQ_EXTRA = 768 + (768 * 256 + 256) + 504 * 256


# ----------------------------------------------------------------------------
# 8. Export: a DistilHuBERT student as a Hugging Face HubertModel folder
#
# The student is HuBERT's front end and first N post-LN layers, exactly HubertModel's computation,
# so it leaves as a config.json + model.safetensors folder (as ntu-spml/distilhubert is published)
# that transformers.HubertModel.from_pretrained loads; its hidden_states are our hidden_states
# (transformer input, layer 1, ..., layer N; the prediction heads stay behind, as in the paper).
# ----------------------------------------------------------------------------


def export_hf(checkpoint, folder):
    """Write the distill.py checkpoint of a DistilHuBERT student to `folder` as a HubertModel."""
    import json
    import os

    student = load_student(checkpoint)
    cfg = student.cfg
    refuse = []
    if cfg.head != "distilhubert":
        refuse.append(f"head={cfg.head!r}: only DistilHuBERT students are HubertModels (ARMHuBERT's reuse layers "
                      "have no query/key projections and HF attention always computes its own map; per-layer "
                      "heads and GenDistiller's generator have no place in HubertModel)")
    if cfg.reuse != "none" or cfg.official_reuse:
        refuse.append("attention-map reuse, which HF attention does not do")
    if cfg.rel_pos_buckets:
        refuse.append("WavLM layers (gated relative position bias, which HubertModel has not)")
    if cfg.layer_norm_first:
        refuse.append("pre-LN layers (HubertModel's stable-layer-norm encoder ends in a LayerNorm this "
                      "student has not)")
    if not cfg.feature_projection:
        refuse.append("no feature projection (HubertModel always has one)")
    if refuse:
        raise ValueError(f"{checkpoint}: cannot export to a Hugging Face HubertModel: " + "; ".join(refuse))
    # the prediction heads are dropped (SPEC 1); a mask embedding has no use in an inference HubertModel
    state = {k: v for k, v in student.state_dict().items() if not k.startswith(("heads.", "front_end.mask_emb"))}
    out = {}
    for key, value in state.items():
        key = key.replace("front_end.conv_layers.", "feature_extractor.conv_layers.")
        key = key.replace("front_end.feature_norm.", "feature_projection.layer_norm.")
        key = key.replace("front_end.feature_proj.", "feature_projection.projection.")
        pos = "front_end.pos_conv.parametrizations.weight."  # weight norm's gain and direction, HF's old names
        key = key.replace(pos + "original0", "encoder.pos_conv_embed.conv.weight_g")
        key = key.replace(pos + "original1", "encoder.pos_conv_embed.conv.weight_v")
        key = key.replace("front_end.pos_conv.bias", "encoder.pos_conv_embed.conv.bias")
        key = key.replace("front_end.pos_norm.", "encoder.layer_norm.")
        key = re.sub(r"^layers\.(\d+)\.fc1\.", r"encoder.layers.\1.feed_forward.intermediate_dense.", key)
        key = re.sub(r"^layers\.(\d+)\.fc2\.", r"encoder.layers.\1.feed_forward.output_dense.", key)
        key = re.sub(r"^layers\.", "encoder.layers.", key)
        out[key] = value
    conv = [tuple(c) for c in cfg.conv_layers]
    hf = {
        "model_type": "hubert", "architectures": ["HubertModel"], "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_dim,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "feat_extract_norm": "group" if cfg.conv_norm == "group_norm" else "layer",
        "feat_extract_activation": "gelu", "feat_proj_layer_norm": True, "conv_pos_batch_norm": False,
        "conv_dim": [c for c, _, _ in conv], "conv_kernel": [k for _, k, _ in conv],
        "conv_stride": [s for _, _, s in conv], "conv_bias": cfg.conv_bias,
        "num_conv_pos_embeddings": cfg.pos_conv_kernel, "num_conv_pos_embedding_groups": cfg.pos_conv_groups,
        "do_stable_layer_norm": False, "hidden_dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout, "feat_proj_dropout": cfg.input_dropout, "final_dropout": 0.0,
        "layerdrop": 0.0, "mask_time_prob": 0.0, "mask_feature_prob": 0.0, "apply_spec_augment": False,
        "torch_dtype": "float32",
    }
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"export-hf: {folder} is not empty; choose a new or empty folder")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:  # what the student's conv expects
        json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
                   "padding_value": 0.0, "do_normalize": cfg.normalize_waveform, "return_attention_mask": False}, f,
                  indent=2)
    write_safetensors(out, os.path.join(folder, "model.safetensors"))
    return folder


def print_table():
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
        student, _ = build_student(name, base)
        paper, what = PAPER_PARAMS[name]
        with_heads = what != "without prediction heads"
        n = count_parameters(student, with_heads=with_heads)
        m = count_macs(student.cfg, with_heads=with_heads)
        paper_s = f"{paper:.2f}" if paper else "-"
        print(f"{name:<14}{n / 1e6:>11.2f}{paper_s:>10}  {what:<24}{m / 1e9:>10.2f}"
              f"{100 * n / hubert_paper:>9.1f}%{100 * m / hubert_macs:>7.1f}%")
    print(f"{'hubert_base':<14}{hubert_params / 1e6:>11.2f}{hubert_paper / 1e6:>10.2f}  "
          f"{'torchaudio; paper=fairseq':<24}{hubert_macs / 1e9:>10.2f}{100 * hubert_params / hubert_paper:>9.1f}%{100.0:>7.1f}%")
    # GenDistiller against the baseline it compares to, both as distillation trains them (with heads)
    gen = count_parameters(build_student("gendistiller", base)[0])
    distil = count_parameters(build_student("distilhubert", base)[0])
    wavlm_gen = count_parameters(build_student("gendistiller", bundle_description("wavlm_base_plus"))[0])
    print(f"GenDistiller vs DistilHuBERT with its heads ({distil / 1e6:.2f}M): {gen / distil:.3f}x the parameters "
          f"(2406.09444: 33 % fewer, 0.67x); from WavLM Base+: {wavlm_gen / 1e6:.2f}M, "
          f"{100 * wavlm_gen / 94.70e6:.1f} % of the papers' 94.70M (2406.09444: 18 %)")


def main(argv=None):
    """python model.py: the parameter / MAC table. python model.py export-hf CKPT FOLDER: export."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return print_table()
    if argv[0] == "export-hf" and len(argv) == 3:
        try:
            print(f"wrote {export_hf(argv[1], argv[2])} (transformers.HubertModel.from_pretrained loads it)")
        except ValueError as e:
            raise SystemExit(f"model.py export-hf: error: {e}")
        return None
    raise SystemExit("usage: python model.py                         (parameter / MAC table)\n"
                     "       python model.py export-hf CKPT FOLDER    (a DistilHuBERT student as a HF HubertModel)")


if __name__ == "__main__":
    main()
