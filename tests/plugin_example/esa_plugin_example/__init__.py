"""An example third-party plugin: a metric, a perturbation with an option, and an evaluator."""

import torch

from esa_core import hookimpl
from esa_core.api import (
    DIFFERENCE,
    GRAD,
    Column,
    Evaluator,
    Findings,
    Measure,
    Metric,
    Option,
    Perturbation,
)


class AbsGrad(Metric):
    """|gradient|, mean over batches: how steep the loss is along each weight."""

    name = "abs_grad"
    needs = frozenset({GRAD})

    def on_grad(self, state, weight, grad):
        state.add_(grad.abs().to(state.dtype))

    def keep(self, state, weight):
        """Each seed's steepest weight of the matrix."""
        at = state.argmax()
        return {"row": at // state.shape[1], "col": at % state.shape[1]}

    def findings(self, kept):
        """A findings table: the steepest weight per matrix, marked where every seed agrees."""
        rows = []
        for k in kept:
            where = {(int(seed["row"]), int(seed["col"])) for seed in k.seeds}
            (row, col), *_ = sorted(where)
            rows.append({"param": k.param, "row": row, "col": col,
                         "seeds_agreeing": len(where) == 1})
        columns = (Column("param"), Column("row"), Column("col"),
                   Column("seeds_agreeing", "every seed's steepest weight is this one"))
        return [Findings("steepest_weights", "Steepest weight of each matrix", columns, rows,
                         note="argmax of summed |gradient| per matrix and seed",
                         mark="seeds_agreeing", facts={"seeds": len(kept[0].seeds)})]


class ScaleBy(Perturbation):
    """w <- factor * w (--perturb-arg factor=0.5); the default 0 removes the weight."""

    name = "scale_by"
    options = (Option("factor", float, 0.0, "what each selected weight is multiplied by"),)

    def perturb(self, values, matrix, generator):
        return values * self.settings["factor"], {}


class Top5(Evaluator):
    """Top-5 next-token accuracy on the held-out blocks."""

    name = "top5"
    options = (Option("k", int, 5, "how many guesses count (--eval-arg k=10)"),)

    def measures(self):
        k = self.settings["k"]
        return (Measure(f"top{k}_accuracy", f"top{k}_accuracy_drop", higher_is_better=True,
                        change=DIFFERENCE),)

    @torch.no_grad()
    def evaluate(self, model, data, label=""):
        device = next(model.parameters()).device
        hits = total = 0
        for batch in data.blocks.split(data.batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1]
            guesses = logits.topk(self.settings["k"], dim=-1).indices
            hits += int((guesses == batch[:, 1:, None]).any(-1).sum())
            total += batch[:, 1:].numel()
        [measure] = self.measures()
        return {measure.name: hits / total}


@hookimpl
def register_metrics(register):
    register(AbsGrad)


@hookimpl
def register_perturbations(register):
    register(ScaleBy)


@hookimpl
def register_evaluators(register):
    register(Top5)
