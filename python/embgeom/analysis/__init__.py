"""The studies built on the kernels, one subpackage per subject: text/ (the binding layer that
runs a corpus through an encoder, its inputs and per-batch summaries), heads/ (attention-head
measures), syntax/ (heads against a treebank), clouds/ (kept vectors: geometry, projections),
vocab/ (a model's input embeddings). The commands (embgeom.commands) and page writers
(embgeom.report) sit above them."""
