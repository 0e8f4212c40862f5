"""Weight conversion (`jaxdiff.interop`): the DiT parameter layout against the facebookresearch/DiT
reference (key names, shapes, axis names, the round trip, and a PyTorch forward pass), and the
shared PyTorch layout helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.interop import dit_from_torch_state_dict, dit_to_torch_state_dict, torch_weights
from jaxdiff.models import DiT

DIT_TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)
K = 10  # classes


def _inputs(shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    return x, jnp.linspace(10.0, 900.0, shape[0]), jnp.arange(shape[0], dtype=jnp.int32) % K


def _shapes(model, x, t, y):
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y)


def _reference_dit_shapes(depth, D, C, p, classes, tokens, learn_sigma=True):
    """state_dict keys and shapes of facebookresearch/DiT `models.py` (timm PatchEmbed,
    Attention with qkv_bias, Mlp; LayerNorms without affine; pos_embed is a frozen Parameter)."""
    out = p * p * (2 * C if learn_sigma else C)
    linears = {
        "t_embedder.mlp.0": (D, 256),
        "t_embedder.mlp.2": (D, D),
        "final_layer.linear": (out, D),
        "final_layer.adaLN_modulation.1": (2 * D, D),
    }
    for i in range(depth):
        linears |= {f"blocks.{i}.attn.qkv": (3 * D, D), f"blocks.{i}.attn.proj": (D, D),
                    f"blocks.{i}.mlp.fc1": (4 * D, D), f"blocks.{i}.mlp.fc2": (D, 4 * D),
                    f"blocks.{i}.adaLN_modulation.1": (6 * D, D)}  # fmt: skip
    shapes = {
        "pos_embed": (1, tokens, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
    }
    for name, (o, n) in linears.items():
        shapes |= {f"{name}.weight": (o, n), f"{name}.bias": (o,)}
    return shapes


def _reference_pos_embed(D, grid):
    """MAE's get_2d_sincos_pos_embed, re-derived: meshgrid(w, h) 'xy', first half from grid[0]."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    omega = 1.0 / 10000 ** (np.arange(D // 4, dtype=np.float64) / (D / 4))
    one = lambda pos: np.concatenate(
        [np.sin(np.outer(pos.ravel(), omega)), np.cos(np.outer(pos.ravel(), omega))], axis=1
    )
    return np.concatenate([one(gw), one(gh)], axis=1)[None].astype(np.float32)


