"""Per-sample active token sets inside one decoder forward.

A decoder layer sees a *compact* sequence: for each sample, the tokens that are active at that
layer, in their original order. ``ActiveSet`` maps compact slots back to the prefill sequence:

- ``positions``: (B, n) long, index of each slot in the prefill sequence (0 … L-1);
- ``valid``:     (B, n) bool, False for slots that only pad a shorter sample to ``n``
  (and for the host's own padding tokens while nothing has been pruned yet).

Slots are always sorted by original position, so causal order in slot space equals causal order
in the original sequence; that is what lets every attention backend run unchanged on the compact
sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch


@dataclass
class ActiveSet:
    positions: torch.Tensor  # (B, n) long
    valid: torch.Tensor  # (B, n) bool

    @classmethod
    def full(cls, attention_mask_2d: torch.Tensor) -> "ActiveSet":
        """All L prefill tokens, in order; padding slots (mask 0) are marked invalid."""
        batch, length = attention_mask_2d.shape
        pos = torch.arange(length, device=attention_mask_2d.device).expand(batch, length)
        return cls(positions=pos.clone(), valid=attention_mask_2d.bool().clone())

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def counts(self) -> torch.Tensor:
        """(B,) number of valid tokens per sample."""
        return self.valid.sum(dim=1)

    def per_sample(self) -> List[torch.Tensor]:
        """Valid original positions of each sample, sorted ascending."""
        return [self.positions[b][self.valid[b]] for b in range(self.batch_size)]

    def same_as(self, keep: Sequence[torch.Tensor]) -> bool:
        """True when ``keep`` names exactly the current valid tokens of every sample."""
        for b, k in enumerate(keep):
            cur = self.positions[b][self.valid[b]]
            if cur.numel() != k.numel() or not torch.equal(cur, k.to(cur.device)):
                return False
        return True

    @classmethod
    def from_lists(cls, keep: Sequence[torch.Tensor], device: torch.device) -> "ActiveSet":
        """Pad per-sample sorted position lists to a rectangle; padding slots are invalid and sit
        at the end of the row (they point at position 0 and are never attended to)."""
        n = max(int(k.numel()) for k in keep)
        batch = len(keep)
        pos = torch.zeros(batch, n, dtype=torch.long, device=device)
        valid = torch.zeros(batch, n, dtype=torch.bool, device=device)
        for b, k in enumerate(keep):
            pos[b, : k.numel()] = k.to(device)
            valid[b, : k.numel()] = True
        return cls(positions=pos, valid=valid)


def transition(
    current: ActiveSet,
    hidden: torch.Tensor,
    new: ActiveSet,
    layer0: torch.Tensor,
) -> torch.Tensor:
    """Hidden states for ``new`` slots, taken from ``current`` slots.

    Tokens present in ``current`` keep their hidden state; tokens absent from it (re-activated)
    enter with their layer-0 embedding ``layer0[b, position]``. Invalid slots get zeros.

    hidden: (B, n_cur, d); layer0: (B, L, d); returns (B, n_new, d).
    """
    batch, length = layer0.shape[0], layer0.shape[1]
    device = hidden.device
    slot_of = torch.full((batch, length), -1, dtype=torch.long, device=device)
    cur_idx = torch.arange(current.length, device=device).expand(batch, -1)
    # Route invalid current slots to a scratch column so they never shadow a real position.
    scratch = torch.full_like(current.positions, length)
    tgt = torch.where(current.valid, current.positions, scratch)
    slot_of = torch.cat([slot_of, slot_of.new_full((batch, 1), -1)], dim=1)
    slot_of.scatter_(1, tgt, cur_idx)
    slot_of = slot_of[:, :length]

    src = slot_of.gather(1, new.positions)  # (B, n_new), -1 where re-activated
    present = (src >= 0) & new.valid
    reenter = (src < 0) & new.valid
    d = hidden.shape[-1]
    out = hidden.gather(1, src.clamp(min=0).unsqueeze(-1).expand(-1, -1, d))
    if bool(reenter.any()):
        emb = layer0.gather(1, new.positions.unsqueeze(-1).expand(-1, -1, d))
        out = torch.where(reenter.unsqueeze(-1), emb.to(out.dtype), out)
    out = torch.where(present.unsqueeze(-1) | reenter.unsqueeze(-1), out, torch.zeros_like(out))
    return out


def scatter_full(active: ActiveSet, hidden: torch.Tensor, length: int) -> torch.Tensor:
    """(B, n, d) compact → (B, length, d) full sequence; tokens not active are zero."""
    batch, _, d = hidden.shape
    out = hidden.new_zeros(batch, length + 1, d)
    tgt = torch.where(active.valid, active.positions, torch.full_like(active.positions, length))
    out.scatter_(1, tgt.unsqueeze(-1).expand(-1, -1, d), hidden)
    return out[:, :length]
