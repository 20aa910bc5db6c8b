"""Seeded synthetic chest radiographs with pixel masks and free-text reports.

Real chest X-ray data cannot ship with radflash, yet training and evaluation need images whose
findings, locations and masks are known exactly. A phantom is a pure function of its seed: the
same seed gives the same pixels, masks and report on every machine, which is what makes
held-out (finding, location) combinations and resumed training runs reproducible.

Conventions (as on a PA film): air is dark, bone and soft tissue bright, values float32 in
[0, 1]; the patient's RIGHT is on the image's LEFT. Every shape is drawn on one jittered
coordinate grid (rotation, scale, shift), so masks move with the anatomy for free.

Reports deliberately mix the phrasings real reports use (several templates per finding,
negation lists, hedges, normal statements and comparisons with prior studies) so that the
sentence extractor is exercised on the same kind of text it will meet in MIMIC-CXR. Hedges only
ever concern a finding that is really present ("may represent consolidation" where there IS
consolidation): hedging about an absent finding would make a "There may be" sentence a false
positive label.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from radflash.errors import InputError

_SIDES = ("right", "left")
_LUNG_ZONES = tuple(f"{s} {z} lung" for s in _SIDES for z in ("upper", "lower"))


@dataclass(frozen=True)
class FindingSpec:
    """What the generator can draw for one finding and which canonical locations it may take.

    ``locations`` use the canonical location form of :mod:`radflash.training.sentences`
    ("left lung", "right upper lung"); ``(None,)`` means the finding has no location.
    """

    name: str
    locations: tuple[str | None, ...]
    terms: tuple[str, ...]  # words reports use for it (documentation and vocabulary building)


FINDINGS: dict[str, FindingSpec] = {
    spec.name: spec
    for spec in (
        FindingSpec("pleural effusion", ("right lung", "left lung"), ("pleural effusion", "effusion")),
        FindingSpec("pneumothorax", ("right upper lung", "left upper lung", "right lung", "left lung"),
                    ("pneumothorax", "apical pneumothorax", "pleural line")),
        FindingSpec("cardiomegaly", (None,), ("cardiomegaly", "enlarged heart", "enlarged cardiac silhouette")),
        FindingSpec("lung nodule", _LUNG_ZONES, ("nodule", "nodular opacity")),
        FindingSpec("lung mass", _LUNG_ZONES, ("mass", "lobulated mass")),
        FindingSpec("consolidation", _LUNG_ZONES, ("consolidation", "airspace consolidation", "patchy opacity")),
        FindingSpec("atelectasis", _LUNG_ZONES, ("atelectasis", "linear atelectasis", "plate-like atelectasis")),
    )
}
# lungs, their upper/lower zones (split where the generator splits them for findings) and the heart
ANATOMY = ("right lung", "left lung", *_LUNG_ZONES, "heart")


@dataclass
class PlacedFinding:
    """One finding drawn into a phantom; ``box`` is (row0, col0, row1, col1), end-exclusive."""

    name: str
    location: str | None
    mask: np.ndarray  # (H, W) bool
    box: tuple[int, int, int, int]
    severity: str = ""
    hedged: bool = False  # the report only says it "may" be there


@dataclass
class Phantom:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    findings: list[PlacedFinding]
    report: str
    seed: int
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)  # "right lung" | "left lung" | "heart" → bool

    @property
    def labels(self) -> dict[str, bool]:
        return {name: any(f.name == name for f in self.findings) for name in FINDINGS}


# ---- public entry points -------------------------------------------------------------------------
def generate_phantom(
    seed: int,
    size: int | tuple[int, int] = (224, 224),
    *,
    findings: Sequence[tuple[str, str | None] | str] | None = None,
    p_normal: float = 0.3,
    max_findings: int = 3,
    exclude: Iterable[tuple[str, str | None]] | None = None,
) -> Phantom:
    """One phantom, a pure function of its arguments.

    ``findings=None`` draws findings at random (none with probability ``p_normal``, else 1 to
    ``max_findings`` compatible ones); otherwise exactly the listed (name, location) pairs are
    drawn, a location of ``None`` (or a bare name) meaning "a random allowed location".
    ``exclude`` removes (finding, location) combinations from random draws so that training can
    hold them out for the zero-shot test; it never overrides an explicit ``findings`` list.
    """
    h, w = _size(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x9E3779B9]))
    blocked = {(str(f), _loc_key(loc)) for f, loc in (exclude or ())}
    if findings is None:
        chosen = _draw_findings(rng, p_normal=p_normal, max_findings=max_findings, blocked=blocked)
    else:
        chosen = _explicit_findings(rng, findings)
    canvas = _Canvas(h, w, rng)
    placed = [canvas.add_finding(name, loc) for name, loc in chosen]
    image = canvas.render()
    # the report has its own stream so that it does not depend on the image size (noise draws do)
    report = write_report(placed, np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED])))
    return Phantom(image=image, findings=placed, report=report, seed=int(seed), anatomy=canvas.anatomy())


def generate_batch(seed: int, n: int, size: int | tuple[int, int] = (224, 224), **kwargs) -> list[Phantom]:
    """``n`` phantoms whose seeds derive from ``seed`` (independent of ``n``: a longer batch extends a shorter one)."""
    if n < 0:
        raise InputError(f"n must be ≥ 0, got {n}")
    seeds = [int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0] & 0x7FFFFFFF) for i in range(n)]
    return [generate_phantom(s, size, **kwargs) for s in seeds]


def allowed_combos() -> list[tuple[str, str | None]]:
    """Every (finding, location) pair the generator can draw: the label space of the zero-shot test."""
    return [(name, loc) for name, spec in FINDINGS.items() for loc in spec.locations]


# ---- choosing findings ---------------------------------------------------------------------------
def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(h) < 32 or int(w) < 32:
        raise InputError(f"phantom size must be at least 32×32, got {h}×{w}")
    return int(h), int(w)


def _loc_key(loc: str | None) -> str:
    # data.py stringifies locations, so None and "None" must mean the same thing
    return "None" if loc is None else str(loc)


def _conflicts(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    """Pairs the generator never combines, because one would hide or mimic the other."""
    (na, la), (nb, lb) = a, b
    if na == nb:
        return not (na == "pleural effusion" and la != lb)  # bilateral effusion is the one repeat
    pleural = {"pleural effusion", "pneumothorax"}
    side = lambda loc: (loc or "").split(" ")[0]
    if {na, nb} == pleural:
        return side(la) == side(lb)
    parenchymal = {"lung nodule", "lung mass", "consolidation", "atelectasis"}
    if na in parenchymal and nb in parenchymal:
        return la == lb
    if "pneumothorax" in (na, nb) and (na in parenchymal or nb in parenchymal):
        return side(la) == side(lb)  # a collapsed lung region would swallow the opacity
    return False


def _draw_findings(rng: np.random.Generator, *, p_normal: float, max_findings: int,
                   blocked: set[tuple[str, str]]) -> list[tuple[str, str | None]]:
    if max_findings < 0:
        raise InputError(f"max_findings must be ≥ 0, got {max_findings}")
    if max_findings == 0 or rng.random() < p_normal:
        return []
    pool = [c for c in allowed_combos() if (c[0], _loc_key(c[1])) not in blocked]
    n = int(rng.integers(1, max_findings + 1))
    chosen: list[tuple[str, str | None]] = []
    for _ in range(n):
        options = [c for c in pool if not any(_conflicts(c, d) for d in chosen)]
        if not options:
            break
        # weight by finding, not by combination: a finding with 4 locations is not 4× as common
        names = sorted({c[0] for c in options})
        name = names[int(rng.integers(len(names)))]
        locs = [c for c in options if c[0] == name]
        chosen.append(locs[int(rng.integers(len(locs)))])
    return chosen


def _explicit_findings(rng: np.random.Generator,
                       findings: Sequence[tuple[str, str | None] | str]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for entry in findings:
        name, loc = (entry, None) if isinstance(entry, str) else (str(entry[0]), entry[1])
        if name not in FINDINGS:
            raise InputError(f"unknown phantom finding {name!r}; known: {', '.join(FINDINGS)}")
        allowed = FINDINGS[name].locations
        if loc is None or loc == "None":
            loc = allowed[int(rng.integers(len(allowed)))]
        elif loc not in allowed:
            raise InputError(f"{name!r} cannot be placed at {loc!r}; allowed: {', '.join(map(str, allowed))}")
        out.append((name, loc))
    return out


# ---- drawing -------------------------------------------------------------------------------------
def _ramp(x: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of ``x > 0`` with a linear edge of width ``edge`` (anti-aliased boundaries)."""
    return np.clip(x / edge + 0.5, 0.0, 1.0)


