"""Weights files in layouts written elsewhere, built from a description of each layout (key names, shapes,
stored buffers), and reference forwards written from each architecture's description, not from timm.

- BEiT / BEiTv2 as the official release stores it: ``{'model': state_dict}`` with every block's
  ``attn.relative_position_index`` as a persistent buffer, q/v biases without a k bias, layer scales
  ``gamma_1`` / ``gamma_2``, mean pooling through ``fc_norm``.
- ConvNeXt-V2 as Facebook's code stores it: ``downsample_layers.*``, ``stages.N.M.{dwconv,norm,pwconv1,grn,
  pwconv2}``, GRN parameters of shape 1x1x1xC, a final ``norm`` and ``head``.
- timm 0.6.5 training checkpoints (the seed's train-kd.py saver): ``epoch, arch, state_dict, optimizer,
  version, args`` (an ``argparse.Namespace``), ``state_dict_ema``, ``metric``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------- BEiT v2


def beit_relative_position_index(window: int) -> torch.Tensor:
    """The release's stored index: pairwise (dy, dx) offsets of the patch grid mapped to table rows, and
    three extra rows (cls->patch, patch->cls, cls->cls) at the end of the table."""
    n_rel = (2 * window - 1) ** 2 + 3
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()])                      # 2, N
    rel = (pos[:, :, None] - pos[:, None, :]).permute(1, 2, 0)           # N, N, 2
    dy, dx = rel[..., 0] + window - 1, rel[..., 1] + window - 1
    index = torch.zeros(window * window + 1, window * window + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * window - 1) + dx
    index[0, :] = n_rel - 3
    index[:, 0] = n_rel - 2
    index[0, 0] = n_rel - 1
    return index


def beit_release_state(depth: int, dim: int, heads: int, num_classes: int = 1000, img: int = 224,
                       patch: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    window = img // patch
    table_rows = (2 * window - 1) ** 2 + 3
    sd = {"cls_token": rnd(1, 1, dim, std=1.0), "patch_embed.proj.weight": rnd(dim, 3, patch, patch, std=0.05),
          "patch_embed.proj.bias": rnd(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "gamma_1": rnd(dim, std=0.05, mean=0.3), b + "gamma_2": rnd(dim, std=0.05, mean=0.3),
            b + "norm1.weight": rnd(dim, std=0.1, mean=1.0), b + "norm1.bias": rnd(dim),
            b + "attn.q_bias": rnd(dim, std=0.1), b + "attn.v_bias": rnd(dim, std=0.1),
            b + "attn.qkv.weight": rnd(3 * dim, dim, std=0.05),
            b + "attn.relative_position_bias_table": rnd(table_rows, heads, std=1.0),
            b + "attn.relative_position_index": beit_relative_position_index(window),
            b + "attn.proj.weight": rnd(dim, dim, std=0.05), b + "attn.proj.bias": rnd(dim),
            b + "norm2.weight": rnd(dim, std=0.1, mean=1.0), b + "norm2.bias": rnd(dim),
            b + "mlp.fc1.weight": rnd(4 * dim, dim, std=0.05), b + "mlp.fc1.bias": rnd(4 * dim),
            b + "mlp.fc2.weight": rnd(dim, 4 * dim, std=0.05), b + "mlp.fc2.bias": rnd(dim),
        })
    sd.update({"fc_norm.weight": rnd(dim, std=0.1, mean=1.0), "fc_norm.bias": rnd(dim),
               "head.weight": rnd(num_classes, dim, std=1.0), "head.bias": rnd(num_classes)})
    return sd


def beit_reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """The original BEiT forward, written from its description (float64)."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        t = t + sd[b + "gamma_1"] * _beit_attention(h, sd, b + "attn.", heads)
        h = F.layer_norm(t, (dim,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + sd[b + "gamma_2"] * h
    pooled = F.layer_norm(t[:, 1:].mean(1), (dim,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


def _beit_attention(h, sd, p, heads):
    batch, n, dim = h.shape
    bias = torch.cat([sd[p + "q_bias"], torch.zeros_like(sd[p + "v_bias"]), sd[p + "v_bias"]])
    q, k, v = F.linear(h, sd[p + "qkv.weight"], bias).view(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
    rel = sd[p + "relative_position_bias_table"][sd[p + "relative_position_index"].view(-1)]
    attn = (attn + rel.view(n, n, heads).permute(2, 0, 1)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, n, dim)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"])


# ------------------------------------------------------------------------------------------ ConvNeXt-V2

CONVNEXTV2 = {"convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
              "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768))}


def convnextv2_fb_state(arch: str, num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    depths, dims = CONVNEXTV2[arch]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.05, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {"downsample_layers.0.0.weight": rnd(dims[0], 3, 4, 4, std=0.2), "downsample_layers.0.0.bias": rnd(dims[0]),
          "downsample_layers.0.1.weight": rnd(dims[0], std=0.1, mean=1.0), "downsample_layers.0.1.bias": rnd(dims[0])}
    for i in range(1, 4):
        d = f"downsample_layers.{i}."
        sd.update({d + "0.weight": rnd(dims[i - 1], std=0.1, mean=1.0), d + "0.bias": rnd(dims[i - 1]),
                   d + "1.weight": rnd(dims[i], dims[i - 1], 2, 2, std=0.1), d + "1.bias": rnd(dims[i])})
    for i, (depth, c) in enumerate(zip(depths, dims)):
        for j in range(depth):
            b = f"stages.{i}.{j}."
            sd.update({b + "dwconv.weight": rnd(c, 1, 7, 7, std=0.1), b + "dwconv.bias": rnd(c),
                       b + "norm.weight": rnd(c, std=0.1, mean=1.0), b + "norm.bias": rnd(c),
                       b + "pwconv1.weight": rnd(4 * c, c, std=0.1), b + "pwconv1.bias": rnd(4 * c),
                       b + "grn.gamma": rnd(1, 1, 1, 4 * c, std=0.3), b + "grn.beta": rnd(1, 1, 1, 4 * c),
                       b + "pwconv2.weight": rnd(c, 4 * c, std=0.05), b + "pwconv2.bias": rnd(c)})
    sd.update({"norm.weight": rnd(dims[-1], std=0.1, mean=1.0), "norm.bias": rnd(dims[-1]),
               "head.weight": rnd(num_classes, dims[-1], std=0.5), "head.bias": rnd(num_classes)})
    return sd


def convnextv2_reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Facebook's ConvNeXt-V2 forward, written from its description (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n_stages = 4
    for i in range(n_stages):
        d = f"downsample_layers.{i}."
        if i == 0:
            x = _ln_channels_first(F.conv2d(x, sd[d + "0.weight"], sd[d + "0.bias"], stride=4),
                                   sd[d + "1.weight"], sd[d + "1.bias"])
        else:
            x = F.conv2d(_ln_channels_first(x, sd[d + "0.weight"], sd[d + "0.bias"]),
                         sd[d + "1.weight"], sd[d + "1.bias"], stride=2)
        j = 0
        while f"stages.{i}.{j}.dwconv.weight" in sd:
            x = x + _convnextv2_block(x, sd, f"stages.{i}.{j}.")
            j += 1
    c = x.shape[1]
    pooled = F.layer_norm(x.mean((-2, -1)), (c,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


def _ln_channels_first(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps=1e-6).permute(0, 3, 1, 2)


def _convnextv2_block(x, sd, b):
    c = x.shape[1]
    h = F.conv2d(x, sd[b + "dwconv.weight"], sd[b + "dwconv.bias"], padding=3, groups=c).permute(0, 2, 3, 1)
    h = F.layer_norm(h, (c,), sd[b + "norm.weight"], sd[b + "norm.bias"], eps=1e-6)
    h = F.gelu(F.linear(h, sd[b + "pwconv1.weight"], sd[b + "pwconv1.bias"]))
    gx = torch.norm(h, p=2, dim=(1, 2), keepdim=True)              # global response normalisation
    h = sd[b + "grn.gamma"] * (h * (gx / (gx.mean(-1, keepdim=True) + 1e-6))) + sd[b + "grn.beta"] + h
    h = F.linear(h, sd[b + "pwconv2.weight"], sd[b + "pwconv2.bias"])
    return h.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- timm 0.6.5 training saver


def seed_training_checkpoint(arch: str, class_name: str, state: dict, ema: dict | None = None,
                             epoch: int = 299) -> dict:
    """What the seed's train-kd.py (timm 0.6.5's CheckpointSaver) writes: the flags as a Namespace, and under
    ``arch`` the model's class name in lower case (``resnet``, ``visiontransformer``), not a timm model name."""
    args = argparse.Namespace(model=arch, kd_loss="kd", lr=5e-3, epochs=300, teacher="beitv2_base_patch16_224",
                              aa="rand-m7-mstd0.5", mixup=0.1, amp=True, model_ema=ema is not None)
    ckpt = {"epoch": epoch, "arch": class_name.lower(), "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0, 1]}]},
            "version": 2, "args": args, "metric": 83.078}
    if ema is not None:
        ckpt["state_dict_ema"] = ema
    return ckpt
