"""Network-loafing analysis of trained checkpoints: the full network and a sub-network panel of each,
evaluated in one pass over the data, with each sub-network's BN statistics re-estimated and its FLOPs.

``analyze_checkpoints`` is the library function behind ``stim-analyze`` (``stim_timm.cli.analyze``,
which adds argument checks and writes the outputs) and the benchmarks. It sits in the run layer
because it reads what training wrote (run folders, checkpoints, a run's data and training transforms,
``stim_timm.run.checkpoint``); the measuring itself is ``stim_timm.eval``'s.
"""
import copy
import os
from typing import Any, Dict, List, Optional, Sequence

from ..eval.bn import bn_layers
from ..eval.evaluate import eval_loader, evaluate
from ..eval.flops import subnet_flops
from ..method.sampling import SubnetSampler
from ..models.depths import validate_depths
from ..models.subnet import get_stim_model
from .checkpoint import load_trained_model, run_data_config, run_train_transform

__all__ = ['analyze_checkpoints']


def _labels(paths: Sequence[str], labels: Optional[Sequence[str]]) -> List[str]:
    if labels:
        if len(labels) != len(paths):
            raise ValueError(f'{len(labels)} labels for {len(paths)} checkpoints')
        return list(labels)
    out: List[str] = []
    for p in paths:
        p = os.path.abspath(p)
        folder = os.path.dirname(p)
        if os.path.isdir(p):
            name = os.path.basename(p.rstrip(os.sep))
        elif os.path.isfile(os.path.join(folder, 'args.yaml')):  # a file inside a run folder
            name = os.path.basename(folder)
        else:
            name = os.path.basename(p)
        base, i = name, 2
        while name in out:
            name, i = f'{base}#{i}', i + 1
        out.append(name)
    return out


def analyze_checkpoints(
        paths: Sequence[str],
        data_dir: str,
        split: str = 'test',
        subnets: int = 20,
        panel: Optional[Sequence[Sequence[int]]] = None,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        labels: Optional[Sequence[str]] = None,
        recalibrate_bn: int = 2,
        train_split: str = 'train',
        batch_size: int = 128,
        workers: int = 0,
        max_images: Optional[int] = None,
        seed: int = 0,
        progress: bool = True,
) -> List[Dict[str, Any]]:
    """Evaluate each checkpoint's full network and sub-networks; one row per (checkpoint, network).

    Args:
        paths: run folders, ``.pth(.tar)`` or ``.safetensors`` files (bare weights need ``model_name``).
        panel: explicit sub-networks (e.g. a benchmark's fixed list) instead of the
            sampler's cost-spanning panel (``SubnetSampler.panel``).
        subnets: panel size when ``panel`` is not given.
        recalibrate_bn: training batches (training transforms) per sub-network to re-estimate its BN
            statistics, so that it is not measured with the full network's (0: off).
        max_images: evaluate a fixed random subset (seeded) of the split.

    Rows: checkpoint, model, depths, blocks_kept, total_blocks, rel_flops, gflops, top1, top5,
    is_full, images, bn, path. The checkpoints are only read.
    """
    rows: List[Dict[str, Any]] = []
    for path, label in zip(paths, _labels(paths, labels)):
        model, weights = load_trained_model(path, model_name, num_classes)
        model.eval()
        stim = get_stim_model(model)
        full = tuple(stim.stage_depths)
        if panel is not None:
            chosen = [validate_depths(d, full, stim.stage_min_depths) for d in panel]
        elif tuple(stim.stage_min_depths) != full:
            chosen = SubnetSampler(full, 'uniform', min_depths=stim.stage_min_depths).panel(subnets, seed)
        else:  # no block can be dropped: the full network only
            chosen = []
        chosen = [d for d in dict.fromkeys(chosen) if d != full]
        data_config = run_data_config(model, weights.args)
        loader = eval_loader(data_dir, split, data_config, batch_size, workers, max_images, seed,
                             classes=weights.classes)
        calib = None
        if recalibrate_bn > 0 and bn_layers(model):
            train_loader = eval_loader(data_dir, train_split, data_config, batch_size, workers, None, seed,
                                        shuffle=True, training=True,
                                        train_transform=run_train_transform(weights.args, data_config))
            calib = [x for _, (x, _) in zip(range(recalibrate_bn), train_loader)]
            model = copy.deepcopy(model)  # BN buffers get rewritten: never on the loaded weights
        results = evaluate(model, loader, chosen, calib, progress=progress, desc=label)
        input_size = tuple(data_config['input_size'])
        full_flops = subnet_flops(model, None, input_size)
        for depths in [None] + chosen:
            d = depths or full
            top1, top5, seen = (results[depths][k] for k in ('top1', 'top5', 'images'))
            flops = subnet_flops(model, depths, input_size)
            rows.append(dict(
                checkpoint=label, model=weights.model, depths=list(d), blocks_kept=sum(d), total_blocks=sum(full),
                rel_flops=round(flops / full_flops, 6), gflops=round(flops / 1e9, 6), top1=round(top1, 4),
                top5=round(top5, 4), is_full=depths is None, images=seen,
                bn='recalibrated' if calib and depths is not None else 'full-network',
                path=os.path.abspath(weights.path)))
    return rows
