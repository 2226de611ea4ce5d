"""Class maps of image-folder splits (stim_timm.eval.classes): empty or unreadable class folders and
splits with other classes than the run's are refused in one line; a split is read with the run's map."""
from pathlib import Path

import pytest
from PIL import Image

from stim_timm.eval.classes import check_class_folders, split_class_map
from stim_timm.eval.evaluate import eval_loader

CONFIG = dict(input_size=(3, 8, 8), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
              crop_mode='center')


def _split(root: Path, classes, per_class: int = 1) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new('RGB', (8, 8), (10 * i, 0, 0)).save(root / c / f'{i}.jpg')
    return root


def test_empty_class_folder_is_refused_naming_it(tmp_path):
    split = _split(tmp_path / 'test', ['ant', 'bee'])
    (split / 'cat').mkdir()
    with pytest.raises(ValueError, match=r'class folder .*/test/cat: no images \(an empty class would shift'):
        check_class_folders(str(split))
    with pytest.raises(ValueError, match='cat: no images'):
        eval_loader(str(tmp_path), 'test', CONFIG, 2, 0)


def test_split_must_have_exactly_the_runs_classes(tmp_path):
    split = _split(tmp_path / 'test', ['ant', 'cat'])
    with pytest.raises(ValueError) as e:
        split_class_map(str(split), ['ant', 'bee', 'cat'])
    assert str(e.value) == f"{split}: its classes differ from the run's (missing: bee)"
    _split(split, ['dog'])
    with pytest.raises(ValueError, match=r"\(missing: bee; not in the run: dog\)$"):
        eval_loader(str(tmp_path), 'test', CONFIG, 2, 0, classes=['ant', 'bee', 'cat'])


def test_split_is_read_with_the_runs_class_map(tmp_path):
    _split(tmp_path / 'test', ['ant', 'bee', 'cat'])
    run_classes = ['cat', 'ant', 'bee']  # a run whose map is not timm's sorted order
    loader = eval_loader(str(tmp_path), 'test', CONFIG, 3, 0, classes=run_classes)
    targets = sorted(int(t) for _, t in loader.dataset)
    assert targets == [0, 1, 2]
    assert loader.dataset.reader.class_to_idx == {'cat': 0, 'ant': 1, 'bee': 2}
    assert split_class_map(str(tmp_path / 'test'), None) is None  # a run without recorded classes: timm's map
