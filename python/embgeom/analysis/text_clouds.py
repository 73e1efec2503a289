"""The vectors `embgeom text` can keep, and their pictures (thesis 4.3, 4.4).

--keep cls        DIR/cls.npy: (n_texts, L+1, D) float32, the [CLS] (first-token) hidden state
                  at every depth (index 0 = embedding output), written batch by batch into a
                  memory-mapped .npy (np.lib.format.open_memmap): the corpus is never in memory.
--trajectories N  DIR/trajectories.npz: every real token's L+1 states for the first N texts
                  (states (n_tokens, L+1, D) float32, text (n_tokens,), position (n_tokens,),
                  token (n_tokens,) str), with PCA paths and step distance / cosine / norm plots.
--labels FILE     one label per text: "groups" in report.json (clouds.group_geometry) and
                  PCA / UMAP pictures coloured by label (implies --keep cls).
--pairs           the difference vectors are kept (DIR/pair_differences.npz) and their PCA is
                  drawn with the mean difference per group as an arrow.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import clouds
from ..report import explained_variance_png, new_figure, save_figure, table_html
from ..report.interactive import PALETTE, scatter_png, write_scatter_html


def add_arguments(p) -> None:
    p.add_argument("--keep", choices=["cls"], action="append", default=[],
                   help="keep vectors: cls -> DIR/cls.npy (n_texts, L+1, D) float32")
    p.add_argument("--trajectories", type=int, default=0, metavar="N",
                   help="keep every token's L+1 states for the first N texts (DIR/trajectories.npz)")
    p.add_argument("--labels", metavar="FILE", help="one label per text (non-blank corpus line): "
                   "geometry of the labelled [CLS] sets (implies --keep cls)")


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


# ------------------------------------------------------------------------------ pictures
def trajectory_plots(out_dir: str, path: str) -> tuple[list[str], dict]:
    """PCA paths of the kept tokens (all depths; without the last step) and per-token step
    distance, step cosine and norm (thesis 4.3, figures 20-22)."""
    z = np.load(path)
    states, text, tokens = z["states"], z["text"], z["token"]
    n, depths, d = states.shape
    names = [f"{t}:{tok}" for t, tok in zip(text.tolist(), tokens.tolist())]
    pngs = []
    fig = new_figure(12, 5.5)[0]
    fig.clf()
    for a, last in enumerate((depths, depths - 1)):
        # each panel its own PCA, fitted on the states it shows (thesis figure 20 a/b)
        flat = states[:, :last].reshape(n * last, d)
        _, mean, comps = clouds.pca_fit(flat, 2)
        paths = ((flat.astype(np.float64) - mean) @ comps).reshape(n, last, 2)
        ax = fig.add_subplot(1, 2, a + 1)
        for i in range(n):
            c = PALETTE[int(text[i]) % len(PALETTE)]
            ax.plot(paths[i, :last, 0], paths[i, :last, 1], "-o", ms=2, lw=0.8, color=c, alpha=0.7)
            ax.annotate(tokens[i], paths[i, last - 1], fontsize=6)
        ax.scatter(paths[:, 0, 0], paths[:, 0, 1], color="red", s=12, zorder=3, label="depth 0")
        ax.set_title("token paths, PCA of all depths" if last == depths else "PCA without the last depth")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    pngs.append(save_figure(fig, out_dir, "trajectories_pca"))
    steps = clouds.trajectory_steps(states)
    fig = new_figure(13, 3.8)[0]
    fig.clf()
    for a, (key, title, xs) in enumerate((("step_distance", "step distance ||h_l - h_(l-1)||", range(1, depths)),
                                          ("step_cosine", "step cosine", range(1, depths)),
                                          ("norm", "norm ||h_l||", range(depths)))):
        ax = fig.add_subplot(1, 3, a + 1)
        for i in range(n):
            ax.plot(list(xs), steps[key][i], lw=0.8, color=PALETTE[int(text[i]) % len(PALETTE)],
                    label=names[i] if n <= 12 else None)
        ax.set_title(title)
        ax.set_xlabel("depth")
        if a == 0 and n <= 12:
            ax.legend(fontsize=6)
    pngs.append(save_figure(fig, out_dir, "trajectories_steps"))
    summary = {"tokens": n, "texts": int(text.max()) + 1 if n else 0,
               "step_distance_mean": steps["step_distance"].mean(0).tolist(),
               "step_cosine_mean": steps["step_cosine"].mean(0).tolist(),
               "norm_mean": steps["norm"].mean(0).tolist()}
    return pngs, summary


def group_plots(out_dir: str, cls_path: str, labels: list[str], groups: dict, texts: list[str] | None,
                seed: int = 0) -> tuple[list[str], list[str]]:
    """Pictures of the labelled [CLS] sets: PCA (and UMAP when umap-learn is there) of the last
    depth coloured by label, per-label PCA curves, silhouette / within / between over depth,
    cosine histograms per label. Returns (PNG paths, notes)."""
    cls = np.load(cls_path, mmap_mode="r")
    last = np.asarray(cls[:, -1], dtype=np.float32)
    pngs, notes = [], []
    proj = clouds.project(last, method="pca", labels=labels)
    pngs.append(scatter_png(out_dir, "groups_pca", proj.embedding, labels,
                            title="[CLS] at the last depth, PCA", xlabel="PC 1", ylabel="PC 2"))
    write_scatter_html(os.path.join(out_dir, "groups_pca.html"), proj.embedding, labels, texts,
                       title="[CLS] at the last depth, PCA")
    pngs.append(explained_variance_png(out_dir, "groups_explained_variance", proj.pca_curves))
    if last.shape[0] >= 4:
        try:
            um = clouds.project(last, method="umap", labels=labels, k=min(15, last.shape[0] - 2), seed=seed)
            pngs.append(scatter_png(out_dir, "groups_umap", um.embedding, labels,
                                    title="[CLS] at the last depth, UMAP (exact cosine graph)"))
            write_scatter_html(os.path.join(out_dir, "groups_umap.html"), um.embedding, labels, texts,
                               title="[CLS] at the last depth, UMAP")
            groups["umap_silhouette"] = um.silhouette
        except ValueError as exc:
            notes.append(f"UMAP left out: {exc}")
    fig, ax = new_figure()
    depth = range(len(groups["silhouette"]))
    nan = lambda v: [np.nan if x is None else x for x in v]  # noqa: E731
    ax.plot(depth, nan(groups["silhouette"]), "o-", label="silhouette (cosine)")
    ax.plot(depth, nan(groups["within_cosine"]), "s-", label="mean cosine, same label")
    ax.plot(depth, nan(groups["between_cosine"]), "^-", label="mean cosine, different labels")
    ax.set_xlabel("depth (0 = embedding output)")
    ax.legend(fontsize=8)
    ax.set_title("labelled [CLS] sets over depth")
    pngs.append(save_figure(fig, out_dir, "groups_depth"))
    fig, ax = new_figure()
    for i, (g, st) in enumerate(groups["last"]["per_label"].items()):
        if "cosine" not in st:
            continue
        h = st["cosine"]["hist"]
        edges = np.linspace(h["lo"], h["hi"], h["bins"] + 1)
        counts = np.asarray(h["counts"], dtype=float)
        ax.step(edges[:-1], counts / max(counts.sum(), 1), where="post", color=PALETTE[i % len(PALETTE)], label=g)
    for key, st in list(groups["last"]["per_pair"].items())[:6]:
        h = st["cosine"]["hist"]
        edges = np.linspace(h["lo"], h["hi"], h["bins"] + 1)
        counts = np.asarray(h["counts"], dtype=float)
        ax.step(edges[:-1], counts / max(counts.sum(), 1), where="post", ls=":", label=key.replace("|", " x "))
    ax.set_xlabel("cosine")
    ax.set_ylabel("share of pairs")
    ax.set_title("pairwise cosine within labels (solid) and across (dotted)")
    ax.legend(fontsize=6)
    pngs.append(save_figure(fig, out_dir, "groups_cosine_hist"))
    return pngs, notes


def pair_plot(out_dir: str, vectors: np.ndarray, pair_groups: list[str]) -> str:
    """PCA of the [CLS] difference vectors, with each group's mean difference as an arrow from
    the image of the zero vector (thesis 4.4.2, figure 24)."""
    _, mean, comps = clouds.pca_fit(vectors, 2)
    xy = (vectors - mean) @ comps
    origin = (-mean) @ comps
    lab = np.asarray(pair_groups)
    arrows = {g: (origin, xy[lab == g].mean(0)) for g in sorted(set(pair_groups))}
    return scatter_png(out_dir, "pair_differences_pca", xy, pair_groups, arrows=arrows,
                       title="[CLS] difference vectors, PCA; arrows: mean per group",
                       xlabel="PC 1", ylabel="PC 2")


def finish(args, out_dir: str, keeper: Keeper | None, report: dict, pairs: list[dict] | None,
           labels: list[str] | None, corpus_texts) -> list[tuple[str, str, list[str]]]:
    """After the run: groups and trajectories in `report`, pictures, and the HTML sections
    (heading, body, PNGs). corpus_texts: a callable returning the texts (hover text)."""
    sections = []
    cls_path = os.path.join(out_dir, "cls.npy")
    if keeper is not None:
        kept_cls = keeper.cls is not None
        keeper.close()
        if kept_cls:
            shape = np.load(cls_path, mmap_mode="r").shape
            report["kept"] = {"cls": {"file": "cls.npy", "shape": list(shape), "dtype": "float32"}}
            sections.append(("Kept [CLS] vectors", f"<p>cls.npy: {shape} float32 (text, depth, hidden; "
                             "depth 0 = embedding output).</p>", []))
    if args.trajectories and keeper is not None and keeper.traj:
        pngs, summary = trajectory_plots(out_dir, os.path.join(out_dir, "trajectories.npz"))
        report["trajectories"] = summary
        sections.append(("Token trajectories (thesis 4.3)",
                         f"<p>{summary['tokens']} tokens of the first {summary['texts']} texts; "
                         "red dots: depth 0. trajectories.npz holds the states.</p>", pngs))
    if labels is not None:
        cls = np.load(cls_path, mmap_mode="r")
        groups = clouds.group_geometry(cls, labels)
        texts = corpus_texts()
        pngs, notes = group_plots(out_dir, cls_path, labels, groups, texts)
        report["groups"] = groups
        rows = [[g, c, groups["last"]["per_label"][g].get("cosine", {}).get("mean"),
                 groups["last"]["per_label"][g]["norms"]["mean"]] for g, c in zip(groups["labels"], groups["counts"])]
        body = (f"<p>silhouette (cosine) at the last depth {groups['silhouette'][-1]}; mean cosine "
                f"within labels {groups['within_cosine'][-1]}, between {groups['between_cosine'][-1]}. "
                "groups_pca.html / groups_umap.html are interactive.</p>"
                + table_html(["label", "texts", "mean cosine within", "mean norm"], rows)
                + "".join(f"<p>{n}</p>" for n in notes))
        sections.append(("Labelled [CLS] sets (thesis 4.4.1, 4.4.3)", body, pngs))
    if pairs is not None and "cls_pairs" in report and "vectors" in report["cls_pairs"]:
        vec = report["cls_pairs"].pop("vectors").cpu().double().numpy()
        pg = [p["group"] for p in pairs]
        np.savez(os.path.join(out_dir, "pair_differences.npz"), vectors=vec.astype(np.float32),
                 group=np.array(pg), a=np.array([p["a"] for p in pairs]), b=np.array([p["b"] for p in pairs]))
        sections.append(("[CLS] difference vectors, PCA (thesis 4.4.2)",
                         "<p>Each point is cls(a) - cls(b) of one pair (pair_differences.npz).</p>",
                         [pair_plot(out_dir, vec, pg)]))
    return sections
