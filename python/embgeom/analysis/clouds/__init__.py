"""Point clouds of kept vectors: labelled-set geometry and 2-D projections on the exact graph."""
