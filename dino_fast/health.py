"""Training-health metrics of a DINO step and a collapse detector (Caron et al., 2021, §5.3 "Avoiding collapse").

DINO avoids collapse by balancing two forces: sharpening (τt small) pushes the teacher towards one prototype
(one-hot collapse, teacher entropy → 0) and centering pushes it towards the uniform distribution (uniform
collapse, teacher entropy → ln K and the loss → ln K). The paper monitors the teacher entropy h(Pt) and
KL(Pt‖Ps); both collapse modes drive the KL to 0.

Everything here is a function of one step's tensors and returns 0-dim float32 tensors on their device, so the
trainer can stack them with the loss and bring them to the host with one ``.tolist()`` at log time; the detector
then works on those floats.
"""

from __future__ import annotations

import math

import torch

from dino_fast.ops.reference import pair_cross_entropy

ONE_HOT_FRACTION = 0.05  # one-hot collapse: entropy below 5% of its maximum ln K (0.55 nats for K = 65536)
UNIFORM_TOLERANCE = 0.01  # uniform collapse: loss within 1% of ln K, or entropy above 99% of ln K
UNIFORM_LOSS_ENTROPY_FRACTION = 0.9  # ... the loss test only while the teacher's targets are near-flat too


def _teacher_log_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return torch.log_softmax((teacher_logits.detach().float() - center.float()) / temp, dim=-1)


