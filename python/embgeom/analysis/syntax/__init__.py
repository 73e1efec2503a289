"""Syntax heads: a CoNLL-U treebank and word-level attention scored against it."""
