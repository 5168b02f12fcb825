"""The ``otguard`` model type of lm-evaluation-harness: any lm-eval task on a steered model.

``lm_eval.models.huggingface.HFLM`` does the batching, truncation, chat templates and generation;
this class only attaches the policy around its two request paths, with the edit scope each needs:

- log-likelihood requests (multiple choice, perplexity): scope ``"answer"``, so only the
  **continuation** tokens are edited, exactly as :func:`otguard.evaluation.truthfulqa_mc.score_mc`
  scores an answer (the context, and so the log-probability of the first continuation token, is
  the plain model's). HFLM scores a request on ``(context + continuation)[-(max_length + 1):][:-1]``,
  so its first continuation token sits at ``len(kept) - len(continuation)``; requests are grouped by
  that position and each group runs with it as the handle's answer start (HFLM's one-token
  continuation cache only shares logits inside a group, where it is exact);
- ``generate_until``: scope ``"generation"`` (the last prompt token and every generated one), the
  scope of ``otguard generate``.

lm-eval 0.4 discovers model types only in its own package, so the type is registered when this
module is imported: run the harness through ``python -m otguard.integrations.lm_eval`` (the same
arguments as ``lm_eval``), or ``import otguard.integrations.lm_eval`` before ``lm_eval.simple_evaluate``::

    python -m otguard.integrations.lm_eval --model otguard --device cpu \\
        --model_args pretrained=smollm2-135m,policy=hf://org/name --tasks truthfulqa_mc1

Model arguments besides HFLM's: ``policy`` (a folder or ``hf://org/name[@revision]``; absent or
``none`` = the plain model), ``kappa`` (SLIM strength override), ``check_weights`` (default true).
``pretrained`` also takes otguard's aliases (``smollm2-135m``: the packaged model's converted folder).
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from otguard.policy import Policy, Scope

logger = logging.getLogger(__name__)

__all__ = ["OtguardLM", "answer_start", "main"]


def answer_start(context_len: int, continuation_len: int, max_length: int) -> int:
    """Absolute position of the first continuation token in HFLM's (left-truncated) input row."""
    kept = min(context_len + continuation_len, max_length + 1)
    return kept - continuation_len


def _model_source(pretrained: Any) -> Any:
    """An otguard alias becomes its converted model folder (converted once); anything else is HFLM's."""
    if not isinstance(pretrained, str):
        return pretrained
    from otguard.models import cache_dir, load_model, resolve_model_source

    if resolve_model_source(pretrained)[0] != "alias":
        return pretrained
    folder = cache_dir() / "models" / pretrained
    if not (folder / "config.json").is_file():
        load_model(pretrained)  # writes the converted safetensors folder on first use
    return str(folder)


@register_model("otguard")
class OtguardLM(HFLM):
    """HFLM with an otguard policy attached to log-likelihood and generation requests."""

    def __init__(
        self,
        pretrained: Any = "smollm2-135m",
        policy: str | None = None,
        kappa: float | None = None,
        check_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        # The policy files are read and checked before the model is loaded (errors come first).
        self.policy = None if policy in (None, "", "none") else Policy.load(str(policy))
        self.kappa = None if kappa is None else float(kappa)
        self.check_weights = bool(check_weights)
        super().__init__(pretrained=_model_source(pretrained), **kwargs)
        if self.policy is not None:
            from otguard.sites import model_identity

            self.policy.model.check_compatible(model_identity(self.model), check_weights=self.check_weights)
            logger.info("otguard: %s", self.policy.summary())

    def _attach(self, scope: Scope) -> Any:
        assert self.policy is not None
        return self.policy.attach(self.model, scope=scope, kappa=self.kappa, check_weights=self.check_weights)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.policy is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups: dict[int, list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            groups.setdefault(answer_start(len(context), len(continuation), self.max_length), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with self._attach("answer") as handle:
            for start, rows in sorted(groups.items()):
                handle.set_answer_start(start)
                got = super()._loglikelihood_tokens(
                    [requests[i] for i in rows], disable_tqdm=True, override_bs=override_bs
                )
                for i, value in zip(rows, got, strict=True):
                    results[i] = value
        logger.info(
            "otguard: %d log-likelihood requests in %d answer-start groups", len(requests), len(groups)
        )
        return results  # type: ignore[return-value]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if self.policy is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        with self._attach("generation"):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict[str, Any]:
        info = dict(super().get_model_info())
        info["otguard_policy"] = None if self.policy is None else self.policy.summary()
        info["otguard_kappa"] = self.kappa
        return info


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line with the ``otguard`` model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
