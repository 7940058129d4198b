"""Preset moods: the bundled ones, user overrides, and one clear line for every kind of broken file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eqz.bands import BANDS
from eqz.errors import EqzError
from eqz.presets import BUNDLED_DIR, load_preset_file

from .conftest import run_eqz

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

BUNDLED = sorted(BUNDLED_DIR.glob("*.yaml"))


def test_at_least_eight_moods_ship():
    assert len(BUNDLED) >= 8


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_preset_is_valid(path):
    preset = load_preset_file(path)
    assert preset.name == path.stem
    assert preset.description and preset.sliders
    assert set(preset.sliders) <= set(BANDS)
    result = run_eqz("presets", "validate", str(path))
    assert result.returncode == 0 and result.stdout.startswith("ok")
    assert result.stderr == ""  # eqz's own moods keep to the calibrated range


def test_validate_warns_of_a_gain_past_the_calibrated_range(tmp_path):
    """It said "ok" and nothing else; the warning came only when the preset was used."""
    path = write(tmp_path, {"name": "loud", "description": "x", "sliders": {"joy": 1.5, "fear": 0.5}})
    result = run_eqz("presets", "validate", str(path))
    assert result.returncode == 0 and result.stdout.startswith("ok: loud")
    assert result.stderr == "eqz: warning: joy=1.5 (beyond the calibrated ±1 for joy: expect less fluent text)\n"


def write(tmp_path: Path, data, name="mood.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else (data if isinstance(data, str) else yaml.safe_dump(data)).encode())
    return path


GOOD = {"name": "mood", "description": "a test mood", "sliders": {"joy": 0.5}, "sampling": {"temperature": 0.7}}

BROKEN = [
    ({**GOOD, "sliders": {"happiness": 0.5}}, "sliders.happiness", "valid bands: joy"),
    ({**GOOD, "colour": "blue"}, "unknown key 'colour'", "allowed keys: name"),
    ({**GOOD, "sliders": {"joy": 3.5}}, "sliders.joy", "[-2, 2]"),
    ({**GOOD, "sliders": {"joy": "lots"}}, "sliders.joy", "must be a number"),
    ({**GOOD, "sliders": {"joy": True}}, "sliders.joy", "must be a number"),  # was read as 1.0
    ({**GOOD, "sliders": {"joy": float("nan")}}, "sliders.joy", "finite"),
    ({**GOOD, "sampling": {"temperature": "hot"}}, "sampling.temperature", "number"),
    ({**GOOD, "sampling": {"top_p": 1.5}}, "sampling.top_p", "[0.0, 1.0]"),
    ({**GOOD, "sampling": {"repeat_penalty": 0}}, "sampling.repeat_penalty", "(0.0, 5.0]"),  # logits / 0
    ({**GOOD, "sampling": {"warmth": 1}}, "sampling.warmth", "allowed: temperature"),
    ({**GOOD, "name": "Bad Name"}, "name must be", "lowercase"),
    ({**GOOD, "filters": {"clamp": {"fear": 9}}}, "filters.clamp.fear", "[-6, 6]"),
    ("name: [unclosed\n", "not valid YAML", "line"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML", ""),
    ("name: a\x00b\n", "not valid YAML", "special characters"),  # PyYAML's message spans lines
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9", "save it as UTF-8"),
    ({**GOOD, "name": "mood\n"}, "name must be", "lowercase"),  # "$" matches before a final newline
]


@pytest.mark.parametrize("data,field,allowed", BROKEN, ids=[b[1] + (" (bytes)" if isinstance(b[0], bytes) else "") for b in BROKEN])
def test_each_validation_error_is_one_line_naming_file_field_and_allowed(tmp_path, data, field, allowed):
    path = write(tmp_path, data)
    with pytest.raises(EqzError) as caught:
        load_preset_file(path)
    message = str(caught.value)
    assert str(path) in message and field in message and allowed in message
    result = run_eqz("presets", "validate", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.stderr


def test_an_empty_description_is_none_as_an_empty_system_prompt_is(tmp_path):
    """"description:" left empty was refused as "must be text", where "system:" left empty was taken."""
    empty = write(tmp_path, "name: mood\ndescription:\nsystem:\nsliders: {joy: 0.5}\n")
    assert load_preset_file(empty).description == ""
    with pytest.raises(EqzError, match="description must be text"):
        load_preset_file(write(tmp_path, "name: mood\ndescription: 0\n"))


def entries_of(listing) -> dict:
    """`eqz presets list --json` by name."""
    return {entry["name"]: entry for entry in json.loads(listing.stdout)}


def test_user_preset_overrides_bundled_and_broken_one_is_listed(tmp_path):
    config = tmp_path / "config"
    presets = config / "eqz" / "presets"
    presets.mkdir(parents=True)
    (presets / "serene.yaml").write_text(yaml.safe_dump({**GOOD, "name": "serene", "description": "mine"}))
    (presets / "broken.yaml").write_text(yaml.safe_dump({**GOOD, "name": "broken", "sliders": {"zest": 1}}))
    (presets / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))  # broke every preset command
    (presets / "mood.yml").write_text(yaml.safe_dump({**GOOD, "name": "mood"}))  # was not looked for
    for stem in ("a", "b"):  # the second one hid the first without a word
        (presets / f"{stem}.yaml").write_text(yaml.safe_dump({**GOOD, "name": "twin", "description": stem}))
    # a typo in the user's own stoic.yaml ran the bundled stoic in silence
    (presets / "stoic.yaml").write_text(yaml.safe_dump({**GOOD, "name": "stoic", "sliders": {"sadnes": 1}}))
    # a copy kept beside the file being edited hid the edits: the file named for the preset wins the name
    for stem, joy in (("glow", -1.0), ("glow.bak", 1.0)):
        (presets / f"{stem}.yaml").write_text(yaml.safe_dump({**GOOD, "name": "glow", "sliders": {"joy": joy}}))
    # ... and so it does when it is the broken one, whatever the case of its file name
    (presets / "dim.yaml").write_text(yaml.safe_dump({**GOOD, "name": "dim", "sliders": {"sadnes": 1}}))
    (presets / "dim.bak.yaml").write_text(yaml.safe_dump({**GOOD, "name": "dim"}))
    (presets / "Tender.yaml").write_text(yaml.safe_dump({**GOOD, "name": "tender", "sliders": {"trusst": 1}}))
    env = {"XDG_CONFIG_HOME": str(config)}
    for name, file in (("dim", "dim.yaml"), ("tender", "Tender.yaml")):
        shown = run_eqz("presets", "show", name, env=env)
        assert shown.returncode == 2 and file in shown.stderr, shown
    typo = run_eqz("generate", "Hi", "-p", "stoic", "-n", "2", env=env)
    assert typo.returncode == 2 and "stoic.yaml" in typo.stderr and "sadnes" in typo.stderr and not typo.stdout
    assert entries_of(run_eqz("presets", "list", "--json", env=env))["glow"]["path"].endswith("/glow.yaml")
    assert "names itself 'glow', as glow.yaml does" in entries_of(run_eqz("presets", "list", "--json", env=env))[
        "glow.bak"]["error"]
    listing = run_eqz("presets", "list", "--json", env=env)
    entries = entries_of(listing)
    assert entries["serene"]["source"] == "user"
    assert entries["broken"]["error"] and "zest" in entries["broken"]["error"]
    assert "not UTF-8" in entries["latin"]["error"]
    assert entries["melancholy"]["error"] is None  # the others still load
    assert entries["mood"]["error"] is None and entries["twin"]["path"].endswith("a.yaml")
    assert "names itself 'twin', as a.yaml does" in entries["b"]["error"]
    table = run_eqz("presets", "list", env=env)
    assert "invalid" in table.stdout and "mine" in table.stdout


def test_presets_save_writes_a_valid_user_preset(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    result = run_eqz("presets", "save", "sunny", "--from", "serene", "--set", "joy=0.9", "--temperature", "0.8",
                     "--max-tokens", "120", "--seed", "7", "--clamp", "fear=0.2", "--ablate", "anger", env=env)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "eqz" / "presets" / "sunny.yaml"
    preset = load_preset_file(path)
    assert preset.sliders["joy"] == 0.9 and preset.sliders["trust"] == 0.5
    assert preset.sampling == {**load_preset_file(BUNDLED_DIR / "serene.yaml").sampling, "temperature": 0.8,
                               "max_tokens": 120, "seed": 7}  # only what was asked for, not every default
    assert preset.filters["clamp"]["fear"] == 0.2 and "anger" in preset.filters["ablate"]
    assert preset.description == "based on serene"  # not serene's own words about itself
    shown = run_eqz("presets", "show", "sunny", env=env)
    assert "sunny" in shown.stdout and "+0.90" in shown.stdout
    again = run_eqz("presets", "save", "sunny", "--set", "joy=0.1", env=env)  # would lose serene's system prompt
    assert again.returncode == 2 and "pass --replace" in again.stderr and load_preset_file(path).sliders["joy"] == 0.9
    replaced = run_eqz("presets", "save", "sunny", "--set", "joy=0.1", "--replace", env=env)
    assert replaced.returncode == 0 and load_preset_file(path).sliders == {"joy": 0.1}
    shadow = run_eqz("presets", "save", "serene", "--set", "joy=0.2", env=env)
    assert shadow.returncode == 0 and "stands in for the bundled 'serene'" in shadow.stdout
    # a preset in a .yml: saving its name wrote a .yaml beside it without --replace, which then won the name
    (path.parent / "dusk.yml").write_text("name: dusk\ndescription: Evening light.\nsliders: {sadness: 0.4}\n")
    refused = run_eqz("presets", "save", "dusk", "--set", "anger=1", env=env)  # wrote dusk.yaml beside dusk.yml
    assert refused.returncode == 2 and "dusk.yml); pass --replace" in refused.stderr
    # tweaked in place, a preset kept its sliders, system prompt and sampling but lost its description
    assert run_eqz("presets", "save", "dusk", "--from", "dusk", "--set", "trust=0.5", "--replace",
                   env=env).returncode == 0
    dusk = load_preset_file(path.parent / "dusk.yml")
    assert dusk.description == "Evening light." and dusk.sliders == {"sadness": 0.4, "trust": 0.5}
    assert not (path.parent / "dusk.yaml").exists()


def test_unknown_preset_lists_the_available_ones():
    result = run_eqz("presets", "show", "nope")
    assert result.returncode != 0 and "available: anxious" in result.stderr


def test_a_preset_file_is_used_by_its_path_without_saving_it(tmp_path):
    shared = tmp_path / "from-a-friend.yaml"
    shared.write_text("name: wistful\ndescription: shared\nsliders:\n  sadness: 0.6\n")
    record = json.loads(run_eqz("generate", "Hi", "-p", str(shared), "-n", "4", "--json").stdout)
    assert record["preset"] == "wistful" and record["sliders"]["sadness"] == 0.6
    shared.write_text("sliders:\n  sadness: 0.6\nfilters: {clamp: {fear: 0}, ablate: [anger]}\n")
    assert load_preset_file(shared).name == "from-a-friend"  # no name: the file's (was "name must be ... (got None)")
    assert "filters: clamp fear +0.0, ablate anger" in run_eqz("presets", "show", str(shared)).stdout  # not a dict
    missing = run_eqz("generate", "Hi", "-p", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml: cannot read" in missing.stderr


def test_a_band_of_the_users_own_is_saved_validated_listed_and_shown_in_presets(tmp_path, random_vector_file):
    """An imported (or described) band works in presets as in --set: save, validate and list refused it (they knew
    the ten built-in bands only), while generate -p took the same file."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    assert run_eqz("vectors", "import", str(random_vector_file), "--band", "happy", env=env).returncode == 0
    saved = run_eqz("presets", "save", "glad", "--set", "happy=0.5", "--set", "joy=0.2", env=env)
    assert saved.returncode == 0, saved.stderr
    path = tmp_path / "config" / "eqz" / "presets" / "glad.yaml"
    assert run_eqz("presets", "validate", str(path), env=env).stdout.startswith("ok: glad (2 sliders")
    listed = {entry["name"]: entry for entry in json.loads(run_eqz("presets", "list", "--json", env=env).stdout)}
    assert listed["glad"]["error"] is None and listed["glad"]["sliders"] == {"happy": 0.5, "joy": 0.2}
    assert "(also happy +0.5)" in run_eqz("presets", "list", env=env).stdout
    assert "happy" in run_eqz("presets", "show", "glad", env=env).stdout
    unknown = run_eqz("presets", "save", "odd", "--set", "zest=1", env=env)  # still refused: no bank has it
    assert unknown.returncode == 2 and "unknown band 'zest'" in unknown.stderr and "happy" in unknown.stderr
    broken = tmp_path / "data" / "eqz" / "vectors" / "broken"
    broken.mkdir()
    (broken / "bank.yaml").write_text("format: [")  # a bank no command can read: presets need none
    assert run_eqz("presets", "show", "serene", env=env).returncode == 0


