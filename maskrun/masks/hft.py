"""HFT, Half Fine-Tuning (Hui et al., 2025): in every layer, freeze half (mask.ratio) of the attention matrices and
half of the FFN matrices, chosen at random with the run's seed.

The paper selects at the category level within each block: of LLaMA's four attention matrices (Wq, Wk, Wv,
Wo) two are frozen; of its three FFN matrices (W_gate, W_up, W_down) two in a random half of the layers and
one in the other half, so that half of each category freezes over the model. Here each (layer, category)
freezes ratio * its matrices, rounded: how many is apportioned over the layers of that category
(maskrun.masks.select.apportion: each layer within one matrix of its share, the total exact, the layers
that take the extra one drawn at random), and which ones is drawn uniformly within the layer. BERT's FFN has
two matrices (one freezes at r=0.5), GPT-2's attention two (c_attn holds Wq, Wk, Wv together).

A matrix's bias belongs to its module and freezes with it. The paper's selection names only the
attention and FFN matrices; everything else stays trainable here: conf/mask/hft.yaml leaves the embeddings
and the norms out of the eligible set (mask.exclude), so they train like the head and the ratio is the
share of the attention and FFN modules, and an eligible tensor outside both categories (e.g. a pooler) is
eligible but never frozen, which ratio_actual reports.
"""

import numpy as np
import torch

from maskrun.masks import select
from maskrun.masks.analytics import parameter_type

NEEDS_SCORES = False
ALLOCATIONS = ("per_layer",)
GRANULARITIES = ("tensor",)
CATEGORIES = ("attention", "MLP")  # maskrun.masks.analytics.parameter_type's names for attention and FFN matrices


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> select.Selection:
    rng = np.random.default_rng(seed)
    groups: dict[str, dict[str, list[str]]] = {category: {} for category in CATEGORIES}  # category -> layer -> modules
    for name, p in params.items():
        category = parameter_type(name)
        if p.dim() >= 2 and category in CATEGORIES:
            groups[category].setdefault(select.layer_of(name), []).append(module_of(name))
    frozen_modules = set()
    for layers in groups.values():
        modules = list(layers.values())
        for layer_modules, count in zip(modules, select.apportion([len(m) for m in modules], mcfg.ratio, rng)):
            frozen_modules.update(layer_modules[i] for i in rng.choice(len(layer_modules), size=count, replace=False))
    return select.Selection({name: torch.full(p.shape, module_of(name) in frozen_modules)
                             for name, p in params.items()})
