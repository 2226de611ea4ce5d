"""Publishing: a sub-network as a plain timm model, model cards, the Hugging Face Hub, and the
authors' checkpoints converted."""
