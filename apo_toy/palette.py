"""One look per arm, for every figure, notebook and run plot: a colour per family, a line style and
marker per variant.

A method name is `family` + optional variant suffix: `apo_old_mass@beta=0.1`, `grpo@lr_x0.5`,
`grpo_kl_0.1`, `apo@K=4`, `grpo_kl_full@0.05`. The family (longest known prefix) fixes the colour
and the default line style and marker; a variant keeps its family's colour and gets a dashed-type
line style and a marker derived from its value, so strengths of one family read as one hue in
different strokes. The default looks of all families are pairwise different (tested), and so are
the variants of one family whose values differ by a factor of at least sqrt(2).

`style(name)` is a pure function of the name (the same arm looks the same in every figure);
`styles(names)` returns the looks of one figure's arms and, should two of them still coincide,
moves the later one to the next free marker, so no two arms of one figure share a look.

Pure data: no matplotlib import (line styles are matplotlib's names / dash tuples).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Iterable

# Okabe & Ito (2008) colour-blind-safe colours first, then Paul Tol's muted set and a few more hues
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
    "grey": "#999999",
}
_TOL = {"indigo": "#332288", "teal": "#44AA99", "olive": "#999933", "rose": "#CC6677", "wine": "#882255",
        "sand": "#DDCC77", "forest": "#117733", "brown": "#8C564B", "pink": "#E377C2", "cyan": "#17BECF",
        "violet": "#9467BD", "lime": "#BCBD22", "slate": "#555555", "salmon": "#FF9896", "tan": "#C49C94"}
COLORS = {**OKABE_ITO, **_TOL}

# family -> (colour, default line style, default marker). Families of one concept share a hue only
# where a line style / marker tells them apart (psr/nsr, clip_cov/kl_cov, the controls).
FAMILIES: dict[str, tuple[str, object, str]] = {
    "base": (COLORS["black"], "--", "*"),
    "grpo": (COLORS["vermillion"], "-", "o"),
    "grpo_low_lr": (COLORS["vermillion"], "--", "v"),   # GRPO at a lower lr (the null); grpo@lr_x... too
    "dr_grpo": (COLORS["rose"], "-", "v"),
    "dapo": (COLORS["wine"], "-", "^"),
    "w_reinforce": (COLORS["sand"], "-", "<"),
    "passk": (COLORS["pink"], "-", ">"),
    "psr": (COLORS["forest"], "-", "P"),
    "nsr": (COLORS["forest"], "--", "X"),
    "grpo_kl": (COLORS["orange"], "-", "s"),             # k3 in the loss: a forward-KL pull
    "grpo_kl_full": (COLORS["olive"], "-", "D"),         # exact reverse KL
    "kl_on_wrong": (COLORS["purple"], "-", "h"),
    "topk_kl_on_wrong": (COLORS["indigo"], "-", "H"),
    "entropy": (COLORS["brown"], "-", "d"),
    "clip_cov": (COLORS["tan"], "-", "p"),
    "kl_cov": (COLORS["tan"], "--", "8"),
    "apo": (COLORS["blue"], "-", "o"),                   # reading A: r_anchor = M_S / Z_ref
    "apo_old_mass": (COLORS["sky"], "-", "s"),           # reading C
    "apo_old_token": (COLORS["teal"], "-", "^"),         # reading H
    "apo_push_only": (COLORS["green"], "-", "D"),
    "apo_inclusive": (COLORS["blue"], "-.", "x"),        # an ablation of APO: APO's hue, its own stroke
    "apo_silence": (COLORS["grey"], "-", "x"),           # controls
    "apo_antisharp": (COLORS["grey"], "--", "+"),
    "cispo": (COLORS["lime"], "-", "o"),
    "gspo": (COLORS["cyan"], "-", "s"),
    "simko": (COLORS["violet"], "-", "^"),
    "sapo": (COLORS["salmon"], "-", "v"),
    "gmpo": (COLORS["yellow"], "-", "D"),
    "gpg": (COLORS["slate"], "-", "P"),
    "dppo": (COLORS["rose"], "--", "X"),
    "npg": (COLORS["slate"], ":", "*"),                  # natural-PG yardstick, not a loss
}
UNKNOWN = (COLORS["grey"], "-", ".")
ALIASES = {"grpo@lr": "grpo_low_lr", "apo_ref": "apo", "apo_tiny": "apo", "apo-tiny": "apo"}  # apo_ref: the miniature's reading A

VARIANT_LINESTYLES = ("--", "-.", ":", (0, (5, 1)))
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "h")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def split(name: str) -> tuple[str, str]:
    """(family, variant suffix): 'apo_old_mass@beta=0.1' -> ('apo_old_mass', 'beta=0.1'),
    'grpo@lr_x0.5' -> ('grpo_low_lr', 'lr_x0.5'), 'grpo_kl_0.1' -> ('grpo_kl', '0.1')."""
    core = name.split(" (")[0].strip()                  # report_label's "(positive-only, not APO)"
    for alias, fam in ALIASES.items():
        if core.startswith(alias):
            return fam, core[len(alias):].lstrip("@_-=[]")
    for fam in sorted(FAMILIES, key=len, reverse=True):  # longest prefix first: grpo_kl before grpo
        if core == fam:
            return fam, ""
        if core.startswith(fam) and core[len(fam)] in "@_-[":
            return fam, core[len(fam):].lstrip("@_-[").rstrip("]")
    return core, ""


def family(name: str) -> str:
    """The family of an arm name (its colour): 'apo_old_mass@beta=0.1' -> 'apo_old_mass', 'grpo@lr_x0.5' ->
    'grpo_low_lr', 'apo-tiny' -> 'apo'. The one rule: apo_toy/plots.py and paper_figures/style.py use this."""
    return split(name)[0]


def _variant_index(suffix: str) -> int:
    """A number per variant: 2 log2(value) rounded, so strengths a factor sqrt(2) apart differ."""
    nums = _NUMBER.findall(suffix)
    key = _NUMBER.sub("#", suffix)
    offset = zlib.crc32(key.encode()) % 7            # different setting names start at different places
    if nums:
        v = abs(float(nums[-1]))
        return offset + (round(2 * math.log2(v)) if v > 0 else -99)
    return offset + zlib.crc32(suffix.encode()) % 31


def style(name: str) -> dict:
    """{'color', 'linestyle', 'marker'} of one arm; a pure function of its name."""
    fam, suffix = split(name)
    color, ls, marker = FAMILIES.get(fam, UNKNOWN)
    if suffix:
        i = _variant_index(suffix)
        marker = MARKERS[i % len(MARKERS)]
        ls = VARIANT_LINESTYLES[(i // len(MARKERS)) % len(VARIANT_LINESTYLES)]
    return {"color": color, "linestyle": ls, "marker": marker}


def color(name: str) -> str:
    return style(name)["color"]


def _key(st: dict) -> tuple:
    return st["color"], str(st["linestyle"]), st["marker"]


def styles(names: Iterable[str]) -> dict[str, dict]:
    """The looks of one figure's arms, pairwise different: a later arm that would repeat an earlier
    arm's (colour, line style, marker) moves to its family colour's next free marker."""
    out, used = {}, set()
    for n in names:
        if n in out:
            continue
        st = dict(style(n))
        start = MARKERS.index(st["marker"]) if st["marker"] in MARKERS else 0
        for j in range(len(MARKERS) * len(VARIANT_LINESTYLES) + 1):
            if _key(st) not in used:
                break
            st["marker"] = MARKERS[(start + j + 1) % len(MARKERS)]
            if j + 1 >= len(MARKERS):
                st["linestyle"] = VARIANT_LINESTYLES[((j + 1) // len(MARKERS)) % len(VARIANT_LINESTYLES)]
        used.add(_key(st))
        out[n] = st
    return out


def distinct(names: Iterable[str], resolve: bool = False) -> bool:
    """True if the arms' looks are pairwise different (as `style` gives them, or as `styles` resolves)."""
    names = list(dict.fromkeys(names))
    looks = styles(names) if resolve else {n: style(n) for n in names}
    return len({_key(s) for s in looks.values()}) == len(names)
