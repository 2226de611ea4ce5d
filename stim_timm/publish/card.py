"""The one model-card writer: every ``README.md`` stim-timm publishes (a trained run, an exported
sub-network, a converted official checkpoint) is a ``huggingface_hub.ModelCard``.

The metadata is ``huggingface_hub.ModelCardData``: ``library_name: timm`` (the Hub's timm loader and
snippet), the licence, the tags and, when the full network's top-1 is known, a ``model-index`` with one
``EvalResult`` (image classification, top-1 accuracy in %), so the Hub shows the number and
``ModelCard.load(path).data.eval_results`` reads it back. The text is the sections the caller gives.
"""
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..run.io import atomic_write_text

__all__ = ['CARD_FILE', 'BASE_TAGS', 'Top1', 'build_card', 'write_card', 'retarget_card']

CARD_FILE = 'README.md'
BASE_TAGS = ('image-classification', 'timm', 'stimulative-training', 'stim-timm')


@dataclass
class Top1:
    """The full network's top-1 accuracy (%) on ``dataset`` (a Hub dataset id or the run's dataset
    name), for the card's ``model-index``. ``source_name``/``source_url``: where the number comes
    from when it was not measured by stim-timm (the Hub needs both)."""
    value: float
    dataset: str
    split: Optional[str] = None
    source_name: Optional[str] = None
    source_url: Optional[str] = None

    def eval_result(self) -> EvalResult:
        return EvalResult(task_type='image-classification', task_name='Image Classification',
                          dataset_type=self.dataset, dataset_name=self.dataset, dataset_split=self.split,
                          metric_type='accuracy', metric_name='top-1 accuracy (%)',
                          metric_value=round(float(self.value), 4),
                          source_name=self.source_name if self.source_url else None, source_url=self.source_url)


def build_card(title: str, sections: Sequence[str], model_name: str, license: str = 'apache-2.0',
               tags: Sequence[str] = BASE_TAGS, datasets: Optional[Sequence[str]] = None,
               top1: Optional[Top1] = None) -> ModelCard:
    """A model card: the metadata, then ``# title`` and the ``sections`` (markdown, one per string,
    separated by a blank line)."""
    data = ModelCardData(library_name='timm', license=license, tags=list(tags), pipeline_tag='image-classification',
                         datasets=list(datasets) if datasets else None, model_name=model_name,
                         eval_results=[top1.eval_result()] if top1 is not None else None)
    body = '\n\n'.join([f'# {title}'] + [s.strip('\n') for s in sections if s]) + '\n'
    return ModelCard(f'---\n{data.to_yaml()}\n---\n{body}')


def write_card(card: ModelCard, folder: str) -> str:
    """``README.md`` in ``folder``, written atomically; its path."""
    path = os.path.join(folder, CARD_FILE)
    atomic_write_text(path, str(card))
    return path


def retarget_card(folder: str, repo_id: str, resolved: str) -> None:
    """The card in ``folder`` says ``'hf-hub:REPO_ID'``; the Hub pushed ``name`` to ``user/name``: say that."""
    path = os.path.join(folder, CARD_FILE)
    if resolved == repo_id or not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        text = f.read().replace(f"'hf-hub:{repo_id}'", f"'hf-hub:{resolved}'")
    atomic_write_text(path, text)

