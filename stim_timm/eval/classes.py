"""Class maps of image-folder splits: one map per run, checked wherever a split is read.

timm's folder reader silently drops an empty or unreadable class folder, which shifts every later
class's index; and an evaluation split with other classes than the run's would score against the
wrong labels. Both are refused here, with one line naming the folder, for training (``run.setup``)
and for every evaluation of a trained run (``eval_loader(classes=...)``, ``stim-analyze``)."""
import os
from typing import Dict, List, Optional, Sequence

from timm.data.readers.img_extensions import get_img_extensions

__all__ = ['has_images', 'class_folder_problem', 'check_class_folders', 'split_class_map']


def _find_image(folder: str, onerror=None) -> bool:
    exts = get_img_extensions(as_set=True)
    for _, _, files in os.walk(folder, followlinks=True, onerror=onerror):
        if any(os.path.splitext(f)[1].lower() in exts for f in files):
            return True
    return False


def has_images(folder: str) -> bool:
    """Whether any file below ``folder`` has an image extension timm reads (unreadable parts skipped)."""
    return _find_image(folder)


def class_folder_problem(folder: str) -> Optional[str]:
    """Why a class folder gives no images (unreadable, or no image file anywhere in it), or None."""
    errors: List[OSError] = []
    found = _find_image(folder, errors.append)
    if errors:
        e = errors[0]
        return f'class folder {e.filename or folder}: unreadable ({e.strerror or type(e).__name__})'
    return None if found else f'class folder {folder}: no images (an empty class would shift every later ' \
                              f'class index; add its images or remove the folder)'


def check_class_folders(split_dir: str) -> List[str]:
    """The class folders of an image-folder split, sorted as timm sorts them; ValueError naming the
    first one that is empty or unreadable (timm would drop it and shift the later classes' indices)."""
    try:
        names = [e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.')]
    except OSError as e:
        raise ValueError(f'split folder {split_dir}: unreadable ({e.strerror or type(e).__name__})') from None
    for name in sorted(names):
        problem = class_folder_problem(os.path.join(split_dir, name))
        if problem:
            raise ValueError(problem)
    return sorted(names)


def split_class_map(split_dir: str, classes: Optional[Sequence[str]]) -> Optional[Dict[str, int]]:
    """The run's class map (``classes``: names in index order) for an image-folder split, after checking
    its class folders (none empty or unreadable) and that they are exactly the run's classes; None
    when the run recorded no classes or the split has no class folders (then timm's own map applies)."""
    if not os.path.isdir(split_dir):
        return None
    folders = check_class_folders(split_dir)
    if not classes or not folders:
        return None
    if set(folders) != set(classes):
        missing, extra = sorted(set(classes) - set(folders)), sorted(set(folders) - set(classes))
        what = '; '.join(p for p in (f'missing: {", ".join(missing[:5])}' if missing else '',
                                     f'not in the run: {", ".join(extra[:5])}' if extra else '') if p)
        raise ValueError(f'{split_dir}: its classes differ from the run\'s ({what})')
    return {c: i for i, c in enumerate(classes)}
