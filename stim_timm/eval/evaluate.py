"""The one evaluation of a stim model: the full network and a panel of sub-networks in one pass.

Every batch goes through the full network and each panel sub-network, so the data is read once
however large the panel. Each network gets its cross-entropy loss, top-1 and top-5, summed on the
device (no per-batch sync) and all-reduced over DDP ranks at the end. A sub-network can be measured
with its own BN statistics, re-estimated on training images (``stim_timm.eval.bn``): with the full
network's it is understated. The training loop's validations (``stim_timm.run.engine``) and
``stim-analyze`` both call ``evaluate``.
"""
import os
import sys
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..models.depths import Depths
from ..models.subnet import get_stim_model, is_stim_model
from .bn import bn_layers, bn_state, load_bn_state, reestimate_bn
from .classes import split_class_map

__all__ = ['eval_loader', 'evaluate', 'split_folder', 'check_split_folder']


# ------------------------------------------------------------------------------------------------ data

def eval_loader(data_dir: str, split: str, data_config: Dict[str, Any], batch_size: int, workers: int,
                 max_images: Optional[int] = None, seed: int = 0, shuffle: bool = False,
                 training: bool = False, train_transform: Optional[Dict[str, Any]] = None,
                 classes: Optional[Sequence[str]] = None) -> DataLoader:
    """timm dataset with timm's eval (or train) transform; ``max_images`` keeps a fixed random subset.

    ``classes``: the run's class map (names in index order); an image-folder split must then have
    exactly these classes (else a one-line ValueError) and is read with that map, not a re-derived one.

    ``train_transform``: ``create_transform`` keywords over ``data_config`` when ``training`` (the
    run's own augmentation, ``run.checkpoint.run_train_transform``); without them, timm's defaults.
    """
    if not os.path.isdir(data_dir):
        raise ValueError(f'{data_dir}: no such data folder')
    folder = check_split_folder(data_dir, split)
    try:
        class_map = split_class_map(folder, classes)
        dataset = create_dataset('', root=data_dir, split=split, is_training=False, class_map=class_map)
    except ValueError:
        raise
    except Exception as e:  # timm raises assorted errors for empty / odd folders
        raise ValueError(f'{data_dir}: cannot read split {split!r} ({str(e).strip().splitlines()[0]})') from None
    if len(dataset) == 0:
        raise ValueError(f'{data_dir}: no images for split {split!r}')
    if training:
        torch.manual_seed(seed)  # the training transform's random crops and flips (workers=0)
    kwargs = {k: v for k, v in data_config.items() if k != 'test_input_size'}
    if training:
        kwargs.update(train_transform or {})
    dataset.transform = create_transform(**kwargs, is_training=training)
    if max_images is not None and max_images < len(dataset):
        g = torch.Generator().manual_seed(seed)
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:max_images].sort().values.tolist())
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=False)


# Split names timm's image-folder datasets treat as one (create_dataset's split search), and 'test'
_SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))
_SPLIT_NAMES = {'test', *(name for group in _SPLIT_SYNONYMS for name in group)}


