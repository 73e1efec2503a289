"""A pipeline's use of embgeom as its authors type-check it: tests/test_typing.py runs mypy on
this file (no error expected: every call here is correct) and runs it (tiny sizes), so the
annotations it relies on are the ones the functions honour. Thresholds come back from searches
as numpy and tensor scalars, paths as pathlib.Path, devices as torch.device."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import embgeom
from embgeom import Index, KnnResult, PairwiseStats
from embgeom.compat.sentence_transformers import community_detection, semantic_search
from embgeom.faiss import IndexFlatIP
from embgeom.progress import Progress
from embgeom.sklearn import NearestNeighbors


def statistics(x: np.ndarray, folder: Path) -> PairwiseStats:
    s = embgeom.pairwise_stats(x, bins=np.int64(50), topk=5, row_topk=3, outside=[-0.2, 0.2], range=(-1, 1),
                               near=np.float32(0.5), checkpoint=folder / "run.ckpt",
                               progress=Progress(enabled=False, prefix="stats"))
    count: int = s.count
    mean: float = s.mean
    if s.hist is not None:
        edges: torch.Tensor = s.hist.edges()
        assert edges.numel() == 51
    if s.outside is not None:
        truncated: bool = s.outside.truncated
        assert not truncated or count > 0
    frame: pd.DataFrame = s.to_pandas("row_topk")
    assert len(frame) > 0 and mean == mean
    return s


def retrieval(x: np.ndarray, folder: Path) -> list[int]:
    index = Index(x, metric="cosine", dtype=torch.bfloat16, device=torch.device("cpu"))
    index.save(folder / "corpus.index")
    index = Index.load(folder / "corpus.index", device="cpu")
    scores, ids = index.search(x[:2], np.int64(3))
    lims, found, rows = index.range_search(x[:2], scores[0, 2])      # a 0-d tensor threshold
    lims2, _, _ = index.range_search(x[:2], np.float32(scores[0, 2].item()))
    assert torch.equal(lims, lims2) and found.shape == rows.shape
    manifest: dict = index.pairs_above(np.float32(0.9), folder / "pairs")
    i, j, similarity = embgeom.read_pairs(folder / "pairs")
    assert manifest["count"] == len(i) == len(j) == len(similarity)
    embgeom.pairs_above(x, 0.9, folder / "pairs2", progress=False)
    groups: list[list[int]] = embgeom.communities(x, threshold=np.float32(0.5), min_community_size=2)
    assert isinstance(groups, list)
    return ids[0].tolist()


def drop_ins(x: np.ndarray) -> None:
    hits = semantic_search(torch.from_numpy(x[:2]), torch.from_numpy(x), top_k=3)
    assert hits[0][0]["corpus_id"] == 0
    community_detection(torch.from_numpy(x), threshold=np.float32(0.5), min_community_size=2)
    nn = NearestNeighbors(n_neighbors=np.int64(3), radius=np.float32(0.5), metric="cosine").fit(x)
    dist, ind = nn.kneighbors(x[:2])
    flat = IndexFlatIP(x.shape[1])
    flat.add(x)
    D, I = flat.search(x[:2], 3)
    lims, rd, ri = flat.range_search(x[:2], torch.tensor(0.5))
    lims, rd, ri = flat.range_search(x[:2], np.float32(0.5))
    assert D.shape == I.shape == dist.shape == ind.shape and lims.shape == (3,)


def neighbours(x: np.ndarray) -> KnnResult:
    result = embgeom.knn(x, np.int64(3), device=torch.device("cpu"), progress=False)
    frame: pd.DataFrame = result.to_pandas()
    assert len(frame) > 0
    return result


def main() -> None:
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as d:
        statistics(x, Path(d))
        retrieval(x, Path(d))
    drop_ins(x)
    neighbours(x)
    print("typing usage ran")


if __name__ == "__main__":
    main()
