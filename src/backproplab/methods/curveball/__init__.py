"""CurveBall: a minimal Newton solver interleaved with the weight updates.

Henriques, Ehrhardt, Albanie, Vedaldi, "Small steps and giant leaps: Minimal Newton solvers for Deep
Learning", ICCV 2019 (arXiv 1805.08095), Algorithm 1 and Sections 3-4. Implemented from the equations.

Three modules: ``output_hessians`` (losses with closed-form J_L and H_L v), ``tangent_replay`` (J v on a
recorded forward, one registered rule per layer type) and ``optimizer`` (the step below).

Curvature: the damped generalised Gauss-Newton matrix H = J^T H_L J + lambda I, with J = d outputs / d w
and H_L the Hessian of the loss w.r.t. the outputs. One buffer z (like momentum). Each step::

    dz  = J^T (H_L J z + J_L) + lambda z          (J_L = dL/d outputs; dz = H z + g)
    z   <- rho z - beta dz
    w   <- w + z

J z is one forward-mode product, H_L (J z) is closed-form in output space, and ONE reverse pass with
cotangent H_L J z + J_L yields gradient and GGN product together. For a chain of standard layers the
forward-mode products are replayed on the step's one recorded forward (``tangent_replay``) instead
of recomputing the forward with each tangent; any other model gets true forward-mode AD passes.

The step sizes come from minimising the quadratic model M(dw) = g^T dw + 1/2 dw^T H dw over
dw = rho z - beta dz (paper eq. 13-14)::

    [beta, -rho] = A^-1 b,  A = [[dz^T H dz, z^T H dz], [z^T H dz, z^T H z]],  b = [g^T dz, g^T z]

evaluated in output space from a second forward-mode product J dz (a11 = lambda|dz|^2 + (J dz)^T H_L (J dz),
a12 = lambda dz.z + (J z)^T H_L (J dz), a22 = lambda|z|^2 + (J z)^T H_L (J z), b1 = J_L.(J dz), b2 = J_L.(J z)).
With z = 0 (the first step) A is singular and the solution reduces to the exact line search along -g:
rho = 0, beta = g^T g / g^T H g.

Levenberg-Marquardt damping (paper Sec. 4, defaults from the paper): on steps 0, k, 2k, ... (k =
``lambda_interval``, the authors' ``count % k == 0``) the loss is re-evaluated on the same batch;
gamma = (L(w + z) - L(w)) / M(x) with M(x) = -b^T x + 1/2 x^T A x the quadratic model's change for the
step actually taken (x = [beta, -rho]; at the 2x2 minimiser this is -1/2 x^T b, the authors' form, but a
fixed lr or momentum takes a step off the minimiser); gamma < ``lambda_low`` gives
lambda <- lambda / factor^interval, gamma > ``lambda_high`` gives lambda <- lambda * factor^interval.
"""
from .optimizer import CurveBall, NonFiniteCurveBallError, curveball_from_config, curveball_step
from .output_hessians import CrossEntropy, MeanSquaredError
from .tangent_replay import TANGENT_RULES, NoReplay, TangentRule, TangentTape, register_tangent_rule

__all__ = ["CurveBall", "CrossEntropy", "MeanSquaredError", "NonFiniteCurveBallError", "curveball_step",
           "curveball_from_config", "TANGENT_RULES", "TangentRule", "TangentTape", "NoReplay", "register_tangent_rule"]
