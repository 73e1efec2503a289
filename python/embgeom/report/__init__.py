"""Reports of the analyses: report.json, PNG plots, one self-contained report.html."""
from ..tables import table_html
from .html import write_html
from .jsonout import jsonable, write_json
from .plots import explained_variance_png, new_figure, save_figure

__all__ = ["jsonable", "write_json", "new_figure", "save_figure", "explained_variance_png", "table_html", "write_html"]
