"""The generalized end-to-end softmax loss (Wan et al., ICASSP 2018).

A batch holds N speakers x M utterances; each embedding is compared with every speaker's
centroid, its own speaker's centroid computed without it (the paper's eq. 8), through a
learnt scale ``w`` and offset ``b``: S = w * cos(e_ji, c_k) + b. The loss is the softmax
cross-entropy of each row of S against its speaker.
"""
import torch
from torch import nn
from torch.nn import functional as F


class GE2ELoss(nn.Module):
    """``loss(embeddings [N, M, D]) -> scalar``; ``w`` and ``b`` start at ``init_w``, ``init_b``.

    ``w`` is kept positive (the paper's constraint) by clamping it where it is used.
    """

    def __init__(self, init_w=10.0, init_b=-5.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(init_w)]))
        self.b = nn.Parameter(torch.tensor([float(init_b)]))

    def similarity(self, embeddings):
        """[N, M, D] -> scaled cosine similarities [N, M, N] of each utterance to each centroid."""
        n, m, _ = embeddings.shape
        if m < 2:
            raise ValueError("GE2E needs at least two utterances per speaker")
        sums = embeddings.sum(dim=1, keepdim=True)                       # [N, 1, D]
        centroids = F.normalize(sums / m, dim=2).squeeze(1)              # [N, D]
        exclusive = F.normalize((sums - embeddings) / (m - 1), dim=2)    # [N, M, D]: own centroid without e_ji
        unit = F.normalize(embeddings, dim=2)
        cos = torch.einsum("nmd,kd->nmk", unit, centroids)               # [N, M, N]
        own = (unit * exclusive).sum(dim=2)                              # [N, M]
        eye = torch.eye(n, dtype=torch.bool, device=embeddings.device).unsqueeze(1)  # [N, 1, N]
        cos = torch.where(eye, own.unsqueeze(2), cos)
        return self.w.clamp(min=1e-6) * cos + self.b

    def forward(self, embeddings):
        n, m, _ = embeddings.shape
        sim = self.similarity(embeddings).reshape(n * m, n)
        target = torch.arange(n, device=embeddings.device).repeat_interleave(m)
        return F.cross_entropy(sim, target)

    def scale_gradients(self, factor):
        """Multiply w's and b's gradients by ``factor`` (the recipe's 0.01: they would otherwise move
        far faster than the network's weights)."""
        for p in (self.w, self.b):
            if p.grad is not None:
                p.grad.mul_(factor)
