"""The numpy side of the bank, meter and filters, on synthetic data with known answers (no model)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from eqz import directions as D
from eqz.bands import PRIMARIES
from eqz.bank import Band, Bank, Layers
from eqz.models import ModelInfo
from eqz.meter import Filters, Instruments, geometry
from eqz.reading import PrefixCache, group_tails

RNG = np.random.default_rng(0)
LAYERS, EMBD = 3, 16


def test_mean_differences_and_centring():
    emotional = {"a": np.ones((4, LAYERS, EMBD)) * 3, "b": np.ones((4, LAYERS, EMBD)) * 1}
    neutral = {"a": np.ones((4, LAYERS, EMBD)), "b": np.ones((4, LAYERS, EMBD))}
    differences = D.mean_differences(emotional, neutral)
    assert np.allclose(differences["a"], 2) and np.allclose(differences["b"], 0)
    centred = D.centre(differences)
    assert np.allclose(centred["a"], 1) and np.allclose(centred["b"], -1)


def test_removing_the_leading_neutral_component():
    axis = np.zeros(EMBD)
    axis[0] = 1
    states = RNG.normal(size=(200, LAYERS, EMBD)) * 0.1
    states[:, :, 0] += RNG.normal(size=(200, LAYERS)) * 10  # neutral text varies mostly along axis 0
    components = D.top_components(states, 1)
    assert np.allclose(np.abs(components[:, 0, 0]), 1, atol=1e-2)
    vector = np.tile(axis + 0.5 * np.eye(EMBD)[1], (LAYERS, 1))
    cleaned = D.remove_components(vector, components)
    assert np.allclose(cleaned[:, 0], 0, atol=1e-2) and np.allclose(cleaned[:, 1], 0.5, atol=1e-2)


def test_unit_rows_keep_zero_rows():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert np.allclose(D.unit(vectors), [[0.6, 0.8], [0, 0]])


def test_discriminants_see_past_the_noisiest_axis():
    """Two bands whose means differ on a noisy axis (0) and, by less, on a quiet one (1): the mean difference
    points mostly along the noise, the discriminant along the quiet axis that actually tells them apart."""
    rows = 400
    classes = {}
    for sign, band in ((1, "a"), (-1, "b")):
        states = RNG.normal(size=(rows, LAYERS, EMBD)) * 0.05
        states[:, :, 0] += sign * 1.0 + RNG.normal(size=(rows, LAYERS)) * 5.0
        states[:, :, 1] += sign * 0.3
        classes[band] = states
    difference = D.unit(classes["a"].mean(axis=0) - classes["b"].mean(axis=0))
    found = D.discriminants(classes, shrinkage=0.1)
    assert np.all(np.abs(difference[:, 0]) > 0.9)
    assert np.all(found["a"][:, 1] > 0.9) and np.allclose(found["b"], -found["a"], atol=1e-6)
    assert np.allclose(np.linalg.norm(found["a"], axis=1), 1)

    def separated(direction):  # share of texts on their own band's side
        return np.mean(np.concatenate([classes["a"][:, 0] @ direction > 0, classes["b"][:, 0] @ direction < 0]))

    assert separated(found["a"][0]) > 0.97 and separated(difference[0]) < 0.7


def test_orthogonalize_gives_the_closest_orthonormal_set():
    units = {band: D.unit(RNG.normal(size=(LAYERS, EMBD)) + 2.0) for band in PRIMARIES}  # strongly overlapping
    result = D.orthogonalize(units, PRIMARIES)
    for layer in range(LAYERS):
        stack = np.stack([result[b][layer] for b in PRIMARIES])
        assert np.allclose(stack @ stack.T, np.eye(len(PRIMARIES)), atol=1e-6)
        for band in PRIMARIES:  # each stays its own closest direction
            cosines = [float(result[band][layer] @ units[other][layer]) for other in PRIMARIES]
            assert PRIMARIES[int(np.argmax(cosines))] == band


def test_circumplex_axes_weight_the_primaries():
    differences = {band: np.zeros((LAYERS, EMBD)) for band in PRIMARIES}
    differences["joy"][:, 0] = 1
    differences["sadness"][:, 0] = -1
    axes = D.circumplex_axes(differences)
    assert axes["valence"][0, 0] == pytest.approx(0.9 + 0.8)
    assert axes["arousal"][0, 0] == pytest.approx(0.5 + 0.5)


def test_reject_leaves_unit_rows_at_right_angles_to_the_direction():
    vectors, direction = RNG.normal(size=(LAYERS, EMBD)), RNG.normal(size=(LAYERS, EMBD))
    vectors[0] += 3 * direction[0]  # a row leaning on its direction
    rejected = D.reject(vectors, direction)
    assert np.allclose(np.einsum("le,le->l", rejected, direction), 0, atol=1e-9)
    assert np.allclose(np.linalg.norm(rejected, axis=1), 1)
    assert all(rejected[layer] @ vectors[layer] > 0 for layer in range(LAYERS))  # still the same way round


def test_trained_arousal_steers_at_right_angles_to_valence():
    """Training's stimulus directions: arousal is the circumplex sum with its valence component removed (the sum
    leans on valence wherever the primaries' directions are not orthogonal, as in every real bank)."""
    from eqz.train import _unit_directions

    shared = RNG.normal(size=(LAYERS, EMBD))  # primaries that overlap, as real ones do
    emotional = {band: RNG.normal(size=(6, LAYERS, EMBD)) + shared + RNG.normal(size=(LAYERS, EMBD))
                 for band in PRIMARIES}
    neutral = {band: RNG.normal(size=(6, LAYERS, EMBD)) for band in PRIMARIES}
    components = np.zeros((LAYERS, 0, EMBD))
    units = _unit_directions(emotional, neutral, components, orthogonal=False)
    summed = D.unit(D.circumplex_axes(D.centre(D.mean_differences(emotional, neutral)))["arousal"])
    assert np.abs(np.einsum("le,le->l", summed, units["valence"])).max() > 0.05  # there was something to remove
    assert np.allclose(np.einsum("le,le->l", units["arousal"], units["valence"]), 0, atol=1e-9)
    assert np.all(np.einsum("le,le->l", units["arousal"], summed) > 0.5)


