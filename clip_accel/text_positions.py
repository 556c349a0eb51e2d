"""Long-CLIP's stretching of a CLIP's text positions (`--text_positions N`): captions past 77 tokens read whole.

Zhang et al. 2024 (arXiv 2403.15378): the first 20 positions, CLIP's best trained, are kept; the rest are stretched
by linear interpolation (and extrapolated along the last step at the end), 77 -> 248 = 4 x 77 - 3 x 20. Which
models may be stretched is `model.check_text_positions`'s call.
"""

from __future__ import annotations

import torch
from transformers import CLIPModel

from .config import UserError

# Long-CLIP keeps its first 20 text positions as CLIP trained them: short captions, where CLIP's positions are
# best trained, read the model unchanged.
KEPT_POSITIONS = 20


def long_clip_positions(length: int) -> int:
    """Long-CLIP's stretched length: the first 20 positions kept, the rest 4x as many (77 -> 4 x 77 - 3 x 20 =
    248)."""
    return 4 * length - 3 * KEPT_POSITIONS


def stretch_text_positions(model: CLIPModel, tokenizer, positions: int) -> None:
    """Stretch a CLIP's text position embeddings to `positions` the way Long-CLIP does (Zhang et al. 2024,
    arXiv 2403.15378), in place, and make the config and the tokenizer say so: a saved folder then loads with
    `positions` positions and its tokenizer keeps captions up to that many tokens. A model already at `positions`
    (a stretched folder trained on, or resumed) is left as is.

    The first 20 positions are kept; position j >= 20 reads the old table of L positions at 20 + (j - 20) x
    (L - 20) / (N - 20), linearly interpolated between its two neighbours, and past the last old position
    extrapolated along the last step (old[L - 1] + t x (old[L - 1] - old[L - 2])). At N = 4L - 60 (77 -> 248) this
    is Long-CLIP's table exactly: model/longclip.py, `load()`, lines 230-246 of github.com/beichenzbc/Long-CLIP at
    commit 3966af9 (4x interpolation between positions 20..L-1, then the last four positions old[L - 1] + k/4 x
    (old[L - 1] - old[L - 2]), k = 0..3). Long-CLIP then trains the stretched table as a frozen copy plus a trained
    residual; here the table itself trains, like every other weight (or not, as --freeze says).
    """
    embeddings = model.text_model.embeddings
    length = embeddings.position_embedding.num_embeddings
    if positions == length:
        return
    if length < KEPT_POSITIONS + 2:
        raise UserError(
            f"--text_positions keeps the first {KEPT_POSITIONS} text positions and stretches the rest: this model "
            f"has {length}, too few to stretch."
        )
    weight = embeddings.position_embedding.weight
    with torch.no_grad():
        table = stretched_positions(weight, positions)
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(table, freeze=not weight.requires_grad)
    embeddings.position_ids = torch.arange(positions, device=weight.device).expand((1, -1))  # (a non-saved buffer)
    model.config.text_config.max_position_embeddings = positions
    model.text_model.config.max_position_embeddings = positions
    tokenizer.model_max_length = positions
    tokenizer.init_kwargs["model_max_length"] = positions  # (what save_pretrained writes)


def stretched_positions(table: torch.Tensor, positions: int) -> torch.Tensor:
    """(L, D) position embeddings -> (positions, D), Long-CLIP's way (`stretch_text_positions`); computed in
    float64, returned in the table's dtype."""
    length = table.shape[0]
    old = table.detach().double()
    where = KEPT_POSITIONS + torch.arange(positions - KEPT_POSITIONS, dtype=torch.float64) * (
        (length - KEPT_POSITIONS) / (positions - KEPT_POSITIONS)
    )
    below = where.floor().long().clamp(max=length - 2)  # past the last old position: along the last step
    step = (where - below).unsqueeze(1).to(old.device)
    below = below.to(old.device)
    stretched = old[below] + step * (old[below + 1] - old[below])
    return torch.cat([old[:KEPT_POSITIONS], stretched]).to(table.dtype)
