"""Loading never runs pickled or remote code by default, and a tampered run dir fails loudly, naming the file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlpost.config import LMConfig
from vlpost.model import lm as lm_module
from vlpost.train.checkpointing import load_trainable

PACKAGE = Path(__file__).resolve().parents[2] / "vlpost"
# DeepSpeed restores its own (partitioned) optimizer files with torch.load inside the engine; documented in
# the checkpointing module docstring. These files are written by this run's own engine, never downloaded.
DEEPSPEED_EXCEPTION = ("train/checkpointing.py", "load_checkpoint")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _keyword_is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)  # fmt: skip


def test_source_scan_only_safe_loading():
    """No torch.load without weights_only=True, no pickle, no trust_remote_code=True anywhere in vlpost/."""
    problems, deepspeed_loads = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    problems.append(f"{rel}:{node.lineno} imports a pickle loader")
                if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in names:
                    problems.append(f"{rel}:{node.lineno} imports torch.load by name")
        for call, owner, name in _calls(tree):
            where = f"{rel}:{call.lineno}"
            if owner == "torch" and name == "load" and not _keyword_is_true(call, "weights_only"):
                problems.append(f"{where} torch.load without weights_only=True")
            if any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value
                   for k in call.keywords):  # fmt: skip
                problems.append(f"{where} trust_remote_code switched on in code")
            if name == "load_checkpoint" and owner != "checkpointing":  # an engine's own loader, not ours
                deepspeed_loads.append((rel, name))
    assert problems == []
    assert set(deepspeed_loads) <= {DEEPSPEED_EXCEPTION}  # the one documented exception, and only there
    assert "DeepSpeed" in (PACKAGE / "train/checkpointing.py").read_text().split('"""')[1]


def test_source_scan_catches_an_unsafe_load():
    """The scan above would fail on the code it forbids (so its passing means something)."""
    tree = ast.parse("import torch\nx = torch.load('f.pt')\ny = torch.load('g', weights_only=False)\n"
                     "AutoModel.from_pretrained('d', trust_remote_code=True)\n")
    found = [(owner, name, _keyword_is_true(c, "weights_only"), _keyword_is_true(c, "trust_remote_code"))
             for c, owner, name in _calls(tree)]  # fmt: skip
    assert found == [("torch", "load", False, False), ("torch", "load", False, False),
                     ("AutoModel", "from_pretrained", False, True)]  # fmt: skip


class _Stop(Exception):
    pass


@pytest.mark.parametrize("trust", [None, True])
def test_trust_remote_code_is_off_by_default_and_passed_through(tmp_path, monkeypatch, trust):
    seen = {}

    def recorder(kind):
        def from_pretrained(path, **kwargs):
            seen[kind] = kwargs.get("trust_remote_code")
            if kind == "model":
                raise _Stop
            return object()
        return type(kind, (), {"from_pretrained": staticmethod(from_pretrained)})

    monkeypatch.setattr(lm_module, "AutoTokenizer", recorder("tokenizer"))
    monkeypatch.setattr(lm_module, "AutoModelForCausalLM", recorder("model"))
    cfg = LMConfig(path=str(tmp_path)) if trust is None else LMConfig(path=str(tmp_path), trust_remote_code=trust)
    with pytest.raises(_Stop):
        lm_module.load_lm(cfg)
    expected = bool(trust)
    assert LMConfig().trust_remote_code is False
    assert seen == {"tokenizer": expected, "model": expected}


def _tamper(path: Path, key_part: str) -> str:
    """Grow dim 0 of the first tensor whose name holds `key_part` by one row; returns its name."""
    state = load_file(str(path))
    name = next(k for k in sorted(state) if key_part in k)
    tensor = state[name]
    state[name] = torch.zeros((tensor.shape[0] + 1, *tensor.shape[1:]), dtype=tensor.dtype)
    save_file(state, str(path), metadata={"format": "pt"})
    return name


@pytest.fixture
def run_dir(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "run")
    return tmp_path / "run"


def test_wrong_shape_vision_weights_name_the_file_and_tensor(make_model, run_dir):
    from vlpost.model.vlm import VisionLanguageModel

    name = _tamper(run_dir / "vision.safetensors", "weight")
    with pytest.raises(ValueError, match=f"vision.safetensors does not fit the model.*wrong shape.*{name}"):
        VisionLanguageModel.from_pretrained(run_dir)


def test_wrong_shape_projector_names_the_file_and_tensor(run_dir):
    from vlpost.model.vlm import VisionLanguageModel

    name = _tamper(run_dir / "projector.safetensors", "weight")
    with pytest.raises(ValueError, match=f"projector.safetensors does not fit the model.*wrong shape.*{name}"):
        VisionLanguageModel.from_pretrained(run_dir)


def test_wrong_shape_lm_weight_is_refused(run_dir):
    from vlpost.model.vlm import VisionLanguageModel

    _tamper(run_dir / "lm" / "model.safetensors", "mlp.up_proj")
    with pytest.raises(Exception):  # noqa: B017,PT011 - refused at all; the message is the next test
        VisionLanguageModel.from_pretrained(run_dir)


def test_wrong_shape_lm_weight_error_names_the_file(run_dir):
    from vlpost.model.vlm import VisionLanguageModel

    name = _tamper(run_dir / "lm" / "model.safetensors", "mlp.up_proj")
    with pytest.raises(Exception, match=f"model.safetensors.*{name}|{name}.*model.safetensors"):
        VisionLanguageModel.from_pretrained(run_dir)


def test_wrong_shape_training_checkpoint_names_the_file(make_model, tmp_path):
    model = make_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "projector" in n}
    for name, param in model.named_parameters():
        param.requires_grad_(name in params)
    path = tmp_path / "weights.safetensors"
    save_file(params, str(path))
    name = _tamper(path, "weight")
    with pytest.raises(ValueError, match=f"{path}.*{name}"):
        load_trainable(model, path)