def test_filters_and_system_on_top_of_a_preset_say_what_they_do(tmp_path):
    """A band both clamped and notched lost its notch without a word; `--system ""` could not clear a preset's
    system prompt; a preset made in Python skipped the level check of its clamps (50 gave broken text)."""
    both = run_eqz("generate", "Describe a chair.", "-n", "8", "--clamp", "joy=1", "--ablate", "joy")
    assert both.returncode == 2 and "joy is both clamped and notched" in both.stderr and "Traceback" not in both.stderr
    cleared = run_eqz("generate", "Hi", "-p", "serene", "--system", "", "-n", "4", "--json")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["system"] is None
    from eqz.presets import Preset, resolve

    with pytest.raises(EqzError, match=r"level for joy must be a finite number in \[-6, 6\], got 50"):
        resolve(Preset("x", "", {}, {}, filters={"clamp": {"joy": 50}}), BANDS)
    twice = resolve(Preset("x", "", {}, {}, filters={"ablate": ["anger", "anger"]}), BANDS)
    assert twice.filters == {"clamp": {}, "ablate": ["anger"]}


def test_a_key_written_twice_in_a_preset_is_one_line(tmp_path):
    """YAML keeps the last of a repeated key: joy: 0.5 then joy: -0.5 ran at -0.5, and `presets validate` said ok."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: twice\ndescription: x\nsliders: {joy: 0.5, joy: -0.5}\n")
    checked = run_eqz("presets", "validate", str(twice))
    assert checked.returncode == 2 and "line 3: the key 'joy' comes twice" in checked.stderr, checked.stderr
    merged = tmp_path / "merged.yaml"  # a merge key's keys may be written again after it, as YAML allows
    merged.write_text("name: merged\ndescription: x\nsliders: {joy: 0.5}\n"
                      "filters:\n  clamp:\n    <<: {anger: 0, fear: 0}\n    fear: 0.2\n")
    assert load_preset_file(merged).filters == {"clamp": {"anger": 0.0, "fear": 0.2}}
    odd = tmp_path / "odd.yaml"
    odd.write_text("name: odd\ndescription: x\nsliders: {[joy]: 0.5}\n")
    checked = run_eqz("presets", "validate", str(odd))
    assert checked.returncode == 2 and "found unhashable key" in checked.stderr, checked.stderr
    both = tmp_path / "both.yaml"  # refused by validate, not only when used
    both.write_text("name: both\ndescription: x\nfilters: {clamp: {fear: 0}, ablate: [fear]}\n")
    checked = run_eqz("presets", "validate", str(both))
    assert checked.returncode == 2 and "filters clamp and ablate fear" in checked.stderr, checked.stderr


def test_a_broken_second_file_of_a_presets_name_does_not_hide_the_first(tmp_path):
    """The error entry of mood.yml (a second 'mood') was listed under its stem, replacing the good mood.yaml."""
    presets = tmp_path / "eqz" / "presets"
    presets.mkdir(parents=True)
    for suffix in ("yaml", "yml"):
        (presets / f"mood.{suffix}").write_text(yaml.safe_dump({**GOOD, "name": "mood"}))
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    entries = {e["name"]: e for e in json.loads(run_eqz("presets", "list", "--json", env=env).stdout)}
    assert entries["mood"]["error"] is None and entries["mood"]["path"].endswith("mood.yaml")
    assert "as mood.yaml does" in entries["mood.yml"]["error"]
    assert run_eqz("presets", "show", "mood", env=env).returncode == 0