def synthetic_bands(separation: float):
    """Eight bands whose texts sit around their own random direction (layer 1 separable, layer 0 not)."""
    centres = {band: RNG.normal(size=EMBD) for band in PRIMARIES}
    def texts(band, n):
        x = RNG.normal(size=(n, LAYERS, EMBD))
        x[:, 1] += separation * centres[band]
        return x
    train = {band: texts(band, 30) for band in PRIMARIES}
    heldout = {band: texts(band, 10) for band in PRIMARIES}
    neutral = RNG.normal(size=(60, LAYERS, EMBD))
    directions = {band: D.unit(train[band].mean(axis=0) - neutral.mean(axis=0)) for band in PRIMARIES}
    return train, heldout, neutral, directions


def test_layer_accuracies_find_the_separable_layer_and_choose_layers_picks_it():
    train, heldout, neutral, directions = synthetic_bands(separation=3.0)
    accuracies = D.layer_accuracies(train, neutral, heldout, directions)
    assert accuracies[1] > 0.9 and accuracies[2] < 0.5
    read, steered = D.choose_layers(accuracies, range(1, LAYERS))
    assert read == 1 and steered == [1]


def test_choose_layers_takes_the_run_within_tolerance():
    accuracies = np.array([0.0, 0.5, 0.82, 0.9, 0.88, 0.6, 0.85])
    read, steered = D.choose_layers(accuracies, range(1, 7))
    assert read == 3 and steered == [2, 3, 4]


def tiny_bank(directions: dict[str, np.ndarray], steered=(1, 2)) -> Bank:
    info = ModelInfo("x.gguf", "tiny", "llama", LAYERS + 1, EMBD, 100, 512, True)
    bank = Bank.empty(info)
    bank.layers = Layers(steered[0], list(steered))
    for band, direction in directions.items():
        matrix = np.zeros((LAYERS + 1, EMBD), np.float32)
        for layer in steered:
            matrix[layer] = direction
        readout = {"neutral": [0.5] * len(steered), "neutral_text": [0.0] * len(steered), "unit": [2.0] * len(steered)}
        bank.bands[band] = Band(band, matrix, 0.5, readout)
    return bank


def test_bank_mix_uses_the_negative_ratio():
    bank = tiny_bank({"joy": D.unit(RNG.normal(size=EMBD))})
    plus, minus = bank.mix({"joy": 1.0}), bank.mix({"joy": -1.0})
    assert np.allclose(minus, -0.5 * plus)
    assert bank.mix({"joy": 0.0}) is None


