"""Reports of the analyses: report.json, PNG plots, one self-contained report.html."""
from .html import table_html, write_html
from .jsonout import jsonable, write_json
from .plots import new_figure, save_figure

__all__ = ["jsonable", "write_json", "new_figure", "save_figure", "table_html", "write_html"]
