"""Muon for the hidden matrices, AdamW for everything else, on 1 or N ranks.

Pure update math first (orthogonalisation, the Muon and AdamW updates), then one
optimizer class. With a process group the gradients of Muon matrices are
reduce-scattered (stacked by shape), each rank orthogonalises its own share and the new
weights are all-gathered; AdamW gradients are all-reduced once. No DDP wrapper is used,
so no gradient is communicated twice. Without a process group there is no communication.
Depends only on torch.
"""
import torch
import torch.distributed as dist

# Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932): per-iteration
# coefficients (a, b, c) of X <- a X + b (X X^T) X + c (X X^T)^2 X, tuned so that 5 steps
# map singular values in [1e-3, 1] close to 1. These are the values modded-nanogpt uses
# (computed with a 2% safety margin, hence the 1.02 in the normalisation below).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate polar factor U V^T of G (..., m, n) with 5 Polar Express iterations.
    Computed in bf16 on CUDA (fast, accurate enough for Muon), fp32 elsewhere."""
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    transpose = X.size(-2) > X.size(-1)
    if transpose:  # work with the short side: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transpose else X


def muon_update(grad, momentum_buf, beta: float, nesterov: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Momentum (in place on momentum_buf), Nesterov look-ahead, orthogonalisation (in `dtype`,
    see orthogonalize) and the shape-aware scale sqrt(max(1, m/n)) of Keller Jordan's Muon
    (kellerjordan.github.io/posts/muon)."""
    momentum_buf.lerp_(grad, 1 - beta)
    update = grad.lerp(momentum_buf, beta) if nesterov else momentum_buf
    O = orthogonalize(update, dtype)
    return O.to(grad.dtype) * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5


def adamw_update(p, grad, exp_avg, exp_avg_sq, step: int, lr, betas, eps, weight_decay):
    """One AdamW step in place (Loshchilov & Hutter: weight decay decoupled from the update)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    p.mul_(1 - lr * weight_decay)
    p.addcdiv_(exp_avg, denom, value=-lr / bias1)


def decoupled_decay(weight_decay: float, lr: float) -> float:
    """The group weight decay that makes MuonAdamW's shrink per step (lr_t x group decay, torch
    semantics) equal composer's DecoupledAdamW one, weight_decay x lr_t / lr: ModernBERT's
    finetuning recipe, where the decay follows the schedule but not the lr's size."""
    return weight_decay / lr if lr else 0.0  # lr 0: the weights never move, nothing to decay