class _Canvas:
    """Anatomy of one phantom on a jittered grid; findings modify it, ``render`` produces pixels.

    All geometry is in normalised film coordinates (Y down, X right, both 0..1), so the same
    phantom looks the same at 224² and 512², and odd sizes need no special case.
    """

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        theta = math.radians(rng.normal(0.0, 2.5))
        scale = rng.uniform(0.93, 1.07)
        aspect = rng.uniform(0.96, 1.04)
        dy, dx = rng.uniform(-0.03, 0.03, size=2)
        y = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
        x = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
        yy, xx = np.meshgrid(y, x, indexing="ij")
        c, s = math.cos(theta), math.sin(theta)
        self.Y = ((c * yy - s * xx) / (scale * aspect) + 0.5 - dy).astype(np.float32)
        self.X = ((s * yy + c * xx) / (scale / aspect) + 0.5 - dx).astype(np.float32)
        self.px = 1.0 / min(h, w)  # one pixel in normalised units: edge softness
        self.heart_scale = 1.0
        self.effects: list[tuple[str, np.ndarray, float]] = []  # (mode, weight map, value)
        self.pneumo: list[tuple[np.ndarray, np.ndarray]] = []  # (region, pleural line)
        self._lungs()

    # anatomy ---------------------------------------------------------------------------------
    def _lungs(self) -> None:
        r = self.rng
        self.lung_params = {}
        top = r.uniform(0.13, 0.18)
        base = r.uniform(0.76, 0.82)
        for side, sign in (("right", -1.0), ("left", 1.0)):
            cx = 0.5 + sign * r.uniform(0.2, 0.215)
            hw = r.uniform(0.145, 0.16)
            dome_h = r.uniform(0.06, 0.09)
            base_side = base - (0.025 if side == "right" else 0.0)  # the right hemidiaphragm sits higher
            cy = top + r.uniform(0.24, 0.28)
            self.lung_params[side] = {"cx": cx, "hw": hw, "cy": cy, "hh": cy - top, "base": base_side,
                                      "dome_h": dome_h, "sign": sign}
        self.heart = {"cx": 0.5 + r.uniform(0.025, 0.045), "cy": base - r.uniform(0.1, 0.12),
                      "hw": r.uniform(0.145, 0.16), "hh": r.uniform(0.12, 0.14), "floor": base - 0.01}
        self._cache: dict[str, object] = {}

    def lung_coords(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u, v, depth): u = +1 at the lateral wall, v = -1 at the apex, depth 0 at the pleura, 1 inside."""
        key = f"coords:{side}"
        if key not in self._cache:
            p = self.lung_params[side]
            u = (self.X - p["cx"]) * np.float32(p["sign"] / p["hw"])
            v = (self.Y - p["cy"]) * np.float32(1.0 / p["hh"])
            # elliptical apex, straight walls below (a superellipse looked better but cbrt costs 1 ms)
            av = np.minimum(v, 0.0)
            f = np.sqrt(u * u + av * av)
            self._cache[key] = (u, v, 1.0 - f)
        return self._cache[key]  # type: ignore[return-value]

    def dome(self, side: str) -> np.ndarray:
        p = self.lung_params[side]
        t = np.clip((self.X - p["cx"]) / p["hw"], -1.2, 1.2)
        return p["base"] - p["dome_h"] * (1.0 - t * t)

    def lung_field(self, side: str) -> np.ndarray:
        """Soft lung field before the heart and mediastinum are laid over it."""
        key = f"field:{side}"
        if key not in self._cache:
            _, _, depth = self.lung_coords(side)
            edge = 2.0 * self.px
            p = self.lung_params[side]
            self._cache[key] = _ramp(depth * p["hw"], edge) * _ramp(self.dome(side) - self.Y, edge)
        return self._cache[key]  # type: ignore[return-value]

    def heart_field(self) -> np.ndarray:
        key = f"heart:{self.heart_scale}"
        if key not in self._cache:
            hp = self.heart
            hw, hh = hp["hw"] * self.heart_scale, hp["hh"] * self.heart_scale**0.6
            cy = hp["floor"] - 0.75 * hh  # the heart rests on the diaphragm and grows upwards
            # an egg: wider to the patient's left (image right)
            u = (self.X - hp["cx"]) / np.where(hp["cx"] < self.X, hw * 1.2, hw * 0.8)
            v = (self.Y - cy) / hh
            r = np.sqrt(u * u + v * v)
            self._cache[key] = _ramp((1.0 - r) * hh, 2.0 * self.px) * _ramp(hp["floor"] - self.Y, 2.0 * self.px)
        return self._cache[key]  # type: ignore[return-value]

    def mediastinum_field(self) -> np.ndarray:
        half = 0.055 + 0.03 * np.clip((self.Y - 0.15) / 0.4, 0.0, 1.0)
        band = _ramp(half - np.abs(self.X - 0.505), 2.0 * self.px)
        return band * _ramp(self.Y - 0.02, 0.02)

    def zone_split(self, side: str) -> float:
        """The row (normalised) between the upper and lower zone of a lung, as ``_zone_point`` uses it."""
        p = self.lung_params[side]
        top = p["cy"] - p["hh"]
        return top + 0.5 * (p["base"] - p["dome_h"] - top)

    def anatomy(self) -> dict[str, np.ndarray]:
        heart = self.heart_field() > 0.5
        cover = heart | (self.mediastinum_field() > 0.5)
        out = {}
        for side in _SIDES:
            lung = (self.lung_field(side) > 0.5) & ~cover
            upper = self.zone_split(side) > self.Y  # rows above the split
            out[f"{side} lung"] = lung
            out[f"{side} upper lung"], out[f"{side} lower lung"] = lung & upper, lung & ~upper
        out["heart"] = heart
        return out

    # findings --------------------------------------------------------------------------------
    def add_finding(self, name: str, location: str | None) -> PlacedFinding:
        r = self.rng
        side = location.split(" ")[0] if location else None
        severity = ""
        if name == "cardiomegaly":
            severity = str(r.choice(["mild", "moderate", "marked"], p=[0.3, 0.4, 0.3]))
            self.heart_scale = {"mild": 1.3, "moderate": 1.4, "marked": 1.5}[severity] * r.uniform(0.97, 1.03)
            mask = None  # the heart is drawn at render time; its mask is filled in below
        elif name == "pleural effusion":
            severity, mask = self._effusion(side)
        elif name == "pneumothorax":
            severity, mask = self._pneumothorax(side, apical=location.endswith("upper lung"))
        else:
            zone = location.split(" ")[1]
            severity, mask = self._opacity(name, side, zone)
        if mask is None:
            mask = self.heart_field() > 0.5
        placed = PlacedFinding(name=name, location=location, mask=mask, box=_box(mask), severity=severity)
        placed.hedged = bool(r.random() < 0.15)
        return placed

    def _effusion(self, side: str) -> tuple[str, np.ndarray]:
        r = self.rng
        severity = str(r.choice(["small", "moderate", "large"], p=[0.25, 0.45, 0.3]))
        frac = {"small": 0.3, "moderate": 0.45, "large": 0.62}[severity] * r.uniform(0.9, 1.1)
        p = self.lung_params[side]
        u, _, _ = self.lung_coords(side)
        top = p["cy"] - p["hh"]
        level = p["base"] - frac * (p["base"] - top)
        # meniscus: the fluid climbs the lateral chest wall
        surface = level - 0.07 * np.clip(u, 0.0, 1.2) ** 2 + 0.02 * (1 - np.clip(u + 1, 0, 1))
        field = self.lung_field(side)
        # fluid fills the costophrenic recess below the dome too
        recess = _ramp(p["hw"] * 1.02 - np.abs(self.X - p["cx"]), 2 * self.px) * _ramp(p["base"] + 0.02 - self.Y,
                                                                                     2 * self.px)
        region = np.maximum(field, recess) * _ramp(self.Y - surface, 0.02)
        self.effects.append(("blend", region, 0.6))
        return severity, region > 0.5

    def _pneumothorax(self, side: str, *, apical: bool) -> tuple[str, np.ndarray]:
        r = self.rng
        severity = str(r.choice(["small", "moderate", "large"], p=[0.3, 0.45, 0.25]))
        # depth of the air rim in lung-halfwidth units: even a "small" one spans ≥ 1.3 patches of 14 px
        # at 224², or a 16×16 similarity map could not segment it (Dice fell to 0.26 at 0.22)
        depth_thr = {"small": 0.5, "moderate": 0.6, "large": 0.72}[severity] * r.uniform(0.95, 1.05)
        u, v, depth = self.lung_coords(side)
        field = self.lung_field(side)
        if apical:
            where = _ramp(-0.1 - v, 0.1)
        else:
            where = _ramp(u - 0.05, 0.1) * _ramp(0.75 - v, 0.15)
        region = field * _ramp(depth_thr - depth, 0.01) * where
        line = field * where * np.clip(1.0 - np.abs(depth - depth_thr) / 0.018, 0.0, 1.0)
        self.pneumo.append((region, line))
        return severity, region > 0.5

    def _zone_point(self, side: str, zone: str, margin: float) -> tuple[float, float]:
        """A point inside the given lung zone, away from the pleura, heart and mediastinum."""
        r = self.rng
        p = self.lung_params[side]
        top = p["cy"] - p["hh"]
        mid = self.zone_split(side)
        for _ in range(50):
            uu = r.uniform(-0.55, 0.6)
            if zone == "upper":
                y = r.uniform(top + 0.08 + margin, mid - 0.01)
            else:
                y = r.uniform(mid + 0.02, p["base"] - p["dome_h"] - margin)
                uu = r.uniform(-0.2, 0.6)  # the heart covers the medial lower zone
            x = p["cx"] + p["sign"] * uu * (p["hw"] - margin)
            hp = self.heart
            hh = hp["hh"] * self.heart_scale**0.6
            inside_heart = ((x - hp["cx"]) / (hp["hw"] * self.heart_scale * 1.2)) ** 2 + (
                (y - hp["floor"] + 0.75 * hh) / hh) ** 2 < 1.3
            if not inside_heart and abs(x - 0.505) > 0.1 + margin:
                return y, x
        return (top + 0.12 if zone == "upper" else p["base"] - p["dome_h"] - 0.06), p["cx"]

    def _opacity(self, name: str, side: str, zone: str) -> tuple[str, np.ndarray]:
        r = self.rng
        lung = self.lung_field(side)
        if name == "lung nodule":
            rad = r.uniform(0.018, 0.03)
            y0, x0 = self._zone_point(side, zone, rad + 0.02)
            d = np.sqrt((self.Y - y0) ** 2 + (self.X - x0) ** 2)
            blob = np.clip(1.0 - (d / rad) ** 2, 0.0, 1.0) ** 0.5
            self.effects.append(("add", blob, 0.32))
            return f"{rad * 35:.1f}", d < rad
        if name == "lung mass":
            rad = r.uniform(0.05, 0.075)
            y0, x0 = self._zone_point(side, zone, rad + 0.01)
            ang = np.arctan2(self.Y - y0, self.X - x0)
            phases = r.uniform(0, 2 * np.pi, size=3)
            lobes = 1.0 + 0.08 * np.sin(3 * ang + phases[0]) + 0.05 * np.sin(5 * ang + phases[1])
            d = np.sqrt((self.Y - y0) ** 2 + (self.X - x0) ** 2) / (rad * lobes)
            blob = np.clip(1.0 - d**2, 0.0, 1.0) ** 0.4
            self.effects.append(("add", blob * lung, 0.38))
            return f"{rad * 35:.1f}", (d < 1.0) & (lung > 0.5)
        if name == "consolidation":
            ry, rx = r.uniform(0.07, 0.1), r.uniform(0.055, 0.08)
            y0, x0 = self._zone_point(side, zone, 0.5 * rx)
            d = np.sqrt(((self.Y - y0) / ry) ** 2 + ((self.X - x0) / rx) ** 2)
            patchy = 0.35 + 0.65 * _lowfreq(r, self.h, self.w, 26)
            amount = np.clip((1.15 - d) * 2.5, 0.0, 1.0) * patchy * lung
            self.effects.append(("add", amount, 0.36))
            return "", amount > 0.35
        # atelectasis: a plate-like band (lower) or a wedge towards the hilum (upper)
        y0, x0 = self._zone_point(side, zone, 0.03)
        ang = r.uniform(-0.35, 0.35) if zone == "lower" else r.uniform(0.4, 0.8) * -self.lung_params[side]["sign"]
        c, s = math.cos(ang), math.sin(ang)
        along = (self.X - x0) * c + (self.Y - y0) * s
        across = -(self.X - x0) * s + (self.Y - y0) * c
        length = r.uniform(0.09, 0.13)
        if zone == "lower":
            thick = r.uniform(0.018, 0.028) * np.ones_like(along)
        else:
            thick = 0.012 + 0.04 * np.clip((along / length + 1) / 2, 0, 1)  # wedge widens laterally
        band = _ramp(thick - np.abs(across), 0.006) * _ramp(length - np.abs(along), 0.01) * lung
        self.effects.append(("add", band, 0.34))
        return "", band > 0.5

    # pixels ----------------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        r, Y, X = self.rng, self.Y, self.X
        # body: soft tissue brighter where thicker; shoulders round off the top corners
        by = (Y - 0.58) / 0.66
        bx = (X - 0.5) / 0.47
        body_r = np.sqrt(bx * bx + np.maximum(by, -0.55) ** 2 * 0.9 + np.minimum(by + 0.55, 0) ** 2 * 6)
        body = _ramp((1.0 - body_r) * 0.47, 2 * self.px)
        thick = np.sqrt(np.clip(1.0 - body_r**2, 0.0, 1.0))
        img = 0.03 + body * (0.36 + 0.18 * thick)
        # abdomen below the diaphragm: dense soft tissue
        img = img + body * 0.1 * _ramp(Y - 0.8, 0.08)
        # lung markings (vessels): denser towards the hila, fading to nothing at the pleura
        texture = 0.65 * _lowfreq(r, self.h, self.w, 44) + 0.35 * _lowfreq(r, self.h, self.w, 12)
        for side in _SIDES:
            field = self.lung_field(side)
            p = self.lung_params[side]
            hy, hx = (Y - 0.47) * np.float32(1 / 0.38), (X - (0.5 + p["sign"] * 0.1)) * np.float32(1 / 0.3)
            hilum = np.clip(1.2 - np.sqrt(hy * hy + hx * hx), 0.0, 1.0)
            lung_val = 0.16 + 0.16 * hilum * texture + 0.05 * _ramp(Y - (p["base"] - 0.12), 0.1)
            img = img * (1.0 - field) + lung_val * field
        for region, line in self.pneumo:  # pleural air: darker than lung and without markings
            img = img * (1.0 - region) + 0.05 * region + 0.2 * line
        # findings inside the lung (effusion = soft-tissue density blending in)
        for mode, weight, value in self.effects:
            img = img * (1.0 - weight) + value * weight if mode == "blend" else img + value * weight
        # mediastinum, spine and heart in front of the lungs
        med = self.mediastinum_field()
        img = img * (1.0 - med) + (0.64 + 0.05 * _ramp(0.03 - np.abs(X - 0.505), 0.01)) * med
        heart = self.heart_field()
        img = img * (1.0 - heart) + 0.68 * heart
        # ribs: two families of arcs (posterior: steep, strong; anterior: shallow, faint)
        dx = np.abs(X - 0.505)
        extent = _ramp(0.45 - dx, 0.02) * _ramp(dx - 0.07, 0.02) * _ramp(Y - 0.1, 0.03) * _ramp(0.74 - Y, 0.06)
        spacing = r.uniform(0.072, 0.082)
        post = Y - 0.9 * (dx - 0.08) ** 2 + 0.25 * np.maximum(0.12 - dx, 0)
        ant = Y + 0.55 * (dx - 0.1) - 0.6 * (dx - 0.1) ** 2
        ribs = np.clip((np.cos(2 * np.pi * (post / spacing + r.uniform())) - 0.45) / 0.4, 0.0, 1.0)
        ribs_a = np.clip((np.cos(2 * np.pi * (ant / (spacing * 1.2) + r.uniform())) - 0.6) / 0.3, 0.0, 1.0)
        img = img + extent * (0.065 * ribs + 0.025 * ribs_a) * body
        # clavicles
        for sign in (-1.0, 1.0):
            t = (X - 0.5) * sign
            cy = 0.13 + 0.12 * (t - 0.1) - 0.25 * (t - 0.2) ** 2
            clav = _ramp(0.011 - np.abs(Y - cy), 0.006) * _ramp(t - 0.06, 0.02) * _ramp(0.36 - t, 0.02)
            img = img + 0.13 * clav
        # exposure, contrast, gamma, detector noise
        img = np.clip(img, 0.0, 1.0)
        img = img ** np.float32(math.exp(r.normal(0.0, 0.12)))
        img = (img - 0.4) * r.uniform(0.85, 1.15) + 0.4 + r.normal(0.0, 0.03)
        img = img + np.float32(r.uniform(0.008, 0.025)) * r.standard_normal(img.shape, dtype=np.float32)
        return np.clip(img, 0.0, 1.0).astype(np.float32)


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a ``cells``² random lattice upsampled bilinearly, rows then columns.

    Sampling the lattice at the jittered coordinates (four 2-D gathers) cost 10 ms per field at
    224², a third of the budget; the separable form is ~20× cheaper and a texture needs no jitter.
    """
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    iy, fy = _interp_index(h, cells)
    ix, fx = _interp_index(w, cells)
    rows = grid[iy] * (1.0 - fy)[:, None] + grid[iy + 1] * fy[:, None]
    return rows[:, ix] * (1.0 - fx) + rows[:, ix + 1] * fx


