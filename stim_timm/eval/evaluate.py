"""One evaluation of a stim model: the full network and a panel of sub-networks in one pass.

Every batch goes through the full network and each panel sub-network, so the data is read once
however large the panel. A sub-network can be measured with its own BN statistics, re-estimated on
training images (``stim_timm.eval.bn``): with the full network's it is understated.
"""
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..models.subnet import get_stim_model
from .bn import bn_layers, bn_state, load_bn_state, reestimate_bn

__all__ = ['eval_loader', 'evaluate_subnets']

Depths = Tuple[int, ...]


# ------------------------------------------------------------------------------------------------ data

def eval_loader(data_dir: str, split: str, data_config: Dict[str, Any], batch_size: int, workers: int,
                 max_images: Optional[int] = None, seed: int = 0, shuffle: bool = False,
                 training: bool = False) -> DataLoader:
    """timm dataset with timm's eval (or train) transform; ``max_images`` keeps a fixed random subset."""
    if not os.path.isdir(data_dir):
        raise ValueError(f'{data_dir}: no such data folder')
    _check_split(data_dir, split)
    try:
        dataset = create_dataset('', root=data_dir, split=split, is_training=False)
    except Exception as e:  # timm raises assorted errors for empty / odd folders
        raise ValueError(f'{data_dir}: cannot read split {split!r} ({str(e).strip().splitlines()[0]})') from None
    if len(dataset) == 0:
        raise ValueError(f'{data_dir}: no images for split {split!r}')
    if training:
        torch.manual_seed(seed)  # the training transform's random crops and flips (workers=0)
    dataset.transform = create_transform(**{k: v for k, v in data_config.items() if k != 'test_input_size'},
                                         is_training=training)
    if max_images is not None and max_images < len(dataset):
        g = torch.Generator().manual_seed(seed)
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:max_images].sort().values.tolist())
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=False)


_SPLIT_NAMES = {'train', 'training', 'val', 'valid', 'validation', 'test', 'eval', 'evaluation'}


def _check_split(data_dir: str, split: str) -> None:
    """A missing split folder must not silently turn the split folders into classes."""
    name = split.split('[')[0]
    if os.path.isdir(os.path.join(data_dir, name)):
        return
    found = sorted(d for d in os.listdir(data_dir)
                   if d.lower() in _SPLIT_NAMES and os.path.isdir(os.path.join(data_dir, d)))
    if found:
        raise ValueError(f"{data_dir}: no '{name}' split folder (found: {', '.join(found)})")


class _Progress:
    """A one-line progress bar on stderr (tqdm comes with huggingface_hub)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit='batch', leave=True,
                        dynamic_ncols=True) if enabled else None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate_subnets(model: nn.Module, loader: Iterable, panel: Sequence[Depths],
                     calib_batches: Optional[Sequence[torch.Tensor]] = None, progress: bool = True,
                     desc: str = 'eval') -> Dict[Optional[Depths], Tuple[float, float, int]]:
    """Top-1/top-5 (%) and image count of the full network (key ``None``) and each panel entry.

    One pass over the data: every batch goes through all sub-networks. With ``calib_batches`` the
    sub-networks get their own re-estimated BN statistics (the full network keeps its own); the
    model must then be a disposable copy.
    """
    stim = get_stim_model(model)
    model.eval()
    bns = bn_layers(model)
    bn_states: Dict[Optional[Depths], Any] = {}
    if calib_batches and bns:
        bn_states[None] = bn_state(bns)
        bar = _Progress(len(panel), f'{desc}: BN recalibration', progress)
        for depths in panel:
            reestimate_bn(model, calib_batches, depths)
            bn_states[depths] = bn_state(bns)
            bar.update()
        bar.close()
        load_bn_state(bns, bn_states[None])
    keys: List[Optional[Depths]] = [None] + [d for d in panel]
    correct = {k: [0, 0] for k in keys}
    seen = 0
    bar = _Progress(len(loader) if hasattr(loader, '__len__') else 0, desc, progress)
    for x, y in loader:
        for k in keys:
            if bn_states:
                load_bn_state(bns, bn_states[k])
            with stim.subnet(k):
                logits = model(x)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top.eq(y.view(-1, 1))
            correct[k][0] += int(hit[:, :1].sum())
            correct[k][1] += int(hit.any(dim=1).sum())
        seen += y.shape[0]
        bar.update()
    bar.close()
    if bn_states:
        load_bn_state(bns, bn_states[None])
    if seen == 0:
        raise ValueError('the evaluation data is empty')
    return {k: (100.0 * c1 / seen, 100.0 * c5 / seen, seen) for k, (c1, c5) in correct.items()}


