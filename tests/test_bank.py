"""The emotion bank: the shipped files, llama.cpp interop, the sliders end to end, import, and training on a
second architecture (Gemma 3)."""

from __future__ import annotations

import json
import math
import re
import shutil

import gguf
import numpy as np
import pytest
import yaml

from eqz.bands import BANDS, PRIMARIES
from eqz.bank import SHIPPED_DIR, Bank, find_bank, model_fingerprint
from eqz.train import HOLD_LEVELS
from eqz.vector_files import read_control_vector

from .conftest import BEFORE_TRAINING, run_eqz

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

SHIPPED = SHIPPED_DIR / "smollm2-135m-instruct"
# primaries expected clear at +1 by each scorer, measured for the shipped bank on the eval split
# (docs/steering-smollm2-135m-instruct-eval.md: lexicon 3.1, judge 7.8); a retrain must not fall below
MIN_EXPECTED_CLEAR = 3.0


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load((SHIPPED / "bank.yaml").read_text())


def test_shipped_bank_fits_the_default_model_and_has_every_band(model, manifest):
    bank = find_bank(model.info)
    assert bank is not None and bank.directory == SHIPPED
    assert manifest["model"]["fingerprint"] == model_fingerprint(model.info)
    assert tuple(bank.names) == BANDS
    layers = manifest["layers"]
    assert layers["read"] in layers["steered"]
    assert max(layers["steered"]) < 0.7 * model.info.n_layer  # never the last layers
    for band in BANDS:
        entry = manifest["bands"][band]
        assert entry["strength"] > 0 and entry["negative_ratio"] in (0.5, 1.0)
        assert entry["source"] in ("stimulus", "voice") and isinstance(entry["direction_ok"], bool)
        assert entry["direction_ok"] == (not entry.get("problems"))
        for key in ("neutral", "neutral_text", "unit", "negative_unit"):
            assert len(entry["readout"][key]) == len(layers["steered"])
    method = manifest["method"]
    assert method["stimulus_set"] == 2 and "split" in method and method["neutral_components"] > 0
    assert "{" not in yaml.safe_dump(method)  # every description's figures filled in
    assert method["calibration"]["scorer"] == "nrc"  # the independent lexicon, not eqz's own word list
    read = np.load(SHIPPED / "meter.npz")  # the meter's directions, apart from what steers
    assert set(read.files) == set(BANDS)
    assert read["joy"].shape == (len(layers["steered"]), 576)
    assert np.allclose(np.linalg.norm(read["joy"], axis=1), 1.0, atol=1e-4)


def test_band_files_are_llama_cpp_control_vectors(manifest):
    for band in BANDS:
        path = SHIPPED / f"{band}.gguf"
        reader = gguf.GGUFReader(path)
        assert reader.get_field("general.architecture").contents() == "controlvector"
        assert reader.get_field("controlvector.model_hint").contents() == "llama"
        names = [t.name for t in reader.tensors]
        assert reader.get_field("controlvector.layer_count").contents() == len(names)
        assert sorted(int(n.split(".")[1]) for n in names) == manifest["layers"]["steered"]
        assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.data) == 576 for t in reader.tensors)


