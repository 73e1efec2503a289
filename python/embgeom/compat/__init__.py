"""Drop-ins for the functions pipelines already call (sentence-transformers' util): same
arguments, same return values, on embgeom's exact search."""
