"""Running a corpus through an encoder: inputs, family adapters, the trace (binding layer), per-batch
attention summaries and the vectors a run keeps."""
