"""Tasks: what varies between experiments that share the one training loop (:func:`nodebench.
train.run`).

A task owns its data (held in memory), its batches, its loss and its evaluation metrics; the loop
owns everything else (optimiser, schedule, instruments, TensorBoard, metrics.csv, summary.json,
checkpoint and resume). Every task has the same methods:

* ``train_batches(batch_size, generator)``: the batches of one epoch, shuffled by ``generator``
  (the loop checkpoints it, so a resumed run draws the same batches); ``batches_per_epoch``;
* ``loss(model, batch) -> (loss, out)`` and ``count(batch, out) -> {"seen": n, ...}``: the
  scalar that is optimised (a mean over the batch) and the sums behind ``train_columns``;
* ``evaluate(model, batch_size) -> (metrics, batches)``: ``eval_columns`` on the test data, under
  ``torch.no_grad``; ``target`` is the column whose best (lowest) value the summary reports;
* ``check_batch(size)``: the fixed inputs and targets of the solve-validity checks of ODE blocks
  (:mod:`nodebench.validity`; with ``check_loss(out, y)``, also of the gradient-modes study), or
  None where the model has no ODE block they apply to;
* ``check_objective(size)``: the loss of the gradient-error check
  (:func:`nodebench.validity.gradient_error_of`), an ``objective(module, dtype)`` that computes
  the task's own training loss on a fixed batch of ``size`` items (inputs cast to ``dtype``; no
  random numbers drawn from the global RNG), or None where the check does not apply. The loop
  runs it for every model with a module that carries a solve
  (:func:`nodebench.validity.solve_modules`), ODE blocks or not;
* ``save_artifacts(model, run_dir)``: what a report draws figures from (optional).

The task is chosen by the dataset: ``dataset.task`` (a ``_target_`` node) in ``conf/dataset/``;
image datasets have none and get :class:`Classification`. Tasks:

=================  ==========================================  ===============================
task               datasets (conf/dataset)                     paper
=================  ==========================================  ===============================
Classification     mnist, cifar10, svhn, synthetic, shapes     Chen et al. 2018 Table 1,
                                                               Dupont et al. 2019 Section 5
PointRegression    g_1d, annulus, annulus_wedge                Dupont et al. 2019 Sections 3-4
TrajectoryFit      spiral_system, random_matrix, lotka_vol...  seed 001 (dynamical systems)
LatentSequence     spirals                                     Chen et al. 2018 Table 2
DensityMatching    density (targets u1-u4)                     Chen et al. 2018 Figure 4
MaximumLikelihood  two_circles, two_moons                      Chen et al. 2018 Figure 5
=================  ==========================================  ===============================

A task may also define ``validity(model, threshold) -> dict`` (the end-of-epoch solve checks
for models that have no ODE block, e.g. a CNF: :func:`nodebench.cnf.cnf_validity`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .solvers import Gradient, odesolve


class Classification:
    """Image classification: cross-entropy, training and test error (%), Chen et al. 2018
    Table 1.

    ``data``: a :class:`nodebench.data.TensorDataset` (uint8 images (N, C, H, W), int64 labels);
    batches are (x float in [0, 1], y); the last incomplete training batch is dropped.
    """

    name = "classification"
    train_columns = ("train_error",)
    eval_columns = ("test_error",)
    target = "test_error"
    unit = "images"

    def __init__(self, data) -> None:
        self.data = data

    @property
    def train_size(self) -> int:
        return int(self.data.train_x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.data.test_x.shape[0])

    def to(self, device: torch.device) -> Classification:
        self.data = self.data.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.data.batches_per_epoch(batch_size)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        return self.data.train_batches(batch_size, generator)

    def channels_last(self, batch: tuple) -> tuple:
        x, y = batch
        return x.contiguous(memory_format=torch.channels_last), y

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    def count(self, batch: tuple, logits: torch.Tensor) -> dict:
        y = batch[1]
        return {"seen": y.numel(), "wrong": (logits.argmax(1) != y).sum().item()}

    def train_stats(self, sums: dict) -> dict:
        return {"train_error": 100.0 * sums["wrong"] / max(sums["seen"], 1)}

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        """Test error (%) over the whole test set, and the number of evaluation batches."""
        wrong, total, batches = 0, 0, 0
        for x, y in self.data.test_batches(batch_size):
            wrong += (model(x).argmax(1) != y).sum().item()
            total += y.numel()
            batches += 1
        return {"test_error": 100.0 * wrong / max(total, 1)}, batches

    def check_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``size`` test images and their labels (no random numbers drawn)."""
        return next(iter(self.data.test_batches(int(size))))

    check_loss = staticmethod(nn.functional.cross_entropy)

    def check_objective(self, size: int):
        """The gradient-error check's loss: cross-entropy on :meth:`check_batch` (the first
        ``size`` test images)."""
        from .validity import batch_objective

        x, y = self.check_batch(size)
        return batch_objective(x, y, self.check_loss)

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        return None