def _interp_index(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    pos = (np.arange(n, dtype=np.float32) + 0.5) / n * cells
    i = np.minimum(pos.astype(np.int64), cells - 1)
    return i, (pos - i).astype(np.float32)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


# ---- reports -------------------------------------------------------------------------------------
_ZONE_WORDS = {
    "upper": ("{side} upper lobe", "{side} upper lung", "{side} upper zone", "{side} lung apex"),
    "lower": ("{side} lower lobe", "{side} lower lung", "{side} lung base", "{side} base"),
}
_SEVERITY_ADVERB = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _loc_phrase(rng: np.random.Generator, location: str) -> str:
    side, zone, _ = location.split(" ")
    return _pick(rng, _ZONE_WORDS[zone]).format(side=side)


def _present_sentence(rng: np.random.Generator, f: PlacedFinding) -> str:
    sev, name = f.severity, f.name
    if name == "cardiomegaly":
        adv = _SEVERITY_ADVERB[sev]
        options = [f"{_cap(sev)} cardiomegaly.", f"The heart is {adv} enlarged.", "Cardiomegaly is present.",
                   f"Heart size is {adv} enlarged.", "The cardiac silhouette is enlarged."]
        hedged = ["The heart size may be mildly enlarged.", "Possible mild cardiomegaly."]
        return _pick(rng, hedged if f.hedged else options)
    if name == "pleural effusion":
        side = f.location.split(" ")[0]
        options = [f"{_cap(sev)} {side} pleural effusion.", f"There is a {sev} {side} pleural effusion.",
                   f"{_cap(sev)} {side}-sided pleural effusion is present.",
                   f"{_cap(side)} pleural effusion, {sev} in size.",
                   f"Blunting of the {side} costophrenic angle due to a {sev} pleural effusion."]
        hedged = [f"Blunting of the {side} costophrenic angle may represent a pleural effusion.",
                  f"Possible {sev} {side} pleural effusion."]
        return _pick(rng, hedged if f.hedged else options)
    if name == "pneumothorax":
        side = f.location.split(" ")[0]
        if f.location.endswith("upper lung"):
            options = [f"{_cap(sev)} {side} apical pneumothorax.",
                       f"{_cap(sev)} {side} apical pneumothorax is present.",
                       f"There is a {sev} pneumothorax at the {side} apex.",
                       f"{_cap(side)} apical pneumothorax with a visible pleural line."]
            hedged = [f"A {sev} {side} apical pneumothorax cannot be excluded."]
        else:
            options = [f"{_cap(sev)} {side} pneumothorax.", f"There is a {sev} {side}-sided pneumothorax.",
                       f"{_cap(sev)} {side} pneumothorax along the lateral chest wall.",
                       f"A {side} pneumothorax is present, with the pleural line seen laterally."]
            hedged = [f"Possible {sev} {side} pneumothorax."]
        return _pick(rng, hedged if f.hedged else options)
    loc = _loc_phrase(rng, f.location)
    if name == "lung nodule":
        options = [f"A {sev} cm nodule in the {loc}.", f"Nodule in the {loc}.",
                   f"There is a {sev} cm nodular opacity in the {loc}.",
                   f"Small rounded nodule projecting over the {loc}."]
        hedged = [f"Possible nodule in the {loc}.", f"A nodule in the {loc} cannot be excluded."]
    elif name == "lung mass":
        options = [f"A {sev} cm mass in the {loc}.", f"Large mass in the {loc}.",
                   f"There is a lobulated mass in the {loc}.", f"A {sev} cm mass projects over the {loc}."]
        hedged = [f"Rounded opacity in the {loc}, suspicious for a mass."]
    elif name == "consolidation":
        options = [f"Consolidation in the {loc}.", f"{_cap(loc)} consolidation.",
                   f"There is patchy consolidation in the {loc}.", f"Airspace consolidation involving the {loc}."]
        hedged = [f"Patchy opacity in the {loc} may represent consolidation.",
                  f"Opacity in the {loc}, possibly consolidation."]
    else:
        options = [f"{_cap(loc)} atelectasis.", f"Atelectasis in the {loc}.", f"Linear atelectasis at the {loc}.",
                   f"There is plate-like atelectasis in the {loc}.", f"Subsegmental atelectasis in the {loc}."]
        hedged = [f"Linear opacity in the {loc}, likely atelectasis.",
                  f"Opacity at the {loc} may represent atelectasis."]
    return _pick(rng, hedged if f.hedged else options)


_NEGATION_GROUPS = {
    ("pleural effusion", "pneumothorax"): ("No pleural effusion or pneumothorax.",
                                           "There is no pleural effusion or pneumothorax.",
                                           "No evidence of pleural effusion or pneumothorax."),
    ("consolidation", "pleural effusion", "pneumothorax"): (
        "No focal consolidation, pleural effusion, or pneumothorax.",
        "There is no focal consolidation, pleural effusion or pneumothorax."),
    ("pleural effusion",): ("No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."),
    ("pneumothorax",): ("No pneumothorax.", "There is no pneumothorax.", "Pneumothorax is not seen."),
    ("consolidation",): ("No focal consolidation.", "There is no consolidation."),
    ("lung nodule", "lung mass"): ("No pulmonary nodules or masses.", "No suspicious nodule or mass."),
    ("cardiomegaly",): ("Heart size is normal.", "No cardiomegaly.", "Normal heart size."),
    ("atelectasis",): ("No atelectasis.",),
}
_COMPARISONS_POSITIVE = (
    "Compared to the prior study, the {term} has increased.", "The {term} has decreased since the prior radiograph.",
    "Interval increase in the {term}.", "The {term} is unchanged compared to the prior exam.",
)
_COMPARISONS_ANY = ("Unchanged from prior.", "No significant interval change.",
                    "Stable appearance of the chest since the prior study.", "Compared with the prior radiograph, "
                    "there is no significant change.")
_TERMS = {"pleural effusion": "effusion", "pneumothorax": "pneumothorax", "cardiomegaly": "cardiomegaly",
          "lung nodule": "nodule", "lung mass": "mass", "consolidation": "consolidation", "atelectasis": "atelectasis"}


def write_report(placed: Sequence[PlacedFinding], rng: np.random.Generator) -> str:
    """A free-text report that states exactly what was drawn (plus negations and prior-study remarks).

    Bilateral effusions are reported in one sentence ("bilateral") as a radiologist would.
    Negations only name findings that are absent; "The lungs are clear" is used only when nothing
    is in the lungs or pleura, since the extractor maps it to "There is no consolidation".
    """
    present = {f.name for f in placed}
    sentences: list[str] = []
    effusions = [f for f in placed if f.name == "pleural effusion"]
    if len(effusions) == 2 and not any(f.hedged for f in effusions):
        bigger = max(effusions, key=lambda f: ("small", "moderate", "large").index(f.severity)).location.split()[0]
        other = "left" if bigger == "right" else "right"
        sentences.append(_pick(rng, (f"Bilateral pleural effusions, {bigger} greater than {other}.",
                                     "Moderate bilateral pleural effusions.",
                                     "Bilateral pleural effusions are present.")))
        rest = [f for f in placed if f.name != "pleural effusion"]
    else:
        rest = list(placed)
    sentences += [_present_sentence(rng, f) for f in rest]
    # cardiomediastinal statement first, as reports usually open with it
    if "cardiomegaly" not in present and rng.random() < 0.8:
        sentences.insert(0, _pick(rng, ("The cardiomediastinal silhouette is normal.", "Heart size is normal.",
                                        "The heart size is within normal limits.",
                                        "Normal cardiomediastinal silhouette.")))
    lung_findings = present - {"cardiomegaly"}
    if not lung_findings and rng.random() < 0.7:
        sentences.append(_pick(rng, ("Lungs are clear.", "The lungs are clear.",
                                     "The lungs are well expanded and clear.")))
    groups = list(_NEGATION_GROUPS.items())
    order = rng.permutation(len(groups))
    negated: set[str] = set()
    for i in order:
        names, texts = groups[int(i)]
        if any(n in present or n in negated for n in names) or names == ("cardiomegaly",):
            continue
        if rng.random() < 0.5:
            sentences.append(_pick(rng, texts))
            negated.update(names)
    if not placed and rng.random() < 0.5:
        sentences.append(_pick(rng, ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.")))
    if rng.random() < 0.25:
        if placed and rng.random() < 0.6:
            term = _TERMS[placed[int(rng.integers(len(placed)))].name]
            sentences.append(_pick(rng, _COMPARISONS_POSITIVE).format(term=term))
        else:
            sentences.append(_pick(rng, _COMPARISONS_ANY))
    prefix = _pick(rng, ("", "", "FINDINGS: ", "Findings: "))
    return prefix + " ".join(sentences)
