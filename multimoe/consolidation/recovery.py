"""`recover()`: distillation recovery of consolidated tenants.

Consolidation shares experts that are merely close, so a tenant whose experts were replaced answers
less like its original model. Recovery trains each recovered tenant's *own* layers (its decoder
layers: attention, norms, router, and whatever else lives under `model.layers.<l>.tenants.<tenant>`,
low-rank expert deltas included; and, by default, its final norm) so that its next-token
distribution matches its original's again, on the scored tokens of calibration data. The shared
pool, every other tenant, and the tenants' embeddings and heads (which may be tied) are frozen and
stay bit-identical.

1. **Teachers.** Each original runs once, one at a time, one decoder layer at a time
   (`streaming.LayerByLayerModel`), on the model's device. Kept per scored position: the original's
   top-k log-probabilities (float16) and their token ids (int32), and the log of the probability
   mass outside them (float16, the "rest" bucket), so that the k + 1 buckets form a proper
   distribution: `positions x (k x (2 + 4) + 2)` bytes per tenant, in CPU memory.
2. **Training.** AdamW on the recovered tenants' own parameters (float32 master copies of those
   held in a lower precision), the gradient norm clipped per tenant, on mixed batches: one forward
   serves `batch_rows` rows of every recovered tenant (one tenant per row; the pool runs once for
   all of them). The loss is each tenant's mean KL(original || tenant) over its scored positions,
   summed over tenants; tenants share no trainable parameter and their rows do not interact, so
   each tenant's update is the one it would get trained alone. Each tenant's row order is drawn
   from `seed`. A tenant already within `min_kl` of its original is not trained; a parameter whose
   storage the model does not hold alone (a model built from loaded models reads their final norms
   without a copy) gets a copy of its own first, so that training never writes into an original.
3. **Measure.** KL and the language-model loss (cross-entropy against the labels) on the same
   scored tokens, before and after, per tenant: `RecoveryReport`. A tenant whose KL ends higher
   than it started gets its parameters from before training back.

The model runs in eval mode throughout (no dropout or router jitter: the tenant is trained on what
it serves), with position ids counted from each row's first real token, as `generate` counts them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..assembly import TenantSet
from ..checkpoints import TenantSource
from ..generation import positions_from_mask
from ..modeling import MultiTenantLM
from ..validation import check_number
from .calibration import PAIR_KEYS, CalibrationData, per_tenant_data
from .streaming import LayerByLayerModel

DEFAULT_LR = 1e-4
# A tenant this close to its original (KL, nats per scored token) is not trained: there is nothing to
# recover, and Adam's normalised steps on near-zero gradients would only add noise. Storing the
# teacher in float16 alone leaves a lossless tenant about 1e-7 away.
DEFAULT_MIN_KL = 1e-5
DEFAULT_TOP_K = 32
DEFAULT_BATCH_ROWS = 8
VALUE_DTYPE = torch.float16  # log-probabilities kept per scored position
ID_DTYPE = torch.int32  # their token ids


def scored_window(labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(`logits_to_keep`, the scored mask over the kept positions but the last): a causal LM scores
    label t + 1 with the logits of position t, and only the trailing positions from the first one
    that scores anything are kept, so a batch of prompt/completion pairs computes the head on the
    completions only."""
    scored = labels[:, 1:] != -100  # [B, L - 1]: position t scores label t + 1
    columns = scored.any(0).nonzero()
    first = int(columns[0]) if len(columns) else scored.shape[1] - 1
    return labels.shape[1] - first, scored[:, first:]


