"""Run train/tab_pretrain.py in a subprocess that SIGKILLs itself at a chosen point (tests only).

    python tests/kill_harness.py <events.log> <phase or ""> <index> -- <tab_pretrain flags...>

Every file-system step of a checkpoint or of the final save (writes, fsyncs, renames, deletions)
and every optimizer step is an "event", logged with the phase it belongs to: `step:<n>` (after
optimizer step n, before its checkpoint), `ckpt:<n>` (writing the checkpoint of step n), `final`
(writing the artifact). With a phase given, the process kills itself with SIGKILL just before the
index-th event (1-based) of that phase: no cleanup handler, no flushing, exactly like `kill -9`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

PHASE = ["startup"]
COUNTS: dict[str, int] = {}


def main() -> None:
    log_path, kill_phase, kill_index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    flags = sys.argv[sys.argv.index("--") + 1 :]
    log = open(log_path, "a", buffering=1)

    def event(name: str) -> None:
        phase = PHASE[-1]
        COUNTS[phase] = COUNTS.get(phase, 0) + 1
        log.write(json.dumps([phase, COUNTS[phase], name]) + "\n")
        if phase == kill_phase and COUNTS[phase] == kill_index:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            event(name)
            return original(*args, **kwargs)

        setattr(owner, attribute, wrapper)

    import safetensors.torch

    import train.checkpoints as checkpoints
    import train.common as common
    import train.tab_pretrain as script

    for owner, attribute in [(os, "replace"), (os, "rename"), (os, "fsync"), (shutil, "rmtree"),
                             (json, "dump"), (safetensors.torch, "save_file"),
                             (checkpoints, "save_file"), (checkpoints, "save_model")]:
        counted(owner, attribute, f"{getattr(owner, '__name__', owner)}.{attribute}")

    def in_phase(owner, attribute: str, phase_of) -> None:
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            phase = phase_of(*args, **kwargs)
            PHASE.append(phase)
            try:
                return original(*args, **kwargs)
            finally:
                if phase == kill_phase and COUNTS.get(phase, 0) < kill_index:
                    os.kill(os.getpid(), signal.SIGKILL)  # fewer events than planned: die at its end
                PHASE.pop()

        setattr(owner, attribute, wrapper)

    in_phase(common, "save_checkpoint", lambda accelerator, progress, *rest: f"ckpt:{progress.step}")
    in_phase(script, "save_artifact", lambda *args, **kwargs: "final")
    real_after_step = common.after_step  # the one training loop's hook after every optimizer step

    def after_step(accelerator, progress, *rest):
        PHASE.append(f"step:{progress.step}")
        event("optimizer step done")
        PHASE.pop()
        return real_after_step(accelerator, progress, *rest)

    common.after_step = after_step
    import timm.models._hub as timm_hub  # the trunk's safetensors file is written through timm

    if hasattr(timm_hub, "save_file"):
        counted(timm_hub, "save_file", "timm.save_file")
    script.main(flags)
    log.write(json.dumps(["done", 0, "finished"]) + "\n")


if __name__ == "__main__":
    main()
