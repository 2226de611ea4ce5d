"""Building blocks of ``train_stim.py`` that only read its flags: the model, the datasets and
loaders, the training loss. Every bad-input failure here is a ValueError with one line naming the
model or folder, raised before the script writes anything."""
import os
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import AugMixDataset, FastCollateMixup, ImageDataset, Mixup, create_dataset, create_loader
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask

from ..eval.classes import check_class_folders
from ..models import create_stimulative
from .io import one_line
from .loader_hooks import count_bad_images
from .transforms import add_lighting

__all__ = ['create_stim_model', 'create_datasets', 'create_loaders', 'train_loss',
           'distillation_task', 'dataset_classes', 'check_class_folders']


def create_stim_model(args, stim_on: bool = True, small_inputs: bool = False) -> nn.Module:
    """timm's create_model with train.py's model flags, made stimulative in place (required when
    ``stim_on``; a baseline of a model without residual stages stays plain). Records the resolved
    class count in args (``args.yaml`` / checkpoints carry it for tools that rebuild the model)."""
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    overlay = dict(pretrained_cfg_overlay=dict(file=args.pretrained_path, num_classes=-1)) \
        if args.pretrained_path else {}
    kwargs = dict(
        pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
        drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
        global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
        checkpoint_path=args.initial_checkpoint, **overlay, **args.model_kwargs)
    model = create_stimulative(args.model, required=stim_on, **kwargs)
    if small_inputs and getattr(model, 'dynamic_img_size', True) is False:
        # a ViT runs sub-networks on smaller inputs only when built with a dynamic image size
        model = create_stimulative(args.model, required=stim_on, **dict(kwargs, dynamic_img_size=True))
        args.model_kwargs = dict(args.model_kwargs, dynamic_img_size=True)
    with torch.no_grad():
        if args.head_init_scale is not None:
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None:
            model.get_classifier().bias.fill_(args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    args.num_classes = model.num_classes
    return model


def _reader(ds: Any) -> Any:
    ds = getattr(ds, 'dataset', ds)  # AugMixDataset wraps the image dataset
    return getattr(ds, 'reader', None)


def dataset_classes(ds: Any) -> Optional[List[str]]:
    """The class map of a dataset as class names in index order (None when the reader has none)."""
    class_to_idx = getattr(_reader(ds), 'class_to_idx', None)
    if not isinstance(class_to_idx, dict) or not class_to_idx:
        return None
    return [str(c) for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]


def create_datasets(args, data_config) -> Tuple[Any, Optional[Any]]:
    """Train / eval datasets; a missing folder or one without images is a ValueError naming it.

    Image folders: every class folder of a split must hold readable images (an empty one is refused,
    naming it), and the eval split must have exactly the training split's classes; both use the
    training split's class map (``dataset_classes``), which the run saves. Unreadable images are
    counted (``loader_hooks.count_bad_images``)."""
    if not args.data_dir and not args.dataset:
        raise ValueError('no data: give the dataset root (positional DIR or --data-dir)')
    if not args.dataset and not os.path.isdir(args.data_dir):
        raise ValueError(f'data dir {args.data_dir}: no such directory')
    common = dict(root=args.data_dir, download=args.dataset_download,
                  batch_size=args.batch_size, input_key=args.input_key, target_key=args.target_key,
                  input_img_mode=args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L'),
                  trust_remote_code=args.dataset_trust_remote_code)
    splits = [(args.train_split, True, args.train_num_samples), (args.val_split, False, args.val_num_samples)]
    out = []
    class_map: Any = args.class_map
    train_classes: Optional[List[str]] = None
    for split, training, num in splits:
        if not split:
            out.append(None)
            continue
        try:
            extra = dict(repeats=args.epoch_repeats) if training and args.epoch_repeats else {}
            ds = create_dataset(args.dataset, split=split, is_training=training, seed=args.seed,
                                num_samples=num, class_map=class_map, **common, **extra)
        except RuntimeError as e:  # timm's reader: no images found
            raise ValueError(f'{split} split of {args.data_dir}: no images ({e})') from None
        if not isinstance(ds, torch.utils.data.IterableDataset) and len(ds) == 0:
            raise ValueError(f'{split} split of {args.data_dir}: no images')
        root = getattr(_reader(ds), 'root', None)
        if type(ds) is ImageDataset and isinstance(root, str) and os.path.isdir(root):
            folders = check_class_folders(root)
            classes = dataset_classes(ds) or []
            if training:
                train_classes = classes
                if not args.class_map:
                    class_map = dict(ds.reader.class_to_idx)  # the eval split uses the same indices
                    missing = sorted(set(folders) - set(classes))
                    if missing:  # a folder timm did not see (e.g. images only in unreadable places)
                        raise ValueError(f'class folder {os.path.join(root, missing[0])}: no readable images')
            elif train_classes is not None and not args.class_map and sorted(folders) != sorted(train_classes):
                extra_ = sorted(set(folders) - set(train_classes))
                lacking = sorted(set(train_classes) - set(folders))
                raise ValueError(f'{split} split of {args.data_dir}: its classes differ from the {args.train_split} '
                                 f"split's (" + '; '.join(
                                     ([f"not in {args.train_split}: {', '.join(extra_[:3])}"] if extra_ else []) +
                                     ([f"missing: {', '.join(lacking[:3])}"] if lacking else [])) + ')')
            count_bad_images(ds)
        if training and args.aug_splits > 1:
            ds = AugMixDataset(ds, num_splits=args.aug_splits)  # clean + augmented views of each image
        out.append(ds)
    return out[0], out[1]


def create_loaders(args, data_config, device, datasets) -> Tuple[Any, Optional[Any], Optional[Mixup]]:
    train_ds, eval_ds = datasets
    mixup_on = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
    collate = FastCollateMixup(**mixup_args) if mixup_on and args.prefetcher else None
    mixup_fn = Mixup(**mixup_args) if mixup_on and not args.prefetcher else None
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem,
                  img_dtype=args.torch_model_dtype or torch.float32, device=device,
                  use_prefetcher=args.prefetcher, persistent_workers=False)
    # Non-persistent workers: each epoch's worker seeds come from the main RNG, which a checkpoint
    # restores, so a resumed epoch sees the same augmentations as an uninterrupted one.
    sizes = {} if args.train_img_sizes is None else dict(
        input_size_choices=args.train_img_sizes, batch_size_choices=args.train_batch_sizes,
        batch_choice_weights=args.train_size_probs, batch_choice_seed=args.seed,
        batch_choice_schedule=args.train_size_schedule,
        batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
        batch_schedule_spread=args.train_size_schedule_spread,
        batch_schedule_random_mix=args.train_size_random_mix)
    if args.train_batches_per_epoch:
        sizes['num_batches'] = args.train_batches_per_epoch
    if args.train_crop_size is not None and args.train_crop_size < 1:
        raise ValueError(f'--train-crop-size must be a positive side, got {args.train_crop_size}')
    train_size = data_config['input_size'] if not args.train_crop_size else \
        (data_config['input_size'][0], args.train_crop_size, args.train_crop_size)
    train_loader = create_loader(
        train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        interpolation=data_config['interpolation'] if args.no_aug or not args.train_interpolation
        else args.train_interpolation, collate_fn=collate, worker_seeding=args.worker_seeding,
        use_multi_epochs_loader=args.use_multi_epochs_loader, num_aug_splits=max(args.aug_splits, 0),
        **sizes, **dict(common, input_size=train_size))
    if args.lighting:
        train_ds.transform = add_lighting(train_ds.transform, args.lighting)
    if hasattr(train_loader.sampler, 'seed'):  # DDP data order follows --seed too
        train_loader.sampler.seed = args.seed
    eval_loader = None if eval_ds is None else create_loader(
        eval_ds, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    return train_loader, eval_loader, mixup_fn


def distillation_task(args, model: nn.Module, criterion: nn.Module, device, dtype, verbose: bool) -> nn.Module:
    """timm's distillation task for ``--kd-*`` (as timm's train.py builds it); the teacher's weights
    come from its pretrained tag or ``--kd-pretrained-path``. A teacher that cannot load is a ValueError."""
    common = dict(student_model=model, teacher_model=args.kd_model_name, criterion=criterion,
                  teacher_pretrained_path=args.kd_pretrained_path, distill_loss_weight=args.distill_loss_weight,
                  task_loss_weight=args.task_loss_weight, device=device, dtype=dtype, verbose=verbose)
    try:
        if args.kd_distill_type == 'feature':
            return FeatureDistillationTask(**common, student_feature_dim=args.kd_student_feature_dim,
                                           teacher_feature_dim=args.kd_teacher_feature_dim)
        if args.kd_distill_type == 'token':
            return TokenDistillationTask(**common, distill_type=args.kd_token_distill_type,
                                         temperature=args.kd_temperature)
        return LogitDistillationTask(**common, loss_type=args.kd_loss_type, temperature=args.kd_temperature)
    except RuntimeError as e:  # e.g. no pretrained weights for the teacher, or weights that do not fit
        raise ValueError(f'teacher {args.kd_model_name}: {one_line(e)}') from None


def train_loss(args) -> nn.Module:
    """timm's choice: JSD over augmentation splits, soft-target CE under mixup/cutmix, label smoothing,
    optional BCE."""
    mixup_on = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0. if mixup_on else args.smoothing, **bce)
    if mixup_on:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
