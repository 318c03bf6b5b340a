"""The search objective: KL(p_dense || p_pruned) at the response positions of a calibration set.

dop's choice (paper-notes.md §3): the full-vocabulary KL at the positions that predict the dense
model's own greedy answer, teacher-forced; with one-word answers (``response_tokens=1``) that is the
last prompt position only. Per-sample mean over positions, then mean over samples.

``DenseReference`` runs the dense model once: its log-probs at the scored positions are cached on
disk in the run dir under a fingerprint (model id + weights checksum + calibration sample ids +
dtype + scoring options), so every shard, resume and search scores against the same reference;
its per-layer hidden states (inputs of each decoder layer, and each layer's state after attention)
serve prefix reuse in the sweep and are kept in memory or on disk per batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dop.errors import DopError
from dop.models import prepare_inputs


class DivergenceError(DopError, ValueError):
    """The calibration set or the dense reference cannot be used."""


@dataclass
class CalibrationBatch:
    """One left-padded batch of model inputs and the positions whose next-token law is scored."""

    inputs: dict[str, torch.Tensor]
    score_mask: torch.Tensor  # (B, T) bool
    sample_ids: list[str]

    @property
    def size(self) -> int:
        return len(self.sample_ids)


def calibration_batches(
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    batch_size: int = 8,
    *,
    model: nn.Module | None = None,
    response_tokens: int = 1,
) -> list[CalibrationBatch]:
    """Batches from samples with ``id``, ``image``, ``question``.

    ``response_tokens=1`` scores the last prompt position (the first answer token). With more, the
    dense ``model``'s greedy answer (up to that many tokens, up to EOS) is generated, appended
    (teacher forcing) and every position predicting one of its tokens is scored.
    """
    if len(samples) == 0:
        raise DivergenceError("the calibration set is empty: need at least one (image, question) sample")
    if response_tokens < 1:
        raise DivergenceError(f"response_tokens must be >= 1, got {response_tokens}")
    if response_tokens > 1 and model is None:
        raise DivergenceError("response_tokens > 1 needs the dense model to generate its answers")
    ids = [str(s.get("id", i)) for i, s in enumerate(samples)]
    if len(set(ids)) != len(ids):
        raise DivergenceError("calibration sample ids are not unique")
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = dict(prepare_inputs(processor, [s["image"] for s in chunk], [s["question"] for s in chunk]))
        B, T = inputs["input_ids"].shape
        if response_tokens == 1:
            mask = torch.zeros(B, T, dtype=torch.bool)
            mask[:, -1] = True  # left padding: the last position is every row's last prompt token
        else:
            inputs, mask = _teacher_force(model, processor, inputs, response_tokens)
        batches.append(CalibrationBatch(inputs, mask, ids[start : start + batch_size]))
    return batches


@torch.no_grad()
def _teacher_force(model: nn.Module, processor: Any, inputs: dict, n: int):
    """Append the dense greedy answer to each prompt, re-pad left, mark the predicting positions."""
    tok = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    out = model.generate(**moved, max_new_tokens=n, do_sample=False)
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    T = ids.shape[1]
    new = out[:, T:].cpu()
    placeholders = {getattr(model.config, f, None) for f in
                    ("image_token_id", "image_token_index", "video_token_id", "video_token_index")} - {None}
    rows, spans = [], []
    for b in range(ids.shape[0]):
        prompt = ids[b][attn[b].bool()]
        answer = []
        for t in new[b].tolist():
            answer.append(t)
            # stop at EOS; a placeholder id can never be fed back (it would ask for image features)
            if t == tok.eos_token_id or t in placeholders:
                break
        # the last answer token is never an input; positions P-1 .. P+len-2 predict the answer
        rows.append(torch.cat([prompt, torch.tensor(answer[:-1], dtype=ids.dtype)]))
        spans.append((len(prompt) - 1, len(answer)))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=ids.dtype)
    attention = torch.zeros((len(rows), width), dtype=attn.dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (row, (first, count)) in enumerate(zip(rows, spans)):
        off = width - len(row)
        input_ids[b, off:] = row
        attention[b, off:] = 1
        mask[b, off + first : off + first + count] = True
    forced = dict(inputs)
    forced["input_ids"], forced["attention_mask"] = input_ids, attention
    return forced, mask


def kl_per_sample(logp_dense: torch.Tensor, logits: torch.Tensor, row: torch.Tensor, batch: int) -> torch.Tensor:
    """KL(dense || pruned) per scored position, averaged per sample (rows give each one's sample)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref = logp_dense.to(logp.device, torch.float32)
    per_pos = (ref.exp() * (ref - logp)).sum(dim=-1)
    total = torch.zeros(batch, dtype=torch.float64, device=per_pos.device).index_add_(0, row, per_pos.double())
    count = torch.zeros(batch, dtype=torch.float64, device=per_pos.device).index_add_(
        0, row, torch.ones_like(per_pos, dtype=torch.float64))
    return total / count


def scored_logits(model: nn.Module, batch: CalibrationBatch, device: torch.device | str, **kwargs) -> torch.Tensor:
    """Logits at the scored positions, ``(num_scored, V)``; the LM head runs only on the tail of the
    sequence that holds them (``logits_to_keep``)."""
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
    rows, cols = batch.score_mask.nonzero(as_tuple=True)
    T = batch.score_mask.shape[1]
    keep = T - int(cols.min())
    out = model(**inputs, logits_to_keep=keep, use_cache=False, **kwargs)
    logits = out.logits
    return logits[rows.to(logits.device), (cols - (T - keep)).to(logits.device)], out


def fingerprint(model_id: str, sample_ids: Sequence[str], dtype: Any, *, weights: str = "",
                response_tokens: int = 1) -> str:
    """Identity of a dense reference: two sweeps agree only when this does."""
    doc = {"model": str(model_id), "weights": weights, "samples": list(sample_ids), "dtype": str(dtype),
           "response_tokens": int(response_tokens), "objective": "kl(dense||pruned)/v1"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def weights_checksum(model: nn.Module) -> str:
    """A cheap checksum of a few weight tensors (a retrained checkpoint under the same id differs)."""
    h = hashlib.sha256()
    for i, (name, p) in enumerate(model.named_parameters()):
        if i >= 3:
            break
        h.update(f"{name}:{tuple(p.shape)}:{float(p.detach().double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


class DenseReference:
    """Dense log-probs at the scored positions (cached on disk) + per-layer dense hidden states.

    ``hidden(b)`` returns ``(inputs, mids)`` for batch ``b``: ``inputs[l]`` is the input of decoder
    layer l (``hidden_states[l]``), ``mids[l]`` its state after the attention residual (for
    reusing the dense attention half of layer l).
    """

    def __init__(self, batches: Sequence[CalibrationBatch], fingerprint: str, num_layers: int,
                 directory: Path | None = None, hidden_store: str = "memory", keep_mids: bool = True) -> None:
        if len(batches) == 0:
            raise DivergenceError("the calibration set is empty: need at least one (image, question) sample")
        if hidden_store not in ("memory", "disk", "none"):
            raise DivergenceError(f"hidden_store must be memory, disk or none, got {hidden_store!r}")
        self.batches = list(batches)
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.directory = Path(directory) if directory is not None else None
        self.hidden_store = hidden_store
        self.keep_mids = keep_mids  # post-attention states: only half-layer reuse needs them (2x memory)
        self.logp: list[torch.Tensor] = []
        self._hidden: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.dense_layer_forwards = 0  # forwards spent building the reference (shared by all points)

    @property
    def sample_ids(self) -> list[str]:
        return [i for b in self.batches for i in b.sample_ids]

    def _file(self) -> Path | None:
        return self.directory / "reference.pt" if self.directory is not None else None

    @torch.no_grad()
    def build(self, model: nn.Module, layers: Sequence[nn.Module], device: torch.device | str) -> DenseReference:
        """Run the dense model (once per process) for hidden states; reuse cached log-probs."""
        cached = self._load()
        need_hidden = self.hidden_store != "none"
        if cached is not None and not need_hidden:
            self.logp = cached
            return self
        logps = []
        for b, batch in enumerate(self.batches):
            attn_out: dict[int, torch.Tensor] = {}
            hooks = ([layer.self_attn.register_forward_hook(_capture(attn_out, i)) for i, layer in enumerate(layers)]
                     if need_hidden and self.keep_mids else [])
            try:
                logits, out = scored_logits(model, batch, device, output_hidden_states=need_hidden)
            finally:
                for h in hooks:
                    h.remove()
            self.dense_layer_forwards += self.num_layers
            logps.append(torch.log_softmax(logits.float(), dim=-1).cpu())
            if need_hidden:
                hs = out.hidden_states
                inputs = [hs[i].detach() for i in range(self.num_layers)]
                # same op as the layer's own residual add, so bit-equal to the dense mid state
                mids = [inputs[i] + attn_out[i] for i in range(self.num_layers)] if self.keep_mids else []
                self._keep_hidden(b, inputs, mids)
        self.logp = cached if cached is not None else logps
        if cached is None:
            self._save()
        return self

    def hidden(self, b: int, device: torch.device | str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All layers' dense states of batch ``b`` (tests, tools); the sweep uses ``hidden_at``."""
        inputs, mids = self._batch_hidden(b)
        return [h.to(device) for h in inputs], [m.to(device) for m in mids]

    def hidden_at(self, b: int, layer: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, post-attention state)`` of decoder layer ``layer`` for batch ``b``, on ``device``
        (only the one layer a point needs is moved)."""
        inputs, mids = self._batch_hidden(b)
        if not mids:
            raise DivergenceError("post-attention states were not kept (keep_mids=False)")
        return inputs[layer].to(device), mids[layer].to(device)

    def input_at(self, b: int, layer: int, device: torch.device | str) -> torch.Tensor:
        """The dense input of decoder layer ``layer`` for batch ``b`` (the engine's ``prefix``)."""
        return self._batch_hidden(b)[0][layer].to(device)

    def _batch_hidden(self, b: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.hidden_store == "none":
            raise DivergenceError("dense hidden states were not kept (hidden_store=none)")
        if self.hidden_store == "disk" and b not in self._hidden:
            data = torch.load(self._hidden_file(b), map_location="cpu")
            self._hidden = {b: (data["inputs"], data["mids"])}  # one batch in memory at a time
        return self._hidden[b]

    def _hidden_file(self, b: int) -> Path:
        if self.directory is None:
            raise DivergenceError("hidden_store=disk needs a run directory")
        return self.directory / "hidden" / f"batch_{b}.pt"

    def _keep_hidden(self, b: int, inputs: list[torch.Tensor], mids: list[torch.Tensor]) -> None:
        if self.hidden_store == "disk":
            path = self._hidden_file(b)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"inputs": [h.cpu() for h in inputs], "mids": [m.cpu() for m in mids]}, tmp)
            tmp.replace(path)
        else:
            self._hidden[b] = ([h.cpu() for h in inputs], [m.cpu() for m in mids])

    def _load(self) -> list[torch.Tensor] | None:
        path = self._file()
        if path is None or not path.exists():
            return None
        try:
            data = torch.load(path, map_location="cpu")
        except Exception as exc:
            raise DivergenceError(f"dense reference {path} is unreadable ({exc}); delete it to rebuild") from exc
        if data.get("fingerprint") != self.fingerprint:
            raise DivergenceError(
                f"dense reference {path} has fingerprint {data.get('fingerprint')}, this run needs "
                f"{self.fingerprint} (other model, weights, calibration samples or dtype); use a new run dir"
            )
        return data["logp"]

    def _save(self) -> None:
        path = self._file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"fingerprint": self.fingerprint, "sample_ids": self.sample_ids, "logp": self.logp}, tmp)
        tmp.replace(path)
        (path.parent / "fingerprint.json").write_text(json.dumps(
            {"fingerprint": self.fingerprint, "sample_ids": self.sample_ids}, indent=1))


def _capture(store: dict[int, torch.Tensor], i: int):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[i] = (output[0] if isinstance(output, tuple) else output).detach()

    return hook