# a record of `eqz eval` with as many reply tokens as calibration read, or more: it revises calibration's verdicts
HELD_OUT_SETUP = {"prompts": 16, "samples": 2, "reply_tokens": 64}


def test_a_held_band_is_judged_by_its_level_and_forgets_the_vectors_held_out_figures():
    """Holding swaps what +1 does, so the slider's problems and its recorded figures stop applying: a level set by
    hand is uncalibrated, a measured one is weak only where its own check says so, and the export adds vectors."""
    bank = tiny_bank({"joy": D.unit(RNG.normal(size=EMBD)), "fear": D.unit(RNG.normal(size=EMBD))})
    bank.bands["joy"].problems = ["weak", "lexicon"]
    bank.quality["dose_response"] = {"joy": {"1.0": {"clear": True}}, "fear": {"1.0": {"clear": False}}}
    bank.quality["dose_response_setup"] = HELD_OUT_SETUP
    assert bank.open_problems("joy") == ["lexicon"]
    bank.hold("joy", 2)
    assert bank.open_problems("joy") == ["uncalibrated"] and "joy" not in bank.quality["dose_response"]
    assert "set by hand" in bank.doubtful({"joy": 0.5, "fear": 0.5})[0] and len(bank.doubtful({"joy": 0.5})) == 1
    bank.hold("joy", 2, {"weak": True})
    assert bank.open_problems("joy") == ["weak"]
    bank.quality["dose_response"]["joy"] = {"1.0": {"clear": True}}  # `eqz eval --record` of the held slider
    assert bank.open_problems("joy") == [] and bank.doubtful({"joy": 1.0}) == []
    bank.hold("joy", 2)  # held again at its level by hand: what was measured of that level still stands
    assert bank.open_problems("joy") == [] and bank.bands["joy"].hold_check == {"weak": True}
    bank.hold("joy", 2, {"weak": True, "screen": "again"})  # a new check of the same level keeps the figures
    assert bank.open_problems("joy") == [] and bank.bands["joy"].hold_check["screen"] == "again"
    bank.hold("joy", 2.5)
    assert bank.open_problems("joy") == ["uncalibrated"] and "joy" not in bank.quality["dose_response"]
    assert bank.held({"joy": -0.5, "fear": 1.0}) == {"joy": -1.25}
    assert np.allclose(bank.vector(joy=1.0).matrix, bank.mix({"joy": 1.0}))


def test_held_out_replies_outside_the_fluency_bounds_open_a_problem():
    """Recorded held-out figures can add a problem as well as clear "weak": a +1 that left the fluency bounds there
    warns, though calibration's fewer replies stayed inside them."""
    bank = tiny_bank({"joy": D.unit(RNG.normal(size=EMBD))})
    bank.bands["joy"].problems = ["weak"]
    bank.quality["dose_response"] = {"joy": {"1.0": {"clear": True, "fluent": False}}}
    bank.quality["dose_response_setup"] = HELD_OUT_SETUP
    assert bank.open_problems("joy") == ["fluency (eval)"]
    assert "left the fluency bounds on the held-out prompts" in bank.doubtful({"joy": 1.0})[0]
    bank.bands["joy"].problems = ["fluency"]  # calibration found it too: said once
    assert bank.open_problems("joy") == ["fluency"]
    bank.quality["dose_response"]["joy"]["1.0"]["fluent"] = True
    bank.bands["joy"].problems = []
    assert bank.open_problems("joy") == [] and bank.doubtful({"joy": 1.0}) == []


def test_filters_hit_every_target_even_for_overlapping_directions():
    base = D.unit(RNG.normal(size=EMBD))
    joy = D.unit(base + 0.3 * RNG.normal(size=EMBD))
    fear = D.unit(base + 0.3 * RNG.normal(size=EMBD))
    bank = tiny_bank({"joy": joy, "fear": fear})
    filters = Filters(bank, clamp={"joy": 1.0}, ablate=["fear"])
    hidden = RNG.normal(size=(5, EMBD)).astype(np.float32) * 4
    original = hidden.copy()
    assert filters.apply(1, hidden)
    shape = geometry(bank, 1, ("joy", "fear"))
    assert np.allclose(shape.readouts(hidden), [[1.0, 0.0]] * 5, atol=1e-4)
    # the change stays inside the span of the two directions
    change = hidden - original
    residual = change - (change @ np.linalg.pinv(shape.directions)) @ shape.directions
    assert np.allclose(residual, 0, atol=1e-4)
    assert not filters.apply(0, hidden)  # layer 0 is not steered, so not filtered


