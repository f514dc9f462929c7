"""Each evaluation of a run: eval (and retain) loss, greedy answers with their scores, and beside them what the base
model did on the same sets, measured before step 1 with the adapters switched off (no second model in memory)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from torch import nn

from finetune.config import TrainConfig
from finetune.training.answer_scores import read_answer, score_answer, score_rates
from finetune.training.console import Console
from finetune.training.distributed import DistInfo
from finetune.training.eval import evaluate
from finetune.training.eval_generations import (
    GENERATIONS_FILE,
    EvalChat,
    generate_answers,
    read_eval_chats,
    write_generations,
)
from finetune.training.monitoring import METRICS_FILE, MetricsLogger, format_eval_line
from model.lora import lora_switched_off

SHOWN_ANSWERS = 2  # answers printed at each eval; every one is in eval_generations.jsonl


@dataclass
class Evaluator:
    """A run's evaluations: the same eval and retain batches and eval chats at each, set against the base model's.

    Each rank evaluates its own batches; the record is complete, logged and shown on rank 0.
    """

    eval_batches: list
    retain_batches: list
    chats: list[EvalChat]
    tokenizer: MistralTokenizer
    dist_info: DistInfo
    run_dir: Path
    retain_warn: float
    base: dict | None = None  # the base model's eval record, on rank 0

    def evaluate_base(self, loss_model: nn.Module, logger: MetricsLogger | None, console: Console | None) -> None:
        """The base model's figures, logged as step 0 with `base: true`, for every later eval to be set against."""
        with lora_switched_off(loss_model):
            self.base = self.evaluate(loss_model, 0, logger, console, base=True)

    def evaluate(
        self,
        loss_model: nn.Module,
        step: int,
        logger: MetricsLogger | None,
        console: Console | None,
        base: bool = False,
    ) -> dict:
        """Measure, log and show the eval at `step`.

        Args:
            logger: the run's metrics log; None on the ranks other than 0, which only measure.
            console: where the eval's lines are printed (rank 0).
            base: the model has its adapters switched off: the record is the base model's, marked `base: true`.

        Returns:
            The eval record (eval and retain loss, answer scores), complete on rank 0.
        """
        device = self.dist_info.device
        record = dict(kind="eval", step=step, **(dict(base=True) if base else {}))
        record.update(evaluate(loss_model, self.eval_batches, device))
        if self.retain_batches:
            retain = evaluate(loss_model, self.retain_batches, device)
            record.update({key.replace("eval_", "retain_", 1): value for key, value in retain.items()})
            if self.base and not base and self.base.get("retain_loss"):
                record["retain_loss_change"] = record["retain_loss"] / self.base["retain_loss"] - 1
        answers = scores = None
        if self.chats:
            eos_id = self.tokenizer.instruct_tokenizer.tokenizer.eos_id
            tokens = generate_answers(loss_model, self.chats, eos_id, self.dist_info)
            if tokens is not None:
                answers = [read_answer(t, self.tokenizer) for t in tokens]
                scores = [score_answer(a, c.reference) for a, c in zip(answers, self.chats)]
                record["scores"] = _rates_per_source(self.chats, scores)
        if logger is None:
            return record
        logger.log(record)
        lines = [format_eval_line(record, self.base)]
        if answers is not None:
            write_generations(self.run_dir / GENERATIONS_FILE, step, base, self.chats, answers, scores)
            logger.log_table("eval/generations", step, _table_rows(self.chats, answers, scores))
            lines += [_shown_answer(c, a, s) for c, a, s in list(zip(self.chats, answers, scores))[:SHOWN_ANSWERS]]
        if record.get("retain_loss_change", 0) > self.retain_warn:
            lines.append(
                f"  warning: the retain loss rose {record['retain_loss_change']:.1%} over the base model's "
                f"({self.base['retain_loss']:.4f} -> {record['retain_loss']:.4f}; eval.retain_warn "
                f"{self.retain_warn:.0%}): the adapters make the model worse on data.retain"
            )
        console.print("\n".join(lines))
        return record


def build_evaluator(
    cfg: TrainConfig,
    tokenizer: MistralTokenizer,
    dist_info: DistInfo,
    eval_batches: list,
    retain_batches: list,
    resumed: bool,
) -> Evaluator | None:
    """Build the run's evaluator; None with eval off (no eval batches).

    Eval chats are read now, before the model is built, so that a fault in them stops the run early. On a resumed
    run, the base model's record is read back from metrics.jsonl rather than measured again.

    Args:
        resumed: the run starts from a checkpoint.
    """
    if not eval_batches:
        return None
    chats = []
    if cfg.eval.generate:
        groups = dict(eval=cfg.data.eval, retain=cfg.data.retain)
        chats, passed_over = read_eval_chats(groups, cfg.eval.generate, tokenizer)
        if dist_info.is_main:
            for name, skipped in passed_over.items():
                answered = sum(f"{c.group}:{c.source}" == name for c in chats)
                why = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
                print(
                    f"eval.generate: {name}: {answered} chats answered at each eval"
                    + (f" ({why} passed over)" * bool(why))
                )
    evaluator = Evaluator(
        eval_batches, retain_batches, chats, tokenizer, dist_info, Path(cfg.run_dir), cfg.eval.retain_warn
    )
    if resumed and dist_info.is_main:
        evaluator.base = read_base_record(Path(cfg.run_dir) / METRICS_FILE)
    return evaluator


def read_base_record(metrics_path: Path) -> dict | None:
    """The base model's eval record of a run, from its metrics.jsonl; None when it has none (eval turned on later)."""
    base = None
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind") == "eval" and record.get("base"):
                base = record
    return base


def _rates_per_source(chats: list[EvalChat], scores: list[dict]) -> dict:
    grouped: dict[str, dict[str, list]] = {}
    for chat, score in zip(chats, scores):
        grouped.setdefault(chat.group, {}).setdefault(chat.source, []).append(score)
    return {group: {source: score_rates(s) for source, s in sources.items()} for group, sources in grouped.items()}


def _table_rows(chats, answers, scores) -> list[dict]:
    return [
        dict(
            source=c.source,
            line=c.line,
            prompt=json.dumps(c.prompt, ensure_ascii=False),
            reference=json.dumps(c.reference.shown, ensure_ascii=False),
            generated=a.text,
            right=all(s.values()),
        )
        for c, a, s in zip(chats, answers, scores)
    ]


def _shown_answer(chat: EvalChat, answer, score: dict) -> str:
    asked, said = (
        text if len(text) <= 80 else text[:77] + "..." for text in (str(chat.prompt[-1].get("content")), answer.text)
    )
    verdict = "right" if all(score.values()) else f"expected {json.dumps(chat.reference.shown, ensure_ascii=False)}"
    return f"  e.g. {chat.file}:{chat.line} {asked!r} -> {said!r}  [{verdict}]"