class MuonAdamW(torch.optim.Optimizer):
    """param_groups each carry `kind`: "muon" (2-D hidden matrices) or "adamw".
    muon keys:  lr, momentum, nesterov, weight_decay
    adamw keys: lr, betas, eps, weight_decay
    either:     name (for logs), initial_lr (the schedule's base lr, kept by the caller)
    Every parameter of `params_expected` (if given) must be in exactly one group.
    ortho_dtype: dtype of Muon's orthogonalisation; None: bf16 on CUDA, fp32 elsewhere."""

    MUON_DEFAULTS = dict(momentum=0.95, nesterov=True, weight_decay=0.0)
    ADAMW_DEFAULTS = dict(betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

    def __init__(self, param_groups: list[dict], params_expected=None, process_group=None,
                 ortho_dtype: torch.dtype | None = None):
        self.ortho_dtype = ortho_dtype
        groups = []
        for g in param_groups:
            g = dict(g)
            kind = g.get("kind")
            if kind not in ("muon", "adamw"):
                raise ValueError(f"param group kind must be 'muon' or 'adamw', got {kind!r}")
            defaults = self.MUON_DEFAULTS if kind == "muon" else self.ADAMW_DEFAULTS
            allowed = {"params", "kind", "name", "lr", "initial_lr", *defaults}
            unknown = set(g) - allowed
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} in a {kind} param group; allowed: {sorted(allowed)}")
            g = {**defaults, **g}
            g["params"] = list(g["params"])
            if kind == "muon":
                for p in g["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
            groups.append(g)
        super().__init__(groups, {})
        ids = [id(p) for g in self.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)), "a parameter appears in more than one group"
        if params_expected is not None:
            expected = {id(p) for p in params_expected}
            assert set(ids) == expected, (
                f"{len(expected - set(ids))} parameters have no group, {len(set(ids) - expected)} are not expected"
            )
        # None means the default group; no reference to it is kept, so destroy_process_group()
        # frees it (a gloo group alive at interpreter exit can abort the process, see common.py).
        self.pg = process_group
        distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        self.world = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        # Muon matrices are stacked by (group, shape) into buckets padded to a multiple of
        # the world size; rank r owns slice [r*n_local, (r+1)*n_local) of each bucket.
        self.buckets = []
        for gi, g in enumerate(self.param_groups):
            if g["kind"] != "muon":
                continue
            by_shape: dict[tuple, list] = {}
            for p in g["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                n_local = -(-len(ps) // self.world)
                self.buckets.append(dict(group=gi, params=ps, shape=shape, n_local=n_local, momentum=None))

    # -- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self):
        # 1. launch all communication first, so it overlaps with the AdamW math below
        pending = []
        for b in self.buckets:
            ps, n_local = b["params"], b["n_local"]
            full = torch.zeros((n_local * self.world, *b["shape"]), dtype=ps[0].dtype, device=ps[0].device)
            for i, p in enumerate(ps):
                if p.grad is not None:
                    full[i].copy_(p.grad)
            if self.world > 1:
                mine = torch.empty((n_local, *b["shape"]), dtype=full.dtype, device=full.device)
                work = dist.reduce_scatter_tensor(mine, full, group=self.pg, async_op=True)
            else:
                mine, work = full, None
            pending.append((b, mine, work))
        adam = [(g, p) for g in self.param_groups if g["kind"] == "adamw" for p in g["params"] if p.grad is not None]
        adam_works = [dist.all_reduce(p.grad, group=self.pg, async_op=True) for _, p in adam] if self.world > 1 else []

        # 2. AdamW on every rank (its parameters are small: embeddings, gains, scalars)
        for w in adam_works:
            w.wait()
        for g, p in adam:
            grad = p.grad / self.world if self.world > 1 else p.grad
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            adamw_update(p, grad, st["exp_avg"], st["exp_avg_sq"], st["step"], g["lr"], g["betas"], g["eps"], g["weight_decay"])

        # 3. Muon on this rank's share of each bucket, then all-gather the new weights
        for b, mine, work in pending:
            if work is not None:
                work.wait()
                mine /= self.world
            g, ps, n_local = self.param_groups[b["group"]], b["params"], b["n_local"]
            if b["momentum"] is None:
                b["momentum"] = torch.zeros_like(mine)
            lo = self.rank * n_local
            own = [ps[i] for i in range(lo, min(lo + n_local, len(ps)))]
            new = torch.zeros_like(mine)
            if own:
                k = len(own)
                update = muon_update(mine[:k], b["momentum"][:k], g["momentum"], g["nesterov"], self.ortho_dtype)
                weights = torch.stack(own)
                weights.mul_(1 - g["lr"] * g["weight_decay"]).sub_(update, alpha=g["lr"])
                new[:k] = weights
            if self.world > 1:
                gathered = torch.empty((n_local * self.world, *b["shape"]), dtype=new.dtype, device=new.device)
                dist.all_gather_into_tensor(gathered, new, group=self.pg)
            else:
                gathered = new
            for i, p in enumerate(ps):
                p.copy_(gathered[i])

    # -- state for checkpoints: independent of the world size ---------------------------

    def state_dict(self) -> dict:
        """Gathers every rank's Muon momentum so the saved state is the same whatever the
        world size (a run can resume on a different number of GPUs). Call on all ranks."""
        muon = []
        for b in self.buckets:
            mom = b["momentum"]
            if mom is None:
                muon.append(None)
                continue
            if self.world > 1:
                full = torch.empty((b["n_local"] * self.world, *b["shape"]), dtype=mom.dtype, device=mom.device)
                dist.all_gather_into_tensor(full, mom.contiguous(), group=self.pg)
            else:
                full = mom
            muon.append(full[: len(b["params"])].cpu().clone())
        adam = []
        for g in self.param_groups:
            if g["kind"] == "adamw":
                for p in g["params"]:
                    st = self.state.get(p)
                    adam.append(None if not st else {"step": st["step"], "exp_avg": st["exp_avg"].cpu().clone(),
                                                     "exp_avg_sq": st["exp_avg_sq"].cpu().clone()})
        # the groups' layout only, to check a load against: hyperparameters (lr, betas, weight
        # decay) belong to the run's config, not to the state, so a resumed run can change them
        layout = [{"kind": g["kind"]} for g in self.param_groups]
        return {"muon_momentum": muon, "adamw": adam, "param_groups": layout}

    def load_state_dict(self, state: dict):
        """Restores the state (momenta, moments, step counts) and nothing else: every group
        keeps the hyperparameters it was built with."""
        kinds, saved = [g["kind"] for g in self.param_groups], [g["kind"] for g in state["param_groups"]]
        if saved != kinds:  # the number of tensors per group is checked below (strict zips)
            raise ValueError(f"optimizer state was saved for param groups {saved}, this optimizer has {kinds}")
        for b, full in zip(self.buckets, state["muon_momentum"], strict=True):
            if full is None:
                b["momentum"] = None
                continue
            p0 = b["params"][0]
            lo, n_local = self.rank * b["n_local"], b["n_local"]
            mine = torch.zeros((n_local, *b["shape"]), dtype=p0.dtype, device=p0.device)
            part = full[lo : lo + n_local]
            mine[: part.size(0)] = part.to(p0.device)
            b["momentum"] = mine
        adam_params = [p for g in self.param_groups if g["kind"] == "adamw" for p in g["params"]]
        for p, st in zip(adam_params, state["adamw"], strict=True):
            if st is not None:
                self.state[p] = {"step": st["step"], "exp_avg": st["exp_avg"].to(p.device),
                                 "exp_avg_sq": st["exp_avg_sq"].to(p.device)}