def test_instruments_average_per_owner_and_read_what_the_filter_wrote():
    joy = D.unit(RNG.normal(size=EMBD))
    bank = tiny_bank({"joy": joy})
    metered = Instruments(bank, meter=True)
    hidden = np.stack([joy * 0.5, joy * 4.5]).astype(np.float32)  # readouts 0 and 2
    metered.owners(["a", "b"])
    assert not metered(1, hidden.copy())
    assert metered.mean("a")["joy"] == pytest.approx(0.0, abs=1e-5)
    assert metered.mean("b")["joy"] == pytest.approx(2.0, abs=1e-5)
    assert metered.mean("a") is None  # forgotten once taken
    clamped = Instruments(bank, meter=True, filters=Filters(bank, {"joy": 1.0}, []))
    clamped.owners(["a", "b"])
    assert clamped(1, hidden)
    assert clamped.mean("b")["joy"] == pytest.approx(1.0, abs=1e-4)


def test_readout_units_put_the_own_band_at_one_and_no_emotion_below_minus_one():
    direction = np.zeros(EMBD)
    direction[0] = 1.0
    neutral = np.zeros((4, EMBD))
    own, other = np.zeros((4, EMBD)), np.zeros((4, EMBD))
    own[:, 0], other[:, 0] = 2.0, -5.0  # another band's texts push further, the other way
    levels = D.readout_levels(neutral, {"sadness": own, "joy": other}, {"sadness": direction})
    assert levels["sadness"] == (0.0, 2.0, 5.0)
    readouts = D.calibrated(np.array([4.0, 2.0, -5.0, -10.0]), 0.0, 2.0, 5.0)
    assert readouts.tolist() == [2.0, 1.0, -1.0, -2.0]  # sadness text +1, joy text -1


def test_the_shipped_bank_yaml_reads_into_the_typed_bank_and_writes_back_unchanged(tmp_path):
    from eqz.bank import MANIFEST, SHIPPED_DIR

    (shipped,) = [path.parent for path in SHIPPED_DIR.glob(f"*/{MANIFEST}")]
    bank = Bank.load(shipped)
    assert bank.layers.read in bank.layers.steered and all(isinstance(k, int) for k in bank.layers.token_norm)
    assert all(band.direction_ok is not None and band.strength for band in bank.bands.values())
    bank.save(tmp_path)
    assert (tmp_path / MANIFEST).read_text() == (shipped / MANIFEST).read_text()
    saved = Bank.load(tmp_path)
    for band in bank.bands:
        assert np.array_equal(saved.bands[band].matrix, bank.bands[band].matrix)
    # what every own-voice persona shares, kept so bands described later skip the primaries' replies
    assert bank.voice_centre.shape == (len(bank.steered_layers), bank.model.n_embd)
    assert np.array_equal(saved.voice_centre, bank.voice_centre)


def test_the_prefix_cache_drops_the_least_recently_used_prefix_past_its_size():
    cache = PrefixCache(max_bytes=3 * 140)
    row = np.zeros(10, dtype=np.float32)  # 40 bytes of next-token logits beside a 100-byte state
    for head in ((1,), (2,), (3,)):
        cache.put(head, bytes(100), row)
    assert cache.get((1,)) is not None  # used again: now the most recent
    cache.put((4,), bytes(140))  # a generation head keeps no logits
    assert cache.get((2,)) is None and all(cache.get(head) is not None for head in ((1,), (3,), (4,)))
    cache.put((4,), bytes(140))  # stored again (two groups of one read share a prefix): counted once
    assert all(cache.get(head) is not None for head in ((1,), (3,), (4,)))


def test_tails_after_one_prefix_are_grouped_in_order_within_a_decode():
    tails = [[7] * length for length in (5, 5, 1, 1, 1, 9)]
    groups = group_tails([1, 2, 3], tails, n_batch=12, pool_from=3, max_texts=2)
    assert [tail for group in groups for tail in group.tails] == tails
    # 3 + 5 + 5 tokens is over 12; 3 + 5 + 1 + 1 is not, but two texts at most
    assert [len(group.tails) for group in groups] == [1, 2, 2, 1]
    assert all(group.prefix == [1, 2, 3] and group.pool_from == 3 for group in groups)
    assert all(3 + sum(map(len, group.tails)) <= 12 for group in groups)


