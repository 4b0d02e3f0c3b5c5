"""Deprecated: the miniature is `python -m apo_llm.miniature` (the package apo_llm/miniature/); its
figures are paper_figures/miniature.py. This name keeps old commands and imports working for one release."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from apo_llm.miniature import *  # noqa: F401,F403  (old imports: paper_figures.llm_miniature.ARMS, ...)
from apo_llm.miniature import __all__  # noqa: F401

PROG = "python -m paper_figures.llm_miniature"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from apo_llm.miniature.__main__ import main as miniature_main

    print(f"warning: {PROG} is deprecated; use python -m apo_llm.miniature (the same flags)", file=sys.stderr,
          flush=True)
    return miniature_main(argv, prog=PROG)


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # an entry point may choose the backend; the library never does
    sys.exit(main())
