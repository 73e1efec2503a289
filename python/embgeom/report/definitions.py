"""The definitions a page links its metric names to: `defined(key)` is the name as a link to
`#def-<key>`, and write_html appends a "Definitions" section with every entry the page links to
(offline: the page carries its definitions; docs/metrics.md has the full text)."""
from __future__ import annotations

import html

# key -> (name, definition); the short form of docs/metrics.md
DEFINITIONS = {
    "cone_index": ("cone index I/n", "The norm of the mean unit vector of a set of n vectors: "
                   "||sum_i x_i/||x_i|| || / n, in [0, 1]. 1: all point one way; about 1/sqrt(n): random "
                   "directions. Per text over its real tokens, then the mean over texts (docs/metrics.md, section 2)."),
    "entropy": ("attention entropy", "Per query row of a head: H = -sum_j p_ij ln p_ij in nats over the real "
                "keys, averaged over every real query row of the corpus. The uniform baseline ln(n) is the "
                "entropy of attending to all n real tokens equally (docs/metrics.md, attention rows)."),
    "attention_to": ("attention to [CLS] / [SEP] / punctuation / previous / next", "The attention mass a "
                     "query row gives to the [CLS] token, the [SEP] tokens, punctuation tokens, the token "
                     "before it and the token after it, averaged over every real query row "
                     "(Clark et al. 2019, arXiv 1906.04341)."),
    "attention_to_per_text": ("attention to [CLS] / [SEP] / '.' / ',' / previous / next, per text first",
                              "The same attention masses averaged as Clark et al. (arXiv 1906.04341, "
                              "figure 2) do: each text's mean over its own real query rows, then the mean "
                              "over texts (a text's weight does not grow with its length)."),
    "js_distance": ("Jensen-Shannon distance between heads", "The square root of the Jensen-Shannon "
                    "divergence between two heads' mean attention distributions over [CLS], [SEP] and "
                    "relative offsets; 0 = the same distribution (docs/metrics.md, attention rows)."),
    "context": ("context similarity", "For each head, its output O = softmax(Q K^T / sqrt(d)) V before "
                "the output projection; S = O O^T. For each token, the most similar other token under S "
                "and its distance |i - j|; the focus token is the position most often chosen "
                "(docs/metrics.md, context similarity)."),
    "evolution": ("step distance, step cosine, norm", "Per real token between depth l - 1 and depth l: "
                  "the Euclidean distance ||h_l - h_(l-1)||, the cosine of h_l and h_(l-1), and the norm "
                  "||h_l||, averaged over every real token (depth 0 = embedding output)."),
    "silhouette": ("silhouette, within / between cosine", "Silhouette (cosine distance) of the labelled "
                   "[CLS] vectors, in [-1, 1]; the mean cosine of pairs with the same label and of pairs "
                   "with different labels."),
    "cosine": ("cosine", "x.y / (||x|| ||y||) of two rows, clamped to [-1, 1]; rows of norm zero are "
               "left out and counted."),
    "pairs": ("all-pairs statistics", "Over every unique pair i < j of the analysed rows: count, mean, "
              "population std, extremes, a histogram and the ranked pair lists (docs/metrics.md, section 1)."),
    "mean_embedding": ("mean embedding", "The mean of the analysed word embeddings; the tokens ranked by "
                       "Euclidean distance, cosine, |cosine|, dot product, |dot| to it, and by norm."),
    "pca": ("principal components", "Eigen-decomposition of the covariance of the centred rows; the "
            "explained-variance ratio of each component and the components needed for 50/90/99 %."),
    "offset_profile": ("relative-offset profile", "The mean cosine of position embeddings p_i and p_(i+k) "
                       "over i, as a function of the offset k."),
    "clark": ("Clark's head measures", "Per head: smoothed row entropy, the [CLS] row's entropy, attention to "
              "[CLS], [SEP], '.' or ',', '.', ',', the neighbours and other tokens' to [SEP], the summed JS divergence between heads and its MDS map "
              "(Clark et al. 2019, arXiv 1906.04341; docs/metrics.md, attention heads)."),
    "attention_matrices": ("attention-block spectra (GoB code)", "Per text and head, on the real-token "
                           "attention block A (n x n): the cone index I/n of its rows, the number of its "
                           "singular values below 1e-3, and the von Neumann entropy -sum v ln v with "
                           "v = |lambda| / sqrt(sum |lambda|^2) over its eigenvalues; k90 = the fewest "
                           "largest entries of a row summing to >= 0.9 (arXiv 2502.12033's code; "
                           "docs/metrics.md, attention_matrices)."),
    "gaussianity": ("Gaussianity (K^2)", "D'Agostino-Pearson K^2 normality test of each real token's "
                    "hidden state (its D components as the sample), per depth, Bonferroni over the "
                    "tokens; skewness and excess kurtosis; the same for each text's mean state."),
    "syntax": ("syntax-head accuracy", "Per dependency relation and head: the share of words whose "
               "most-attended word (word-level attention, either direction) is its gold head; the "
               "baseline is the best fixed offset -3..2."),
    "coref": ("antecedent selection accuracy", "Per head: the share of mentions (with an earlier mention of "
              "their cluster) whose head word attends most, among the earlier mentions' head words, to one "
              "of the same cluster; baselines: the nearest earlier mention, the nearest with the same head "
              "word (Clark et al. 2019, arXiv 1906.04341, section 4.3)."),
}


def defined(key: str, text: str | None = None) -> str:
    """The metric's name (or `text`) as a link to its definition on the page."""
    name = DEFINITIONS[key][0] if text is None else text
    return f"<a href='#def-{key}'>{html.escape(name)}</a>"


def definitions_html(page: str) -> str:
    """The definitions the page links to (by `#def-<key>`), as a <dl>; "" when none."""
    items = [(k, v) for k, v in DEFINITIONS.items() if f"#def-{k}'" in page]
    if not items:
        return ""
    return "<dl>" + "".join(f"<dt id='def-{k}'><b>{html.escape(name)}</b></dt><dd>{html.escape(text)}</dd>"
                            for k, (name, text) in items) + "</dl>"