@pytest.mark.parametrize("content", [b"not numpy at all", b"PK\x03\x04 a broken zip"])
def test_a_corrupt_meter_file_is_one_clear_error_not_a_traceback(tmp_path, content):
    from eqz.bank import METER_FILE, SHIPPED_DIR
    from eqz.errors import EqzError

    (shipped,) = [path.parent for path in SHIPPED_DIR.glob("*/bank.yaml")]
    shutil.copytree(shipped, tmp_path / "bank")
    (tmp_path / "bank" / METER_FILE).write_bytes(content)
    with pytest.raises(EqzError, match="cannot read the meter's directions.*eqz train"):
        Bank.load(tmp_path / "bank")


@pytest.mark.parametrize("band,file,fragment", [('<img src=x onerror="alert(1)">', "joy.gguf", "band name"),
                                                 ("joy\n", "joy.gguf", "band name"),
                                                 ("joy", "../../elsewhere.gguf", "in the bank's folder")])
def test_a_bank_yaml_edited_by_hand_is_checked_as_a_new_band_is(tmp_path, band, file, fragment):
    """A band's name reaches the web page and file names; its file must lie in the bank's folder."""
    import yaml

    from eqz.bank import MANIFEST, SHIPPED_DIR
    from eqz.errors import EqzError

    (shipped,) = [path.parent for path in SHIPPED_DIR.glob(f"*/{MANIFEST}")]
    shutil.copytree(shipped, tmp_path / "bank")
    manifest = yaml.safe_load((tmp_path / "bank" / MANIFEST).read_text())
    manifest["bands"][band] = {**manifest["bands"].pop("joy"), "file": file}
    (tmp_path / "bank" / MANIFEST).write_text(yaml.safe_dump(manifest))
    with pytest.raises(EqzError, match=f"bank.yaml: .*{fragment}"):
        Bank.load(tmp_path / "bank")


@pytest.mark.parametrize("breakage", ["no n_embd", "steered layers not numbers", "not UTF-8", "a list",
                                      "a band's negative_ratio not a number"])
def test_a_broken_bank_of_ones_own_is_one_line_and_reset_removes_it(tmp_path, monkeypatch, breakage):
    """A bank.yaml the user's edits broke is never skipped in silence (its bands would vanish), nor a traceback; the
    line names the way back, and that way (`eqz vectors reset`) works on a bank it cannot read."""
    import yaml

    from eqz.bank import MANIFEST, SHIPPED_DIR, find_bank, reset_user_bank, slug
    from eqz.errors import EqzError
    from eqz.models import ModelInfo

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("EQZ_VECTORS", raising=False)
    (shipped,) = [path.parent for path in SHIPPED_DIR.glob(f"*/{MANIFEST}")]
    manifest = yaml.safe_load((shipped / MANIFEST).read_text())
    record = manifest["model"]
    info = ModelInfo("model.gguf", record["name"], record["architecture"], record["n_layer"], record["n_embd"],
                     record["n_vocab"], 8192, True)
    own = tmp_path / "eqz" / "vectors" / slug(info.name)
    shutil.copytree(shipped, own)
    if breakage == "no n_embd":
        del manifest["model"]["n_embd"]
    elif breakage == "steered layers not numbers":
        manifest["layers"]["steered"] = ["ten"]
    elif breakage == "a list":
        manifest = [manifest]
    elif breakage == "a band's negative_ratio not a number":
        manifest["bands"]["joy"]["negative_ratio"] = "abc"
    (own / MANIFEST).write_bytes(yaml.safe_dump(manifest).encode() + (b"\xff\xfe" if breakage == "not UTF-8" else b""))
    with pytest.raises(EqzError, match=f"{own / MANIFEST}.*delete the folder {own} \\(`eqz vectors reset` does") \
            as raised:
        find_bank(info)
    assert "\n" not in str(raised.value)
    assert reset_user_bank(info) == own and not own.exists()
    assert find_bank(info).directory == shipped


def test_a_removed_band_takes_its_recorded_figures_with_it():
    """Else `eqz eval --record` refused for good: it must measure every band with figures, and one was gone."""
    from eqz.bank import MANIFEST, SHIPPED_DIR

    (shipped,) = [path.parent for path in SHIPPED_DIR.glob(f"*/{MANIFEST}")]
    bank = Bank.load(shipped)
    assert "anticipation" in bank.quality["dose_response"]
    bank.remove("anticipation")
    assert "anticipation" not in bank.quality["dose_response"] and "joy" in bank.quality["dose_response"]


