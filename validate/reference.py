"""The single-process reference: the same model, seed, data and optimizer in one process, and
the comparison of the parallel run's losses and gradients against it."""
from __future__ import annotations

import math

import torch

from .config import routing_of, spec_from_dict, torch_dtype
from .model import build_reference, cross_entropy_sum, reference_calls
from .worker import LR, make_data


def run_reference(cfg: dict) -> dict:
    spec = spec_from_dict(cfg["model"])
    lay = cfg["layout"]
    gb, s = lay["global_batch"], lay["seq_len"]
    dtype = torch_dtype(cfg["dtype"])
    total = 1 + cfg["steps"] + cfg.get("timed_steps", 0)
    model = build_reference(spec, s, cfg["seed"], dtype)
    cf, pad = routing_of(cfg)
    if cf > 0:                       # the ranks' router calls, each with its own capacity
        model.ctx.capacity_factor, model.ctx.pad_to_capacity = cf, pad
        model.ctx.calls = reference_calls(lay)
    names = model.global_names()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    data = make_data(spec.vocab, gb, s, total, cfg["seed"])
    losses, grads = [], []
    for step in range(total):
        opt.zero_grad(set_to_none=True)
        loss = cross_entropy_sum(model(data[step, :, :-1]), data[step, :, 1:]) / float(gb * s)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({names[n]: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return {"losses": losses, "grads": grads}


def assemble(per_rank: list, step: int, ref_grads: dict):
    """Rebuild full gradients of one step from every rank's pieces. Returns (grads, worst
    disagreement between ranks holding the same elements, names never covered)."""
    full, filled = {}, {}
    worst = 0.0
    for res in per_rank:
        for name, gshape, lshape, off, a, b, vals in res["grads"][step]:
            if name not in full:
                full[name] = torch.full(gshape, float("nan"), dtype=vals.dtype)
                filled[name] = torch.zeros(gshape, dtype=torch.bool)
            idx = torch.arange(math.prod(gshape)).view(gshape)
            idx = idx[tuple(slice(o, o + l) for o, l in zip(off, lshape))].reshape(-1)[a:b]
            flat, fl = full[name].view(-1), filled[name].view(-1)
            prev = fl[idx]
            if prev.any():
                d = (flat[idx][prev] - vals[prev]).abs().max().item()
                scale = max(vals.abs().max().item(), 1e-30)
                worst = max(worst, d / scale)
            flat[idx] = vals
            fl[idx] = True
    missing = sorted(set(ref_grads) - set(full)) + sorted(n for n in full if not filled[n].all())
    return full, worst, missing


def compare(cfg: dict, per_rank: list, ref: dict, tol) -> list:
    """Checks: the loss of every step, and the gradients of every step the ranks reported.
    tol: (loss, step-0 gradient, later-step gradient or None) relative tolerances (api.tolerance);
    None: later steps' gradients are not compared (their drift reaches O(1) in the dtype)."""
    rtol, gtol0, gtol_later = tol
    checks = []
    steps = len(ref["losses"])
    for step in range(steps):
        got = [r["losses"][step] for r in per_rank if r["losses"][step] is not None]
        par = sum(got)
        want = ref["losses"][step]
        rel = abs(par - want) / max(abs(want), 1e-30)
        checks.append(dict(quantity="loss", step=step, group="all", predicted=want, measured=par,
                           rel_err=rel, tol=rtol, ok=bool(rel <= rtol),
                           note="single-process reference loss vs the parallel run"))
    for step in range(steps):
        gtol = gtol0 if step == 0 else gtol_later
        if gtol is None or not any(r["grads"][step] for r in per_rank):
            continue
        full, worst, missing = assemble(per_rank, step, ref["grads"][step])
        err = 0.0
        nref = npar = 0.0
        for name, g in ref["grads"][step].items():
            nref += float(g.double().pow(2).sum())
            if name in full:
                npar += float(torch.nan_to_num(full[name]).double().pow(2).sum())
                d = (full[name] - g).abs().max().item()
                scale = max(g.abs().max().item(), 1e-30)
                err = max(err, d / scale) if not math.isnan(d) else float("inf")
        ok = not missing and err <= gtol and worst <= gtol
        checks.append(dict(quantity="gradients", step=step, group="all", predicted=math.sqrt(nref),
                           measured=math.sqrt(npar), rel_err=err, tol=gtol, ok=bool(ok),
                           replica_disagreement=worst, missing=missing[:5],
                           note="predicted/measured: global gradient norms; rel_err: max over "
                                "parameters of max|g - g_ref| / max|g_ref|, g reassembled from "
                                "every rank's shards"))
    return checks
