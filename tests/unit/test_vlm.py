"""The model contract: splice, projectors, save/load, batched generation, both LM architectures."""

import pytest
import torch

from vlpost.data.chat import ChatEncoder
from vlpost.data.collate import left_pad
from vlpost.model.projector import Projector, pixel_shuffle
from vlpost.model.vlm import splice


def test_splice_places_image_embeddings_exactly_and_checks_count():
    text = torch.zeros(2, 6, 3)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    images = torch.arange(12, dtype=torch.float).reshape(4, 3) + 1
    out = splice(text, images, mask)
    assert torch.equal(out[0, 1], images[0]) and torch.equal(out[0, 2], images[1])
    assert torch.equal(out[1, 3], images[2]) and torch.equal(out[1, 4], images[3])
    assert float(out[~mask].abs().sum()) == 0.0  # text positions untouched
    with pytest.raises(ValueError, match="4 image-token positions in input_ids but 3 image feature vectors"):
        splice(text, images[:3], mask)


def test_pixel_shuffle_groups_2x2_neighbours():
    # a 4x4 grid of patches whose feature is its own index
    features = torch.arange(16, dtype=torch.float).reshape(1, 16, 1)
    out = pixel_shuffle(features, (4, 4))
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 3].tolist() == [10, 11, 14, 15]


def test_pixel_shuffle_merge_sizes():
    # an 8x4 grid (rows x cols) whose feature is its own index; merge 4 -> 2 tokens of 16 patches each, raster order
    features = torch.arange(32, dtype=torch.float).reshape(1, 32, 1)
    out = pixel_shuffle(features, (8, 4), merge=4)
    assert out.shape == (1, 2, 16)
    assert out[0, 0].tolist() == list(range(16)) and out[0, 1].tolist() == list(range(16, 32))
    assert torch.equal(pixel_shuffle(features, (8, 4), merge=1), features)  # merge 1: one token per patch
    assert torch.equal(pixel_shuffle(features, (8, 4)), pixel_shuffle(features, (8, 4), merge=2))


def test_projector_merge_checks():
    assert Projector("pixel_shuffle", vision_dim=8, lm_dim=12, grid=(8, 8), merge=4).tokens_per_image == 4
    with pytest.raises(ValueError, match="merge=3 must divide the patch grid"):
        Projector("pixel_shuffle", vision_dim=8, lm_dim=12, grid=(8, 8), merge=3)
    with pytest.raises(ValueError, match="pixel_shuffle only"):
        Projector("mlp2x_gelu", vision_dim=8, lm_dim=12, grid=(8, 8), merge=4)


@pytest.mark.parametrize("kind,expected", [("linear", 16), ("mlp2x_gelu", 16), ("pixel_shuffle", 4)])
def test_projector_tokens_per_image(kind, expected):
    projector = Projector(kind, vision_dim=8, lm_dim=12, grid=(4, 4))
    assert projector.tokens_per_image == expected
    assert projector(torch.randn(3, 16, 8)).shape == (3, expected, 12)