def test_described_bands_written_to_a_bank_directory_extend_the_bank_there(tmp_path):
    """`eqz train --band b=... -o DIR` adds to DIR's bank: a second described band must not drop the first (it
    once took the model's shipped bank and wrote it over DIR). DIR holding another model's bank is refused."""
    from eqz.bank import bank_to_extend
    from eqz.errors import EqzError

    bank = tiny_bank({"nostalgia": D.unit(RNG.normal(size=EMBD))})
    bank.save(tmp_path / "mine")
    info = ModelInfo("x.gguf", "tiny", "llama", LAYERS + 1, EMBD, 100, 512, True)
    assert set(bank_to_extend(tmp_path / "mine", info).bands) == {"nostalgia"}
    assert bank_to_extend(tmp_path / "new", info) is None  # no bank there, and none for this model anywhere
    other = ModelInfo("y.gguf", "other", "llama", LAYERS + 1, EMBD, 100, 512, True)
    with pytest.raises(EqzError, match="holds the bank of tiny, not of other"):
        bank_to_extend(tmp_path / "mine", other)


def test_a_write_stopped_midway_leaves_the_earlier_vector_and_bank_whole(tmp_path, monkeypatch):
    """A vector file was written in place, and a failed write deleted it; a Ctrl-C or kill during a save left half a
    file that the bank could not load. Every file of a bank is now written beside it and moved over it whole."""
    import gguf
    import yaml

    from eqz.bank import MANIFEST
    from eqz.errors import EqzError
    from eqz.vector_files import read_control_vector, write_control_vector

    bank = tiny_bank({"joy": D.unit(RNG.normal(size=EMBD)), "fear": D.unit(RNG.normal(size=EMBD))})
    bank.save(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def disk_full(self):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
        with pytest.raises(EqzError, match="cannot write .*joy.gguf: No space left on device"):
            write_control_vector(tmp_path / "joy.gguf", bank.bands["fear"].matrix * 3, "tiny")
    assert read_control_vector(tmp_path / "joy.gguf").directions[1].tolist() == bank.bands["joy"].matrix[1].tolist()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    bank.bands["joy"].matrix *= 2
    for stop in ((gguf.GGUFWriter, "write_tensors_to_file"), (yaml, "safe_dump")):  # the first file, the last
        with monkeypatch.context() as patched:
            patched.setattr(*stop, interrupted)
            with pytest.raises(KeyboardInterrupt):
                bank.save()
        assert (tmp_path / MANIFEST).read_bytes() == before[MANIFEST]
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(before)  # no temporary file left
        assert set(Bank.load(tmp_path).bands) == {"joy", "fear"}
    assert (tmp_path / "fear.gguf").read_bytes() == before["fear.gguf"]


def test_a_vector_written_to_a_pipe_goes_through_it_whole_and_leaves_the_pipe(tmp_path):
    """Writing whole meant writing beside the file and moving over it: a FIFO (or /dev/null, as root) became a plain
    file. The file is made first and then written into the pipe, whole (a GGUF writer seeks, which a pipe cannot)."""
    import os
    import stat
    import subprocess
    import sys
    import threading

    from eqz.errors import EqzError
    from eqz.vector_files import write_control_vector

    fifo = tmp_path / "vector.gguf"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    matrix = tiny_bank({"joy": D.unit(RNG.normal(size=EMBD))}).bands["joy"].matrix
    write_control_vector(fifo, matrix, "tiny")
    reader.join(timeout=30)
    write_control_vector(tmp_path / "file.gguf", matrix, "tiny")
    assert got == [(tmp_path / "file.gguf").read_bytes()] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.gguf", "vector.gguf"]  # no temporary file left
    appended = tmp_path / "appended.txt"  # /dev/stdout where stdout is `>> FILE`: written after what is there
    appended.write_text("header\n")
    with open(appended, "a") as stdout:
        subprocess.run([sys.executable, "-c", "from pathlib import Path; from eqz.files import replacing\n"
                        "with replacing(Path('/dev/stdout')) as made: made.write_text('NEW')"], stdout=stdout,
                       check=True)
    assert appended.read_text() == "header\nNEW" and stat.S_ISREG(appended.stat().st_mode)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a traceback (RuntimeError) on Python 3.11
    with pytest.raises(EqzError, match="cannot write .*loop: Too many levels of symbolic links; choose another file"):
        write_control_vector(tmp_path / "loop", matrix, "tiny")


def test_a_bank_changed_by_another_eqz_is_seen_and_its_edit_lock_is_held_by_one_process(tmp_path):
    """Two eqz processes changing one bank: the later save undid the other's change. Edits hold a lock (one
    line to the second one), and a bank read before another process saved it knows it changed."""
    import os
    import subprocess
    import sys

    from eqz.bank import editing
    from eqz.errors import EqzError

    bank = tiny_bank({"joy": D.unit(RNG.normal(size=EMBD))})
    bank.save(tmp_path / "bank")
    mine = Bank.load(tmp_path / "bank")
    assert not mine.changed_on_disk()
    other = Bank.load(tmp_path / "bank")
    other.remove("joy")
    other.save()
    assert mine.changed_on_disk() and not other.changed_on_disk()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from eqz.bank import editing\n"
         f"with editing(Path({str(tmp_path / 'bank')!r}), 'eqz train'):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(EqzError, match=rf"being changed by another eqz \(eqz train, process {holder.pid}\)"):
            with editing(tmp_path / "bank", "holding a level"):
                pass
        with editing(tmp_path / "elsewhere", "holding a level"):  # another bank is free
            pass
    finally:
        holder.communicate("", timeout=30)
    with editing(tmp_path / "bank", "holding a level"):
        with editing(tmp_path / "bank", "recording eval figures"):  # within one process an edit may nest
            pass


def test_where_the_file_system_has_no_locks_a_bank_is_edited_unlocked(tmp_path, monkeypatch):
    """flock fails with ENOLCK on some NFS homes: that stopped every edit with a raw OSError."""
    import errno
    import fcntl

    from eqz.bank import editing

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with editing(tmp_path / "bank", "holding a level"):
        pass


def test_only_a_held_slider_that_a_filter_overrides_is_said_to_do_nothing():
    """A held slider is itself a clamp, and the user's filter on its band wins; a slider that adds its vector still
    steers beyond the one direction a clamp fixes (trust +2 under a clamp at 0 still wrote of faith), so it is not
    named."""
    from eqz.bank import MANIFEST, SHIPPED_DIR

    (shipped,) = [path.parent for path in SHIPPED_DIR.glob(f"*/{MANIFEST}")]
    bank = Bank.load(shipped)
    assert bank.bands["joy"].hold is not None and bank.bands["trust"].hold is None
    gains = {"joy": 1.0, "trust": 2.0, "fear": 0.5}
    assert bank.overridden(gains, {"clamp": {"joy": 2.0, "trust": 0.0}, "ablate": []}) == [
        "the joy slider (+1.00) does nothing while a clamp holds joy at +2.00"]
    assert bank.overridden(gains, {"clamp": {}, "ablate": ["joy", "sadness"]}) == [
        "the joy slider (+1.00) does nothing while joy is notched"]
    assert bank.overridden(gains, None) == [] and bank.overridden({"joy": 0.0}, {"ablate": ["joy"]}) == []



def test_a_vector_file_changed_since_it_was_read_is_read_again(tmp_path):
    """A chat's `/vector v.gguf 1` after `eqz vectors export -o v.gguf --replace` steered with the old file: files
    were kept by path for the session's life. One deleted since is used as it was read."""
    import os

    from eqz.steering import Steerer, Steering
    from eqz.vector_files import write_control_vector

    bank = tiny_bank({"joy": D.unit(RNG.normal(size=EMBD)), "fear": D.unit(RNG.normal(size=EMBD))})
    steerer = Steerer(ModelInfo("x.gguf", "tiny", "llama", LAYERS + 1, EMBD, 100, 512, True))
    path = tmp_path / "v.gguf"
    steering = Steering().plus_vector(path, 1.0)
    write_control_vector(path, bank.bands["joy"].matrix, "tiny")
    assert np.array_equal(steerer.matrix(steering), bank.bands["joy"].matrix)
    write_control_vector(path, bank.bands["fear"].matrix, "tiny")  # replaced: written beside it and moved over
    assert np.array_equal(steerer.matrix(steering), bank.bands["fear"].matrix)
    os.unlink(path)
    assert np.array_equal(steerer.matrix(steering), bank.bands["fear"].matrix)