def _random_state_dict(shapes, grid, seed=0):
    rng = np.random.default_rng(seed)
    sd = {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    sd["pos_embed"] = _reference_pos_embed(shapes["pos_embed"][-1], grid)
    return sd


def test_dit_state_dict_maps_one_to_one_and_axis_names():
    D, C, p, grid = 32, 4, 2, 4
    shapes = _reference_dit_shapes(2, D, C, p, K, grid * grid)
    sd = _random_state_dict(shapes, grid)
    params = dit_from_torch_state_dict(sd)
    model = DiT(num_classes=K, learn_sigma=True, **DIT_TINY)
    x, t, y = _inputs((1, grid * p, grid * p, C))
    boxed = _shapes(model, x, t, y)["params"]
    specs = nn.get_partition_spec(boxed)  # logical axis names, never mesh axes
    assert tuple(specs["blocks.0"]["attn"]["qkv"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["y_embedder"]["embedding_table"]["embedding"]) == ("vocab", "embed")
    flax_params = nn.unbox(boxed)
    shape_tree = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)
    assert shape_tree(params) == shape_tree(flax_params)  # same structure and shapes
    assert len(jax.tree_util.tree_leaves(params)) == len(sd) - 1  # every key once, pos_embed aside
    np.testing.assert_array_equal(
        params["blocks.1"]["attn"]["qkv"]["kernel"], sd["blocks.1.attn.qkv.weight"].T
    )
    np.testing.assert_array_equal(
        params["x_embedder"]["proj"]["kernel"][1, 0, 2], sd["x_embedder.proj.weight"][:, 2, 1, 0]
    )
    back = dit_to_torch_state_dict(params)
    assert set(back) == set(sd) - {"pos_embed"}
    assert all(np.array_equal(back[k], sd[k]) for k in back)
    with pytest.raises(ValueError, match="not a DiT parameter"):
        dit_from_torch_state_dict({**sd, "blocks.0.attn.scale": np.ones(())})
    with pytest.raises(ValueError, match="pos_embed differs"):
        dit_from_torch_state_dict({**sd, "pos_embed": sd["pos_embed"][:, ::-1]})


def _torch_dit(depth, D, C, p, classes, grid):
    """Modules of an independent PyTorch DiT with the reference names (run by _torch_forward)."""
    import torch

    tnn, box = torch.nn, torch.nn.ModuleDict  # a named container, like the reference's classes
    ada = lambda n: tnn.Sequential(tnn.SiLU(), tnn.Linear(D, n * D))
    model = box(dict(
        x_embedder=box(dict(proj=tnn.Conv2d(C, D, p, stride=p))),
        t_embedder=box(dict(mlp=tnn.Sequential(tnn.Linear(256, D), tnn.SiLU(), tnn.Linear(D, D)))),
        y_embedder=box(dict(embedding_table=tnn.Embedding(classes + 1, D))),
        blocks=tnn.ModuleList(box(dict(
            attn=box(dict(qkv=tnn.Linear(D, 3 * D), proj=tnn.Linear(D, D))),
            mlp=box(dict(fc1=tnn.Linear(D, 4 * D), fc2=tnn.Linear(4 * D, D))),
            adaLN_modulation=ada(6))) for _ in range(depth)),
        final_layer=box(dict(linear=tnn.Linear(D, p * p * 2 * C), adaLN_modulation=ada(2))),
    ))  # fmt: skip
    model.pos_embed = tnn.Parameter(torch.zeros(1, grid * grid, D), requires_grad=False)
    return model


def _torch_block(m, x, c, heads):
    """adaLN-Zero block (Peebles & Xie 2023, Fig. 3) written in PyTorch from the paper."""
    import torch

    F, (B, N, D) = torch.nn.functional, x.shape
    ln = lambda a: F.layer_norm(a, (D,), eps=1e-6)
    s1, sc1, g1, s2, sc2, g2 = (a[:, None] for a in m.adaLN_modulation(c).chunk(6, dim=1))
    qkv = m.attn.qkv(ln(x) * (1 + sc1) + s1).reshape(B, N, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
    w = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5, dim=-1)
    x = x + g1 * m.attn.proj((w @ v).transpose(1, 2).reshape(B, N, D))
    return x + g2 * m.mlp.fc2(F.gelu(m.mlp.fc1(ln(x) * (1 + sc2) + s2), approximate="tanh"))


def _torch_forward(model, x, t, y, heads, p):
    """DiT forward (NCHW in and out) on the `_torch_dit` modules."""
    import torch

    B, _, H, W = x.shape
    h = model.x_embedder.proj(x).flatten(2).transpose(1, 2) + model.pos_embed  # (B, T, D)
    tf = t[:, None] * torch.exp(-np.log(10000.0) * torch.arange(128.0) / 128)  # (B, 128)
    c = model.t_embedder.mlp(torch.cat([torch.cos(tf), torch.sin(tf)], 1))
    c = c + model.y_embedder.embedding_table(y)
    for m in model.blocks:
        h = _torch_block(m, h, c, heads)
    shift, scale = (a[:, None] for a in model.final_layer.adaLN_modulation(c).chunk(2, dim=1))
    h = model.final_layer.linear(torch.nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)
                                 * (1 + scale) + shift)  # fmt: skip
    h = h.reshape(B, H // p, W // p, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, -1, H, W)


def test_dit_forward_matches_torch_reference():
    torch = pytest.importorskip("torch")
    D, C, p, grid, depth, heads = 32, 3, 2, 4, 2, 2
    shapes = _reference_dit_shapes(depth, D, C, p, K, grid * grid)
    sd = _random_state_dict(shapes, grid, seed=3)
    ref = _torch_dit(depth, D, C, p, K, grid)
    ref.load_state_dict({k: torch.from_numpy(a) for k, a in sd.items()}, strict=True)
    x, t, y = _inputs((2, grid * p, grid * p, C))
    with torch.no_grad():
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        tt, yt = torch.from_numpy(np.array(t)), torch.from_numpy(np.array(y)).long()
        want = _torch_forward(ref, xt, tt, yt, heads, p)
    model = DiT(
        patch_size=p, hidden_size=D, depth=depth, num_heads=heads, num_classes=K, learn_sigma=True
    )
    got = model.apply({"params": dit_from_torch_state_dict(sd)}, x, t, y)
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_torch_kernel_layout_round_trips(tmp_path):
    """Linear (out, in) <-> (in, out) and Conv2d OIHW <-> HWIO; a state_dict file is read from
    .npz without torch, and any other suffix is refused."""
    rng = np.random.default_rng(0)
    linear = rng.normal(size=(3, 5)).astype(np.float32)
    conv = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    assert torch_weights.kernel_from_torch(linear).shape == (5, 3)
    assert torch_weights.kernel_from_torch(conv).shape == (3, 3, 2, 4)
    np.testing.assert_array_equal(torch_weights.kernel_from_torch(conv)[1, 2, 0, 3],
                                  conv[3, 0, 1, 2])
    for w in (linear, conv):
        np.testing.assert_array_equal(
            torch_weights.kernel_to_torch(torch_weights.kernel_from_torch(w)), w)
    tree = torch_weights.nest({("a", "b", "kernel"): linear, ("a", "bias"): np.ones(2)})
    np.testing.assert_array_equal(tree["a"]["b"]["kernel"], linear)
    np.savez(tmp_path / "w.npz", **{"a.weight": linear})
    np.testing.assert_array_equal(torch_weights.read_state_dict(tmp_path / "w.npz")["a.weight"],
                                  linear)
    with pytest.raises(ValueError, match="must end in .pth, .pt or .npz"):
        torch_weights.read_state_dict(tmp_path / "w.bin")
