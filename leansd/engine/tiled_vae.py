"""Exact tiled VAE: the decoder and encoder run layer by layer, each layer in tiles, with GroupNorm
statistics taken over the whole image.

Why not the usual overlapping tiles (diffusers' `enable_tiling`, A1111's tiled VAE extensions)?
Each of those tiles runs the whole decoder on its own, so every GroupNorm normalises with the
tile's own mean and variance: colours drift from tile to tile and the blend only hides the edges.
Here the feature maps of one layer live in `store` memory (host RAM on a GPU) and every layer runs
tile by tile on the compute device:
- a 3x3 convolution reads its tile plus a one-pixel halo, so its output equals the whole-image
  convolution (zero padding only where the image really ends);
- a GroupNorm's mean and variance are accumulated over all tiles of its input (Chan's parallel
  combination of per-tile moments in float64) before any tile is normalised, so they are the whole-image statistics;
- the mid-block's attention keeps the keys and values of every token on the device and runs the
  queries in chunks.
The result equals the untiled VAE up to floating-point summation order, so there are no seams and
no drift at any tile size. Device memory holds one tile's working set (plus the mid-block's keys and
values), whatever the image size; the price is host <-> device copies of each layer's map.

Seamless tiling (circular padding) works too: a halo that crosses an image edge is read from the
opposite edge, as the whole-image convolution would.

Supported: diffusers' `AutoencoderKL` with its standard blocks (SD 1.x/2.x/XL VAEs); `supports`
says whether a given instance qualifies (the engine falls back to diffusers' tiling otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

# Row/column windows. Each layer kind maps an output range [o0, o1) of an input of size n to the
# input range it reads and to where the output range starts inside the layer's output on that crop.
POINT, CONV3, UP, DOWN = "point", "conv3", "up", "down"


def out_size(kind: str, n: int) -> int:
    return {POINT: n, CONV3: n, UP: 2 * n, DOWN: (n - 2) // 2 + 1}[kind]


def window(kind: str, o0: int, o1: int, n: int, *, wrap: bool = False) -> tuple[int, int, int]:
    """(first input index, end input index, offset of o0 in the layer's output on that crop).

    `wrap`: the layer pads circularly (seamless tiling): the range is not clipped and may reach
    past either edge; the caller reads those indices modulo n."""
    if kind == POINT:
        return o0, o1, 0
    if wrap and kind == CONV3:
        return o0 - 1, o1 + 1, 1
    if wrap and kind == UP:
        a = (o0 - 1) // 2
        return a, o1 // 2 + 1, o0 - 2 * a
    if kind == CONV3:  # 3x3, padding 1: one row of halo each side, zeros only at the image border
        a, b = max(0, o0 - 1), min(n, o1 + 1)
        return a, b, o0 - a
    if kind == UP:  # nearest x2 then a 3x3 conv: output row y reads upsampled rows y-1..y+1
        a, b = max(0, (o0 - 1) // 2), min(n, o1 // 2 + 1)
        return a, b, o0 - 2 * a
    if kind == DOWN:  # diffusers' Downsample2D: pad right/bottom by one, 3x3 conv, stride 2
        return 2 * o0, min(n, 2 * o1 + 1), 0
    raise ValueError(kind)


class Stats:
    """Per (batch, group) mean and variance of a feature map, accumulated tile by tile."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.count = 0
        self.mean: "torch.Tensor | None" = None
        self.m2: "torch.Tensor | None" = None

    def add(self, tile: "torch.Tensor") -> None:
        import torch

        b = tile.shape[0]
        values = tile.reshape(b, self.groups, -1)  # (B, G, n): channels are grouped consecutively
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        var, mean = torch.var_mean(values, dim=-1, correction=0)  # one fused pass, no squared copy
        n = values.shape[-1]
        wide = torch.float32 if tile.device.type == "mps" else torch.float64  # MPS has no float64
        mean, m2 = mean.to(wide), var.to(wide) * n
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def normalize(self, tile: "torch.Tensor", norm: "torch.nn.GroupNorm") -> "torch.Tensor":
        """`norm(tile)` with these whole-image statistics instead of the tile's; float32."""
        import torch

        assert self.mean is not None and self.m2 is not None, "statistics of an empty map"
        b, c, h, w = tile.shape
        mean = self.mean.to(torch.float32)  # (B, G)
        rstd = torch.rsqrt(self.m2 / self.count + norm.eps).to(torch.float32)
        per = c // self.groups
        scale = rstd.repeat_interleave(per, dim=1)  # (B, C), as GroupNorm's kernel folds it: x * a + b
        shift = -mean.repeat_interleave(per, dim=1) * scale
        if norm.affine:
            weight, bias = norm.weight.to(torch.float32), norm.bias.to(torch.float32)
            shift = shift * weight + bias
            scale = scale * weight
        return torch.addcmul(shift[:, :, None, None], tile.to(torch.float32), scale[:, :, None, None])  # one new tensor

    def normalize_act(self, tile: "torch.Tensor", norm: "torch.nn.GroupNorm", act: "torch.nn.Module") -> "torch.Tensor":
        """act(norm(tile)) with these statistics; SiLU runs in place on the fresh normalised copy."""
        import torch.nn.functional as F
        from torch import nn

        out = self.normalize(tile, norm)
        return F.silu(out, inplace=True) if isinstance(act, nn.SiLU) else act(out)


@dataclass
class Source:
    """An input of a tiled layer: a feature map in store memory and how the layer reads it."""

    tensor: "torch.Tensor"
    kind: str
    wrap: bool = False
    """The reading layer pads circularly (seamless tiling): halos come from the opposite edge."""


class TiledRunner:
    """Runs layers tile by tile: maps in `store` memory, each tile computed on `device`.

    `elements` bounds a tile: channels x tile area stays near it at every layer, so deep layers
    (more channels, lower resolution) get proportionally smaller tiles. `efficient_attention`: SDPA
    runs a flash / memory-efficient kernel here (CUDA, CPU), so attention needs no query chunks.
    """

    def __init__(self, device: "torch.device", store: "torch.device", elements: int, *,
                 efficient_attention: bool = False) -> None:
        self.device = device
        self.store = store
        self.elements = elements
        self.efficient_attention = efficient_attention

    def side(self, channels: int) -> int:
        return max(8, int(math.isqrt(max(1, self.elements // channels))) // 8 * 8)

    def map(
        self,
        fn: Callable[..., "torch.Tensor"],
        sources: Sequence[Source],
        channels: int,
        stats_groups: int | None = None,
    ) -> tuple["torch.Tensor", Stats | None]:
        """out = fn(*crops) tile by tile; the first source decides the output size. Also returns
        the statistics of `out` for the GroupNorm that reads it next, if `stats_groups` is given."""
        import torch

        first = sources[0]
        h_in, w_in = first.tensor.shape[-2:]
        height, width = out_size(first.kind, h_in), out_size(first.kind, w_in)
        side = self.side(channels)
        stats = Stats(stats_groups) if stats_groups else None
        out: torch.Tensor | None = None
        for y0 in range(0, height, side):
            y1 = min(height, y0 + side)
            for x0 in range(0, width, side):
                x1 = min(width, x0 + side)
                crops, offsets = [], None
                for source in sources:
                    n_h, n_w = source.tensor.shape[-2:]
                    ya, yb, oy = window(source.kind, y0, y1, n_h, wrap=source.wrap)
                    xa, xb, ox = window(source.kind, x0, x1, n_w, wrap=source.wrap)
                    if source.wrap:
                        rows = torch.arange(ya, yb, device=source.tensor.device) % n_h
                        cols = torch.arange(xa, xb, device=source.tensor.device) % n_w
                        crop = source.tensor.index_select(2, rows).index_select(3, cols)
                    else:
                        crop = source.tensor[:, :, ya:yb, xa:xb]
                    crops.append(self.load(crop))
                    if offsets is None:
                        offsets = (oy, ox)
                assert offsets is not None
                oy, ox = offsets
                tile = fn(*crops)[:, :, oy : oy + y1 - y0, ox : ox + x1 - x0]
                if stats is not None:
                    stats.add(tile)
                if out is None:
                    out = self.new_map((tile.shape[0], tile.shape[1], height, width), tile.dtype)
                self.save(out, (y0, y1, x0, x1), tile)
                del crops, tile
        assert out is not None
        return out, stats

    # Where data crosses between store and device (a measuring subclass can see each crossing).

    def load(self, crop: "torch.Tensor") -> "torch.Tensor":
        """A crop of a stored map, on the compute device. Asynchronous only on CUDA, where the copy
        from pageable memory is staged before the call returns (MPS reads the source later)."""
        return crop.to(self.device, non_blocking=self.device.type == "cuda")

    def new_map(self, shape: tuple[int, ...], dtype: "torch.dtype") -> "torch.Tensor":
        import torch

        return torch.empty(shape, dtype=dtype, device=self.store)

    def save(self, out: "torch.Tensor", region: tuple[int, int, int, int], tile: "torch.Tensor") -> None:
        y0, y1, x0, x1 = region
        out[:, :, y0:y1, x0:x1] = tile.to(self.store)

    def resnet(self, x: "torch.Tensor", block, stats: Stats, next_groups: int | None) -> tuple["torch.Tensor", Stats | None]:
        """diffusers' ResnetBlock2D without time embedding: x + conv2(act(norm2(conv1(act(norm1(x))))))."""
        act = block.nonlinearity
        out_channels = block.conv1.out_channels

        def first(crop):
            return block.conv1(_to_conv(stats.normalize_act(crop, block.norm1, act), block.conv1))

        h, h_stats = self.map(first, [Source(x, CONV3, _circular(block.conv1))], max(x.shape[1], out_channels),
                              block.norm2.num_groups)
        assert h_stats is not None

        def second(h_crop, x_crop):
            y = block.conv2(_to_conv(h_stats.normalize_act(h_crop, block.norm2, act), block.conv2))
            shortcut = x_crop if block.conv_shortcut is None else block.conv_shortcut(_to_conv(x_crop, block.conv_shortcut))
            return (shortcut + y) / block.output_scale_factor

        # x is read through the same window as h, so both crops cover the same pixels.
        wrap = _circular(block.conv2)
        out, out_stats = self.map(second, [Source(h, CONV3, wrap), Source(x, CONV3, wrap)], max(x.shape[1], out_channels),
                                  next_groups)
        del h
        return out, out_stats

    def attention(self, x: "torch.Tensor", attn, stats: Stats, next_groups: int | None) -> tuple["torch.Tensor", Stats | None]:
        """diffusers' spatial self-attention block (group norm, q/k/v, residual): keys and values of
        every token on the device, queries one tile at a time (scores bounded by the tile)."""
        import torch
        import torch.nn.functional as F

        b, c, height, width = x.shape
        side = self.side(c)
        key = value = None
        start = 0
        for y0 in range(0, height, side):
            for x0 in range(0, width, side):
                crop = self.load(x[:, :, y0 : y0 + side, x0 : x0 + side])
                tokens = _to_conv(stats.normalize(crop, attn.group_norm), attn.to_k).flatten(2).transpose(1, 2)  # (B, n, C)
                k, v = attn.to_k(tokens), attn.to_v(tokens)
                if key is None or value is None:  # filled in place: no second copy of every key and value
                    key = torch.empty((b, height * width, k.shape[-1]), dtype=k.dtype, device=k.device)
                    value = torch.empty((b, height * width, v.shape[-1]), dtype=v.dtype, device=v.device)
                key[:, start : start + k.shape[1]] = k  # token order is irrelevant to softmax
                value[:, start : start + k.shape[1]] = v
                start += k.shape[1]
                del crop, tokens, k, v
        assert key is not None and value is not None
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        key = key.view(b, -1, heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        value = value.view(b, -1, heads, head_dim).transpose(1, 2)
        tokens_total = key.shape[2]
        # Flash / memory-efficient SDPA never materialises scores: one call per query tile. Otherwise
        # queries per call are bounded so that the (B, heads, q, N) scores stay within a tile's elements.
        chunk = None if self.efficient_attention else max(16, self.elements // max(1, b * heads * tokens_total))

        def run(crop):
            _, _, th, tw = crop.shape
            tokens = _to_conv(stats.normalize(crop, attn.group_norm), attn.to_q).flatten(2).transpose(1, 2)  # (B, n, C)
            query = attn.to_q(tokens).view(b, -1, heads, head_dim).transpose(1, 2)  # (B, heads, n, d)
            if chunk is None:
                out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)  # noqa: F821 - bound above; the del below runs after map()
            else:
                out = torch.empty_like(query)
                for start in range(0, query.shape[2], chunk):
                    out[:, :, start : start + chunk] = F.scaled_dot_product_attention(
                        query[:, :, start : start + chunk], key, value, scale=attn.scale  # noqa: F821 - as above
                    )
            out = out.transpose(1, 2).reshape(b, -1, heads * head_dim)
            out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))  # (B, n, C)
            out = out.transpose(1, 2).reshape(b, c, th, tw)
            if attn.residual_connection:
                out = out + crop
            return out / attn.rescale_output_factor

        result = self.map(run, [Source(x, POINT)], c, next_groups)
        del key, value
        return result


def _to_conv(x: "torch.Tensor", layer) -> "torch.Tensor":
    """Normalised float32 activations at the dtype `layer` runs in (autocast casts them itself)."""
    import torch

    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type without autocast (meta, when measuring)
        autocast = False
    if autocast:
        return x
    return x.to(layer.weight.dtype)


def supports(vae: "AutoencoderKL") -> bool:
    """Whether this VAE is built from the blocks the exact tiled path knows."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D
    from torch import nn

    def resnet_ok(r) -> bool:
        return (isinstance(r, ResnetBlock2D) and r.upsample is None and r.downsample is None and r.time_emb_proj is None
                and isinstance(r.norm1, nn.GroupNorm) and isinstance(r.norm2, nn.GroupNorm)
                and _conv3(r.conv1) and _conv3(r.conv2) and (r.conv_shortcut is None or _point(r.conv_shortcut)))

    def mid_ok(mid) -> bool:
        attentions = [a for a in mid.attentions if a is not None]
        return all(resnet_ok(r) for r in mid.resnets) and all(
            isinstance(a, Attention) and isinstance(a.group_norm, nn.GroupNorm) and a.spatial_norm is None
            and a.norm_q is None and a.norm_k is None and not a.is_cross_attention for a in attentions
        ) and len(mid.resnets) == len(mid.attentions) + 1

    try:
        enc, dec = vae.encoder, vae.decoder
        ok = _conv3(enc.conv_in) and _conv3(dec.conv_in) and _conv3(enc.conv_out) and _conv3(dec.conv_out)
        ok = ok and isinstance(enc.conv_norm_out, nn.GroupNorm) and isinstance(dec.conv_norm_out, nn.GroupNorm)
        ok = ok and mid_ok(enc.mid_block) and mid_ok(dec.mid_block)
        for block in enc.down_blocks:
            ok = ok and all(resnet_ok(r) for r in block.resnets) and not hasattr(block, "attentions")
            for d in block.downsamplers or []:
                ok = ok and isinstance(d, Downsample2D) and d.use_conv and d.padding == 0 and d.norm is None
                ok = ok and d.conv.kernel_size == (3, 3) and d.conv.stride == (2, 2)
        for block in dec.up_blocks:
            ok = ok and all(resnet_ok(r) for r in block.resnets) and not hasattr(block, "attentions")
            for u in block.upsamplers or []:
                ok = ok and isinstance(u, Upsample2D) and u.use_conv and not u.use_conv_transpose and u.interpolate
                ok = ok and u.norm is None and _conv3(u.conv)
        ok = ok and all(_point(c) for c in (vae.quant_conv, vae.post_quant_conv) if c is not None)
        return bool(ok)
    except AttributeError:
        return False


def _conv3(conv) -> bool:
    from torch import nn

    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode in ("zeros", "circular"))


def _circular(conv) -> bool:
    return conv.padding_mode == "circular"


def _point(conv) -> bool:
    from torch import nn

    return isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)


def _mid(runner: TiledRunner, x: "torch.Tensor", mid, stats: Stats, next_groups: int) -> tuple["torch.Tensor", Stats]:
    resnets = list(mid.resnets)
    attentions = list(mid.attentions)

    def groups_after(i: int) -> int:  # the norm that reads resnet i's output
        if i < len(attentions) and attentions[i] is not None:
            return attentions[i].group_norm.num_groups
        return resnets[i + 1].norm1.num_groups if i + 1 < len(resnets) else next_groups

    x, stats = _known(runner.resnet(x, resnets[0], stats, groups_after(0)))
    for i, (attn, resnet) in enumerate(zip(attentions, resnets[1:], strict=True)):
        if attn is not None:
            x, stats = _known(runner.attention(x, attn, stats, resnet.norm1.num_groups))
        x, stats = _known(runner.resnet(x, resnet, stats, groups_after(i + 1)))
    return x, stats


def _known(step: tuple["torch.Tensor", Stats | None]) -> tuple["torch.Tensor", Stats]:
    """A step told the next norm's groups always returns the statistics for it."""
    x, stats = step
    assert stats is not None
    return x, stats


def _blocks(runner: TiledRunner, x: "torch.Tensor", blocks, stats: Stats, next_groups: int, *, up: bool) -> tuple["torch.Tensor", Stats]:
    """down_blocks (resnets, then a stride-2 conv) or up_blocks (resnets, then nearest x2 + conv)."""
    steps: list[tuple[str, Any]] = []
    for block in blocks:
        steps += [("resnet", r) for r in block.resnets]
        steps += [("resample", s) for s in ((block.upsamplers if up else block.downsamplers) or [])]

    def groups_at(i: int) -> int | None:  # the GroupNorm that reads step i's output, if any
        if i + 1 >= len(steps):
            return next_groups
        kind, module = steps[i + 1]
        return module.norm1.num_groups if kind == "resnet" else None  # resamplers read raw maps

    for i, (kind, module) in enumerate(steps):
        if kind == "resnet":
            x, new_stats = runner.resnet(x, module, stats, groups_at(i))
        else:
            # A downsample tile reads a (2 side + 1)^2 crop and pads a copy of it: 4x the input's
            # pixels per output pixel, so its tiles are cut as for 4x the channels.
            channels = module.conv.out_channels * (1 if up else 4)
            # Downsample2D pads with zeros itself (F.pad), whatever its conv's padding mode.
            source = Source(x, UP, _circular(module.conv)) if up else Source(x, DOWN)
            x, new_stats = runner.map(module, [source], max(x.shape[1], channels), groups_at(i))
        if new_stats is not None:
            stats = new_stats
    return x, stats


def tile_elements(vae: "AutoencoderKL", tile: int) -> int:
    """The per-tile element bound for a tile side of `tile` pixels: the top level's channels x tile area."""
    return int(vae.config.block_out_channels[0]) * tile * tile


def efficient_sdpa(device: "torch.device") -> bool:
    """Whether SDPA runs a kernel that never materialises the score matrix on this device type
    (flash on the CPU, flash / memory-efficient on CUDA at any float dtype; the math path elsewhere)."""
    return device.type in ("cuda", "cpu")


def tiled_decode(vae: "AutoencoderKL", z: "torch.Tensor", tile: int, *, store: "torch.device | None" = None,
                 efficient_attention: bool | None = None, runner_type: type[TiledRunner] = TiledRunner) -> "torch.Tensor":
    """`vae.decode(z).sample` computed in tiles of about `tile` pixels; same values as untiled.

    `z`: unscaled latents (B, C, h, w) on the VAE's device and dtype. `store`: where the layer maps
    wait between layers (default: z's device). `efficient_attention`: SDPA has a kernel without a
    score matrix here (None: `efficient_sdpa`); False chunks the mid block's queries.
    `runner_type`: a TiledRunner subclass (measurement).
    """
    dec = vae.decoder
    efficient = efficient_sdpa(z.device) if efficient_attention is None else efficient_attention
    runner = runner_type(z.device, store or z.device, tile_elements(vae, tile), efficient_attention=efficient)
    z = z.to(runner.store)
    first_groups = dec.mid_block.resnets[0].norm1.num_groups

    def conv_in(crop):
        if vae.post_quant_conv is not None:
            crop = vae.post_quant_conv(crop)
        return dec.conv_in(crop)

    x, stats = runner.map(conv_in, [Source(z, CONV3, _circular(dec.conv_in))], dec.conv_in.out_channels, first_groups)
    assert stats is not None
    x, stats = _mid(runner, x, dec.mid_block, stats, _first_norm_groups(dec.up_blocks, dec.conv_norm_out))
    x, stats = _blocks(runner, x, dec.up_blocks, stats, dec.conv_norm_out.num_groups, up=True)

    def conv_out(crop):
        return dec.conv_out(_to_conv(stats.normalize_act(crop, dec.conv_norm_out, dec.conv_act), dec.conv_out))

    image, _ = runner.map(conv_out, [Source(x, CONV3, _circular(dec.conv_out))], x.shape[1])
    return image


def tiled_encode(vae: "AutoencoderKL", pixels: "torch.Tensor", tile: int, *, store: "torch.device | None" = None,
                 efficient_attention: bool | None = None, runner_type: type[TiledRunner] = TiledRunner) -> "torch.Tensor":
    """The moments `vae.encode` turns into its latent distribution (B, 2*C, h, w), computed in tiles.
    Options as for `tiled_decode`."""
    enc = vae.encoder
    efficient = efficient_sdpa(pixels.device) if efficient_attention is None else efficient_attention
    runner = runner_type(pixels.device, store or pixels.device, tile_elements(vae, tile), efficient_attention=efficient)
    pixels = pixels.to(runner.store)
    x, stats = runner.map(enc.conv_in, [Source(pixels, CONV3, _circular(enc.conv_in))], enc.conv_in.out_channels,
                          _first_norm_groups(enc.down_blocks, enc.mid_block.resnets[0].norm1))
    assert stats is not None
    x, stats = _blocks(runner, x, enc.down_blocks, stats, enc.mid_block.resnets[0].norm1.num_groups, up=False)
    x, stats = _mid(runner, x, enc.mid_block, stats, enc.conv_norm_out.num_groups)

    def conv_out(crop):
        out = enc.conv_out(_to_conv(stats.normalize_act(crop, enc.conv_norm_out, enc.conv_act), enc.conv_out))
        return out if vae.quant_conv is None else vae.quant_conv(out)

    moments, _ = runner.map(conv_out, [Source(x, CONV3, _circular(enc.conv_out))], x.shape[1])
    return moments


def _first_norm_groups(blocks, fallback_norm) -> int:
    for block in blocks:
        if block.resnets:
            return block.resnets[0].norm1.num_groups
    return fallback_norm.num_groups
