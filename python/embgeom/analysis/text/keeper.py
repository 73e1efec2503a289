"""Keeping vectors while a corpus runs through a model (docs/metrics.md, kept vectors).

--keep cls writes DIR/cls.npy: (n_texts, L+1, D) float32, the [CLS] (first-token) hidden state at
every depth (depth 0 = embedding output), batch by batch into a memory-mapped .npy, so the corpus
is never in memory; --trajectories N keeps every real token's L+1 states for the first N texts
(DIR/trajectories.npz: states (n_tokens, L+1, D) float32, text, position, token).
"""
from __future__ import annotations

import os
import numpy as np
import torch



class Keeper:
    """Batch callback for trace(): writes [CLS] states to DIR/cls.npy and collects the token
    trajectories of the first `trajectories` texts."""

    def __init__(self, out_dir: str, n_texts: int, layers: int, hidden: int, *, keep_cls: bool,
                 trajectories: int, tokenizer):
        self.out_dir, self.n, self.tokenizer = out_dir, n_texts, tokenizer
        self.cls = None
        if keep_cls:
            self.cls = np.lib.format.open_memmap(os.path.join(out_dir, "cls.npy"), mode="w+",
                                                 dtype=np.float32, shape=(n_texts, layers + 1, hidden))
        self.max_traj = trajectories
        self.traj: list[tuple[int, int, str, np.ndarray]] = []
        self.texts: list[str] = []
        self.done = 0

    def update(self, batch) -> None:
        B = batch.mask.shape[0]
        if self.done + B > self.n:
            raise ValueError(f"texts: more texts than counted ({self.n})")
        if self.cls is not None:
            # (L+1, B, D) -> (B, L+1, D), one device->host copy per batch
            first = torch.stack([h[:, 0] for h in batch.hidden_states], 1).float().cpu().numpy()
            self.cls[self.done:self.done + B] = first
        want = min(B, max(self.max_traj - self.done, 0))
        for i in range(want):
            m = batch.mask[i]
            states = torch.stack([h[i][m] for h in batch.hidden_states], 1).float().cpu().numpy()
            ids = batch.input_ids[i][m].tolist()
            toks = self.tokenizer.convert_ids_to_tokens(ids)
            for pos, (tok, s) in enumerate(zip(toks, states)):
                self.traj.append((self.done + i, pos, tok, s))
            self.texts.append(batch.texts[i])
        self.done += B

    def close(self) -> None:
        if self.cls is not None:
            if self.done != self.n:
                raise ValueError(f"texts: wrote {self.done} [CLS] rows, expected {self.n}")
            self.cls.flush()
            del self.cls
            self.cls = None
        if self.traj:
            np.savez(os.path.join(self.out_dir, "trajectories.npz"),
                     states=np.stack([t[3] for t in self.traj]).astype(np.float32),
                     text=np.array([t[0] for t in self.traj], dtype=np.int64),
                     position=np.array([t[1] for t in self.traj], dtype=np.int64),
                     token=np.array([t[2] for t in self.traj]), texts=np.array(self.texts))
