"""Tests for `stabiliscope inspect` through click's CliRunner."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from stabiliscope import cli

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# A user's model file with three factories: a model with the reference
# layout's module names, a model no layout fits, and one that is no module.
FACTORY_MODULE = textwrap.dedent(
    """
    from torch import nn

    from stabiliscope.models import ModelConfig, build_model


    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.ffn = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)


    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(3))


    def reference():
        return build_model(ModelConfig(depth=2, width=32, heads=4))


    def encoder():
        return Encoder()


    def not_a_model():
        return 42
    """
)

ENCODER_MAPPING = {
    "blocks": "layers",
    "roles": {"attn.o": ["^mix\\.weight$"], "mlp.out": ["^ffn\\.weight$"], "norm": ["^norm\\."]},
    "mlp_out": ["ffn"],
}


def _invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


@pytest.fixture(autouse=True)
def restore_sys_path(monkeypatch) -> None:
    """Undo the working folder that `inspect python:...` puts on sys.path."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def factory_module(tmp_path, monkeypatch) -> Iterator[str]:
    """Write the user's model file under a unique module name and put its folder on sys.path."""
    name = f"user_models_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_inspect_reference_text():
    result = _invoke("inspect", "reference", "--depth", "4", "--strategy", "hybrid")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "reference (TransformerLM)"
    assert lines[1] == "stabiliscope reference transformer: 4 blocks at 'blocks'"
    assert "block 3: blocks.3 (Block)" in lines
    assert "  resid_mid   blocks.3.norm_mid (output)" in lines
    assert "  attn.q      attn.q.weight" in lines


def test_inspect_reference_json():
    result = _invoke("inspect", "reference", "--depth", "3", "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["target"] == "reference"
    assert data["model"] == "TransformerLM"
    assert data["depth"] == 3
    assert data["roles"] == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "norm"]
    assert data["blocks"][2]["positions"]["resid_post"] == {"module": "blocks.2", "side": "output"}


def test_inspect_hf_llama():
    pytest.importorskip("transformers")
    result = _invoke("inspect", "hf-llama", "--depth", "2", "--width", "32", "--heads", "4")

    assert result.exit_code == 0, result.output
    assert "Hugging Face Llama-style decoder (Llama, Mistral, Qwen2, Qwen3): 2 blocks at 'model.layers'" in result.stdout
    assert "  mlp.in      mlp.gate_proj.weight, mlp.up_proj.weight" in result.stdout.splitlines()


def test_inspect_hf_gpt2_json_slices():
    pytest.importorskip("transformers")
    result = _invoke("inspect", "hf-gpt2", "--depth", "2", "--width", "32", "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["blocks_path"] == "transformer.h"
    k_weight = data["blocks"][1]["params"]["attn.k"][0]
    assert k_weight == {"name": "attn.c_attn.weight", "shape": [32, 96], "dim": 1, "start": 32, "stop": 64}


def test_inspect_hf_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = _invoke("inspect", "hf-gpt2")

    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: model 'hf-gpt2' needs the transformers package, which is not installed; "
        "install it with: pip install transformers"
    ]


def test_inspect_python_factory(factory_module):
    result = _invoke("inspect", f"python:{factory_module}:reference")

    assert result.exit_code == 0, result.output
    assert "stabiliscope reference transformer: 2 blocks at 'blocks'" in result.stdout


def test_inspect_python_factory_with_mapping(factory_module, tmp_path):
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(ENCODER_MAPPING))
    result = _invoke("inspect", f"python:{factory_module}:encoder", "--mapping", str(mapping))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "user mapping: 3 blocks at 'layers'" in lines
    assert "  mlp_out     layers.2.ffn (output)" in lines
    assert "  attn_out    - (not exposed)" in lines


def test_inspect_unmappable_model_lists_module_lists(factory_module):
    result = _invoke("inspect", f"python:{factory_module}:encoder")

    assert result.exit_code == 2
    assert result.stderr.startswith("Error: Cannot find transformer blocks in Encoder")
    assert "  layers (3 x Layer)" in result.stderr.splitlines()


def test_inspect_bad_mapping_file(factory_module, tmp_path):
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({**ENCODER_MAPPING, "roles": {"mlp.outer": ["^ffn\\."]}}))
    result = _invoke("inspect", f"python:{factory_module}:encoder", "--mapping", str(mapping))

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown role 'mlp.outer'" in lines[0]


BAD_TARGETS = [
    (["bert"], "Error: unknown model 'bert'; expected one of: reference, hf-llama, hf-gpt2, python:MODULE:FACTORY"),
    (["python:nomodule"], "expected python:MODULE:FACTORY"),
    (["python:no_such_module_here:build"], "cannot import module 'no_such_module_here'"),
    (["python:json:no_factory"], "module 'json' has no function 'no_factory'"),
    (["hf-gpt2", "--strategy", "pre"], "--strategy applies to the reference model only, not to model 'hf-gpt2'"),
    (["python:json:loads", "--depth", "3"], "--depth applies to the built-in models only"),
    (["reference", "--width", "30"], "width 30 is not divisible by heads 4"),
    (["reference", "--strategy", "prenorm"], "Invalid value for '--strategy': 'prenorm' is not one of"),
]


@pytest.mark.parametrize("args, expected", BAD_TARGETS, ids=[" ".join(args) for args, _ in BAD_TARGETS])
def test_inspect_bad_input_one_line(args, expected):
    result = _invoke("inspect", *args)

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_inspect_factory_returning_non_module(factory_module):
    result = _invoke("inspect", f"python:{factory_module}:not_a_model")

    assert result.exit_code == 2
    assert f"{factory_module}.not_a_model() returned int; expected a torch.nn.Module" in result.stderr


def test_inspect_factory_that_raises():
    result = _invoke("inspect", "python:json:loads")

    assert result.exit_code == 1
    assert "json.loads() raised TypeError" in result.stderr
