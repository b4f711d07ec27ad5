"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over a frozen base with BitFit deltas: 2 gloo processes on CPU.

Each decoder layer is sharded, then the whole model, as a user would for a model that does not fit one device. The
two processes train on halves of a batch; a single process trains on the whole batch. The losses and the saved
adapters must agree (float32; AdamW's normalisation turns float-rounding differences in the gradients into ~1e-6
differences in the deltas, hence the tolerance). `save_pretrained` runs on every rank (`is_main_process` on rank 0):
it gathers only the adapter's own tensors, checked by counting what `DTensor.full_tensor` gathers. A sharded
checkpoint of the trainable state (torch.distributed.checkpoint, frozen weights left out) resumes the run exactly.
"""

from __future__ import annotations

import os
import pathlib
import socket
from typing import Any

import pytest
import torch
from models import CASES, build_model

STEPS = 4
RESUME_AT = 2
WORLD = 2
ATOL = 1e-5
_LLAMA = next(c for c in CASES if c.name == "llama")

pytestmark = pytest.mark.slow


def _ids() -> torch.Tensor:
    # No padding: each rank's mean token loss over its half is then half of the global mean's sum, as FSDP averages.
    return torch.randint(3, 99, (4, 7), generator=torch.Generator().manual_seed(5))


def _build() -> Any:
    from peft import get_peft_model

    import bitfit_peft

    base = build_model(_LLAMA.auto_class, _LLAMA.config(), frozen=False)
    config = bitfit_peft.BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True)
    return get_peft_model(base, config).train()


def _optimizer(model: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _step(model: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def _single(out: pathlib.Path) -> list[float]:
    model = _build()
    optimizer = _optimizer(model)
    losses = [_step(model, optimizer, _ids()).item() for _ in range(STEPS)]
    model.save_pretrained(out)
    return losses


def _shard(model: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _worker(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ids = _ids()[rank * 2 : (rank + 1) * 2]
        model = _shard(_build())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        optimizer = _optimizer(model)
        grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = dict(model.named_parameters())
        # The optimizer holds exactly the deltas (sharded), nothing of the frozen base.
        assert trainable and all("bitfit_delta" in n for n in trainable), sorted(trainable)[:3]
        assert grouped == {id(named[n]) for n in trainable}
        assert all(isinstance(named[n], DTensor) for n in trainable)
        options = StateDictOptions(ignore_frozen_params=True)
        losses = []
        for step in range(STEPS):
            if step == RESUME_AT:
                state, optim_state = get_state_dict(model, optimizer, options=options)
                dcp.save({"model": state, "optim": optim_state}, checkpoint_id=f"{root}/dcp")
            loss = _step(model, optimizer, ids)
            dist.all_reduce(loss)
            losses.append(loss.item() / WORLD)
        gathered: list[int] = []
        full_tensor = DTensor.full_tensor

        def counting(self: DTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            gathered.append(self.numel())
            return full_tensor(self, *args, **kwargs)

        DTensor.full_tensor = counting  # type: ignore[method-assign]
        try:
            model.save_pretrained(f"{root}/sharded", is_main_process=rank == 0)
        finally:
            DTensor.full_tensor = full_tensor  # type: ignore[method-assign]
        delta_numel = sum(named[n].numel() for n in trainable)
        # Resume: a fresh sharded model and optimizer from the checkpoint replay the last steps exactly.
        resumed = _shard(_build())
        resumed_opt = _optimizer(resumed)
        state, optim_state = get_state_dict(resumed, resumed_opt, options=options)
        dcp.load({"model": state, "optim": optim_state}, checkpoint_id=f"{root}/dcp")
        # strict=False: the checkpoint holds the trainable state only; the frozen base comes from the base model.
        load_options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_state_dict(
            resumed, resumed_opt, model_state_dict=state, optim_state_dict=optim_state, options=load_options
        )
        replayed = []
        for _ in range(RESUME_AT, STEPS):
            loss = _step(resumed, resumed_opt, ids)
            dist.all_reduce(loss)
            replayed.append(loss.item() / WORLD)
        resumed.save_pretrained(f"{root}/resumed", is_main_process=rank == 0)
        if rank == 0:
            torch.save(
                {"losses": losses, "replayed": replayed, "gathered": gathered, "delta_numel": delta_numel},
                f"{root}/result.pt",
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fsdp2_matches_one_process_saves_only_the_adapter_and_resumes(tmp_path: pathlib.Path) -> None:
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _single(tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "result.pt")
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference), rtol=0, atol=ATOL)
    torch.testing.assert_close(
        torch.tensor(result["replayed"]), torch.tensor(reference[RESUME_AT:]), rtol=0, atol=ATOL
    )
    # Only the adapter was gathered: its deltas, one full_tensor each, and nothing of the frozen base.
    assert sum(result["gathered"]) == result["delta_numel"], result["gathered"]
    want = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert len(want) > 10
    for name in ("sharded", "resumed"):
        got = load_file(tmp_path / name / "adapter_model.safetensors")
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            torch.testing.assert_close(
                got[key], value, rtol=0, atol=ATOL, msg=lambda m, k=key, n=name: f"{n} {k}: {m}"
            )
    configs = [(tmp_path / n / "adapter_config.json").read_text() for n in ("single", "sharded")]
    fingerprints = [c.split('"base_fingerprint": ')[1].split(",")[0] for c in configs]
    assert fingerprints[0] == fingerprints[1], fingerprints
