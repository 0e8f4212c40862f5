"""Measurement operators for inverse problems y = A(x) + sigma_y * noise.

Contract: an operator is a frozen pytree dataclass (a jit argument; arrays and numbers such as
`sigma_y` are leaves, sizes and choices static). Methods are batched over axis 0 (x is
(B, *x_shape), images channels-last (B, H, W, C); y is (B, *y_shape)) and assume nothing else;
bad input raises a one-line ValueError.
- `op(x)` = `forward(x)`: A(x), noise-free; `measure(key, x)`: A(x) + sigma_y * N(0, I).
- Linear operators (`linear`, `has_pinv` true): `adjoint(y)` = A^T y exactly; `pinv(y)` = A^+ y,
  the Moore-Penrose pseudo-inverse (DDNM, Wang et al. 2023; Blur's cuts |H| <= rcond max|H|);
  `gram_solve(u, r2, s2)` = A^T (r2 A A^T + s2 I)^+ u in closed form (PiGDM, Song et al. 2023,
  Eq. 7-8) for r2, s2 >= 0, r2 + s2 > 0; at s2 = 0 it is A^+ u / r2.
- `output_shape(x_shape)`, `input_shape(y_shape)`: validated per-sample shapes;
  `check(x_shape, y)` raises unless y is (B, *output_shape(x_shape)).
- Nonlinear operators (`Saturate`): only `forward` and `measure`, differentiable (for DPS, Chung
  et al. 2023). Sources: DDRM (Kawar et al. 2022, App. A) for inpainting and average-pooling
  super-resolution; periodic blur is diagonal in the DFT basis (Hansen et al. 2006, Ch. 4).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.process import check_values, concrete_float, pytree_dataclass, short_repr

__all__ = ["Inpaint", "Downsample", "Blur", "ChannelMix", "Matrix", "Saturate", "box_mask",
           "random_mask", "half_mask", "gaussian_kernel", "grayscale", "parse_task", "TASKS"]

TASKS = ("inpaint:box", "inpaint:half[-left|-right|-top|-bottom]", "inpaint:random[=KEEP]",
         "sr:FACTOR", "blur[:std=STD]", "gray", "saturate[=GAIN]:<task>")


def _int(where, value, rule, ok=lambda v: v >= 1):
    """value, checked to be an integer satisfying ok."""
    if not isinstance(value, (int, np.integer)) or not ok(value):
        raise ValueError(f"{where}={short_repr(value)} is invalid; allowed: {rule}")
    return int(value)


def _dims(a):
    """a's shape written HxW (for names)."""
    return "x".join(map(str, np.shape(a)))


def _image(name, shape, what="x"):
    """shape, checked to be a per-sample image shape (H, W, C)."""
    if len(shape) != 3:
        raise ValueError(f"{name} takes images (B, H, W, C) but {what} has per-sample shape "
                         f"{tuple(shape)}; allowed: (H, W, C)")
    return tuple(shape)


