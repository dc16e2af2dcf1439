"""Small helpers shared by test modules (imported as `helpers`; pytest puts tests/ on sys.path)."""

import torch


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Weights far from init (LayerNorm gains around 1) so logits are spread and differences show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if gain else 0.0))
    return model.eval()
