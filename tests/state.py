"""Every tensor of a training checkpoint by a flat name, for bit-identity comparisons."""

import torch

PARTS = ("context_encoder", "target_encoder", "predictor", "heads")


def checkpoint_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The weights of every model part and the optimizer moments of ``state`` (a checkpoint or
    ``Trainer.state_dict()``), keyed ``part.name`` and ``opt.i.name``."""
    out = {f"{part}.{k}": v for part in PARTS for k, v in state[part].items()}
    for i, s in state["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out
