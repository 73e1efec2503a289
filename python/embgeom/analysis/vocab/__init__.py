"""A model's input embeddings: word, position and token-type sections of `embgeom vocab`."""
