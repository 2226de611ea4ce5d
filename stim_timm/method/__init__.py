"""The method: which sub-network a step trains (sampling, the panel), the presets st/stpp, the losses,
small inputs and the training task that adds the sub-network loss to any timm task."""
