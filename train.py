"""Fine-tune LoRA adapters on a Mistral model, from a checkout (`tailor train` is the same, installed or not).

    python train.py CONFIG.yaml [key=value ...]                         one process: CPU or one GPU
    torchrun --nproc-per-node 8 train.py CONFIG.yaml [key=value ...]     one node, eight GPUs

The same command resumes a run that was stopped, killed or preempted (`resume: auto`, the default); SIGTERM or
Ctrl-C finishes the step (with several ranks, also the one queued behind it), saves a checkpoint and exits 0.

The wiring itself, config ► data ► model ► loop, is finetune/training/entry.py, which the package ships so that
`tailor train` runs it from anywhere; docs/architecture.md maps every module.
"""

import sys

from finetune.training.distributed import exit_process
from finetune.training.entry import run

if __name__ == "__main__":
    exit_process(run(sys.argv[1:]))
