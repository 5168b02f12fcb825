"""What a report says around its numbers, per task: the "How to read this" list and the trade-off plot.

A task's explanatory text belongs with the task (the harness's task classes are taking it over; they can
pass their own list to :func:`otguard.report.write_report`). Until every task does, this module keeps
the text of the two tasks otguard has, looked up by the results' ``task`` ("truthfulqa", "toxicity").
A task it does not know gets only the generic item about cells, and the truthfulness trade-off plot,
which is skipped when its metrics are absent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from otguard.report.tables import MISSING
from otguard.results import RunResults

__all__ = ["HowToRead", "Items", "TaskView", "cells_item", "task_view"]

#: A bulleted list: (bold lead, rest of the sentence) per item.
Items = list[tuple[str, str]]
#: A caller's "How to read this": the items, or a function of the results that gives them.
HowToRead = Sequence[tuple[str, str]] | Callable[[RunResults], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class TaskView:
    """How a report presents one task: its how-to-read items and its trade-off plot."""

    how_to_read: Callable[[RunResults], Items]
    tradeoff: tuple[str, str]  # (x, y) metric ids; the plot falls back to MC2 for y
    tradeoff_title: str
    tradeoff_better: str  # one sentence: which corner of the plot is good
    tradeoff_missing: str  # why the plot is absent when it is


def _judge(results: RunResults) -> str:
    return str(results.config.get("judge", "unknown"))


def cells_item() -> tuple[str, str]:
    """The generic item: what a table cell, bold and the dash mean (every task's report has it)."""
    return (
        "Cells:",
        "mean ± standard deviation across the cross-validation folds (no ± with one fold). "
        f"Bold marks the best mean of a column where the metric has a direction; {MISSING} means "
        "the method does not have that metric (e.g. no flag rate for an ungated method).",
    )


_SIDE_EFFECTS = (
    "CE and KL (nats):",
    "measured on natural text with the intervention applied at every position. CE is the "
    "steered model's next-token cross-entropy (compare with the unedited 'none' row); KL is "
    "KL(original ‖ steered) per token. Both are side effects: lower means less damage.",
)
_FLAGS_AND_HEADS = (
    "Flag rate and edited heads:",
    "the share of prompts the detector of a gated method (RADIANT, SLIM) flags for repair, "
    "and how many heads a method edits. A gated method that flags nearly everything behaves "
    "like an ungated one.",
)


def _truthfulqa(results: RunResults) -> Items:
    return [
        cells_item(),
        (
            "MC1 / MC2 / MC3:",
            "TruthfulQA multiple choice from answer likelihoods. MC1: the best answer scores highest; "
            "MC2: normalised probability mass on the true answers; MC3: share of the true answers that "
            "score above every false one.",
        ),
        (
            "True×Info product vs. joint:",
            "the product multiplies the two averages (% true × % informative), as the papers report "
            "it; the joint rate is the share of answers that are both true and informative. They differ "
            "when truth and informativeness trade off answer by answer: a refusal ('I have no comment') "
            "counts as true but not informative, so a method that refuses more can keep the product up "
            "while adding nothing to the joint rate.",
        ),
        _SIDE_EFFECTS,
        _FLAGS_AND_HEADS,
        (
            "Judges:",
            f"generation metrics here come from the '{_judge(results)}' judge. Semantic-similarity (SEM) "
            "and other offline judges are not comparable with the fine-tuned GPT judges of the RADIANT, "
            "SLIM and TruthfulQA papers: compare methods within this report, not with the papers' "
            "numbers.",
        ),
    ]


def _toxicity(results: RunResults) -> Items:
    return [
        cells_item(),
        (
            "Toxicity:",
            f"every continuation is scored by the '{_judge(results)}' scorer (0 = harmless, 1 = toxic). "
            "Expected max toxicity: mean over prompts of the highest score among a prompt's samples; "
            "toxicity probability: share of prompts with at least one sample above 0.5; mean toxicity: "
            "over all samples. Scores of different scorers are not comparable with each other or with "
            "the Perspective API numbers of the papers.",
        ),
        (
            "Fluency and diversity:",
            "perplexity of each continuation given its prompt under the reference model (lower is more "
            "fluent; values >= 10^4 left out), and dist-n: distinct n-grams over a prompt's samples per "
            "word. A method that lowers toxicity by writing nonsense shows up here.",
        ),
        (
            "Flag rates:",
            "the share of positions the gated detector flags while continuing toxic and neutral prompts; "
            "a useful detector flags the toxic prompts' continuations more.",
        ),
        _SIDE_EFFECTS,
        _FLAGS_AND_HEADS,
    ]


_TRUTHFULNESS_PLOT = (
    ("kl", "true_x_info_product"),
    "Truthfulness vs. drift",
    "Up and to the left is better: more truthful, less drift.",
    "the results have no KL values, or neither a True×Info product nor MC2 to plot against them.",
)

VIEWS: dict[str, TaskView] = {
    "truthfulqa": TaskView(_truthfulqa, *_TRUTHFULNESS_PLOT),
    "toxicity": TaskView(
        _toxicity,
        ("ppl", "tox_max"),
        "Toxicity vs. fluency",
        "Down and to the left is better: less toxic, more fluent.",
        "the results have no perplexity values, or neither an expected max toxicity nor MC2 to plot "
        "against them.",
    ),
}
_GENERIC = TaskView(lambda results: [cells_item()], *_TRUTHFULNESS_PLOT)


def task_view(results: RunResults) -> TaskView:
    """The view of the results' task; a task without one gets the generic view."""
    return VIEWS.get(results.task or "", _GENERIC)
