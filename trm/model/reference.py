"""Load state dicts saved by the reference implementation (TinyRecursiveModels).

Our module tree uses the reference's names, so loading is: strip the wrappers' prefixes
(``_orig_mod.`` from torch.compile, ``model.`` from its loss head, in any order), drop the
non-persistent scratch buffers it sometimes saved, check every key and shape, cast.
"""

from __future__ import annotations

from typing import Mapping

import torch

from trm.model.trm import TRM

WRAPPER_PREFIXES = ("_orig_mod.", "model.", "module.")
SCRATCH_SUFFIXES = ("puzzle_emb.local_weights", "puzzle_emb.local_ids", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def normalise_reference_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop scratch buffers; returns keys like ``inner.H_init``."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.endswith(SCRATCH_SUFFIXES):
            continue
        out[key] = value
    return out


def load_reference_state_dict(model: TRM, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a reference-format state dict into ``model`` (in place); raise ValueError listing
    missing keys, unexpected keys and shape mismatches when the two do not describe the same model."""
    incoming = normalise_reference_keys(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(incoming) if incoming[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(
            "The state dict does not match this model's architecture; check hidden_size, L_layers, "
            "mlp_t, puzzle_emb_ndim, pos_encodings and the dataset's vocab/seq_len. " + "; ".join(parts)
        )
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(incoming[key].to(tensor.dtype))
