"""`make bench`: seconds per training iteration, nodebench vs a hand-written loop, and the cost
of the instruments.

For resnet, rknet and odenet at batch 128 (MNIST-shaped random data, so no files are needed):
  plain     a hand-written PyTorch + torchdiffeq step (what a user would write): forward, cross
            entropy, backward, SGD step; nothing else.
  runner    nodebench's training step as the trainer runs it, instruments off (NFE phases and the
            loss sync kept: they are part of the loop).
  measured  the same with the NFE counters and the activation-memory meter on (every iteration).
Targets (issue 3): runner within 3% of plain; measured within 3% of runner. A benchmark, not a
test: it prints what it measures on the machine it runs on.

``--schedule`` measures what the CPU budget of ``make reproduce-mnist`` is sized from: seconds per
training iteration (batch 128, the runner step) of every Table-1 model and the control with 1 and
with 2 torch threads alone, and of ODE-Net and RK-Net as two one-thread processes side by side
(iterations per second of each), so that one can see which schedule trains more images per hour.

``--checks`` measures what the solve checks cost on the ODE-Net (issue 13): the step counter's
overhead per training iteration, and one validity and one gradient-error check, in seconds and
in % of one MNIST epoch.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch
import torchdiffeq
from torch import nn

from . import config as C
from .instruments import ActivationMeter, NFECounter
from .models.blocks import ODEBlock


def _plain_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def _runner_step(model, opt, x, y, nfe, meter, instruments):
    device = x.device
    with nfe.phase_("forward"):
        if instruments:
            with meter.measure(device):
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
        else:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
    value = loss.item()
    opt.zero_grad(set_to_none=True)
    with nfe.phase_("backward"):
        loss.backward()
    opt.step()
    nfe.take("forward")
    nfe.take("backward")
    return value


class PlainODEBlock(nn.Module):
    """The ODE block as a user would write it: torchdiffeq called directly."""

    def __init__(self, func, adjoint: bool):
        super().__init__()
        self.func, self.adjoint = func, adjoint
        self.register_buffer("t", torch.tensor([0.0, 1.0]))

    def forward(self, x):
        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        return solve(self.func, x, self.t, rtol=1e-3, atol=1e-3, method="dopri5")[-1]


def _plain_model(model: nn.Module) -> nn.Module:
    """The same weights, with every ODEBlock replaced by a direct torchdiffeq call."""
    layers = []
    for m in model.children():
        if isinstance(m, ODEBlock):
            layers.append(PlainODEBlock(m.func, m.gradient.mode == "adjoint"))
        else:
            layers.append(m)
    return nn.Sequential(*layers)


def _time(step, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def bench(models=("resnet", "rknet", "odenet"), batch: int = 128, iters: int = 5,
          warmup: int = 1, rounds: int = 3) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in models:
        cfg = C.compose([f"model={name}"])
        torch.manual_seed(0)
        model = C.build_model(cfg, 1, 28, 10).to(device)
        plain = _plain_model(model).to(device)
        x = torch.rand(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        nfe, meter = NFECounter(model), ActivationMeter(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: NFE stays put
        variants = {
            "plain": functools.partial(_plain_step, plain, opt, x, y),
            "runner": functools.partial(_runner_step, model, opt, x, y, nfe, meter, False),
            "measured": functools.partial(_runner_step, model, opt, x, y, nfe, meter, True),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):            # interleave the variants to share machine noise
            for key, step in variants.items():
                times[key] += _time(step, iters, warmup)
        nfe.remove()
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": name, **{f"{k}_s": v for k, v in med.items()},
                     "runner_overhead_%": 100 * (med["runner"] / med["plain"] - 1),
                     "instrument_overhead_%": 100 * (med["measured"] / med["runner"] - 1)})
    return rows


def _schedule_worker(name: str, threads: int, iters: int, channels_last: bool) -> float:
    """Median seconds per runner iteration of ``name`` with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    cfg = C.compose([f"model={name}"])
    torch.manual_seed(0)
    model = C.build_model(cfg, 1, 28, 10)
    x = torch.rand(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    nfe, meter = NFECounter(model), ActivationMeter(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    times = _time(functools.partial(_runner_step, model, opt, x, y, nfe, meter, False), iters, 1)
    return statistics.median(times)


def schedule(models=("resnet", "control", "rknet", "odenet"), iters: int = 6) -> list[dict]:
    """Seconds per iteration alone (1 and 2 threads; channels_last for resnet and control, as
    the cpu profile trains them) and ODE-Net | RK-Net side by side, one thread each."""
    import subprocess

    def worker(name: str, threads: int, cl: bool | None = None) -> list[str]:
        cl = name in ("resnet", "control") if cl is None else cl
        return [sys.executable, "-c",
                ("from nodebench.bench import _schedule_worker as w; "
                f"print(w({name!r}, {threads}, {iters}, {cl}))")]

    rows = []
    for name in models:
        for threads in (1, 2):
            out = subprocess.run(worker(name, threads), capture_output=True, text=True, check=True)
            rows.append({"schedule": "alone", "model": name, "threads": threads,
                         "channels_last": name in ("resnet", "control"),
                         "s_per_iter": float(out.stdout.split()[-1])})
    out = subprocess.run(worker("resnet", 2, False), capture_output=True, text=True, check=True)
    rows.append({"schedule": "alone", "model": "resnet", "threads": 2, "channels_last": False,
                 "s_per_iter": float(out.stdout.split()[-1])})
    pair = [subprocess.Popen(worker(name, 1), stdout=subprocess.PIPE, text=True)
            for name in ("odenet", "rknet")]
    for name, proc in zip(("odenet", "rknet"), pair):
        out, _ = proc.communicate()
        rows.append({"schedule": "side by side", "model": name, "threads": 1,
                     "channels_last": False, "s_per_iter": float(out.split()[-1])})
    return rows


def checks_cost(model_name: str = "odenet", batch: int = 128, iters: int = 5,
                validity_batch: int = 16, gradient_batch: int = 16,
                epoch_iterations: int = 469) -> dict:
    """What the solve checks of issue 13 cost (seconds, and % of one MNIST epoch of
    ``epoch_iterations`` training iterations): the step counter (median training iteration with
    and without it), one validity check (``validity_batch`` images) and one gradient-error check
    (``gradient_batch`` images), on MNIST-shaped random data at initialisation."""
    from .instruments import StepCounter
    from .validity import gradient_error, model_validity

    cfg = C.compose([f"model={model_name}"])
    torch.manual_seed(0)
    model = C.build_model(cfg, 1, 28, 10)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    nfe, meter = NFECounter(model), ActivationMeter(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    step = functools.partial(_runner_step, model, opt, x, y, nfe, meter, False)
    plain = _time(step, iters, 1)
    steps = StepCounter(model, phases=nfe)
    counted = _time(step, iters, 1)
    steps.remove()
    t0 = time.perf_counter()
    model_validity(model, x[:validity_batch])
    validity_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gradient_error(model, x[:gradient_batch], y[:gradient_batch])
    gradient_s = time.perf_counter() - t0
    it_s = statistics.median(plain)
    epoch_s = it_s * epoch_iterations
    return {"model": model_name, "iter_s": it_s,
            "steps_overhead_%": 100 * (statistics.median(counted) / it_s - 1),
            "validity_s": validity_s, "validity_%_of_epoch": 100 * validity_s / epoch_s,
            "gradient_error_s": gradient_s,
            "gradient_error_%_of_epoch": 100 * gradient_s / epoch_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodebench.bench", description=__doc__.split("\n")[0])
    p.add_argument("--checks", action="store_true",
                   help="measure the cost of the solve checks (steps, validity, gradient error) "
                        "on the ODE-Net instead")
    p.add_argument("--models", nargs="+", default=["resnet", "rknet", "odenet"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--schedule", action="store_true",
                   help="measure the cpu profile's schedule instead (1 vs 2 threads, side by side)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.checks:
        print(f"nodebench bench --checks: ODE-Net at initialisation, batch {a.batch}, "
              f"{torch.get_num_threads()} thread(s); % of one MNIST epoch (469 iterations)")
        r = checks_cost(batch=a.batch, iters=a.iters)
        print(f"training iteration {r['iter_s']:.3f} s; step counter "
              f"{r['steps_overhead_%']:+.1f}% per iteration")
        print(f"validity check (16 images): {r['validity_s']:.2f} s = "
              f"{r['validity_%_of_epoch']:.2f}% of an epoch")
        print(f"gradient-error check (16 images): {r['gradient_error_s']:.1f} s = "
              f"{r['gradient_error_%_of_epoch']:.2f}% of an epoch", flush=True)
        return 0
    if a.schedule:
        print("nodebench bench --schedule: runner step, batch 128, median of "
              f"{a.iters} iterations after one warm-up")
        print(f"{'schedule':13} {'model':8} {'threads':>7} {'ch.last':>7} {'s/it':>8} {'it/s':>7}")
        for r in schedule(iters=a.iters):
            print(f"{r['schedule']:13} {r['model']:8} {r['threads']:7d} "
                  f"{'yes' if r['channels_last'] else 'no':>7} {r['s_per_iter']:8.3f} "
                  f"{1 / r['s_per_iter']:7.3f}", flush=True)
        return 0
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu, {torch.get_num_threads()} threads"
    print(f"nodebench bench: batch {a.batch}, median of {a.iters * a.rounds} iterations "
          f"per variant, {device}")
    print(f"{'model':8} {'plain s/it':>11} {'runner s/it':>12} {'measured s/it':>14} "
          f"{'runner ovh':>11} {'instr. ovh':>11}")
    for r in bench(a.models, a.batch, a.iters, rounds=a.rounds):
        print(f"{r['model']:8} {r['plain_s']:11.4f} {r['runner_s']:12.4f} {r['measured_s']:14.4f} "
              f"{r['runner_overhead_%']:10.1f}% {r['instrument_overhead_%']:10.1f}%", flush=True)
    print("targets: runner and instrument overheads each within 3%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
