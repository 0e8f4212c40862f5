"""No silently wrong result from the Python API: each bad argument stops with one short line that
names the offending value or argument (issue 10, item 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.core import guidance, schedules
from jaxdiff.core.process import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear

X = jnp.zeros((2, 3))
Y, Y_NULL = jnp.array([1, 2]), jnp.array([0])


def _net(x, t, *labels):
    return x


def _sample(**kw):
    args = dict(process=EDM(), prediction="x0", sampler="ddim", steps=4) | kw
    noise = args.pop("noise", X)
    return lambda: jaxdiff.sample(_net, noise, **args)


def _cfg(**kw):
    return lambda: guidance.CFG(**(dict(scale=2.0, y=Y, y_null=Y_NULL) | kw))


# (call, exception type, text the message contains: the offending value or argument)
ROWS = [
    pytest.param(_sample(noise=jnp.ones((2, 3), jnp.int32)), TypeError,
                 "must be a float array", id="integer-noise"),
    pytest.param(lambda: EDM(sigma_data=-1.0), ValueError, "sigma_data=-1.0", id="edm-sigma-data"),
    pytest.param(lambda: EDM(sigma_data=0.0), ValueError, "sigma_data > 0", id="edm-sigma-data-0"),
    pytest.param(lambda: EDM(t_min=80.0, t_max=1.0), ValueError, "t_min=80.0, t_max=1.0",
                 id="edm-times-swapped"),
    pytest.param(lambda: DiscreteVP.linear(beta_end=1.0), ValueError, "beta_end=1.0",
                 id="discrete-beta-end-1"),
    pytest.param(lambda: DiscreteVP.linear(beta_start=0.02, beta_end=0.01), ValueError,
                 "beta_start <= beta_end", id="discrete-betas-swapped"),
    pytest.param(lambda: DiscreteVP.scaled_linear(beta_start=-1e-4), ValueError,
                 "beta_start=-0.0001", id="discrete-beta-negative"),
    pytest.param(lambda: DiscreteVP(np.array([0.9, 0.95, 0.5])), ValueError,
                 "alphas_cumprod[1]=0.95", id="discrete-alphas-increasing"),
    pytest.param(lambda: RectifiedFlow(t_max=1.0), ValueError, "t_max=1.0", id="flow-t-max-1"),
    pytest.param(lambda: VPCosine(t_max=1.0), ValueError, "t_max < 1", id="cosine-t-max-1"),
    pytest.param(lambda: VE(sigma_lo=50.0, sigma_hi=0.01), ValueError, "sigma_lo=50.0",
                 id="ve-sigmas-swapped"),
    pytest.param(lambda: VPLinear(beta_min=-1.0), ValueError, "beta_min=-1.0",
                 id="vp-beta-negative"),
    pytest.param(_sample(schedule=lambda p, n: jnp.linspace(0, 80, n + 1)), ValueError,
                 "sigmas[0]=0 <= sigmas[1]=20", id="schedule-increasing"),
    pytest.param(_sample(schedule=lambda p, n: jnp.full(n + 1, jnp.nan)), ValueError,
                 "sigmas[0]=nan", id="schedule-nan"),
    pytest.param(_sample(schedule="shift", steps=10), ValueError, "shift=3",
                 id="shift-repeats-levels"),
    pytest.param(_sample(schedule=lambda p, n: schedules.karras(p, n, rho=0.0)), ValueError,
                 "rho=0.0", id="karras-rho-0"),
    pytest.param(_cfg(scale=float("nan")), ValueError, "scale=nan", id="cfg-nan-scale"),
    pytest.param(_cfg(rescale=2.0), ValueError, "rescale=2.0", id="cfg-rescale"),
    pytest.param(_cfg(interval=(5.0, 1.0)), ValueError, "interval=(5.0, 1.0)", id="cfg-interval"),
    pytest.param(lambda: guidance.AdaptiveCFG(2.0, Y, Y_NULL, sigma_stop=float("nan")),
                 ValueError, "sigma_stop=nan", id="adaptive-nan-stop"),
    pytest.param(lambda: guidance.DynamicThreshold(percentile=1.5), ValueError,
                 "percentile=1.5", id="threshold-percentile"),
    pytest.param(lambda: guidance.ClassifierGuidance(lambda x, s: x, scale=float("inf")),
                 ValueError, "scale=inf", id="classifier-inf-scale"),
    pytest.param(_sample(guidance=2.0), TypeError,
                 "guidance.CFG(scale=2.0, y=labels, y_null=null_labels)", id="guidance-number"),
    pytest.param(_sample(guidance=guidance.CFG(2.0, jnp.array([1, 2, 3]), Y_NULL)), ValueError,
                 "y has shape (3,) but the noise has batch 2", id="cfg-y-batch"),
    pytest.param(_sample(guidance=guidance.CFG(2.0, Y, jnp.array([0, 0, 0]))), ValueError,
                 "y_null has shape (3,)", id="cfg-y-null-batch"),
    pytest.param(_sample(process="edm"), TypeError, "process='edm' is not a process",
                 id="process-string"),
    pytest.param(_sample(process=VPLinear(), prediction="edm"), ValueError,
                 "prediction='edm' needs a process with sigma_data", id="edm-prediction-on-vp"),
    pytest.param(_sample(process=DiscreteVP.linear(), prediction="eps", steps=2000), ValueError,
                 "steps=2000 exceeds the 1000 training timesteps", id="steps-over-timesteps"),
    pytest.param(_sample(steps=True), ValueError, "steps=True", id="steps-bool"),
    pytest.param(_sample(capacity=10.5), ValueError, "capacity=10.5", id="capacity-float"),
    pytest.param(lambda: schedules.timesteps(DiscreteVP.linear(), [1500, 1200, 999]), ValueError,
                 "training timesteps 0..999", id="timesteps-out-of-range"),
]


@pytest.mark.parametrize("call,kind,text", ROWS)
def test_bad_argument_is_one_short_line(call, kind, text):
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert type(info.value) is kind
    assert "\n" not in message
    assert len(message) < 300, message
    assert text in message, message


@pytest.mark.parametrize("call", [
    _sample(process=DiscreteVP.linear(), prediction="eps", steps=10**6),
    lambda: schedules.timesteps(DiscreteVP.linear(), np.repeat(np.arange(999.0, 0, -1), 1000)),
    lambda: schedules.array(np.r_[np.linspace(80, 1, 10**6), np.inf]),
], ids=["sample", "timesteps", "array"])
def test_million_step_message_is_short(call):
    """A million-level grid or step count once printed every value (a 6.9 MB line)."""
    with pytest.raises(ValueError) as info:
        call()
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


def test_traced_and_placeholder_fields_are_not_checked():
    """Processes and guidance objects are pytrees: jit, gradients and tree utilities rebuild them
    with tracers, jax arrays or placeholders, which must pass."""
    p = DiscreteVP.linear()
    assert jax.jit(lambda a: DiscreteVP(a).sigma_max)(jnp.asarray(p.alphas_cumprod)) > 1
    jax.tree.unflatten(jax.tree.structure(p), [None])
    jax.tree.map(jnp.zeros_like, p)
    grad = jax.grad(lambda g: g.scale * 0.0, allow_int=True)(guidance.CFG(2.0, Y, Y_NULL))
    assert float(grad.scale) == 0.0
    assert jax.jit(lambda s: guidance.CFG(s, Y, Y_NULL).scale)(jnp.nan).dtype == jnp.float32


def test_good_values_still_pass():
    EDM(sigma_data=1.0, t_min=0.01, t_max=20.0)
    VE(t_min=0.0)
    VPLinear(beta_min=0.0, beta_max=1.0, t_min=1e-5, time_scale=999.0)
    DiscreteVP.cosine()
    guidance.CFG(2.0, Y, Y_NULL, interval=(0.5, float("inf")))
    guidance.AdaptiveCFG(2.0, Y, Y_NULL, sigma_stop=float("inf"))
    g = guidance.CFG(2.0, Y, jnp.array(0))  # one null label broadcasts over the batch
    x = jaxdiff.sample(_net, X, process=EDM(), prediction="x0", sampler="ddim", steps=3,
                       guidance=guidance.Chain((g, guidance.DynamicThreshold())))
    assert x.shape == X.shape
