"""How long a checkpoint save blocks training, synchronous vs async, and how fast
``dcp-to-hf`` converts the result.

    .venv/bin/python benchmarks/checkpoint.py [--spec ext_llama3] [--flavor smollm2-135M] [--dir DIR]

Builds the flavor on the CPU with AdamW state (one optimizer step on zero
gradients), then saves full checkpoints (model, optimizer, scheduler, train
state) through ``ext.training.checkpoint.SafeCheckpointManager`` in a 1-process gloo
world, as the trainer does:

- ``sync``: ``async_mode = "disabled"``: ``save()`` returns when the folder is
  committed; training waits for all of it;
- ``async``: ``async_mode = "async"``: ``save()`` returns once the state is
  staged (copied); the write runs in a background thread. ``blocked`` is what
  the training loop waits; ``committed`` is until ``.metadata`` is on disk.

Then converts the async checkpoint with :func:`ext.export.dcp_to_hf` (fp32,
5GB shards). Each figure is the best of ``--repeat`` runs (the machine is
shared). Prints a table, then one JSON object as the last line:
``{"device", "spec", "flavor", "params", "checkpoint_mb", "sync_save_s",
"async_blocked_s", "async_committed_s", "export_s", "export_mb_per_s"}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="ext_llama3")
    parser.add_argument("--flavor", default="smollm2-135M")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from torchtitan.components.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.config import Checkpoint
    from torchtitan.protocols.train_spec import get_train_spec

    import ext.job_config  # noqa: F401
    from ext.training.checkpoint import SafeCheckpointManager, checkpoint_problem, write_manifest
    from ext.export import dcp_to_hf

    class TrainState:
        def state_dict(self):
            return {"step": torch.tensor(1)}

        def load_state_dict(self, state):
            pass

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg-store", rank=0, world_size=1)

    spec = get_train_spec(args.spec)
    model_args = copy.deepcopy(spec.model_args[args.flavor])
    torch.manual_seed(0)
    model = spec.model_cls(model_args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-4})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizers.step()  # AdamW state exists, as in a real checkpoint
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0)

    def manager(folder: Path, mode: str) -> SafeCheckpointManager:
        return SafeCheckpointManager(
            dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
            states={"train_state": TrainState()},
            checkpoint_config=Checkpoint(enable=True, folder="checkpoint", interval=1, async_mode=mode),
            sd_adapter=None, base_folder=str(folder),
        )

    results: dict[str, list[float]] = {"sync": [], "blocked": [], "committed": [], "export": [], "manifest": [], "verify": []}
    checkpoint_mb = 0.0
    for i in range(args.repeat):
        sync_dir, async_dir, hf_dir = root / f"sync{i}", root / f"async{i}", root / f"hf{i}"
        m = manager(sync_dir, "disabled")
        m.states.pop("dataloader")
        start = time.perf_counter()
        m.save(1)
        results["sync"].append(time.perf_counter() - start)
        m.close()

        m = manager(async_dir, "async")
        m.states.pop("dataloader")
        start = time.perf_counter()
        m.save(1)
        results["blocked"].append(time.perf_counter() - start)
        m.save_future.result()
        results["committed"].append(time.perf_counter() - start)
        m.close()
        step = async_dir / "checkpoint" / "step-1"
        checkpoint_mb = _folder_mb(step)

        start = time.perf_counter()
        write_manifest(str(step))  # what rank 0 does in the background after each commit
        results["manifest"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert checkpoint_problem(str(step)) is None  # what one rank does before loading
        results["verify"].append(time.perf_counter() - start)

        start = time.perf_counter()
        dcp_to_hf(str(step), str(hf_dir), model_name=args.spec, model_args=model_args,
                  tokenizer_dir=None, progress=False)
        results["export"].append(time.perf_counter() - start)
        model_mb = _folder_mb(hf_dir)
        for d in (sync_dir, async_dir, hf_dir):
            shutil.rmtree(d)

    dist.destroy_process_group()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    best = {k: min(v) for k, v in results.items()}
    out = {
        "device": "cpu", "spec": args.spec, "flavor": args.flavor, "params": params,
        "checkpoint_mb": round(checkpoint_mb, 1),
        "sync_save_s": round(best["sync"], 3),
        "async_blocked_s": round(best["blocked"], 3),
        "async_committed_s": round(best["committed"], 3),
        "export_s": round(best["export"], 3),
        "export_mb_per_s": round(model_mb / best["export"], 1),
        "manifest_s": round(best["manifest"], 3),
        "verify_s": round(best["verify"], 3),
        "verify_mb_per_s": round(checkpoint_mb / best["verify"], 1),
    }
    print(f"{args.spec} {args.flavor}: {params:,} parameters, full checkpoint {checkpoint_mb:,.0f} MB "
          f"(best of {args.repeat})")
    print(f"  sync save          {best['sync']:8.3f} s   (training waits for all of it)")
    print(f"  async save blocks  {best['blocked']:8.3f} s   (staging); committed after {best['committed']:.3f} s")
    print(f"  dcp-to-hf          {best['export']:8.3f} s   ({model_mb:,.0f} MB of safetensors, "
          f"{out['export_mb_per_s']} MB/s)")
    print(f"  manifest (CRC-32)  {best['manifest']:8.3f} s   (background, rank 0); verify before load "
          f"{best['verify']:.3f} s ({out['verify_mb_per_s']} MB/s on one rank)")
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
