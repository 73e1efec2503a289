"""Attention-head measures (Clark et al., arXiv 1906.04341; docs/metrics.md, attention heads) and
the Gaussianity of hidden states."""
