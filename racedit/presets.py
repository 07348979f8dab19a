"""Size presets: DiT-{S,B,M,L,XL}/{2,4,8} and their Race-DiT MoE versions RaceDiT-{size}/{p}-{k}in{E}; the shape
rules of a MoE layer (1 <= k <= E, and the whole number of pairs each routing group selects).

S/B/L/XL follow the DiT paper; M (16 layers, 960 wide, 16 heads) is the size the Race-DiT paper adds.
"""

from __future__ import annotations

import re

# size -> (depth, hidden_size, num_heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (16, 960, 16),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
_NAME = re.compile(r"^(DiT|RaceDiT)-(S|B|M|L|XL)/(\d+)(?:-(\d+)in(\d+))?$")


def resolve_preset(name: str) -> dict[str, int]:
    """Preset name -> {depth, hidden_size, num_heads, patch_size, moe_k, moe_experts}.

    Raises KeyError naming the bad preset and the accepted forms.
    """
    m = _NAME.match(name)
    accepted = ("DiT-{S,B,M,L,XL}/{2,4,8}, RaceDiT-{S,B,M,L,XL}/{2,4,8}-{k}in{E} "
                "(e.g. DiT-XL/2, RaceDiT-B/2-2in8)")
    if m is None:
        raise KeyError(f"unknown model preset {name!r}; accepted: {accepted}")
    family, size, patch, k, experts = m.groups()
    if int(patch) not in PATCHES:
        raise KeyError(f"unknown model preset {name!r}: patch size must be one of {PATCHES}")
    if (family == "RaceDiT") != (k is not None):
        raise KeyError(f"unknown model preset {name!r}: RaceDiT names need a -kinE suffix and DiT names none; "
                       f"accepted: {accepted}")
    depth, hidden, heads = SIZES[size]
    k_, e_ = (int(k), int(experts)) if k is not None else (0, 0)
    # -kinE is checked (1 <= k <= E) with the model's other options, by racedit.config.check_moe_shape
    return {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": int(patch),
            "moe_k": k_, "moe_experts": e_}


def check_k_in_e(k: int, experts: int) -> None:
    """The one test of a MoE layer's shape (E experts, k of them per token on average): 1 <= k <= E.
    Raises ValueError."""
    if not 1 <= k <= experts:
        raise ValueError(f"a MoE needs 1 <= k <= E (experts per token, experts), got k={k}, E={experts}")



# The routing strategies whose pairs per group are a quotient over E (racedit.models.routing's table): the
# letters multiplied in the numerator, and what one group is; the others are whole numbers for any shape.
_QUOTIENTS = {"expert_choice": ("kL", "tokens per (image, expert)"), "bl_choice": ("BLk", "tokens per expert")}


def selected_per_group(strategy: str, B: int, L: int, experts: int, k: int) -> int:
    """K, the (token, expert) pairs each group of `strategy` selects from a batch of B images of L tokens with E
    experts and k per token (racedit.models.routing's table). Raises ValueError, with the arithmetic, when
    k is not in [1, E] or K is not a whole number."""
    check_k_in_e(k, experts)
    if strategy in _QUOTIENTS:
        letters, what = _QUOTIENTS[strategy]
        values = {"B": B, "L": L, "k": k}
        n = 1
        for letter in letters:
            n *= values[letter]
        if n % experts:
            given = ", ".join(f"{letter}={values[letter]}" for letter in letters)
            raise ValueError(f"{strategy} selects {'*'.join(letters)}/E {what}: {given}, E={experts} gives "
                             f"{n}/{experts}, not a whole number")
        return n // experts
    return {"token_choice": k, "be_choice": B * k, "le_choice": L * k, "expert_race": B * L * k}[strategy]
