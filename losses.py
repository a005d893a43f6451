"""Distillation losses of the four methods: batch-first (B, T, D), padding-aware, torch only.

- DistilHuBERT (Chang et al., arXiv 2110.01900, Eq. 1): `distilhubert_loss`.
- ARMHuBERT masking distillation (Jang et al., arXiv 2305.11685, Sec. 3.2; official code sungnyun/ARMHuBERT):
  `masking_distillation_loss`.
- CoLLD contrastive layer-to-layer distillation (Chang et al., arXiv 2309.07707; its design as its first author
  describes it in USAD, arXiv 2506.18843, Sec. III; no public code: the details marked "choice" are ours): `colld_loss`.
- GenDistiller (Gao et al., arXiv 2310.13418 and 2406.09444): `gendistiller_loss`.
Each docstring writes its loss's equation; the targets t_l come from `teacher_targets`.

Convention: every loss averages over valid frames t < frame_lengths[b] only, so padding never reaches a loss
(s3prl's DistilHuBERT and the official ARMHuBERT code average over padding too). Each loss returns (total, parts):
a scalar with grad and a dict of detached scalars for logging ("_" keys are metrics, not loss terms).
"""
import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Boundary checks, padding mask, masked mean, and the targets every loss compares with


def _check(name, preds, targets, frame_lengths, mask=None):
    """Boundary check: the same non-zero number of layers, equal (B, T, D), lengths within T, mask (B, T)."""
    shapes = [tuple(p.shape) for p in preds], [tuple(t.shape) for t in targets]
    if not preds or shapes[0] != shapes[1] or any(len(shape) != 3 for shape in shapes[0]):
        raise ValueError(f"{name}: prediction shapes {shapes[0]} vs target shapes {shapes[1]}; expected the same "
                         "non-zero number of layers, each (B, T, D)")
    B, T, _ = preds[0].shape
    if frame_lengths.shape != (B,) or int(frame_lengths.max()) > T:
        raise ValueError(f"{name}: frame_lengths {tuple(frame_lengths.shape)} with max "
                         f"{int(frame_lengths.max())} does not fit a batch of B={B}, T={T}")
    if mask is not None and mask.shape != (B, T):
        raise ValueError(f"{name}: mask {tuple(mask.shape)}, expected (B, T) = ({B}, {T})")


def _valid(frame_lengths, T):
    """(B, T) bool, True at the valid frames t < frame_lengths[b] (data.valid_frames, copied)."""
    return torch.arange(T, device=frame_lengths.device)[None, :] < frame_lengths[:, None]


