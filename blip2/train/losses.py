"""The Q-Former's stage-1 objectives (BLIP-2 paper, section 3.2): image-text contrastive (ITC), image-text
matching with hard negatives (ITM) and image-grounded text generation (ITG); and the deep supervision that lets
stage 0's small language model learn to look an object up."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from blip2.opt import causal_lm_loss
from blip2.train import world


def itc_loss(image_feats, text_feats, temp, same):
    """image_feats (B, Q, E) and text_feats (B, E), L2-normalised; similarity = best query, over `temp`.
    same (B, B): pairs with the same caption, all counted as positives. Returns (loss, similarity (B, B))."""
    sim = torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(1)
    logits = sim / temp
    targets = same.float() / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2, sim.detach()


def mine_negatives(sim, same, generator):
    """For each image a hard negative text and for each text a hard negative image, drawn with the softmax of
    the ITC similarities (positives excluded), as in BLIP-2. Returns (text index per image, image index per text)."""
    def draw(s):
        weights = (s * 20).softmax(1).masked_fill(same, 0) + (~same) * 1e-6
        return torch.multinomial(weights, 1, generator=generator)[:, 0]
    return draw(sim), draw(sim.t())


def itm_loss(logits, labels, weight=None):
    """Cross-entropy; `weight` (2,) per class balances positives against the (more) negatives."""
    return F.cross_entropy(logits, labels, weight=weight)


def itg_mask(text_mask, num_query_tokens):
    """(B, Q + T, Q + T) keep-matrix: queries see queries; text sees all queries and the text before it."""
    b, t = text_mask.shape
    q, n = num_query_tokens, num_query_tokens + t
    keep = torch.zeros(b, n, n, dtype=torch.long)
    keep[:, :, :q] = 1
    keep[:, q:, q:] = torch.tril(torch.ones(t, t, dtype=torch.long)) * text_mask[:, None, :]
    return keep


def itg_loss(logits, input_ids, text_mask):
    """Next-token loss over the text positions (the first one is [DEC]); padding ignored."""
    return causal_lm_loss(logits, input_ids.masked_fill(text_mask == 0, -100))


def attribute_heads(hidden_size):
    """One linear classifier per world attribute, over the language model's hidden states (training only)."""
    return nn.ModuleDict({k: nn.Linear(hidden_size, len(world.VALUES[k])) for k in world.ATTRIBUTES})


def attribute_loss(heads, hidden, targets):
    """Sum over attributes of the cross-entropy of heads[k] at the (row, position) of `targets[k]`, an (n, 3)
    tensor of (row, position, value index) as OptText.attribute_targets makes. hidden: (B, T, D)."""
    return sum(F.cross_entropy(heads[k](hidden[t[:, 0], t[:, 1]]), t[:, 2]) for k, t in targets.items() if len(t))
