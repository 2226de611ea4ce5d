"""Per-update hooks of ``train_stim.py`` that timm's ``train.py`` runs inside its loop
(``--recovery-interval``, ``--save-images``), attached to the training loader instead.

When the training loop asks for the first micro-batch of update ``u``, update ``u - 1`` is complete
(optimizer step, EMA, LR step): that is where a recovery checkpoint is taken, so the loop itself
(``stim_timm/run/engine.py``) stays timm's.
"""
import multiprocessing
import os
from typing import Any, Callable, Iterator, Optional

import torchvision
from timm.data import ImageDataset

__all__ = ['HookedLoader', 'recovery_hook', 'save_images_hook', 'count_bad_images', 'bad_images']


class HookedLoader:
    """Iterates ``loader``; calls ``after_update(u)`` once update ``u`` is done and
    ``on_batch(batch_idx, input)`` for every batch; everything else is the wrapped loader's."""

    def __init__(self, loader, accum_steps: int, after_update: Optional[Callable[[int], None]] = None,
                 on_batch: Optional[Callable[[int, Any], None]] = None):
        self.loader = loader
        self.accum_steps = max(1, accum_steps)
        self.after_update = after_update
        self.on_batch = on_batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, sampler, mixup_enabled, ...
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        for batch_idx, batch in enumerate(self.loader):
            if batch_idx and batch_idx % self.accum_steps == 0 and self.after_update is not None:
                self.after_update(batch_idx // self.accum_steps - 1)
            if self.on_batch is not None:
                self.on_batch(batch_idx, batch[0])
            yield batch


def recovery_hook(saver, epoch: int, interval: int) -> Callable[[int], None]:
    """timm's recovery checkpoint every ``interval`` updates (``recovery-<epoch>-<update>.pth.tar``)."""
    def hook(update_idx: int) -> None:
        if (update_idx + 1) % interval == 0:
            saver.save_recovery(epoch, batch_idx=update_idx)
    return hook


def save_images_hook(output_dir: str, accum_steps: int, log_interval: int) -> Callable[[int, Any], None]:
    """The first batch of every logged update as ``train-batch-<i>.jpg`` (normalised for viewing)."""
    def hook(batch_idx: int, input) -> None:
        if batch_idx % accum_steps == 0 and (batch_idx // accum_steps) % log_interval == 0:
            torchvision.utils.save_image(input.float(), os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'),
                                         padding=0, normalize=True)
    return hook


# ---- unreadable images ----------------------------------------------------------------------------
class _CallCounter:
    """A dataset reader that counts how often an item is asked for (everything else: the reader's)."""

    def __init__(self, reader):
        self.reader = reader
        self.calls = 0

    def __getitem__(self, index):
        self.calls += 1
        return self.reader[index]

    def __len__(self) -> int:
        return len(self.reader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


class CountedImageDataset(ImageDataset):
    """timm's ImageDataset whose skipped images are counted. timm replaces an image it cannot open or
    decode by the next one (with a log warning); each extra reader call inside one ``__getitem__`` is
    such a skip. The count lives in shared memory, so DataLoader workers add to it too."""

    def __getitem__(self, index):
        self.reader.calls = 0
        item = super().__getitem__(index)
        skipped = self.reader.calls - 1
        if skipped > 0:
            with self.stim_bad_images.get_lock():
                self.stim_bad_images.value += skipped
        return item


def count_bad_images(ds: Any) -> Any:
    """Make a timm ``ImageDataset`` count the images it skips (``bad_images``); returns ``ds``."""
    if type(ds) is ImageDataset:
        ds.reader = _CallCounter(ds.reader)
        ds.stim_bad_images = multiprocessing.get_context().Value('q', 0)
        ds.__class__ = CountedImageDataset
    return ds


def bad_images(ds: Any) -> int:
    """The images ``ds`` (or the dataset it wraps) skipped so far as unreadable."""
    ds = getattr(ds, 'dataset', ds)
    counter = getattr(ds, 'stim_bad_images', None)
    return int(counter.value) if counter is not None else 0