def scored_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probabilities at the scored positions of the logits `scored_window` kept ([n, V], in
    float32), and the labels they score ([n])."""
    log_probs = logits[:, :-1][scored].float().log_softmax(-1)
    return log_probs, labels[:, 1:][:, -scored.shape[1] :][scored]


@dataclass
class Teacher:
    """One original's next-token distributions at the scored positions of its calibration rows
    (row-major: rows in order, each row's positions in order; row r's are `offsets[r]:offsets[r + 1]`)."""

    values: torch.Tensor  # [N, k] float16: top-k log-probabilities, largest first
    ids: torch.Tensor  # [N, k] int32: their token ids
    tail: torch.Tensor | None  # [N] float16: log of the mass outside the top k; None when k is the vocabulary
    offsets: torch.Tensor  # [rows + 1] int64
    loss: float  # the original's own cross-entropy on the scored tokens
    seconds: float

    @property
    def positions(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        """The distributions kept: positions x (k x (value + id bytes) + tail bytes)."""
        tail = 0 if self.tail is None else self.tail.nbytes
        return self.values.nbytes + self.ids.nbytes + tail

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The entries of `rows`, in that order."""
        index = torch.cat([torch.arange(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows.tolist()])
        tail = None if self.tail is None else self.tail[index]
        return self.values[index], self.ids[index], tail


class StreamedOriginal(LayerByLayerModel):
    """`LayerByLayerModel` on `device` (each layer is moved there as it is read), giving its forwards
    position ids counted from each row's first real token."""

    def __init__(self, tenants: TenantSet, name: str, data: CalibrationData, device: torch.device):
        self.device = device
        super().__init__(tenants, name, data)
        for module in self.model.modules():  # real buffers (rotary frequencies): the parameters come as read
            for key, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta:
                    module._buffers[key] = buffer.to(device)
        self.model.register_forward_pre_hook(self.with_positions, with_kwargs=True)

    @staticmethod
    def with_positions(module, args, kwargs):
        if kwargs.get("position_ids") is None and kwargs.get("attention_mask") is not None:
            kwargs["position_ids"] = positions_from_mask(kwargs["attention_mask"])
        return args, kwargs

    def read(self, templates, prefix, given):
        moved: dict[int, torch.Tensor] = {}  # a tied embedding read once stays one tensor
        state = super().read(templates, prefix, given)
        for tensor in state.values():
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(self.device)
        return {key: moved[id(tensor)] for key, tensor in state.items()}


def on_device(data: CalibrationData, device: torch.device) -> CalibrationData:
    return CalibrationData(data.input_ids.to(device), data.attention_mask.to(device), data.labels.to(device))


@torch.no_grad()
def teacher_distributions(
    tenants: TenantSet, name: str, data: CalibrationData, top_k: int, device: torch.device | str = "cpu"
) -> Teacher:
    """Tenant `name`'s original (in `tenants`) on `data`, run one decoder layer at a time on
    `device`: its top-`top_k` log-probabilities, their ids and the rest's log-mass per scored
    position. At most one decoder layer, the embeddings and head, and the hidden states of the
    calibration rows are held at once; the model is dropped before returning."""
    start = time.perf_counter()
    device = torch.device(device)
    streamed = StreamedOriginal(tenants, name, on_device(data, device), device)
    for layer_idx in range(tenants.num_layers):
        streamed.run_layer(layer_idx)
    values, ids, tails, counts = [], [], [], []
    total_loss = 0.0
    for input_ids, attention_mask, labels in streamed.data.batches():  # in order: the stubs replay each chunk
        keep, scored = scored_window(labels)
        logits = streamed.model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False,
            output_router_logits=False,
        ).logits
        log_probs, targets = scored_log_probs(logits, labels, scored)  # [n, V], [n]
        total_loss += float(-log_probs.gather(1, targets[:, None]).sum())
        k = min(top_k, log_probs.shape[-1])
        top, top_ids = log_probs.topk(k, dim=-1)
        values.append(top.to(VALUE_DTYPE).cpu())
        ids.append(top_ids.to(ID_DTYPE).cpu())
        if k < log_probs.shape[-1]:
            tails.append(log_probs.scatter(1, top_ids, -math.inf).logsumexp(-1).to(VALUE_DTYPE).cpu())
        counts.append(scored.sum(1).cpu())
    del streamed
    counts = torch.cat(counts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return Teacher(
        values=torch.cat(values),
        ids=torch.cat(ids),
        tail=torch.cat(tails) if tails else None,
        offsets=offsets,
        loss=total_loss / max(int(offsets[-1]), 1),
        seconds=time.perf_counter() - start,
    )


def kl_to_teacher(
    log_probs: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor | None
) -> torch.Tensor:
    """KL(teacher || student) per position over the teacher's top-k tokens plus the rest as one
    bucket; `log_probs` [N, V] are the student's. The stored teacher is renormalised over its k + 1
    buckets first (float16 rounding leaves it a hair off), so the KL is that of two distributions."""
    ids = ids.to(device=log_probs.device, dtype=torch.long)
    teacher = values.to(log_probs.device).float()
    student = log_probs.gather(1, ids)
    if tail is not None:
        teacher = torch.cat([teacher, tail.to(log_probs.device).float()[:, None]], 1)
        student = torch.cat([student, log_probs.scatter(1, ids, -math.inf).logsumexp(-1, keepdim=True)], 1)
    teacher = teacher - teacher.logsumexp(-1, keepdim=True)
    p = teacher.exp()
    return torch.where(p > 0, p * (teacher - student), 0.0).sum(-1)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    tenant_names: list[str]
    values: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor | None
    positions: list[int]  # scored positions per tenant part, in order

    @classmethod
    def of(cls, parts: list[tuple[str, CalibrationData, Teacher, torch.Tensor]]) -> Batch:
        """Rows of one or more tenants, each part trimmed of its common left padding, then all
        left-padded to one length; the teachers' entries in the same (row-major) order."""
        pieces = []
        for name, data, teacher, rows in parts:
            mask = data.attention_mask[rows]
            first = int(mask.any(0).long().argmax())
            pieces.append((data.input_ids[rows][:, first:], mask[:, first:], data.labels[rows][:, first:]))
        length = max(piece[0].shape[1] for piece in pieces)

        def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return nn.functional.pad(tensor, (length - tensor.shape[1], 0), value=value)

        entries = [teacher.rows(rows) for _, _, teacher, rows in parts]
        return cls(
            input_ids=torch.cat([pad(ids, 0) for ids, _, _ in pieces]),
            attention_mask=torch.cat([pad(mask, 0) for _, mask, _ in pieces]),
            labels=torch.cat([pad(labels, -100) for _, _, labels in pieces]),
            tenant_names=[name for name, _, _, rows in parts for _ in range(len(rows))],
            values=torch.cat([entry[0] for entry in entries]),
            ids=torch.cat([entry[1] for entry in entries]),
            tail=None if entries[0][2] is None else torch.cat([entry[2] for entry in entries]),
            positions=[entry[0].shape[0] for entry in entries],
        )

    def run(self, model: MultiTenantLM, device: torch.device, **tenant) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL per scored position, cross-entropy per scored position) of the model on this batch."""
        input_ids, mask, labels = (tensor.to(device) for tensor in (self.input_ids, self.attention_mask, self.labels))
        keep, scored = scored_window(labels)
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=keep,
            use_cache=False, output_router_logits=False, **tenant,
        ).logits
        log_probs, targets = scored_log_probs(logits, labels, scored)
        cross_entropy = -log_probs.gather(1, targets[:, None])[:, 0]
        return kl_to_teacher(log_probs, self.values, self.ids, self.tail), cross_entropy


@torch.no_grad()
def measure(
    model: MultiTenantLM, name: str, data: CalibrationData, teacher: Teacher, batch_rows: int, device: torch.device
) -> tuple[float, float]:
    """Tenant `name`'s mean KL to its original and mean cross-entropy, per scored token."""
    kl, cross_entropy = 0.0, 0.0
    for start in range(0, data.input_ids.shape[0], batch_rows):
        rows = torch.arange(start, min(start + batch_rows, data.input_ids.shape[0]))
        per_position_kl, per_position_ce = Batch.of([(name, data, teacher, rows)]).run(model, device, tenant=name)
        kl += float(per_position_kl.sum())
        cross_entropy += float(per_position_ce.sum())
    return kl / teacher.positions, cross_entropy / teacher.positions


