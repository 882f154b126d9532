"""Latent ODE vs RNN on noisy 2-D spirals: Chen et al. 2018, section 5.1 and Table 2.

What is here (the driver, profiles and report are in :mod:`nodebench.experiments.latent`):

* the data: :func:`make_spirals` draws noisy Archimedean spirals on a regular grid of
  ``n_window`` observation steps followed by ``n_extrap`` extrapolation steps, half of them
  clockwise; :func:`observe` keeps ``n`` of the window's points per spiral, drawn at random
  without replacement and sorted in time;
* the latent ODE (:class:`LatentODE`): a recognition RNN run backwards in time over the
  observations (:class:`RecognitionRNN`) gives q(z0) = N(mean, diag(exp(logvar))); z(t) solves
  dz/dt = f(z) (:class:`LatentDynamics`, a :class:`~nodebench.models.blocks.Dynamics`, so
  :class:`~nodebench.instruments.NFECounter` counts its evaluations) through
  :func:`nodebench.solvers.odesolve`; a decoder maps z(t) to the data space;
* the baselines (:class:`RNNBaseline`): an RNN trained on the Gaussian negative log-likelihood of
  the next observation, with or without the time gap as an extra input;
* the loss terms (:func:`gaussian_log_likelihood`, :func:`kl_standard_normal`,
  :func:`gaussian_nll`) and the metric (:func:`rmse`).

Times: the grid is ``t_k = k * dt`` (k = 0 .. n_window + n_extrap - 1); the observation window is
``[0, n_window * dt)`` and z0 is the latent state at t = 0, the start of the window, whatever the
first observed time is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .models.blocks import Dynamics
from .solvers import Gradient, Solver, odesolve

LOG_2PI = math.log(2 * math.pi)
CELLS = ("gru", "elman")
MODELS = ("rnn", "rnn_dt", "latent_ode")
FAMILIES = ("two_spirals", "independent")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpiralConfig:
    """The spiral data set. Defaults: the sizes of the paper (1000 spirals, 100 window steps, 100
    extrapolation steps) and nodebench's choices for what it leaves open: noise std 0.1, half a
    turn per window (so half a turn more to extrapolate), start radius 0.5 to 1.5, radius
    growth 0.1 per radian, 800 train / 200 test.

    Each spiral is ``r(t) = r0 + growth * omega * t``, ``phi(t) = phi0 + s * omega * t``
    (an Archimedean spiral, r = r0 + growth * angle turned) with ``s = +1`` (counter-clockwise)
    or ``-1`` (clockwise), ``omega = 2 pi turns / (n_window * dt)``, ``r0 ~ U[r_min, r_max]``;
    the points are ``r (cos phi, sin phi)`` plus N(0, noise^2) on each coordinate,
    independently at each grid point. ``family`` says how ``phi0`` relates to ``r0``:

    * ``"independent"`` (the default): ``phi0 ~ U[0, 2 pi)`` independently of ``r0`` (a
      two-parameter family): no spiral's continuation is another's window;
    * ``"two_spirals"`` (closer to the paper's data, section 5.1: "each starting at a different
      point" of a clockwise and a counter-clockwise spiral, as in its authors' example): every
      spiral is a stretch of one of two fixed curves, r = r_min + growth * theta with
      phi = +theta (counter-clockwise) or phi = -theta (clockwise), starting at the point where
      r = r0, so ``phi0 = s * (r0 - r_min) / growth``; one number and the direction fix a
      spiral, and the continuation of one spiral is the window of spirals further out.

    Raises ValueError for a bad size, rate or family (``two_spirals`` needs ``growth > 0``).
    """

    n_spirals: int = 1000
    n_window: int = 100
    n_extrap: int = 100
    dt: float = 0.05
    turns: float = 0.5
    r_min: float = 0.5
    r_max: float = 1.5
    growth: float = 0.1
    noise: float = 0.1
    n_train: int = 800
    family: str = "independent"

    def __post_init__(self) -> None:
        for name in ("n_spirals", "n_window", "n_extrap", "n_train"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"spirals.{name} must be a positive integer, got {value!r}")
        if self.n_train >= self.n_spirals:
            raise ValueError(f"spirals.n_train ({self.n_train}) must be below n_spirals "
                             f"({self.n_spirals}): the rest is the test set")
        for name in ("dt", "turns", "r_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"spirals.{name} must be positive, got {getattr(self, name)!r}")
        if not (0 <= self.r_min <= self.r_max) or self.growth < 0 or self.noise < 0:
            raise ValueError("spirals: need 0 <= r_min <= r_max, growth >= 0, noise >= 0")
        if self.family not in FAMILIES:
            raise ValueError(f"spirals.family must be one of {', '.join(FAMILIES)}, "
                             f"got {self.family!r}")
        if self.family == "two_spirals" and not self.growth > 0:
            raise ValueError("spirals.family two_spirals needs growth > 0 (the start angle is "
                             "(r0 - r_min) / growth)")

    @property
    def omega(self) -> float:
        """Angular speed (rad per time unit)."""
        return 2 * math.pi * self.turns / (self.n_window * self.dt)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Spirals:
    """A drawn data set. ``t`` (T,), ``clean`` and ``noisy`` (N, T, 2), ``direction`` (N,) with
    +1 counter-clockwise / -1 clockwise, ``r0`` and ``phi0`` (N,). T = n_window + n_extrap; the
    first ``n_train`` spirals are the training set, the rest the test set."""

    config: SpiralConfig
    t: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor
    direction: torch.Tensor
    r0: torch.Tensor
    phi0: torch.Tensor

    @property
    def train(self) -> slice:
        return slice(0, self.config.n_train)

    @property
    def test(self) -> slice:
        return slice(self.config.n_train, self.config.n_spirals)

    @property
    def window(self) -> slice:
        return slice(0, self.config.n_window)

    @property
    def extrap(self) -> slice:
        return slice(self.config.n_window, self.config.n_window + self.config.n_extrap)


def make_spirals(config: SpiralConfig, seed: int) -> Spirals:
    """Draw the data set from a generator seeded with ``seed`` (the same seed, the same spirals;
    ``config.family`` chooses how start angle and radius relate, see :class:`SpiralConfig`).

    Exactly half (floor) of the spirals turn clockwise, in a random order, so that the train/test
    split holds both kinds. Computed in float64, returned as float32.
    """
    c = config
    gen = torch.Generator().manual_seed(int(seed))
    n, steps = c.n_spirals, c.n_window + c.n_extrap
    t = torch.arange(steps, dtype=torch.float64) * c.dt
    direction = torch.ones(n, dtype=torch.float64)
    direction[: n // 2] = -1.0
    direction = direction[torch.randperm(n, generator=gen)]
    phi0 = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    r0 = c.r_min + (c.r_max - c.r_min) * torch.rand(n, generator=gen, dtype=torch.float64)
    if c.family == "two_spirals":    # the same draws, so the noise is the same in both families
        phi0 = direction * (r0 - c.r_min) / c.growth
    phi = phi0[:, None] + direction[:, None] * c.omega * t
    r = r0[:, None] + c.growth * c.omega * t
    clean = torch.stack([r * torch.cos(phi), r * torch.sin(phi)], dim=-1)
    noisy = clean + c.noise * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    f32 = torch.float32
    return Spirals(c, t.to(f32), clean.to(f32), noisy.to(f32), direction.to(f32), r0.to(f32),
                   phi0.to(f32))


@dataclass
class Observed:
    """The ``n`` observations per spiral: grid indices ``idx`` (N, n), sorted; their times ``t``
    (N, n) and noisy values ``x`` (N, n, 2)."""

    idx: torch.Tensor
    t: torch.Tensor
    x: torch.Tensor

    def __getitem__(self, rows) -> Observed:
        return Observed(self.idx[rows], self.t[rows], self.x[rows])

    def to(self, device: torch.device) -> Observed:
        return Observed(self.idx.to(device), self.t.to(device), self.x.to(device))


def subsample(count: int, window: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(count, n) grid indices: per row, ``n`` of ``0 .. window - 1`` drawn without replacement
    (a random permutation's first n), sorted ascending."""
    if not 1 <= n <= window:
        raise ValueError(f"n must be in 1..{window}, got {n}")
    rows = [torch.randperm(window, generator=generator)[:n] for _ in range(count)]
    return torch.stack(rows).sort(dim=1).values


def observe(spirals: Spirals, n: int, seed: int) -> Observed:
    """Keep ``n`` random window points per spiral (seeded by ``seed`` and ``n``: every model of a
    (seed, n) pair sees the same observations)."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(n))
    idx = subsample(spirals.config.n_spirals, spirals.config.n_window, n, gen)
    x = torch.gather(spirals.noisy, 1, idx[..., None].expand(-1, -1, 2))
    return Observed(idx, spirals.t[idx], x)


@dataclass
class SpiralData:
    """The spirals and the ``n`` observations per spiral that a run sees (the data of
    :class:`nodebench.tasks.LatentSequence`)."""

    spirals: Spirals
    obs: Observed

    def to(self, device: torch.device) -> SpiralData:
        s = self.spirals
        moved = Spirals(s.config, *(getattr(s, k).to(device) for k in
                                    ("t", "clean", "noisy", "direction", "r0", "phi0")))
        return SpiralData(moved, self.obs.to(device))


def spiral_dataset(n_obs: int = 30, seed: int = 0, **config: Any) -> SpiralData:
    """``conf/dataset/spirals.yaml``: the spirals of :class:`SpiralConfig` (keyword arguments
    ``config``; the paper's sizes by default) drawn with ``seed`` and ``n_obs`` observations per
    spiral (:func:`observe`, seeded by ``seed`` and ``n_obs``). Raises ConfigError for a bad
    size (``n_obs`` outside 2 .. n_window, a non-positive count, ...)."""
    from .errors import ConfigError

    config.pop("name", None)
    try:
        c = SpiralConfig(**config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid spirals dataset: {exc}") from None
    if not isinstance(n_obs, int) or not 2 <= n_obs <= c.n_window:
        raise ConfigError(f"dataset.n_obs must be in 2..{c.n_window} (observations out of the "
                          f"window; the RNNs need 2 to predict one), got {n_obs!r}")
    spirals = make_spirals(c, seed)
    return SpiralData(spirals, observe(spirals, n_obs, seed))


# ---------------------------------------------------------------------------------------------
# Loss terms and metric
# ---------------------------------------------------------------------------------------------

def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Elementwise log N(x; mean, std^2) with a fixed ``std``."""
    z = (x - mean) / std
    return -0.5 * LOG_2PI - math.log(std) - 0.5 * z * z


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise -log N(x; mean, exp(logvar)) (the RNN baselines' loss)."""
    return 0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) in closed form, summed over the last dim:
    0.5 * sum(mean^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mean ** 2 + torch.exp(logvar) - 1.0 - logvar).sum(-1)


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Root mean squared error, pooled: sqrt of the mean of (pred - target)^2 over every element,
    i.e. over all spirals, all time points and both coordinates together (not a mean of
    per-spiral RMSEs). This is the usual reading of the paper's "predictive RMSE on the test
    set". Shapes must match, e.g. (spirals, points, 2)."""
    if pred.shape != target.shape:
        raise ValueError(f"rmse: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    return float(torch.sqrt(torch.mean((pred.detach().double() - target.double()) ** 2)))


def extrapolation_breakdown(pred: torch.Tensor, target: torch.Tensor, direction: torch.Tensor,
                            threshold: float) -> dict:
    """Where a model's extrapolation error comes from: the pooled RMSE (:func:`rmse`) hides
    whether every spiral is a little off or a few are far off.

    ``pred``, ``target`` (spirals, points, 2); ``direction`` (spirals,): -1 clockwise, +1
    counter-clockwise (:class:`Spirals`). Returns ``test_rmse_median`` (median over spirals of the
    per-spiral RMSE), ``test_rmse_cw`` / ``test_rmse_ccw`` (pooled RMSE of the clockwise /
    counter-clockwise spirals; None when there is none) and ``test_failed_share`` (share of
    spirals whose RMSE exceeds ``threshold``, e.g. 3x the noise std). Raises ValueError when the
    shapes differ."""
    if pred.shape != target.shape or pred.shape[0] != direction.shape[0]:
        raise ValueError(f"extrapolation_breakdown: shapes {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}, {tuple(direction.shape)} do not match")
    sq = (pred.detach().double() - target.double()) ** 2
    per = sq.mean(dim=(1, 2)).sqrt()

    def pooled(mask: torch.Tensor) -> float | None:
        return rmse(pred[mask], target[mask]) if bool(mask.any()) else None

    return {"test_rmse_median": float(per.median()), "test_rmse_cw": pooled(direction < 0),
            "test_rmse_ccw": pooled(direction > 0),
            "test_failed_share": float((per > threshold).double().mean())}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def _recurrent(cell: str, inputs: int, hidden: int) -> nn.Module:
    """A one-layer batch-first recurrent net: ``gru`` (nn.GRU) or ``elman`` (nn.RNN, tanh)."""
    if cell == "gru":
        return nn.GRU(inputs, hidden, batch_first=True)
    if cell == "elman":
        return nn.RNN(inputs, hidden, nonlinearity="tanh", batch_first=True)
    raise ValueError(f"unknown RNN cell {cell!r}; choose one of: {', '.join(CELLS)}")


def gaps_since_previous(t: torch.Tensor) -> torch.Tensor:
    """(B, n) times -> (B, n) gaps t_i - t_{i-1}, with t_0 = 0 (the window start)."""
    return t - torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1)


class RecognitionRNN(nn.Module):
    """q(z0 | observations): an RNN run backwards in time over (x_i, t_i - t_{i-1}), t_0 = 0, so
    that the step that reads x_1 also reads how far x_1 lies from the window start, where z0
    lives. A linear read-out of the last hidden state gives the mean and log-variance of z0."""

    def __init__(self, latent: int = 4, hidden: int = 25, obs_dim: int = 2,
                 cell: str = "gru") -> None:
        super().__init__()
        self.rnn = _recurrent(cell, obs_dim + 1, hidden)
        self.out = nn.Linear(hidden, 2 * latent)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.cat([x, gaps_since_previous(t)[..., None]], dim=-1).flip(1)
        _, h = self.rnn(seq)
        mean, logvar = self.out(h[-1]).chunk(2, dim=-1)
        return mean, logvar


class LatentDynamics(Dynamics):
    """dz/dt = f(z): an MLP latent -> hidden (x ``layers``) -> latent (ELU), autonomous (t is
    not an input). ``layers=1``: the paper's one hidden layer of 20 (section 5.1);
    ``layers=2``: torchdiffeq's ``examples/latent_ode.py`` (4-20-20-4). Raises ValueError for
    ``layers`` < 1."""

    def __init__(self, latent: int = 4, hidden: int = 20, layers: int = 1) -> None:
        super().__init__()
        if int(layers) < 1:
            raise ValueError(f"model.dyn_layers must be at least 1, got {layers}")
        mods: list[nn.Module] = [nn.Linear(latent, hidden), nn.ELU()]
        for _ in range(int(layers) - 1):
            mods += [nn.Linear(hidden, hidden), nn.ELU()]
        self.net = nn.Sequential(*mods, nn.Linear(hidden, latent))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Decoder(nn.Module):
    """z(t) -> mean of x(t): an MLP latent -> hidden -> obs_dim (ELU)."""

    def __init__(self, latent: int = 4, hidden: int = 20, obs_dim: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.ELU(), nn.Linear(hidden, obs_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class LatentODE(nn.Module):
    """The latent ODE of Chen et al. 2018 (section 5): encoder, dynamics, decoder.

    Every spiral has its own observation times, but all of them lie on the data's regular grid,
    so the latent trajectories of a batch are solved once on the grid (one ``odesolve`` for the
    whole batch: the solver's step control sees all spirals) and each spiral's observed points
    are gathered from it; this is exact, needs no union of times, and the extrapolation is the
    same solve continued over the rest of the grid.

    ``solver`` and ``gradient`` are read at every solve: the gradient-error reference rewires
    them (:func:`nodebench.validity.solve_modules`).
    """

    def __init__(self, solver: Solver, gradient: Gradient, latent: int = 4, rec_hidden: int = 25,
                 dyn_hidden: int = 20, dec_hidden: int = 20, obs_dim: int = 2,
                 cell: str = "gru", dyn_layers: int = 1) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = RecognitionRNN(latent, rec_hidden, obs_dim, cell)
        self.func = LatentDynamics(latent, dyn_hidden, dyn_layers)
        self.decoder = Decoder(latent, dec_hidden, obs_dim)
        self.solver, self.gradient = solver, gradient

    def trajectory(self, z0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """(B, latent) initial states -> (B, T, latent) latent states on ``grid`` (T,),
        grid[0] = 0."""
        return odesolve(self.func, z0, grid, self.solver, self.gradient).transpose(0, 1)

    def decode_grid(self, x: torch.Tensor, t: torch.Tensor, grid: torch.Tensor,
                    sample: bool, eps: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the observations, draw z0 (reparameterised, z0 = mean + eps * std; the mean
        when ``sample`` is False), solve and decode on ``grid``. ``eps`` (B, latent): the
        standard normal draw to use; None (training): ``torch.randn_like(mean)`` from the global
        RNG. Returns (decoded (B, T, 2), mean, logvar)."""
        mean, logvar = self.encoder(x, t)
        if sample:
            noise = torch.randn_like(mean) if eps is None else eps
            z0 = mean + noise * torch.exp(0.5 * logvar)
        else:
            z0 = mean
        return self.decoder(self.trajectory(z0, grid)), mean, logvar

    def elbo(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, grid: torch.Tensor,
             obs_std: float, eps: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-spiral Gaussian log-likelihood of the observed points (summed over points and
        coordinates; fixed ``obs_std``) and KL(q(z0) || N(0, I)), one reparameterised sample
        (its standard normal draw ``eps`` (B, latent) when given, see :meth:`decode_grid`).
        ELBO = loglik - kl. ``idx`` (B, n) are the observations' grid indices."""
        decoded, mean, logvar = self.decode_grid(x, t, grid, sample=True, eps=eps)
        pred = gather_points(decoded, idx)
        loglik = gaussian_log_likelihood(x, pred, obs_std).sum(dim=(1, 2))
        return loglik, kl_standard_normal(mean, logvar)


def gather_points(traj: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D) values on the grid, (B, n) grid indices -> (B, n, D)."""
    return torch.gather(traj, 1, idx[..., None].expand(-1, -1, traj.shape[-1]))


class RNNBaseline(nn.Module):
    """An RNN that predicts the next observation: a Gaussian with mean and log-variance read
    linearly from the hidden state after each input. ``time_gaps=True`` ("RNN + time gaps"):
    each input also carries the time from this observation to the one to be predicted."""

    def __init__(self, hidden: int = 25, obs_dim: int = 2, time_gaps: bool = False,
                 cell: str = "gru") -> None:
        super().__init__()
        self.time_gaps = time_gaps
        self.rnn = _recurrent(cell, obs_dim + int(time_gaps), hidden)
        self.head = nn.Linear(hidden, 2 * obs_dim)

    def step(self, x: torch.Tensor, gaps: torch.Tensor | None,
             h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, 2), gaps (B, L) (used only with time gaps) -> mean, logvar (B, L, 2), h."""
        inp = torch.cat([x, gaps[..., None]], dim=-1) if self.time_gaps else x
        out, h = self.rnn(inp, h)
        mean, logvar = self.head(out).chunk(2, dim=-1)
        return mean, logvar, h

    def nll(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean over the predicted points (2 .. n of every spiral) of the Gaussian NLL of the
        next observation given the earlier ones (summed over the 2 coordinates)."""
        mean, logvar, _ = self.step(x[:, :-1], t[:, 1:] - t[:, :-1])
        return gaussian_nll(x[:, 1:], mean, logvar).sum(-1).mean()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: torch.Tensor,
                future: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume the observations, then roll forward over the ``future`` times (F,) feeding the
        own mean prediction back (with time gaps: the gap to the next future time, i.e. the
        regular step). Returns the one-step predictions of observations 2 .. n (B, n - 1, 2)
        and the predictions at the future times (B, F, 2)."""
        gaps = torch.cat([t[:, 1:] - t[:, :-1], future[0] - t[:, -1:]], dim=1)
        mean, _, h = self.step(x, gaps)
        out = [mean[:, -1:]]
        for k in range(1, len(future)):
            gap = (future[k] - future[k - 1]).expand(x.shape[0], 1)
            nxt, _, h = self.step(out[-1], gap, h)
            out.append(nxt)
        return mean[:, :-1], torch.cat(out, dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_model(name: str, solver: Solver | None = None, gradient: Gradient | None = None,
                cell: str = "gru", latent: int = 4, rec_hidden: int = 25, dyn_hidden: int = 20,
                dec_hidden: int = 20, rnn_hidden: int = 25, dyn_layers: int = 1) -> nn.Module:
    """``latent_ode``, ``rnn`` or ``rnn_dt`` with the paper's sizes (by default)."""
    if name == "latent_ode":
        if solver is None or gradient is None:
            raise ValueError("latent_ode needs a solver and a gradient mode")
        return LatentODE(solver, gradient, latent, rec_hidden, dyn_hidden, dec_hidden, cell=cell,
                         dyn_layers=dyn_layers)
    if name in ("rnn", "rnn_dt"):
        return RNNBaseline(rnn_hidden, time_gaps=name == "rnn_dt", cell=cell)
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


@torch.no_grad()
def predict(model: nn.Module, spirals: Spirals, obs: Observed, rows: slice | torch.Tensor,
            ) -> dict:
    """Test-time predictions of ``model`` for the spirals ``rows``.

    Returns ``recon`` (predictions at the observed points: the latent ODE's reconstruction of
    all n points from the posterior mean z0; an RNN's one-step predictions of points 2 .. n),
    ``recon_target`` (the noisy observations they predict), ``extrap`` (B, n_extrap, 2: the
    extrapolation window) and, for the latent ODE, ``grid`` (B, T, 2: the decoded trajectory
    over the whole grid).
    """
    o = obs[rows]
    future = spirals.t[spirals.extrap]
    if isinstance(model, LatentODE):
        decoded, _, _ = model.decode_grid(o.x, o.t, spirals.t, sample=False)
        return {"recon": gather_points(decoded, o.idx), "recon_target": o.x,
                "extrap": decoded[:, spirals.extrap], "grid": decoded}
    recon, extrap = model.predict(o.x, o.t, future)
    return {"recon": recon, "recon_target": o.x[:, 1:], "extrap": extrap}
