"""Experiment: fill the token budget with a partial boundary cluster (reference path only)."""

import torch

from multipole import state as st
from multipole.ops.decode.reference import attend_tokens, far_field, merge_states
from multipole.ops.lookup.reference import NEG_INF, log_importance


def rank_in_cluster(labels):
    # labels [B,H,N] (-1: not clustered); rank of a token among same-label tokens
    key = labels.clamp_min(-1).to(torch.int64)
    n = labels.shape[-1]
    order = torch.sort(key * n + torch.arange(n, device=labels.device), dim=-1).indices
    sorted_labels = key.gather(-1, order)
    idx = torch.arange(n, device=labels.device).expand_as(key)
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[..., 1:] = sorted_labels[..., 1:] != sorted_labels[..., :-1]
    seg_start = torch.where(first, idx, 0).cummax(-1).values
    rank_sorted = idx - seg_start
    rank = torch.empty_like(rank_sorted)
    rank.scatter_(-1, order, rank_sorted)
    return rank


def attend_partial(self, q, lookup_q, scale):
    cfg, index = self.config, self.index
    level0 = index.level0
    n = max(self.seq_lens)
    z0 = st.cluster_logits(lookup_q, level0.key_centroids, scale)
    log_n0 = torch.log(level0.sizes.to(z0.dtype)).unsqueeze(-2)
    live0 = level0.sizes > 0
    log_den = st._masked_logsumexp(z0 + log_n0, live0)
    score = log_importance(z0, live0, log_den).masked_fill(~live0, NEG_INF)
    budget = self._per_sequence(cfg.budget_tokens).view(-1, 1, 1)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    sizes = torch.where(live0, level0.sizes, 0)
    ssz = sizes.gather(-1, order)
    before = ssz.cumsum(-1) - ssz
    take_sorted = (budget - before).clamp(min=0).minimum(ssz)
    take = torch.zeros_like(sizes)
    take.scatter_(-1, order, take_sorted)
    exact, middle, _ = self._regions()
    labels = index.labels[:, :, :n]
    rank = rank_in_cluster(labels)
    chosen = (labels >= 0) & (rank < take.gather(-1, labels.clamp_min(0)))
    token_mask = exact | (middle & chosen)
    out, lse = attend_tokens(q, self.keys, self.values, token_mask, scale)
    # residual far field: count N - take, value mean of the untaken tokens
    d = self.values.shape[-1]
    taken_v = torch.zeros(*sizes.shape, d, dtype=torch.float32, device=q.device)
    vals = self.values[:, :, :n].float() * (middle & chosen).unsqueeze(-1)
    taken_v.scatter_add_(2, labels.clamp_min(0).unsqueeze(-1).expand(-1, -1, -1, d), vals)
    resid = sizes - take
    vc = (level0.value_centroids.float() * sizes.unsqueeze(-1) - taken_v) / resid.clamp_min(
        1
    ).unsqueeze(-1)
    far_q, keys0 = self._far_field_inputs(q, lookup_q, level0)
    far = far_field(far_q, keys0, vc, resid, live0 & (resid > 0), scale)
    out, lse = merge_states(out, lse, *far)
    reads = st.Reads(
        tokens_exact=token_mask.sum(-1),
        clusters_selected=(take > 0).sum(-1),
        centroids_scored=live0.sum(-1),
        metadata_bytes=live0.sum(-1)
        * st._centroid_bytes(cfg, self.head_dim, self._keys.element_size(), False),
        token_mask=token_mask,
    )
    return out, lse, reads


def install():
    st.MultipoleState._attend_reference = attend_partial