class _Operator:
    """Shared interface and checks; subclasses define name, output_shape, input_shape, _forward
    and, when linear, _adjoint and _gram (and _pinv where A^+ is better computed directly)."""

    linear = has_pinv = True

    def forward(self, x):
        """A(x), noise-free."""
        self.output_shape(tuple(x.shape[1:]))
        return self._forward(x)

    __call__ = forward

    def measure(self, key, x):
        """A(x) + sigma_y * standard normal noise."""
        y = self.forward(x)
        return y + self.sigma_y * jax.random.normal(key, y.shape, y.dtype)

    def adjoint(self, y):
        """A^T y."""
        return self._linear("_adjoint", y)

    def pinv(self, y):
        """A^+ y."""
        return self._linear("_pinv", y)

    def gram_solve(self, u, r2, s2):
        """A^T (r2 A A^T + s2 I)^+ u for u in y's space."""
        check_values(f"{self.name} gram_solve", "r2 >= 0, s2 >= 0, r2 + s2 > 0",
                     lambda a, b: a >= 0 and b >= 0 and a + b > 0, r2=r2, s2=s2)
        return self._linear("_gram", u, r2, s2)

    def _pinv(self, y):
        return self._gram(y, 1.0, 0.0)

    def check(self, x_shape, y):
        """Raises a one-line ValueError unless y has shape (B, *output_shape(x_shape))."""
        out = self.output_shape(tuple(x_shape))
        if np.ndim(y) != len(out) + 1 or tuple(np.shape(y))[1:] != out:
            want = "(B, " + ", ".join(map(str, out)) + ")"
            raise ValueError(f"{self.name} measurement y has shape {tuple(np.shape(y))} for x of "
                             f"per-sample shape {tuple(x_shape)}; allowed: {want}")

    def _linear(self, method, y, *args):
        """getattr(self, method)(y, *args), once the operator has it and y's shape fits."""
        if not self.linear and method == "_adjoint":
            raise ValueError(f"{self.name} is nonlinear: it has no adjoint; use its vjp "
                             "(jax.vjp of forward) instead")
        if not self.has_pinv and method != "_adjoint":
            raise ValueError(f"{self.name} has no pseudo-inverse: solvers needing A^+ (DDNM, "
                             "PiGDM) cannot use it; allowed: a linear operator")
        self.check(self.input_shape(tuple(np.shape(y))[1:]), y)
        return getattr(self, method)(y, *args)

    def _check_sigma(self):
        for f in ("mask", "kernel", "matrix"):  # a list would be a pytree leaf per number
            if isinstance(getattr(self, f, None), (list, tuple)):
                object.__setattr__(self, f, np.asarray(getattr(self, f), np.float32))
        # Named by class: `name` may not be computable on a pytree rebuilt around placeholders.
        check_values(type(self).__name__, "sigma_y >= 0", lambda s: s >= 0, sigma_y=self.sigma_y)


@pytree_dataclass(data=("mask", "sigma_y"))
class Inpaint(_Operator):
    """y = mask * x, mask (H, W) or (H, W, C) of 0 (missing) / 1 (observed). An orthogonal
    projector: A^T = A^+ = A, and gram_solve = mask * u / (r2 + s2)."""

    mask: jax.Array
    sigma_y: float = 0.0

    def __post_init__(self):
        self._check_sigma()
        m = self.mask  # numpy masks are checked here; traced or jax ones cannot always be
        if isinstance(m, np.ndarray) and not np.all((m == 0) | (m == 1)):
            raise ValueError(f"Inpaint mask has the value {float(m[(m != 0) & (m != 1)].flat[0])}; "
                             "allowed: 0 (missing) or 1 (observed)")

    name = "inpaint"

    def output_shape(self, x_shape):
        x_shape, m = _image(self.name, x_shape), tuple(np.shape(self.mask))
        if len(m) not in (2, 3) or m[:2] != x_shape[:2] or m[2:] not in ((), (1,), x_shape[2:]):
            raise ValueError(f"Inpaint mask has shape {m} but x has shape {x_shape}; allowed: "
                             "the image shape (H, W) or (H, W, C)")
        return x_shape

    def _forward(self, v):
        m = jnp.asarray(self.mask, v.dtype)
        return v * (m[..., None] if m.ndim == 2 else m)

    def _gram(self, u, r2, s2):
        return self._forward(u) / (r2 + s2)

    input_shape, _adjoint = output_shape, _forward


