"""sasrec-init: LLMinit (Harte et al. 2023). A SASRec-style ID model (a trainable item-ID table plus the
same causal transformer) whose ID table starts from a PCA projection of the frozen item LLM's
mean-pooled embeddings of the kept text."""

from __future__ import annotations

import torch
from torch import nn

from tokensel.evaluate.recommenders.base import Trained, pca_init
from tokensel.evaluate.recommenders.registry import register
from tokensel.train.loop import IdItems


@register
class SASRecInit(Trained):
    """LLMinit: an ID model whose item table starts from the PCA of the text embeddings, then trains on IDs."""

    name = "sasrec-init"
    default_epochs = 30  # the budget and learning rate chosen in RESULTS.md
    default_lr = 1e-3

    def run(self, vectors, hist, seed):
        torch.manual_seed(seed)
        init = pca_init(vectors, self.cfg.id_dim)
        items = nn.Embedding(init.shape[0], init.shape[1]).to(self.device)
        with torch.no_grad():
            items.weight.copy_(init)
        user = self.user_model(init.shape[1])
        return self.fit(user, IdItems(items), hist, seed)