POINT_LOSSES = {"mse": nn.functional.mse_loss, "smooth_l1": nn.functional.smooth_l1_loss}


class PointRegression:
    """Regression of a scalar target in {-1, +1} on points (N, d): Dupont et al. 2019, Sections
    3-4 (g_1d, the annulus, the annulus with a held-out wedge).

    Loss: ``mse`` (the paper's) or ``smooth_l1``, mean over the batch. Columns: training sign
    accuracy (fraction of points whose output has the target's sign, over the epoch's batches),
    test loss and test sign accuracy. Batches are shuffled, the last one may be smaller (the
    authors' data loader). ``save_artifacts`` writes ``features.pt`` (h(1) of every training and
    test point, 60 trajectories at 21 times in [0, 1]) for the report's figures.
    """

    name = "regression"
    train_columns = ("train_accuracy",)
    eval_columns = ("test_loss", "test_accuracy")
    target = "test_loss"
    unit = "points"

    def __init__(self, data, loss: str = "mse") -> None:
        if loss not in POINT_LOSSES:
            from .errors import ConfigError
            raise ConfigError(f"dataset.task.loss must be one of {', '.join(POINT_LOSSES)}, "
                              f"got {loss!r}")
        self.data, self.loss_name = data, loss
        self.loss_fn = POINT_LOSSES[loss]

    @property
    def train_size(self) -> int:
        return int(self.data.x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.data.test_x.shape[0])

    def to(self, device: torch.device) -> PointRegression:
        d = self.data
        d.x, d.y, d.test_x, d.test_y = (v.to(device) for v in (d.x, d.y, d.test_x, d.test_y))
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.train_size / batch_size)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        return self.data.batches(batch_size, generator)

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        out = model(x)
        return self.loss_fn(out, y), out

    def count(self, batch: tuple, out: torch.Tensor) -> dict:
        y = batch[1]
        return {"seen": y.shape[0], "right": (torch.sign(out) == y).sum().item()}

    def train_stats(self, sums: dict) -> dict:
        return {"train_accuracy": sums["right"] / max(sums["seen"], 1)}

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        x, y = self.data.test_x, self.data.test_y
        loss, right, batches = 0.0, 0, 0
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start:start + batch_size])
            target = y[start:start + batch_size]
            loss += self.loss_fn(out, target, reduction="sum").item()
            right += (torch.sign(out) == target).sum().item()
            batches += 1
        n = max(x.shape[0], 1)
        return {"test_loss": loss / n, "test_accuracy": right / n}, batches

    def check_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.test_x[:size], self.data.test_y[:size]

    def check_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(out, y)

    def check_objective(self, size: int):
        """The gradient-error check's loss: the training loss (``mse`` or ``smooth_l1``) on
        :meth:`check_batch` (the first ``size`` test points)."""
        from .validity import batch_objective

        x, y = self.check_batch(size)
        return batch_objective(x, y, self.check_loss)

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        d = self.data
        with torch.no_grad():
            keep = torch.randperm(d.x.shape[0], generator=torch.Generator().manual_seed(0))[:60]
            keep = keep.to(d.x.device)
            torch.save({"x": d.x.cpu(), "y": d.y.cpu(), "features": model.features(d.x).cpu(),
                        "test_x": d.test_x.cpu(), "test_y": d.test_y.cpu(),
                        "test_features": model.features(d.test_x).cpu(),
                        "traj_index": keep.cpu(),
                        "trajectory": model.trajectory(
                            d.x[keep], torch.linspace(0.0, 1.0, 21, device=d.x.device)).cpu()},
                       run_dir / "features.pt")


