"""The networks of speech SSL distillation in plain PyTorch, in reading order.

  1. the student: a wav2vec 2.0 / HuBERT encoder with attention-map reuse (Recycle-and-Distill / ARMHuBERT,
     arXiv 2305.11685), the heads of DistilHuBERT (arXiv 2110.01900), ARMHuBERT and CoLLD (arXiv 2309.07707),
     and GenDistiller's generator (arXiv 2310.13418, 2406.09444); torch alone (and data.py's frame formula)
  2. building a student: the papers' presets, the teacher layer each output predicts, the builder, checkpoints
  3. the frozen teacher (a torchaudio Wav2Vec2Model) from a bundle, a torchaudio-format, s3prl-converted or
     fairseq file (as released, without fairseq), a Hugging Face folder, or random weights (`tiny`)
  4. initialisation from the teacher (DistilHuBERT copies its first layers)
  5. parameter and MAC counts (`python model.py`), export of a DistilHuBERT student as a HF HubertModel folder
     (`python model.py export-hf CKPT FOLDER`)

Conventions. Teacher layer k (k = 1..L) is the output of transformer block k: `layers[k - 1]` here, index
k - 1 of torchaudio's extract_features, hidden_states[k] of HF / s3prl; index 0 (the transformer input) is
never a target. Tensors are batch first, (B, T, D), and lengths travel with them: data.frame_count is the one
frame formula, data.valid_frames (True on real frames) the one padding mask, and no padded frame influences
a valid one (masked conv GroupNorm, masked keys, padded frames zeroed before the positional conv).
"""
import ast
import contextlib
import functools
import json
import math
import os
import re
import struct
import sys
import types
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# ----------------------------------------------------------------------------
# 1. The student
#
# Recycle-and-Distill (ARMHuBERT, Sec. 3.1), layer l = 1..N, H heads of width d_h, x = layer input:
#   A_l = softmax(x W_Q,l (x W_K,l)^T / sqrt(d_h))   for odd l (and every l with reuse="none")
#   A_l = A_{l-1}                                     for even l: the layer has no W_Q, W_K
#   MHSA_l(x) = concat_h(A_l^h x W_V,l^h) W_O,l
# Everything else is a wav2vec 2.0 / HuBERT encoder: conv front end, feature projection, convolutional
# positional embedding, post-LN (or pre-LN) blocks. DistilHuBERT and CoLLD students are the same network
# without reuse; GenDistiller runs the layers as a generator over the teacher's layers.
#
# WavLM layers (Chen et al., arXiv 2110.13900), used when a student copies a WavLM teacher's layers:
#   A = softmax(q k^T / sqrt(d_h) + g(x) * r(t' - t)), per head; r: one learned value per head and bucket of
#   the offset t' - t (the first layer's, shared by every layer, relative_bias); g(x): each layer's gate of
#   that shared bias, computed from its own input (gated_bias).
# ----------------------------------------------------------------------------

# ARMHuBERT's conv (official code): narrower; the 1x1 convs only change channel counts, so stride (320
# samples, 20 ms) and receptive field (400 samples) are HuBERT's. The last two need channels == dim.
def armhubert_conv(dim):
    return [(128, 10, 5), (256, 1, 1)] + [(256, 3, 2)] * 4 + [(dim, 1, 1)] + [(dim, 2, 2)] * 2


@dataclass
class StudentConfig:
    """Every student of the four methods as one flat record: --FIELD=VALUE sets any field and checkpoints
    carry it. `head` picks the network: "distilhubert" and "per_layer" build a Student, "generator" a
    GenDistiller."""
    # front end: (channels, kernel, stride) per conv
    conv_layers: List[Tuple[int, int, int]] = field(default_factory=lambda: list(data.HUBERT_CONV))
    conv_norm: str = "group_norm"  # GroupNorm after the first conv only (HuBERT Base); "layer_norm": after each
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
    reuse_attention_dropout: float = 0.0  # on the map a reuse layer receives (official ARMHuBERT: none)
    activation_dropout: float = 0.1
    input_dropout: float = 0.0  # on the projected features, before masking (fairseq dropout_input)
    feature_grad_mult: float = 1.0  # gradient into the conv scaled by this (fairseq/s3prl; forward unchanged)
    layer_grad_scale: bool = False  # official ARMHuBERT `layer_grad_scale` (layer_grad_scales)
    init: str = "bert"  # "bert": fairseq's init (init_weights); "pytorch": nn defaults
    rel_pos_buckets: int = 0  # WavLM's relative position buckets (0: HuBERT layers; WavLM: 320)
    rel_pos_max_distance: int = 800  # frames, the distance of WavLM's last bucket
    fused_attention: bool = True  # scaled_dot_product_attention where no map is needed; False = explicit path
    official_reuse: bool = False  # softmax again on the reused map, as the official ARMHuBERT code
    head: str = "per_layer"  # "distilhubert" (shared + split heads), "per_layer" (one Linear per layer), "generator"
    # GenDistiller: the earlier slots a slot attends to: "all" (2310.13418's two-dimensional attention, causal
    # over layers) or "previous" (2406.09444: "takes the previous hidden layer as history"; per block)
    gen_history: str = "all"
    gen_cache: bool = True  # free-running: keep the earlier slots' keys and values; False = the plain loop
    teacher_dim: int = 768
    target_layers: Tuple[int, ...] = ()  # teacher layer (1-based) predicted by each output (fit_to_teacher)
    head_layers: Tuple[int, ...] = ()  # per_layer: the student layer each head reads; () = head i on layer i
    every_teacher_layer: bool = False  # per_layer: predict every teacher layer (CoLLD as USAD, 2506.18843, III-A)
    init_from_teacher: bool = False  # copy conv, projection, pos conv and the first layers from the teacher
    init_conv_from_teacher: bool = False  # copy only the teacher's conv and its LayerNorm (a recipe, not the papers')
    normalize_waveform: bool = False  # standardise each utterance (a copied conv of a Large / XLS-R teacher)


