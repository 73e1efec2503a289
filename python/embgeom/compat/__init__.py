"""Drop-ins for the functions pipelines already call (sentence-transformers' util): same
arguments, same return values, on embgeom's exact search."""


def __getattr__(name):
    # `embgeom.compat.sentence_transformers` without importing it first (it loads on first use)
    if name == "sentence_transformers":
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'embgeom.compat' has no attribute {name!r}")
