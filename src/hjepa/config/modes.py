"""The modes some keys act in: outside its mode a key is read by nothing, so a value other than
its default is refused (:func:`hjepa.config.rules.check_modes`) rather than run without effect.

A key names its mode in the schema (``setting(..., when=MODE)``); tests/test_modes.py derives its
cases from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hjepa.config.schema import Config


@dataclass(frozen=True)
class Mode:
    """A setting some keys act under; outside it nothing reads them, so :func:`validate` refuses
    a non-default value of such a key (``setting(..., when=MODE)``) rather than run without it.

    ``active(cfg)``: whether the mode is on; ``state(cfg)``: the settings that have it off, as
    the refusal names them; ``fix``: how to turn it on; ``off``/``on``: ``key=value`` overrides
    that turn it off and on (tests/test_modes.py derives its cases from them).
    """

    active: Callable[[Config], bool]
    state: Callable[[Config], str]
    fix: str
    off: tuple[str, ...]
    on: tuple[str, ...] = ()


def switch(section: str, key: str, with_on: bool = False) -> Mode:
    """The mode of the boolean key ``section.key``: on while it is true (``with_on``: the tests
    also turn it on, for a key that is off by default or a mode that needs it said)."""
    name = f"{section}.{key}"
    return Mode(
        lambda c: getattr(getattr(c, section), key),
        lambda c: f"{name}=false",
        f"set {name}=true",
        off=(f"{name}=false",),
        on=(f"{name}=true",) if with_on else (),
    )


EMA_TARGET = Mode(
    lambda c: c.model.target == "ema",
    lambda c: f"model.target={c.model.target}",
    "use model.target=ema",
    off=("model.target=shared", "loss.regularizer=sigreg"),
)
SHARED_TARGET = Mode(
    lambda c: c.model.target == "shared",
    lambda c: f"model.target={c.model.target}",
    "use model.target=shared with a regularizer",
    off=(),
    on=("model.target=shared", "loss.regularizer=sigreg"),
)
TOKEN_SIGREG = Mode(
    lambda c: "sigreg" in c.loss.terms,
    lambda c: f"loss.regularizer={c.loss.regularizer}",
    "choose loss.regularizer=sigreg or sigreg+vicreg",
    off=("loss.regularizer=none",),
    on=("loss.regularizer=sigreg",),
)
ANY_SIGREG = Mode(  # the token SIGReg or the view-level one (loss.view_sigreg)
    lambda c: "sigreg" in c.loss.terms or c.loss.view_sigreg > 0,
    lambda c: f"loss.regularizer={c.loss.regularizer} and loss.view_sigreg=0",
    "choose loss.regularizer=sigreg or sigreg+vicreg",
    off=("loss.regularizer=none",),
    on=("loss.regularizer=sigreg",),
)
VICREG = Mode(
    lambda c: "vicreg" in c.loss.terms,
    lambda c: f"loss.regularizer={c.loss.regularizer}",
    "choose loss.regularizer=vicreg or sigreg+vicreg",
    off=("loss.regularizer=sigreg",),
    on=("loss.regularizer=sigreg+vicreg",),
)
CONTRAST = switch("loss", "contrastive", with_on=True)
MULTICROP = Mode(
    lambda c: c.data.multicrop.num_local > 0,
    lambda c: "data.multicrop.num_local=0",
    "set data.multicrop.num_local >= 1",
    off=("data.multicrop.num_local=0",),
    on=("data.multicrop.num_local=1",),
)
THREE_AUGMENT = Mode(
    lambda c: c.data.augment.three_augment > 0,
    lambda c: "data.augment.three_augment=0",
    "set data.augment.three_augment > 0 (its blur draws this sigma)",
    off=("data.augment.three_augment=0",),
    on=("data.augment.three_augment=0.5",),
)
WARMUP = Mode(
    lambda c: c.optim.warmup_steps > 0 or c.optim.warmup_fraction > 0,
    lambda c: "optim.warmup_steps=0 and optim.warmup_fraction=0",
    "give the run a warmup (optim.warmup_steps or optim.warmup_fraction)",
    off=("optim.warmup_steps=0", "optim.warmup_fraction=0"),
)
WARMUP_BY_FRACTION = Mode(
    lambda c: c.optim.warmup_steps == 0,
    lambda c: f"optim.warmup_steps={c.optim.warmup_steps}",
    "set optim.warmup_steps=0",
    off=("optim.warmup_steps=10",),
)
SYNTHETIC = Mode(
    lambda c: c.data.name == "synthetic",
    lambda c: f"data.name={c.data.name}",
    "use data.name=synthetic",
    off=("data.name=fashion_mnist",),
    on=("data.name=synthetic",),
)
FILES = Mode(  # datasets read from a folder (synthetic images are generated)
    lambda c: c.data.name != "synthetic",
    lambda c: f"data.name={c.data.name}",
    "use a dataset read from files",
    off=("data.name=synthetic",),
    on=("data.name=fashion_mnist",),
)
IMAGE_FOLDER = Mode(
    lambda c: c.data.name == "image_folder",
    lambda c: f"data.name={c.data.name} (which has its own test split)",
    "use data.name=image_folder",
    off=("data.name=fashion_mnist",),
    on=("data.name=image_folder",),
)
LOW_SHOT = switch("eval", "low_shot")
ATTENTIVE_PROBE = switch("eval", "attentive")
ROBUSTNESS = switch("eval", "robustness", with_on=True)
CACHED_WORK = Mode(  # what the baseline cache holds: the baselines, robustness's pixel probe
    lambda c: c.eval.baselines or c.eval.robustness,
    lambda c: "eval.baselines=false and eval.robustness=false",
    "set eval.baselines=true or eval.robustness=true",
    off=("eval.baselines=false", "eval.robustness=false"),
)
BASELINE_CACHE = Mode(
    lambda c: c.eval.cache and (c.eval.baselines or c.eval.robustness),
    lambda c: "eval.cache=false" if not c.eval.cache else CACHED_WORK.state(c),
    "set eval.cache=true with eval.baselines or eval.robustness on",
    off=("eval.cache=false",),
)