def dropout(x, p, training=True):
    """Inverted dropout, x * Bernoulli(1 - p) / (1 - p). note: on a CPU this form (uniform >= p, one multiply;
    another random stream) is faster forward + backward than F.dropout's; on a GPU, F.dropout's fused kernel."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = (torch.rand_like(x) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * keep


class SelfAttention(nn.Module):
    """Multi-head self-attention; a reuse layer (ARMHuBERT) has no query/key projections.

    forward(x, allowed, prev_attn=None, need_attn=False, bias=None) -> (out (B, T, D), attn or None)
      allowed: bool, broadcastable to (B, H, T, T'), True where query t may look at key t'; prev_attn: the
      previous layer's map (reuse layers); attn is returned when `need_attn`; bias: WavLM's shared r."""

    def __init__(self, dim, num_heads, dropout, reuse=False, fused=True, official_reuse=False,
                 rel_pos_buckets=0, rel_pos_max_distance=800, first=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.reuse, self.fused, self.official_reuse = reuse, fused, official_reuse
        self.dropout = dropout
        if not reuse:  # the parameters ARMHuBERT saves: no W_Q, W_K in a reuse layer
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # WavLM: the first layer owns r, every layer its gate W_g (Dh -> 8) and c (torchaudio's names)
        self.rel_pos_buckets, self.rel_pos_max_distance = rel_pos_buckets, rel_pos_max_distance
        self.rel_attn_embed = nn.Embedding(rel_pos_buckets, num_heads) if rel_pos_buckets and first else None
        if rel_pos_buckets:
            self.gru_rel_pos_linear = nn.Linear(self.head_dim, 8)
            self.gru_rel_pos_const = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def forward(self, x, allowed, prev_attn=None, need_attn=False, bias=None):
        allowed = self.mask(x, allowed, bias)
        return self.attend(x, *self.project(x), allowed, prev_attn, need_attn)

    def mask(self, x, allowed, bias):
        """WavLM layers (bias = r): the mask becomes additive, g(x) * r on the allowed keys."""
        if bias is None:
            return allowed
        return self.gated_bias(x, bias).masked_fill(~allowed, torch.finfo(x.dtype).min)  # (B, H, T, T')

    def project(self, x):
        """(q, k, v) of x (B, T, D), each (B, H, T, Dh); q and k are None in a reuse layer."""
        B, T, _ = x.shape
        heads = lambda proj: proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        v = heads(self.v_proj)
        return (None, None, v) if self.reuse else (heads(self.q_proj), heads(self.k_proj), v)

    def attend(self, x, q, k, v, allowed, prev_attn=None, need_attn=False):
        """x's T queries q over T' keys k and values v (B, H, T', Dh); T' > T in the cached generator."""
        B, T, D = x.shape
        p = self.dropout if self.training else 0.0
        if self.reuse:
            # A_l = A_{l-1}: the previous layer's probabilities of the same sample and head, as they are (no
            # renormalisation); gradients flow into that layer's Q/K through it
            attn = prev_attn  # (B, H, T, T)
            if self.official_reuse:  # the official code: softmax again, padded keys masked to -inf first
                attn = attn.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        else:
            # fast path, tested equal to the explicit one. note: on a CPU, SDPA with dropout is slower
            if self.fused and not need_attn and (p == 0.0 or x.device.type != "cpu"):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, H, T, Dh)
                return self.out_proj(out.transpose(1, 2).reshape(B, T, D)), None
            # subtle: q is scaled before the product (as fairseq): under fp16, q k^T of large activations
            # overflows 65504 before a later division could bring it back
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T')
            if allowed.dtype == torch.bool:
                scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            else:  # WavLM's additive mask
                scores = scores + allowed
            attn = scores.softmax(dim=-1)  # (B, H, T, T'), each row sums to 1 over allowed keys
        # dropout acts on a copy: the next (reuse) layer gets the pre-dropout map, as in the official code
        out = dropout(attn, p) @ v  # (B, H, T, Dh); p = 0 outside training
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(out), (attn if need_attn else None)

    def relative_bias(self, q_times, k_times):
        """WavLM's r (H, Tq, Tk) for query frames q_times (Tq,) and key frames k_times (Tk,) (first layer).
        n/2 buckets per direction (offset <= 0, > 0); within one, exact below n/4 frames, then log-spaced
        so that max_distance frames reaches the last bucket."""
        offset = k_times[None, :] - q_times[:, None]  # (Tq, Tk): t' - t
        half = self.rel_pos_buckets // 2
        exact, dist = half // 2, offset.abs()
        far = exact + (torch.log(dist.float() / exact) / math.log(self.rel_pos_max_distance / exact)
                       * (half - exact)).long()  # log(0) is never selected below
        bucket = torch.where(dist < exact, dist, far.clamp(max=half - 1)) + (offset > 0).long() * half
        return self.rel_attn_embed(bucket).permute(2, 0, 1)  # (H, Tq, Tk)

    def gated_bias(self, x, bias):
        """g(x) * r: (B, H, T, Tk) for this layer's input x (B, T, D) and the shared r (H, T, Tk);
        g(x) = a (b c - 1) + 2, (a, b) = sigmoid of sums of W_g x_h (x_h: x's head slice), c: per head."""
        B, T, _ = x.shape
        H = self.num_heads
        g = self.gru_rel_pos_linear(x.view(B, T, H, self.head_dim))  # (B, T, H, 8)
        a, b = torch.sigmoid(g.view(B, T, H, 2, 4).sum(-1)).unbind(-1)  # (B, T, H) each
        gate = a * (b * self.gru_rel_pos_const.view(H) - 1.0) + 2.0  # (B, T, H)
        return gate.transpose(1, 2)[..., None] * bias  # (B, H, T, 1) * (H, T, Tk) -> (B, H, T, Tk)


def position_bias(layers, q_times, k_times):
    """WavLM: the first layer's r (H, Tq, Tk), handed to every layer; None for HuBERT layers."""
    first = layers[0].attention
    return None if first.rel_attn_embed is None else first.relative_bias(q_times, k_times)


class TransformerLayer(nn.Module):
    """A wav2vec 2.0 / HuBERT encoder block, post-LN (Base) or pre-LN (Large). `attention`, when given,
    stands in for self.attention (same arguments and result): the generator's cached attention."""

    def __init__(self, cfg, reuse=False, first=False):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        attention_dropout = cfg.reuse_attention_dropout if reuse else cfg.attention_dropout
        self.attention = SelfAttention(cfg.dim, cfg.num_heads, attention_dropout, reuse, cfg.fused_attention,
                                       cfg.official_reuse, cfg.rel_pos_buckets, cfg.rel_pos_max_distance, first)
        self.layer_norm = nn.LayerNorm(cfg.dim)  # after attention (post-LN) / before it (pre-LN)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def ffn(self, x):
        x = dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)  # (B, T, F)
        return dropout(self.fc2(x), self.dropout, self.training)  # (B, T, D)

    def forward(self, x, allowed, prev_attn=None, need_attn=False, bias=None, attention=None):
        residual = x
        if self.layer_norm_first:
            x = self.layer_norm(x)
        x, attn = (self.attention if attention is None else attention)(x, allowed, prev_attn, need_attn, bias)
        x = residual + dropout(x, self.dropout, self.training)
        if self.layer_norm_first:
            x = x + self.ffn(self.final_layer_norm(x))
        else:
            x = self.layer_norm(x)
            x = self.final_layer_norm(x + self.ffn(x))
        return x, attn


# --- the front end: conv stack (shared with the teacher), projection, mask embedding, positional conv

def masked_instance_norm(x, lengths, norm):
    """GroupNorm(C, C) of x (B, C, T), each utterance over its own valid steps (lengths (B,)); padded steps
    come out as zeros. fairseq/torchaudio normalise over the padded tail too, so a short utterance's features
    depend on its batch. One F.group_norm per utterance (one call when nothing is padded)."""
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
    """Per-utterance zero mean, unit variance over the valid samples (what Large / XLS-R teachers were trained
    on; fairseq `normalize: True`). wav (B, S), lengths (B,) samples."""
    valid = data.valid_frames(lengths, wav.shape[1]).float()  # (B, S): valid samples
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (wav * valid).sum(1, keepdim=True) / n
    var = (((wav - mean) * valid) ** 2).sum(1, keepdim=True) / n
    return (wav - mean) / torch.sqrt(var + 1e-5) * valid


def conv_front_end(blocks, wav, lengths):
    """A HuBERT conv stack on a padded batch, student's or torchaudio's: blocks with `.conv` and `.layer_norm`
    (GroupNorm(C, C), a LayerNorm over channels, or None). wav (B, S), lengths (B,) samples.
    Returns features (B, T, C) and frame_lengths (B,)."""
    x = wav[:, None, :]  # (B, 1, S)
    for block in blocks:
        x = block.conv(x)  # (B, C, T')
        conv = block.conv
        lengths = data.frame_count(lengths, [(conv.out_channels, conv.kernel_size[0], conv.stride[0])])
        norm = block.layer_norm
        if isinstance(norm, nn.GroupNorm):  # HuBERT's GroupNorm(C, C): instance norm over time
            assert norm.num_groups == norm.num_channels, "only GroupNorm(C, C) is supported"
            x = masked_instance_norm(x, lengths, norm)
        elif norm is not None:  # per-frame LayerNorm over channels: padding cannot leak
            x = F.layer_norm(x.transpose(1, 2), norm.normalized_shape, norm.weight, norm.bias, norm.eps).transpose(1, 2)
        x = F.gelu(x)
    return x.transpose(1, 2), lengths  # (B, T, C), (B,)


class ConvBlock(nn.Module):
    """One conv of the front end, its parts named as torchaudio's so conv_front_end runs both."""

    def __init__(self, c_in, c_out, kernel, stride, bias, norm):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = norm  # GroupNorm(C, C), LayerNorm(C) or None


# POS_CONV_FP32: the positional conv runs in float32, also under autocast: PyTorch's CPU bf16 grouped conv1d
# returns wrong values (errors ~100 %) for some groups of fewer than 16 channels (torch 2.11).
class FrontEnd(nn.Module):
    """wav -> X0, the transformer input: conv stack, feature LayerNorm (+ projection), input dropout, mask
    embedding, convolutional positional embedding. forward -> (x0 (B, T, D), valid (B, T) bool, frame_lengths)."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        if cfg.conv_norm not in ("group_norm", "layer_norm"):
            raise ValueError(f"conv_norm={cfg.conv_norm!r}: expected 'group_norm' or 'layer_norm'")
        self.conv_layers, c_in = nn.ModuleList(), 1
        for i, (c, k, s) in enumerate(cfg.conv_layers):
            if cfg.conv_norm == "layer_norm":
                norm = nn.LayerNorm(c)
            else:  # "group_norm": fairseq's GroupNorm(C, C) after the first conv only
                norm = nn.GroupNorm(c, c) if i == 0 else None
            self.conv_layers.append(ConvBlock(c_in, c, k, s, cfg.conv_bias, norm))
            c_in = c
        if not cfg.feature_projection and c_in != D:
            raise ValueError(f"feature_projection=False needs the last conv to have dim={D} channels, got {c_in}")
        self.feature_norm = nn.LayerNorm(c_in)  # choice: also before a projection, as HuBERT (s3prl's has none)
        self.feature_proj = nn.Linear(c_in, D) if cfg.feature_projection else None
        self.mask_emb = nn.Parameter(torch.empty(D).uniform_()) if cfg.mask_embedding else None
        # convolutional positional embedding, weight norm over the kernel axis (as fairseq)
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
            features = ScaleGrad.apply(features, self.cfg.feature_grad_mult)
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
        with torch.autocast(x.device.type, enabled=False):  # POS_CONV_FP32
            pos = self.pos_conv(x.float().transpose(1, 2)).to(x.dtype)  # (B, D, T + 1) for an even kernel
        pos = pos[..., : x.shape[1]]  # drop the extra frame of the even kernel: (B, D, T)
        x = x + F.gelu(pos).transpose(1, 2)  # (B, T, D)
        if self.pos_norm is not None:
            x = self.pos_norm(x)
        x = dropout(x, self.cfg.dropout, self.training)
        return x, valid, frame_lengths


# --- the official code's gradient scaling and initialisation

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
    """Official ARMHuBERT `layer_grad_scale`: m_i = (N - i) / (N + 1 - i), i = 0..N-1 (12/13, ..., 1/2 for
    N = 12). Layer i's output x_i becomes GradMultiply(x_i, m_i), which feeds layer i + 1, and head i reads
    GradMultiply(that, 1 - m_i), so the gradient reaching x_i is m_i * (from above) + m_i (1 - m_i) * (from
    head i)."""
    return [(num_layers - i) / (num_layers + 1 - i) for i in range(num_layers)]


def init_weights(cfg, front_end, layers):
    """init "bert" (fairseq, official ARMHuBERT, s3prl), once the network exists: fairseq's init_bert_params
    on the transformer `layers` only (every Linear N(0, 0.02), zero bias), kaiming-normal conv kernels; the
    projection and heads keep PyTorch's defaults, the positional conv, mask and slot embeddings their own.
    "pytorch": nn defaults everywhere."""
    if cfg.init not in ("bert", "pytorch"):
        raise ValueError(f"init={cfg.init!r}: expected 'bert' or 'pytorch'")
    if cfg.init == "bert":
        for linear in [m for m in layers.modules() if isinstance(m, nn.Linear)]:
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)
        for block in front_end.conv_layers:  # fairseq ConvFeatureExtractionModel
            nn.init.kaiming_normal_(block.conv.weight)


# --- heads
#
# DistilHuBERT (Sec. 2): K heads on the last layer h_N, p_j = W_j GELU(W_s h_N)_j, j = 1..K, where
#   W_s: D -> K * D_t is shared and W_j: D_t -> D_t; dropped after distillation.
# ARMHuBERT / CoLLD: one head per layer, p_i = W_i h_i, kept in the deployed model.

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


class PerLayerHeads(nn.ModuleList):
    """One Linear(D -> Dt) per target (ARMHuBERT, MaskHuBERT, CoLLD), head j reading student layer
    head_layers[j] (1-based); several per layer when a shallower student predicts every teacher layer."""

    def __init__(self, dim, teacher_dim, head_layers, num_targets):
        self.head_layers = list(head_layers)
        if num_targets != len(self.head_layers):
            raise ValueError(f"per_layer heads need one target per head: {num_targets} targets, "
                             f"{len(self.head_layers)} heads (set target_layers and head_layers, or build with "
                             "model.build_student(preset, teacher))")
        super().__init__(nn.Linear(dim, teacher_dim) for _ in self.head_layers)

    def forward(self, hiddens):
        return [head(hiddens[i - 1]) for head, i in zip(self, self.head_layers)]


def reuse_pattern(cfg):
    """Which layers reuse the previous map: with reuse="alternate" the paper's layers 2, 4, ... (0-based odd)."""
    if cfg.reuse not in ("none", "alternate"):
        raise ValueError(f"reuse={cfg.reuse!r}: expected 'none' or 'alternate'")
    if cfg.reuse != "none" and cfg.rel_pos_buckets:
        raise ValueError("reuse='alternate' with WavLM layers (rel_pos_buckets > 0): a reused map has no "
                         "position bias of its own; set --reuse=none or --rel_pos_buckets=0")
    return [cfg.reuse == "alternate" and i % 2 == 1 for i in range(cfg.num_layers)]


class Student(nn.Module):
    """The DistilHuBERT, ARMHuBERT, MaskHuBERT and CoLLD students: front end, N layers, heads.

    forward(wav, lengths, mask=None) -> (preds, frame_lengths): preds[j] (B, T, teacher_dim) predicts teacher
      layer cfg.target_layers[j]; mask (B, T) bool: frames replaced by the mask embedding (ARMHuBERT, CoLLD).
    hidden_states(wav, lengths) -> (what the distilled model serves, frame_lengths), for SUPERB-style probes."""

    layers_key = "layers."  # where the transformer layers sit in the state dict (init_from_teacher)

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        if cfg.head not in ("distilhubert", "per_layer"):
            raise ValueError(f"head={cfg.head!r}: expected 'distilhubert' or 'per_layer' (a Student) or 'generator' "
                             "(a GenDistiller; model.build_student builds either)")
        self.cfg = cfg
        self.front_end = FrontEnd(cfg)
        self.reuses = reuse_pattern(cfg)
        self.layers = nn.ModuleList(TransformerLayer(cfg, r, first=i == 0) for i, r in enumerate(self.reuses))
        if cfg.head == "distilhubert":
            self.heads = DistilHuBERTHeads(cfg.dim, cfg.teacher_dim, len(cfg.target_layers))
        else:
            self.heads = PerLayerHeads(cfg.dim, cfg.teacher_dim, cfg.head_layers or range(1, cfg.num_layers + 1),
                                       len(cfg.target_layers))
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
            else:  # same values, gradients rescaled as the official code (layer_grad_scales)
                x = ScaleGrad.apply(x, scales[i])  # feeds layer i + 1
                hiddens.append(ScaleGrad.apply(x, 1.0 - scales[i]))  # feeds head i, built on the scaled x
        return hiddens

    def forward(self, wav, lengths, mask=None):
        x, valid, frame_lengths = self.front_end(wav, lengths, mask)
        return self.heads(self.encode(x, valid)), frame_lengths

    def hidden_states(self, wav, lengths):
        """DistilHuBERT: no heads, [X0, layer 1, ..., layer N]; per_layer heads: the projected layers, one
        output per head (ARMHuBERT's SUPERB upstream)."""
        x, valid, frame_lengths = self.front_end(wav, lengths)
        hiddens = self.encode(x, valid)
        return ([x] + hiddens if self.cfg.head == "distilhubert" else self.heads(hiddens)), frame_lengths


# --- GenDistiller (2310.13418, 2406.09444; what the papers fix and what is ours: README)
#
# Slot 0 holds X0 (the front end output), slot k the teacher layer l_k (teacher forcing) or the generator's
# own prediction of it (free-running: inference, and training with --gen_feed self). Token (k, t) attends to
# (k', t') iff t' is valid and k' <= k (gen_history "all": causal across layers, bidirectional across time) or
# k - 1 <= k' <= k ("previous"), so output slot k depends on X0 and layers l_1..l_k only:
#   p_{k+1} = W (g_k(X0, l_1, ..., l_k) + slot_k input),  k = 0..K-1,
# the slot's input added back and one output projection W shared by every step (choice: 2406.09444 names "a
# projection output layer"). WavLM's r depends on the frame offset only, the same for every pair of slots.

class Generator(nn.Module):
    """GenDistiller's generator over K slots x T frames (the rule above).

    forward(x0 (B, T, D), valid (B, T), history=None) -> K predictions (B, T, Dt); history: the K-1 teacher
      layers for teacher forcing (one parallel pass); None: free-running, with a key/value cache (cfg.gen_cache)
      or the plain loop."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        if cfg.reuse != "none":
            raise ValueError(f"reuse={cfg.reuse!r}: the GenDistiller generator has no attention-map reuse "
                             "(ARMHuBERT's); set --reuse=none")
        if cfg.gen_history not in ("all", "previous"):
            raise ValueError(f"gen_history={cfg.gen_history!r}: expected 'all' or 'previous'")
        self.cfg = cfg
        D, Dt, K = cfg.dim, cfg.teacher_dim, len(cfg.target_layers)
        self.layers = nn.ModuleList(TransformerLayer(cfg, first=i == 0) for i in range(cfg.num_layers))
        self.slot_emb = nn.Parameter(torch.randn(K, D) * 0.02)  # learned embedding of slot 0..K-1
        self.history_proj = nn.Linear(Dt, D) if Dt != D else None  # choice: only where the widths differ
        self.out_proj = nn.Linear(D, Dt)

    def embed_history(self, layer):
        """A teacher (or generated) layer (B, T, Dt) as a slot input (B, T, D)."""
        return layer if self.history_proj is None else self.history_proj(layer)

    def run(self, slots, valid):
        """One parallel pass over S slots (X0, then history), each (B, T, D): the S outputs (B, T, D)."""
        S = len(slots)
        B, T, D = slots[0].shape
        inputs = torch.stack(slots, dim=1)  # (B, S, T, D)
        x = (inputs + self.slot_emb[:S, None, :]).reshape(B, S * T, D)  # (B, S*T, D): slot-major tokens
        k = torch.arange(S, device=x.device)
        visible = k[None, :] <= k[:, None]  # (S, S): may slot k (row) see slot k' (column)
        if self.cfg.gen_history == "previous":
            visible &= k[None, :] >= k[:, None] - 1
        causal = visible.repeat_interleave(T, 0).repeat_interleave(T, 1)  # (S*T, S*T)
        allowed = causal[None, None] & valid.repeat(1, S)[:, None, None, :]  # (B, 1, S*T, S*T)
        times = torch.arange(T, device=x.device).repeat(S)  # (S*T,) frame of each token
        bias = position_bias(self.layers, times, times)  # WavLM layers: (H, S*T, S*T), else None
        for layer in self.layers:
            x, _ = layer(x, allowed, bias=bias)
        return list((x.view(B, S, T, D) + inputs).unbind(dim=1))  # each slot's input added back

    def forward(self, x0, valid, history=None):
        K = len(self.cfg.target_layers)
        if history is not None:  # teacher forcing: all K steps in one parallel pass
            if len(history) != K - 1:
                raise ValueError(f"generator needs {K - 1} history layers, got {len(history)}")
            return [self.out_proj(o) for o in self.run([x0] + [self.embed_history(h) for h in history], valid)]
        if self.cfg.gen_cache:
            return self.free_running(x0, valid)
        preds, slots = [], [x0]  # the plain loop: step k reruns slots 0..k and keeps the last output
        for k in range(K):
            preds.append(self.out_proj(self.run(slots, valid)[k]))  # (B, T, Dt)
            slots.append(self.embed_history(preds[-1]))
        return preds

    def free_running(self, x0, valid):
        """The plain loop, each step over its new slot only: attention is causal over slots, so an earlier
        slot's keys and values at every layer are those of its own step, kept in a cache (one per layer)."""
        K, T = len(self.cfg.target_layers), x0.shape[1]
        caches = [{} for _ in self.layers]
        times = torch.arange(T, device=x0.device)  # (T,) frame of each new token
        preds, slot = [], x0  # slot: this step's input (B, T, D), X0 first, then the last prediction
        for k in range(K):
            seen = min(k + 1, 2) if self.cfg.gen_history == "previous" else k + 1  # slots in the cache
            x = slot + self.slot_emb[k]  # (B, T, D)
            allowed = valid.repeat(1, seen)[:, None, None, :]  # (B, 1, 1, seen*T): valid frames of seen slots
            bias = position_bias(self.layers, times, times.repeat(seen))  # WavLM layers: (H, T, seen*T)
            for layer, cache in zip(self.layers, caches):
                x, _ = layer(x, allowed, bias=bias, attention=functools.partial(self.cached, layer.attention, cache))
            preds.append(self.out_proj(x + slot))  # (B, T, Dt), the slot's input added back
            slot = self.embed_history(preds[-1])
        return preds

    def cached(self, attention, cache, x, allowed, prev_attn=None, need_attn=False, bias=None):
        """`attention` of the new tokens x (B, T, D) over the cached earlier slots and their own, which the
        cache then keeps too (gen_history "previous": only these)."""
        allowed = attention.mask(x, allowed, bias)
        q, k, v = attention.project(x)  # (B, H, T, Dh) each
        if cache:  # the earlier slots come first: T' = cached tokens + T
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, T', Dh)
        keep = x.shape[1] if self.cfg.gen_history == "previous" else k.shape[2]
        cache["k"], cache["v"] = k[:, :, -keep:], v[:, :, -keep:]
        return attention.attend(x, q, k, v, allowed, prev_attn, need_attn)


class GenDistiller(nn.Module):
    """GenDistiller: the student front end (DistilHuBERT's, choice) and the generator. forward(wav, lengths,
    history=None) -> (preds, frame_lengths), preds[k] (B, T, Dt) predicting teacher layer cfg.target_layers[k];
    hidden_states: the same, free-running (no teacher needed)."""

    layers_key = "generator.layers."  # where the transformer layers sit in the state dict (init_from_teacher)

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        if cfg.head != "generator":
            raise ValueError(f"GenDistiller needs head='generator', got {cfg.head!r}")
        self.cfg = cfg
        self.front_end = FrontEnd(cfg)
        self.generator = Generator(cfg)
        init_weights(cfg, self.front_end, self.generator.layers)

    def cnn_features(self, wav, lengths):
        return self.front_end.cnn_features(wav, lengths)

    def forward(self, wav, lengths, history=None):
        x0, valid, frame_lengths = self.front_end(wav, lengths)
        return self.generator(x0, valid, history), frame_lengths

    def hidden_states(self, wav, lengths):
        return self(wav, lengths)


# ----------------------------------------------------------------------------
# 2. Building a student: presets, target layers, fitting to a teacher, the builder, checkpoints
#
# Target layers, for a teacher of L_t layers:
#   per-layer heads (ARMHuBERT, CoLLD): student layer i -> teacher layer phi(i) = round(i * L_t / L_s), halves
#     rounded up, never below layer 1 (layer 0, the transformer input, is never a target);
#   DistilHuBERT heads and GenDistiller outputs: teacher layers (4, 8, 12) of 12, scaled to L_t layers
#     (choice: (8, 16, 24) for a 24-layer teacher) unless set explicitly.
# ----------------------------------------------------------------------------

DEFAULT_TARGETS = (4, 8, 12)
# The papers' students of a HuBERT Base teacher (768-d, 12 layers); "gendistiller" builds a GenDistiller.
PRESETS = {
    # DistilHuBERT Table 1 / s3prl config_model.yaml: 2 teacher-initialised layers, heads -> 4, 8, 12,
    # no input dropout, feature_grad_mult 0.1
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
    # CoLLD: no size in the paper; choice: the maskhubert geometry and settings, to compare at equal size
    "colld": StudentConfig(conv_layers=armhubert_conv(480), feature_projection=False, dim=480,
                           ffn_dim=640, num_layers=12, input_dropout=0.05, every_teacher_layer=True),
    # GenDistiller: DistilHuBERT's front end and settings, ONE teacher-width generator block with one shared
    # output projection: 2406.09444's "33 % fewer parameters" than the baseline and "reduces WavLM by 82 %";
    # depth, targets and history: choices
    "gendistiller": StudentConfig(head="generator", num_layers=1, mask_embedding=False,
                                  target_layers=DEFAULT_TARGETS, init_from_teacher=True, feature_grad_mult=0.1),
}
# The papers' parameter figures (millions) and what they count; GenDistiller's from its abstract (2406.09444:
# "reduces the size of WavLM by 82 %"): 18 % of the 94.70M of the papers' tables.
PAPER_PARAMS = {"distilhubert": (23.49, "without prediction heads"), "armhubert": (26.45, "with heads"),
                "armhubert-s": (22.39, "with heads"), "maskhubert": (26.64, "with heads"),
                "colld": (None, "with heads"), "gendistiller": (0.18 * 94.70, "with output projection")}


def target_layers_for(cfg: StudentConfig, num_teacher_layers):
    """(target_layers, head_layers) by the rule above; head_layers: the student layer each per_layer head reads."""
    L_t, L_s = num_teacher_layers, cfg.num_layers
    if cfg.head == "per_layer":
        phi = [0] + [max(1, math.floor(i * L_t / L_s + 0.5)) for i in range(1, L_s + 1)]
        if not cfg.every_teacher_layer:
            return tuple(phi[1:]), ()
        # choice (CoLLD: "each and every layer of the teacher", USAD Sec. III-A): student layer i predicts
        # teacher layers phi(i-1)+1 .. phi(i), contiguous groups in depth order (24 -> 12: layers 2i-1 and 2i),
        # or phi(i) alone when that range is empty (a teacher shallower than the student)
        pairs = [(k, i) for i in range(1, L_s + 1) for k in (range(phi[i - 1] + 1, phi[i] + 1) or [phi[i]])]
        heads = tuple(i for _, i in pairs)
        return tuple(k for k, _ in pairs), (() if heads == tuple(range(1, L_s + 1)) else heads)
    if any(t > L_t for t in cfg.target_layers) or cfg.target_layers == DEFAULT_TARGETS:
        return tuple(max(1, math.floor(t * L_t / 12 + 0.5)) for t in DEFAULT_TARGETS), ()
    return cfg.target_layers, ()


def fit_to_teacher(cfg, teacher):
    """(cfg fitted to `teacher`, 'field: old -> new' notes); teacher: a Teacher or a bundle_description.
    init_from_teacher takes the whole copied geometry (DistilHuBERT's student IS the teacher's front end and
    first layers), init_conv_from_teacher the conv stack only."""
    c = teacher.config
    target_layers, head_layers = target_layers_for(cfg, teacher.num_layers)
    new = dict(teacher_dim=teacher.dim, target_layers=target_layers, head_layers=head_layers)
    if cfg.init_conv_from_teacher or cfg.init_from_teacher:  # the conv is the teacher's, fed what it expects
        new.update(conv_layers=[tuple(x) for x in c["extractor_conv_layer_config"]],
                   conv_norm=c["extractor_mode"], conv_bias=c["extractor_conv_bias"], feature_projection=True,
                   normalize_waveform=teacher.normalize_waveform)
    if cfg.init_from_teacher:
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
    """(Student or GenDistiller, notes on what was changed and why) from a PRESETS name or a StudentConfig and
    {field: value} overrides (they win over fitting), fitted to `teacher` (without one, to the presets' 12-layer
    teacher); copy_weights=False leaves out the teacher's weights (the random-weight floor)."""
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in PRESETS:
            raise ValueError(f"unknown student preset {preset_or_cfg!r}; choose from {', '.join(PRESETS)}")
        preset_or_cfg = PRESETS[preset_or_cfg]
    overrides = dict(overrides or {})
    cfg, notes = replace(preset_or_cfg, **overrides), []
    if "dim" in overrides and "conv_layers" not in overrides and not cfg.feature_projection:
        cfg = replace(cfg, conv_layers=armhubert_conv(cfg.dim))  # ARMHuBERT-style convs end in `dim` channels
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
    elif not cfg.target_layers:
        cfg = replace(cfg, **dict(zip(("target_layers", "head_layers"), target_layers_for(cfg, 12))))
        notes.append(f"target_layers -> {cfg.target_layers} (no teacher: HuBERT Base's 12 layers)")
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


def config_to_dict(cfg):
    return asdict(cfg)


def config_from_dict(d, source="checkpoint"):
    """StudentConfig from config_to_dict's form; a config whose fields are not exactly StudentConfig's is
    refused, naming `source` (the file) and the missing and unknown fields."""
    names = [f.name for f in fields(StudentConfig)]
    missing, unknown = [k for k in names if k not in d], [k for k in d if k not in names]
    if missing or unknown:
        raise ValueError(f"{source}: its student config does not fit this model.py (missing fields: "
                         f"{missing or 'none'}; unknown fields: {unknown or 'none'})")
    return StudentConfig(**{**d, "conv_layers": [tuple(c) for c in d["conv_layers"]],
                            "target_layers": tuple(d["target_layers"]), "head_layers": tuple(d["head_layers"])})


def load_student(path, device="cpu"):
    """A student (eval mode) from a distill.py checkpoint: the config travels with the weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise ValueError(f"{path}: not a distill.py checkpoint: it cannot be read as a torch file "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "student" not in ckpt:
        raise ValueError(f"{path}: not a distill.py checkpoint (expected keys 'config' and 'student')")
    student, _ = build_student(config_from_dict(ckpt["config"], path))
    student.load_state_dict(ckpt["student"])
    return student.to(device).eval()


# ----------------------------------------------------------------------------
# 3. The frozen teacher
#
# Teacher layer k = output of transformer block k, computed with the students' padding-exact conv front end,
# without grad, in float32. Every source ends in teacher_from_checkpoint(ckpt) with a torchaudio-format dict
#   {"config": kwargs of torchaudio.models.wav2vec2_model / wavlm_model, "state_dict": torchaudio key names,
#    optional "mask_emb": (D,), optional "normalize_waveform": bool},
# so the `tiny` teacher of the tests takes the same path as a real checkpoint.
# ----------------------------------------------------------------------------

BUNDLES = {  # torchaudio pipeline bundles usable as teachers: name -> torchaudio.pipelines attribute
    name: ("WAV2VEC2_" if name.startswith("xlsr") else "") + name.upper() for name in (
        "hubert_base", "hubert_large", "hubert_xlarge", "wavlm_base", "wavlm_base_plus", "wavlm_large",
        "wav2vec2_base", "wav2vec2_large", "wav2vec2_large_lv60k", "xlsr53", "xlsr_300m", "xlsr_1b", "xlsr_2b")}
# A frozen teacher runs in eval mode: converted configs have no dropout and no CTC head.
EVAL_ONLY = dict(encoder_projection_dropout=0.0, encoder_attention_dropout=0.0, encoder_ff_interm_dropout=0.0,
                 encoder_dropout=0.0, encoder_layer_drop=0.0, aux_num_out=None)
# The `tiny` teacher: HuBERT's shape (post-LN, 12 layers, HuBERT's kernels and strides) at a width that runs
# anywhere in milliseconds. choice: the "layer_norm" conv order (HuBERT Large's): with random weights the
# group-norm order maps all frames of an utterance to nearly one direction (mean cosine between frames 0.89
# at layer 1, 0.94 at layer 12), a degenerate target for CoLLD's contrastive loss; the layer-norm order keeps
# them apart (0.52 / 0.74). Like HuBERT / WavLM Large it standardises each utterance: digital silence would
# otherwise be a zero vector into each conv's LayerNorm, whose gradient at zero variance is ~1/sqrt(eps).
TINY_TEACHER_CONFIG = dict(
    EVAL_ONLY, extractor_mode="layer_norm", extractor_conv_bias=False,
    extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2, encoder_embed_dim=48,
    encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=12, encoder_num_heads=4,
    encoder_ff_interm_features=96, encoder_layer_norm_first=False)


class Teacher(nn.Module):
    """A frozen torchaudio Wav2Vec2Model (HuBERT, WavLM, wav2vec 2.0) returning every layer: always eval mode,
    no grad, no layerdrop. `exact` (--teacher_precision fp32): float32 even inside an autocast region; False
    (--teacher_precision auto): the caller's autocast, as the student.

    teacher(wav, lengths, mask=None, final_norm=False, point="block") -> (layers, frame_lengths)
      = teacher.encode(*teacher.features(wav, lengths), mask, final_norm, point)"""

    def __init__(self, model, config, mask_emb=None, normalize_waveform=False, name="teacher"):
        super().__init__()
        self.model = model
        self.config = dict(config)
        self.is_wavlm = "encoder_num_buckets" in config
        self.normalize_waveform = normalize_waveform
        self.conv_layers = [tuple(c) for c in config["extractor_conv_layer_config"]]
        self.dim, self.num_layers = config["encoder_embed_dim"], config["encoder_num_layers"]
        if mask_emb is None:  # choice: zeros, and say so
            warnings.warn(f"teacher {name!r} has no mask embedding (torchaudio bundles drop it, and this "
                          "checkpoint has no 'mask_emb'): masked frames get a zero vector")
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
        return super().train(False)  # never leaves eval mode: dropout in the targets would be noise

    @torch.no_grad()
    def cnn_features(self, wav, lengths):
        """Conv front end output (B, T, C) and frame_lengths: the `cnn:` floor of eval.py."""
        with self.precision(wav.device.type):
            wav = wav.float()
            if self.normalize_waveform:  # Large / XLS-R models were trained on standardised audio
                wav = standardize_waveform(wav, lengths)
            return conv_front_end(self.model.feature_extractor.conv_layers, wav, lengths)

    @torch.no_grad()
    def forward(self, wav, lengths, mask=None, final_norm=False, point="block"):
        return self.encode(*self.features(wav, lengths), mask, final_norm, point)

    @torch.no_grad()
    def features(self, wav, lengths):
        """Conv + feature projection, (B, T, D), and frame_lengths: the mask does not touch them, so ARMHuBERT's
        clean and masked teacher passes share them (distill.step_armhubert)."""
        with self.precision(wav.device.type):
            features, frame_lengths = self.cnn_features(wav, lengths)  # (B, T, C)
            return self.model.encoder.feature_projection(features), frame_lengths  # LayerNorm, Linear, dropout

    @torch.no_grad()
    def encode(self, x, frame_lengths, mask=None, final_norm=False, point="block"):
        """The transformer on features x (B, T, D): mask (B, T) bool, frames replaced by the mask embedding
        after the feature projection (fairseq HuBERT's order); then the positional conv and the L blocks.
        layers[k-1] (B, T, D) = output of block k (point "block") or its FFN feature ("ffn", teacher_block);
        final_norm: a pre-LN teacher's last layer goes through the encoder's final LayerNorm."""
        if point not in ("block", "ffn"):
            raise ValueError(f"point={point!r}: expected 'block' or 'ffn'")
        with self.precision(x.device.type):
            encoder = self.model.encoder
            pad = ~data.valid_frames(frame_lengths, x.shape[1])  # (B, T): torchaudio's layers take padding masks
            if mask is not None:
                x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)  # (B, T, D)
            x = x.masked_fill(pad[..., None], 0.0)  # as torchaudio: padded frames are zero
            # torchaudio's _preprocess: x + pos_conv(x), then the LayerNorm of post-LN models (pre-LN models
            # apply it after the last block)
            with torch.autocast(x.device.type, enabled=False):  # POS_CONV_FP32
                x = encoder.transformer._preprocess(x.float())
            if self.is_wavlm:  # WavLM attention takes a key padding mask, additive as its bias
                kw = dict(key_padding_mask=torch.zeros_like(pad, dtype=x.dtype).masked_fill(pad, float("-inf")))
            else:  # (B, 1, T, T)
                kw = dict(attention_mask=(-10000.0 * pad[:, None, None, :].to(x.dtype)).expand(-1, 1, x.shape[1], -1))
            layers, position_bias = [], None
            for layer in encoder.transformer.layers:  # layer(...): compiled by distill.py --compile
                if point == "ffn":
                    x, ffn, position_bias = teacher_block(layer, x, position_bias=position_bias, **kw)
                else:
                    x, position_bias = layer(x, position_bias=position_bias, **kw)
                layers.append(ffn if point == "ffn" else x)
            if final_norm and point == "block" and self.config["encoder_layer_norm_first"]:
                # pre-LN models' last LayerNorm (s3prl's hidden_states[L] and transformers 4 include it,
                # transformers 5 only last_hidden_state; extract_features and the official ARMHuBERT hooks not)
                layers[-1] = encoder.transformer.layer_norm(layers[-1])
        return layers, frame_lengths

    def hidden_states(self, wav, lengths):
        """Same signature as Student.hidden_states, so eval.py treats both alike."""
        return self(wav, lengths)


def teacher_block(layer, x, attention_mask=None, position_bias=None, key_padding_mask=None):
    """torchaudio's EncoderLayer.forward written out to expose the FFN feature, the block's feed-forward
    output before its residual addition (data2vec's target point, arXiv 2202.03555 Sec. 3.3; CoLLD's targets
    as USAD, arXiv 2506.18843 Sec. III-B, describes them). Returns (block output, FFN feature, position bias):
      post-LN (HuBERT Base): x = LN(x + attn(x)); out = LN'(x + ffn(x))
      pre-LN (Large, WavLM Large): x = x + attn(LN(x)); out = x + ffn(LN'(x))"""
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
    """torchaudio's wavlm_model when the config has WavLM's buckets, else wav2vec2_model (HuBERT, wav2vec 2.0)."""
    import torchaudio

    build = torchaudio.models.wavlm_model if "encoder_num_buckets" in config else torchaudio.models.wav2vec2_model
    return build(**config)


def teacher_from_checkpoint(ckpt, name="teacher"):
    """A Teacher from a torchaudio-format dict; the one path every source goes through."""
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
    (torchaudio format, s3prl-converted, fairseq as released)."""
    if name_or_path == "tiny":
        ckpt = random_teacher_checkpoint("tiny", seed=0)
    elif name_or_path.lower() in BUNDLES:
        config, normalize, bundle = bundle_config(name_or_path)
        try:  # the weights download from torchaudio's server on first use (cached by torch.hub)
            state = bundle._get_state_dict(None)
        except OSError as e:  # no network, a proxy, a full disk
            raise ValueError(f"--teacher {name_or_path}: torchaudio could not download the bundle ({e}); without "
                             "a network pass a local teacher file or folder") from e
        ckpt = {"config": config, "state_dict": state, "normalize_waveform": normalize}
    elif os.path.isdir(name_or_path):
        ckpt = hf_to_torchaudio(name_or_path)
    elif os.path.isfile(name_or_path):
        raw = read_checkpoint(name_or_path)
        raw, keys = (raw, list(raw)[:10]) if isinstance(raw, dict) else ({}, type(raw).__name__)
        cfg = raw.get("cfg")
        if "config" in raw and "state_dict" in raw:  # torchaudio format
            ckpt = raw
        elif "model_weight" in raw and "model_cfg" in raw:  # s3prl-converted
            ckpt = fairseq_to_torchaudio(raw["model_weight"], raw["model_cfg"], raw.get("task_cfg"))
        elif "model" in raw and (cfg or raw.get("args")):  # fairseq: hydra cfg (WavLM's own: the model's) or args
            model_cfg, task_cfg = (cfg.get("model", cfg), cfg.get("task")) if cfg else (raw["args"], raw["args"])
            ckpt = fairseq_to_torchaudio(raw["model"], model_cfg, task_cfg)
        else:
            raise ValueError(f"--teacher {name_or_path}: unknown checkpoint format (top-level keys {keys}); "
                             "expected {'config','state_dict'} (torchaudio), {'model_cfg','model_weight'} "
                             "(s3prl-converted), {'cfg' or 'args','model'} (fairseq) or a Hugging Face folder")
    elif os.sep in name_or_path or name_or_path.endswith((".pt", ".pth", ".ckpt")):
        raise ValueError(f"--teacher {name_or_path}: no such file")
    else:
        raise ValueError(f"--teacher {name_or_path!r}: not a file, not 'tiny' and not a bundle name "
                         f"(bundles: {', '.join(BUNDLES)})")
    return teacher_from_checkpoint(ckpt, name=name_or_path).to(device)


def bundle_config(name):
    """(torchaudio model kwargs, normalize_waveform, the pipeline) of a bundle in BUNDLES; nothing is downloaded."""
    import torchaudio

    bundle = getattr(torchaudio.pipelines, BUNDLES[name.lower()])
    config = dict(bundle._params)
    if bundle._model_type == "WavLM":  # the kwargs of wavlm_model: marked by encoder_num_buckets
        config.setdefault("encoder_num_buckets", 320)
    return config, bundle._normalize_waveform, bundle


def bundle_description(name):
    """What fit_to_teacher reads of a teacher, for a bundle, without building it."""
    config, normalize, _ = bundle_config(name)
    return types.SimpleNamespace(config=config, dim=config["encoder_embed_dim"],
                                 num_layers=config["encoder_num_layers"], normalize_waveform=normalize)


def random_teacher_checkpoint(name="tiny", seed=0):
    """A seeded random teacher as a torchaudio-format dict: `tiny`, or a bundle's geometry (no download)."""
    if name == "tiny":
        config, normalize = TINY_TEACHER_CONFIG, True
    elif name.lower() in BUNDLES:
        config, normalize, _ = bundle_config(name)
    else:
        raise ValueError(f"random:{name}: not a teacher bundle name ({', '.join(BUNDLES)}) nor 'tiny'")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torchaudio_model(config)
        mask_emb = torch.rand(config["encoder_embed_dim"])  # fairseq inits mask_emb uniform
    return {"config": config, "state_dict": model.state_dict(), "mask_emb": mask_emb, "normalize_waveform": normalize}


def random_teacher(name="tiny", seed=0):
    """A Teacher with random weights (random_teacher_checkpoint), named `random:NAME`."""
    return teacher_from_checkpoint(random_teacher_checkpoint(name, seed), name=f"random:{name}")


# --- converters: fairseq / s3prl and Hugging Face names and configs to torchaudio's, in plain code

def rename(key, table):
    """`key` renamed by the first (pattern, target) of `table` that matches it whole; None if none does."""
    for pattern, target in table:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    return None


def rename_keys(weights, table):
    """(weights with every key renamed by `table`, the keys no pattern matches)."""
    renamed = {key: rename(key, table) for key in weights}
    return {new: weights[key] for key, new in renamed.items() if new}, [k for k, new in renamed.items() if not new]


def join_wavlm_qkv(state, num_layers):
    """torchaudio's WavLM attention is an nn.MultiheadAttention: q, k, v become one in_proj (in place)."""
    for i in range(num_layers):
        p = f"encoder.transformer.layers.{i}.attention."
        for kind in ("weight", "bias"):
            state[f"{p}attention.in_proj_{kind}"] = torch.cat([state.pop(f"{p}{n}_proj.{kind}") for n in "qkv"])
            state[f"{p}attention.out_proj.{kind}"] = state.pop(f"{p}out_proj.{kind}")  # in_proj: (3D, D) / (3D,)


def parse_conv_layers(spec):
    """fairseq's conv_feature_layers, e.g. "[(512,10,5)] + [(512,3,2)] * 4", parsed without eval(): only
    lists, tuples, integers, `+` and `*`."""
    if not isinstance(spec, str):
        return [tuple(c) for c in spec]

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)} in {spec!r}")

    return [tuple(c) for c in ev(ast.parse(spec, mode="eval").body)]


def pos_conv_keys(prefix):
    """(pattern, torchaudio key) of the weight-normed positional conv under `prefix`: gain and direction by
    the old names (weight_g, weight_v) or the parametrization's (original0, original1), and its bias."""
    t = "encoder.transformer.pos_conv_embed.conv."
    return [(prefix + r"(?:weight_g|parametrizations\.weight\.original0)", t + "parametrizations.weight.original0"),
            (prefix + r"(?:weight_v|parametrizations\.weight\.original1)", t + "parametrizations.weight.original1"),
            (prefix + r"bias", t + "bias")]


_L, _TL = r"encoder\.layers\.(\d+)\.", r"encoder.transformer.layers.\1."
FAIRSEQ_TO_TORCHAUDIO = [  # fairseq (HuBERT / WavLM / wav2vec 2.0) key -> torchaudio key
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
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
# Pre-training-only parameters (HuBERT's label projection, wav2vec 2.0's quantizer); mask_emb is kept apart.
FAIRSEQ_DROPPED = re.compile(r"^(final_proj|label_embs_concat|label_embs|quantizer|project_q|project_inp|target_glu)\b")
FAIRSEQ_CONFIG = {  # torchaudio kwarg: (fairseq field, fairseq's default)
    "encoder_embed_dim": ("encoder_embed_dim", 768), "encoder_pos_conv_kernel": ("conv_pos", 128),
    "encoder_pos_conv_groups": ("conv_pos_groups", 16), "encoder_num_layers": ("encoder_layers", 12),
    "encoder_num_heads": ("encoder_attention_heads", 12), "encoder_ff_interm_features": ("encoder_ffn_embed_dim", 3072),
}


def fairseq_to_torchaudio(weights, cfg, task_cfg=None):
    """An s3prl-converted / fairseq state dict and config as the torchaudio-format dict."""
    config = dict(EVAL_ONLY, **{k: cfg.get(name, default) for k, (name, default) in FAIRSEQ_CONFIG.items()},
                  extractor_mode="layer_norm" if cfg.get("extractor_mode") == "layer_norm" else "group_norm",
                  extractor_conv_layer_config=parse_conv_layers(
                      cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")),
                  extractor_conv_bias=bool(cfg.get("conv_bias", False)),
                  encoder_layer_norm_first=bool(cfg.get("layer_norm_first", False)))
    if cfg.get("relative_position_embedding", False):  # WavLM
        config.update(encoder_num_buckets=cfg.get("num_buckets", 320),
                      encoder_max_distance=cfg.get("max_distance", 800))
    state, unmapped = rename_keys({k: v for k, v in weights.items()
                                   if k != "mask_emb" and not FAIRSEQ_DROPPED.match(k)}, FAIRSEQ_TO_TORCHAUDIO)
    if unmapped:
        raise ValueError(f"unknown fairseq keys ({len(unmapped)}), cannot map to torchaudio: {unmapped[:20]}")
    if "encoder_num_buckets" in config:
        join_wavlm_qkv(state, config["encoder_num_layers"])
    normalize = bool((task_cfg or {}).get("normalize", cfg.get("normalize", False)))
    return {"config": config, "state_dict": state, "mask_emb": weights.get("mask_emb"), "normalize_waveform": normalize}


class PickledObject:
    """Stands in for a class a pickle names but this program does not import (argparse.Namespace, omegaconf
    containers, fairseq enums): it keeps the constructor arguments and the pickled state; nothing of it runs."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state):
        self.state = state


def plain_data(x, _path=()):
    """PickledObjects (recursively) as plain data: an omegaconf container as its content, an omegaconf value
    node as its value, a namespace as its attributes, an enum as its value; a structure that contains itself
    is refused."""
    if id(x) in _path:
        raise ValueError("a pickled config that contains itself cannot be read as plain data")
    plain = functools.partial(plain_data, _path=_path + (id(x),))
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
    """torch.load with weights_only=True. A pickle naming classes the safe loader refuses (a fairseq checkpoint
    as released: argparse.Namespace, omegaconf, fairseq enums) is read again with each such class a
    PickledObject (no fairseq or omegaconf needed, no code from the pickle run), with a warning. The refused
    names come from the loader's own errors, one at a time, so both torch file formats work."""
    stub = lambda name: type(name.rpartition(".")[2], (PickledObject,), {})  # noqa: E731
    try:  # zip files list their globals up front (one load, not one per class); the loop finds the rest
        stubs = {name: stub(name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)}
    except Exception:  # the format of torch < 1.6, or not a torch file at all (the loop says which)
        stubs = {}
    first = None  # stubs: refused class name -> its stand-in
    while True:
        try:
            with torch.serialization.safe_globals([(cls, name) for name, cls in stubs.items()]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # pickle errors come in many types
            first = first or e
            found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
            if not found or found.group(1) in stubs:
                # note: torch's own message advises weights_only=False, wrong advice for an untrusted file
                reason = str(first).strip().splitlines()[0][:160] if str(first).strip() else ""
                if reason.startswith("Weights only load failed"):
                    reason = "its pickle holds objects the safe loader refuses"
                raise ValueError(f"{path}: not a readable torch checkpoint ({type(first).__name__}: {reason})") from e
            stubs[found.group(1)] = stub(found.group(1))
    if not stubs:
        return raw
    warnings.warn(f"{path}: its pickle names classes the safe loader refuses ({', '.join(stubs)}); "
                  "they were read as plain data (dicts, lists, strings), without importing or running them")
    return plain_data(raw)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""
    if sys.byteorder != "little":
        raise ValueError(f"{path}: safetensors holds little-endian tensors; this machine is big-endian")
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        body, out = memoryview(f.read()), {}
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name}: dtype {info['dtype']} is not supported")
        dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
        t = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def write_safetensors(tensors, path):
    """The inverse of read_safetensors, the header padded to 8 bytes."""
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
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))


HF_TO_TORCHAUDIO = [  # Hugging Face key (without a ...ForCTC model prefix) -> torchaudio key
    (r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.\2.\3"),
    (r"feature_projection\.(layer_norm|projection)\.(weight|bias)", r"encoder.feature_projection.\1.\2"),
    *pos_conv_keys(r"encoder\.pos_conv_embed\.conv\."),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.(.+)", r"encoder.transformer.layers.\1.\2"),
]
HF_CONFIG = {  # torchaudio kwarg: config.json field
    "encoder_embed_dim": "hidden_size", "encoder_pos_conv_kernel": "num_conv_pos_embeddings",
    "encoder_pos_conv_groups": "num_conv_pos_embedding_groups", "encoder_num_layers": "num_hidden_layers",
    "encoder_num_heads": "num_attention_heads", "encoder_ff_interm_features": "intermediate_size",
}
HF_WAVLM_CONFIG = {"encoder_num_buckets": "num_buckets", "encoder_max_distance": "max_bucket_distance"}
HF_MODEL_TYPES = ("hubert", "wav2vec2", "wavlm")


def hf_to_torchaudio(folder):
    """A Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin) of HuBERT, WavLM or
    wav2vec 2.0, post-LN or "stable layer norm" pre-LN, as the torchaudio-format dict; masked_spec_embed is
    the mask embedding, preprocessor_config.json's do_normalize says whether audio is standardised. Teacher
    layer k equals HF hidden_states[k] (transformers 5: a pre-LN model's final LayerNorm is in
    last_hidden_state only, final_norm=True here)."""
    def fail(what):
        return ValueError(f"--teacher {folder}: {what}")

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise fail("a folder without config.json (expected a Hugging Face model folder)")
    with open(path) as f:
        hf = json.load(f)
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise fail(f"model_type {kind!r} in config.json; expected one of {HF_MODEL_TYPES}")
    expected = dict(hidden_act="gelu", feat_extract_activation="gelu", layer_norm_eps=1e-5, conv_pos_batch_norm=False,
                    **({"feat_proj_layer_norm": True} if kind == "hubert" else {}))  # wav2vec2 has no such field
    problems = [f"{k}={hf.get(k)!r}" for k, ok in expected.items() if hf.get(k, ok) != ok]
    if problems:
        raise fail(f"{', '.join(problems)} in config.json has no torchaudio counterpart")
    names = {**HF_CONFIG, **(HF_WAVLM_CONFIG if kind == "wavlm" else {})}
    missing = [k for k in ["conv_dim", "conv_kernel", "conv_stride", *names.values()] if k not in hf]
    if missing:
        raise fail(f"config.json lacks {missing} (a {kind} config written by save_pretrained has them)")
    config = dict(EVAL_ONLY, **{k: hf[name] for k, name in names.items()},
                  extractor_mode="group_norm" if hf.get("feat_extract_norm", "group") == "group" else "layer_norm",
                  extractor_conv_layer_config=list(zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"])),
                  extractor_conv_bias=bool(hf.get("conv_bias", False)),
                  encoder_layer_norm_first=bool(hf.get("do_stable_layer_norm", False)))
    files = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")]
    if os.path.isfile(files[0]):
        weights = read_safetensors(files[0])
    elif os.path.isfile(files[1]):
        weights = torch.load(files[1], map_location="cpu", weights_only=True)
    else:
        raise fail("no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)")
    weights = {re.sub(r"^(wav2vec2|hubert|wavlm)\.", "", k): v for k, v in weights.items()}  # ...ForCTC prefix
    # heads of ...ForCTC / ...ForPreTraining (lm_head, quantizer, project_q, ...) are not the teacher
    state, unmapped = rename_keys({k: v for k, v in weights.items()
                                   if k.startswith(("feature_extractor.", "feature_projection.", "encoder."))},
                                  HF_TO_TORCHAUDIO)
    if unmapped:
        raise fail(f"unknown Hugging Face keys ({len(unmapped)}): {unmapped[:20]}")
    if kind == "wavlm":
        join_wavlm_qkv(state, config["encoder_num_layers"])
    normalize = False
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        with open(os.path.join(folder, "preprocessor_config.json")) as f:
            normalize = bool(json.load(f).get("do_normalize", False))
    return {"config": config, "state_dict": state, "mask_emb": weights.get("masked_spec_embed"),
            "normalize_waveform": normalize}


# ----------------------------------------------------------------------------
# 4. Initialisation from the teacher
#
# DistilHuBERT (Sec. 2): the student's conv front end, projection, positional conv and its N layers start as
# the teacher's front end and first N layers (GenDistiller: the same, choice).
# ----------------------------------------------------------------------------

TORCHAUDIO_TO_STUDENT = [  # torchaudio key -> student key (a layer's as "<index>.<name>")
    (r"feature_extractor\.(conv_layers\..+)", r"front_end.\1"),
    (r"encoder\.feature_projection\.layer_norm\.(.+)", r"front_end.feature_norm.\1"),
    (r"encoder\.feature_projection\.projection\.(.+)", r"front_end.feature_proj.\1"),
    (r"encoder\.transformer\.pos_conv_embed\.conv\.(.+)", r"front_end.pos_conv.\1"),
    (r"encoder\.transformer\.layer_norm\.(.+)", r"front_end.pos_norm.\1"),  # post-LN: after the pos conv
    (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(.+)", r"\1.fc1.\2"),
    (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.output_dense\.(.+)", r"\1.fc2.\2"),
    (r"encoder\.transformer\.layers\.(\d+)\.(.+)", r"\1.\2"),  # attention (WavLM's too), both LayerNorms
]


def teacher_state(teacher):
    """The teacher's state dict with WavLM attention in HuBERT's names: torchaudio keeps WavLM's q, k, v as
    one in_proj of nn.MultiheadAttention (rows q, k, v) under attention.attention; here they are
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


def teacher_to_student_keys(teacher, num_layers, layers="layers."):
    """Student key -> teacher key of the parts DistilHuBERT copies: the front end and the first `num_layers`
    transformer layers (under `layers`: "layers." in a Student, "generator.layers." in a GenDistiller)."""
    keys = {}
    for t in teacher_state(teacher):
        s = rename(t, TORCHAUDIO_TO_STUDENT)
        if s.startswith("front_end.pos_norm.") and teacher.config["encoder_layer_norm_first"]:
            continue  # a pre-LN teacher's LayerNorm follows its last block: the student has none there
        if not s.startswith("front_end."):
            if int(s.split(".")[0]) >= num_layers:
                continue
            s = layers + s
        keys[s] = t
    return keys


@torch.no_grad()
def copy_from_teacher(student, teacher, mapping, what):
    """Copy teacher tensors into the student by `mapping` (student key -> teacher key) once every shape fits;
    else raise "`what` do not fit" listing the mismatches. Returns the copied student keys."""
    s_state, t_state = student.state_dict(), teacher_state(teacher)
    bad = [f"{s} {tuple(s_state[s].shape) if s in s_state else 'missing'} <- {t} "
           f"{tuple(t_state[t].shape) if t in t_state else 'missing'}"
           for s, t in mapping.items() if s not in s_state or t not in t_state or s_state[s].shape != t_state[t].shape]
    if bad:
        raise ValueError(f"{what} do not fit:\n  " + "\n  ".join(bad[:20]))
    for s, t in mapping.items():
        s_state[s].copy_(t_state[t])
    return sorted(mapping)


def init_from_teacher(student, teacher):
    """Copy the teacher's conv, projection, positional conv and first layers into the student (DistilHuBERT;
    GenDistiller too, choice); from a WavLM teacher with its gates and bias."""
    if teacher.is_wavlm and not student.cfg.rel_pos_buckets:
        raise ValueError("init_from_teacher from a WavLM teacher needs WavLM layers in the student "
                         "(rel_pos_buckets > 0; model.build_student sets it from the teacher)")
    mapping = teacher_to_student_keys(teacher, min(student.cfg.num_layers, teacher.num_layers), student.layers_key)
    return copy_from_teacher(student, teacher, mapping, "init_from_teacher: student and teacher shapes")


def init_conv_from_teacher(student, teacher):
    """Copy only the teacher's conv front end and the LayerNorm on its features (--init_conv_from_teacher)."""
    mapping = {s: t for s, t in teacher_to_student_keys(teacher, 0).items()
               if s.startswith(("front_end.conv_layers.", "front_end.feature_norm."))}
    return copy_from_teacher(student, teacher, mapping, "init_conv_from_teacher: student and teacher conv shapes")


# ----------------------------------------------------------------------------
# 5. Parameters and MACs; export to Hugging Face
# ----------------------------------------------------------------------------

def count_parameters(student, with_heads=True):
    """with_heads=False leaves out what is dropped after distillation: DistilHuBERT's heads (per-layer heads
    and the generator's output projection produce the deployed model's outputs)."""
    drop = not with_heads and isinstance(getattr(student, "heads", None), DistilHuBERTHeads)
    return sum(p.numel() for n, p in student.named_parameters() if not (drop and n.startswith("heads.")))


def count_macs(cfg: StudentConfig, seconds=10.0, with_heads=True):
    """Multiply-accumulates of one forward pass on `seconds` of audio: every conv, Linear and attention matmul
    (QK^T and AV); not norms, activations, softmax, additions, biases. The generator counts free-running
    inference with the key/value cache: K steps, each over its T new tokens attending to the S * T tokens of
    slots 1..S. with_heads=False leaves DistilHuBERT's heads out."""
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
        macs += K * T * D * cfg.teacher_dim  # output projection
        return macs
    macs += sum(layer_macs(T, r) for r in reuse_pattern(cfg))
    if with_heads and cfg.head == "per_layer":
        macs += K * T * D * cfg.teacher_dim  # one head per target
    if with_heads and cfg.head == "distilhubert":
        macs += T * D * K * cfg.teacher_dim + K * T * cfg.teacher_dim ** 2
    return macs


# HuBERT Base as a config of the same family, for its MACs. Its parameters: the papers' 94.70M, fairseq's model
# (torchaudio's 94.37M encoder plus mask_emb, final_proj and the label embeddings).
HUBERT_BASE = StudentConfig(num_layers=12, head="per_layer", target_layers=tuple(range(1, 13)))
HUBERT_BASE_PARAMS = 94.70e6

# A DistilHuBERT student is HuBERT's front end and first N post-LN layers, exactly HubertModel's computation, so
# it leaves as a config.json + model.safetensors folder (as ntu-spml/distilhubert is published) whose
# hidden_states are our hidden_states; the prediction heads stay behind, as in the paper.
STUDENT_TO_HF = [  # student key -> HubertModel key
    (r"front_end\.conv_layers\.(.+)", r"feature_extractor.conv_layers.\1"),
    (r"front_end\.feature_norm\.(.+)", r"feature_projection.layer_norm.\1"),
    (r"front_end\.feature_proj\.(.+)", r"feature_projection.projection.\1"),
    (r"front_end\.pos_conv\.parametrizations\.weight\.original0", "encoder.pos_conv_embed.conv.weight_g"),
    (r"front_end\.pos_conv\.parametrizations\.weight\.original1", "encoder.pos_conv_embed.conv.weight_v"),
    (r"front_end\.pos_conv\.bias", "encoder.pos_conv_embed.conv.bias"),
    (r"front_end\.pos_norm\.(.+)", r"encoder.layer_norm.\1"),
    (r"layers\.(\d+)\.fc1\.(.+)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"layers\.(\d+)\.fc2\.(.+)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"layers\.(.+)", r"encoder.layers.\1"),  # attention, layer_norm, final_layer_norm: the same names
]


def export_hf(checkpoint, folder):
    """Write the distill.py checkpoint of a DistilHuBERT student to `folder` as a HubertModel."""
    student = load_student(checkpoint)
    cfg = student.cfg
    refuse = [why for bad, why in [
        (cfg.head != "distilhubert", f"head={cfg.head!r}: only DistilHuBERT students are HubertModels (ARMHuBERT's "
         "reuse layers have no query/key projections and HF attention always computes its own map; per-layer heads "
         "and GenDistiller's generator have no place in HubertModel)"),
        (cfg.reuse != "none" or cfg.official_reuse, "attention-map reuse, which HF attention does not do"),
        (cfg.rel_pos_buckets, "WavLM layers (gated relative position bias, which HubertModel has not)"),
        (cfg.layer_norm_first, "pre-LN layers (HubertModel's stable-layer-norm encoder ends in a LayerNorm this "
         "student has not)"),
        (not cfg.feature_projection, "no feature projection (HubertModel always has one)")] if bad]
    if refuse:
        raise ValueError(f"{checkpoint}: cannot export to a Hugging Face HubertModel: " + "; ".join(refuse))
    # the prediction heads stay behind; a mask embedding has no use in inference
    state, unmapped = rename_keys({k: v for k, v in student.state_dict().items()
                                   if not k.startswith(("heads.", "front_end.mask_emb"))}, STUDENT_TO_HF)
    assert not unmapped, unmapped
    conv_dim, conv_kernel, conv_stride = map(list, zip(*cfg.conv_layers))
    hf = dict(model_type="hubert", architectures=["HubertModel"], torch_dtype="float32", hidden_size=cfg.dim,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim,
              hidden_act="gelu", layer_norm_eps=1e-5, do_stable_layer_norm=False, feat_extract_activation="gelu",
              feat_extract_norm="group" if cfg.conv_norm == "group_norm" else "layer", conv_dim=conv_dim,
              conv_kernel=conv_kernel, conv_stride=conv_stride, conv_bias=cfg.conv_bias, feat_proj_layer_norm=True,
              num_conv_pos_embeddings=cfg.pos_conv_kernel, num_conv_pos_embedding_groups=cfg.pos_conv_groups,
              conv_pos_batch_norm=False, hidden_dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
              activation_dropout=cfg.activation_dropout, feat_proj_dropout=cfg.input_dropout, final_dropout=0.0,
              layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0, apply_spec_augment=False)
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"export-hf: {folder} is not empty; choose a new or empty folder")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:  # what the student's conv expects
        json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
                   "padding_value": 0.0, "do_normalize": cfg.normalize_waveform, "return_attention_mask": False}, f,
                  indent=2)
    write_safetensors(state, os.path.join(folder, "model.safetensors"))
    return folder


def print_table():
    base = bundle_description("hubert_base")  # a HuBERT Base-sized teacher, for fit_to_teacher
    hubert_macs = count_macs(HUBERT_BASE, with_heads=False)
    print("Students fitted to a HuBERT Base teacher (768-d, 12 layers). MACs: one forward on 10 s of audio.")
    print("% of HuBERT Base: of the papers' 94.70M (fairseq's count) and of HuBERT Base's MACs by the same formula.")
    print(f"{'model':<14}{'params (M)':>11}{'paper (M)':>10}  {'counted':<24}{'GMACs/10s':>10}{'params %':>10}"
          f"{'MACs %':>8}")
    for name in PRESETS:
        student, _ = build_student(name, base)
        paper, what = PAPER_PARAMS[name]
        with_heads = what != "without prediction heads"
        n, m = count_parameters(student, with_heads), count_macs(student.cfg, with_heads=with_heads)
        paper = f"{paper:.2f}" if paper else "-"
        print(f"{name:<14}{n / 1e6:>11.2f}{paper:>10}  {what:<24}{m / 1e9:>10.2f}"
              f"{100 * n / HUBERT_BASE_PARAMS:>9.1f}%{100 * m / hubert_macs:>7.1f}%")
    print(f"{'hubert_base':<14}{'-':>11}{HUBERT_BASE_PARAMS / 1e6:>10.2f}  {'fairseq':<24}{hubert_macs / 1e9:>10.2f}")
    # GenDistiller against the baseline it compares to, both as distillation trains them (with heads)
    gen = count_parameters(build_student("gendistiller", base)[0])
    distil = count_parameters(build_student("distilhubert", base)[0])
    wavlm_gen = count_parameters(build_student("gendistiller", bundle_description("wavlm_base_plus"))[0])
    print(f"GenDistiller vs DistilHuBERT with its heads ({distil / 1e6:.2f}M): {gen / distil:.3f}x the parameters "
          f"(2406.09444: 33 % fewer, 0.67x); from WavLM Base+: {wavlm_gen / 1e6:.2f}M, "
          f"{100 * wavlm_gen / HUBERT_BASE_PARAMS:.1f} % of the papers' 94.70M (2406.09444: 18 %)")


def main(argv=None):
    """python model.py: the parameter / MAC table. python model.py export-hf CKPT FOLDER: export."""
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