def _entropy(q: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return -(q * logq).sum(-1).mean()


def _batch_entropy(q: torch.Tensor) -> torch.Tensor:
    mean_q = q.mean(0)
    return -(mean_q * mean_q.clamp_min(1e-30).log()).sum()


def _student_kl(q: torch.Tensor, entropy: torch.Tensor, student_output: torch.Tensor, student_temp: float,
                ncrops: int) -> torch.Tensor:
    """Mean KL over the loss's pairs: their cross-entropy (the reference's pair loop, fp32) − H(teacher)."""
    return pair_cross_entropy(q, student_output.detach().float(), student_temp, ncrops) - entropy


def _targets(teacher_output: torch.Tensor, center: torch.Tensor, temp: float,
             targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, log q) of the loss's teacher targets: the given ones (rows are distributions) or the centered softmax."""
    if targets is not None:
        q = targets.detach().float()
        return q, q.clamp_min(1e-30).log()
    logq = _teacher_log_probs(teacher_output, center, temp)
    return logq.exp(), logq


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean over rows of the entropy (nats) of softmax((t − center) / τt), the loss's teacher targets.

    Shapes: teacher_logits [R, K], center [1, K] → 0-dim. Range [0, ln K].
    """
    logq = _teacher_log_probs(teacher_logits, center, temp)
    return _entropy(logq.exp(), logq)


@torch.no_grad()
def teacher_batch_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Entropy (nats) of the batch-mean teacher distribution: small only when all rows pick the same prototypes.

    A sharp teacher (low per-row entropy) is healthy as long as different images pick different prototypes; this
    marginal entropy tells the two apart (by concavity it is ≥ :func:`teacher_entropy`). Shapes: [R, K] → 0-dim.
    """
    return _batch_entropy(_teacher_log_probs(teacher_logits, center, temp).exp())


@torch.no_grad()
def teacher_student_kl(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                       teacher_temp: float, student_temp: float, ncrops: int) -> torch.Tensor:
    """Mean KL(q_teacher ‖ p_student) over the loss's crop pairs (teacher crop iq ∈ {0, 1}, student crop v ≠ iq).

    Each pair's cross-entropy is H(q_iq) + KL and every teacher crop appears in ncrops − 1 pairs, so
    KL = loss − :func:`teacher_entropy` for the same center. Computed directly here (about one loss forward of
    work); :func:`health_metrics` takes the loss instead and skips the student pass.

    Shapes: student_output [ncrops·B, K], teacher_output [2·B, K], center [1, K] → 0-dim.
    """
    q, logq = _targets(teacher_output, center, teacher_temp, None)
    return _student_kl(q, _entropy(q, logq), student_output, student_temp, ncrops)


@torch.no_grad()
def center_norm(center: torch.Tensor) -> torch.Tensor:
    """L2 norm of the center buffer: grows when the teacher logits drift to a common offset."""
    return center.detach().float().norm()


@torch.no_grad()
def teacher_health(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float,
                   targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The metrics of the teacher side alone: teacher_entropy, teacher_batch_entropy, center_norm (0-dim float32).

    Pass the center the step's loss uses: the training step calls this before ``DINOLoss.forward``, which then
    starts the center's update. ``targets`` (rows are distributions, e.g. Sinkhorn-Knopp's) replace the centered
    teacher softmax when given. With the loss, KL = loss − teacher_entropy completes :func:`health_metrics`.
    """
    q, logq = _targets(teacher_output, center, teacher_temp, targets)
    return {"teacher_entropy": _entropy(q, logq), "teacher_batch_entropy": _batch_entropy(q),
            "center_norm": center_norm(center)}


@torch.no_grad()
def health_metrics(student_output: torch.Tensor | None, teacher_output: torch.Tensor, center: torch.Tensor,
                   teacher_temp: float, student_temp: float, ncrops: int,
                   loss: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All health metrics of one step as 0-dim float32 tensors (stack them with the loss for one host sync).

    Keys: teacher_entropy, teacher_batch_entropy, teacher_student_kl, center_norm. With ``loss`` (the step's
    DINO loss) the KL is ``loss − teacher_entropy`` and the student logits are not read (``student_output`` may
    be None); without it the KL is computed from the student logits. Either way the KL is exact only with the
    center the loss used (the one before the loss's center update). ``targets`` as in :func:`teacher_health`.
    """
    if loss is None and student_output is None:
        raise ValueError("health_metrics needs the student logits or the loss to compute the KL")
    q, logq = _targets(teacher_output, center, teacher_temp, targets)
    entropy = _entropy(q, logq)
    if loss is not None:
        kl = loss.detach().float() - entropy
    else:
        kl = _student_kl(q, entropy, student_output, student_temp, ncrops)
    return {"teacher_entropy": entropy, "teacher_batch_entropy": _batch_entropy(q), "teacher_student_kl": kl,
            "center_norm": center_norm(center)}


def collapse_warning(entropy: float, loss: float, k: int, *, batch_entropy: float | None = None, step: int = 0,
                     warmup_steps: int = 0) -> str | None:
    """A one-line warning when the step's numbers look collapsed, else None.

    - one-hot: entropy < 5% of ln K; the batch entropy is used when given (a sharp but diverse teacher is fine);
    - uniform (only after ``warmup_steps``, since a fresh run starts near ln K): |loss − ln K| ≤ 1% of ln K while
      the teacher's entropy is ≥ 90% of ln K, or entropy ≥ 99% of ln K. A loss near ln K alone is not collapse:
      the loss is H(teacher) + KL, and a student that has not yet learnt to predict sharp, diverse targets (e.g.
      Sinkhorn-Knopp's, entropy well below ln K) also sits near ln K.
    """
    ln_k = math.log(k)
    one_hot_measure = batch_entropy if batch_entropy is not None else entropy
    if one_hot_measure < ONE_HOT_FRACTION * ln_k:
        which = "batch entropy" if batch_entropy is not None else "teacher entropy"
        return (f"step {step}: {which} {one_hot_measure:.3f} nats < {ONE_HOT_FRACTION:g}·ln K = "
                f"{ONE_HOT_FRACTION * ln_k:.2f}: the teacher collapsed to one prototype (sharpening won); raise "
                f"dino.teacher_temp or lower optim.lr")
    if step >= warmup_steps:
        if abs(loss - ln_k) <= UNIFORM_TOLERANCE * ln_k and entropy >= UNIFORM_LOSS_ENTROPY_FRACTION * ln_k:
            return (f"step {step}: loss {loss:.3f} ≈ ln K = {ln_k:.3f}: uniform collapse (teacher and student "
                    f"output the same flat distribution); lower dino.teacher_temp or its warm-up")
        if entropy >= (1 - UNIFORM_TOLERANCE) * ln_k:
            return (f"step {step}: teacher entropy {entropy:.3f} ≈ ln K = {ln_k:.3f}: uniform teacher collapse; "
                    f"lower dino.teacher_temp or its warm-up")
    return None


class CollapseDetector:
    """Stateful wrapper of :func:`collapse_warning` for a progress display: warns once when the same collapse
    condition held on ``patience`` consecutive checks, stays quiet while it persists, and re-arms only after
    ``rearm`` consecutive healthy checks (a loss hovering at the threshold is one episode, not a warning per step).

    Args:
        k: number of prototypes (model.out_dim).
        warmup_steps: no uniform-collapse warning before this step (e.g. the lr warm-up length).
        patience: consecutive collapsed checks before warning (1 = warn at once).
        rearm: consecutive healthy checks that end an episode.
    """

    def __init__(self, k: int, warmup_steps: int = 0, patience: int = 3, rearm: int = 50):
        self.k, self.warmup_steps, self.patience, self.rearm = k, warmup_steps, max(1, patience), max(1, rearm)
        self.streak = 0
        self.healthy = 0
        self.warned = False

    def update(self, step: int, entropy: float, loss: float, batch_entropy: float | None = None) -> str | None:
        """Feed one check's floats; returns a warning string at most once per collapse episode."""
        message = collapse_warning(entropy, loss, self.k, batch_entropy=batch_entropy, step=step,
                                   warmup_steps=self.warmup_steps)
        if message is None:
            self.streak = 0
            self.healthy += 1
            if self.healthy >= self.rearm:
                self.warned = False
            return None
        self.healthy = 0
        self.streak += 1
        if self.streak >= self.patience and not self.warned:
            self.warned = True
            return message
        return None