class TrajectoryFit:
    """Fit of an autonomous ODE-Net dy/dt = f(y) to one trajectory (seed 001, after torchdiffeq's
    ode_demo).

    ``data``: a :class:`nodebench.dynamics.TrajectoryData`. An epoch is ``batches`` iterations; each
    batch is ``batch_size`` random sub-trajectories of ``batch_time`` consecutive observed points
    of the training window (:func:`nodebench.dynamics.sub_trajectories`), solved from their first
    points; the loss is ``l1`` (the seed's) or ``mse`` between solved and observed points.
    Evaluation solves the learned field once from y0 over the whole time range (at most
    ``eval_max_num_steps`` steps) and reports the MSE against the truth in the training window
    (``fit_mse``) and after it (``extrap_mse``), and each divided by the variance of the truth in
    the window (``fit_rel``, ``extrap_rel``; dimensionless). No ODE block: :meth:`validity`
    checks the learned field's solve from y0, and :meth:`check_objective` gives the gradient-error
    check the training loss on a fixed batch of sub-trajectories.
    """

    check_seed = 0  # seeds the generator that draws the gradient-error check's sub-trajectories
    name = "trajectory"
    train_columns = ()
    eval_columns = ("fit_mse", "fit_rel", "extrap_mse", "extrap_rel", "fit_var", "extrap_var")
    target = "fit_mse"
    unit = "observed points"

    def __init__(self, data, batches: int = 50, batch_time: int = 10, loss: str = "l1",
                 eval_max_num_steps: int | None = 20000) -> None:
        from .errors import ConfigError

        if loss not in ("l1", "mse"):
            raise ConfigError(f"dataset.task.loss must be l1 or mse, got {loss!r}")
        for key, value in (("batches", batches), ("batch_time", batch_time)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.task.{key} must be a positive integer, got {value!r}")
        self.data, self.batches = data, batches
        self.batch_time = min(batch_time, len(data.obs_train))
        self.loss_fn = nn.functional.l1_loss if loss == "l1" else nn.functional.mse_loss
        self.eval_max_num_steps = eval_max_num_steps

    @property
    def train_size(self) -> int:
        return len(self.data.obs_train)

    @property
    def test_size(self) -> int:
        return len(self.data.t)

    def to(self, device: torch.device) -> TrajectoryFit:
        self.data = self.data.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.batches

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        from .dynamics import sub_trajectories

        d = self.data
        for _ in range(self.batches):
            yield sub_trajectories(d.obs_train, d.y_train, self.batch_time, batch_size, generator)

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, None]:
        y0, union, pos, target = batch
        out = model(y0, union.to(y0.dtype) * self.data.dt)  # (U, B, dim)
        out = out[pos, torch.arange(pos.shape[0], device=pos.device)[:, None]]  # (B, T, dim)
        return self.loss_fn(out, target), None

    def count(self, batch: tuple, out: None) -> dict:
        return {"seen": batch[0].shape[0]}

    def train_stats(self, sums: dict) -> dict:
        return {}

    def predict(self, model: nn.Module) -> torch.Tensor:
        """The learned trajectory from y0 over the whole grid, (N, dim) float32."""
        d = self.data
        solver = dataclasses.replace(model.solver, max_num_steps=self.eval_max_num_steps)
        return odesolve(model.func, d.y_train[:1], d.t - d.t[0], solver,
                        Gradient("direct"))[:, 0, :]

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        from .dynamics import trajectory_errors
        from .errors import SolverFailure

        pred = self.predict(model)
        if not bool(torch.isfinite(pred).all()):
            raise SolverFailure("non-finite learned trajectory")
        return trajectory_errors(self.data.y, pred.double(), self.data.train_end), 1

    def check_batch(self, size: int) -> None:  # no ODE block: see validity(), check_objective()
        return None

    check_loss = None

    def check_objective(self, size: int):
        """The gradient-error check's loss: the training loss (``l1`` or ``mse``, :meth:`loss`)
        on one fixed batch of ``size`` sub-trajectories of ``batch_time`` consecutive observed
        points of the training window, drawn as a training batch is
        (:func:`nodebench.dynamics.sub_trajectories`; fewer when the window has fewer starts) but
        from a generator seeded with :attr:`check_seed`, so that initialisation, end and
        reference see the same batch and the loop's generator and the global RNG are not
        touched. The start states and targets (B, 2), (B, T, 2) are cast to the module's dtype;
        the times (grid offsets times ``dt``) follow them."""
        from .dynamics import sub_trajectories

        d = self.data
        y0, union, pos, target = sub_trajectories(
            d.obs_train, d.y_train, self.batch_time, int(size),
            torch.Generator().manual_seed(self.check_seed))

        def objective(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
            return self.loss(module, (y0.to(dtype), union, pos, target.to(dtype)))[0]

        return objective

    def validity(self, model: nn.Module, threshold: float) -> dict:
        """The solve checks (:func:`nodebench.validity.solve_validity`) of the learned field's
        solve from y0 over the training window (the solve the fit is judged on)."""
        from .validity import solve_validity

        d = self.data
        t = (d.t - d.t[0])[: d.train_end]
        found = solve_validity(model.func, d.y_train[:1], t, model.solver, threshold)
        return {"validity_reference_error": found.reference_error,
                "validity_roundtrip_error": found.roundtrip_error, "valid": found.valid}

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        d = self.data
        with torch.no_grad():
            pred = self.predict(model).cpu()
        torch.save({"t": d.t.cpu(), "true": d.y.float().cpu(), "pred": pred,
                    "observed": d.observed.cpu(), "train_end": d.train_end},
                   run_dir / "trajectory.pt")


# a test spiral whose extrapolation RMSE exceeds this many noise stds counts as failed
FAILED_NOISE_MULTIPLE = 3.0


class LatentSequence:
    """Latent ODE and RNN baselines on irregularly observed spirals: Chen et al. 2018, section 5.1
    and Table 2 (:mod:`nodebench.latent`).

    ``data``: a :class:`nodebench.latent.SpiralData` (the spirals and their ``n`` observations).
    Batches are the observations of ``batch_size`` training spirals (shuffled, the last incomplete
    batch dropped). Loss: the latent ODE's negative ELBO per spiral (one reparameterised sample,
    Gaussian likelihood with fixed std ``obs_std``), or an RNN's Gaussian NLL of the next
    observation per predicted point. Evaluation on the test spirals: ``test_rmse`` (predictive
    RMSE of the extrapolation window against the noisy points: Table 2's number),
    ``test_rmse_clean`` (against the noise-free curve), ``recon_rmse`` (at the observed points),
    and where the extrapolation error comes from (:func:`nodebench.latent.
    extrapolation_breakdown`): the median per-spiral RMSE, the RMSE of the clockwise and the
    counter-clockwise spirals, and the share of spirals off by more than
    ``FAILED_NOISE_MULTIPLE`` (3) times the noise std.
    The latent ODE calls ``odesolve`` itself (no ODE block): :meth:`validity` checks its solve,
    and :meth:`check_objective` gives the gradient-error check the negative ELBO with its
    reparameterisation noise fixed.
    ``save_artifacts`` writes ``predictions.pt`` (``keep`` test spirals) for the report's figure.
    """

    check_seed = 0  # seeds the gradient-error check's reparameterisation noise
    name = "latent"
    train_columns = ()
    eval_columns = ("test_rmse", "test_rmse_clean", "recon_rmse", "test_rmse_median",
                    "test_rmse_cw", "test_rmse_ccw", "test_failed_share")
    target = "test_rmse"
    unit = "spirals"

    def __init__(self, data, obs_std: float = 0.1, keep: int = 4) -> None:
        self.data, self.obs_std, self.keep = data, float(obs_std), int(keep)

    @property
    def train_size(self) -> int:
        return self.data.spirals.config.n_train

    @property
    def test_size(self) -> int:
        c = self.data.spirals.config
        return c.n_spirals - c.n_train

    def to(self, device: torch.device) -> LatentSequence:
        self.data = self.data.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.train_size // batch_size

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        order = torch.randperm(self.train_size, generator=generator)
        for start in range(0, self.train_size - batch_size + 1, batch_size):
            yield self.data.obs[order[start:start + batch_size].to(self.data.obs.x.device)]

    def loss(self, model: nn.Module, obs,
             eps: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """The latent ODE's negative ELBO, mean over the spirals (its reparameterisation draw
        ``eps`` (B, latent) when given, else from the global RNG), or an RNN's NLL. The window's
        grid is cast to the observations' dtype."""
        from .latent import LatentODE

        if isinstance(model, LatentODE):
            s = self.data.spirals
            grid = s.t[s.window].to(obs.x.dtype)
            loglik, kl = model.elbo(obs.x, obs.t, obs.idx, grid, self.obs_std, eps=eps)
            return -(loglik - kl).mean(), None
        return model.nll(obs.x, obs.t), None

    def count(self, obs, out: None) -> dict:
        return {"seen": obs.x.shape[0]}

    def train_stats(self, sums: dict) -> dict:
        return {}

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        from .latent import extrapolation_breakdown, predict, rmse

        s = self.data.spirals
        p = predict(model, s, self.data.obs, s.test)
        target = s.noisy[s.test][:, s.extrap]
        return {"test_rmse": rmse(p["extrap"], target),
                "test_rmse_clean": rmse(p["extrap"], s.clean[s.test][:, s.extrap]),
                "recon_rmse": rmse(p["recon"], p["recon_target"]),
                **extrapolation_breakdown(p["extrap"], target, s.direction[s.test],
                                          FAILED_NOISE_MULTIPLE * s.config.noise)}, 1

    def check_batch(self, size: int) -> None:  # no ODE block: see validity(), check_objective()
        return None

    check_loss = None
    check_size = 64

    def check_objective(self, size: int):
        """The gradient-error check's loss: the training loss (:meth:`loss`, the negative ELBO
        per spiral, mean over the batch) on the observations of the first ``size`` test spirals
        (those of :meth:`validity`), with the reparameterisation noise fixed.

        The ELBO's one-sample estimate is stochastic; the check needs a deterministic function of
        the weights that the run's model and its float64 reference evaluate alike. So the
        standard normal draw eps (B, latent) is drawn on every call from a fresh generator seeded
        with :attr:`check_seed`, in float64, and cast to the module's dtype: both forwards see
        z0 = mean + eps * exp(logvar / 2) with the same eps (up to float32 rounding), and the
        gradient is the one a training step with that draw would follow. The global RNG is not
        touched. The observations (B, n, 2), their times (B, n) and the grid are cast to the
        module's dtype. For an RNN baseline: its NLL (no noise; it has no solve, so the loop
        does not run the check)."""
        from .latent import LatentODE

        c = self.data.spirals.config
        rows = torch.arange(c.n_train, min(c.n_train + int(size), c.n_spirals))
        obs = self.data.obs[rows.to(self.data.obs.x.device)]

        def objective(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
            cast = dataclasses.replace(obs, t=obs.t.to(dtype), x=obs.x.to(dtype))
            eps = None
            if isinstance(module, LatentODE):
                gen = torch.Generator().manual_seed(self.check_seed)
                eps = torch.randn((len(rows), module.latent), generator=gen,
                                  dtype=torch.float64).to(device=cast.x.device, dtype=dtype)
            return self.loss(module, cast, eps=eps)[0]

        return objective

    def validity(self, model: nn.Module, threshold: float) -> dict | None:
        """The solve checks (:func:`nodebench.validity.solve_validity`) of the latent ODE's
        solve over the whole grid (observation window and extrapolation) from the posterior
        means of the first ``check_size`` test spirals; None for the RNNs (no solve)."""
        from .latent import LatentODE
        from .validity import solve_validity

        if not isinstance(model, LatentODE):
            return None
        s, c = self.data.spirals, self.data.spirals.config
        rows = torch.arange(c.n_train, min(c.n_train + self.check_size, c.n_spirals))
        o = self.data.obs[rows.to(self.data.obs.x.device)]
        with torch.no_grad():
            z0, _ = model.encoder(o.x, o.t)
        found = solve_validity(model.func, z0, s.t.to(z0.dtype), model.solver, threshold)
        return {"validity_reference_error": found.reference_error,
                "validity_roundtrip_error": found.roundtrip_error, "valid": found.valid}

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        from .latent import predict

        s, c = self.data.spirals, self.data.spirals.config
        k = min(self.keep, c.n_spirals - c.n_train)
        test = torch.arange(c.n_train, c.n_train + k)
        o = self.data.obs[test]
        p = predict(model, s, self.data.obs, test)
        torch.save({"t": s.t.cpu(), "n_window": c.n_window, "clean": s.clean[test].cpu(),
                    "noisy": s.noisy[test].cpu(), "obs_idx": o.idx.cpu(), "obs_x": o.x.cpu(),
                    **{key: value.detach().cpu() for key, value in p.items()}},
                   run_dir / "predictions.pt")


class _FlowTask:
    """What the two flow tasks share (Chen et al. 2018 section 4.1, :mod:`nodebench.cnf`): the
    model is a :class:`~nodebench.cnf.Flow` (a planar CNF or the planar NF); evaluation in
    chunks of ``batch_size`` points; the solve checks of a CNF at the end of every epoch
    (:meth:`validity`); ``save_artifacts`` writes ``density.pt`` (the model's log-density on a
    grid, samples of it) for the report's figures."""

    train_columns = ()
    unit = "samples"
    grid_limit = 4.0
    grid_points = 100
    figure_samples = 2000
    check_size = 256

    def check_batch(self, size: int) -> None:  # a flow has no ODE block: see validity()
        return None

    check_loss = None

    def check_objective(self, size: int) -> None:
        """No gradient-error check for the flows (not implemented: a CNF's loss draws trace
        noise and its penalties are not dropped by the reference)."""

    def count(self, batch: torch.Tensor, out: None) -> dict:
        return {"seen": int(batch.shape[0])}

    def train_stats(self, sums: dict) -> dict:
        return {}

    def check_points(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def validity(self, model: nn.Module, threshold: float) -> dict | None:
        """``cnf_validity`` (reference error of the points and of the log-density, round trip)
        of a CNF at :meth:`check_points`; None for a model without an ODE solve."""
        from .cnf import CNF, cnf_validity

        if not isinstance(model, CNF):
            return None
        was_training = model.training
        model.eval()
        try:
            found = cnf_validity(model, self.check_points(), threshold)
        finally:
            model.train(was_training)
        return {"validity_reference_error": max(found["reference_error"],
                                                found["logp_reference_error"]),
                "validity_roundtrip_error": found["round_trip_error"], "valid": found["valid"]}

    def _grid_log_density(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        from .cnf import grid_points, log_density

        grid = grid_points(self.grid_limit, self.grid_points).to(device)
        with torch.no_grad():
            return torch.cat([log_density(model, chunk) for chunk in grid.split(2500)])

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        from .cnf import sample

        device = next(model.parameters()).device
        model.eval()
        gen = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            logp = self._grid_log_density(model, device)
            samples = sample(model, self.figure_samples, gen)
        torch.save({"limit": self.grid_limit, "points": self.grid_points,
                    "log_density": logp.reshape(self.grid_points, self.grid_points).cpu(),
                    "samples": samples.cpu(), **self.artifact_extras()}, run_dir / "density.pt")

    def artifact_extras(self) -> dict:
        return {}


class DensityMatching(_FlowTask):
    """Density matching (Chen et al. 2018 section 4.1, Figure 4): fit a flow q to a target
    ``p ∝ exp(-U)`` that can be evaluated but not sampled, by minimising the reverse KL's
    Monte Carlo estimate ``mean_b [log q(x_b) + U(x_b)]``, ``x_b = to_target(z_b)``, ``z_b ~
    N(0, I)`` (:func:`nodebench.cnf.density_matching_loss`; nats).

    ``data``: a :class:`nodebench.cnf.DensityTarget`. A batch is ``batch_size`` fresh base
    draws from the loop's generator; an epoch is ``batches`` iterations. Evaluation on the
    target's fixed ``test_z``: ``test_loss`` (the loss, ``KL - log Z``) and ``test_kl`` (the
    loss plus the target's log partition function over the box: KL(q || p) of the target
    restricted to [-limit, limit]^2, nats, >= 0 up to Monte Carlo error; the target column).
    """

    name = "density_matching"
    eval_columns = ("test_loss", "test_kl")
    target = "test_kl"

    def __init__(self, data, batches: int = 100) -> None:
        if not isinstance(batches, int) or batches < 1:
            from .errors import ConfigError
            raise ConfigError(f"dataset.task.batches must be a positive integer, got {batches!r}")
        self.data, self.batches = data, batches
        self.grid_limit = data.limit

    @property
    def train_size(self) -> int:
        return 0  # fresh draws every iteration

    @property
    def test_size(self) -> int:
        return int(self.data.test_z.shape[0])

    def to(self, device: torch.device) -> DensityMatching:
        self.data.test_z = self.data.test_z.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.batches

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        device = self.data.test_z.device
        for _ in range(self.batches):
            yield torch.randn(batch_size, self.data.test_z.shape[1], generator=generator).to(device)

    def _loss(self, model: nn.Module, z: torch.Tensor) -> torch.Tensor:
        from .cnf import log_normal

        out = model.to_target(z)
        return log_normal(z) + out.delta_logp + self.data.U(out.points)

    def loss(self, model: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self._loss(model, z).mean(), None

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        total, batches = 0.0, 0
        for chunk in self.data.test_z.split(batch_size):
            total += float(self._loss(model, chunk).detach().sum())
            batches += 1
        loss = total / self.test_size
        return {"test_loss": loss, "test_kl": loss + self.data.log_z}, batches

    def check_points(self) -> torch.Tensor:
        return self.data.test_z[:self.check_size]

    def artifact_extras(self) -> dict:
        from .cnf import grid_points

        grid = grid_points(self.grid_limit, self.grid_points, torch.float64)
        target = -self.data.U(grid) - self.data.log_z
        return {"target": self.data.name,
                "target_log_density": target.reshape(self.grid_points, self.grid_points).float()}


class MaximumLikelihood(_FlowTask):
    """Maximum likelihood (Chen et al. 2018 section 4.1, Figure 5): minimise ``-mean_b log
    p(x_b)`` over samples of a 2-D data density (:func:`nodebench.cnf.mle_loss`; nats per
    sample).

    ``data``: a :class:`nodebench.cnf.PointSamples`. Batches are shuffled training points (the
    last incomplete batch dropped). Evaluation: ``test_nll``, the mean negative log-likelihood
    of the held-out points (the target column).
    """

    name = "maximum_likelihood"
    eval_columns = ("test_nll",)
    target = "test_nll"

    def __init__(self, data) -> None:
        self.data = data

    @property
    def train_size(self) -> int:
        return int(self.data.x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.data.test_x.shape[0])

    def to(self, device: torch.device) -> MaximumLikelihood:
        self.data.x, self.data.test_x = self.data.x.to(device), self.data.test_x.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.train_size // batch_size

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        order = torch.randperm(self.train_size, generator=generator).to(self.data.x.device)
        for start in range(0, self.train_size - batch_size + 1, batch_size):
            yield self.data.x[order[start:start + batch_size]]

    def _nll(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from .cnf import log_normal

        out = model.to_base(x)
        return -(log_normal(out.points) - out.delta_logp)

    def loss(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self._nll(model, x).mean(), None

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        total, batches = 0.0, 0
        for chunk in self.data.test_x.split(batch_size):
            total += float(self._nll(model, chunk).detach().sum())
            batches += 1
        return {"test_nll": total / self.test_size}, batches

    def check_points(self) -> torch.Tensor:
        """The points of the checks: the first held-out points, used as base points (the checks
        solve base -> data side and back, as sampling does)."""
        return self.data.test_x[:self.check_size]

    def artifact_extras(self) -> dict:
        return {"target": self.data.name, "data": self.data.test_x.cpu()}
