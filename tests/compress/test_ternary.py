"""The packed ternary file of a BitNet model: 2-bit codes, exact reload, the refusals, the CLI."""

from __future__ import annotations

import copy

import pytest
import torch

from fucina.cli.main import main
from fucina.compress.ternary import TernaryLinear, export_ternary, load_ternary, pack_ternary, unpack_ternary
from fucina.errors import CheckpointError, ConfigError
from fucina.model.io import save_model
from tiny_models import tiny_model

BITNET = dict(linear="bitnet", positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)


def test_two_bit_packing_round_trips_any_length():
    values = torch.randint(-1, 2, (7, 5), dtype=torch.int8)  # 35 values: not a multiple of 4
    packed = pack_ternary(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 9
    assert torch.equal(unpack_ternary(packed, values.shape), values)


def test_exported_model_reloads_with_equal_logits_and_a_smaller_file(tmp_path):
    model = tiny_model(**BITNET, layer_mixers=["mla", "mamba"], d_model=64, d_ff=256, vocab_size=64)
    size = export_ternary(model, tmp_path / "model.ternary.safetensors", dtype=torch.bfloat16)
    exact_size = export_ternary(model, tmp_path / "exact.safetensors")
    save_model(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "bf16")
    bf16_size = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    print(f"ternary export {size:,} B (float32 rest: {exact_size:,} B); bf16 model {bf16_size:,} B")
    assert size < bf16_size / 2

    loaded = load_ternary(tmp_path / "exact.safetensors")
    assert isinstance(loaded.blocks[0].mixer.kv_b_proj, TernaryLinear)
    ids = torch.randint(0, 64, (2, 20))
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))
        # Cached decoding too (compared with the exported model's own cached decoding: a different batch
        # shape can move a matmul's last bit, and 8-bit activation rounding may then flip a level).
        steps = []
        for m in (loaded, model):
            cache = m.new_cache(2)
            steps.append(
                torch.cat([m(ids[:, :12], cache)] + [m(ids[:, t : t + 1], cache) for t in range(12, 20)], 1)
            )
        assert torch.equal(steps[0], steps[1])


def test_export_refuses_a_dense_model_and_load_refuses_other_files(tmp_path):
    with pytest.raises(ConfigError, match="needs a BitNet model"):
        export_ternary(tiny_model(), tmp_path / "x.safetensors")
    save_model(tiny_model(), tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not a fucina ternary export"):
        load_ternary(tmp_path / "dense" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_ternary(tmp_path / "missing.safetensors")


def test_cli_export_ternary_writes_the_packed_file_and_reports_its_size(tmp_path, capsys):
    model = tiny_model(**BITNET, d_model=64, d_ff=256, vocab_size=64)
    save_model(model, tmp_path / "run" / "best")
    out = tmp_path / "model.ternary.safetensors"
    assert (
        main(["model", "export-ternary", str(tmp_path / "run"), "--out", str(out), "--dtype", "float32"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"{out.stat().st_size:,} bytes" in printed
    ids = torch.randint(0, 64, (1, 12))
    with torch.inference_mode():
        assert torch.equal(load_ternary(out)(ids), model(ids))
    assert main(["model", "export-ternary", str(tmp_path / "run"), "--out", str(out)]) == 2  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    save_model(tiny_model(), tmp_path / "dense")
    assert main(["model", "export-ternary", str(tmp_path / "dense"), "--out", str(tmp_path / "d.st")]) == 2
    assert "needs a BitNet model" in capsys.readouterr().err
