"""Sub-network losses of ST (KL) and ST++ (KL-: direction-only KL on layer-normalised logits)."""
import torch
import torch.nn.functional as F

__all__ = ['kl', 'kl_minus', 'normalize_logits', 'official_probs']


def normalize_logits(logits: torch.Tensor, amplitude: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """Layer norm over classes without affine, times ``amplitude``: keeps the direction only."""
    return F.layer_norm(logits.float(), logits.shape[-1:], eps=eps) * amplitude


def kl(sub_logits: torch.Tensor, full_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(full/T) || softmax(sub/T)) * T^2, batch mean; the full network is the detached teacher.

    Computed in float32 even under autocast: a bf16/fp16 log-softmax of 1000 classes loses the tail.
    """
    with torch.autocast(sub_logits.device.type, enabled=False):
        log_p_sub = F.log_softmax(sub_logits.float() / temperature, dim=-1)
        log_p_full = F.log_softmax(full_logits.detach().float() / temperature, dim=-1)
        return F.kl_div(log_p_sub, log_p_full, reduction='batchmean', log_target=True) * temperature ** 2


def kl_minus(sub_logits: torch.Tensor, full_logits: torch.Tensor, temperature: float = 1.0,
             amplitude: float = 1.0) -> torch.Tensor:
    """KL- of ST++: ``kl`` between layer-normalised logits (no affine, eps 1e-7) times ``amplitude``."""
    with torch.autocast(sub_logits.device.type, enabled=False):
        return kl(normalize_logits(sub_logits, amplitude), normalize_logits(full_logits.detach(), amplitude),
                  temperature)


def official_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities as the authors' training defined them: ``softmax(layer_norm(logits))``.

    Their cross-entropy saw layer-normalised logits only, so the raw logits' scale is arbitrary: their
    log's raw-logit val loss is 6.24 (uniform: ln 1000 = 6.91) at 80.5% top-1. The argmax is the same.
    """
    return normalize_logits(logits).softmax(dim=-1)
