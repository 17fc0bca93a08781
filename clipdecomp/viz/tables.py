"""Tables as notebooks show them (HTML): the methods return DataFrames, this styles them."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from clipdecomp.engine.config import check_size

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["format_head_table"]


def format_head_table(df: pd.DataFrame, n_show: int | None = None, sep: str = "<br>") -> Any:
    """A readable view of a :func:`~clipdecomp.methods.textspan.textspan_heads` table for Jupyter.

    Parameters
    ----------
    df : pandas.DataFrame
        Output of :func:`~clipdecomp.methods.textspan.textspan_heads`.
    n_show : int, optional
        Show only the first ``n_show`` texts of each head.
    sep : str
        Separator between texts (``"<br>"``: one per line in HTML; ``"; "`` for plain text).

    Returns
    -------
    pandas.io.formats.style.Styler or pandas.DataFrame
        A Styler (texts left-aligned, variance as a percentage) when jinja2 is installed,
        otherwise a DataFrame of strings.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"layer": [11], "head": [3], "texts": [["a dog", "a cat"]],
    ...                    "variance_explained": [0.5]})
    >>> format_head_table(df, sep="; ").data["texts"].iloc[0]
    'a dog; a cat'
    """
    if n_show is not None:
        n_show = check_size(n_show, "n_show")
    out = df.copy()
    escape = sep == "<br>"
    out["texts"] = [
        sep.join(html.escape(str(x)) if escape else str(x) for x in (ts if n_show is None
                                                                     else ts[:n_show]))
        for ts in df["texts"]
    ]
    out = out.set_index(["layer", "head"])
    try:
        styler = out.style.format({"variance_explained": "{:.1%}"}).set_properties(
            subset=["texts"], **{"text-align": "left", "white-space": "pre-wrap"}
        )
        return styler
    except ImportError:
        out["variance_explained"] = [f"{v:.1%}" for v in out["variance_explained"]]
        return out
