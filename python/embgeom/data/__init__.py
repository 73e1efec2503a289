"""Small example inputs written for embgeom (synonym groups, sentence pairs, a CoNLL-U sample,
coreference clusters)."""