class RowOrder:
    """Endless epochs over a tenant's rows, each in a fresh random order drawn from `generator`."""

    def __init__(self, rows: int, generator: torch.Generator):
        self.count, self.generator = rows, generator
        self.order, self.at = torch.randperm(rows, generator=generator), 0

    def take(self, n: int) -> torch.Tensor:
        taken = []
        while n > 0:
            if self.at == self.count:
                self.order, self.at = torch.randperm(self.count, generator=self.generator), 0
            step = min(n, self.count - self.at)
            taken.append(self.order[self.at : self.at + step])
            self.at, n = self.at + step, n - step
        return torch.cat(taken)


class MasterWeights:
    """The parameters an optimizer trains, as float32 tensors: a float32 (or float64) parameter
    itself, else a float32 copy whose gradient comes from the parameter's and whose value is copied
    back after each step (small updates would round away in bfloat16)."""

    def __init__(self, parameters: list[nn.Parameter]):
        self.parameters = parameters
        self.masters = [
            p if p.dtype in (torch.float32, torch.float64) else p.detach().float().requires_grad_() for p in parameters
        ]

    def take_gradients(self) -> None:
        for parameter, master in zip(self.parameters, self.masters):
            if master is not parameter:
                master.grad = None if parameter.grad is None else parameter.grad.float()
                parameter.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        for parameter, master in zip(self.parameters, self.masters):
            if master is not parameter:
                parameter.copy_(master)


@contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode within the block; afterwards (also on error) each as it was."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def training_only(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """Within the block: every parameter of `model` frozen but `trainable`, which start without a
    gradient. Afterwards (also on error) every requires_grad flag and every trainable parameter's
    gradient are as they were."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gradients = [(p, p.grad) for p in trainable]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
            parameter.grad = None
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for parameter, gradient in gradients:
            parameter.grad = gradient


class Snapshot:
    """A CPU copy of some parameters, to put back (in place, so the model's layout is kept)."""

    def __init__(self, parameters: list[nn.Parameter]):
        self.parameters = parameters
        self.values = [p.detach().to("cpu", copy=True) for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: list[nn.Parameter] | None = None) -> None:
        wanted = None if parameters is None else {id(p) for p in parameters}
        for parameter, value in zip(self.parameters, self.values):
            if wanted is None or id(parameter) in wanted:
                parameter.copy_(value)


# What recovery did to a tenant (`TenantRecovery.outcome`).
TRAINED = "trained"
MEASURED = "measured only (steps=0)"
ALREADY_CLOSE = "not trained (KL already within min_kl)"
RESTORED = "restored (training raised its KL)"


@dataclass(frozen=True)
class TenantRecovery:
    """One recovered tenant, on its calibration data's scored tokens (means per token, nats)."""

    kl_before: float  # KL(original || tenant) over the original's top-k tokens and the rest
    kl_after: float
    loss_before: float  # cross-entropy against the labels
    loss_after: float
    original_loss: float  # the original model's own cross-entropy on the same tokens
    positions: int  # scored positions
    teacher_bytes: int  # the original's distributions kept: positions x (k x 6 + 2)
    teacher_seconds: float
    trainable_parameters: int  # its own parameters recovery may train
    outcome: str  # "trained", "measured only (steps=0)", "not trained (KL already within min_kl)" or
    # "restored (training raised its KL)": its parameters are then bit-identical to before