def test_recorded_quality_figures_meet_the_bar(manifest):
    """The figures `benchmarks/steering.py --record` stored for the shipped bank (held-out prompts, NRC lexicon)."""
    quality = manifest["quality"]
    assert quality["heldout_accuracy"] >= 0.85 and quality["heldout_texts"] == 128
    assert set(quality["crosstalk"]) == set(BANDS)
    setup = quality["dose_response_setup"]
    assert setup["scorer"] == "nrc" and setup["prompts"] == 16
    dose, steering = quality["dose_response"], quality["steering"]
    # a band remade after the recording (benchmarks/valence_free_arousal.py) has its figures dropped, as a new hold
    # level's are: they measured another vector. A recording made since measured it (ISO dates, both UTC)
    recorded = setup.get("date", "")  # recordings before stop 52 (2026-12-06) carry no date
    remade = {band for band, entry in manifest["bands"].items()
              if (entry.get("trained") or {}).get("remade") and entry["trained"]["date"] > recorded}
    assert set(dose) == set(steering) == set(BANDS) - remade
    for band in sorted(dose):
        table = dose[band]
        assert {"-1.0", "0.0", "1.0", "2.0"} <= set(table) and ("prompt" in table) == (band in PRIMARIES)
        assert table["1.0"]["repeated_3grams"] <= 0.05, band
        assert steering[band]["distinct_ratio_at_1"] >= 0.9, band
        if manifest["bands"][band]["direction_ok"]:  # what the bank's own check promised holds on held-out prompts
            assert table["-1.0"]["readout"] < table["0.0"]["readout"] < table["1.0"]["readout"], band
    # expected counts over redrawn prompts: a single run's count moves by a band or two with the draw (README)
    for scorer in ("clear_share_at_1", "judged_clear_share_at_1"):
        expected = sum(steering[band][scorer] for band in PRIMARIES)
        prompted = sum(steering[band]["prompt_only_" + scorer.removesuffix("_at_1")] for band in PRIMARIES)
        assert expected >= MIN_EXPECTED_CLEAR and expected > prompted, (scorer, expected, prompted)