def _masked_mean(x, mask):
    """Mean of x (B, T) over the True entries of mask (B, T); 0 with grad, not NaN, if none (the clamp)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def teacher_targets(layers, target_layers, target_norm="none"):
    """The distillation targets t_l: teacher layer k = layers[k - 1] for k in target_layers. target_norm
    "layer_norm" (--target_norm): each target frame normalised over the teacher dimension without parameters,
    y = (t - mean_d t) / sqrt(var_d t + 1e-5) (as data2vec's targets), for pre-LN teachers (Large models, the kit
    teacher), whose residual stream grows with depth; post-LN blocks already end in a LayerNorm."""
    targets = [layers[k - 1].float() for k in target_layers]  # float32 also from a teacher under autocast
    if target_norm == "layer_norm":
        targets = [F.layer_norm(t, t.shape[-1:]) for t in targets]
    elif target_norm != "none":
        raise ValueError(f"target_norm={target_norm!r}: expected 'none' or 'layer_norm'")
    return targets


# -----------------------------------------------------------------------------
# DistilHuBERT (arXiv 2110.01900) and GenDistiller (arXiv 2310.13418, 2406.09444)


def distilhubert_loss(preds, targets, frame_lengths, cos_weight=1.0, frames=None):
    """DistilHuBERT Eq. 1, averaged over valid frames only:

        L = 1/|L| sum_l [ 1/(N D) sum_{b,t valid} sum_d |p_l[b,t,d] - t_l[b,t,d]|
                          + lambda * 1/N sum_{b,t valid} -log sigmoid(cos(p_l[b,t], t_l[b,t])) ]

    p_l = preds[l] (B, T, D) (prediction head output), t_l = targets[l] (B, T, D) (teacher layer), N = number of
    valid frames (frame_lengths.sum()), D = feature size, lambda = cos_weight (1 in the paper), |L| = len(preds).
    frames (B, T) bool, optional: average over these valid frames only (CoLLD's L1-cosine ablation: the masked
    frames). parts: "l1" and "cos", the unweighted terms averaged over layers, so total = l1 + cos_weight * cos.
    """
    _check("distilhubert_loss", preds, targets, frame_lengths)
    frame_lengths = frame_lengths.to(preds[0].device)  # lengths may arrive on the CPU
    valid = _valid(frame_lengths, preds[0].shape[1])  # (B, T)
    if frames is not None:
        valid = valid & frames.to(valid.device)
    l1_sum, cos_sum = 0.0, 0.0
    for p, t in zip(preds, targets):
        p, t = p.float(), t.float()  # the loss is computed in float32 even under autocast
        l1_sum = l1_sum + _masked_mean((p - t).abs().mean(dim=-1), valid)  # mean over d, then valid frames
        cos_sum = cos_sum + _masked_mean(-F.logsigmoid(F.cosine_similarity(p, t, dim=-1)), valid)
    l1, cos = l1_sum / len(preds), cos_sum / len(preds)
    return l1 + cos_weight * cos, {"l1": l1.detach(), "cos": cos.detach()}


def gendistiller_loss(preds, targets, frame_lengths, cos_weight=1.0):
    """GenDistiller (choice: the abstracts name no loss): the DistilHuBERT loss on each of the K generated layers,
    averaged over them:

        L = 1/K sum_k [ L1(p_k, t_{l_k}) + lambda * mean_t -log sigmoid(cos(p_k[t], t_{l_k}[t])) ]

    p_k = preds[k] (B, T, D), the generator's prediction of teacher layer l_k (teacher-forced or free-running:
    the same loss); t_{l_k} = targets[k]; lambda = cos_weight.
    """
    return distilhubert_loss(preds, targets, frame_lengths, cos_weight=cos_weight)


# -----------------------------------------------------------------------------
# ARMHuBERT masking distillation (arXiv 2305.11685)


def masking_distillation_loss(preds, clean_targets, masked_targets, mask, frame_lengths, layer_weights=None):
    """ARMHuBERT masking distillation (Sec. 3.2 of 2305.11685, as in its official code):

        y_l[b,t] = t_l[b,t]  if M[b,t]  else  t~_l[b,t]
        e_l[b,t] = 1/D sum_d (p_l[b,t,d] - y_l[b,t,d])^2
        L = sum_l w_l * (sum_{b,t valid} e_l[b,t]) / N

    p_l = preds[l] (B, T, D) (student layer l after its projection head), t_l = clean_targets[l] (teacher on the
    clean input), t~_l = masked_targets[l] (teacher on the input with the frames M replaced by its mask
    embedding), M = mask (B, T) bool (frames the student saw masked), N = number of valid frames, w_l =
    layer_weights[l] (default as the official code: 0.1, the last layer 1.0). Masked frames thus predict what the
    teacher sees in clean audio; unmasked frames imitate the teacher under the same corruption. parts: "masked"
    and "unmasked", the weighted contributions of the two kinds of valid frames (their sum: the total).
    """
    _check("masking_distillation_loss", preds, clean_targets, frame_lengths)
    _check("masking_distillation_loss", preds, masked_targets, frame_lengths, mask)
    frame_lengths, mask = frame_lengths.to(preds[0].device), mask.to(preds[0].device).bool()
    if layer_weights is None:
        layer_weights = [0.1] * (len(preds) - 1) + [1.0]
    if len(layer_weights) != len(preds):
        raise ValueError(f"masking_distillation_loss: {len(layer_weights)} layer weights for {len(preds)} layers")
    valid = _valid(frame_lengths, preds[0].shape[1])  # (B, T)
    n_valid = valid.sum().clamp(min=1).float()  # N
    on_masked = (valid & mask).float()  # (B, T) valid frames the student saw masked
    on_unmasked = (valid & ~mask).float()  # (B, T) valid frames the student saw as is
    masked_part, unmasked_part = 0.0, 0.0
    for w, p, t, t_tilde in zip(layer_weights, preds, clean_targets, masked_targets):
        y = torch.where(mask[:, :, None], t, t_tilde).float()  # (B, T, D) per-frame target
        e = (p.float() - y).pow(2).mean(dim=-1)  # (B, T) per-frame MSE over the teacher dim
        masked_part = masked_part + w * (e * on_masked).sum() / n_valid
        unmasked_part = unmasked_part + w * (e * on_unmasked).sum() / n_valid
    return masked_part + unmasked_part, {"masked": masked_part.detach(), "unmasked": unmasked_part.detach()}


# -----------------------------------------------------------------------------
# CoLLD contrastive layer-to-layer distillation (arXiv 2309.07707; USAD, arXiv 2506.18843, Sec. III)


def _sample_negatives(anchor_b, anchor_t, frame_lengths, num_frames, k, generator):
    """For each anchor (b, t): min(k, num_frames - 1) distinct frames of utterance b, uniform among its valid
    frames other than t. Returns (idx, ok), both (N, K'): frame indices, and False where the utterance had fewer
    than K' other valid frames (the caller masks those slots). choice: WITHOUT replacement (wav2vec 2.0 samples
    with replacement): one uniform key per (anchor, frame), key 2 for non-candidates, keep the K' smallest keys.
    subtle: num_frames is the longest valid length, not the padded T, so padding never changes the draw.
    """
    N = anchor_b.shape[0]
    k_eff = min(k, num_frames - 1)  # K'
    gen_device = generator.device if generator is not None else anchor_b.device
    keys = torch.rand(N, num_frames, generator=generator, device=gen_device).to(anchor_b.device)  # (N, T')
    frames = torch.arange(num_frames, device=anchor_b.device)  # (T',)
    candidate = frames[None, :] < frame_lengths[anchor_b][:, None]  # (N, T') valid in utt b
    candidate &= frames[None, :] != anchor_t[:, None]  # (N, T') not the anchor itself
    keys = keys.masked_fill(~candidate, 2.0)  # non-candidates sort last
    key_k, idx = keys.topk(k_eff, dim=-1, largest=False)  # (N, K')
    return idx, key_k < 1.0  # (N, K'), (N, K')


def colld_loss(preds, targets, mask, frame_lengths, num_negatives=100, temperature=0.1,
               include_unmasked=False, generator=None):
    """CoLLD InfoNCE, per target layer l and anchor frame a = (b, t):

        s(x, y)  = cos(x, y) / tau
        L_l      = 1/|A| sum_{a in A} -log( exp s(z_a, y+_a)
                      / (exp s(z_a, y+_a) + sum_{j=1..K_a} exp s(z_a, y-_{a,j})) )
        L        = 1/|L| sum_l L_l

    Sources: the abstract (masked student input, layer-to-layer, contrastive); USAD Sec. III-A/B (every teacher
    layer a target, the teacher's FFN features, "positive and negative samples on a per-frame basis"). Choices:
    negatives, K, tau, anchors, cosine similarity.
    z_a = preds[l][b, t] (the student's head for target l, in the teacher dim), y+_a = targets[l][b, t] (the
    teacher's target at the same frame), y-_{a,j} = targets[l][b, t_j] for K_a = min(K, n_b - 1) frames t_j != t
    drawn uniformly without replacement from the other valid frames of utterance b (n_b = frame_lengths[b]),
    K = num_negatives, tau = temperature, A = anchors = masked valid frames (mask & valid), or all valid frames
    when include_unmasked; negative slots beyond K_a get -inf. parts: "nce" averaged over layers; "_acc" =
    fraction of anchors whose positive has the highest logit (a metric). No anchor: nce 0 with a grad path.
    Cost: one (T' x T') cosine matmul per utterance, whose anchor rows hold every similarity the draw can use.
    Gathering the K drawn target vectors of every anchor instead holds T' x K x D values per utterance against
    the matmul's T' x T' (K D / T' = 77x more for K 100, D 768, a 20 s utterance of T' = 1000), and measured
    5-10x slower on a CPU at the kit's sizes; tested equal to the drawn negatives computed anchor by anchor.
    """
    _check("colld_loss", preds, targets, frame_lengths, mask)
    frame_lengths, mask = frame_lengths.to(preds[0].device), mask.to(preds[0].device)
    # subtle: only the first T' = longest valid length frames, so padding changes neither anchors nor negatives
    T_v = int(frame_lengths.max())
    valid = _valid(frame_lengths, T_v)  # (B, T')
    # choice: anchors are the masked valid frames (the abstract's masked prediction), or all valid frames
    # (distill.py's colld default: the better row of the README's kit ablation)
    anchors = valid if include_unmasked else valid & mask[:, :T_v].bool()  # (B, T')
    anchor_b, anchor_t = anchors.nonzero(as_tuple=True)  # (N,), (N,) row-major order
    nce_sum, acc_sum = 0.0, 0.0
    for p, y in zip(preds, targets):
        if anchor_b.numel() == 0:
            nce_sum = nce_sum + 0.0 * p.sum()  # no anchor: zero loss that keeps a grad path
            continue
        # choice: negatives are drawn independently for each layer
        neg_idx, neg_ok = _sample_negatives(anchor_b, anchor_t, frame_lengths, T_v, num_negatives, generator)
        with torch.autocast(device_type=p.device.type, enabled=False):  # float32 cosines
            sim = torch.bmm(F.normalize(p[:, :T_v].float(), dim=-1, eps=1e-8),
                            F.normalize(y[:, :T_v].float(), dim=-1, eps=1e-8).transpose(1, 2))  # (B, T', T')
        sim = sim[anchor_b, anchor_t]  # (N, T') row a: cos(z_a, every target frame of its utterance)
        pos, neg = sim.gather(1, anchor_t[:, None]), sim.gather(1, neg_idx)  # (N, 1), (N, K')
        logits = torch.cat([pos, neg.masked_fill(~neg_ok, -math.inf)], dim=1) / temperature  # (N, 1 + K')
        nce_sum = nce_sum + F.cross_entropy(logits, torch.zeros_like(anchor_b))  # mean over anchors; positive = class 0
        acc_sum = acc_sum + (logits.detach().argmax(dim=1) == 0).float().mean()
    nce, acc = nce_sum / len(preds), torch.as_tensor(acc_sum / len(preds), dtype=torch.float32)
    return nce, {"nce": nce.detach(), "_acc": acc.detach()}
