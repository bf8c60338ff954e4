"""The one option schema: every consumer is derived from it, and its validator refuses what the math refuses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from composekit import ClassicOptions, Compositor, GenerativeOptions, InputError
from composekit.core.options import (
    SEED,
    PasteOptions,
    Spec,
    check_integer,
    check_number,
    options_table,
    resolve,
)
from composekit.core.scheduler import DDIMScheduler

ROOT = Path(__file__).resolve().parent.parent


def test_docs_table_is_generated_from_the_declarations():
    text = (ROOT / "docs" / "options.md").read_text()
    block = text.split("<!-- generated: options_table() -->\n")[1].split("<!-- end generated -->")[0]
    assert block == options_table()
    for name in PasteOptions.specs():
        assert f"| `{name}` |" in block


def test_cli_and_http_fields_come_from_the_declarations():
    from composekit.apps.cli import build_parser
    from composekit.apps.serve import _form_fields

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("paste", "batch"):
        flags = {opt for action in sub[command]._actions for opt in action.option_strings}
        for spec in PasteOptions.specs().values():
            assert (spec.cli_flag in flags) == spec.cli, (command, spec.name)
    fields = _form_fields()
    assert {n for n, s in PasteOptions.specs().items() if s.cli} | {"box", "seed", "method"} == set(fields)


def test_eta_range_is_what_the_scheduler_can_compute():
    # sigma^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev) <= 1 - a_prev exactly when eta <= 1: above it the
    # DDIM update takes the square root of a negative number, so validation stops there.
    scheduler = DDIMScheduler()
    x, eps = np.zeros((1, 4, 2, 2), np.float32), np.ones((1, 4, 2, 2), np.float32)
    for t in scheduler.timesteps(2):
        out, _ = scheduler.step(eps, int(t), x, 2, eta=1.0, noise=np.zeros_like(x))
        assert np.isfinite(out).all()
    with pytest.raises(InputError, match=r"eta must be a number in 0..1"):
        GenerativeOptions(eta=1.01)


@pytest.mark.parametrize("given,message", [
    ({"steps": 0}, "steps must be an integer in 1..1000"), ({"steps": True}, "steps must be an integer"),
    ({"guidance": math.nan}, "guidance must be a finite number"), ({"decode": "tiles"}, "decode must be one of"),
    ({"fidelity_factor": 0}, "fidelity_factor must be an integer in 1..64 or None"),
    ({"margin": -1}, "margin must be an integer in 0..4096 or None"), ({"shadow": 2}, "shadow must be a number"),
])
def test_every_declared_range_is_checked(given, message):
    method = "classic" if "shadow" in given else "generative"
    with pytest.raises(InputError, match=message):
        resolve(method, given)


def test_options_of_the_other_method_are_refused_in_python():
    with pytest.raises(InputError, match="harmonize applies to the classic method only"):
        GenerativeOptions(harmonize=0.9)
    with pytest.raises(InputError, match="steps applies to the generative method only"):
        ClassicOptions(steps=10)
    bg, obj = np.zeros((40, 50, 3), np.uint8), np.full((10, 10, 3), 200, np.uint8)
    for keywords in ({"steps": 10}, {"fidelity": 0.5}, {"guidance": 9.0}, {"seed": 3}):
        with pytest.raises(InputError, match="applies to the generative method only"):
            Compositor().paste(obj, bg, (5, 5, 30, 30), **keywords)
    result = Compositor().paste(obj, bg, (5, 5, 30, 30))
    assert result.seed is None and result.seeds == ()  # the classic method draws no noise


def test_text_is_read_strictly():
    steps = PasteOptions.specs()["steps"]
    assert steps.parse("40") == 40 and PasteOptions.specs()["eta"].parse(".5") == 0.5
    assert steps.parse("40.0") == 40  # integer-valued, as JSON and the OpenAPI schema's "integer" allow
    for text in ("٤٠", "1_0", " 3 ", "3.5", "3.", "", "1e3", "0x10"):
        with pytest.raises(InputError, match="steps must be an integer"):
            steps.parse(text)
    assert PasteOptions.specs()["feather"].parse("none") is None
    assert SEED.parse(str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(InputError):
        SEED.parse("9" * 4000)  # a huge number is refused, and not echoed back whole
    try:
        SEED.parse("9" * 4000)
    except InputError as exc:
        assert len(str(exc)) < 200


def test_one_validator_everywhere():
    assert check_integer("n", np.int64(3), 1, 5) == 3 and check_number("x", 2, 0, 3) == 2.0
    with pytest.raises(InputError, match="n must be an integer in 1..5, got 6"):
        check_integer("n", 6, 1, 5)
    spec = Spec("a test", lo=1, hi=2, name="k", kind=float)
    with pytest.raises(InputError, match="k must be a number in 1..2"):
        spec.check(3)