def analyze_json(text: str) -> dict:
    result = run_eqz("analyze", text, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["overall"]


def test_joy_and_sadness_sliders_move_the_replies_the_expected_way():
    """Generated under joy=1 and sadness=1 with the same three seeds, then read back by the *unsteered* model
    (means over the three: one 64-token reply can carry hopeful words under sadness)."""
    readings = {}
    for band in ("joy", "sadness"):
        texts = []
        for seed in ("5", "6", "7"):
            result = run_eqz("generate", "Describe your walk to the bus stop this morning.", "--set", f"{band}=1",
                             "--seed", seed, "-n", "64", "--json")
            assert result.returncode == 0, result.stderr
            texts.append(json.loads(result.stdout)["output"])
        read = [analyze_json(text) for text in texts]
        readings[band] = {name: sum(r[name] for r in read) / len(read) for name in read[0]}
    joyful, sad = readings["joy"], readings["sadness"]
    assert joyful["joy"] > sad["joy"]
    assert sad["sadness"] > joyful["sadness"]
    assert joyful["valence"] > sad["valence"], (joyful, sad)


def test_exported_mix_as_a_raw_control_vector_gives_the_slider_tokens(tmp_path):
    """Sliders that add their vectors export exactly what they apply; a held slider exports its vector (a control
    vector cannot hold a level) and says so in one warning line."""
    mix = tmp_path / "mix.gguf"
    exported = run_eqz("vectors", "export", "--set", "valence=0.5", "--set", "arousal=-0.3", "-o", str(mix))
    assert exported.returncode == 0 and "warning" not in exported.stderr, exported.stderr
    vector_file = read_control_vector(mix)
    assert vector_file.model_hint == "llama"
    common = ("generate", "Tell me about your day.", "--temperature", "0", "-n", "48", "--json")
    sliders = json.loads(run_eqz(*common, "--set", "valence=0.5", "--set", "arousal=-0.3").stdout)["output"]
    raw = json.loads(run_eqz(*common, "--vector", str(mix)).stdout)["output"]
    plain = json.loads(run_eqz(*common).stdout)["output"]
    assert raw == sliders
    assert raw != plain
    before = mix.read_bytes()
    kept = run_eqz("vectors", "export", "--preset", "melancholy", "-o", str(mix))  # the file exists: asked first
    assert kept.returncode == 2 and "add --replace" in kept.stderr and mix.read_bytes() == before
    from_preset = run_eqz("vectors", "export", "--preset", "melancholy", "--set", "joy=0", "-o", str(mix), "--replace")
    assert from_preset.returncode == 0 and "sadness=0.8, arousal=-0.3" in from_preset.stdout, from_preset.stderr
    assert "sadness holds a level in eqz" in from_preset.stderr and "Traceback" not in from_preset.stderr
    shipped = Bank.load(SHIPPED)
    assert shipped.bands["sadness"].hold is not None
    assert np.allclose(read_control_vector(mix).matrix(30, 576), shipped.mix({"sadness": 0.8, "arousal": -0.3}))


def test_a_vector_that_cannot_be_written_whole_replaces_nothing(tmp_path):
    """On a full disk the GGUF writer's numpy writes came out short without an error: `vectors export` said "wrote"
    and left a cut-off file, and a bank's save put a cut-off band file over a good one (every command then failed).
    A file-size limit cuts writes short as a full disk does."""
    mix = tmp_path / "mix.gguf"
    assert run_eqz("vectors", "export", "--set", "trust=0.5", "-o", str(mix)).returncode == 0
    good = mix.read_bytes()

    def limited(*args):
        return run_eqz(*args, file_size_limit=len(good) // 2)

    replaced = limited("vectors", "export", "--set", "joy=0.5", "-o", str(mix), "--replace")
    assert replaced.returncode == 2 and "the earlier file is kept" in replaced.stderr, replaced.stderr
    assert "Traceback" not in replaced.stderr and mix.read_bytes() == good
    fresh = limited("vectors", "export", "--set", "joy=0.5", "-o", str(tmp_path / "new.gguf"))
    assert fresh.returncode == 2 and "nothing was written" in fresh.stderr and not (tmp_path / "new.gguf").exists()


@pytest.mark.parametrize(
    "args,fragments",
    [
        (("--set", "happiness=1"), ("unknown band 'happiness'", "valid bands: joy, trust")),
        (("--set", "joy=nan"), ("gain for joy", "finite")),
        (("--set", "joy=lots"), ("gain for joy must be a number",)),
        (("--set", "joy"), ("BAND=VALUE", "got 'joy'")),
        (("--set", "joy=3"), ("gain for joy", "[-2, 2]")),
        (("--clamp", "joy=9"), ("level for joy", "[-6, 6]")),
    ],
)
def test_bad_slider_values_are_refused_with_the_valid_bands(args, fragments):
    """The valid bands are listed where the band was wrong, not where only its value was."""
    result = run_eqz("generate", "hi", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.stderr
    assert ("valid bands" in lines[0]) == ("unknown band" in lines[0])


def test_a_clamp_may_hold_a_band_past_the_sliders_range():
    # clamps steer clearly at levels 2-6 (docs/steering-limits.md section 9), sliders stop at 2
    result = run_eqz("generate", "hi", "--clamp", "joy=4", "-n", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["filters"]["clamp"] == {"joy": 4.0}


def test_gain_beyond_one_warns_but_runs():
    result = run_eqz("generate", "hi", "--set", "joy=1.5", "-n", "8")
    assert result.returncode == 0 and "beyond the calibrated" in result.stderr


def test_vectors_list_and_show():
    listing = json.loads(run_eqz("vectors", "list", "--json").stdout)
    assert any(entry["fingerprint"].startswith("llama-30x576") and len(entry["bands"]) == 10 for entry in listing)
    # what the text says of each bank, which --json left out: which is in use, and the name `vectors show` takes
    shipped = next(entry for entry in listing if entry["where"] == "shipped")
    assert shipped["in_use"] and shipped["shadowed_by"] is None and shipped["bank"] == "smollm2-135m-instruct"
    shown = run_eqz("vectors", "show", env={"COLUMNS": "160"})
    assert shown.returncode == 0 and "held-out 8-way classification" in shown.stdout and "joy" in shown.stdout
    assert "dose-response (eqz eval --record, 10 bands, recorded 20" in shown.stdout  # how many bands it measured


def test_import_a_repeng_style_vector_as_a_band(tmp_path):
    data = tmp_path / "data"
    path = tmp_path / "honest.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")  # the way repeng writes them
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 3)
    rng = np.random.default_rng(1)
    for layer in (12, 13, 14):
        writer.add_tensor(f"direction.{layer}", (rng.standard_normal(576) * 4).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    env = {"XDG_DATA_HOME": str(data)}
    imported = run_eqz("vectors", "import", str(path), "--band", "honest", env=env)
    assert imported.returncode == 0, imported.stderr
    shown = json.loads(run_eqz("vectors", "show", "--json", env=env).stdout)
    assert "honest" in shown["bands"] and "joy" in shown["bands"]  # the shipped bands came along
    args = ("generate", "Tell me a fact.", "--temperature", "0", "-n", "24", "--json")
    steered = json.loads(run_eqz(*args, "--set", "honest=1", env=env).stdout)
    plain = json.loads(run_eqz(*args, env=env).stdout)
    assert steered["sliders"]["honest"] == 1.0 and steered["output"] != plain["output"]
    bad = run_eqz("vectors", "import", str(path), "--band", "Bad Name", env=env)
    assert bad.returncode != 0 and "band name" in bad.stderr


NOSTALGIA = "nostalgia=wistful, longing for the past and for days that are gone"


def test_a_band_described_in_words_joins_the_bank_and_steers(tmp_path):
    """`eqz train --band name="..."` adds a slider to the model's bank, made from the model's own voice and judged by
    the unsteered model; the shipped bands stay as they were, and the new one works in --set, presets and eval."""
    data, config = tmp_path / "data", tmp_path / "config"
    env = {"XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(config)}
    trained = run_eqz("train", "--quick", "--band", NOSTALGIA, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr
    bank_dir = next((data / "eqz" / "vectors").iterdir())
    assert "added nostalgia" in trained.stdout and f"to the bank in {bank_dir}" in trained.stdout.replace("\n", "")
    # which model it trains, and its stages as they start, in a log (it said nothing for minutes, then everything)
    assert trained.stderr.startswith("eqz train: adding nostalgia to the bank for Smollm2 135M")
    assert "--model FILE trains another model" in trained.stderr.splitlines()[0]
    assert any(re.fullmatch(r".+: [\d,]+ \(\d+ s in\)", line) for line in trained.stderr.splitlines())
    for extra, refusal in (((), "pass --replace"), (("--replace", "--hold"), "--hold and --orthogonalize")):
        again = run_eqz("train", "--quick", "--band", NOSTALGIA, *extra, env=env, timeout=BEFORE_TRAINING)
        assert again.returncode == 2 and refusal in again.stderr  # the band trained above is not silently replaced
    manifest = yaml.safe_load((bank_dir / "bank.yaml").read_text())
    entry = manifest["bands"]["nostalgia"]
    assert entry["description"].startswith("wistful") and entry["source"] == "voice"
    assert entry["calibration"] and isinstance(entry["direction_ok"], bool)
    assert entry["trained"]["weights"] == "f16 copy"  # Q4_1: trained through its weights unpacked (Model.unpacked)
    # the judge reads +1 closer to the description than -1 (the check's own figures, from the real model)
    assert entry["check"]["+1"]["effect"] > 0 > entry["check"]["-1"]["effect"]
    bank = Bank.load(bank_dir)
    assert np.allclose(bank.bands["joy"].matrix, read_control_vector(SHIPPED / "joy.gguf").matrix(30, 576))
    assert np.array_equal(bank.voice_centre, np.load(SHIPPED / "voice-centre.npy"))  # used, and not replaced by quick
    assert set(np.flatnonzero(np.abs(bank.bands["nostalgia"].matrix).sum(axis=1))) == set(bank.steered_layers)
    shown = run_eqz("vectors", "show", env={**env, "COLUMNS": "160"}).stdout  # its training, beside the bank's
    assert f"nostalgia trained in {entry['trained']['seconds']} s" in shown
    args = ("generate", "Tell me about your weekend.", "--seed", "3", "-n", "24", "--json")
    plain = json.loads(run_eqz(*args, env=env).stdout)
    steered = json.loads(run_eqz(*args, "--set", "nostalgia=1", env=env).stdout)
    assert steered["sliders"]["nostalgia"] == 1.0 and steered["output"] != plain["output"]
    (config / "eqz" / "presets").mkdir(parents=True)
    (config / "eqz" / "presets" / "wistful.yaml").write_text("name: wistful\nsliders:\n  nostalgia: 0.8\n")
    preset = json.loads(run_eqz(*args, "--preset", "wistful", env=env).stdout)
    assert {band: gain for band, gain in preset["sliders"].items() if gain} == {"nostalgia": 0.8}
    (tmp_path / "prompts.txt").write_text("Describe your morning.\nPlan a short walk.\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "dose_response.png").write_text("an earlier run's plot")
    evaluating = ("eval", "--bands", "nostalgia,Nostalgia", "--gains", "0,1,1.0,-0", "-n", "12", "--prompts",
                  str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "eval"))
    kept = run_eqz(*evaluating, env=env)  # an earlier run's files were replaced in silence
    assert kept.returncode == 2 and "holds an earlier run (dose_response.png); pass --replace" in kept.stderr
    evaluated = run_eqz(*evaluating, "--replace", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert not (tmp_path / "eval" / "dose_response.png").exists()  # what is there is one run's
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows, run = written["rows"], written["run"]  # how the replies were made, beside the figures
    assert run["prompts"] == ["Describe your morning.", "Plan a short walk."] and run["seed"] == 4321
    assert run["personas"]["nostalgia"].startswith("You are wistful") and run["bank"] == str(bank_dir)
    # the slider beside asking for the description, alone and with the slider at +1
    assert [(row["gain"], row.get("asked", False)) for row in rows] == [(0.0, False), (1.0, False), (None, False),
                                                                       (1.0, True)]
    assert all("preference" in row for row in rows)


def test_a_stored_voice_centre_spares_the_primaries_replies_and_gives_the_same_direction(model):
    """A bank keeps what every own-voice persona shares; a band described later is centred on it instead of
    replying as all eight primaries again, and comes out the same as when everything is measured together."""
    from eqz.train import TrainSettings, voice_directions

    settings = TrainSettings(voice_prompts=2, voice_tokens=8, described={"nostalgia": NOSTALGIA.split("=", 1)[1]})
    layers = [10, 14, 18]
    quiet = lambda _stage, _total: (lambda _n: None)  # noqa: E731
    everything, full_capture, centre = voice_directions(model, settings, layers, quiet)
    described, capture, kept = voice_directions(model, settings, layers, quiet, centre=centre)
    assert set(full_capture.states) == {"neutral", *PRIMARIES, "nostalgia"}
    assert set(capture.states) == {"neutral", "nostalgia"} and np.array_equal(kept, centre)
    cosines = np.sum(everything["nostalgia"] * described["nostalgia"], axis=1)
    assert np.all(cosines > 0.99), cosines
    quick = TrainSettings(quick=True, described=settings.described)
    quick.voice_prompts, quick.voice_tokens = settings.voice_prompts, settings.voice_tokens
    assert voice_directions(model, quick, layers, quiet)[2] is None  # a --quick centre is not for keeping
    assert np.array_equal(voice_directions(model, quick, layers, quiet, centre=centre)[2], centre)


@pytest.mark.parametrize("args, fragment", [
    (("--band", "joy=very happy"), "built-in band"), (("--band", "nostalgia"), 'NAME="what the feeling is"'),
    (("--band", "Old Days=x"), "band name"), (("--band", "awe=" + "vast " * 41), "in at most 200"),
    (("--band", "awe=vast", "--band", "Awe=small"), "--band awe is given twice"),  # the first was dropped
    (("--bands", "awe"), 'trained with --band awe="what the feeling is"'),
])
def test_bad_described_bands_are_refused_before_training(args, fragment):
    refused = run_eqz("train", *args, timeout=BEFORE_TRAINING)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("eqz: error:")]
    assert refused.returncode != 0 and len(errors) == 1 and fragment in errors[0]


@pytest.mark.gemma
def test_train_on_gemma_then_steer_it(tmp_path, gemma_path):
    """A second architecture end to end: train (quick, one band: the 8-way classification still reads every
    primary; its held levels are screened too, asked for with --hold; its seed is recorded), found by fingerprint,
    the slider changes the output.
    Gemma 3 270M is a base model: its persona replies come from a plain transcript."""
    data = tmp_path / "data"
    env = {"XDG_DATA_HOME": str(data)}
    trained = run_eqz("train", "--quick", "--hold", "--bands", "joy", "--seed", "5", "-m", str(gemma_path), env=env,
                      timeout=900)
    assert trained.returncode == 0, trained.stderr
    bank_dir = next((data / "eqz" / "vectors").iterdir())
    manifest = yaml.safe_load((bank_dir / "bank.yaml").read_text())
    assert manifest["model"]["architecture"] == "gemma3" and manifest["model"]["n_embd"] == 640
    assert manifest["quality"]["heldout_accuracy"] > 0.5  # far above chance (12.5%) even in quick mode
    assert set(manifest["bands"]) == {"joy"}
    assert not (bank_dir / "voice-centre.npy").exists()  # a --quick centre is not kept for later bands
    assert manifest["trained"]["weights"] == "file"  # Q4_K_M batches fast: no f16 copy
    assert manifest["trained"]["seed"] == 5  # what a retraining needs to make the same bank on this machine
    assert "seed 5" in run_eqz("vectors", "show", str(bank_dir), "-m", str(gemma_path), env=env).stdout
    for entry in manifest["bands"].values():  # calibrated and checked like the shipped bank
        assert entry["source"] in ("stimulus", "voice") and isinstance(entry["direction_ok"], bool)
        assert entry["calibration"] and "+1" in entry["check"] and "-1" in entry["check"]
        assert all("judged_effect" in row for row in entry["calibration"])  # the judge confirms on a base model too
        if entry.get("hold") is not None:  # the screen found a level steering better than the vector: its figures are kept
            assert entry["hold"] in HOLD_LEVELS and entry["hold_check"]["screen"] == "eqz train"
            assert {"effect", "judged_effect", "clear_share", "judged_clear_share", "fluent"} <= set(entry["hold_check"])
            assert set(entry["hold_check"]["problems"]) <= {"judge", "readout"}  # its -level was checked too
    assert manifest["trained"]["hold_seconds"] > 0 and "held" in manifest["method"]
    assert read_control_vector(bank_dir / "joy.gguf").model_hint == "gemma3"
    args = ("generate", "Tell me about cats.", "-m", str(gemma_path), "--seed", "2", "-n", "32", "--json")
    plain = json.loads(run_eqz(*args, env=env).stdout)
    steered = json.loads(run_eqz(*args, "--set", "joy=1", env=env).stdout)
    assert steered["output"] != plain["output"]
    # the default model's bank does not fit Gemma, and the message says what to do
    no_bank = run_eqz(*args, "--set", "joy=1")
    errors = [line for line in no_bank.stderr.splitlines() if line.startswith("eqz: error:")]
    assert no_bank.returncode != 0 and len(errors) == 1 and "eqz train" in errors[0]
    # the hints of the bank commands name the model they were given (they led to the default model's chat)
    other = str(next(level for level in HOLD_LEVELS if level != manifest["bands"]["joy"].get("hold")))  # a change
    held = run_eqz("vectors", "hold", "joy", other, "-m", str(gemma_path), env=env)  # (the screen may have chosen 5)
    assert f"try: eqz chat -m {gemma_path} --set joy=1" in held.stdout
    reset = run_eqz("vectors", "reset", "-m", str(gemma_path), env=env)
    assert "the model has no bank now" in reset.stdout  # not "the shipped bank is in use again": Gemma ships none


def test_bank_math_matches_the_files(model):
    bank = find_bank(model.info)
    joy = read_control_vector(SHIPPED / "joy.gguf").matrix(30, 576)
    assert np.allclose(bank.mix({"joy": 1.0}), joy)
    ratio = bank.bands["trust"].negative_ratio
    assert np.allclose(bank.mix({"trust": -1.0}), -ratio * bank.bands["trust"].matrix)
    read = bank.bands["joy"].unit_direction(bank.read_layer, bank.steered_layers)
    assert math.isclose(float(np.linalg.norm(read)), 1.0, rel_tol=1e-5)


def test_a_band_that_failed_its_direction_check_warns_when_moved(tmp_path):
    """Copy the shipped bank, mark joy as failing, and move it in generate and in chat's /set; a band calibration
    called weak warns unless the held-out figures recorded in the bank found it clear. A held slider is judged by
    its level's check, not its vector's: weak the same way, and a level set by hand warns that nothing measured it."""
    shutil.copytree(SHIPPED, tmp_path / "bank")
    manifest = yaml.safe_load((tmp_path / "bank" / "bank.yaml").read_text())
    recorded = manifest["quality"].setdefault("dose_response", {})
    for band in ("joy", "sadness", "trust", "fear"):  # sliders that add their vectors
        manifest["bands"][band].update(hold=None, hold_check={})
    manifest["bands"]["joy"].update(direction_ok=False, problems=["lexicon"])
    manifest["bands"]["sadness"].update(direction_ok=True, problems=[])
    for band, clear_held_out in (("trust", True), ("fear", False), ("disgust", True), ("surprise", False)):
        manifest["bands"][band].update(direction_ok=False, problems=["weak"])  # weak in calibration
        recorded.setdefault(band, {})["1.0"] = {"clear": clear_held_out}  # what eqz eval --record said
    manifest["bands"]["disgust"]["hold_check"]["weak"] = manifest["bands"]["surprise"]["hold_check"]["weak"] = True
    manifest["bands"]["anger"].update(hold=2.0, hold_check={})  # held by hand
    recorded["anticipation"]["1.0"]["fluent"] = False  # passed its level's check, garbled on the held-out prompts
    (tmp_path / "bank" / "bank.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    env = {"EQZ_VECTORS": str(tmp_path)}
    moved = run_eqz("generate", "hi", "--set", "joy=0.5", "-n", "4", env=env)
    warnings = [line for line in moved.stderr.splitlines() if line.startswith("eqz: warning: joy")]
    assert moved.returncode == 0 and len(warnings) == 1
    assert "do not rise from -1 to +1" in warnings[0] and "eqz vectors show" in warnings[0]
    fine = run_eqz("generate", "hi", "--set", "sadness=0.5", "-n", "4", env=env)
    assert fine.returncode == 0 and "warning" not in fine.stderr
    weak = run_eqz("generate", "hi", *(f"--set={band}=0.5" for band in ("trust", "fear", "disgust", "surprise",
                                                                         "anger", "anticipation")), "-n", "4", env=env)
    warned = {line.split()[2]: line for line in weak.stderr.splitlines() if line.startswith("eqz: warning:")}
    assert weak.returncode == 0 and set(warned) == {"fear", "surprise", "anger", "anticipation"}, weak.stderr
    assert "set by hand" in warned["anger"] and "does not clearly lift" in warned["surprise"]
    assert "left the fluency bounds on the held-out prompts" in warned["anticipation"]  # held-out figures win
    shown = run_eqz("vectors", "show", env={**env, "COLUMNS": "160"}).stdout
    rows = {}
    for line in shown.splitlines():  # the table's rows, each ending in its check (the legend names them all)
        if line.split() and line.split()[0] in BANDS:
            rows.setdefault(line.split()[0], line.rstrip())
    assert rows["anger"].endswith(" uncalibrated") and rows["trust"].endswith(" ok (eval)"), shown
    assert rows["anticipation"].endswith(" fluency (eval)") and rows["sadness"].endswith(" ok"), shown
    listed = json.loads(run_eqz("vectors", "show", "--json", env=env).stdout)["bands"]
    assert listed["anticipation"]["open_problems"] == ["fluency (eval)"] and listed["trust"]["open_problems"] == []
    assert listed["trust"]["problems"] == ["weak"]  # bank.yaml's own record, as calibration left it
    chat = run_eqz("chat", "--no-panel", input="/set joy 0.3\n/quit\n", env=env)
    assert chat.returncode == 0 and "joy may not move the text as named" in chat.stdout


def test_listings_fit_80_columns_without_cutting_names_or_paths(model_path):
    narrow = {"COLUMNS": "80"}
    listed = run_eqz("vectors", "list", env=narrow).stdout
    assert str(SHIPPED) in listed and "(shipped, in use)" in listed and "…" not in listed
    shown = run_eqz("vectors", "show", env=narrow).stdout
    table = shown[shown.index("band "):shown.index("c: strength")]
    assert "anticipation" in table and "…" not in table and max(map(len, table.splitlines())) <= 80
    models = run_eqz("models", env=narrow).stdout
    assert str(model_path) in models.splitlines()[-1] and "…" not in models