@dataclass
class RecoveryReport:
    settings: dict
    tenants: dict[str, TenantRecovery]
    steps: int  # optimizer steps; each trains every recovered tenant on batch_rows of its rows
    training_seconds: float  # measuring before and after included
    seconds: float  # the whole call, teachers included
    notes: list[str] = field(default_factory=list)

    @property
    def loss_after(self) -> dict[str, float]:
        return {name: tenant.loss_after for name, tenant in self.tenants.items()}

    def to_markdown(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self.settings.items())
        lines = [
            f"**Recovery** of {len(self.tenants)} tenants ({settings}): {self.steps} steps in {self.seconds:.1f} s "
            f"({self.training_seconds:.1f} s training and measuring).",
            "",
            "| tenant | KL before | KL after | loss before | loss after | original's loss | scored tokens "
            "| teacher bytes | teacher s | trainable parameters | outcome |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, t in self.tenants.items():
            lines.append(
                f"| {name} | {t.kl_before:.4g} | {t.kl_after:.4g} | {t.loss_before:.4f} | {t.loss_after:.4f} "
                f"| {t.original_loss:.4f} | {t.positions} | {t.teacher_bytes} | {t.teacher_seconds:.1f} "
                f"| {t.trainable_parameters} | {t.outcome} |"
            )
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def trained_modules(model: MultiTenantLM, name: str, final_norm: bool) -> dict[str, nn.Module]:
    """Tenant `name`'s modules recovery trains, by path: its decoder layers (and its final norm);
    never the pool, another tenant's, or its embeddings and head."""
    prefixes = ("model.layers.", "model.norm.") if final_norm else ("model.layers.",)
    return {path: module for path, module in model.tenant_modules(name).items() if path.startswith(prefixes)}


def own_parameters(model: MultiTenantLM, name: str, final_norm: bool) -> list[nn.Parameter]:
    """The parameters of tenant `name`'s `trained_modules`, each once."""
    found = {}
    for module in trained_modules(model, name, final_norm).values():
        for parameter in module.parameters():
            found[id(parameter)] = parameter
    return list(found.values())


def check_not_shared(model: MultiTenantLM, trainable: dict[str, list[nn.Parameter]], final_norm: bool) -> None:
    """Refuse a trainable parameter that any module outside its tenant's trained modules also holds
    (a tie to an embedding, a head, the pool or another tenant): training it would change them."""
    owner = {id(p): name for name, parameters in trainable.items() for p in parameters}
    trained_paths = {path for name in trainable for path in trained_modules(model, name, final_norm)}
    for path, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in owner and not any(path.startswith(f"{trained}.") for trained in trained_paths):
            raise ValueError(
                f"Tenant {owner[id(parameter)]!r}'s parameter is also {path}, which recovery must not change; "
                "recover cannot train it."
            )


def model_made_stacks(model: nn.Module) -> set[tuple[torch.device, int]]:
    """The storages that hold several of the model's tensors and nothing else: those it laid out
    side by side itself (`lay_side_by_side`, or the assembly's stacks), which no one outside holds."""
    occupants: dict[tuple[torch.device, int], list[int]] = {}
    sizes: dict[tuple[torch.device, int], int] = {}
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen or tensor.is_meta:
            continue
        seen.add(id(tensor))
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        occupants.setdefault(key, []).append(tensor.nbytes)
        sizes[key] = tensor.untyped_storage().nbytes()
    return {key for key, held in occupants.items() if len(held) > 1 and sum(held) == sizes[key]}


def own_storage(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    """Give each trainable parameter storage the model alone holds, before training writes into it in
    place. A model built from loaded models reads some of their tensors without a copy (a tenant's
    final norm is its source's own tensor): training that in place would change the source, the very
    original the tenant is being taught to match. Parameters laid out side by side with other
    tenants' (a storage the model made) keep their place; any other gets a copy of its own (the
    same values)."""
    stacks = model_made_stacks(model)
    for parameter in trainable:
        if (parameter.device, parameter.untyped_storage().data_ptr()) not in stacks:
            parameter.data = parameter.detach().clone()


def tenant_calibration(calibration, names: list[str], tenants: list[str], tokenizer) -> dict[str, CalibrationData]:
    """`per_tenant_data` for the recovered tenants; a per-tenant mapping may name more of the
    model's tenants than are recovered."""
    if isinstance(calibration, Mapping) and set(calibration) != PAIR_KEYS:
        unknown = [key for key in calibration if key not in tenants]
        if unknown:
            raise ValueError(f"calibration names tenants the model does not hold: {unknown}; its tenants: {tenants}.")
        calibration = {name: calibration[name] for name in names if name in calibration}
    return per_tenant_data(calibration, names, tokenizer)


def recover(
    model: MultiTenantLM,
    originals: Mapping[str, TenantSource],
    *,
    calibration,
    tokenizer=None,
    steps: int = 200,
    lr: float = DEFAULT_LR,
    top_k: int = DEFAULT_TOP_K,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    max_grad_norm: float = 1.0,
    train_final_norm: bool = True,
    min_kl: float = DEFAULT_MIN_KL,
    seed: int = 0,
    revision: str | None = None,
    progress: bool = True,
) -> RecoveryReport:
    """Train each tenant named in `originals` to match its original model's next-token distribution
    again, after consolidation, changing only that tenant's own decoder layers (attention, norms,
    router; low-rank expert deltas where a tenant has them) and, with `train_final_norm`, its final
    norm. The shared pool, the other tenants, and the tenants' embeddings and heads stay
    bit-identical.

    Args:
        model: a multi-tenant causal LM (from `consolidate`, `from_models` or `from_pretrained`);
            encoder-decoder families (Switch Transformers) are refused.
        originals: `{tenant: its original model}`, as `consolidate` takes them (a loaded model of the
            model's family, a local directory or a Hub id), for some or all of the model's tenants:
            those are recovered.
        calibration: what `consolidate` takes: texts (every token scored, needs `tokenizer`),
            `{"prompt", "completion"}` pairs (the completion scored), token ids, or a mapping
            `{tenant: its own data}` (it may name tenants not recovered: they are ignored).
        steps: optimizer steps; 0 only measures (the model is left as it was).
        lr: AdamW's learning rate (constant; weight decay 0). 1e-4: on the shipped testbed 1e-3
            overfits 64 calibration pairs per tenant and costs held-out exact match.
        top_k: the original's log-probabilities kept per scored position (the rest is one bucket).
        batch_rows: each recovered tenant's rows per step (one mixed batch holds every tenant's),
            and the rows per forward when measuring.
        max_grad_norm: each tenant's gradient norm is clipped to it.
        train_final_norm: train the tenant's final norm too (its embedding and head never are).
        min_kl: a tenant whose KL to its original is at most this (nats per scored token) is not
            trained (a tenant kept lossless, such as `keep_anchor`'s anchor: Adam's steps on
            near-zero gradients would only add noise).
        seed: draws the order the rows are visited in.

    Memory: each teacher is streamed (one decoder layer of one original at a time on the model's
    device, with its embeddings and head and the calibration rows' hidden states); what is kept is
    `positions x (top_k x 6 + 2)` bytes per tenant in CPU memory. Training adds AdamW's two states
    per trained parameter (float32; with a float32 master copy of each parameter held in a lower
    precision), the gradients, a CPU copy of the trained parameters (an error restores them from it)
    and one batch's activations.

    A tenant whose KL (on the calibration data) ends higher than it started is restored to its
    parameters before training (its `outcome` says so). Every option is checked, and the originals
    and calibration opened, before anything changes. On any error the trained parameters are
    restored, and in every case each `requires_grad` flag,
    module mode and gradient is as it was: the model returns in the mode it came in (a model from
    `consolidate` or `from_pretrained` is in eval mode). Returns a `RecoveryReport`; with
    `steps > 0`, a `consolidation_report` that has a `loss_after_recovery` field gets each
    recovered tenant's loss after recovery.
    """
    started = time.perf_counter()
    check_number("steps", steps, integer=True)
    check_number("lr", lr, positive=True)
    check_number("top_k", top_k, positive=True, integer=True)
    check_number("batch_rows", batch_rows, positive=True, integer=True)
    check_number("max_grad_norm", max_grad_norm, positive=True)
    check_number("min_kl", min_kl)
    check_number("seed", seed, integer=True)
    if not isinstance(train_final_norm, bool):
        raise TypeError(f"train_final_norm must be a bool, got {train_final_norm!r}.")
    if not isinstance(model, MultiTenantLM):
        raise TypeError(f"recover takes a multi-tenant model (multimoe.MultiTenantLM), got {type(model).__name__}.")
    if model.config.is_encoder_decoder:
        raise ValueError(
            f"recover trains causal LMs; {type(model).__name__} is an encoder-decoder model, which it does not support."
        )
    if not isinstance(originals, Mapping) or not originals:
        raise ValueError("Give the originals as a non-empty mapping {tenant: model, directory or Hub id}.")
    unknown = [name for name in originals if name not in model.tenants]
    if unknown:
        raise ValueError(f"Unknown tenants in originals: {unknown}; the model's tenants are {model.tenants}.")
    if calibration is None:
        raise ValueError("recover needs calibration data: the teachers' distributions are taken on it.")
    names = [name for name in model.tenants if name in originals]  # the model's order
    data = tenant_calibration(calibration, names, model.tenants, tokenizer)
    sources = {name: TenantSet.open({name: originals[name]}, revision=revision) for name in names}  # configs only
    for name, source in sources.items():
        config = source.reference
        if source.family.model_type != model.family.model_type or config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"Tenant {name!r}: its original is a {source.family.model_type} model with a vocabulary of "
                f"{config.vocab_size}; the model is {model.family.model_type} with {model.config.vocab_size}."
            )
    trainable = {name: own_parameters(model, name, train_final_norm) for name in names}
    check_not_shared(model, trainable, train_final_norm)

    device = model.device
    teachers = {}
    for name in tqdm(names, desc="teachers", disable=not progress):
        teachers[name] = teacher_distributions(sources[name], name, data[name], top_k, device)
        sources.pop(name)  # the original's checkpoint (a loaded model's tensors) is not kept

    training_started = time.perf_counter()
    notes = []
    outcome = dict.fromkeys(names, MEASURED)
    with model.model.tenant_lock.reading(), in_eval_mode(model):  # no tenant edit meanwhile
        before = {name: measure(model, name, data[name], teachers[name], batch_rows, device) for name in names}
        after = dict(before)
        trained = [name for name in names if before[name][0] > min_kl] if steps > 0 else []
        if steps > 0:
            outcome.update((name, TRAINED if name in trained else ALREADY_CLOSE) for name in names)
        if trained:
            every = [p for name in trained for p in trainable[name]]
            own_storage(model, every)
            snapshot = Snapshot(every)
            with training_only(model, every):
                try:
                    train(model, trained, data, teachers, trainable, steps, lr, batch_rows, max_grad_norm, seed,
                          device, progress)
                except BaseException:
                    snapshot.restore()
                    raise
            for name in trained:
                after[name] = measure(model, name, data[name], teachers[name], batch_rows, device)
            for name in trained:
                if after[name][0] > before[name][0]:
                    snapshot.restore(trainable[name])
                    after[name], outcome[name] = before[name], RESTORED
            del snapshot
    finished = time.perf_counter()
    if any(value == ALREADY_CLOSE for value in outcome.values()):
        notes.append(f"Tenants within min_kl={min_kl} nats per token of their original were not trained.")
    if any(value == RESTORED for value in outcome.values()):
        notes.append("Tenants whose KL rose in training were restored to their parameters before it (try a lower lr).")

    report = RecoveryReport(
        settings=dict(steps=steps, lr=lr, top_k=top_k, batch_rows=batch_rows, max_grad_norm=max_grad_norm,
                      train_final_norm=train_final_norm, min_kl=min_kl, seed=seed),
        tenants={
            name: TenantRecovery(
                kl_before=max(before[name][0], 0.0), kl_after=max(after[name][0], 0.0), loss_before=before[name][1],
                loss_after=after[name][1], original_loss=teachers[name].loss, positions=teachers[name].positions,
                teacher_bytes=teachers[name].nbytes, teacher_seconds=teachers[name].seconds,
                trainable_parameters=sum(p.numel() for p in trainable[name]), outcome=outcome[name],
            )
            for name in names
        },
        steps=steps,
        training_seconds=finished - training_started,
        seconds=finished - started,
        notes=notes,
    )
    consolidation_report = getattr(model, "consolidation_report", None)
    if steps > 0 and consolidation_report is not None and hasattr(consolidation_report, "loss_after_recovery"):
        earlier = consolidation_report.loss_after_recovery or {}  # tenants recovered by an earlier call
        consolidation_report.loss_after_recovery = dict(earlier) | report.loss_after
    return report


def train(
    model: MultiTenantLM,
    names: list[str],
    data: dict[str, CalibrationData],
    teachers: dict[str, Teacher],
    trainable: dict[str, list[nn.Parameter]],
    steps: int,
    lr: float,
    batch_rows: int,
    max_grad_norm: float,
    seed: int,
    device: torch.device,
    progress: bool,
) -> None:
    # Each tenant's own row order, the same whichever other tenants are recovered with it.
    orders = {name: RowOrder(data[name].input_ids.shape[0], torch.Generator().manual_seed(seed)) for name in names}
    masters = {name: MasterWeights(trainable[name]) for name in names}
    optimizer = torch.optim.AdamW(
        [{"params": masters[name].masters} for name in names], lr=lr, weight_decay=0.0
    )
    bar = tqdm(range(steps), desc="recovery", disable=not progress)
    for _ in bar:
        batch = Batch.of([(name, data[name], teachers[name], orders[name].take(batch_rows)) for name in names])
        kl, _ = batch.run(model, device, tenant_names=batch.tenant_names)
        losses = torch.stack([part.mean() for part in kl.split(batch.positions)])
        loss = losses.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"recover: the loss became {float(loss)}; lower lr (now {lr}).")
        loss.backward()
        for name in names:
            masters[name].take_gradients()
            torch.nn.utils.clip_grad_norm_(masters[name].masters, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name in names:
            masters[name].write_back()
            for parameter in trainable[name]:
                parameter.grad = None
        bar.set_postfix(kl=f"{float(losses.detach().mean()):.4g}")


__all__ = ["RecoveryReport", "Teacher", "TenantRecovery", "recover", "teacher_distributions"]