@pytree_dataclass(data=("sigma_y",))
class Downsample(_Operator):
    """Average pooling by `factor` over H and W (super-resolution): A A^T = I / factor^2, A^T is
    nearest-neighbour upsampling / factor^2 and A^+ = factor^2 A^T."""

    factor: int
    sigma_y: float = 0.0

    def __post_init__(self):
        _int("Downsample factor", self.factor, "an integer >= 1")
        self._check_sigma()

    name = property(lambda self: f"downsample x{self.factor}")

    def output_shape(self, x_shape):
        (h, w, c), f = _image(self.name, x_shape), self.factor
        if h % f or w % f:
            raise ValueError(f"{self.name}: image size {h}x{w} is not divisible by factor={f}; "
                             f"allowed: H and W multiples of {f}")
        return (h // f, w // f, c)

    def input_shape(self, y_shape):
        h, w, c = _image(self.name, y_shape, "y")
        return (h * self.factor, w * self.factor, c)

    def _forward(self, x):
        (b, h, w, c), f = x.shape, self.factor
        return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

    def _adjoint(self, y):
        return jnp.repeat(jnp.repeat(y, self.factor, 1), self.factor, 2) / self.factor**2

    def _gram(self, u, r2, s2):
        return self._adjoint(u) / (r2 / self.factor**2 + s2)


@pytree_dataclass(data=("kernel", "sigma_y"))
class Blur(_Operator):
    """Periodic 2-D convolution of every channel with a square odd-sized kernel (k, k), k <= H, W,
    through the FFT. Frequencies with |H| <= rcond * max|H| count as zero singular values in
    pinv and in gram_solve at s2 = 0 (the default 1e-3 caps the pseudo-inverse's gain at 1000 /
    max|H|; raise it to regularise more). `label` only names the operator."""

    kernel: jax.Array
    sigma_y: float = 0.0
    rcond: float = 1e-3
    label: str = ""

    def __post_init__(self):
        check_values("Blur", "0 <= rcond < 1", lambda r: 0 <= r < 1, rcond=self.rcond)
        self._check_sigma()

    name = property(lambda self: self.label or f"blur {_dims(self.kernel)}")

    def output_shape(self, x_shape):
        (h, w, c), k = _image(self.name, x_shape), tuple(np.shape(self.kernel))
        if len(k) != 2 or k[0] != k[1] or k[0] % 2 == 0 or k[0] > min(h, w):
            raise ValueError(f"Blur kernel has shape {k} for images {h}x{w}; allowed: a square "
                             "(k, k) with k odd, k <= H and k <= W")
        return (h, w, c)

    def _filter(self, v, fn=lambda t: t):
        """v times fn(H) in frequency; H = rfft2 of the kernel padded to (H, W), centred at 0."""
        k, hw = np.shape(self.kernel)[0], v.shape[1:3]
        pad = jnp.zeros(hw, v.dtype).at[:k, :k].set(jnp.asarray(self.kernel, v.dtype))
        t = jnp.fft.rfft2(jnp.roll(pad, (-(k // 2), -(k // 2)), axis=(0, 1)))[..., None]
        spec = jnp.fft.rfft2(v, axes=(1, 2)) * fn(t)
        return jnp.fft.irfft2(spec, s=hw, axes=(1, 2)).astype(v.dtype)

    def _adjoint(self, y):
        return self._filter(y, jnp.conj)

    def _gram(self, u, r2, s2):
        def fn(t):
            mag = jnp.abs(t)
            # s2 > 0 makes every frequency invertible; at s2 = 0 this is the truncated A^+ / r2.
            keep = (mag > self.rcond * jnp.max(mag)) | (s2 > 0)
            return jnp.where(keep, jnp.conj(t) / jnp.where(keep, r2 * mag**2 + s2, 1.0), 0.0)
        return self._filter(u, fn)

    input_shape, _forward = output_shape, _filter


@pytree_dataclass(data=("matrix", "sigma_y"))
class ChannelMix(_Operator):
    """Per-pixel channel map y[..., o] = sum_i matrix[o, i] x[..., i], matrix (C_out, C_in).
    A^+ uses jnp.linalg.pinv's default cutoff. `label` only names the operator."""

    matrix: jax.Array
    sigma_y: float = 0.0
    label: str = ""

    _form, _ndim = "(H, W, {})", 3  # x's per-sample shape, formatted with C_in
    name = property(lambda self: self.label or f"channel mix {_dims(self.matrix)}")
    __post_init__ = _Operator._check_sigma

    def output_shape(self, x_shape):
        ms, x_shape = tuple(np.shape(self.matrix)), tuple(x_shape)
        if len(ms) != 2 or len(x_shape) != self._ndim or x_shape[-1:] != ms[1:]:
            raise ValueError(f"{self.name}: x has per-sample shape {x_shape} for a matrix of "
                             f"shape {ms}; allowed: {self._form.format(ms[-1])}, a 2-D matrix")
        return (*x_shape[:-1], ms[0])

    def input_shape(self, y_shape):
        return (*tuple(y_shape)[:-1], np.shape(self.matrix)[1])

    def _forward(self, x):
        return x @ jnp.asarray(self.matrix, x.dtype).T

    def _adjoint(self, y):
        return y @ jnp.asarray(self.matrix, y.dtype)

    def _pinv(self, y):
        return y @ jnp.linalg.pinv(jnp.asarray(self.matrix, y.dtype)).T

    def _gram(self, u, r2, s2):
        m = jnp.asarray(self.matrix, u.dtype)
        eye = jnp.eye(m.shape[0], dtype=u.dtype)
        return u @ (m.T @ jnp.linalg.pinv(r2 * m @ m.T + s2 * eye, hermitian=True)).T


@pytree_dataclass(data=("matrix", "sigma_y"))
class Matrix(ChannelMix):
    """Vectors x (B, d) -> y = x @ A^T, A (m, d): a dense operator for closed-form tests (a
    ChannelMix without spatial axes)."""

    _form, _ndim = "({},)", 1
    A = property(lambda self: self.matrix)
    name = property(lambda self: f"matrix {_dims(self.matrix)}")


@pytree_dataclass(data=("inner", "gain", "sigma_y"))
class Saturate(_Operator):
    """Nonlinear saturating sensor y = tanh(gain * inner(x)) / gain around a linear operator
    (the identity for small signals, bounded by 1/gain). Its own sigma_y is the measurement
    noise; the inner operator's is ignored."""

    inner: _Operator
    gain: float = 1.0
    sigma_y: float = 0.0

    linear = has_pinv = False

    def __post_init__(self):
        if not (isinstance(self.inner, _Operator) and self.inner.linear):
            raise ValueError(f"Saturate inner={short_repr(self.inner)} is invalid; allowed: a "
                             "linear operator (Inpaint, Downsample, Blur, ChannelMix, Matrix)")
        check_values("Saturate", "gain > 0", lambda g: g > 0, gain=self.gain)
        self._check_sigma()

    name = property(lambda self: f"saturate {self.inner.name} gain "
                                 f"{concrete_float(self.gain) or '?'}")
    output_shape = property(lambda self: self.inner.output_shape)
    input_shape = property(lambda self: self.inner.input_shape)

    def _forward(self, x):
        return jnp.tanh(self.gain * self.inner.forward(x)) / self.gain


def _size(where, size):
    """(H, W) as positive ints."""
    rule = "(H, W), positive integers"
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise ValueError(f"{where} size={short_repr(size)} is invalid; allowed: {rule}")
    return tuple(_int(f"{where} size", s, rule) for s in size)


def box_mask(size, box=None):
    """(H, W) mask, 0 inside the missing box=(top, left, height, width); the default box is
    centred, half of each side."""
    h, w = _size("box_mask", size)
    box = tuple(box) if box is not None else ((h - h // 2) // 2, (w - w // 2) // 2, h // 2, w // 2)
    top, left, bh, bw = box if len(box) == 4 else (-1, -1, 0, 0)
    if not (0 <= top and 0 <= left and bh >= 1 and bw >= 1 and top + bh <= h and left + bw <= w):
        raise ValueError(f"box_mask box={box} does not fit size {(h, w)}; allowed: (top, left, "
                         "height, width) with top, left >= 0, height, width >= 1 inside (H, W)")
    mask = np.ones((h, w), np.float32)
    mask[top: top + bh, left: left + bw] = 0.0
    return mask


def random_mask(key, size, keep):
    """(H, W) mask observing max(1, round(keep * H * W)) pixels drawn without replacement."""
    h, w = _size("random_mask", size)
    check_values("random_mask", "0 < keep <= 1", lambda k: 0 < k <= 1, keep=keep)
    idx = jax.random.permutation(key, h * w)[: max(1, round(keep * h * w))]
    return jnp.zeros(h * w, jnp.float32).at[idx].set(1.0).reshape(h, w)


def half_mask(size, side="right"):
    """(H, W) mask whose `side` half (left, right, top or bottom) is missing."""
    h, w = _size("half_mask", size)
    boxes = {"left": (0, 0, h, w // 2), "right": (0, w - w // 2, h, w // 2),
             "top": (0, 0, h // 2, w), "bottom": (h - h // 2, 0, h // 2, w)}
    if side not in boxes:
        raise ValueError(f"half_mask side={side!r} is unknown; allowed: {', '.join(boxes)}")
    return box_mask((h, w), boxes[side])


def gaussian_kernel(size, std):
    """Normalised (size, size) Gaussian kernel, size odd."""
    _int("gaussian_kernel size", size, "an odd integer >= 1", lambda v: v >= 1 and v % 2)
    check_values("gaussian_kernel", "std > 0", lambda s: s > 0, std=std)
    g = np.exp(-0.5 * ((np.arange(size) - size // 2) / std) ** 2)
    return (np.outer(g, g) / np.outer(g, g).sum()).astype(np.float32)


def grayscale(channels=3, sigma_y=0.0):
    """ChannelMix averaging `channels` channels into one (colourisation's measurement)."""
    _int("grayscale channels", channels, "an integer >= 1")
    return ChannelMix(np.full((1, channels), 1.0 / channels, np.float32), sigma_y, "grayscale")


def _number(task, text, kind):
    """text as a kind (int or float), or the one-line error naming the task."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"Task {task!r} has the bad number {text!r}; allowed forms: "
                         f"{', '.join(TASKS)}") from None


def parse_task(task, size, channels, *, key=None, sigma_y=0.0):
    """Operator for a CLI task string (forms in TASKS) on images (size[0], size[1], channels).

    inpaint:random keeps 30% of the pixels (needs key); blur is Gaussian with std 1.0 unless
    given, kernel size 2 * ceil(2 std) + 1 (5x5 for std 1); saturate[=GAIN] wraps the task after
    its colon (gain 1.0 unless given). sigma_y goes to the outermost operator."""
    head, _, rest = str(task).partition(":")
    if head.partition("=")[0] == "saturate" and rest:
        gain = _number(task, head[9:], float) if head[8:9] == "=" else 1.0
        return Saturate(parse_task(rest, size, channels, key=key), gain, sigma_y)
    if head == "inpaint" and (rest in ("box", "half") or rest.startswith("half-")):
        side = rest[5:] if rest.startswith("half-") else "right"
        op = Inpaint(box_mask(size) if rest == "box" else half_mask(size, side), sigma_y)
    elif head == "inpaint" and rest.partition("=")[0] == "random":
        if key is None:
            raise ValueError(f"Task {task!r} draws a random mask; allowed: pass key=PRNGKey")
        keep = _number(task, rest[7:], float) if rest[6:7] == "=" else 0.3
        op = Inpaint(random_mask(key, size, keep), sigma_y)
    elif head == "sr" and rest:
        op = Downsample(_number(task, rest, int), sigma_y)
    elif head == "blur" and (not rest or rest.startswith("std=")):
        std = _number(task, rest[4:], float) if rest else 1.0
        check_values(f"Task {task!r}", "std > 0", lambda s: s > 0, std=std)
        k = 2 * math.ceil(2 * std) + 1
        op = Blur(gaussian_kernel(k, std), sigma_y, label=f"blur {k}x{k} std {std}")
    elif head == "gray" and not rest:
        op = grayscale(3, sigma_y)  # colourisation: RGB only (checked below)
    else:
        raise ValueError(f"Unknown inverse task {task!r}; allowed: {', '.join(TASKS)}")
    op.output_shape((*_size("parse_task", size), channels))
    return op
