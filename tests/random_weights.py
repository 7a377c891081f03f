"""Random weights for model tests: every parameter drawn, so the zero-initialised adaLN and
output layers take part in a comparison (with their initial zeros they would hide errors)."""
import torch


def randomize_(model, std=0.05):
    """Every parameter of ``model`` ~ N(0, std²), in place; returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model
