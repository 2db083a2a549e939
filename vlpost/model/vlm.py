"""VisionLanguageModel: encode images → project → splice into the LM's input embeddings → forward / generate."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vlpost.config import ModelConfig
from vlpost.model.lm import load_lm
from vlpost.model.projector import Projector
from vlpost.model.vision import VisionTower


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None


def splice(text_embeds: torch.Tensor, image_embeds: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Put image embeddings at the image-token positions, in order; one masked scatter, one count check."""
    # text_embeds (B, T, D); image_embeds (N_img * tokens_per_image, D); image_mask (B, T) bool
    positions = int(image_mask.sum())
    if positions != image_embeds.shape[0]:
        raise ValueError(
            f"{positions} image-token positions in input_ids but {image_embeds.shape[0]} image feature vectors; "
            "each <image> must expand to tokens_per_image ids (use vlpost.data.chat.ChatEncoder)"
        )
    return text_embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(text_embeds.dtype))


class VisionLanguageModel(nn.Module):
    """A frozen ViT, a trainable projector and any HF causal LM, with HF batch key names."""

    def __init__(self, vision: VisionTower, projector: Projector, lm: nn.Module, tokenizer, image_token_id: int,
                 spec: dict | None = None):
        super().__init__()
        self.vision, self.projector, self.lm = vision, projector, lm
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.spec = spec or {}  # what vlpost.json records: tower, projector, base LM, lineage

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, cfg: ModelConfig) -> VisionLanguageModel:
        """A fresh model from config, or the run dir named by `cfg.init_from`."""
        if cfg.init_from:
            return cls.from_pretrained(cfg.init_from)
        vision = VisionTower(cfg.vision)
        lm, tokenizer, image_token_id = load_lm(cfg.lm)
        projector = Projector.from_config(cfg.projector, vision.hidden_size, lm.get_input_embeddings().embedding_dim,
                                          vision.grid)
        spec = {"vision": asdict(cfg.vision), "projector": asdict(cfg.projector), "lm": asdict(cfg.lm)}
        return cls(vision, projector, lm, tokenizer, image_token_id, spec)

    @classmethod
    def from_pretrained(cls, run_dir: str | Path) -> VisionLanguageModel:
        from vlpost.model.checkpoint import load_run

        return load_run(run_dir)

    def save_pretrained(self, out_dir: str | Path, lineage: dict | None = None, projector_only: bool = False) -> None:
        from vlpost.model.checkpoint import save_run

        save_run(self, out_dir, lineage=lineage, projector_only=projector_only)

    # ------------------------------------------------------------------ properties

    @property
    def tokens_per_image(self) -> int:
        return self.projector.tokens_per_image

    @property
    def image_transform(self):
        return self.vision.transform

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images → (N, 3, H, W) with the tower's own preprocess transform."""
        return torch.stack([self.image_transform(img.convert("RGB")) for img in images])

    # ------------------------------------------------------------------ forward

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values (N, 3, H, W) → (N, tokens_per_image, D_lm)
        return self.project_features(self.vision(pixel_values.to(self.vision.dtype)))

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        # features (N, num_patches, D_v) frozen-tower output → (N, tokens_per_image, D_lm)
        if features.shape[0] == 0:
            # No images (text-only batch from a feature cache): project one blank row and cut it, so a training
            # projector stays in the graph with a zero gradient and the tower never runs.
            blank = features.new_zeros(1, *features.shape[1:])
            return self.project_features(blank)[:0]
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features spliced in; precomputed `image_features` (N, P_v, D_v) skip the
        tower (stage 1's feature cache), `image_embeds` (N, tpi, D) also the projector."""
        text_embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        image_mask = input_ids == self.image_token_id
        if image_embeds is None and image_features is not None:
            image_embeds = self.project_features(image_features)
        if image_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values)
        if image_embeds is not None:
            return splice(text_embeds, image_embeds.reshape(-1, text_embeds.shape[-1]), image_mask)
        if image_mask.any():
            raise ValueError(f"input_ids hold {int(image_mask.sum())} image tokens but no pixel_values were given")
        if self.training and torch.is_grad_enabled():
            # Text-only batch: a zero-weighted pass keeps the tower and projector in every rank's graph, so
            # DDP sees their gradients and ZeRO-3 gathers their shards on all ranks (no hang, no unused params).
            size = self.vision.visual.image_size
            dummy = torch.zeros(1, 3, size[0], size[1], device=input_ids.device)
            text_embeds = text_embeds + 0.0 * self.encode_images(dummy).sum().to(text_embeds.dtype)
        return text_embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, logits_mask: torch.Tensor | None = None) -> VLMOutput:
        """`logits_mask` (B, T) bool: return logits (N, V) for those positions only, in row-major order (the LM
        head runs on N positions instead of B*T; SFT needs only the positions that predict a trained label)."""
        embeds = self.embed(input_ids, pixel_values, image_embeds, image_features)
        if logits_mask is not None:
            if labels is not None:
                raise ValueError("forward(logits_mask=...) returns selected logits; compute the loss from them")
            return VLMOutput(logits=self._selected_logits(embeds, attention_mask, position_ids, logits_mask))
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        loss = None
        if labels is not None:
            from vlpost.train.logprobs import sft_nll

            loss = sft_nll(out.logits, labels)
        return VLMOutput(logits=out.logits, loss=loss)

    def _selected_logits(self, embeds: torch.Tensor, attention_mask, position_ids, mask: torch.Tensor) -> torch.Tensor:
        head = self.lm.get_output_embeddings()
        config = self.lm.config
        plain_head = isinstance(head, nn.Linear) and not getattr(config, "final_logit_softcapping", None) \
            and getattr(config, "logit_scale", None) is None
        if not plain_head:  # the LM post-processes its logits: run it whole, then select (same values, no saving)
            out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
            return out.logits[mask]
        hidden = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False).last_hidden_state
        return head(hidden[mask])  # (N, V)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, max_new_tokens: int = 32, **gen_kwargs) -> torch.Tensor:
        """Left-padded prompts → new tokens only (B, T_new), with the LM's KV cache."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("batched generation needs left-padded prompts (see vlpost.data.collate)")
        embeds = self.embed(input_ids, pixel_values, image_embeds)
        gen_kwargs.setdefault("do_sample", False)
        return self.lm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **gen_kwargs,
        )
