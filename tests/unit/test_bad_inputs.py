"""Bad inputs through the Python API (issue 9): corrupted policies, overlong texts, broken caches,
model paths that cannot work, data files with the wrong shape. Each gets a one-line otguard error
(or a warning and a recomputation) instead of a traceback, garbage output or a silent default."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import otguard.activations as activations
from otguard import io
from otguard.activations import ActivationSet, _batches, collect
from otguard.data import TextDataset, from_file, load_dataset
from otguard.errors import (
    DataError,
    ModelLoadError,
    PolicyError,
    PolicyMismatchError,
    UnsupportedArchitectureError,
    UsageError,
)
from otguard.models import check_device, context_length, load_model, resolve_model_source
from otguard.policy import LayerEdit, Policy
from otguard.sites import model_identity
from tests.tiny_models import WORD_VOCAB, WORDS, save_tiny_model, tiny_llama, word_tokenizer

CONTEXT = 32


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llama(vocab_size=WORD_VOCAB, max_position_embeddings=CONTEXT, name="tiny")


def texts(n: int, seed: int = 0, words: tuple[int, int] = (2, 10)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) for _ in range(n)]


def make_policy(model: Any, seed: int = 0) -> Policy:
    ident = model_identity(model)
    H, d = ident.n_heads, ident.head_dim
    g = torch.Generator().manual_seed(seed)
    edit = LayerEdit(
        layer=1,
        probe_weight=torch.randn(H, d, generator=g),
        probe_bias=torch.randn(H, generator=g),
        threshold=2,
        head_mask=torch.ones(H, dtype=torch.bool),
        b=torch.randn(H, d, generator=g),
        A=torch.eye(d).expand(H, d, d) + 0.1 * torch.randn(H, d, d, generator=g),
    )
    return Policy(method="random", rule="replace", layers=[edit], model=ident, kappa=1.0)


@pytest.fixture
def saved(model: Any, tmp_path: Path) -> Path:
    return make_policy(model).save(tmp_path / "policy")


def edit_spec(folder: Path, change: Any) -> None:
    spec = json.loads((folder / "policy.json").read_text())
    change(spec)
    (folder / "policy.json").write_text(json.dumps(spec))


# ------------------------------------------------------------------------------ corrupted policies
def test_policy_json_records_the_tensor_checksum(saved: Path) -> None:
    spec = json.loads((saved / "policy.json").read_text())
    assert spec["tensors_sha256"] == io.sha256_file(saved / "tensors.safetensors")


def test_flipped_bytes_in_the_tensors_are_refused(saved: Path, model: Any) -> None:
    data = bytearray((saved / "tensors.safetensors").read_bytes())
    for i in range(len(data) - 64 * 4, len(data), 4):  # 64 flipped high bytes of float32 values
        data[i + 3] ^= 0x40
    (saved / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="does not match the checksum"):
        Policy.load(saved, model=model)


def test_a_nan_in_the_tensors_is_refused(saved: Path, model: Any) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "tensors.safetensors"))
    tensors["layer1.A"][0, 0, 0] = float("nan")
    save_file(tensors, str(saved / "tensors.safetensors"))
    edit_spec(saved, lambda s: s.update(tensors_sha256=io.sha256_file(saved / "tensors.safetensors")))
    with pytest.raises(PolicyError, match=r"layer1\.A hold NaN or infinite"):
        Policy.load(saved)
    with pytest.raises(PolicyError, match="NaN or infinite"):  # and one is never written
        bad = make_policy(model)
        bad.layers[0].b[0, 0] = float("inf")
        bad.save(saved.parent / "bad")
    assert not (saved.parent / "bad").exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s["model"].pop("n_layers"), "model.n_layers is missing, expected a positive integer"),
        (lambda s: s["layers"][0].update(threshold="four"), "layers[0].threshold is 'four'"),
        (lambda s: s.update(layers={"layer": 1}), "'layers' is dict"),
        (lambda s: s["layers"][0].update(layer=9), "layers[0].layer is 9, expected an integer in 0..1"),
        (lambda s: s.update(kappa="strong"), "'kappa' is 'strong'"),
        (lambda s: s.update(rule="swap"), "'rule' is 'swap'"),
        (lambda s: s.update(layers=[]), "'layers' is empty"),
        (lambda s: s["layers"][0].pop("has_A"), "missing entry 'has_A'"),
        (lambda s: s.update(tensors_sha256=12), "'tensors_sha256' is 12"),
    ],
)
def test_hand_edited_policy_json_is_a_policy_error(saved: Path, change: Any, problem: str) -> None:
    edit_spec(saved, change)
    with pytest.raises(PolicyError) as info:
        Policy.load(saved)
    message = str(info.value)
    assert "policy.json is corrupted" in message and problem in message, message
    assert "\n" not in message


def test_policy_without_a_checksum_loads_with_a_warning(
    saved: Path, model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    edit_spec(saved, lambda s: s.pop("tensors_sha256"))
    with caplog.at_level(logging.WARNING, logger="otguard.policy"):
        loaded = Policy.load(saved, model=model)
    assert "without a checksum" in caplog.text
    assert torch.equal(loaded.layers[0].A, make_policy(model).layers[0].A)


def test_weight_mismatch_hint_names_both_the_flag_and_the_argument(saved: Path) -> None:
    other = tiny_llama(seed=1, vocab_size=WORD_VOCAB, max_position_embeddings=CONTEXT)
    with pytest.raises(PolicyMismatchError) as info:
        Policy.load(saved, model=other)
    assert "--no-check-weights" in str(info.value) and "check_weights=False" in str(info.value)


# ------------------------------------------------------------------------------ texts vs the context
def dataset(items: list[str]) -> TextDataset:
    n = len(items)
    return TextDataset("t", tuple(items), np.arange(n) % 2, np.arange(n), tuple(map(str, range(n))))


def test_text_longer_than_the_context_is_refused(model: Any) -> None:
    items = texts(5)
    items[3] = " ".join(["w1"] * (CONTEXT + 5))  # CONTEXT + 6 tokens with <s>
    with pytest.raises(DataError) as info:
        collect(model, word_tokenizer(), items, cache=False, progress=False)
    message = str(info.value)
    assert f"context of {CONTEXT} tokens" in message and f"text 3: {CONTEXT + 6} tokens" in message
    assert "--max-length" in message and "max_length=" in message


def test_max_length_cuts_with_a_warning_and_equals_the_cut_text(
    model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tok = word_tokenizer()
    items = texts(5, words=(2, 8))  # at most 9 tokens: only text 3 is cut
    items[3] = " ".join(WORDS[: CONTEXT + 5])
    with caplog.at_level(logging.WARNING, logger="otguard.activations"):
        got = collect(model, tok, items, max_length=10, cache=False, progress=False, dtype="float32")
    assert "Cut 1 of 5 texts to their first 10 tokens (the longest had 38)" in caplog.text
    cut = " ".join(WORDS[:9])  # <s> + 9 words = 10 tokens
    want = collect(model, tok, [*items[:3], cut, items[4]], cache=False, progress=False, dtype="float32")
    torch.testing.assert_close(got.acts, want.acts, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match=f"longer than the model's context of {CONTEXT}"):
        collect(model, tok, items, max_length=CONTEXT + 1, cache=False, progress=False)
    with pytest.raises(UsageError, match="max_length"):
        collect(model, tok, items, max_length=0, cache=False, progress=False)


def test_context_length_reads_the_config(model: Any) -> None:
    assert context_length(model) == CONTEXT
    gpt2 = transformers.GPT2Config(n_positions=77)
    assert context_length(type("M", (), {"config": gpt2})()) == 77


def test_batches_follow_a_token_budget() -> None:
    lengths = [5, 100, 20, 20, 3, 40]
    got = [b.tolist() for b in _batches(lengths, batch_size=4, max_batch_tokens=60)]
    # longest first: 100 alone (over the budget), 40 alone (60 // 40 = 1), 20+20+5 (60 // 20 = 3), 3
    assert got == [[1], [5], [2, 3, 0], [4]]
    assert [b.tolist() for b in _batches(lengths, batch_size=4, max_batch_tokens=None)] == [
        [1, 5, 2, 3],
        [0, 4],
    ]


def test_token_budget_does_not_change_the_activations(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = word_tokenizer()
    items = texts(9, words=(1, 25))
    seen: list[int] = []
    real_pad = tok.pad

    def spy(encoded: Any, *args: Any, **kwargs: Any) -> Any:
        batch = real_pad(encoded, *args, **kwargs)
        seen.append(int(batch["input_ids"].numel()))
        return batch

    monkeypatch.setattr(tok, "pad", spy)
    small = collect(model, tok, items, batch_size=8, max_batch_tokens=30, cache=False, progress=False,
                    dtype="float32")  # fmt: skip
    assert max(seen) <= 30  # every text has at most 26 tokens, so every batch fits the budget
    seen.clear()
    big = collect(model, tok, items, batch_size=8, max_batch_tokens=None, cache=False, progress=False,
                  dtype="float32")  # fmt: skip
    assert max(seen) > 30
    torch.testing.assert_close(small.acts, big.acts, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ the activation cache
def test_truncated_cache_entry_is_reported_removed_and_recomputed(
    model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tok = word_tokenizer()
    data = dataset(texts(6))
    first = collect(model, tok, data, cache=tmp_path, progress=False)
    entry = tmp_path / "activations" / first.meta["cache_key"]
    blob = (entry / "activations.safetensors").read_bytes()
    (entry / "activations.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cannot be read"):
        ActivationSet.load(entry)
    calls = {"n": 0}
    real_run = activations._run

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return real_run(*args, **kwargs)

    monkeypatch.setattr(activations, "_run", counting)
    with caplog.at_level(logging.WARNING, logger="otguard.activations"):
        again = collect(model, tok, data, cache=tmp_path, progress=False)
    assert calls["n"] == 1
    assert "are unusable" in caplog.text and "removing them and collecting again" in caplog.text
    assert torch.equal(again.acts, first.acts)
    assert ActivationSet.load(entry).acts.shape == first.acts.shape  # the cache is whole again
    collect(model, tok, data, cache=tmp_path, progress=False)
    assert calls["n"] == 1


def test_stale_temps_of_killed_collections_are_cleaned(model: Any, tmp_path: Path) -> None:
    folder = tmp_path / "activations"
    folder.mkdir()
    old_style = folder / ".0123456789abcdef01234567.tmp-abc_1234"  # mkdtemp name of older versions
    old_style.mkdir()
    (old_style / "activations.safetensors").write_bytes(b"x" * 100)
    past = os.path.getmtime(old_style) - 48 * 3600
    os.utime(old_style, (past, past))
    collect(model, word_tokenizer(), texts(3), cache=tmp_path, progress=False)
    assert not old_style.exists()


# ------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, model: Any) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", model)


def with_model_type(src: Path, dst: Path, model_type: str) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_model_folder_loads(model_dir: Path) -> None:
    assert resolve_model_source(str(model_dir)) == ("folder", model_dir)
    loaded, tok = load_model(str(model_dir))
    assert loaded.config.model_type == "llama" and tok.pad_token == "<pad>"


def test_unknown_model_type_is_a_model_load_error(model_dir: Path, tmp_path: Path) -> None:
    folder = with_model_type(model_dir, tmp_path / "foo", "foo-arch")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder))
    assert "model_type 'foo-arch'" in str(info.value) and "register_site" in str(info.value)
    folder = with_model_type(model_dir, tmp_path / "bloom", "bloom")  # transformers knows it, otguard not
    with pytest.raises(UnsupportedArchitectureError) as info2:
        resolve_model_source(str(folder))
    assert "No head site for model_type 'bloom'" in str(info2.value)
    assert "command line handles only these" in str(info2.value)


def test_weights_or_config_file_instead_of_its_folder(model_dir: Path) -> None:
    with pytest.raises(
        ModelLoadError,
        match=f"is a weights file of a model, not a model; give its folder instead: {model_dir}",
    ):
        load_model(str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="is the config file of a model"):
        load_model(str(model_dir / "config.json"))


@pytest.mark.parametrize("name", ["./modles/x", "modles/x/y", "/no/such/model", "~/no-such-model-here/x",
                                  "runs/nothere", "x.safetensors", "model.gguf"])  # fmt: skip
def test_a_missing_local_path_never_goes_to_the_hub(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def no_hub(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("went to the Hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(ModelLoadError, match="No such local model folder or file"):
        load_model(name)


def test_hub_shaped_names_go_to_the_hub_and_bad_names_do_not() -> None:
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == ("hub", None)
    assert resolve_model_source("gpt2") == ("hub", None)
    for bad in ("a b", "org/na me", ""):
        with pytest.raises(ModelLoadError):
            resolve_model_source(bad)


def test_broken_gguf_files_are_model_load_errors(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model(str(tmp_path / "fake.gguf"))
    # a header that ends early: the GGUF reader fails with struct.error inside transformers
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x05\x00")
    with pytest.raises(ModelLoadError, match="truncated or corrupted"):
        load_model(str(tmp_path / "cut.gguf"))


def test_folder_without_config_and_broken_weights(model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(empty))
    broken = with_model_type(model_dir, tmp_path / "broken", "llama")
    blob = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError, match="Could not load the model in"):
        load_model(str(broken))


def test_devices_are_checked_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="Unknown device 'gpu'"):
        check_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="Device 'cuda' is not available"):
        load_model("/no/such/model", device="cuda")  # the device is checked first
    with pytest.raises(UsageError, match="Unknown dtype 'float8'"):
        load_model("smollm2-135m", dtype="float8")


# ------------------------------------------------------------------------------ data files
def test_column_options_reach_the_file_reader_and_not_builtins(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"txt": "a b", "lab": 1}\n{"txt": "c", "lab": 0}\n')
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert "--text-column" in str(info.value) and "text_column=" in str(info.value)
    got = load_dataset(path, text_column="txt", label_column="lab")
    assert got.texts == ("a b", "c") and got.labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="only for data files"):
        load_dataset("truthfulqa", text_column="txt")
    with pytest.raises(DataError, match="is a folder"):
        load_dataset(tmp_path)


def test_unreadable_data_file_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission (root reads anything, so the denial is simulated)."""
    jsonl, csv = tmp_path / "d.jsonl", tmp_path / "d.csv"
    jsonl.write_text('{"text": "x", "label": 1}\n')
    csv.write_text("text,label\nx,1\n")
    real_read_text, real_open = Path.read_text, open

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == jsonl:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(csv):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr("builtins.open", open_)
    for path in (jsonl, csv):
        with pytest.raises(DataError, match=r"cannot be read \(Permission denied\); check its permissions"):
            from_file(path)


def test_stale_model_conversion_temps_are_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed first conversion of the packaged model left ~540 MB behind; the next load removes it."""
    import subprocess
    import sys

    import otguard.models as models_module

    folder = tmp_path / "models"
    folder.mkdir()
    legacy = folder / ".smollm2-135m-ab3d_x9z"  # tempfile.mkdtemp name of older versions
    legacy.mkdir()
    past = os.path.getmtime(legacy) - 48 * 3600
    os.utime(legacy, (past, past))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = folder / f".otguard-tmp-{proc.pid}-{io._host_tag()}-0123abcd.smollm2-135m"
    dead.mkdir()
    keep = folder / ".smollm2-135m-notes"  # not a temp name
    keep.mkdir()

    class Stop(Exception):
        pass

    def stop(*args: Any, **kwargs: Any) -> None:
        raise Stop

    monkeypatch.setattr(models_module, "_convert_alias", stop)
    with pytest.raises(Stop):
        load_model("smollm2-135m", cache=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [keep.name]