def split_folder(root: str, split: str) -> str:
    """The folder timm's ``create_dataset`` reads for ``split``: ``root/<split>`` (the name before any
    ``[...]`` slice), else the first existing ``root/<synonym>`` of a train or validation name, else
    ``root`` itself."""
    name = split.split('[', 1)[0]
    synonyms = next((group for group in _SPLIT_SYNONYMS if name in group), ())
    for candidate in (name, *synonyms):
        if os.path.exists(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    return root


def check_split_folder(root: str, split: str) -> str:
    """``split_folder``, refused (ValueError) when that is ``root`` itself while ``root`` holds split
    folders: a missing split must not silently turn the split folders into classes."""
    folder = split_folder(root, split)
    if folder == root:
        found = sorted(d for d in os.listdir(root)
                       if d.lower() in _SPLIT_NAMES and os.path.isdir(os.path.join(root, d)))
        if found:
            raise ValueError(f"{root}: no '{split.split('[', 1)[0]}' split folder (found: {', '.join(found)})")
    return folder


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
def evaluate(model: nn.Module, loader: Iterable, panel: Sequence[Sequence[int]] = (),
             calib_batches: Optional[Sequence[torch.Tensor]] = None, *, full: bool = True,
             prepare: Optional[Callable] = None, autocast: Optional[Callable] = None, tta: int = 0,
             distributed: bool = False, progress: bool = False,
             desc: str = 'eval') -> Dict[Optional[Depths], Dict[str, float]]:
    """Loss, top-1 and top-5 (%) and image count of the full network (key ``None``) and of each
    panel sub-network (key: its depths tuple), from one pass over ``loader``.

    Args:
        model: the model (any wrapper: DDP, compiled, EMA); put in eval mode. Without a panel it need
            not be stimulative.
        loader: ``(input, target)`` batches; targets are class indices.
        panel: sub-networks (blocks kept per stage) measured besides the full network.
        calib_batches: training inputs; each panel sub-network is then normalised with its own BN
            statistics re-estimated on them, the full network with the model's own, which are
            restored at the end.
        full: measure the full network too.
        prepare: ``(input, target) -> (input, target)`` applied to each batch (device, memory format).
        autocast: context-manager factory around the forward and the loss (AMP).
        tta: test-time augmentation factor: consecutive groups of ``tta`` outputs are averaged.
        distributed: all-reduce the sums over the DDP ranks (every rank gets the totals).
        progress: progress bars on stderr, labelled ``desc``.
    """
    keys: List[Optional[Depths]] = ([None] if full else []) + \
        list(dict.fromkeys(tuple(int(d) for d in depths) for depths in panel))
    if not keys:
        return {}
    stim = get_stim_model(model) if panel or is_stim_model(model) else None
    model.eval()
    bns = bn_layers(model) if calib_batches and panel else []
    bn_states: Dict[Optional[Depths], Any] = {None: bn_state(bns)} if bns else {}  # None: the model's own
    autocast = autocast or nullcontext
    loss_fn = nn.CrossEntropyLoss()
    param = next(iter(model.parameters()), None)
    sums = torch.zeros(len(keys), 3, dtype=torch.float64, device=param.device if param is not None else 'cpu')
    seen = 0
    bar = _Progress(0, desc, False)
    try:
        if bns:
            bar = _Progress(len(keys) - full, f'{desc}: BN recalibration', progress)
            for depths in keys[int(full):]:
                reestimate_bn(model, calib_batches, depths)
                bn_states[depths] = bn_state(bns)
                bar.update()
            bar.close()
        bar = _Progress(len(loader) if hasattr(loader, '__len__') else 0, desc, progress)
        for input, target in loader:
            if prepare is not None:
                input, target = prepare(input, target)
            labels = target[0:target.size(0):tta] if tta > 1 else target
            for i, depths in enumerate(keys):
                if bn_states:
                    load_bn_state(bns, bn_states[depths])
                with torch.inference_mode(), stim.subnet(depths) if stim is not None else nullcontext():
                    with autocast():
                        output = model(input)
                        output = output[0] if isinstance(output, (tuple, list)) else output
                        if tta > 1:
                            output = output.unfold(0, tta, tta).mean(dim=2)
                        if i == 0:  # once per batch: every network has the same head
                            _check_labels(labels, output.shape[-1])
                        loss = loss_fn(output, labels)
                    hit = output.topk(min(5, output.shape[-1]), dim=-1).indices.eq(labels.view(-1, 1))
                    row = torch.stack([loss.double() * labels.shape[0], hit[:, :1].sum().double(),
                                       hit.any(dim=1).sum().double()])
                sums[i] += row.to(sums.device)
            seen += labels.shape[0]
            bar.update()
    finally:
        bar.close()
        if bn_states:
            load_bn_state(bns, bn_states[None])
    packed = torch.cat([sums.flatten(), sums.new_tensor([seen])])
    if distributed:
        dist.all_reduce(packed)
    packed = packed.tolist()
    images = packed[-1]
    if images == 0:
        raise ValueError('the evaluation data is empty')
    return {k: dict(loss=packed[3 * i] / images, top1=100.0 * packed[3 * i + 1] / images,
                    top5=100.0 * packed[3 * i + 2] / images, images=int(images)) for i, k in enumerate(keys)}


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """A class index past the head is a data / model mismatch (checked on the CPU only: no sync)."""
    if labels.device.type == 'cpu' and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f'the data has class index {int(labels.max())}, the model only {num_classes} classes')
