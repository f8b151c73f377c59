"""`fucina export --format ternary`: the packed BitNet file through the export command's output rules."""

from __future__ import annotations

import torch
from safetensors import safe_open

from fucina.cli.main import main
from fucina.compress.ternary import load_ternary
from fucina.model.io import save_model
from tiny_models import tiny_model

BITNET = dict(linear="bitnet", positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, vocab_size=64)


def read(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file (its header order is not deterministic)."""
    with safe_open(path, framework="pt") as handle:
        return handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}


def export(model: str, out, *extra: str) -> int:
    return main(["export", "--model", model, "--format", "ternary", "--out", str(out), *extra])


def test_export_format_ternary_writes_a_file_that_reloads_with_equal_logits(tmp_path, capsys):
    model = tiny_model(**BITNET, d_model=64, d_ff=256)
    save_model(model, tmp_path / "run" / "best")  # a run directory without a tokenizer: none is needed
    out = tmp_path / "exports" / "model.ternary.safetensors"
    assert export(str(tmp_path / "run"), out, "--dtype", "float32") == 0
    assert f"{out.stat().st_size:,} bytes" in capsys.readouterr().out
    ids = torch.randint(0, 64, (2, 16))
    with torch.inference_mode():
        assert torch.equal(load_ternary(out)(ids), model(ids))
    assert [path.name for path in out.parent.iterdir()] == [out.name]  # no staging leftovers


def test_export_and_model_export_ternary_write_the_same_file(tmp_path):
    save_model(tiny_model(**BITNET), tmp_path / "model")
    assert export(str(tmp_path / "model"), tmp_path / "a.safetensors") == 0
    assert (
        main(["model", "export-ternary", str(tmp_path / "model"), "--out", str(tmp_path / "b.safetensors")])
        == 0
    )
    (meta_a, tensors_a), (meta_b, tensors_b) = (read(tmp_path / f"{n}.safetensors") for n in "ab")
    assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[name], tensors_b[name]) for name in tensors_a)


def test_an_existing_output_is_kept_unless_overwrite_is_given(tmp_path, capsys):
    save_model(tiny_model(**BITNET, d_model=64, d_ff=256), tmp_path / "model")
    out = tmp_path / "model.ternary.safetensors"
    assert export(str(tmp_path / "model"), out, "--dtype", "float32") == 0
    exact = out.read_bytes()
    assert export(str(tmp_path / "model"), out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == exact
    assert export(str(tmp_path / "model"), out, "--overwrite") == 0  # bfloat16 rest: a smaller file
    assert out.stat().st_size < len(exact)


def test_a_model_that_is_not_bitnet_is_refused_naming_its_linear_kind(tmp_path, capsys):
    save_model(tiny_model(vocab_size=64), tmp_path / "dense")
    assert export(str(tmp_path / "dense"), tmp_path / "d.safetensors") == 2
    error = capsys.readouterr().err
    assert "needs a BitNet model" in error and "linear is 'dense'" in error
    assert not (tmp_path / "d.safetensors").exists()
