"""LoRA runs save adapters + projector, reload merged, and export to a plain run dir and to transformers'
LlavaForConditionalGeneration with the same logits as our model."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlpost.cli import main as cli
from vlpost.config import FreezeConfig, TrainConfig
from vlpost.data.chat import ChatEncoder
from vlpost.data.collate import pad_batch
from vlpost.data.pipeline import BatchStream, ExampleEncoder, ListSource
from vlpost.model.export import convertible_reasons
from vlpost.model.vlm import VisionLanguageModel
from vlpost.train import checkpointing
from vlpost.train.freeze import apply_freeze, is_peft
from vlpost.train.sft_objective import SFTObjective
from vlpost.train.trainer import Trainer

TOL = 1e-5  # merging W + BA in float32 reorders sums: differences ~2e-7


def items(n: int = 8) -> list:
    out = []
    for i in range(n):
        has_image = i != 3
        sample = {"kind": "sft", "meta": {"id": f"e{i}"}, "messages": [
            {"role": "user", "content": ("<image>\n" if has_image else "") + "What colour is the shape?"},
            {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]}
        out.append((sample, Image.new("RGB", (32, 32), (80 * (i % 3), 100, 40 * i)) if has_image else None))
    return out


def encoder_of(model):
    return ExampleEncoder(ChatEncoder(model.tokenizer, model.tokens_per_image), model.image_transform)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")).logits


@pytest.fixture
def lora_run(make_model, tmp_path):
    """A LoRA stage-2 model trained a few steps (checkpoints every step), saved as a run dir."""
    model = make_model(seed=2)
    apply_freeze(model, FreezeConfig(lm="lora", lora_r=4, lora_alpha=8))
    stream = BatchStream(ListSource(items(), loop=True), encoder_of(model), batch_size=4,
                         pad_id=model.tokenizer.pad_token_id)
    cfg = TrainConfig(steps=3, batch_size=4, lr=2e-2, warmup_ratio=0.0, save_every=1, report_to="none")
    trainer = Trainer(model, stream, SFTObjective(), cfg, tmp_path / "run", stage="sft")
    trainer.fit()
    model = trainer.unwrapped_model()
    model.save_pretrained(tmp_path / "run", lineage={"stage": "sft"})
    batch = pad_batch([encoder_of(model)(s, im) for s, im in items(4)], model.tokenizer.pad_token_id)
    return tmp_path / "run", model, batch


def test_lora_run_saves_adapter_and_reloads_merged(lora_run):
    run, model, batch = lora_run
    expected = logits(model, batch)
    with model.lm.disable_adapter():
        assert (logits(model, batch) - expected).abs().max() > 1e-3  # the adapters trained: merging matters
    spec = json.loads((run / "vlpost.json").read_text())
    assert spec["lm_adapter"] == "lm_adapter" and spec["lm_dir"] == "lm"
    adapter = load_file(str(run / "lm_adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    base = load_file(str(run / "lm" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in base)
    step = checkpointing.load_file(str(checkpointing.list_checkpoints(run)[-1] / checkpointing.WEIGHTS_FILE))
    assert all("lora_" in k or k.startswith("projector.") for k in step)  # checkpoints: adapters + projector

    loaded = VisionLanguageModel.from_pretrained(run)
    assert not is_peft(loaded.lm)  # merged on load: a plain LM for eval and the next stage
    assert torch.allclose(logits(loaded, batch), expected, atol=TOL, rtol=0)
    apply_freeze(loaded, FreezeConfig(lm="lora", lora_r=4))  # the next stage adds fresh adapters on top
    assert is_peft(loaded.lm) and torch.allclose(logits(loaded, batch), expected, atol=TOL, rtol=0)


def test_export_merged_and_llava_hf_give_identical_logits(lora_run, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    run, model, batch = lora_run
    expected = logits(model, batch)
    assert cli(["export", str(run), "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    spec = json.loads((tmp_path / "merged" / "vlpost.json").read_text())
    assert "lm_adapter" not in spec and not (tmp_path / "merged" / "lm_adapter").exists()
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged, batch), expected, atol=TOL, rtol=0)

    assert convertible_reasons(model) == []
    assert cli(["export", str(run), "--to", "llava-hf", "--out", str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
    assert torch.allclose(hf_logits, expected, atol=TOL, rtol=0)
    processor = LlavaProcessor.from_pretrained(tmp_path / "hf")
    encoded = processor(text="<image>\nWhat colour?", images=Image.new("RGB", (48, 40), (200, 10, 10)),
                        return_tensors="pt")
    assert int((encoded["input_ids"] == model.image_token_id).sum()) == model.tokens_per_image
    assert tuple(encoded["pixel_values"].shape) == (1, 3, 32, 32)
    # the exported config stops generation where our tokenizer ends a turn (not at Llama's default ids)
    tokenizer = model.tokenizer
    text_config = hf.config.text_config
    assert (text_config.eos_token_id, text_config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert hf.generation_config.eos_token_id == tokenizer.eos_token_id


def test_export_refuses_what_llava_hf_cannot_express(make_model, tmp_path, capsys):
    model = make_model(projector="linear")
    model.save_pretrained(tmp_path / "run")
    assert cli(["export", str(tmp_path / "run"), "--to", "llava-hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "projector 'linear'" in err and "--to merged" in err
    visual = model.vision.visual
    visual.transformer.resblocks[0].ls_1 = torch.nn.Linear(2, 2)  # stands in for open_clip's LayerScale
    assert any("block 0 is not a plain pre-LN block" in r for r in convertible_reasons(model))


def test_projector_hidden_size_survives_save_and_blocks_llava_hf(make_model, tmp_path):
    from vlpost.model.projector import Projector
    from vlpost.model.vlm import VisionLanguageModel

    model = make_model()
    model.projector = Projector("mlp2x_gelu", model.vision.hidden_size, 32, model.vision.grid, hidden_size=48)
    model.spec["projector"]["hidden_size"] = 48
    model.save_pretrained(tmp_path / "run")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "run")
    assert loaded.projector.net[0].out_features == 48
    assert torch.equal(loaded.projector.net[0].weight, model.projector.net[0].weight)
    assert any("projector hidden size 48" in r for r in convertible_reasons(loaded))