def test_projector_hidden_size():
    wide = Projector("mlp2x_gelu", vision_dim=8, lm_dim=12, grid=(4, 4), hidden_size=32)
    assert [tuple(p.shape) for p in wide.parameters()] == [(32, 8), (32,), (12, 32), (12,)]
    shuffle = Projector("pixel_shuffle", vision_dim=8, lm_dim=12, grid=(4, 4), hidden_size=20)
    assert [tuple(p.shape) for p in shuffle.parameters()] == [(20, 32), (20,), (12, 20), (12,)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forward_with_images_and_labels(make_model, arch):
    model = make_model(arch=arch)
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    enc = encoder.encode([{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
                         sample_id="a", num_images=1)
    ids = torch.tensor([enc.input_ids])
    out = model(ids, torch.ones_like(ids), pixel_values=torch.randn(1, 3, 32, 32), labels=torch.tensor([enc.labels]))
    assert out.logits.shape == (1, len(enc), len(model.tokenizer))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(ids, torch.ones_like(ids))


def test_image_features_reach_the_lm(make_model):
    """Changing the image changes logits after the image span, not before it."""
    model = make_model().eval()
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    ids = torch.tensor([encoder.encode_prompt([{"role": "user", "content": "hi <image> colour?"}], sample_id="a",
                                              num_images=1)])
    first_image = int((ids[0] == model.image_token_id).nonzero()[0])
    a = model(ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    b = model(ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert torch.allclose(a[:, :first_image], b[:, :first_image])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("arch,lora", [("llama", False), ("qwen2", False), ("llama", True)])
def test_logits_mask_selects_the_same_logits_and_gradients(make_model, arch, lora):
    from vlpost.config import FreezeConfig
    from vlpost.train.freeze import apply_freeze
    from vlpost.train.logprobs import label_positions, selected_nll_sum, sft_nll_sum

    model = make_model(arch=arch, seed=1)
    apply_freeze(model, FreezeConfig(lm="lora" if lora else "full", lora_targets=("q_proj", "v_proj")))
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    encoded = [encoder.encode([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": answer}],
                              sample_id=str(i), num_images=1) for i, answer in enumerate(["red", "a small green circle"])]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e)) for e in encoded])
    labels = torch.tensor([e.labels + [-100] * (width - len(e)) for e in encoded])
    attention = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    pixels = torch.randn(2, 3, 32, 32)
    trained = [p for p in model.parameters() if p.requires_grad]
    full, _ = sft_nll_sum(model(ids, attention, pixel_values=pixels).logits, labels)
    grads_full = torch.autograd.grad(full, trained)
    mask, targets = label_positions(labels)
    selected = model(ids, attention, pixel_values=pixels, logits_mask=mask).logits
    assert selected.shape == (targets.numel(), len(model.tokenizer))
    assert torch.allclose(selected, model(ids, attention, pixel_values=pixels).logits[mask], atol=1e-6)
    picked = selected_nll_sum(selected, targets)
    assert picked.item() == pytest.approx(full.item(), abs=1e-4)
    for a, b in zip(grads_full, torch.autograd.grad(picked, trained)):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="compute the loss from them"):
        model(ids, attention, pixel_values=pixels, labels=labels, logits_mask=mask)


@pytest.mark.parametrize("merge", [2, 4])
def test_save_load_identical_logits(make_model, tmp_path, merge):
    model = make_model(projector="pixel_shuffle", merge=merge).eval()
    assert model.tokens_per_image == 16 // merge**2
    ids = torch.tensor([[5, 6] + [model.image_token_id] * model.tokens_per_image + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    before = model(ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path / "run", lineage={"stage": "test"})
    loaded = type(model).from_pretrained(tmp_path / "run").eval()
    assert loaded.projector.merge == merge
    assert torch.equal(before, loaded(ids, pixel_values=pixels).logits)
    assert loaded.spec["lineage"] == [{"stage": "test"}]
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template


def test_run_on_a_local_dir_tower_loads_after_the_tower_folder_and_the_run_move(tokenizer_dirs, tmp_path):
    """A `local-dir:` tower's architecture is stored in the run dir: deleting the folder the run was trained
    from, and moving the run, still load the same model (before: FileNotFoundError on the tower folder)."""
    import shutil
    from dataclasses import asdict

    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    from vlpost.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
    from vlpost.model.vision import register_tiny_configs
    from vlpost.model.vlm import VisionLanguageModel
    from vlpost.train.bootstrap import save_open_clip_dir

    register_tiny_configs()
    model_cfg = open_clip.get_model_config("vlpost-tiny-vit")
    model_cfg["vision_cfg"]["layers"] = 3  # not the packaged tiny config: the architecture must come from the run
    torch.manual_seed(0)
    clip = open_clip.CLIP(**model_cfg)
    set_model_preprocess_cfg(clip, asdict(PreprocessCfg(size=32)))
    save_open_clip_dir(clip, model_cfg, tmp_path / "clip")
    cfg = ModelConfig(vision=VisionConfig(name=f"local-dir:{tmp_path / 'clip'}"), projector=ProjectorConfig(),
                      lm=LMConfig(tokenizer=tokenizer_dirs["chatml"], hidden_size=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=64))
    model = VisionLanguageModel.build(cfg).eval()
    assert len(model.vision.visual.transformer.resblocks) == 3
    ids = torch.tensor([[5, 6] + [model.image_token_id] * model.tokens_per_image + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    before = model(ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path / "run")
    shutil.rmtree(tmp_path / "clip")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "moved").eval()
    assert torch.equal(before, loaded(ids, pixel_values=pixels).logits)
    loaded.save_pretrained(tmp_path / "again")  # a run built on the loaded run carries the architecture on
    again = VisionLanguageModel.from_pretrained(tmp_path / "again").eval()
    assert torch.equal(before, again(ids, pixel_values=pixels).logits)
    assert again.spec["vision"]["name"] == f"local-dir:{tmp_path / 'clip'}"  # lineage keeps what the user named


def test_tampered_projector_checkpoint_is_a_clear_error(make_model, tmp_path):
    from safetensors.torch import save_file

    model = make_model()
    model.save_pretrained(tmp_path / "run")
    save_file({"net.0.weight": torch.zeros(3, 3)}, str(tmp_path / "run" / "projector.safetensors"))
    with pytest.raises(ValueError, match="projector.safetensors does not fit the model"):
        type(model).from_pretrained(tmp_path / "run")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_left_padded_generate_equals_one_by_one(make_model, arch):
    model = make_model(arch=arch, seed=3).eval()
    encoder = ChatEncoder(model.tokenizer, model.tokens_per_image)
    questions = ["<image>\nWhat colour is the circle?", "How many shapes?\n<image>", "<image> hat?", "no image here"]
    prompts, images = [], []
    for i, question in enumerate(questions):
        n = question.count("<image>")
        prompts.append(encoder.encode_prompt([{"role": "user", "content": question}], sample_id=str(i), num_images=n))
        images.append(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(i)))
    ids, mask = left_pad(prompts, model.tokenizer.pad_token_id)
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    batched = model.generate(ids, mask, pixel_values=torch.cat(images), max_new_tokens=8)
    for row, (prompt, pixels) in enumerate(zip(prompts, images)):
        single = model.generate(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                                pixel_values=pixels if len(pixels) else None, max_new_tokens=8)
        width = single.shape[1]
        assert batched[row, :width].tolist() == single[0].tolist(), f"row {row}"
