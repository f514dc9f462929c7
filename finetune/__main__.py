"""`python -m finetune ...` is `tailor ...`."""

from finetune.cli import main

raise SystemExit(main())
