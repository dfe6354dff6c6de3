"""Layout of Deep3DFaceRecon's 257-dim coefficient vector (spec §1.1).

``coeff[:, ID]`` etc. Angles are radians (x = pitch, y = yaw, z = roll); translation
is in the face model's world units (decimetres); ``gamma`` is 27 SH coefficients laid
out (3 colours × 9) as R[0:9], G[9:18], B[18:27].
"""

from __future__ import annotations

NUM_COEFFS = 257

ID = slice(0, 80)
EXP = slice(80, 144)
TEX = slice(144, 224)
ANGLE = slice(224, 227)
GAMMA = slice(227, 254)
TRANS = slice(254, 257)

#: Group name → slice, in the order the network heads emit them.
GROUPS: dict[str, slice] = {
    "id": ID,
    "exp": EXP,
    "tex": TEX,
    "angle": ANGLE,
    "gamma": GAMMA,
    "trans": TRANS,
}

#: Output width of the seven 1×1 heads, in order (tx, ty and tz are separate heads).
HEAD_SIZES = (80, 64, 80, 3, 27, 2, 1)


def split(coeff):
    """Split (N, 257) coefficients into a dict of named groups (views, no copy)."""
    return {name: coeff[:, s] for name, s in GROUPS.items()}
